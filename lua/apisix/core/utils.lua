--- core.utils: variable templates, URI escaping, address parsing and other small helpers.
local core_str = require("apisix.core.string")
local ip = require("apisix.core.ip")
local ngx = ngx
local type = type
local ipairs = ipairs
local tostring = tostring
local tonumber = tonumber
local concat = table.concat
local str_find = string.find
local str_sub = string.sub
local str_byte = string.byte
local str_gsub = string.gsub
local str_format = string.format
local str_match = string.match
local io_open = io.open
local math_random = math.random

local rfind_char = core_str.rfind_char

local _M = {
    version = 0.2,
    parse_ipv4 = ip.parse_ipv4,
    parse_ipv6 = ip.parse_ipv6,
}

local BACKSLASH = 92
local LBRACE = 123

local function trim(s)
    return (str_match(s, "^%s*(.-)%s*$"))
end

--- Expands `$name`, `${name}` and `${name ?? default}` in `tpl` from `vars` (usually
-- `ctx.var`); an unknown variable without a default becomes "". `\$` is left alone. With
-- `escaper`, each value is passed through it. Returns `(text, nil, number_of_resolved)`.
function _M.resolve_var(tpl, vars, escaper)
    local n_resolved = 0
    if not tpl or not str_find(tpl, "$", 1, true) then
        return tpl, nil, n_resolved
    end
    local out, n = {}, 0
    local last = 1
    local i = 1
    while true do
        local p = str_find(tpl, "$", i, true)
        if not p then
            break
        end
        local expr, stop
        if p > 1 and str_byte(tpl, p - 1) == BACKSLASH then
            -- escaped: keep it as written
        elseif str_byte(tpl, p + 1) == LBRACE then
            local close = str_find(tpl, "}", p + 2, true)
            if close and close > p + 2 then
                expr = trim(str_sub(tpl, p + 2, close - 1))
                stop = close
            end
        else
            local s, e = str_find(tpl, "^[%w_%.]+", p + 1)
            if s then
                expr = str_sub(tpl, s, e)
                stop = e
            end
        end
        if expr then
            local name, default = expr, nil
            local q = str_find(expr, "??", 1, true)
            if q then
                name = trim(str_sub(expr, 1, q - 1))
                local rest = str_sub(expr, q + 2)
                local q2 = str_find(rest, "??", 1, true)
                if q2 then
                    rest = str_sub(rest, 1, q2 - 1)
                end
                default = trim(rest)
            end
            local v = vars[name]
            local text
            if v == nil then
                if default == nil then
                    text = ""
                else
                    v = default
                end
            end
            if v ~= nil then
                n_resolved = n_resolved + 1
                text = tostring(v)
                if escaper then
                    text = escaper(text)
                end
            end
            n = n + 1
            out[n] = str_sub(tpl, last, p - 1)
            n = n + 1
            out[n] = text
            last = stop + 1
            i = stop + 1
        else
            i = p + 1
        end
    end
    n = n + 1
    out[n] = str_sub(tpl, last)
    return concat(out, "", 1, n), nil, n_resolved
end

--- Expands `$1`, `${1}` ... from `captures` (a regex match); missing ones become "".
function _M.resolve_var_with_captures(tpl, captures)
    if not tpl or not str_find(tpl, "$", 1, true) then
        return tpl, nil
    end
    captures = captures or {}
    -- Each brace is optional on its own, as in APISIX's `\$\{?(\d+)\}?`.
    local res = str_gsub(tpl, "()%${?(%d+)}?", function(pos, num)
        if pos > 1 and str_byte(tpl, pos - 1) == BACKSLASH then
            return nil
        end
        local v = captures[tonumber(num)]
        if v == nil then
            return ""
        end
        return tostring(v)
    end)
    return res, nil
end

-- nginx's NGX_ESCAPE_URI set: space, '#', '%', '?', control characters and bytes >= 0x7f.
local function escape_byte(c)
    return str_format("%%%02X", str_byte(c))
end

--- Percent-escapes what nginx escapes in a URI (space, #, %, ?, control and non-ASCII bytes),
-- keeping '/' and the rest as they are.
function _M.uri_safe_encode(uri)
    return (str_gsub(uri, "[%z\1-\32#%%%?\127-\255]", escape_byte))
end

--- Percent-escapes control characters only (APISIX's `escape_uri_control_chars`).
function _M.escape_uri_control_chars(uri)
    return (str_gsub(uri, "[%z\1-\31\127]", escape_byte))
end

--- True when `field` is a valid header name (visible ASCII, no ':').
function _M.validate_header_field(field)
    for i = 1, #field do
        local b = str_byte(field, i)
        if b <= 32 or b >= 127 or b == 58 then
            return false
        end
    end
    return true
end

--- True when `value` has no control characters (non-strings pass).
function _M.validate_header_value(value)
    if type(value) ~= "string" then
        return true
    end
    for i = 1, #value do
        local b = str_byte(value, i)
        if b < 32 or b >= 127 then
            return false
        end
    end
    return true
end

local function parse_host_port(addr)
    local pos = rfind_char(addr, ":", #addr - 1)
    if not pos then
        return addr, nil
    end
    return str_sub(addr, 1, pos - 1), tonumber(str_sub(addr, pos + 1))
end

--- Splits "host:port", "[v6]:port", "v6" or "host" into host and port (nil when absent).
-- Brackets of an IPv6 literal are kept. Malformed input is not rejected.
function _M.parse_addr(addr)
    if str_byte(addr, 1) == 91 then -- '['
        if str_byte(addr, #addr) == 93 then -- ']'
            return addr, nil
        end
        local pos = rfind_char(addr, ":", #addr - 1)
        if not pos or str_byte(addr, pos - 1) ~= 93 then
            return addr, nil
        end
        return str_sub(addr, 1, pos - 1), tonumber(str_sub(addr, pos + 1))
    end
    local colons = 0
    for i = 1, #addr do
        local b = str_byte(addr, i)
        if b == 46 then -- '.'
            return parse_host_port(addr)
        elseif b == 58 then
            colons = colons + 1
            if colons == 2 then
                return addr, nil -- a bare IPv6 address
            end
        end
    end
    return parse_host_port(addr)
end

--- "/a/b" -> {"", "a", "b"}.
function _M.split_uri(uri)
    local segs, n = {}, 0
    local from = 1
    while true do
        local p = str_find(uri, "/", from, true)
        n = n + 1
        if not p then
            segs[n] = str_sub(uri, from)
            break
        end
        segs[n] = str_sub(uri, from, p - 1)
        from = p + 1
    end
    return segs
end

local hostname

--- The machine's host name.
function _M.gethostname()
    if hostname then
        return hostname
    end
    local f = io_open("/proc/sys/kernel/hostname", "r")
    if f then
        hostname = str_match(f:read("*l") or "", "^%s*(.-)%s*$")
        f:close()
    end
    if not hostname or hostname == "" then
        hostname = os.getenv("HOSTNAME") or "unknown"
    end
    return hostname
end

--- `ngx.sleep` in steps of at most one second.
function _M.sleep(sec)
    while sec > 1 do
        ngx.sleep(1)
        sec = sec - 1
    end
    return ngx.sleep(sec)
end

--- Stores rate-limit details in `ctx.var.rate_limiting_info` (APISIX's format).
function _M.set_var_rate_limiting_info(ctx, key, limit, remaining, reset)
    if not ctx then
        return
    end
    ctx.var.rate_limiting_info = str_format(
        '{"rate_limiting_key":"%s","rate_limiting_limit":%d,'
        .. '"rate_limiting_remaining":%d,"rate_limiting_reset":%d}',
        key or "", limit or 0, tonumber(remaining) or 0, reset or 0)
end

--- A random UUID (version 4 layout).
function _M.generate_uuid()
    local b = {}
    for i = 1, 16 do
        b[i] = math_random(0, 255)
    end
    b[7] = 0x40 + b[7] % 16
    b[9] = 0x80 + b[9] % 64
    return str_format("%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
        b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8],
        b[9], b[10], b[11], b[12], b[13], b[14], b[15], b[16])
end

--- The table holding the last part of a dotted field path (`"tls.verify"` -> conf.tls, "verify"),
--- or nil when a part on the way is not a table.
local function field_owner(conf, path)
    local parts = {}
    for p in path:gmatch("[^.]+") do
        parts[#parts + 1] = p
    end
    local t = conf
    for i = 1, #parts - 1 do
        t = t[parts[i]]
        if type(t) ~= "table" then
            return nil
        end
    end
    return t, parts[#parts]
end

local function warn_plain(plugin_name, field, v)
    if type(v) == "string" and not str_find(v, "^https") then
        ngx.log(ngx.WARN, "Using ", plugin_name, " ", field, " with no TLS is a security risk")
    end
end

--- APISIX's check_https: a warning for each URL (or URL in a list) under the dotted `fields`
--- of `conf` that is not https. Never refuses a conf.
function _M.check_https(fields, conf, plugin_name)
    for _, field in ipairs(fields) do
        local owner, key = field_owner(conf, field)
        local v = owner and owner[key]
        if type(v) == "table" then
            for _, u in ipairs(v) do
                warn_plain(plugin_name, field, u)
            end
        elseif v then
            warn_plain(plugin_name, field, v)
        end
    end
end

--- APISIX's check_tls_bool: a warning for each dotted field that is set to anything but true
--- (certificate verification turned off).
function _M.check_tls_bool(fields, conf, plugin_name)
    for _, field in ipairs(fields) do
        local owner, key = field_owner(conf, field)
        if not owner then
            return
        end
        local v = owner[key]
        if v ~= true and v ~= nil then
            ngx.log(ngx.WARN, "Keeping ", field, " disabled in ", plugin_name,
                    " configuration is a security risk")
        end
    end
end

return _M
