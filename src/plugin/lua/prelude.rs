//! The Lua half of the Rust-provided `ngx` API: thin wrappers that give the native functions
//! (installed in `__moongate` by `api.rs`) OpenResty's shapes (proxy tables for `ngx.var`,
//! `ngx.header`, `ngx.arg`; `ngx.status`/`ngx.ctx` as fields; vararg `ngx.log`/`ngx.say`).
//! It runs once per VM, after `api::install`.

/// Chunk run with `(ngx, __moongate)` as arguments.
pub const PRELUDE: &str = r##"
local ngx, mg = ...
local type, tostring, select, rawget, rawset, setmetatable, error =
      type, tostring, select, rawget, rawset, setmetatable, error
local concat = table.concat

-- ngx.var: every read goes to the request (so native plugins' changes are seen); values a
-- plugin stores that are not strings are kept per request on the Lua side.
local var_get, var_set = mg.var_get, mg.var_set
local var_cache_key = {}
local VAR_MT = {
    __index = function(t, k)
        local c = rawget(t, var_cache_key)
        if c then
            local v = c[k]
            if v ~= nil then return v end
        end
        return var_get(k)
    end,
    __newindex = function(t, k, v)
        local tv = type(v)
        if tv == "string" or v == nil then
            local c = rawget(t, var_cache_key)
            if c then c[k] = nil end
            local ok, err = pcall(var_set, k, v)
            if ok then
                return
            end
            -- APISIX's ctx.var is a cache in front of the variables: a gateway variable that
            -- cannot change (request_uri, as data-mask sets it for the loggers after it) keeps
            -- the value for this request's later reads and the request itself is untouched.
            -- Clearing one only drops the cached value (real-ip does it after it changed the
            -- client address). ngx.var keeps OpenResty's error.
            if not tostring(err):find("not changeable", 1, true) then
                error(err, 2)
            end
            if v == nil then
                return
            end
        end
        local c = rawget(t, var_cache_key)
        if not c then
            c = {}
            rawset(t, var_cache_key, c)
        end
        c[k] = v
        if tv == "number" or tv == "boolean" then
            var_set(k, tostring(v))
        end
    end,
}
mg.VAR_MT = VAR_MT
ngx.var = setmetatable({}, {
    -- `method` is APISIX's ctx.var name (the request variables know it); nginx has no
    -- `$method`.
    __index = function(_, k)
        if k == "method" then return nil end
        return var_get(k)
    end,
    __newindex = function(_, k, v)
        if v ~= nil and type(v) ~= "string" then v = tostring(v) end
        var_set(k, v)
    end,
})

-- APISIX's api_ctx: lazily filled from the request.
local ctx_field = mg.ctx_field
local LAZY = {
    route_id = true, route_name = true, service_id = true, service_name = true,
    conf_type = true, conf_id = true, conf_version = true, matched_route = true,
    curr_req_matched = true, matched_params = true, ngx_ctx = true,
    picked_server = true, upstream_scheme = true,
}
-- Never cached: conf_* change with a consumer merge, the picked node with a retry.
local CONF_FIELD = { conf_type = true, conf_id = true, conf_version = true,
                     picked_server = true }
local upstream_id_get, upstream_id_set = mg.upstream_id_get, mg.upstream_id_set
mg.CTX_MT = {
    -- `ctx.upstream_id` is the gateway's: a plugin that sets it picks the request's upstream.
    __newindex = function(t, k, v)
        if k == "upstream_id" then
            return upstream_id_set(v ~= nil and tostring(v) or nil)
        end
        rawset(t, k, v)
    end,
    __index = function(t, k)
        if k == "upstream_id" then
            return upstream_id_get()
        end
        if k == "var" then
            local v = setmetatable({}, VAR_MT)
            rawset(t, "var", v)
            return v
        end
        if LAZY[k] then
            local v = ctx_field(k)
            -- conf_* change when a consumer's plugins are merged in: never cached.
            if v ~= nil and not CONF_FIELD[k] then rawset(t, k, v) end
            return v
        end
        return nil
    end,
}

local header_get, header_set = mg.header_get, mg.header_set
ngx.header = setmetatable({}, {
    __index = function(_, k) return header_get(k) end,
    __newindex = function(_, k, v) header_set(k, v) end,
})

local arg_get, arg_set = mg.arg_get, mg.arg_set
ngx.arg = setmetatable({}, {
    __index = function(_, k) return arg_get(k) end,
    __newindex = function(_, k, v) arg_set(k, v) end,
})

local get_ngx_ctx, set_ngx_ctx = mg.get_ngx_ctx, mg.set_ngx_ctx
local get_status, set_status, headers_sent = mg.get_status, mg.set_status, mg.headers_sent
setmetatable(ngx, {
    __index = function(_, k)
        if k == "ctx" then return get_ngx_ctx() end
        if k == "status" then return get_status() end
        if k == "headers_sent" then return headers_sent() end
        return nil
    end,
    __newindex = function(t, k, v)
        if k == "ctx" then return set_ngx_ctx(v) end
        if k == "status" then return set_status(v) end
        rawset(t, k, v)
    end,
})

-- Output: OpenResty's rules for turning arguments into text.
local function flatten(out, v)
    local tv = type(v)
    if tv == "string" then
        out[#out + 1] = v
    elseif tv == "number" then
        out[#out + 1] = tostring(v)
    elseif v == nil then
        out[#out + 1] = "nil"
    elseif tv == "boolean" then
        out[#out + 1] = v and "true" or "false"
    elseif v == ngx.null then
        out[#out + 1] = "null"
    elseif tv == "table" then
        for i = 1, #v do flatten(out, v[i]) end
    else
        error("bad argument to 'ngx.print' (string, number, boolean, nil, ngx.null or array table expected, got " .. tv .. ")", 3)
    end
end
local output = mg.output
function ngx.print(...)
    local out = {}
    for i = 1, select("#", ...) do flatten(out, (select(i, ...))) end
    return output(concat(out))
end
function ngx.say(...)
    local out = {}
    for i = 1, select("#", ...) do flatten(out, (select(i, ...))) end
    out[#out + 1] = "\n"
    return output(concat(out))
end

local exit_async, can_exit = mg.exit_async, mg.can_exit
function ngx.exit(status)
    if type(status) ~= "number" then
        error("bad argument #1 to 'exit' (number expected, got " .. type(status) .. ")", 2)
    end
    if can_exit() then
        return exit_async(status)
    end
    -- In the filter and log phases (where OpenResty cannot end the request either) exit only
    -- sets the status.
    if status >= 200 then set_status(status) end
end

-- os.exit would end the whole gateway (every worker, the Admin API) from inside one request;
-- here it is an error in the calling plugin instead: that request gets 500, the rest go on.
os.exit = function()
    error("os.exit is disabled in moongate plugins (it would stop the gateway); "
        .. "end the request with ngx.exit(status) instead", 2)
end

local log, log_level = mg.log, mg.log_level
function ngx.log(level, ...)
    if type(level) ~= "number" then
        error("bad argument #1 to 'log' (number expected, got " .. type(level) .. ")", 2)
    end
    if level > log_level then return end
    local n = select("#", ...)
    local out = {}
    for i = 1, n do
        local v = select(i, ...)
        out[i] = tostring(v)
    end
    return log(level, concat(out))
end
"##;
