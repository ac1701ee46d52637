-- `require("resty.rediscluster")`: loads, but moongate has no cosockets: `new()` returns nil
-- and an error saying so.
local stub = require("resty.cosocket_stub")

local _M = { _VERSION = "1.2" }

function _M.new()
    local _, err = stub.client("resty.rediscluster")
    return nil, err
end

return _M
