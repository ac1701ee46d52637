-- `require("table.nkeys")` (OpenResty's LuaJIT extension): the number of keys, array part included.
local pairs = pairs

local function nkeys(t)
    local n = 0
    for _ in pairs(t) do
        n = n + 1
    end
    return n
end

return nkeys
