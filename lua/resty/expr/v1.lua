--- resty.expr.v1: rule expressions over request variables, as APISIX uses them in
-- `vars` fields (fault-injection, traffic-split, workflow, `_meta.filter`).
--
-- A rule is a list of conditions that must all hold, or a list whose first element is a
-- logical operator: "AND", "OR", "!AND", "!OR"; elements may nest. A condition is
-- `{var, op, value}` or `{var, "!", op, value}` (negated). Operators: `==`, `~=`, `>`, `>=`,
-- `<`, `<=`, `~~` (PCRE match), `~*` (case-insensitive PCRE match), `in`, `has`, `ipmatch`.
-- `new(rule)` checks the rule and returns an object with `:eval(vars)`, or nil and an error.
local re_find = ngx.re.find
local type = type
local tonumber = tonumber
local tostring = tostring
local ipairs = ipairs
local setmetatable = setmetatable

local _M = { version = 0.1 }
local mt = { __index = _M }

local logical = { AND = true, OR = true, ["!AND"] = true, ["!OR"] = true }

local function compare_num(a, b, f)
    a, b = tonumber(a), tonumber(b)
    if a == nil or b == nil then
        return false
    end
    return f(a, b)
end

local ops = {
    ["=="] = function(l, r)
        if type(r) == "number" then
            return tonumber(l) == r
        end
        return l == r
    end,
    ["~="] = function(l, r)
        if type(r) == "number" then
            return tonumber(l) ~= r
        end
        return l ~= r
    end,
    [">"] = function(l, r) return compare_num(l, r, function(a, b) return a > b end) end,
    [">="] = function(l, r) return compare_num(l, r, function(a, b) return a >= b end) end,
    ["<"] = function(l, r) return compare_num(l, r, function(a, b) return a < b end) end,
    ["<="] = function(l, r) return compare_num(l, r, function(a, b) return a <= b end) end,
    ["~~"] = function(l, r)
        if type(l) ~= "string" then return false end
        return re_find(l, r, "jo") ~= nil
    end,
    ["~*"] = function(l, r)
        if type(l) ~= "string" then return false end
        return re_find(l, r, "joi") ~= nil
    end,
    ["in"] = function(l, r)
        if type(r) ~= "table" then return false end
        for _, v in ipairs(r) do
            if v == l or (type(v) == "number" and tonumber(l) == v) then
                return true
            end
        end
        return false
    end,
    ["has"] = function(l, r)
        if type(l) ~= "table" then return false end
        for _, v in ipairs(l) do
            if v == r then return true end
        end
        return false
    end,
    ["ipmatch"] = function(l, r, cond)
        if type(l) ~= "string" then return false end
        local m = cond.matcher
        if not m then return false end
        return m:match(l) and true or false
    end,
}

local function check_cond(cond)
    local n = #cond
    local op = cond[2]
    local negate = false
    if op == "!" then
        negate = true
        op = cond[3]
        if n ~= 4 then
            return nil, "bad 'not' expression"
        end
    elseif n ~= 3 then
        return nil, "rule too short"
    end
    if not ops[op] then
        return nil, "invalid operator '" .. tostring(op) .. "'"
    end
    local val = negate and cond[4] or cond[3]
    if op == "~~" or op == "~*" then
        if type(val) ~= "string" then
            return nil, "invalid regex: not a string"
        end
        local _, _, err = re_find("", val, op == "~*" and "joi" or "jo")
        if err then
            return nil, "failed to compile regex: " .. err
        end
    end
    local c = { var = cond[1], op = op, val = val, negate = negate }
    if op == "ipmatch" then
        local list = type(val) == "table" and val or { val }
        local matcher, err = require("resty.ipmatcher").new(list)
        if not matcher then
            return nil, "failed to create ip matcher: " .. tostring(err)
        end
        c.matcher = matcher
    end
    return c
end

local compile

compile = function(rule)
    if type(rule) ~= "table" then
        return nil, "rule should be a table"
    end
    local node = { op = "AND", items = {} }
    local start = 1
    if type(rule[1]) == "string" and logical[rule[1]] then
        node.op = rule[1]
        start = 2
    elseif type(rule[1]) == "string" then
        -- a single condition written without the outer list
        local c, err = check_cond(rule)
        if not c then
            return nil, err
        end
        node.items[1] = c
        return node
    end
    for i = start, #rule do
        local item = rule[i]
        if type(item) ~= "table" then
            return nil, "rule should be a table"
        end
        local sub, err
        if type(item[1]) == "string" and not logical[item[1]] then
            sub, err = check_cond(item)
        else
            sub, err = compile(item)
        end
        if not sub then
            return nil, err
        end
        node.items[#node.items + 1] = sub
    end
    return node
end

local function eval_node(node, vars)
    if node.items == nil then
        local l = vars[node.var]
        local ok = ops[node.op](l, node.val, node) and true or false
        if node.negate then
            return not ok
        end
        return ok
    end
    local op = node.op
    local result
    if op == "AND" or op == "!AND" then
        result = true
        for _, it in ipairs(node.items) do
            if not eval_node(it, vars) then
                result = false
                break
            end
        end
    else
        result = false
        for _, it in ipairs(node.items) do
            if eval_node(it, vars) then
                result = true
                break
            end
        end
    end
    if op == "!AND" or op == "!OR" then
        return not result
    end
    return result
end

--- A compiled expression, or nil and the reason.
function _M.new(rule)
    if rule == nil then
        return nil, "missing argument rule"
    end
    local root, err = compile(rule)
    if not root then
        return nil, err
    end
    return setmetatable({ root = root }, mt)
end

--- True when the rule holds for `vars` (usually `ctx.var`). An empty rule holds.
function _M.eval(self, vars)
    return eval_node(self.root, vars or {})
end

return _M
