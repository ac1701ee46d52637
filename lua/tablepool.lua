-- OpenResty's `tablepool`: reuse tables per tag instead of leaving them to the GC.
-- `fetch(tag, narr, nrec)` hands out a pooled (cleared) table or a new one; `release(tag, t,
-- noclear)` gives it back. Each pool keeps at most `max_pool_size` tables.
local new_tab = require("table.new")
local clear_tab = require("table.clear")
local setmetatable = setmetatable

local max_pool_size = 200
local pools = {}

local _M = { _VERSION = "0.01" }

function _M.fetch(tag, narr, nrec)
    local pool = pools[tag]
    if pool and pool.n > 0 then
        local n = pool.n
        local t = pool[n]
        pool[n] = nil
        pool.n = n - 1
        return t
    end
    return new_tab(narr, nrec)
end

function _M.release(tag, t, noclear)
    if t == nil then
        return
    end
    local pool = pools[tag]
    if not pool then
        pool = { n = 0 }
        pools[tag] = pool
    end
    if pool.n >= max_pool_size then
        return
    end
    if not noclear then
        setmetatable(t, nil)
        clear_tab(t)
    end
    local n = pool.n + 1
    pool[n] = t
    pool.n = n
end

return _M
