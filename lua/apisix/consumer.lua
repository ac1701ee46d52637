--- apisix.consumer: the consumer lookups auth plugins call.
-- Consumers live in the snapshot (config file `consumers:` and `/apisix/admin/consumers`); the
-- Rust side hands out the matched route's snapshot consumers through `__moongate.consumers`.
-- Everything built here (per-plugin lists, credential indexes) is cached per snapshot
-- generation in this VM and dropped as soon as a new snapshot is served.
local mg = __moongate
local type = type
local ipairs = ipairs
local tostring = tostring

local _M = { version = 0.3 }

-- What this VM built for the snapshot generation `cache_ver`.
local cache_ver
local cache = {}

--- The current generation's cache table (reset when the generation changed), and the
-- generation; nil outside a routed request.
local function current()
    local ver = mg.consumers_version()
    if ver == nil then
        return nil, nil
    end
    if ver ~= cache_ver then
        cache_ver = ver
        cache = { plugins = {}, kv = {}, all = nil }
    end
    return cache, ver
end

--- Consumers configured for the auth plugin `plugin_name`, by their own plugins or by
-- credentials: `{nodes = {consumer...}, len = n, conf_version = v}` (each node carries the
-- plugin's conf as `auth_conf`, and `credential_id` when it comes from a credential), or nil.
function _M.plugin(plugin_name)
    local c, ver = current()
    if not c then
        return nil
    end
    local entry = c.plugins[plugin_name]
    if entry == nil then
        local nodes = mg.consumers(plugin_name)
        if nodes and #nodes > 0 then
            entry = { nodes = nodes, len = #nodes, conf_version = ver }
        else
            entry = false
        end
        c.plugins[plugin_name] = entry
    end
    return entry or nil
end

_M.consumers_conf = _M.plugin

--- `key_attr` value -> consumer, over the consumers of `plugin_name` (`consumer_conf` is what
-- `plugin(plugin_name)` returned). Consumers without that credential field are skipped.
function _M.consumers_kv(plugin_name, consumer_conf, key_attr)
    local c = current()
    local cache_key = plugin_name .. "#" .. tostring(key_attr)
    if c and c.kv[cache_key] then
        return c.kv[cache_key]
    end
    local index = {}
    for _, consumer in ipairs(consumer_conf and consumer_conf.nodes or {}) do
        local auth = consumer.auth_conf
        local value = type(auth) == "table" and auth[key_attr] or nil
        if value == nil then
            mg.log(4, "missing consumer auth credential '" .. tostring(key_attr)
                .. "', skipping consumer: " .. tostring(consumer.consumer_name))
        else
            index[value] = consumer
        end
    end
    if c then
        c.kv[cache_key] = index
    end
    return index
end

--- The consumer whose `plugin_name` conf has `key_attr == key_value`, and the plugin's consumer
-- conf; or nil, nil and a reason when no consumer configures the plugin.
function _M.find_consumer(plugin_name, key_attr, key_value)
    local consumer_conf = _M.plugin(plugin_name)
    if not consumer_conf then
        return nil, nil, "Missing related consumer"
    end
    local index = _M.consumers_kv(plugin_name, consumer_conf, key_attr)
    return index[key_value], consumer_conf
end

--- Every consumer of the current snapshot (a list of `{key, value}` items as APISIX's config
-- store gives them, credentials left out) and the version.
function _M.consumers()
    local c, ver = current()
    if not c then
        return nil, nil
    end
    if not c.all then
        local list = {}
        for i, consumer in ipairs(mg.consumers(nil) or {}) do
            list[i] = {
                key = "/apisix/consumers/" .. consumer.username,
                value = consumer,
                modifiedIndex = ver,
            }
        end
        c.all = list
    end
    return c.all, ver
end

--- The consumer named `name` (a key-auth `anonymous_consumer`), with `{conf_version = v}`.
function _M.get_anonymous_consumer(name)
    local list, ver = _M.consumers()
    for _, item in ipairs(list or {}) do
        if item.value.username == name then
            return item.value, { conf_version = ver }
        end
    end
    return nil, nil, "failed to get anonymous consumer " .. tostring(name)
end

--- Attaches a consumer to the request: the ctx fields later plugins read, and the headers the
-- upstream sees (a nil value removes a header the client sent).
function _M.attach_consumer(ctx, consumer, conf)
    local core = require("apisix.core")
    ctx.consumer = consumer
    ctx.consumer_name = consumer.consumer_name or consumer.username
    ctx.consumer_group_id = consumer.group_id
    ctx.consumer_ver = conf and conf.conf_version
    -- The gateway merges the consumer's plugins (and its group's) after rewrite.
    mg.attach_consumer(type(consumer.username) == "string" and consumer.username or nil)
    core.request.set_header(ctx, "X-Consumer-Username", consumer.username)
    core.request.set_header(ctx, "X-Credential-Identifier", consumer.credential_id)
    core.request.set_header(ctx, "X-Consumer-Custom-ID", consumer.custom_id)
end

--- The Admin API checks credentials when it builds; nothing to check from Lua.
function _M.check_duplicate_key()
    return true
end

return _M
