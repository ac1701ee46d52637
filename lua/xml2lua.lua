--- xml2lua: `toXml(tbl, root)`, which APISIX's mocking plugin uses to send a generated
-- example as XML (keys become elements, sorted so the text is stable; arrays repeat their
-- parent element; text is escaped), and `parser(handler):parse(xml)`, which body-transformer
-- uses with `xmlhandler.tree`. The document is read by moongate's native tokenizer
-- (quick-xml); the events go to the handler's `starttag`, `endtag`, `text`, `cdata`,
-- `comment`, `decl`, `pi` and `dtd`, whichever it has.
local type = type
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local sort = table.sort
local concat = table.concat
local gsub = string.gsub
local rep = string.rep

local _M = { version = 0.1 }

local escapes = { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;" }

local function esc(s)
    return (gsub(tostring(s), '[&<>"]', escapes))
end

local function is_array(t)
    local n = #t
    if n == 0 then return false end
    for k in pairs(t) do
        if type(k) ~= "number" or k < 1 or k > n then
            return false
        end
    end
    return true
end

local emit

emit = function(out, name, v, depth)
    local pad = rep("  ", depth)
    if type(v) == "table" then
        if is_array(v) then
            for _, item in ipairs(v) do
                emit(out, name, item, depth)
            end
            return
        end
        local keys = {}
        for k in pairs(v) do keys[#keys + 1] = tostring(k) end
        sort(keys)
        out[#out + 1] = pad .. "<" .. name .. ">"
        for _, k in ipairs(keys) do
            emit(out, k, v[k], depth + 1)
        end
        out[#out + 1] = pad .. "</" .. name .. ">"
    else
        out[#out + 1] = pad .. "<" .. name .. ">" .. esc(v) .. "</" .. name .. ">"
    end
end

--- `tbl` as XML text under the element `root`.
function _M.toXml(tbl, root)
    local out = {}
    emit(out, root or "root", tbl, 0)
    return concat(out, "\n") .. "\n"
end

local handler_calls = {
    starttag = function(h, ev) return h.starttag, { name = ev.name, attrs = ev.attrs } end,
    endtag = function(h, ev) return h.endtag, { name = ev.name } end,
}

--- A parser that feeds `handler`. `parser.options.stripWS` (default true) trims text and
-- drops whitespace-only text, as xml2lua's default.
function _M.parser(handler)
    local p = { handler = handler, options = { stripWS = true, expandEntities = true } }

    function p.parse(self, xml)
        if type(xml) ~= "string" then
            error("xml2lua: the document must be a string, got " .. type(xml), 2)
        end
        local h = self.handler
        local strip = self.options.stripWS
        local events = require("moongate.xml").events(xml)
        for _, ev in ipairs(events) do
            local kind = ev.kind
            local call = handler_calls[kind]
            if call then
                local f, arg = call(h, ev)
                if f then f(h, arg) end
            elseif kind == "text" then
                local t = ev.text
                if strip then
                    t = gsub(gsub(t, "^%s+", ""), "%s+$", "")
                end
                if t ~= "" and h.text then
                    h:text(t)
                end
            elseif kind == "cdata" then
                if h.cdata then
                    h:cdata(ev.text)
                elseif h.text then
                    h:text(ev.text)
                end
            elseif h[kind] then
                h[kind](h, ev.text)
            end
        end
    end

    return p
end

return _M
