-- `require("resty.http")`: parse_uri (pure, used by referer-restriction and others) works as in
-- lua-resty-http; the client half needs cosockets, which moongate does not have: `new()` gives
-- a client whose every method (request_uri, connect, ...) returns nil and an error saying so.
local stub = require("resty.cosocket_stub")
local str_lower = string.lower
local tonumber = tonumber

local _M = { _VERSION = "0.17" }

function _M.new()
    return (stub.client("resty.http"))
end

--- parse_uri(self, uri, query_in_path?) -> { scheme, host, port, path, query } | nil, err.
-- IPv6 literals are not parsed (as lua-resty-http before 0.13 did not).
function _M.parse_uri(_, uri, query_in_path)
    if type(uri) ~= "string" then
        return nil, "bad uri: " .. tostring(uri)
    end
    local scheme, rest = uri:match("^(%a[%w+.-]*)://(.*)$")
    if not scheme then
        return nil, "bad uri: " .. uri
    end
    scheme = str_lower(scheme)
    local authority, tail = rest:match("^([^/?#]*)(.*)$")
    authority = authority:gsub("^.*@", "")
    local host, port = authority:match("^([^:]*):(%d+)$")
    if not host then
        host = authority
    end
    if host == "" then
        return nil, "bad uri: " .. uri
    end
    port = tonumber(port)
    if not port then
        port = (scheme == "https") and 443 or 80
    end
    tail = tail:gsub("#.*$", "")
    local path, query = tail:match("^([^?]*)%??(.*)$")
    if path == "" then
        path = "/"
    end
    if query_in_path == nil or query_in_path then
        if query ~= "" then
            path = path .. "?" .. query
        end
        query = ""
    end
    return { scheme, host, port, path, query }
end

return _M
