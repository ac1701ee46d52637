--- resty.roundrobin: lua-resty-balancer's weighted round-robin picker, as APISIX's plugins
-- use it (`new(nodes)` with `{id = weight}`, `find()`, `next()`, `set(id, weight)`,
-- `delete(id)`, `reinit(nodes)`). Picks follow nginx's smooth weighted round-robin: over any
-- run of sum(weights) picks each id is chosen weight times, spread out rather than bunched.
-- Ids may be any value a table can key on (APISIX passes upstream tables).
local pairs = pairs
local type = type
local setmetatable = setmetatable

local _M = {}
local mt = { __index = _M }

local function build(nodes)
    local list = {}
    for id, weight in pairs(nodes) do
        if type(weight) == "number" and weight > 0 then
            list[#list + 1] = { id = id, weight = weight, current = 0 }
        end
    end
    return list
end

function _M.new(_, nodes)
    return setmetatable({ nodes = build(nodes or {}) }, mt)
end

function _M.find(self)
    local list = self.nodes
    local best, total = nil, 0
    for i = 1, #list do
        local n = list[i]
        n.current = n.current + n.weight
        total = total + n.weight
        if not best or n.current > best.current then
            best = n
        end
    end
    if not best then
        return nil
    end
    best.current = best.current - total
    return best.id
end

_M.next = _M.find

function _M.set(self, id, weight)
    for _, n in pairs(self.nodes) do
        if n.id == id then
            if not weight or weight <= 0 then
                return self:delete(id)
            end
            n.weight = weight
            return true
        end
    end
    if weight and weight > 0 then
        self.nodes[#self.nodes + 1] = { id = id, weight = weight, current = 0 }
    end
    return true
end

function _M.delete(self, id)
    local list = self.nodes
    for i = 1, #list do
        if list[i].id == id then
            table.remove(list, i)
            return true
        end
    end
    return true
end

function _M.reinit(self, nodes)
    self.nodes = build(nodes or {})
end

return _M
