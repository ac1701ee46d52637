-- `require("resty.redis.connector")`: loads, but moongate has no cosockets: a connector's
-- connect() returns nil and an error saying so.
local stub = require("resty.cosocket_stub")

local _M = { _VERSION = "0.11" }

function _M.new()
    return (stub.client("resty.redis.connector"))
end

return _M
