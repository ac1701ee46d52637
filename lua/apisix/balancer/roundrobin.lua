--- apisix.balancer.roundrobin: APISIX's balancer object for `type: roundrobin`, for plugins
-- that pick among nodes themselves (chaitin-waf): `new(up_nodes, upstream)` with
-- `{["host:port"] = weight}`, then `get(ctx)` → the next node not yet tried for this request
-- (or nil, "all upstream servers tried"); `after_balance(ctx, true)` marks
-- `ctx.balancer_server` tried before a retry, `after_balance(ctx, false)` forgets the tries.
local roundrobin = require("resty.roundrobin")

local _M = {}

function _M.new(up_nodes, upstream)
    local picker = roundrobin:new(up_nodes)
    local count = 0
    for _ in pairs(up_nodes) do
        count = count + 1
    end
    return {
        upstream = upstream,
        get = function(ctx)
            local tried = ctx and ctx.balancer_tried_servers
            for _ = 1, count do
                local n = picker:find()
                if n == nil then
                    break
                end
                if not (tried and tried[n]) then
                    return n
                end
            end
            return nil, "all upstream servers tried"
        end,
        after_balance = function(ctx, before_retry)
            if not before_retry then
                ctx.balancer_tried_servers = nil
                return
            end
            ctx.balancer_tried_servers = ctx.balancer_tried_servers or {}
            if ctx.balancer_server then
                ctx.balancer_tried_servers[ctx.balancer_server] = true
            end
        end,
        before_retry_next_priority = function() end,
    }
end

return _M
