--
-- example-token-introspection: lets a request through only when its bearer token is active,
-- as an OAuth 2.0 token introspection endpoint (RFC 7662) says. Shows a plugin that calls
-- another service from the access phase with `resty.http`, and caches the answers in an
-- `ngx.shared` dictionary so that most requests make no call at all.
--
--   plugins:
--     example-token-introspection:
--       introspection_endpoint: http://auth.internal:8080/oauth2/introspect
--       client_id: gateway            # optional: HTTP Basic auth to the endpoint
--       client_secret: s3cret
--       cache_ttl: 300                # an active answer is kept at most this long...
--                                     # ...and never past the token's own `exp`
--
-- The cache is a shared dictionary, declared in the node config (nginx's lua_shared_dict):
--
--   lua:
--     shared_dicts:
--       example-token-introspection: 10m
--
-- Answers:
--   no bearer token        401, WWW-Authenticate: Bearer realm="moongate"
--   inactive/expired token 401, WWW-Authenticate: Bearer realm="moongate", error="invalid_token"
--   endpoint unreachable,
--   not 200, or not JSON   503 (`failure_status`), nothing cached
--   active token           the request goes upstream with X-Token-Sub and X-Token-Scope
--
-- Copy this file as a starting point for your own plugin; see docs/plugin-guide.md.
--
local core = require("apisix.core")
local http = require("resty.http")
local resty_sha256 = require("resty.sha256")
local resty_str = require("resty.string")

local ngx = ngx
local ngx_time = ngx.time
local str_format = string.format

local plugin_name = "example-token-introspection"

local schema = {
    type = "object",
    properties = {
        introspection_endpoint = { type = "string", pattern = [[^https?://]] },
        client_id = { type = "string", minLength = 1 },
        client_secret = { type = "string" },
        -- RFC 7662 lets the caller hint what kind of token it sends.
        token_type_hint = { type = "string", minLength = 1 },
        -- Milliseconds for each of connect, send and read.
        timeout = { type = "integer", minimum = 1, default = 3000 },
        keepalive_timeout = { type = "integer", minimum = 0, default = 60000 },
        keepalive_pool = { type = "integer", minimum = 1, default = 8 },
        -- Seconds. An active answer is cached for at most this long (0: not cached) ...
        cache_ttl = { type = "integer", minimum = 0, default = 300 },
        -- ... and an inactive one briefly, so a client retrying a bad token in a loop does not
        -- reach the endpoint on every request (0: not cached).
        negative_cache_ttl = { type = "integer", minimum = 0, default = 5 },
        shared_dict = { type = "string", minLength = 1, default = "example-token-introspection" },
        -- The status when the endpoint cannot answer.
        failure_status = { type = "integer", minimum = 200, maximum = 599, default = 503 },
        realm = { type = "string", pattern = [[^[^"\\]*$]], default = "moongate" },
        -- Request headers the upstream gets the token's `sub` and `scope` in. Whatever a client
        -- sent in these headers is removed first, so it cannot claim a subject of its own.
        sub_header = { type = "string", minLength = 1, default = "X-Token-Sub" },
        scope_header = { type = "string", minLength = 1, default = "X-Token-Scope" },
        -- Remove the Authorization header before proxying.
        hide_credentials = { type = "boolean", default = false },
    },
    required = { "introspection_endpoint" },
    dependencies = { client_secret = { "client_id" } },
}

local _M = {
    version = 0.1,
    priority = 90,          -- before the usual plugins of a route, as an auth check should be
    type = "auth",
    name = plugin_name,
    schema = schema,
}

function _M.check_schema(conf)
    local ok, err = core.schema.check(schema, conf)
    if not ok then
        return false, err
    end
    -- A missing dictionary is a config mistake: say so when the route is loaded, not on the
    -- first request.
    if not ngx.shared[conf.shared_dict] then
        return false, "no shared dictionary named \"" .. conf.shared_dict
                      .. "\": declare it under lua.shared_dicts in the node config"
    end
    return true
end

-- The token from `Authorization: Bearer TOKEN`, or nil.
local function bearer_token(ctx)
    local auth = core.request.header(ctx, "Authorization")
    if type(auth) ~= "string" then
        return nil
    end
    local m = ngx.re.match(auth, [[^\s*Bearer\s+(\S+)\s*$]], "joi")
    return m and m[1]
end

-- Cache keys hold a digest of the token, never the token itself, and the endpoint, so two
-- routes asking different services never share answers.
local function cache_key(conf, token)
    local sha = resty_sha256:new()
    sha:update(conf.introspection_endpoint)
    sha:update("\n")
    sha:update(token)
    return plugin_name .. ":" .. resty_str.to_hex(sha:final())
end

-- RFC 6750 section 3: a request without a token gets the challenge alone; one with a bad
-- token gets `error="invalid_token"` too.
local function unauthorized(conf, message, with_error)
    local challenge = str_format('Bearer realm="%s"', conf.realm)
    if with_error then
        challenge = challenge .. ', error="invalid_token", error_description="' .. message .. '"'
    end
    core.response.set_header("WWW-Authenticate", challenge)
    return 401, { message = message }
end

-- Asks the endpoint about `token`. Returns the decoded answer, or nil and why not.
local function introspect(conf, token)
    local headers = {
        ["Content-Type"] = "application/x-www-form-urlencoded",
        ["Accept"] = "application/json",
    }
    if conf.client_id then
        -- RFC 6749 2.3.1: id and secret are form-encoded before they are joined and encoded.
        headers["Authorization"] = "Basic " .. ngx.encode_base64(
            ngx.escape_uri(conf.client_id) .. ":" .. ngx.escape_uri(conf.client_secret or ""))
    end

    local httpc = http.new()
    httpc:set_timeouts(conf.timeout, conf.timeout, conf.timeout)
    -- request_uri connects (taking a kept-alive connection from the worker's pool when there
    -- is one), sends, reads the whole body and puts the connection back into the pool.
    local res, err = httpc:request_uri(conf.introspection_endpoint, {
        method = "POST",
        body = ngx.encode_args({ token = token, token_type_hint = conf.token_type_hint }),
        headers = headers,
        keepalive_timeout = conf.keepalive_timeout,
        keepalive_pool = conf.keepalive_pool,
    })
    if not res then
        return nil, err
    end
    if res.status ~= 200 then
        return nil, "status " .. res.status
    end
    local body, derr = core.json.decode(res.body)
    if type(body) ~= "table" then
        return nil, "the answer is not a JSON object: " .. (derr or res.body)
    end
    return body
end

-- How long an active answer may be cached: `cache_ttl`, cut short by the token's expiry.
-- Returns 0 for a token that has already expired.
local function active_ttl(conf, info)
    local ttl = conf.cache_ttl
    local exp = tonumber(info.exp)
    if exp then
        local left = exp - ngx_time()
        if left <= 0 then
            return 0
        end
        if ttl == 0 or left < ttl then
            ttl = left
        end
    end
    return ttl
end

function _M.access(conf, ctx)
    local token = bearer_token(ctx)
    if not token then
        return unauthorized(conf, "Missing bearer token", false)
    end

    local dict = ngx.shared[conf.shared_dict]
    local key = cache_key(conf, token)

    -- The cached entry: "-" for an inactive token, else the JSON of what we keep of the answer.
    -- Routes asking the same endpoint share entries; a route with a cache turned off ignores
    -- them.
    local cached = dict:get(key)
    local info
    if cached == "-" then
        if conf.negative_cache_ttl > 0 then
            return unauthorized(conf, "The access token is not active", true)
        end
    elseif cached and conf.cache_ttl > 0 then
        info = core.json.decode(cached)
    end

    if not info then
        local answer, err = introspect(conf, token)
        if not answer then
            -- Not cached: the next request asks again.
            core.log.error("token introspection at ", conf.introspection_endpoint,
                           " failed: ", err)
            return conf.failure_status, { message = "Token introspection failed" }
        end

        local ttl = answer.active == true and active_ttl(conf, answer) or 0
        if ttl <= 0 then
            -- Inactive (or already expired): remembered briefly.
            if conf.negative_cache_ttl > 0 then
                dict:set(key, "-", conf.negative_cache_ttl)
            end
            return unauthorized(conf, "The access token is not active", true)
        end

        info = {
            sub = type(answer.sub) == "string" and answer.sub or nil,
            scope = type(answer.scope) == "string" and answer.scope or nil,
            client_id = type(answer.client_id) == "string" and answer.client_id or nil,
            exp = tonumber(answer.exp),
        }
        if conf.cache_ttl > 0 then
            local ok, serr = dict:set(key, core.json.encode(info), ttl)
            if not ok then
                core.log.warn("cannot cache the introspection answer: ", serr)
            end
        end
    end

    -- Later plugins of this request can read what the endpoint said.
    ctx.token_introspection = info

    core.request.set_header(ctx, conf.sub_header, info.sub)
    core.request.set_header(ctx, conf.scope_header, info.scope)
    if conf.hide_credentials then
        core.request.set_header(ctx, "Authorization", nil)
    end
end

return _M
