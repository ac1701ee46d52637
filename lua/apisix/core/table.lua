--- core.table: the std `table` library plus LuaJIT/OpenResty extensions and APISIX helpers.
-- Unknown fields fall back to the std `table` (so `core.table.remove` works).
local new_tab = require("table.new")
local clear_tab = require("table.clear")
local nkeys = require("table.nkeys")
local isarray = require("table.isarray")
local isempty = require("table.isempty")
local clone = require("table.clone")
local type = type
local pairs = pairs
local ipairs = ipairs
local select = select
local tostring = tostring
local newproxy = newproxy
local getmetatable = getmetatable
local setmetatable = setmetatable
local str_find = string.find
local std_table = table

local _M = {
    version = 0.2,
    new = new_tab,
    clear = clear_tab,
    nkeys = nkeys,
    isarray = isarray,
    isempty = isempty,
    clone = clone,
    insert = std_table.insert,
    concat = std_table.concat,
    sort = std_table.sort,
    remove = std_table.remove,
}

setmetatable(_M, { __index = std_table })

--- Appends every argument after the last element; returns the new length.
function _M.insert_tail(tab, ...)
    local idx = #tab
    for i = 1, select("#", ...) do
        idx = idx + 1
        tab[idx] = select(i, ...)
    end
    return idx
end

--- Sets `tab[1..n]` to the arguments.
function _M.set(tab, ...)
    for i = 1, select("#", ...) do
        tab[i] = select(i, ...)
    end
end

--- `try_read_attr(t, "a", "b")` is `t.a.b`, or nil when a step is missing or not a table.
function _M.try_read_attr(tab, ...)
    local v = tab
    for i = 1, select("#", ...) do
        if type(v) ~= "table" then
            return nil
        end
        v = v[select(i, ...)]
        if v == nil then
            return nil
        end
    end
    return v
end

--- The index of `val` in `array`, or nil.
function _M.array_find(array, val)
    if type(array) ~= "table" then
        return nil
    end
    for i, v in ipairs(array) do
        if v == val then
            return i
        end
    end
    return nil
end

local function deepcopy(orig, copied, path, shallows)
    local copy = new_tab(0, nkeys(orig))
    copied[orig] = copy
    for k, v in pairs(orig) do
        if type(v) ~= "table" then
            copy[k] = v
        elseif copied[v] then
            copy[k] = copied[v]
        else
            local sub_path = path .. "." .. tostring(k)
            if shallows and shallows[sub_path] then
                copy[k] = v
            else
                copy[k] = deepcopy(v, copied, sub_path, shallows)
            end
        end
    end
    return setmetatable(copy, getmetatable(orig))
end

--- A deep copy that keeps metatables and shared/cyclic references. `opts.shallows` lists paths
-- (`"self.value.upstream"`, rooted at `opts.shallow_prefix` or "self") copied by reference.
function _M.deepcopy(orig, opts)
    if type(orig) ~= "table" then
        return orig
    end
    local shallows
    if opts and opts.shallows then
        shallows = {}
        for _, p in ipairs(opts.shallows) do
            shallows[p] = true
        end
    end
    return deepcopy(orig, {}, (opts and opts.shallow_prefix) or "self", shallows)
end

--- Merges `extend` into `origin` recursively (tables merged key by key, other values
-- replaced); returns `origin`.
function _M.merge(origin, extend)
    for k, v in pairs(extend) do
        if type(v) == "table" and type(origin[k]) == "table" then
            _M.merge(origin[k], v)
        else
            origin[k] = v
        end
    end
    return origin
end

--- True when two arrays hold the same set of values.
function _M.set_eq(a, b)
    if #a ~= #b then
        return false
    end
    local seen = {}
    for _, v in ipairs(a) do
        seen[v] = (seen[v] or 0) + 1
    end
    for _, v in ipairs(b) do
        local n = seen[v]
        if not n or n == 0 then
            return false
        end
        seen[v] = n - 1
    end
    return true
end

--- Structural equality of two values (tables compared key by key, recursively).
local function deep_eq(t1, t2)
    if t1 == t2 then
        return true
    end
    if type(t1) ~= "table" or type(t2) ~= "table" then
        return false
    end
    if nkeys(t1) ~= nkeys(t2) then
        return false
    end
    for k, v in pairs(t1) do
        if not deep_eq(v, t2[k]) then
            return false
        end
    end
    return true
end
_M.deep_eq = deep_eq

--- The entries of `tab` whose key matches one of the Lua patterns in `patterns`.
function _M.pick(tab, patterns)
    local out = {}
    for k, v in pairs(tab) do
        if type(k) == "string" then
            for _, p in ipairs(patterns) do
                if str_find(k, p) then
                    out[k] = v
                    break
                end
            end
        end
    end
    return out
end

--- Sets `mt` on `t` and makes `mt.__gc` run when `t` is collected (Lua 5.1 tables have no
-- __gc of their own; a proxy userdata carries it).
function _M.setmt__gc(t, mt)
    if type(mt.__gc) ~= "function" then
        return setmetatable(t, mt)
    end
    local proxy = newproxy(true)
    getmetatable(proxy).__gc = function()
        mt.__gc(t)
    end
    t[proxy] = true
    return setmetatable(t, mt)
end

return _M
