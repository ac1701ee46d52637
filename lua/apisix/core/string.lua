--- core.string: plain-text helpers (no patterns), falling back to the std `string` library.
local type = type
local error = error
local str_find = string.find
local str_sub = string.sub
local str_byte = string.byte
local ngx = ngx

local _M = { version = 0.1 }

setmetatable(_M, { __index = string })

--- Plain substring search: `find(s, "a.b")` looks for the text "a.b", not a pattern.
function _M.find(haystack, needle, from)
    return str_find(haystack, needle, from or 1, true)
end

--- True when `s` starts with `prefix`.
function _M.has_prefix(s, prefix)
    if type(s) ~= "string" or type(prefix) ~= "string" then
        error("unexpected type: s:" .. type(s) .. ", prefix:" .. type(prefix), 2)
    end
    if #s < #prefix then
        return false
    end
    return str_sub(s, 1, #prefix) == prefix
end

--- True when `s` ends with `suffix`.
function _M.has_suffix(s, suffix)
    if type(s) ~= "string" or type(suffix) ~= "string" then
        error("unexpected type: s:" .. type(s) .. ", suffix:" .. type(suffix), 2)
    end
    if #s < #suffix then
        return false
    end
    return suffix == "" or str_sub(s, -#suffix) == suffix
end

--- The position of the last `ch` (one character) in `s` at or before `idx` (default: the end),
-- or nil.
function _M.rfind_char(s, ch, idx)
    local b = str_byte(ch)
    for i = idx or #s, 1, -1 do
        if str_byte(s, i) == b then
            return i
        end
    end
    return nil
end

--- A script with each line's leading blanks removed (APISIX sends Redis scripts this way).
function _M.compress_script(s)
    s = s:gsub("^%s+", "")
    s = s:gsub("\n%s+", "\n")
    return s
end

--- `ngx.decode_args` / `ngx.encode_args`.
function _M.decode_args(args)
    return ngx.decode_args(args)
end

function _M.encode_args(args)
    return ngx.encode_args(args)
end

return _M
