--- apisix.upstream: what plugins call to pick a request's upstream (traffic-split and the
-- like). Written for moongate over the gateway's own upstreams:
--   check_schema(conf) -> true | false, err   (the config file's checks)
--   set(ctx, key, version, conf)              this request goes to `conf`, built once per
--                                             key and version and kept while the config is
--   set_scheme(ctx, conf)                     nothing to do: `conf.scheme` is part of `set`
--   get_by_id(id) -> { value = { id = id } } | nil
-- `ctx.upstream_id = id` picks a configured upstream by id.
local mg = __moongate
local type = type
local pairs = pairs
local ipairs = ipairs
local tostring = tostring

local _M = { version = 0.1 }

-- Node fields moongate's upstreams take; APISIX's helpers add others (`domain`, ...).
local NODE_FIELDS = { host = true, port = true, weight = true, priority = true, metadata = true }
-- Fields APISIX puts on an upstream it builds that are not configuration.
local NOT_CONF = { parent = true, vid = true, node_tid = true, has_domain = true,
                   original_nodes = true, resource_key = true, resource_version = true,
                   resource_id = true }

local function plain(conf)
    local out = {}
    for k, v in pairs(conf) do
        if not NOT_CONF[k] then
            out[k] = v
        end
    end
    if type(conf.nodes) == "table" and conf.nodes[1] ~= nil then
        local nodes = {}
        for i, n in ipairs(conf.nodes) do
            local node = {}
            for k, v in pairs(n) do
                if NODE_FIELDS[k] then node[k] = v end
            end
            nodes[i] = node
        end
        out.nodes = nodes
    end
    return out
end

function _M.check_schema(conf)
    if type(conf) ~= "table" then
        return false, "upstream must be a table"
    end
    return mg.upstream_check(plain(conf))
end

function _M.set(ctx, key, version, conf)
    local ok, err = mg.upstream_set(tostring(key) .. "#" .. tostring(version), plain(conf))
    if not ok then
        return nil, err
    end
    ctx.upstream_conf = conf
    ctx.upstream_version = version
    ctx.upstream_key = key
    return true
end

function _M.set_scheme(ctx, conf)
end

function _M.get_by_id(id)
    if id == nil then
        return nil
    end
    id = tostring(id)
    if not mg.upstream_exists(id) then
        return nil
    end
    return { value = { id = id }, key = "/apisix/upstreams/" .. id }
end

return _M
