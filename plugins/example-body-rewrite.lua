--
-- example-body-rewrite: rewrites the response body by replacing text. The whole body is
-- collected with core.response.hold_body_chunk, changed once, and sent at the end; the
-- Content-Length and ETag of the original body are dropped in header_filter.
--
--   plugins:
--     example-body-rewrite:
--       replace:
--         - from: "internal.example.com"
--           to: "api.example.com"
--
-- Copy this file as a starting point for your own plugin; see docs/plugin-guide.md.
--
local core = require("apisix.core")
local ngx = ngx
local ipairs = ipairs
local str_find = string.find
local str_sub = string.sub
local concat = table.concat

local plugin_name = "example-body-rewrite"

local schema = {
    type = "object",
    properties = {
        replace = {
            type = "array",
            minItems = 1,
            items = {
                type = "object",
                properties = {
                    from = { type = "string", minLength = 1 },
                    to = { type = "string" },
                },
                required = { "from", "to" },
            },
        },
    },
    required = { "replace" },
}

local _M = {
    version = 0.1,
    priority = 50,
    name = plugin_name,
    schema = schema,
}

function _M.check_schema(conf)
    return core.schema.check(schema, conf)
end

-- Replaces every occurrence of the text `from` (not a pattern) with `to`.
local function replace_all(s, from, to)
    local out, n = {}, 0
    local pos = 1
    while true do
        local i, j = str_find(s, from, pos, true)
        if not i then
            break
        end
        n = n + 1
        out[n] = str_sub(s, pos, i - 1)
        n = n + 1
        out[n] = to
        pos = j + 1
    end
    if n == 0 then
        return s
    end
    n = n + 1
    out[n] = str_sub(s, pos)
    return concat(out, "", 1, n)
end

function _M.header_filter(conf, ctx)
    core.response.clear_header_as_body_modified()
end

function _M.body_filter(conf, ctx)
    local body = core.response.hold_body_chunk(ctx)
    if not body then
        return
    end
    for _, rule in ipairs(conf.replace) do
        body = replace_all(body, rule.from, rule.to)
    end
    ngx.arg[1] = body
end

return _M
