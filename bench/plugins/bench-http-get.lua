--
-- bench-http-get: the benchmark's `resty.http` plugin. One GET to `url` per request from the
-- access phase, on a kept-alive connection from the worker's pool, then the request goes
-- upstream with the answer's status in `X-Got`. bench/run.py compares a route with it to the
-- same route without it: the difference is what one such call costs.
--
local core = require("apisix.core")
local http = require("resty.http")

local schema = {
    type = "object",
    properties = { url = { type = "string" } },
    required = { "url" },
}

local _M = {
    version = 0.1,
    priority = 0,
    name = "bench-http-get",
    schema = schema,
}

function _M.check_schema(conf)
    return core.schema.check(schema, conf)
end

function _M.access(conf, ctx)
    local httpc = http.new()
    httpc:set_timeout(1000)
    local res, err = httpc:request_uri(conf.url, { keepalive_timeout = 60000, keepalive_pool = 256 })
    if not res then
        core.log.error("GET ", conf.url, ": ", err)
        return 503
    end
    core.request.set_header(ctx, "X-Got", tostring(res.status))
end

return _M
