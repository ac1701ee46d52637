-- Shared by the client modules not provided yet (resty.rediscluster, resty.redis.connector), so
-- these modules load (plugins that only reference them work) and every call on a client
-- returns nil and an error naming what is missing.
local setmetatable = setmetatable

local _M = {}

function _M.client(module)
    local msg = module .. ": network clients (cosockets) are not supported by moongate"
    local fail = function()
        return nil, msg
    end
    return setmetatable({}, {
        __index = function()
            return fail
        end,
    }), msg
end

return _M
