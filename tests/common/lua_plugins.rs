//! Small Lua plugins several test binaries use.

/// An auth plugin built on `apisix.consumer`: `X-Token` must be the `token` of a consumer
/// (conf or credential) of `token-auth`; 401 `Invalid token` otherwise.
pub const TOKEN_AUTH: &str = r#"
local core = require("apisix.core")
local consumer_mod = require("apisix.consumer")
local _M = { version = 0.1, priority = 2600, type = "auth", name = "token-auth",
             schema = { type = "object" } }
function _M.check_schema(conf, schema_type)
    if schema_type == core.schema.TYPE_CONSUMER then
        return core.schema.check({ type = "object", properties = { token = { type = "string" } },
                                   required = { "token" } }, conf)
    end
    return core.schema.check(_M.schema, conf)
end
function _M.rewrite(conf, ctx)
    local token = core.request.header(ctx, "X-Token")
    local consumer, consumer_conf = consumer_mod.find_consumer("token-auth", "token", token or "")
    if not consumer then
        return 401, { message = "Invalid token" }
    end
    consumer_mod.attach_consumer(ctx, consumer, consumer_conf)
end
return _M
"#;

/// APISIX-Runtime's client controls, as APISIX's real-ip / client-control / proxy-control use
/// them: `real_ip_header` (an `ip` or `ip:port` header that becomes the client address),
/// `max_body_size`, `request_buffering`, and `read_body` (reads the body in rewrite). Tells the
/// upstream what the variables were after it, in `X-Seen-Remote`.
pub const CLIENT_CTL: &str = r#"
local core = require("apisix.core")
local client = require("resty.apisix.client")
local _M = { version = 0.1, priority = 22500, name = "client-ctl", schema = { type = "object" } }
function _M.check_schema(conf)
    return core.schema.check(_M.schema, conf)
end
function _M.rewrite(conf, ctx)
    if conf.real_ip_header then
        local v = core.request.header(ctx, conf.real_ip_header)
        if v then
            local ip, port = v:match("^%[(.+)%]:(%d+)$")
            if not ip then
                ip, port = v:match("^([%d.]+):(%d+)$")
            end
            local ok, err = client.set_real_ip(ip or v, tonumber(port))
            if not ok then
                return 400, { error = err }
            end
            ctx.var.remote_addr = nil
            ctx.var.remote_port = nil
            ctx.var.realip_remote_addr = nil
            ctx.var.realip_remote_port = nil
        end
    end
    if conf.max_body_size then
        assert(client.set_client_max_body_size(conf.max_body_size))
    end
    if conf.request_buffering ~= nil then
        assert(client.set_proxy_request_buffering(conf.request_buffering))
    end
    if conf.read_body then
        ngx.req.read_body()
    end
    core.request.set_header(ctx, "X-Seen-Remote", ctx.var.remote_addr .. " "
        .. ctx.var.remote_port .. " " .. ctx.var.realip_remote_addr)
end
return _M
"#;

/// Asks for gzip in header_filter through `resty.apisix.response` (as APISIX's `gzip` does);
/// `bad`: instead shows what a call with out-of-range buffers answers, in `X-Bad`.
pub const GZIP_ON: &str = r#"
local core = require("apisix.core")
local response = require("resty.apisix.response")
local _M = { version = 0.1, priority = 995, name = "gzip-on", schema = { type = "object" } }
function _M.check_schema(conf)
    return core.schema.check(_M.schema, conf)
end
function _M.header_filter(conf, ctx)
    if conf.bad then
        local ok, err = response.set_gzip({ buffer_num = 0, buffer_size = 4096, compress_level = 1 })
        core.response.set_header("X-Bad", tostring(ok) .. " " .. tostring(err))
        return
    end
    assert(response.set_gzip({ buffer_num = 32, buffer_size = 4096, compress_level = conf.level or 1 }))
end
return _M
"#;

/// A body_filter that upper-cases the response body.
pub const UPPER_BODY: &str = r#"
local _M = { version = 0.1, priority = 10, name = "upper-body", schema = { type = "object" } }
function _M.check_schema(conf)
    return true
end
function _M.body_filter(conf, ctx)
    if ngx.arg[1] then
        ngx.arg[1] = string.upper(ngx.arg[1])
    end
end
return _M
"#;
