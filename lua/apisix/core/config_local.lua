--- core.config_local: the node configuration as a Lua table (APISIX's `local_conf()`).
-- The runtime publishes it as `__moongate.local_conf` (a table, or a function returning one);
-- without it, a minimal APISIX-shaped table is returned so plugins that read
-- `apisix.ssl`/`plugin_attr` still work.
local mg = __moongate
local type = type

local _M = {}

local fallback = {
    apisix = {
        node_listen = { 9080 },
        ssl = { enable = false },
    },
    plugins = {},
    plugin_attr = {},
}

--- The node configuration.
function _M.local_conf()
    local lc = mg and mg.local_conf
    if type(lc) == "function" then
        lc = lc()
    end
    if type(lc) == "table" then
        return lc
    end
    return fallback
end

--- Empties any cached copy (the next local_conf() re-reads it).
function _M.clear_cache() end

return _M
