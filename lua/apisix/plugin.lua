--- apisix.plugin: the parts of APISIX's plugin manager that plugins call.
-- `plugin_attr(name)` is the node config's `plugin_attr.NAME` table (or nil).
local config_local = require("apisix.core.config_local")
local type = type

local _M = { version = 0.3 }

--- Node-level attributes of a plugin (`plugin_attr:` in the config file), or nil.
function _M.plugin_attr(name)
    local conf = config_local.local_conf()
    local attrs = type(conf) == "table" and conf.plugin_attr
    if type(attrs) ~= "table" then
        return nil
    end
    return attrs[name]
end

--- Plugin metadata is not stored by moongate yet: always nil.
function _M.plugin_metadata(name) -- luacheck: ignore
    return nil
end

return _M
