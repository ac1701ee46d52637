-- `require("resty.redis")`: loads, but moongate has no cosockets: `new()` gives a client whose
-- every method (connect, set_timeouts, get, ...) returns nil and an error saying so.
local stub = require("resty.cosocket_stub")

local _M = { _VERSION = "0.30" }

function _M.new()
    return (stub.client("resty.redis"))
end

return _M
