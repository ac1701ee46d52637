-- `require("table.clone")` (OpenResty's LuaJIT extension): a shallow copy. Like OpenResty's, it
-- does not copy the metatable.
local pairs = pairs

local function clone(t)
    local copy = {}
    for k, v in pairs(t) do
        copy[k] = v
    end
    return copy
end

return clone
