-- `require("resty.redis.connector")` when lua-resty-redis-connector is not on package.path:
-- loads, and a connector's connect() returns nil and an error saying what to install.
local stub = require("resty.cosocket_stub")

local _M = { _VERSION = "0.11" }

function _M.new()
    return (stub.client("resty.redis.connector"))
end

return _M
