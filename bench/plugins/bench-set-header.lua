--
-- bench-set-header: the benchmark's trivial access plugin. It does what the nginx side's
-- `access_by_lua_block { ngx.req.set_header("X-Gw", "1") }` does, written the way an APISIX
-- plugin would write it, so the two Lua rows of bench/run.py compare the same work.
--
local core = require("apisix.core")

local schema = { type = "object" }

local _M = {
    version = 0.1,
    priority = 0,
    name = "bench-set-header",
    schema = schema,
}

function _M.check_schema(conf)
    return core.schema.check(schema, conf)
end

function _M.access(conf, ctx)
    core.request.set_header(ctx, "X-Gw", "1")
end

return _M
