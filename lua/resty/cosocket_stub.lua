-- Shared by the stand-ins for client libraries moongate does not ship (resty.rediscluster,
-- resty.redis.connector): they are found only when the real library is not on package.path,
-- so plugins that only reference them load, and every call on a client returns nil and an
-- error naming what to install.
local setmetatable = setmetatable

local _M = {}

function _M.client(module)
    local msg = module .. " is not installed (moongate has only a stand-in): put the library on lua.package_path"
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
