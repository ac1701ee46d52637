-- `require("cjson")`: lua-cjson's API over the gateway's native JSON codec
-- (`__moongate.json_encode` / `__moongate.json_decode`). This flavour raises errors, like
-- lua-cjson; `cjson.safe` returns `nil, err` instead.
--
-- Encoding follows lua-cjson: an empty table is `{}` unless it carries `cjson.array_mt` (or
-- `encode_empty_table_as_object(false)` is in effect); `cjson.null` encodes as `null`.
local mg = __moongate
local ngx = ngx
local type = type
local pairs = pairs
local pcall = pcall
local error = error
local next = next
local getmetatable = getmetatable
local setmetatable = setmetatable
local native_encode = mg.json_encode
local native_decode = mg.json_decode
local array_mt = mg.array_mt

-- Copies `v`, marking empty tables as arrays: used only when a caller turned
-- `encode_empty_table_as_object` off, so the common path never copies.
local function empty_as_array(v, seen)
    if type(v) ~= "table" then
        return v
    end
    if seen[v] then
        return seen[v]
    end
    if next(v) == nil then
        return setmetatable({}, array_mt)
    end
    local copy = setmetatable({}, getmetatable(v))
    seen[v] = copy
    for k, x in pairs(v) do
        copy[k] = empty_as_array(x, seen)
    end
    return copy
end

local function new(safe)
    local empty_table_as_object = true
    local M = {
        _NAME = "cjson",
        _VERSION = "2.1.0.moongate",
        null = ngx.null,
        array_mt = array_mt,
        empty_array_mt = array_mt,
        -- lua-cjson's `empty_array` is a light userdata; a marked empty table encodes the same.
        empty_array = setmetatable({}, array_mt),
    }
    if safe then
        M._NAME = "cjson.safe"
    end

    local function encode(v)
        if not empty_table_as_object then
            v = empty_as_array(v, {})
        end
        local ok, res, err = pcall(native_encode, v)
        if not ok then
            err = res
            res = nil
        end
        if res == nil then
            err = err or "cannot encode value"
            if safe then
                return nil, err
            end
            error(err, 2)
        end
        return res
    end

    local function decode(s)
        if type(s) ~= "string" then
            local err = "bad argument #1 to 'decode' (string expected, got " .. type(s) .. ")"
            if safe then
                return nil, err
            end
            error(err, 2)
        end
        local ok, res, err = pcall(native_decode, s)
        if not ok then
            err = res
            res = nil
        end
        if res == nil and err ~= nil then
            if safe then
                return nil, err
            end
            error(err, 2)
        end
        return res
    end

    M.encode = encode
    M.decode = decode

    function M.encode_empty_table_as_object(flag)
        if flag ~= nil then
            empty_table_as_object = flag and flag ~= "off"
        end
        return empty_table_as_object
    end

    -- The knobs below are accepted for compatibility; the native codec has fixed behaviour
    -- (arrays decode with array_mt so they encode back as arrays).
    function M.decode_array_with_array_mt(flag)
        return flag
    end
    function M.encode_escape_forward_slash(flag)
        return flag
    end
    function M.encode_number_precision(p)
        return p or 14
    end
    function M.encode_max_depth(d)
        return d or 1000
    end
    function M.decode_max_depth(d)
        return d or 1000
    end
    function M.encode_sparse_array(...)
        return ...
    end
    function M.encode_keep_buffer(flag)
        return flag
    end
    function M.encode_invalid_numbers(flag)
        return flag
    end
    function M.decode_invalid_numbers(flag)
        return flag
    end

    function M.new()
        return new(safe)
    end

    return M
end

local cjson = new(false)
-- Internal: lets `cjson.safe` build its flavour from the same code.
cjson.__new = new
return cjson
