--- apisix.plugins.prometheus.exporter: the part of APISIX's exporter other plugins call.
-- moongate's `prometheus` plugin is native (the request metrics are recorded by the gateway),
-- so this module stands in for APISIX's file. `get_prometheus()` answers the object plugins
-- register their own metrics on (nginx-lua-prometheus' API), served on the same export
-- endpoint with the `metric_prefix`; nil when metrics are not served (no
-- `plugin_attr.prometheus` and `prometheus` not in `plugins`), as APISIX's answers nil before
-- its prometheus plugin has initialised. The metrics live in the gateway, one registry per
-- process: every worker counts into the same series, and a plugin that registers again after
-- a reload gets its metric back with its values.
local mg = __moongate
local ngx = ngx
local setmetatable = setmetatable

local _M = {}

local function logged(err)
    if err then
        ngx.log(ngx.ERR, err)
    end
end

local Counter = {}
Counter.__index = Counter
function Counter:inc(value, label_values)
    logged(self._h:inc(value, label_values))
end
function Counter:del(label_values)
    logged(self._h:del(label_values))
end
function Counter:reset()
    self._h:reset()
end

local Gauge = setmetatable({}, { __index = Counter })
Gauge.__index = Gauge
function Gauge:set(value, label_values)
    logged(self._h:set(value, label_values))
end

local Histogram = {}
Histogram.__index = Histogram
function Histogram:observe(value, label_values)
    logged(self._h:observe(value, label_values))
end

local function register(kind, mt, name, help, label_names, buckets)
    local h, err = mg.metric_register(kind, name, help, label_names, buckets)
    if not h then
        logged(err)
        return nil
    end
    return setmetatable({ name = name, help = help, label_names = label_names,
                          label_count = label_names and #label_names or 0, _h = h }, mt)
end

local Prometheus = {}
function Prometheus:counter(name, help, label_names)
    return register("counter", Counter, name, help, label_names)
end
function Prometheus:gauge(name, help, label_names)
    return register("gauge", Gauge, name, help, label_names)
end
function Prometheus:histogram(name, help, label_names, buckets)
    return register("histogram", Histogram, name, help, label_names, buckets)
end

local prometheus = setmetatable({}, { __index = Prometheus })

function _M.get_prometheus()
    if mg.metrics_enabled() then
        return prometheus
    end
    return nil
end

return _M
