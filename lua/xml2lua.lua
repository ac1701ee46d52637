--- xml2lua: only `toXml(tbl, root)`, which APISIX's mocking plugin uses to send a generated
-- example as XML. Keys become elements (sorted, so the text is stable); arrays repeat their
-- parent element; text is escaped.
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

return _M
