-- `require("resty.limit.count")`: fixed-window request counting over an `ngx.shared` dict, with
-- the API of lua-resty-limit-traffic 1.2 (the version APISIX 3.x bundles, which counts up):
--   new(dict_name, limit, window) -> obj | nil, err
--   obj:incoming(key, commit, cost?) -> 0, consumed | nil, "rejected" | nil, err
--   obj:uncommit(key, cost?) -> remaining | nil, err
-- The first request of a window creates the counter with the window as its expiry, so the
-- count starts over when the window ends. With commit false it only peeks (cost 0 reads the
-- count without creating it).
local type = type
local setmetatable = setmetatable
local ngx_shared = ngx.shared

local _M = { _VERSION = "0.09" }
local mt = { __index = _M }

function _M.new(dict_name, limit, window)
    local dict = ngx_shared[dict_name]
    if not dict then
        return nil, "shared dict not found"
    end
    if type(limit) ~= "number" or limit <= 0 then
        return nil, "limit must be a positive number"
    end
    if type(window) ~= "number" or window <= 0 then
        return nil, "window must be a positive number"
    end
    return setmetatable({ dict = dict, limit = limit, window = window }, mt)
end

function _M.incoming(self, key, commit, cost)
    cost = cost or 1
    local dict = self.dict
    local count, err
    if commit then
        -- A counter that does not exist yet starts at 0 and lives for one window.
        count, err = dict:incr(key, cost, 0, self.window)
        if not count then
            return nil, err
        end
        if count > self.limit then
            -- a rejected request does not use up quota
            dict:incr(key, -cost)
            return nil, "rejected"
        end
    else
        count = (dict:get(key) or 0) + cost
        if count > self.limit then
            return nil, "rejected"
        end
    end
    return 0, count
end

function _M.uncommit(self, key, cost)
    local count, err = self.dict:incr(key, -(cost or 1))
    if not count then
        return nil, err
    end
    return self.limit - count
end

return _M
