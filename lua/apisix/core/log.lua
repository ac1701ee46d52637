--- core.log: APISIX's logger over `ngx.log`.
--
-- `core.log.warn("x: ", x)` logs at WARN. Each line starts with the calling file and line
-- (`example-headers.lua:23: `), so a plugin's lines carry the plugin's name, as in APISIX where
-- OpenResty prefixes the caller's location.
-- Arguments are only turned into text when the level is enabled; tables with a `__tostring`
-- (for example `core.json.delay_encode(t)` or `core.log.delay_exec(fn)`) are stringified then.
local ngx = ngx
local mg = __moongate
local select = select
local type = type
local tostring = tostring
local setmetatable = setmetatable
local pairs = pairs
local getinfo = debug.getinfo
local str_match = string.match
local unpack = unpack or table.unpack

local levels = {
    stderr = ngx.STDERR or 0,
    emerg = ngx.EMERG or 1,
    alert = ngx.ALERT or 2,
    crit = ngx.CRIT or 3,
    error = ngx.ERR or 4,
    warn = ngx.WARN or 5,
    notice = ngx.NOTICE or 6,
    info = ngx.INFO or 7,
    debug = ngx.DEBUG or 8,
}

-- The most verbose level that is emitted. The runtime may publish the gateway's level as
-- `__moongate.log_level` (an ngx level number) so debug lines cost nothing when filtered out;
-- otherwise everything goes to ngx.log, which filters on the Rust side.
local function max_level()
    local l = mg and mg.log_level
    if type(l) == "function" then
        l = l()
    end
    return type(l) == "number" and l or levels.debug
end

-- "file.lua:LINE: " of the code that called core.log (two frames up from here).
local function caller_prefix(depth)
    local info = getinfo(depth, "Sl")
    if not info then
        return ""
    end
    local src = info.short_src or "?"
    local file = str_match(src, "([^/\\]+)$") or src
    return file .. ":" .. (info.currentline or 0) .. ": "
end

local _M = { version = 0.4, levels = levels }

local concat = table.concat

-- Joins the arguments as OpenResty's ngx.log does (nil -> "nil", tables via __tostring), so the
-- runtime receives one string whatever it accepts.
local function join(prefix, ...)
    local n = select("#", ...)
    local parts = { prefix }
    for i = 1, n do
        local v = select(i, ...)
        if type(v) == "string" then
            parts[i + 1] = v
        else
            parts[i + 1] = tostring(v)
        end
    end
    return concat(parts)
end

local function make(level, prefix)
    return function(...)
        if level > max_level() then
            return
        end
        local where = caller_prefix(3)
        if prefix then
            where = where .. prefix
        end
        return ngx.log(level, join(where, ...))
    end
end

for name, level in pairs(levels) do
    _M[name] = make(level)
end

--- A logger whose lines all start with `prefix` (APISIX's `core.log.new`).
function _M.new(prefix)
    local m = { version = _M.version, levels = levels }
    for name, level in pairs(levels) do
        m[name] = make(level, prefix)
    end
    return m
end

local delay_mt = {
    __tostring = function(self)
        return tostring(self.fn(unpack(self.args, 1, self.n)))
    end,
}

--- Defers `fn(...)` until the log line is actually written: `core.log.info("x: ",
-- core.log.delay_exec(expensive, a))`.
function _M.delay_exec(fn, ...)
    return setmetatable({ fn = fn, args = { ... }, n = select("#", ...) }, delay_mt)
end

return _M
