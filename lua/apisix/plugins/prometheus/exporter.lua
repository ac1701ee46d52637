--- apisix.plugins.prometheus.exporter: the part of APISIX's exporter other plugins call.
-- moongate's `prometheus` plugin is native (its metrics are recorded by the gateway, not by
-- Lua), so this module stands in for APISIX's file, which needs APISIX's internals.
-- `get_prometheus()` answers nil, as APISIX's does before its prometheus plugin has
-- initialised: callers such as `apisix.utils.batch-processor` then skip their own gauges.
local _M = {}

function _M.get_prometheus()
    return nil
end

return _M
