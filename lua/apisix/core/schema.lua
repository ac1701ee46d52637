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
