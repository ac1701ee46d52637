--- apisix.consumer: the consumer lookups auth plugins call.
-- moongate has no consumer store yet, so no credential matches: auth plugins load and refuse
-- requests as APISIX does for unknown keys (`find_consumer` returns nil and a reason).
local _M = { version = 0.1 }

--- The consumer whose `plugin_name` credential has `key_attr == key_value`: none yet.
function _M.find_consumer(plugin_name, key_attr, key_value) -- luacheck: ignore
    return nil, nil, "consumers are not supported yet"
end

--- The anonymous consumer named `name`: none yet.
function _M.get_anonymous_consumer(name)
    return nil, nil, "failed to get anonymous consumer " .. tostring(name)
end

--- Attaches a consumer to the request (sets the ctx fields APISIX sets).
function _M.attach_consumer(ctx, consumer, conf)
    ctx.consumer = consumer
    ctx.consumer_name = consumer and (consumer.consumer_name or consumer.username)
    ctx.consumer_group_id = consumer and consumer.group_id
    ctx.consumer_ver = conf and conf.conf_version
end

--- Consumers configured for `plugin_name`: none yet.
function _M.plugin(plugin_name) -- luacheck: ignore
    return nil
end

--- All consumers, as a key-value list: none yet.
function _M.consumers_kv()
    return nil
end

return _M
