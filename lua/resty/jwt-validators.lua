--- resty.jwt-validators: lua-resty-jwt's claim validators, the ones lua-resty-openidc and
-- APISIX's plugins use. A validator is `function(value, claim, jwt_obj) -> true | false` (or
-- it raises); `resty.jwt`'s `verify_jwt_obj(key, obj, spec, ...)` runs each spec's
-- validators on the payload's claims. `set_system_leeway` is the slack, in seconds, the
-- default `exp`/`nbf` checks allow when no spec is given.
local type = type
local ipairs = ipairs
local tonumber = tonumber
local ngx_time = ngx.time

local _M = {}
local system_leeway = 0

function _M.set_system_leeway(leeway)
    if type(leeway) ~= "number" or leeway < 0 then
        error("leeway must be a non-negative number", 2)
    end
    system_leeway = leeway
end

function _M.get_system_leeway()
    return system_leeway
end

--- Marks a validator as one whose claim may be absent (it passes then).
local function optional(check)
    return function(val, claim, obj)
        if val == nil then
            return true
        end
        return check(val, claim, obj)
    end
end

--- Makes a validator fail with lua-resty-jwt's message when its claim is absent.
local function required(check)
    return function(val, claim, obj)
        if val == nil then
            error("'" .. tostring(claim) .. "' claim is required.", 0)
        end
        return check(val, claim, obj)
    end
end

_M.required = function(check)
    return required(check or function() return true end)
end

local function equals_any_of(list)
    if type(list) ~= "table" then
        error("list of values must be a table", 2)
    end
    return function(val)
        for _, v in ipairs(list) do
            if val == v then
                return true
            end
        end
        return false
    end
end

function _M.equals_any_of(list)
    return required(equals_any_of(list))
end

function _M.opt_equals_any_of(list)
    return optional(equals_any_of(list))
end

function _M.equals(value)
    return required(equals_any_of({ value }))
end

function _M.opt_equals(value)
    return optional(equals_any_of({ value }))
end

local function not_expired(leeway)
    return function(val)
        local exp = tonumber(val)
        if not exp then
            error("'exp' claim must be a number", 0)
        end
        return ngx_time() < exp + (leeway or system_leeway)
    end
end

local function not_before(leeway)
    return function(val)
        local nbf = tonumber(val)
        if not nbf then
            error("'nbf' claim must be a number", 0)
        end
        return nbf <= ngx_time() + (leeway or system_leeway)
    end
end

function _M.is_not_expired(leeway)
    return required(not_expired(leeway))
end

function _M.opt_is_not_expired(leeway)
    return optional(not_expired(leeway))
end

function _M.is_not_before(leeway)
    return required(not_before(leeway))
end

function _M.opt_is_not_before(leeway)
    return optional(not_before(leeway))
end

return _M
