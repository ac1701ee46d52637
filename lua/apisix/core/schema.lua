--- core.schema: JSON Schema validation with APISIX's behaviour and wording.
--
-- `check(schema, conf)` returns `true` or `false, err`; it fills schema `default`s into `conf`
-- (in place, so plugins see them). The validator is the gateway's own (the same one native
-- plugins use), so errors read like api7/jsonschema's:
-- `property "key" validation failed: wrong type: expected string, got number`.
-- Unknown fields fall back to `apisix.schema_def` (`ip_def`, `host_def`, `method_schema`, ...).
local mg = __moongate
local schema_def = require("apisix.schema_def")
local type = type
local rawget = rawget
local tostring = tostring

local _M = {
    version = 0.3,
    TYPE_CONSUMER = 1,
    TYPE_METADATA = 2,
}

setmetatable(_M, { __index = schema_def })

--- Validates `conf` against `schema`, filling in defaults.
function _M.check(schema, conf)
    if type(schema) ~= "table" then
        return false, "schema must be a table"
    end
    -- APISIX injects `_meta` into every plugin schema; here a conf's `_meta` is checked on
    -- its own against the injected schema and hidden while the plugin's schema is checked,
    -- so schemas with `additionalProperties = false` accept it too.
    local meta = type(conf) == "table" and rawget(conf, "_meta") or nil
    local props = schema.properties
    if meta ~= nil and type(props) == "table" and props._meta == nil then
        local ok, err = mg.schema_check(schema_def.plugin_injected_schema._meta, meta)
        if not ok then
            return false, 'property "_meta" validation failed: ' .. tostring(err)
        end
        conf._meta = nil
        ok, err = mg.schema_check(schema, conf)
        conf._meta = meta
        if ok then
            return true
        end
        return false, err
    end
    local ok, err = mg.schema_check(schema, conf)
    if ok then
        return true
    end
    return false, err
end

--- Checks that `schema` itself compiles; returns `true` or `false, err`.
function _M.valid(schema)
    if type(mg.schema_valid) == "function" then
        return mg.schema_valid(schema)
    end
    if type(schema) ~= "table" then
        return false, "schema must be a table"
    end
    return true
end

return _M
