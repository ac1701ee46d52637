-- `require("table.isarray")` (OpenResty's LuaJIT extension): true when every key is an integer
-- 1..n with no holes. An empty table counts as an array, as in OpenResty.
local pairs = pairs
local type = type

local function isarray(t)
    local n = 0
    for k in pairs(t) do
        if type(k) ~= "number" or k < 1 or k % 1 ~= 0 then
            return false
        end
        n = n + 1
    end
    -- n keys, all positive integers: an array exactly when the largest is n (no holes).
    for i = 1, n do
        if t[i] == nil then
            return false
        end
    end
    return true
end

return isarray
