--- core.lrucache: per-worker LRU caches keyed by (key, version), in pure Lua.
--
-- `local cache = core.lrucache.new({count = 100, ttl = 60})` returns a function
-- `cache(key, version, create, ...)`: the value cached for `key` is reused while its version
-- equals `version`; otherwise `create(...)` builds a new one (a nil result is not cached and its
-- error is returned). Keys may be any Lua value, tables included (compared by identity).
-- `{type = "plugin"}` caches default to 8 items for 300 s, others to 1024 items for an hour.
-- `plugin_ctx(cache, ctx, extra_key, create, ...)` keys by the route (`conf_type#conf_id`) and
-- versions by `ctx.conf_version`, so a changed route rebuilds its cached objects.
local ngx = ngx
local setmetatable = setmetatable
local tostring = tostring

local GLOBAL_ITEMS_COUNT = 1024
local GLOBAL_TTL = 60 * 60
local PLUGIN_TTL = 5 * 60
local PLUGIN_ITEMS_COUNT = 8

-- A doubly linked list (most recent at the head) plus a key -> node map.
local lru_mt = {}
lru_mt.__index = lru_mt

local function lru_new(size)
    local head = {}
    head.prev, head.next = head, head
    return setmetatable({ size = size, count = 0, map = {}, head = head }, lru_mt)
end

local function unlink(node)
    node.prev.next = node.next
    node.next.prev = node.prev
end

local function push_front(head, node)
    node.next = head.next
    node.prev = head
    head.next.prev = node
    head.next = node
end

-- Returns value, or nil plus the stale value when it has expired (kept until evicted).
function lru_mt:get(key)
    local node = self.map[key]
    if not node then
        return nil
    end
    unlink(node)
    push_front(self.head, node)
    if node.expire and node.expire < ngx.now() then
        return nil, node.value
    end
    return node.value
end

function lru_mt:set(key, value, ttl)
    local node = self.map[key]
    if node then
        unlink(node)
    else
        if self.count >= self.size then
            local oldest = self.head.prev
            unlink(oldest)
            self.map[oldest.key] = nil
            self.count = self.count - 1
        end
        node = { key = key }
        self.map[key] = node
        self.count = self.count + 1
    end
    node.value = value
    node.expire = (ttl and ttl > 0) and (ngx.now() + ttl) or nil
    push_front(self.head, node)
end

function lru_mt:delete(key)
    local node = self.map[key]
    if node then
        unlink(node)
        self.map[key] = nil
        self.count = self.count - 1
    end
end

function lru_mt:count_items()
    return self.count
end

local function fetch_valid(lru, invalid_stale, ttl, release, key, version)
    local obj, stale = lru:get(key)
    if obj and obj.ver == version then
        return obj
    end
    if not invalid_stale and stale and stale.ver == version then
        lru:set(key, stale, ttl)
        return stale
    end
    if release and obj then
        release(obj.val)
    end
    return nil
end

--- A new cache function; see the module comment for `opts`
-- (`type`, `count`, `ttl`, `invalid_stale`, `release`).
local function new_lru_fun(opts)
    local count, ttl
    if opts and opts.type == "plugin" then
        count = opts.count or PLUGIN_ITEMS_COUNT
        ttl = opts.ttl or PLUGIN_TTL
    else
        count = opts and opts.count or GLOBAL_ITEMS_COUNT
        ttl = opts and opts.ttl or GLOBAL_TTL
    end
    local release = opts and opts.release
    local invalid_stale = opts and opts.invalid_stale
    local lru = lru_new(count)

    -- `serial_creating` needs no lock here: a worker's VM runs one creator at a time unless the
    -- creator itself yields.
    return function(key, version, create, ...)
        local cached = fetch_valid(lru, invalid_stale, ttl, release, key, version)
        if cached then
            return cached.val
        end
        local obj, err = create(...)
        if obj ~= nil then
            lru:set(key, { val = obj, ver = version }, ttl)
        end
        return obj, err
    end
end

local function plugin_ctx_key_and_ver(api_ctx, extra_key)
    local key = tostring(api_ctx.conf_type) .. "#" .. tostring(api_ctx.conf_id)
    if extra_key then
        key = key .. "#" .. tostring(extra_key)
    end
    return key, api_ctx.conf_version
end

--- Caches per route: key `conf_type#conf_id[#extra_key]`, version `ctx.conf_version`.
local function plugin_ctx(lrucache, api_ctx, extra_key, create, ...)
    local key, ver = plugin_ctx_key_and_ver(api_ctx, extra_key)
    return lrucache(key, ver, create, ...)
end

--- The id `plugin_ctx` caches under: `conf_type#conf_id[#extra_key]#conf_version`.
local function plugin_ctx_id(api_ctx, extra_key)
    local key, ver = plugin_ctx_key_and_ver(api_ctx, extra_key)
    return key .. "#" .. tostring(ver)
end

return {
    version = 0.1,
    new = new_lru_fun,
    global = new_lru_fun(),
    plugin_ctx = plugin_ctx,
    plugin_ctx_id = plugin_ctx_id,
    -- The raw LRU (get/set/delete), also served as `resty.lrucache`.
    lru_new = lru_new,
}
