--- core.json: JSON for plugins, with lua-cjson's conventions.
--
-- `encode(v)` returns the text or `nil, err`; an empty table is `{}` unless it carries
-- `core.json.array_mt`. `decode(s)` returns the value or `nil, err`; JSON null is
-- `core.json.null` (== `ngx.null`). `delay_encode(v)` returns an object that is encoded only when
-- it is turned into a string (for log lines). `stably_encode(v)` sorts object keys.
local cjson = require("cjson.safe")
local ngx = ngx
local type = type
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local setmetatable = setmetatable
local getmetatable = getmetatable
local next = next
local sort = table.sort
local concat = table.concat
local str_format = string.format
local str_gsub = string.gsub
local str_byte = string.byte
local math_floor = math.floor
local math_huge = math.huge

local null = ngx.null
local array_mt = cjson.array_mt

local _M = {
    version = 0.1,
    null = null,
    array_mt = array_mt,
    empty_array = cjson.empty_array,
}

-- Copies a value into something the codec accepts: functions, userdata and cdata become their
-- `tostring`, a table met again on the current path becomes "<cycle>" (APISIX's `force` mode).
local function force_copy(v, path)
    local t = type(v)
    if t == "table" then
        if path[v] then
            return "<cycle>"
        end
        path[v] = true
        local copy = setmetatable({}, getmetatable(v) == array_mt and array_mt or nil)
        for k, x in pairs(v) do
            if type(k) ~= "string" and type(k) ~= "number" then
                k = tostring(k)
            end
            copy[k] = force_copy(x, path)
        end
        path[v] = nil
        return copy
    end
    if t == "string" or t == "number" or t == "boolean" or v == null then
        return v
    end
    return tostring(v)
end

--- Encodes `data`; with `force`, unsupported values are stringified instead of failing.
function _M.encode(data, force)
    if force then
        data = force_copy(data, {})
    end
    return cjson.encode(data)
end

--- Decodes `str`. With `opts.null_as_nil`, JSON nulls inside objects are dropped.
function _M.decode(str, opts)
    local v, err = cjson.decode(str)
    if v == nil then
        return nil, err
    end
    if opts and opts.null_as_nil then
        return _M.strip_nulls(v)
    end
    return v
end

--- Removes JSON nulls from decoded data, in place; a top-level null becomes nil.
function _M.strip_nulls(v)
    if v == null then
        return nil
    end
    if type(v) == "table" then
        for k, x in pairs(v) do
            if x == null then
                v[k] = nil
            elseif type(x) == "table" then
                _M.strip_nulls(x)
            end
        end
    end
    return v
end

local delay_mt = {
    __tostring = function(self)
        local s, err = _M.encode(self.data, self.force)
        if not s then
            return "<failed to encode: " .. tostring(err) .. ">"
        end
        return s
    end,
}

--- A value that encodes `data` only when `tostring` is called on it (lazy log arguments).
function _M.delay_encode(data, force)
    return setmetatable({ data = data, force = force }, delay_mt)
end

-- Stable encoder: pure Lua, keys sorted, so equal tables always produce equal text.
local escapes = {
    ['"'] = '\\"',
    ["\\"] = "\\\\",
    ["\b"] = "\\b",
    ["\f"] = "\\f",
    ["\n"] = "\\n",
    ["\r"] = "\\r",
    ["\t"] = "\\t",
}

local function escape_char(c)
    return escapes[c] or str_format("\\u%04x", str_byte(c))
end

local function encode_string(s)
    return '"' .. str_gsub(s, '[%c"\\]', escape_char) .. '"'
end

local isarray = require("table.isarray")

-- Encodes as a JSON array: tables marked with array_mt, and non-empty tables whose keys are
-- exactly 1..n (an empty table stays an object, as cjson does).
local function is_array(t)
    if getmetatable(t) == array_mt then
        return true
    end
    if next(t) == nil then
        return false
    end
    return isarray(t)
end

local function key_less(a, b)
    return tostring(a) < tostring(b)
end

local encode_stable

local function encode_number(v)
    if v ~= v or v == math_huge or v == -math_huge then
        return nil, "Cannot serialise number: must not be NaN or Infinity"
    end
    if v == math_floor(v) and v > -1e15 and v < 1e15 then
        return str_format("%d", v)
    end
    return str_format("%.14g", v)
end

function encode_stable(v, depth)
    if depth > 1000 then
        return nil, "Cannot serialise, excessive nesting (1001)"
    end
    local t = type(v)
    if v == nil or v == null then
        return "null"
    elseif t == "boolean" then
        return v and "true" or "false"
    elseif t == "number" then
        return encode_number(v)
    elseif t == "string" then
        return encode_string(v)
    elseif t == "table" then
        local parts = {}
        if is_array(v) then
            for i, x in ipairs(v) do
                local s, err = encode_stable(x, depth + 1)
                if not s then
                    return nil, err
                end
                parts[i] = s
            end
            return "[" .. concat(parts, ",") .. "]"
        end
        local keys = {}
        for k in pairs(v) do
            local kt = type(k)
            if kt ~= "string" and kt ~= "number" then
                return nil, "Cannot serialise " .. kt .. ": table key must be a number or string"
            end
            keys[#keys + 1] = k
        end
        sort(keys, key_less)
        for i, k in ipairs(keys) do
            local s, err = encode_stable(v[k], depth + 1)
            if not s then
                return nil, err
            end
            parts[i] = encode_string(tostring(k)) .. ":" .. s
        end
        return "{" .. concat(parts, ",") .. "}"
    end
    return nil, "Cannot serialise " .. t .. ": type not supported"
end

--- Encodes with object keys sorted, so the text is the same for equal data.
function _M.stably_encode(data)
    return encode_stable(data, 0)
end

return _M
