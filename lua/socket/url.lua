-- `require("socket.url")`: LuaSocket's URL functions (`parse`, `build`, `escape`,
-- `unescape`, `parse_path`, `build_path`, `absolute`), written for moongate with LuaSocket's
-- results: `parse` gives `scheme`, `authority`, `userinfo`, `user`, `password`, `host`,
-- `port` (a string, as LuaSocket has it), `path`, `params`, `query`, `fragment`, taking
-- missing parts from `default`; an empty URL is `nil, "invalid url"`. APISIX's AI plugins read
-- their endpoints with it. `absolute` resolves by RFC 3986's rules.
local type = type
local pairs = pairs
local tonumber = tonumber
local str_byte = string.byte
local str_char = string.char
local str_format = string.format
local str_gsub = string.gsub
local str_find = string.find
local str_sub = string.sub
local str_match = string.match
local tab_concat = table.concat
local tostring = tostring

local _M = { _VERSION = "URL 1.0.3" }

function _M.escape(s)
    return (str_gsub(s, "[^%w_]", function(c)
        return str_format("%%%02x", str_byte(c))
    end))
end

function _M.unescape(s)
    return (str_gsub(s, "%%(%x%x)", function(h)
        return str_char(tonumber(h, 16))
    end))
end

-- Characters a path segment may keep as they are.
local SEGMENT_SAFE = {}
for c in ("-_.!~*'();:@&=+$,"):gmatch(".") do
    SEGMENT_SAFE[c] = true
end

local function protect_segment(s)
    return (str_gsub(s, "[^%w]", function(c)
        if SEGMENT_SAFE[c] then
            return c
        end
        return str_format("%%%02X", str_byte(c))
    end))
end

-- Splits off the part of `s` that `pattern` (anchored, one capture) finds, returning the
-- capture and what is left.
local function take(s, pattern)
    local b, e, cap = str_find(s, pattern)
    if not b then
        return nil, s
    end
    return cap, str_sub(s, 1, b - 1) .. str_sub(s, e + 1)
end

function _M.parse(url, default)
    local parsed = {}
    for k, v in pairs(default or {}) do
        parsed[k] = v
    end
    if type(url) ~= "string" or url == "" then
        return nil, "invalid url"
    end
    url = str_gsub(url, "%s", "")
    local part
    part, url = take(url, "#(.*)$")
    parsed.fragment = part or parsed.fragment
    part, url = take(url, "^([%a][%w%+%-%.]*):")
    parsed.scheme = part or parsed.scheme
    part, url = take(url, "^//([^/]*)")
    parsed.authority = part or parsed.authority
    part, url = take(url, "%?(.*)$")
    parsed.query = part or parsed.query
    part, url = take(url, ";(.*)$")
    parsed.params = part or parsed.params
    if url ~= "" then
        parsed.path = url
    end
    local authority = parsed.authority
    if not authority then
        return parsed
    end
    part, authority = take(authority, "^([^@]*)@")
    parsed.userinfo = part or parsed.userinfo
    part, authority = take(authority, ":([^:%]]*)$")
    parsed.port = part or parsed.port
    if authority ~= "" then
        parsed.host = str_match(authority, "^%[(.+)%]$") or authority
    end
    local userinfo = parsed.userinfo
    if not userinfo then
        return parsed
    end
    part, userinfo = take(userinfo, ":([^:]*)$")
    parsed.password = part or parsed.password
    parsed.user = userinfo
    return parsed
end

-- The path's segments, unescaped, with `is_absolute` and `is_directory` flags.
function _M.parse_path(path)
    local parsed = {}
    path = path or ""
    for seg in path:gmatch("[^/]+") do
        parsed[#parsed + 1] = _M.unescape(seg)
    end
    if str_sub(path, 1, 1) == "/" then
        parsed.is_absolute = 1
    end
    if path ~= "" and str_sub(path, -1) == "/" then
        parsed.is_directory = 1
    end
    return parsed
end

function _M.build_path(parsed, unsafe)
    local out = {}
    for i = 1, #parsed do
        out[i] = unsafe and parsed[i] or protect_segment(parsed[i])
    end
    local path = tab_concat(out, "/")
    if #parsed > 0 then
        if parsed.is_directory then
            path = path .. "/"
        end
        if parsed.is_absolute then
            path = "/" .. path
        end
    elseif parsed.is_absolute or parsed.is_directory then
        path = "/"
    end
    return path
end

function _M.build(parsed)
    local url = parsed.path and _M.build_path(_M.parse_path(parsed.path)) or ""
    if parsed.params then
        url = url .. ";" .. parsed.params
    end
    if parsed.query then
        url = url .. "?" .. parsed.query
    end
    local authority = parsed.authority
    if parsed.host then
        authority = parsed.host
        if str_find(authority, ":", 1, true) then
            authority = "[" .. authority .. "]"
        end
        if parsed.port then
            authority = authority .. ":" .. tostring(parsed.port)
        end
        local userinfo = parsed.userinfo
        if parsed.user then
            userinfo = parsed.user
            if parsed.password then
                userinfo = userinfo .. ":" .. parsed.password
            end
        end
        if userinfo then
            authority = userinfo .. "@" .. authority
        end
    end
    if authority then
        url = "//" .. authority .. url
    end
    if parsed.scheme then
        url = parsed.scheme .. ":" .. url
    end
    if parsed.fragment then
        url = url .. "#" .. parsed.fragment
    end
    return url
end

-- RFC 3986 5.2.4.
local function remove_dot_segments(path)
    local out = {}
    local absolute = str_sub(path, 1, 1) == "/"
    local trailing = false
    for seg in (path .. "/"):gmatch("([^/]*)/") do
        trailing = false
        if seg == ".." then
            if #out > 0 then
                out[#out] = nil
            end
            trailing = true
        elseif seg == "." then
            trailing = true
        elseif seg ~= "" or #out == 0 then
            out[#out + 1] = seg
        end
    end
    local s = tab_concat(out, "/")
    if absolute and str_sub(s, 1, 1) ~= "/" then
        s = "/" .. s
    end
    if (trailing or str_sub(path, -1) == "/") and str_sub(s, -1) ~= "/" then
        s = s .. "/"
    end
    return s
end

function _M.absolute(base_url, relative_url)
    local base = type(base_url) == "table" and base_url or _M.parse(base_url)
    local rel = _M.parse(relative_url)
    if not base then
        return relative_url
    end
    if not rel then
        return _M.build(base)
    end
    if rel.scheme then
        return relative_url
    end
    rel.scheme = base.scheme
    if not rel.authority then
        rel.authority = base.authority
        rel.host, rel.port, rel.userinfo = base.host, base.port, base.userinfo
        rel.user, rel.password = base.user, base.password
        if not rel.path then
            rel.path = base.path
            if not rel.params then
                rel.params = base.params
                if not rel.query then
                    rel.query = base.query
                end
            end
        elseif str_sub(rel.path, 1, 1) ~= "/" then
            local dir = (base.path or ""):match("^(.*/)") or (base.authority and "/" or "")
            rel.path = remove_dot_segments(dir .. rel.path)
        else
            rel.path = remove_dot_segments(rel.path)
        end
    end
    return _M.build(rel)
end

return _M
