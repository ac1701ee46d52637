-- `require("resty.rediscluster")` when lua-resty-rediscluster is not on package.path: loads,
-- and `new()` returns nil and an error saying what to install.
local stub = require("resty.cosocket_stub")

local _M = { _VERSION = "1.2" }

function _M.new()
    local _, err = stub.client("resty.rediscluster")
    return nil, err
end

return _M
