-- `require("resty.lock")`: a non-reentrant lock kept in an `ngx.shared` dict, shared by every
-- worker, with the API of lua-resty-lock:
--   lock:new(dict_name, opts?) -> lock | nil, err  (a method call, as lua-resty-lock's
--   `new(_, dict_name, opts)`: APISIX calls `resty_lock:new(name)`)
--     opts: exptime (30 s, the lock's expiry), timeout (5 s, how long lock() waits),
--           step (0.001 s, first wait), ratio (2, growth of the wait), max_step (0.5 s)
--   lock:lock(key) -> elapsed | nil, "timeout" | nil, "locked" | nil, err
--   lock:unlock() -> 1 | nil, "unlocked" | nil, err
--   lock:expire(timeout?) -> true | nil, err
-- Waiting uses ngx.sleep, so lock() may wait only where ngx.sleep may.
local setmetatable = setmetatable
local type = type
local ngx_shared = ngx.shared
local ngx_sleep = ngx.sleep

local _M = { _VERSION = "0.09" }
local mt = { __index = _M }

function _M.new(_, dict_name, opts)
    local dict = ngx_shared[dict_name]
    if not dict then
        return nil, "dictionary not found"
    end
    opts = opts or {}
    if type(opts) ~= "table" then
        return nil, "bad opts"
    end
    local timeout = opts.timeout or 5
    local exptime = opts.exptime or 30
    local step = opts.step or 0.001
    local ratio = opts.ratio or 2
    local max_step = opts.max_step or 0.5
    return setmetatable({
        dict = dict,
        timeout = timeout,
        exptime = exptime,
        step = step,
        ratio = ratio,
        max_step = max_step,
        key = nil,
    }, mt)
end

function _M.lock(self, key)
    if not key then
        return nil, "nil key"
    end
    if self.key then
        return nil, "locked"
    end
    local dict = self.dict
    local ok, err = dict:add(key, true, self.exptime)
    if ok then
        self.key = key
        return 0
    end
    if err ~= "exists" then
        return nil, err
    end
    local step = self.step
    local timeout = self.timeout
    local elapsed = 0
    while timeout > 0 do
        if step > timeout then
            step = timeout
        end
        ngx_sleep(step)
        elapsed = elapsed + step
        timeout = timeout - step
        ok, err = dict:add(key, true, self.exptime)
        if ok then
            self.key = key
            return elapsed
        end
        if err ~= "exists" then
            return nil, err
        end
        step = step * self.ratio
        if step <= 0 then
            step = 0.001
        end
        if step > self.max_step then
            step = self.max_step
        end
    end
    return nil, "timeout"
end

function _M.unlock(self)
    local key = self.key
    if not key then
        return nil, "unlocked"
    end
    self.dict:delete(key)
    self.key = nil
    return 1
end

function _M.expire(self, time)
    local key = self.key
    if not key then
        return nil, "unlocked"
    end
    local ok, err = self.dict:replace(key, true, time or self.exptime)
    if not ok then
        return nil, err
    end
    return true
end

return _M
