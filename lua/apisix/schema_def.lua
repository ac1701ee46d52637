--- apisix.schema_def: shared schema fragments plugins reuse (through `core.schema.NAME` too).
-- Data only; written for moongate, shaped like APISIX's names.
local _M = { version = 0.5 }

local ipv4_seg = [[(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])]]
local ipv4 = ipv4_seg .. [[\.]] .. ipv4_seg .. [[\.]] .. ipv4_seg .. [[\.]] .. ipv4_seg

_M.ip_def = {
    { title = "IPv4", type = "string", format = "ipv4" },
    { title = "IPv4/CIDR", type = "string", pattern = "^" .. ipv4 .. [[/([12]?[0-9]|3[0-2])$]] },
    { title = "IPv6", type = "string", format = "ipv6" },
    {
        title = "IPv6/CIDR",
        type = "string",
        pattern = [[^[a-fA-F0-9:]*:[a-fA-F0-9:.]*/(12[0-8]|1[01][0-9]|[1-9]?[0-9])$]],
    },
}

_M.host_def_pat = [[^\*?[0-9a-zA-Z-._\[\]:]+$]]

_M.host_def = {
    type = "string",
    pattern = _M.host_def_pat,
}

_M.id_schema = {
    anyOf = {
        { type = "string", minLength = 1, maxLength = 64, pattern = [[^[a-zA-Z0-9-_.]+$]] },
        { type = "integer", minimum = 1 },
    },
}

_M.method_schema = {
    description = "HTTP method",
    type = "string",
    enum = {
        "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD",
        "OPTIONS", "CONNECT", "TRACE", "PURGE",
    },
}

_M.uri_def = { type = "string", pattern = [=[^[^\/]+:\/\/([\da-zA-Z.-]+|\[[\da-fA-F:]+\])(:\d+)?]=] }

-- The `_meta` property APISIX adds to every plugin schema.
_M.plugin_injected_schema = {
    ["$comment"] = "this is a mark for our injected plugin schema",
    _meta = {
        type = "object",
        properties = {
            disable = { type = "boolean" },
            error_response = { oneOf = { { type = "string" }, { type = "object" } } },
            priority = { description = "priority of plugins by customized order", type = "integer" },
            filter = { description = "filter determines whether the plugin needs to be executed at runtime", type = "array" },
            pre_function = { description = "function to be executed in each phase before execution of plugins", type = "string" },
        },
    },
}

--- The `realm` property of auth plugins, with `default` as its default.
function _M.get_realm_schema(default)
    return {
        type = "string",
        default = default,
        minLength = 1,
        maxLength = 4096,
        description = "realm attribute in the WWW-Authenticate header",
    }
end

_M.anonymous_consumer_schema = {
    type = "string",
    minLength = 1,
}

return _M
