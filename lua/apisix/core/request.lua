--- core.request: read and change the client request (APISIX's API over `ngx.req`).
-- Every function takes the request `ctx` first; when it is nil, `ngx.ctx.api_ctx` is used.
local log = require("apisix.core.log")
local json = require("apisix.core.json")
local core_str = require("apisix.core.string")
local ngx = ngx
local type = type
local tostring = tostring
local rawget = rawget
local tonumber = tonumber
local error = error
local getmetatable = getmetatable
local setmetatable = setmetatable
local str_fmt = string.format
local str_lower = string.lower
local str_gsub = string.gsub

local _M = {}

local function api_ctx(ctx)
    if ctx then
        return ctx
    end
    local nctx = ngx.ctx
    return nctx and nctx.api_ctx
end

-- Request header names are stored lower-case; like OpenResty's, lookups with any case (and
-- `_` for `-`) find them.
local headers_mt = {
    __index = function(t, name)
        if type(name) ~= "string" then
            return nil
        end
        local lname = str_gsub(str_lower(name), "_", "-")
        if lname == name then
            return nil
        end
        return rawget(t, lname)
    end,
}

local function fetch_headers()
    local h = ngx.req.get_headers(0)
    if type(h) ~= "table" then
        return {}
    end
    if not getmetatable(h) then
        setmetatable(h, headers_mt)
    end
    return h
end

--- All request headers, names lower-cased, repeated headers as arrays. Cached in `ctx.headers`
-- until a header is changed through this module.
local function headers(ctx)
    ctx = api_ctx(ctx)
    if not ctx then
        return fetch_headers()
    end
    local h = ctx.headers
    if not h then
        h = fetch_headers()
        ctx.headers = h
    end
    return h
end
_M.headers = headers

--- One request header (the first value when repeated), any case.
function _M.header(ctx, name)
    local value = headers(ctx)[name]
    if type(value) == "table" then
        return value[1]
    end
    return value
end

local function validate_name(name)
    local t = type(name)
    if t ~= "string" then
        return nil, str_fmt("invalid header name %q: got %s, expected string", tostring(name), t)
    end
    return name
end

local function modify_header(ctx, name, value, override)
    if type(ctx) == "string" then
        -- the old signature set_header(name, value)
        value = name
        name = ctx
        ctx = nil
        log.warn("DEPRECATED: use ", override and "set_header" or "add_header",
                 "(ctx, header_name, header_value) instead")
    end
    local _, err = validate_name(name)
    if err then
        error(err, 3)
    end
    if override then
        ngx.req.set_header(name, value)
    elseif value ~= nil then
        local add = ngx.req.add_header
        if add then
            add(name, value)
        else
            -- No native add: rebuild the value list and set it whole.
            local current = ngx.req.get_headers(0)[str_lower(name)]
            local values = {}
            if type(current) == "table" then
                for i = 1, #current do
                    values[i] = current[i]
                end
            elseif current ~= nil then
                values[1] = current
            end
            if type(value) == "table" then
                for i = 1, #value do
                    values[#values + 1] = value[i]
                end
            else
                values[#values + 1] = value
            end
            ngx.req.set_header(name, #values == 1 and values[1] or values)
        end
    end
    ctx = api_ctx(ctx)
    if ctx then
        -- The header list changed: the next headers() call re-reads it.
        ctx.headers = nil
    end
end

--- Sets (or, with a nil value, removes) a request header; an array value sends it repeated.
function _M.set_header(ctx, name, value)
    modify_header(ctx, name, value, true)
end

--- Adds a value to a request header, keeping the existing ones.
function _M.add_header(ctx, name, value)
    modify_header(ctx, name, value, false)
end

--- The client address (after real-ip processing when configured).
function _M.get_ip(ctx)
    ctx = api_ctx(ctx)
    local var = ctx and ctx.var or ngx.var
    return var.realip_remote_addr or var.remote_addr or ""
end

--- The address of the peer connected to the gateway.
function _M.get_remote_client_ip(ctx)
    ctx = api_ctx(ctx)
    local var = ctx and ctx.var or ngx.var
    return var.remote_addr or ""
end

function _M.get_remote_client_port(ctx)
    ctx = api_ctx(ctx)
    local var = ctx and ctx.var or ngx.var
    return tonumber(var.remote_port)
end

--- The query arguments: repeated keys as arrays, a bare key as `true`. Cached in the ctx.
function _M.get_uri_args(ctx)
    ctx = api_ctx(ctx)
    if not ctx then
        return ngx.req.get_uri_args(0)
    end
    if not ctx.req_uri_args then
        ctx.req_uri_args = ngx.req.get_uri_args(0)
    end
    return ctx.req_uri_args
end

--- Replaces the query string (a table or an encoded string).
function _M.set_uri_args(ctx, args)
    ctx = api_ctx(ctx)
    if ctx then
        ctx.req_uri_args = nil
    end
    return ngx.req.set_uri_args(args)
end

--- The urlencoded form body as a table (read once, cached in the ctx).
function _M.get_post_args(ctx, max_args)
    ctx = api_ctx(ctx)
    if ctx and ctx.req_post_args then
        return ctx.req_post_args
    end
    ngx.req.read_body()
    local args, err = ngx.req.get_post_args(max_args or 100)
    if not args then
        log.error("the post form is too large: ", err)
        args = {}
    end
    if ctx then
        ctx.req_post_args = args
    end
    return args
end

local function check_size(size, max_size)
    if max_size and size > max_size then
        return nil, "request size " .. size .. " is greater than the maximum size "
                    .. max_size .. " allowed"
    end
    return true
end

--- The request body as a string (nil when there is none), or `nil, err` when it is larger than
-- `max_size` bytes.
function _M.get_body(max_size, ctx)
    local var = ctx and ctx.var or ngx.var
    if max_size then
        local content_length = tonumber(var.http_content_length)
        if content_length then
            local ok, err = check_size(content_length, max_size)
            if not ok then
                return nil, err
            end
        end
    end
    ngx.req.read_body()
    local body = ngx.req.get_body_data()
    if body == nil then
        return nil
    end
    local ok, err = check_size(#body, max_size)
    if not ok then
        return nil, err
    end
    return body
end

local CONTENT_TYPE_JSON = "application/json"
local CONTENT_TYPE_FORM = "application/x-www-form-urlencoded"

--- The body parsed by its Content-Type (JSON or urlencoded form), cached in the ctx; or
-- `nil, err`.
function _M.get_request_body_table(ctx, content_type)
    ctx = api_ctx(ctx) or {}
    if ctx._request_body_table ~= nil then
        return ctx._request_body_table
    end
    local ct = content_type or _M.header(ctx, "Content-Type") or ""
    local result, err
    if core_str.find(ct, CONTENT_TYPE_JSON) then
        local body, body_err = _M.get_body(nil, ctx)
        if not body then
            return nil, "could not get body: " .. (body_err or "request body is empty")
        end
        result, err = json.decode(body)
        if not result then
            return nil, "could not parse JSON request body: " .. (err or "invalid JSON")
        end
    elseif core_str.find(ct, CONTENT_TYPE_FORM) then
        result = _M.get_post_args(ctx)
    else
        return nil, "unsupported content-type: " .. ct .. ", supported types are: "
                    .. CONTENT_TYPE_JSON .. ", " .. CONTENT_TYPE_FORM
    end
    ctx._request_body_table = result
    return result
end

--- The JSON body as a table, or `nil, {message = err}`.
function _M.get_json_request_body_table()
    local body, err = _M.get_request_body_table(nil, CONTENT_TYPE_JSON)
    if not body then
        return nil, { message = err }
    end
    return body
end

--- "http" or "https".
function _M.get_scheme(ctx)
    ctx = api_ctx(ctx)
    local var = ctx and ctx.var or ngx.var
    return var.scheme or ""
end

--- The request host (nginx's `$host`: lower-cased, without port).
function _M.get_host(ctx)
    ctx = api_ctx(ctx)
    local var = ctx and ctx.var or ngx.var
    return var.host or ""
end

--- The port the request came in on, as a number.
function _M.get_port(ctx)
    ctx = api_ctx(ctx)
    local var = ctx and ctx.var or ngx.var
    return tonumber(var.server_port)
end

--- The HTTP version as a number (1.1, 2.0, ...).
function _M.get_http_version()
    return ngx.req.http_version()
end

--- The request method ("GET", ...).
function _M.get_method()
    return ngx.req.get_method()
end

return _M
