--- apisix.constants: the values APISIX's plugins read. The RPC numbers are the frame types of
-- APISIX's external plugin runner protocol; the directories are the resource kinds an APISIX
-- config center holds (moongate stores the same kinds).
local kinds = {
    "/upstreams", "/plugins", "/ssls", "/stream_routes", "/plugin_metadata", "/routes",
    "/services", "/consumers", "/global_rules", "/protos", "/plugin_configs",
    "/consumer_groups", "/secrets",
}
local http_dirs = {}
for _, k in ipairs(kinds) do
    http_dirs[k] = true
end
local stream_dirs = {}
for _, k in ipairs({ "/upstreams", "/services", "/plugins", "/ssls", "/stream_routes",
                     "/plugin_metadata", "/secrets" }) do
    stream_dirs[k] = true
end

return {
    RPC_ERROR = 0,
    RPC_PREPARE_CONF = 1,
    RPC_HTTP_REQ_CALL = 2,
    RPC_EXTRA_INFO = 3,
    RPC_HTTP_RESP_CALL = 4,
    HTTP_ETCD_DIRECTORY = http_dirs,
    STREAM_ETCD_DIRECTORY = stream_dirs,
    -- Where APISIX's own Lua tree is installed; plugins build data paths from it.
    apisix_lua_home = "/usr/local/apisix",
}
