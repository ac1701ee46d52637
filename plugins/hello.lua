--
-- hello: answers every request itself, with no upstream:
--   200 {"message":"hello from moongate"}
-- The default config's demo route uses it, so a fresh `moongate run` serves something.
--
--   routes:
--     - id: hello
--       uri: /hello
--       plugins:
--         hello: {}            # or: hello: {message: "hi"}
--
local core = require("apisix.core")

local schema = {
    type = "object",
    properties = {
        message = { type = "string", default = "hello from moongate" },
    },
}

local _M = {
    version = 0.1,
    priority = 10,
    name = "hello",
    schema = schema,
}

function _M.check_schema(conf)
    return core.schema.check(schema, conf)
end

function _M.access(conf, ctx)
    return 200, { message = conf.message }
end

return _M
