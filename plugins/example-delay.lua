--
-- example-delay: waits before the request goes upstream. `ngx.sleep` suspends only this
-- request; the worker keeps serving others meanwhile. The response carries
-- `X-Delay-Seconds` so a client can see the delay was applied.
--
--   plugins:
--     example-delay:
--       delay: 0.5     # seconds
--
-- Copy this file as a starting point for your own plugin; see docs/plugin-guide.md.
--
local core = require("apisix.core")
local ngx = ngx

local plugin_name = "example-delay"

local schema = {
    type = "object",
    properties = {
        delay = { type = "number", minimum = 0, maximum = 60 },
    },
    required = { "delay" },
}

local _M = {
    version = 0.1,
    priority = 30,
    name = plugin_name,
    schema = schema,
}

function _M.check_schema(conf)
    return core.schema.check(schema, conf)
end

function _M.access(conf, ctx)
    if conf.delay > 0 then
        ngx.sleep(conf.delay)
    end
    ctx.example_delay = conf.delay
end

function _M.header_filter(conf, ctx)
    if ctx.example_delay then
        core.response.set_header("X-Delay-Seconds", tostring(ctx.example_delay))
    end
end

return _M
