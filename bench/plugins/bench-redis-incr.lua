--
-- bench-redis-incr: the benchmark's Redis plugin. One `INCR` per request through the real
-- lua-resty-redis (Debian's lua-nginx-redis, which bench/run.py fetches into
-- bench/out/lua/resty/redis.lua) on a kept-alive connection, then the request goes upstream
-- with the count in `X-Hits`.
--
-- It uses nothing but `ngx` and `resty.redis`, so the nginx side of bench/run.py runs this
-- very file: `access_by_lua_block { require("bench-redis-incr").access(conf) }` with the same
-- conf table, made once in `init_by_lua_block`.
--
local redis = require("resty.redis")

local _M = {
    version = 0.1,
    priority = 0,
    name = "bench-redis-incr",
    schema = {
        type = "object",
        properties = {
            host = { type = "string", default = "127.0.0.1" },
            port = { type = "integer", minimum = 1, maximum = 65535 },
        },
        required = { "port" },
    },
}

function _M.access(conf)
    local red = redis:new()
    red:set_timeout(1000)
    local ok, err = red:connect(conf.host or "127.0.0.1", conf.port)
    if not ok then
        ngx.log(ngx.ERR, "redis connect: ", err)
        return 503
    end
    local n
    n, err = red:incr("bench:hits")
    if not n then
        ngx.log(ngx.ERR, "redis incr: ", err)
        return 503
    end
    red:set_keepalive(60000, 256)
    ngx.req.set_header("X-Hits", tostring(n))
end

return _M
