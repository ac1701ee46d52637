-- `require("table.isempty")` (OpenResty's LuaJIT extension).
local next = next

local function isempty(t)
    return next(t) == nil
end

return isempty
