--- core.ctx: request-context helpers. `register_var(name, getter, opts)` adds a variable that
-- `ctx.var.NAME` computes as `getter(ctx)`; with `opts.no_cacheable` it is recomputed on every
-- read, otherwise the first value is kept for the rest of the request.
local type = type
local error = error

local _M = { version = 0.3 }

-- Names the gateway itself defines; a plugin may not shadow them.
local builtin = {
    route_id = true, route_name = true, service_id = true, service_name = true,
    consumer_name = true, consumer_group_id = true, balancer_ip = true, balancer_port = true,
    uri = true, request_uri = true, args = true, host = true, remote_addr = true,
    remote_port = true, scheme = true, request_method = true, upstream_uri = true,
    upstream_host = true, status = true, upstream_status = true,
}

-- name -> {getter = fn, no_cacheable = bool}; the runtime's `ctx.var` consults it.
local registered = {}
_M.registered_var = registered

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
end

--- The value of a registered variable for this request, or nil when `name` is not registered.
-- Caches it in `cache` (a table the caller keeps per request) unless it is `no_cacheable`.
function _M.get_registered_var(ctx, name, cache)
    local reg = registered[name]
    if not reg then
        return nil
    end
    if not reg.no_cacheable and cache then
        local v = cache[name]
        if v ~= nil then
            return v
        end
        v = reg.getter(ctx)
        cache[name] = v
        return v
    end
    return reg.getter(ctx)
end

return _M
