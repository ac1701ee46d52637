-- `require("resty.limit.conn")`: concurrency limiting over an `ngx.shared` dict, with the API
-- of lua-resty-limit-traffic's module of that name:
--   new(dict_name, max, burst, default_conn_delay) -> obj | nil, err
--   obj:incoming(key, commit) -> delay, conn | nil, "rejected" | nil, err
--   obj:leaving(key, req_latency?) -> conn | nil, err
--   obj:uncommit(key) -> conn | nil, err
--   obj:is_committed(), obj:set_conn(max), obj:set_burst(burst)
-- Up to `max` concurrent requests per key go through at once; the next `burst` ones are let
-- through with a delay (the caller sleeps it), growing by `default_conn_delay` per `max`
-- requests over; beyond `max + burst` they are rejected. `leaving` must be called when a
-- committed request ends; its latency, when given, updates the delay unit (a running average).
local type = type
local floor = math.floor
local setmetatable = setmetatable
local ngx_shared = ngx.shared

local _M = { _VERSION = "0.09" }
local mt = { __index = _M }

function _M.new(dict_name, max, burst, default_conn_delay)
    local dict = ngx_shared[dict_name]
    if not dict then
        return nil, "shared dict not found"
    end
    if type(max) ~= "number" or max <= 0 then
        return nil, "max must be a positive number"
    end
    if type(burst) ~= "number" or burst < 0 then
        return nil, "burst must be a non-negative number"
    end
    if type(default_conn_delay) ~= "number" or default_conn_delay <= 0 then
        return nil, "default_conn_delay must be a positive number"
    end
    return setmetatable({
        dict = dict,
        max = max,
        burst = burst,
        unit_delay = default_conn_delay,
        committed = false,
    }, mt)
end

function _M.set_conn(self, max)
    self.max = max
end

function _M.set_burst(self, burst)
    self.burst = burst
end

function _M.is_committed(self)
    return self.committed
end

function _M.incoming(self, key, commit)
    local dict = self.dict
    local max = self.max
    self.committed = false

    local conn, err
    if commit then
        conn, err = dict:incr(key, 1, 0)
        if not conn then
            return nil, err
        end
        if conn > max + self.burst then
            local _, derr = dict:incr(key, -1)
            if derr then
                return nil, derr
            end
            return nil, "rejected"
        end
        self.committed = true
    else
        conn = (dict:get(key) or 0) + 1
        if conn > max + self.burst then
            return nil, "rejected"
        end
    end

    if conn > max then
        -- in the burst: wait one delay unit per `max` requests ahead
        return self.unit_delay * floor((conn - 1) / max), conn
    end
    return 0, conn
end

function _M.leaving(self, key, req_latency)
    local conn, err = self.dict:incr(key, -1)
    if not conn then
        return nil, err
    end
    if type(req_latency) == "number" and req_latency >= 0 then
        self.unit_delay = (req_latency + self.unit_delay) / 2
    end
    return conn
end

function _M.uncommit(self, key)
    return self.dict:incr(key, -1)
end

return _M
