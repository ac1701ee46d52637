-- `require("resty.lrucache")`: OpenResty's LRU (`new(size)` -> `:get(key)` returning value or
-- `nil, stale`, `:set(key, value, ttl)`, `:delete(key)`), in pure Lua.
local lru_new = require("apisix.core.lrucache").lru_new

return {
    _VERSION = "0.13",
    new = function(size)
        if not size or size < 1 then
            return nil, "size too small"
        end
        return lru_new(size)
    end,
}
