--- apisix.plugin_config: APISIX's plugin config resources (`/apisix/admin/plugin_configs`,
-- a route's `plugin_config_id`). moongate has no such resource (a route carries its plugins
-- itself, or through a service), so no id names one:
--   get(id) -> nil;  plugin_configs() -> {}, nil;  merge(route_conf) -> route_conf
local _M = { version = 0.1 }

function _M.get(_)
    return nil
end

function _M.plugin_configs()
    return {}, nil
end

function _M.merge(route_conf)
    return route_conf
end

function _M.init_worker()
end

return _M
