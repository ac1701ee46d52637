-- `require("pl.stringx")`: the Penlight string helpers APISIX plugins use (strip, lstrip,
-- rstrip, split, startswith, endswith, join, replace, count, splitlines), same names and
-- arguments. Functions taking a set of characters treat it as plain characters.
local type = type
local tostring = tostring
local error = error
local str_find = string.find
local str_sub = string.sub
local str_gsub = string.gsub
local tab_concat = table.concat

local _M = {}

local function assert_string(n, s)
    if type(s) ~= "string" then
        error("argument " .. n .. " expected a 'string', got a '" .. type(s) .. "'", 3)
    end
end

local function char_class(chars)
    return "[" .. str_gsub(chars, "[%]%^%-%%]", "%%%0") .. "]"
end

function _M.lstrip(s, chars)
    assert_string(1, s)
    local set = chars and char_class(chars) or "%s"
    return (str_gsub(s, "^" .. set .. "+", ""))
end

function _M.rstrip(s, chars)
    assert_string(1, s)
    local set = chars and char_class(chars) or "%s"
    local i = #s
    while i > 0 and str_find(str_sub(s, i, i), "^" .. set .. "$") do
        i = i - 1
    end
    return str_sub(s, 1, i)
end

function _M.strip(s, chars)
    return _M.rstrip(_M.lstrip(s, chars), chars)
end

function _M.startswith(s, prefix)
    assert_string(1, s)
    if type(prefix) == "table" then
        for _, p in ipairs(prefix) do
            if str_sub(s, 1, #p) == p then
                return true
            end
        end
        return false
    end
    return str_sub(s, 1, #prefix) == prefix
end

function _M.endswith(s, suffix)
    assert_string(1, s)
    if type(suffix) == "table" then
        for _, p in ipairs(suffix) do
            if p == "" or str_sub(s, -#p) == p then
                return true
            end
        end
        return false
    end
    return suffix == "" or str_sub(s, -#suffix) == suffix
end

--- split(s, sep?, n?): on runs of whitespace without `sep`, else on the plain text `sep`;
-- at most `n` parts.
function _M.split(s, sep, n)
    assert_string(1, s)
    local out = {}
    if not sep then
        for w in s:gmatch("%S+") do
            if n and #out == n - 1 then
                local rest = str_sub(s, (str_find(s, w, 1, true)))
                out[#out + 1] = _M.rstrip(rest)
                return out
            end
            out[#out + 1] = w
        end
        return out
    end
    local init = 1
    while true do
        if n and #out == n - 1 then
            out[#out + 1] = str_sub(s, init)
            return out
        end
        local i, j = str_find(s, sep, init, true)
        if not i or sep == "" then
            out[#out + 1] = str_sub(s, init)
            return out
        end
        out[#out + 1] = str_sub(s, init, i - 1)
        init = j + 1
    end
end

function _M.splitlines(s, keep_ends)
    assert_string(1, s)
    local out = {}
    local pos = 1
    while pos <= #s do
        local i, j = str_find(s, "\r?\n", pos)
        if not i then
            out[#out + 1] = str_sub(s, pos)
            break
        end
        out[#out + 1] = str_sub(s, pos, keep_ends and j or i - 1)
        pos = j + 1
    end
    return out
end

function _M.join(sep, list)
    return tab_concat(list, sep)
end

function _M.replace(s, old, new, n)
    assert_string(1, s)
    local out, count = {}, 0
    local init = 1
    while not n or count < n do
        local i, j = str_find(s, old, init, true)
        if not i or old == "" then
            break
        end
        out[#out + 1] = str_sub(s, init, i - 1)
        out[#out + 1] = new
        init = j + 1
        count = count + 1
    end
    out[#out + 1] = str_sub(s, init)
    return tab_concat(out)
end

function _M.count(s, sub)
    assert_string(1, s)
    local c, init = 0, 1
    while true do
        local i, j = str_find(s, sub, init, true)
        if not i or sub == "" then
            return c
        end
        c = c + 1
        init = j + 1
    end
end

return _M
