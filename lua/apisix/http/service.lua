--- apisix.http.service: the configured services, for plugins that read one (datadog's
-- service name, opa's `with_service`). Written for moongate over the published config:
--   get(id) -> { value = service conf, key, modifiedIndex } | nil
--   services() -> { item, ... }, conf_version
local mg = __moongate

local _M = { version = 0.2 }

function _M.get(service_id)
    return mg.service_get(service_id)
end

function _M.services()
    return mg.services()
end

function _M.init_worker()
end

return _M
