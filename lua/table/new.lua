-- `require("table.new")`: LuaJIT's preallocating constructor. LuaJIT 2.1 ships it as a built-in
-- (a C loader in package.preload); use it when it is there, else fall back to a plain
-- constructor (the size hints are an optimisation, never a semantic).
local pre = package.preload["table.new"]
if pre and debug.getinfo(pre, "S").what == "C" then
    return pre("table.new")
end

local function new_tab(narr, nrec) -- luacheck: ignore
    return {}
end

return new_tab
