-- `require("resty.limit.req")`: the leaky bucket of lua-resty-limit-traffic's module of that
-- name, over an `ngx.shared` dict:
--   new(dict_name, rate, burst) -> obj | nil, err     (rate in requests per second)
--   obj:incoming(key, commit) -> delay, excess | nil, "rejected" | nil, err
--   obj:uncommit(key) -> true | nil, err
--   obj:set_rate(rate), obj:set_burst(burst)
-- Each key keeps its excess (requests above the rate, drained at `rate` per second) and the
-- time of its last request. A request that would take the excess above `burst` is rejected;
-- otherwise the caller should delay it by excess / rate seconds.
local type = type
local tonumber = tonumber
local setmetatable = setmetatable
local math_max = math.max
local math_abs = math.abs
local str_match = string.match
local ngx_shared = ngx.shared
local ngx_now = ngx.now

local _M = { _VERSION = "0.09" }
local mt = { __index = _M }

-- Stored as "excess last" in thousandths of a request and milliseconds.
local function load(dict, key)
    local v = dict:get(key)
    if not v then
        return nil
    end
    local excess, last = str_match(v, "^(%S+) (%S+)$")
    return tonumber(excess), tonumber(last)
end

local function store(dict, key, excess, last)
    return dict:set(key, excess .. " " .. last)
end

function _M.new(dict_name, rate, burst)
    local dict = ngx_shared[dict_name]
    if not dict then
        return nil, "shared dict not found"
    end
    if type(rate) ~= "number" or rate <= 0 then
        return nil, "rate must be a positive number"
    end
    burst = burst or 0
    if type(burst) ~= "number" or burst < 0 then
        return nil, "burst must be a non-negative number"
    end
    return setmetatable({ dict = dict, rate = rate * 1000, burst = burst * 1000 }, mt)
end

function _M.set_rate(self, rate)
    self.rate = rate * 1000
end

function _M.set_burst(self, burst)
    self.burst = burst * 1000
end

function _M.incoming(self, key, commit)
    local dict = self.dict
    local rate = self.rate
    local now = ngx_now() * 1000

    local excess = 0
    local prev, last = load(dict, key)
    if prev then
        local elapsed = math_abs(now - last)
        excess = math_max(prev - rate * elapsed / 1000 + 1000, 0)
        if excess > self.burst then
            return nil, "rejected"
        end
    end

    if commit then
        local ok, err = store(dict, key, excess, now)
        if not ok then
            return nil, err
        end
    end

    -- excess / rate is in seconds; the second value is the excess in requests.
    return excess / rate, excess / 1000
end

function _M.uncommit(self, key)
    local dict = self.dict
    local excess, last = load(dict, key)
    if not excess then
        return nil, "not found"
    end
    excess = math_max(excess - 1000, 0)
    local ok, err = store(dict, key, excess, last)
    if not ok then
        return nil, err
    end
    return true
end

return _M
