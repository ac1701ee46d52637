--- jsonschema: api7/jsonschema's entry point over the gateway's own validator.
--
-- `generate_validator(schema [, opts])` raises an error when `schema` does not compile, as
-- api7/jsonschema does (callers wrap it in `pcall`), and returns a function
-- `validator(value) -> true | false, err` that fills the schema's defaults into `value`.
-- The validator is the one `core.schema.check` uses, so the error strings are the same.
-- `opts.skip_validation` (a function of a value; true skips checking it) is honoured for the
-- top-level value only; core.schema handles `$secret://` references itself.
local mg = __moongate
local type = type
local error = error
local tostring = tostring

local _M = { version = 0.9 }

function _M.generate_validator(schema, opts)
    if type(schema) ~= "table" then
        error("schema must be a table, got " .. type(schema), 2)
    end
    local ok, err = mg.schema_valid(schema)
    if not ok then
        error(tostring(err), 2)
    end
    local skip = type(opts) == "table" and opts.skip_validation or nil
    return function(value)
        if skip and skip(value) then
            return true
        end
        return mg.schema_check(schema, value)
    end
end

return _M
