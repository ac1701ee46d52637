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
local pairs = pairs
local ipairs = ipairs
local getmetatable = getmetatable

local _M = {
    version = 0.3,
    TYPE_CONSUMER = 1,
    TYPE_METADATA = 2,
}

setmetatable(_M, { __index = schema_def })

-- A table whose metatable answers lookups (request headers: `h["User-Agent"]` finds the
-- stored `user-agent`) is seen by api7/jsonschema through those lookups for the properties a
-- schema names, and through `pairs` for the rest. The validator here reads plain data, so
-- such a table is checked as a copy with every named property it answers for filled in under
-- the schema's spelling. Returns `conf` itself when nothing needs adding.
local function as_looked_up(schema, conf)
    local mt = getmetatable(conf)
    if type(mt) ~= "table" or mt.__index == nil then
        return conf
    end
    local copy
    local function add(name)
        if type(name) == "string" and rawget(conf, name) == nil then
            local v = conf[name]
            if v ~= nil then
                if not copy then
                    copy = {}
                    for k, val in pairs(conf) do
                        copy[k] = val
                    end
                end
                copy[name] = v
            end
        end
    end
    if type(schema.required) == "table" then
        for _, name in ipairs(schema.required) do
            add(name)
        end
    end
    if type(schema.properties) == "table" then
        for name in pairs(schema.properties) do
            add(name)
        end
    end
    return copy or conf
end

--- Validates `conf` against `schema`, filling in defaults.
function _M.check(schema, conf)
    if type(schema) ~= "table" then
        return false, "schema must be a table"
    end
    if type(conf) == "table" then
        local seen = as_looked_up(schema, conf)
        if seen ~= conf then
            -- Schema defaults land in the copy, not in the looked-up table.
            return _M.check(schema, seen)
        end
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
