--
-- example-key-auth: lets a request through only when it carries the configured API key, in a
-- header (default "apikey") or a query argument (default "apikey"). Answers like APISIX's
-- key-auth:
--   401 {"message":"Missing API key found in request"}
--   401 {"message":"Invalid API key in request"}
--
--   plugins:
--     example-key-auth:
--       key: my-secret-key
--       hide_credentials: true   # do not pass the key upstream
--
-- Copy this file as a starting point for your own plugin; see docs/plugin-guide.md.
--
local core = require("apisix.core")
local str_byte = string.byte

local plugin_name = "example-key-auth"

local schema = {
    type = "object",
    properties = {
        key = { type = "string", minLength = 1 },
        header = { type = "string", default = "apikey" },
        query = { type = "string", default = "apikey" },
        hide_credentials = { type = "boolean", default = false },
    },
    required = { "key" },
}

local _M = {
    version = 0.1,
    priority = 95,
    type = "auth",
    name = plugin_name,
    schema = schema,
}

function _M.check_schema(conf)
    return core.schema.check(schema, conf)
end

-- Compares in time that depends only on the length, so response timing does not reveal how
-- much of a guessed key was right.
local function same(a, b)
    if #a ~= #b then
        return false
    end
    local diff = 0
    for i = 1, #a do
        if str_byte(a, i) ~= str_byte(b, i) then
            diff = diff + 1
        end
    end
    return diff == 0
end

function _M.rewrite(conf, ctx)
    local from_header = true
    local key = core.request.header(ctx, conf.header)
    if not key then
        from_header = false
        local args = core.request.get_uri_args(ctx)
        key = args[conf.query]
        if type(key) == "table" then
            key = key[1]
        end
    end

    if type(key) ~= "string" or key == "" then
        return 401, { message = "Missing API key found in request" }
    end

    if not same(key, conf.key) then
        core.log.info("rejected an invalid API key")
        return 401, { message = "Invalid API key in request" }
    end

    if conf.hide_credentials then
        if from_header then
            core.request.set_header(ctx, conf.header, nil)
        else
            local args = core.table.clone(core.request.get_uri_args(ctx))
            args[conf.query] = nil
            core.request.set_uri_args(ctx, args)
        end
    end
end

return _M
