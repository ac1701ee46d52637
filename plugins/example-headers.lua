--
-- example-headers: adds headers to the request sent upstream (access) and to the response sent
-- to the client (header_filter). Values may use APISIX variables: "$remote_addr",
-- "${http_user_agent}", "${arg_lang ?? en}".
--
--   plugins:
--     example-headers:
--       request_headers:
--         X-Client-Addr: "$remote_addr"
--       response_headers:
--         X-Powered-By: moongate
--
-- Copy this file as a starting point for your own plugin; see docs/plugin-guide.md.
--
local core = require("apisix.core")
local pairs = pairs

local plugin_name = "example-headers"

local header_map = {
    type = "object",
    minProperties = 1,
    -- header name -> value template
    additionalProperties = { type = "string" },
}

local schema = {
    type = "object",
    properties = {
        request_headers = header_map,
        response_headers = header_map,
    },
    minProperties = 1,
}

local _M = {
    version = 0.1,
    priority = 60,
    name = plugin_name,
    schema = schema,
}

function _M.check_schema(conf)
    return core.schema.check(schema, conf)
end

-- Expands "$var" templates against this request's variables.
local function render(value, ctx)
    local text = core.utils.resolve_var(value, ctx.var)
    return text
end

function _M.access(conf, ctx)
    if not conf.request_headers then
        return
    end
    for name, value in pairs(conf.request_headers) do
        core.request.set_header(ctx, name, render(value, ctx))
    end
end

function _M.header_filter(conf, ctx)
    if not conf.response_headers then
        return
    end
    for name, value in pairs(conf.response_headers) do
        core.response.set_header(name, render(value, ctx))
    end
end

return _M
