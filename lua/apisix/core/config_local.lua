--- core.config_local: the node configuration as a Lua table (APISIX's `local_conf()`).
-- The runtime publishes it (`__moongate.local_conf()`, in APISIX's shape: `apisix.node_listen`,
-- `apisix.ssl.listen` with the bound ports, `plugins`, `plugin_attr`) with a version; this VM
-- converts it once per version. Without it (no node config published yet), a minimal
-- APISIX-shaped table is returned so plugins that read `apisix.ssl`/`plugin_attr` still work.
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

local cached, cached_version

--- The node configuration.
function _M.local_conf()
    local version = mg and mg.local_conf_version and mg.local_conf_version()
    if not version or version == 0 then
        return fallback
    end
    if version ~= cached_version then
        local lc = mg.local_conf()
        if type(lc) ~= "table" then
            return fallback
        end
        cached, cached_version = lc, version
    end
    return cached
end

--- Empties the cached copy (the next local_conf() converts it again).
function _M.clear_cache()
    cached, cached_version = nil, nil
end

return _M
