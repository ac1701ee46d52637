--- apisix.plugin: the parts of APISIX's plugin manager that plugins call.
-- `plugin_attr(name)` is the node config's `plugin_attr.NAME` table (or nil);
-- `plugin_metadata(name)` the plugin's metadata item (or nil).
local config_local = require("apisix.core.config_local")
local mg = __moongate
local type = type
local tostring = tostring
local pcall = pcall
local require = require

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

-- Plugin metadata converted in this VM, by plugin name: the `plugin_metadata` item for the
-- `modifiedIndex` it was built from.
local metadata_cache = {}

--- The metadata of plugin `name` (config file `plugin_metadata:` or
-- `/apisix/admin/plugin_metadata/NAME`) as APISIX returns it: `{key, value, modifiedIndex,
-- createdIndex}` where `value` is the conf with schema defaults filled and `id` = name; nil
-- when the plugin has none. The same table is returned until the metadata changes.
function _M.plugin_metadata(name)
    if type(name) ~= "string" then
        return nil
    end
    local index = mg.plugin_metadata_index(name)
    if index == nil then
        metadata_cache[name] = nil
        return nil
    end
    local item = metadata_cache[name]
    if item and item.modifiedIndex == index then
        return item
    end
    local value, idx = mg.plugin_metadata(name)
    if value == nil then
        metadata_cache[name] = nil
        return nil
    end
    item = {
        key = "/apisix/plugin_metadata/" .. name,
        value = value,
        modifiedIndex = idx,
        createdIndex = idx,
    }
    metadata_cache[name] = item
    return item
end

--- A version string for a conf table: a crc32 of its key-sorted JSON, cached on the conf
-- (`conf._version`), as APISIX computes it. Limiters use it in their cache keys.
function _M.conf_version(conf)
    if type(conf) ~= "table" then
        return nil
    end
    if conf._version then
        return conf._version
    end
    local json = require("apisix.core.json")
    local saved = conf._version
    local text = json.stably_encode(conf) or ""
    conf._version = saved
    local v = tostring(ngx.crc32_short(text))
    conf._version = v
    return v
end

--- The loaded module of plugin `name`, or nil.
function _M.get(name)
    local ok, mod = pcall(require, "apisix.plugins." .. name)
    if ok then
        return mod
    end
    return nil
end

--- APISIX's workflow plugin marks plugins to skip for this request.
function _M.skip_plugin(ctx, name)
    if ctx then
        ctx._skip_plugins = ctx._skip_plugins or {}
        ctx._skip_plugins[name] = true
    end
end

return _M
