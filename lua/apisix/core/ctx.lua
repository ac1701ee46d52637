--- core.ctx: request-context helpers. `register_var(name, getter, opts)` adds a variable that
-- `ctx.var.NAME` computes as `getter(ctx)`; with `opts.no_cacheable` it is recomputed on every
-- read, otherwise the first value is kept for the rest of the request.
local mg = __moongate
local ngx = ngx
local type = type
local error = error
local rawget = rawget
local rawset = rawset

local _M = { version = 0.3 }

-- Names the gateway itself defines; a plugin may not shadow them.
local builtin = {
    route_id = true, route_name = true, service_id = true, service_name = true,
    consumer_name = true, consumer_group_id = true, balancer_ip = true, balancer_port = true,
    uri = true, request_uri = true, args = true, host = true, remote_addr = true,
    remote_port = true, scheme = true, request_method = true, upstream_uri = true,
    upstream_host = true, status = true, upstream_status = true,
}

-- name -> {getter = fn, no_cacheable = bool}
local registered = {}
_M.registered_var = registered

-- Per-request cache of registered values, stored in the ctx.var table under a private key.
local cache_key = {}

-- Makes `ctx.var` consult the registered variables first. Installed on the first
-- register_var, so requests pay nothing while no plugin registers one.
local hooked = false
local function hook_ctx_var()
    local mt = mg and mg.VAR_MT
    if hooked or type(mt) ~= "table" then
        return
    end
    hooked = true
    local orig = mt.__index
    mt.__index = function(t, k)
        local reg = registered[k]
        if not reg then
            if type(orig) == "function" then
                return orig(t, k)
            end
            return orig and orig[k]
        end
        local nctx = ngx.ctx
        local api_ctx = nctx and nctx.api_ctx
        if reg.no_cacheable then
            return reg.getter(api_ctx)
        end
        local cache = rawget(t, cache_key)
        if not cache then
            cache = {}
            rawset(t, cache_key, cache)
        end
        local v = cache[k]
        if v == nil then
            v = reg.getter(api_ctx)
            cache[k] = v
        end
        return v
    end
end

--- Registers a computed variable for `ctx.var`.
function _M.register_var(name, getter, opts)
    if type(name) ~= "string" then
        error("the name of registered var should be a string", 2)
    end
    if type(getter) ~= "function" then
        error("the getter of registered var should be a function", 2)
    end
    if builtin[name] then
        error("can't override the built-in variable " .. name, 2)
    end
    registered[name] = { getter = getter, no_cacheable = opts and opts.no_cacheable or false }
    hook_ctx_var()
end

return _M
