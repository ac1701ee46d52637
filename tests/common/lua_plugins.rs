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
