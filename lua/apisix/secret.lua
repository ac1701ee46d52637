--- apisix.secret: secret references in confs. moongate has no secret managers yet, so values
-- are used as written; `is_secret_ref` still recognises the reference syntax so plugins skip
-- checks on references as they do in APISIX.
local type = type
local byte = string.byte
local sub = string.sub
local lower = string.lower

local _M = { version = 0.1 }

--- True for `$secret://...` and `$env://...` (any case).
function _M.is_secret_ref(v)
    if type(v) ~= "string" or byte(v, 1) ~= 36 then -- "$"
        return false
    end
    local head = lower(sub(v, 1, 10))
    return head == "$secret://" or sub(head, 1, 7) == "$env://"
end

--- True when any string in the (nested) table is a reference.
function _M.has_secret_ref(t)
    if type(t) ~= "table" then
        return _M.is_secret_ref(t)
    end
    for _, v in pairs(t) do
        if _M.has_secret_ref(v) then
            return true
        end
    end
    return false
end

--- The conf with references resolved: unchanged, since no secret manager is configured.
function _M.fetch_secrets(conf)
    return conf
end

--- One reference resolved: unchanged.
function _M.fetch(v)
    return v
end

return _M
