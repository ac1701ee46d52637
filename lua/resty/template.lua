--- resty.template: the template engine APISIX's body-transformer (and so ai-prompt-template)
-- compiles its templates with. Written for moongate with lua-resty-template's syntax and API:
--   {{expr}}   the value, HTML-escaped (`template.escape`)
--   {*expr*}   the value as it is (`template.output`: nil is "", a function is called)
--   {% code %} Lua code;            {# comment #}
--   {(name)}   another template (a file under `template.root`, or the string itself),
--              `{(name, ctx)}` with its own context; {[expr]} the same with a computed name
--   {-raw-}...{-raw-} and {-verbatim-}...{-verbatim-}: the text between, untouched
--   {-name-}...{-name-}: a block, stored in `blocks.name` instead of being written
--   \{{ ... : a backslash before a tag writes the tag as text
-- A code or comment tag alone on its line takes the line with it (no blank line left).
-- Names in a template are looked up in the context, then in `template`, then in the globals;
-- `context`, `template`, `blocks` and `layout` are names of their own.
local type = type
local tostring = tostring
local setmetatable = setmetatable
local load = load
local setfenv = setfenv
local concat = table.concat
local gsub = string.gsub
local find = string.find
local sub = string.sub
local format = string.format
local match = string.match
local io_open = io.open

local template = { _VERSION = "2.0", root = nil, cache = {} }

local caching = true

local HTML = { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;",
               ["'"] = "&#39;", ["/"] = "&#47;" }
local CODE = { ["{"] = "&#123;", ["}"] = "&#125;", ["&"] = "&amp;", ["<"] = "&lt;",
               [">"] = "&gt;", ['"'] = "&quot;", ["'"] = "&#39;", ["/"] = "&#47;" }

--- Turns caching of compiled templates on or off; returns the previous setting.
function template.caching(enable)
    local was = caching
    if enable ~= nil then
        caching = enable == true
    end
    return was
end

--- A value as text: nil (and ngx.null) is "", a function's result is used.
function template.output(s)
    if s == nil or (ngx and s == ngx.null) then
        return ""
    end
    if type(s) == "function" then
        return template.output(s())
    end
    return tostring(s)
end

--- A value as HTML-escaped text (`c` also escapes braces, for code inside a page).
function template.escape(s, c)
    if type(s) == "string" then
        return (gsub(s, c and "[}{\">/<'&]" or "[\">/<'&]", c and CODE or HTML))
    end
    return template.output(s)
end

local function readfile(path)
    local f = io_open(path, "rb")
    if not f then
        return nil
    end
    local s = f:read("*a")
    f:close()
    return s
end

--- The text of a view: itself when `plain`, else the file `root/view` if there is one,
-- else the string itself (as lua-resty-template).
function template.load(view, plain)
    if plain == true then
        return view
    end
    if plain == nil and (find(view, "[{\n]")) then
        return view
    end
    local path = view
    if template.root and template.root ~= "" then
        path = template.root .. "/" .. view
    end
    local s = readfile(path)
    if s then
        return s
    end
    if plain == false then
        error(format("template file not found: %s", path), 2)
    end
    return view
end

-- The Lua source that builds the output of `view`.
local function parse(view)
    local out = { "local ___,blocks,layout={},blocks or {},nil\n" }
    local function text(s)
        if s ~= "" then
            out[#out + 1] = format("___[#___+1]=%q\n", s)
        end
    end
    local i, n = 1, #view
    while i <= n do
        local s = find(view, "{", i, true)
        if not s then
            text(sub(view, i))
            break
        end
        local t = sub(view, s + 1, s + 1)
        local closer = ({ ["{"] = "}}", ["*"] = "*}", ["%"] = "%}", ["#"] = "#}",
                         ["("] = ")}", ["["] = "]}", ["-"] = "-}" })[t]
        if not closer then
            text(sub(view, i, s))
            i = s + 1
        elseif s > 1 and sub(view, s - 1, s - 1) == "\\" then
            -- an escaped tag: the text before the backslash, then the brace as text
            text(sub(view, i, s - 2) .. "{")
            i = s + 1
        else
            local e = find(view, closer, s + 2, true)
            if not e then
                text(sub(view, i))
                break
            end
            local body = sub(view, s + 2, e - 1)
            local before = sub(view, i, s - 1)
            local after = e + 2
            if t == "%" or t == "#" then
                -- a tag alone on its line takes the line's indentation and newline along
                local line_start = match(before, "\n([ \t]*)$") or
                    (i == 1 and match(before, "^([ \t]*)$"))
                local nl = match(view, "^[ \t]*\r?\n", after)
                if line_start and nl then
                    before = sub(before, 1, #before - #line_start)
                    after = after + #nl
                end
            end
            text(before)
            if t == "{" then
                out[#out + 1] = format("___[#___+1]=template.escape(%s)\n", body)
            elseif t == "*" then
                out[#out + 1] = format("___[#___+1]=template.output(%s)\n", body)
            elseif t == "%" then
                out[#out + 1] = body .. "\n"
            elseif t == "(" or t == "[" then
                local name, ctx = match(body, "^%s*(.-)%s*,%s*(.-)%s*$")
                if t == "(" then
                    name = format("%q", name or match(body, "^%s*(.-)%s*$"))
                else
                    name = name or body
                end
                out[#out + 1] = format(
                    "___[#___+1]=template.process(%s,%s)\n", name, ctx or "context")
            elseif t == "-" then
                local tag = match(body, "^([%w_]+)$")
                local close = tag and find(view, "{-" .. tag .. "-}", after, true)
                if not close then
                    -- not a block: the text as it is
                    text("{-" .. body .. "-}")
                else
                    local inner = sub(view, after, close - 1)
                    if tag == "raw" or tag == "verbatim" then
                        text(inner)
                    else
                        out[#out + 1] = format("blocks[%q]=template.process(%q,context,nil,true)\n",
                            tag, inner)
                    end
                    after = close + #tag + 4
                end
            end
            -- `{# ... #}` writes nothing
            i = after
        end
    end
    out[#out + 1] = "return table.concat(___)\n"
    return concat(out)
end

--- The Lua source a view compiles to (for debugging templates).
function template.parse(view, plain)
    return parse(template.load(view, plain))
end

--- Compiles `view` to a function(context) -> string. Compiled views are cached under
-- `cache_key` (default: the view itself) unless `cache_key` is "no-cache".
function template.compile(view, cache_key, plain)
    if type(view) ~= "string" then
        error("template.compile: the view must be a string, got " .. type(view), 2)
    end
    local key = cache_key or view
    if caching and key ~= "no-cache" and template.cache[key] then
        return template.cache[key], true
    end
    local source = parse(template.load(view, plain))
    local chunk, err = load(source, "=" .. (#view > 40 and sub(view, 1, 40) .. "..." or view))
    if not chunk then
        error(err, 2)
    end
    local fn = function(context)
        context = context or {}
        local env = setmetatable({ context = context, template = template }, {
            __index = function(_, k)
                local v = context[k]
                if v == nil then
                    v = template[k]
                end
                if v == nil then
                    v = _G[k]
                end
                return v
            end,
        })
        return setfenv(chunk, env)()
    end
    if caching and key ~= "no-cache" then
        template.cache[key] = fn
    end
    return fn, false
end

--- Compiles and runs `view` with `context`; returns the text.
function template.process(view, context, cache_key, plain)
    return template.compile(view, cache_key, plain)(context)
end

--- Writes the processed view with `ngx.print`.
function template.render(view, context, cache_key, plain)
    return ngx.print(template.process(view, context, cache_key, plain))
end

--- A view object: its fields are the context; `:process()` / `:render()`.
function template.new(view, layout)
    local obj = { view = view, layout = layout }
    return setmetatable(obj, {
        __index = {
            process = function(self, context)
                local text = template.process(self.view, context or self)
                if self.layout then
                    local c = setmetatable({ view = text }, { __index = context or self })
                    text = template.process(self.layout, c)
                end
                return text
            end,
            render = function(self, context)
                return ngx.print(self:process(context))
            end,
        },
        __tostring = function(self) return self:process() end,
    })
end

return template
