--- jsonpath: JSONPath queries over Lua tables, for APISIX's acl and data-mask (the `jsonpath`
-- rock's API, written for moongate):
--   jp.parse(expr) -> components | nil, err
--   jp.query(obj, expr, count?) -> { value, ... } | nil, err
--   jp.value(obj, expr) -> the first value (nil when nothing matches)
--   jp.paths(obj, expr, count?) -> { { "$", key-or-index, ... }, ... }
--   jp.nodes(obj, expr, count?) -> { { path = {...}, value = v }, ... }
--   jp.apply(obj, expr, fn) -> nodes, each value replaced by fn(value) in obj
-- Syntax (Goessner's, as the JavaScript `jsonpath` library reads it): `$`, `.name`, `['name']`,
-- `.*`, `[*]`, `..` (descendants), `[0]`, `[-1]`, `[0,2]`, `['a','b']`, slices
-- `[start:end:step]`, filters `[?(@.price < 10 && @.isbn)]` and scripts `[(@.length-1)]`.
-- Array indexes in paths are 0-based, as in JSONPath; a Lua array's `t[1]` is index 0.
local type = type
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local tonumber = tonumber
local error = error
local pcall = pcall
local sort = table.sort
local sub = string.sub
local find = string.find
local match = string.match

local M = { version = "1.0" }

local null = ngx and ngx.null
local has_cjson, cjson = pcall(require, "cjson")
local array_mt = has_cjson and cjson.array_mt or nil

-- A table is a JSON array when its keys are exactly 1..n (n > 0), or it is marked as one
-- by cjson.
local function is_array(t)
    if array_mt and getmetatable(t) == array_mt then
        return true
    end
    local n = #t
    if n == 0 then
        return false
    end
    local count = 0
    for k in pairs(t) do
        if type(k) ~= "number" then
            return false
        end
        count = count + 1
    end
    return count == n
end

-- The children of a table in document order: arrays by index (0-based keys), objects by key
-- (sorted, so results are stable).
local function children(t)
    local out = {}
    if is_array(t) then
        for i = 1, #t do
            out[#out + 1] = { i - 1, t[i] }
        end
        return out
    end
    local keys = {}
    for k in pairs(t) do
        keys[#keys + 1] = k
    end
    sort(keys, function(a, b) return tostring(a) < tostring(b) end)
    for _, k in ipairs(keys) do
        out[#out + 1] = { k, t[k] }
    end
    return out
end

-- Reads `key` (a JSONPath key or 0-based index) of `t`.
local function get(t, key)
    if type(t) ~= "table" then
        return nil
    end
    if type(key) == "number" then
        if is_array(t) then
            if key < 0 then
                key = #t + key
            end
            return t[key + 1], key
        end
        return t[key], key
    end
    if key == "length" and is_array(t) then
        return #t, key
    end
    return t[key], key
end

------------------------------------------------------------------------------------------
-- Filter and script expressions: a small parser for `@.a.b == 'x' && @.n >= 2` and the like.
------------------------------------------------------------------------------------------

local function expr_error(src, pos, what)
    error({ jsonpath = ("%s at %d in %q"):format(what, pos, src) }, 0)
end

-- Tokens: { kind, value, pos }
local function tokenize(src)
    local toks, i, n = {}, 1, #src
    while i <= n do
        local c = sub(src, i, i)
        if find(c, "%s") then
            i = i + 1
        elseif c == "@" or c == "$" then
            toks[#toks + 1] = { "ref", c, i }
            i = i + 1
        elseif c == "." then
            local name, e = match(src, "^%.([%a_][%w_]*)()", i)
            if not name then
                expr_error(src, i, "a name expected after '.'")
            end
            toks[#toks + 1] = { "dot", name, i }
            i = e
        elseif c == "'" or c == '"' then
            local j, buf = i + 1, {}
            while true do
                local d = sub(src, j, j)
                if d == "" then
                    expr_error(src, i, "unterminated string")
                elseif d == "\\" then
                    buf[#buf + 1] = sub(src, j + 1, j + 1)
                    j = j + 2
                elseif d == c then
                    break
                else
                    buf[#buf + 1] = d
                    j = j + 1
                end
            end
            toks[#toks + 1] = { "str", table.concat(buf), i }
            i = j + 1
        elseif find(c, "%d") then
            local num, e = match(src, "^(%d+%.?%d*[eE]?[%-+]?%d*)()", i)
            toks[#toks + 1] = { "num", tonumber(num), i }
            i = e
        else
            local op = match(src, "^(===)", i) or match(src, "^(!==)", i)
                or match(src, "^([=!<>]=)", i) or match(src, "^(&&)", i)
                or match(src, "^(||)", i) or match(src, "^([<>!%+%-%*/%%%(%)%[%]])", i)
            if not op then
                local word, e = match(src, "^([%a_][%w_]*)()", i)
                if word == "true" or word == "false" then
                    toks[#toks + 1] = { "lit", word == "true", i }
                elseif word == "null" or word == "undefined" then
                    toks[#toks + 1] = { "nil", nil, i }
                else
                    expr_error(src, i, "unexpected " .. (word or c))
                end
                i = e
            else
                toks[#toks + 1] = { "op", op, i }
                i = i + #op
            end
        end
    end
    return toks
end

local PREC = {
    ["||"] = 1, ["&&"] = 2,
    ["=="] = 3, ["!="] = 3, ["==="] = 3, ["!=="] = 3,
    ["<"] = 4, ["<="] = 4, [">"] = 4, [">="] = 4,
    ["+"] = 5, ["-"] = 5, ["*"] = 6, ["/"] = 6, ["%"] = 6,
}

-- Parses tokens into a tree: { "lit", v } | { "ref", root, keys } | { "not", e } |
-- { "neg", e } | { op, a, b }.
local function parse_expr(src)
    local toks = tokenize(src)
    local pos = 1

    local function peek() return toks[pos] end
    local function take() pos = pos + 1; return toks[pos - 1] end

    local binary

    local function primary()
        local t = take()
        if not t then
            expr_error(src, #src + 1, "an operand expected")
        end
        if t[1] == "num" or t[1] == "str" or t[1] == "lit" then
            return { "lit", t[2] }
        elseif t[1] == "nil" then
            return { "lit", nil }
        elseif t[1] == "ref" then
            local keys = {}
            while peek() do
                local p = peek()
                if p[1] == "dot" then
                    take()
                    keys[#keys + 1] = { "lit", p[2] }
                elseif p[1] == "op" and p[2] == "[" then
                    take()
                    keys[#keys + 1] = binary(0)
                    local close = take()
                    if not close or close[2] ~= "]" then
                        expr_error(src, p[3], "']' expected")
                    end
                else
                    break
                end
            end
            return { "ref", t[2], keys }
        elseif t[1] == "op" and t[2] == "(" then
            local e = binary(0)
            local close = take()
            if not close or close[2] ~= ")" then
                expr_error(src, t[3], "')' expected")
            end
            return e
        elseif t[1] == "op" and t[2] == "!" then
            return { "not", primary() }
        elseif t[1] == "op" and t[2] == "-" then
            return { "neg", primary() }
        end
        expr_error(src, t[3], "unexpected " .. tostring(t[2]))
    end

    binary = function(min)
        local left = primary()
        while true do
            local t = peek()
            local p = t and t[1] == "op" and PREC[t[2]]
            if not p or p <= min then
                break
            end
            take()
            left = { t[2], left, binary(p) }
        end
        return left
    end

    local tree = binary(0)
    if pos <= #toks then
        expr_error(src, toks[pos][3], "unexpected " .. tostring(toks[pos][2]))
    end
    return tree
end

local function loose_eq(a, b)
    if a == b then
        return true
    end
    if type(a) == "number" and type(b) == "string" then
        return tonumber(b) == a
    elseif type(a) == "string" and type(b) == "number" then
        return tonumber(a) == b
    end
    return false
end

local function truthy(v)
    return v ~= nil and v ~= false and v ~= 0 and v ~= "" and v ~= null
end

local function eval(e, at, root)
    local k = e[1]
    if k == "lit" then
        return e[2]
    elseif k == "ref" then
        local v = e[2] == "@" and at or root
        for _, key in ipairs(e[3]) do
            v = get(v, eval(key, at, root))
            if v == nil then
                return nil
            end
        end
        return v
    elseif k == "not" then
        return not truthy(eval(e[2], at, root))
    elseif k == "neg" then
        local v = tonumber(eval(e[2], at, root))
        return v and -v
    elseif k == "&&" then
        local a = eval(e[2], at, root)
        if not truthy(a) then return a end
        return eval(e[3], at, root)
    elseif k == "||" then
        local a = eval(e[2], at, root)
        if truthy(a) then return a end
        return eval(e[3], at, root)
    end
    local a, b = eval(e[2], at, root), eval(e[3], at, root)
    if k == "==" then return loose_eq(a, b)
    elseif k == "!=" then return not loose_eq(a, b)
    elseif k == "===" then return a == b
    elseif k == "!==" then return a ~= b
    end
    if k == "+" and (type(a) == "string" or type(b) == "string") then
        if a == nil or b == nil then return nil end
        return tostring(a) .. tostring(b)
    end
    local ta, tb = type(a), type(b)
    if k == "<" or k == "<=" or k == ">" or k == ">=" then
        if not ((ta == "number" and tb == "number") or (ta == "string" and tb == "string")) then
            a, b = tonumber(a), tonumber(b)
            if a == nil or b == nil then return false end
        end
        if k == "<" then return a < b
        elseif k == "<=" then return a <= b
        elseif k == ">" then return a > b
        else return a >= b end
    end
    a, b = tonumber(a), tonumber(b)
    if a == nil or b == nil then
        return nil
    end
    if k == "+" then return a + b
    elseif k == "-" then return a - b
    elseif k == "*" then return a * b
    elseif k == "/" then return a / b
    else return a % b end
end

------------------------------------------------------------------------------------------
-- Path expressions
------------------------------------------------------------------------------------------

-- Finds the `]` that closes the subscript opened at `i` (skipping strings and nesting).
local function subscript_end(src, i)
    local depth, j, quote = 0, i, nil
    while j <= #src do
        local c = sub(src, j, j)
        if quote then
            if c == "\\" then
                j = j + 1
            elseif c == quote then
                quote = nil
            end
        elseif c == "'" or c == '"' then
            quote = c
        elseif c == "[" or c == "(" then
            depth = depth + 1
        elseif c == ")" then
            depth = depth - 1
        elseif c == "]" then
            depth = depth - 1
            if depth == 0 then
                return j
            end
        end
        j = j + 1
    end
    return nil
end

local function trim(s)
    return match(s, "^%s*(.-)%s*$")
end

-- Splits `a, 'b,c', 2` at top-level commas.
local function split_union(s)
    local parts, start, quote, depth = {}, 1, nil, 0
    for j = 1, #s do
        local c = sub(s, j, j)
        if quote then
            if c == quote and sub(s, j - 1, j - 1) ~= "\\" then quote = nil end
        elseif c == "'" or c == '"' then
            quote = c
        elseif c == "(" or c == "[" then
            depth = depth + 1
        elseif c == ")" or c == "]" then
            depth = depth - 1
        elseif c == "," and depth == 0 then
            parts[#parts + 1] = trim(sub(s, start, j - 1))
            start = j + 1
        end
    end
    parts[#parts + 1] = trim(sub(s, start))
    return parts
end

-- One selector inside `[...]`.
local function parse_selector(src, s)
    if s == "*" then
        return { type = "wildcard", value = "*" }
    end
    local q = sub(s, 1, 1)
    if (q == "'" or q == '"') and sub(s, -1) == q and #s >= 2 then
        return { type = "string_literal", value = (sub(s, 2, -2):gsub("\\(.)", "%1")) }
    end
    if match(s, "^%-?%d+$") then
        return { type = "numeric_literal", value = tonumber(s) }
    end
    local a, b, c = match(s, "^(%-?%d*)%s*:%s*(%-?%d*)%s*:?%s*(%-?%d*)$")
    if a then
        return { type = "slice", value = { tonumber(a), tonumber(b), tonumber(c) } }
    end
    local filter = match(s, "^%?%s*%((.*)%)$")
    if filter then
        return { type = "filter_expression", value = filter, tree = parse_expr(filter) }
    end
    local script = match(s, "^%((.*)%)$")
    if script then
        return { type = "script_expression", value = script, tree = parse_expr(script) }
    end
    error({ jsonpath = ("bad subscript [%s] in %q"):format(s, src) }, 0)
end

local function parse_path(src)
    if type(src) ~= "string" then
        error({ jsonpath = "the path must be a string" }, 0)
    end
    local comps = {}
    local i = 1
    src = trim(src)
    -- a leading member without `$` (`groups`, `['a b']`) is read from the root, as the
    -- JavaScript library's grammar allows
    if sub(src, 1, 1) == "[" then
        src = "$" .. src
    elseif match(src, "^[%a_]") then
        src = "$." .. src
    elseif sub(src, 1, 1) ~= "$" then
        error({ jsonpath = ("a path starts with '$' or a member name: %q"):format(src) }, 0)
    end
    comps[1] = { expression = { type = "root", value = "$" } }
    i = 2
    while i <= #src do
        local scope = "child"
        if sub(src, i, i + 1) == ".." then
            scope = "descendant"
            i = i + 2
        elseif sub(src, i, i) == "." then
            i = i + 1
        elseif sub(src, i, i) ~= "[" then
            error({ jsonpath = ("unexpected %q at %d in %q"):format(sub(src, i, i), i, src) }, 0)
        end
        local c = sub(src, i, i)
        if c == "[" then
            local e = subscript_end(src, i)
            if not e then
                error({ jsonpath = ("unclosed '[' at %d in %q"):format(i, src) }, 0)
            end
            local inner = trim(sub(src, i + 1, e - 1))
            local sels = {}
            for _, part in ipairs(split_union(inner)) do
                sels[#sels + 1] = parse_selector(src, part)
            end
            local expression = #sels == 1 and sels[1] or { type = "union", value = sels }
            comps[#comps + 1] = { expression = expression, scope = scope, operation = "subscript" }
            i = e + 1
        elseif c == "*" then
            comps[#comps + 1] = { expression = { type = "wildcard", value = "*" },
                                  scope = scope, operation = "member" }
            i = i + 1
        else
            local name, e = match(src, "^([^%.%[%s]+)()", i)
            if not name then
                error({ jsonpath = ("a name expected at %d in %q"):format(i, src) }, 0)
            end
            comps[#comps + 1] = { expression = { type = "identifier", value = name },
                                  scope = scope, operation = "member" }
            i = e
        end
    end
    return comps
end

local cache = setmetatable({}, { __mode = "v" })

local function compiled(expr)
    local c = cache[expr]
    if c then
        return c
    end
    local ok, res = pcall(parse_path, expr)
    if not ok then
        if type(res) == "table" and res.jsonpath then
            return nil, res.jsonpath
        end
        error(res, 0)
    end
    cache[expr] = res
    return res
end

--- Parses a path; returns its components or nil and the reason.
function M.parse(expr)
    return compiled(expr)
end

local function copy_path(path, key)
    local p = {}
    for i = 1, #path do
        p[i] = path[i]
    end
    p[#p + 1] = key
    return p
end

-- Applies one selector to one node, appending the matches to `out`.
local function select(sel, node, root, out)
    local v = node.value
    if type(v) ~= "table" then
        return
    end
    local t = sel.type
    if t == "identifier" or t == "string_literal" or t == "numeric_literal" then
        local got, key = get(v, sel.value)
        if got ~= nil then
            out[#out + 1] = { path = copy_path(node.path, key), value = got }
        end
    elseif t == "wildcard" then
        for _, kv in ipairs(children(v)) do
            out[#out + 1] = { path = copy_path(node.path, kv[1]), value = kv[2] }
        end
    elseif t == "union" then
        for _, s in ipairs(sel.value) do
            select(s, node, root, out)
        end
    elseif t == "slice" then
        if not is_array(v) then
            return
        end
        local n = #v
        local first, last, step = sel.value[1], sel.value[2], sel.value[3] or 1
        if step == 0 then
            return
        end
        if step > 0 then
            first = first or 0
            last = last or n
        else
            first = first or n - 1
            last = last or -n - 1
        end
        if first < 0 then first = first + n end
        if last < 0 then last = last + n end
        if step > 0 then
            first = first < 0 and 0 or first
            last = last > n and n or last
            for i = first, last - 1, step do
                out[#out + 1] = { path = copy_path(node.path, i), value = v[i + 1] }
            end
        else
            first = first >= n and n - 1 or first
            for i = first, last + 1, step do
                if i >= 0 then
                    out[#out + 1] = { path = copy_path(node.path, i), value = v[i + 1] }
                end
            end
        end
    elseif t == "filter_expression" then
        for _, kv in ipairs(children(v)) do
            if truthy(eval(sel.tree, kv[2], root)) then
                out[#out + 1] = { path = copy_path(node.path, kv[1]), value = kv[2] }
            end
        end
    elseif t == "script_expression" then
        local key = eval(sel.tree, v, root)
        if key ~= nil then
            select({ type = type(key) == "number" and "numeric_literal" or "string_literal",
                     value = key }, node, root, out)
        end
    end
end

-- The node and all its descendants, in document order.
local function descendants(node, out)
    out[#out + 1] = node
    if type(node.value) == "table" then
        for _, kv in ipairs(children(node.value)) do
            descendants({ path = copy_path(node.path, kv[1]), value = kv[2] }, out)
        end
    end
    return out
end

--- The matching nodes: { path = {...}, value = v }.
function M.nodes(obj, expr, count)
    if type(obj) ~= "table" then
        return nil, "obj needs to be an object"
    end
    local comps, err = compiled(expr)
    if not comps then
        return nil, err
    end
    local nodes = { { path = { "$" }, value = obj } }
    for ci = 2, #comps do
        local comp = comps[ci]
        local from = nodes
        if comp.scope == "descendant" then
            from = {}
            for _, n in ipairs(nodes) do
                descendants(n, from)
            end
        end
        local out = {}
        for _, n in ipairs(from) do
            select(comp.expression, n, obj, out)
        end
        nodes = out
    end
    if count and count > 0 and #nodes > count then
        for i = #nodes, count + 1, -1 do
            nodes[i] = nil
        end
    end
    return nodes
end

-- One field (`value` or `path`) of each matching node.
local function nodes_field(obj, expr, count, field)
    local nodes, err = M.nodes(obj, expr, count)
    if not nodes then
        return nil, err
    end
    local out = {}
    for i, n in ipairs(nodes) do
        out[i] = n[field]
    end
    return out
end

--- The matching values.
function M.query(obj, expr, count)
    return nodes_field(obj, expr, count, "value")
end

--- The matching paths.
function M.paths(obj, expr, count)
    return nodes_field(obj, expr, count, "path")
end

--- The first matching value, or nil.
function M.value(obj, expr)
    local values, err = M.query(obj, expr, 1)
    if not values then
        return nil, err
    end
    return values[1]
end

--- Replaces every matching value with fn(value) in `obj`; returns the nodes (new values).
function M.apply(obj, expr, fn)
    local nodes, err = M.nodes(obj, expr)
    if not nodes then
        return nil, err
    end
    for i = #nodes, 1, -1 do
        local n = nodes[i]
        local key = n.path[#n.path]
        if #n.path == 1 then
            n.value = fn(n.value)
        else
            local parent = obj
            for j = 2, #n.path - 1 do
                parent = get(parent, n.path[j])
            end
            n.value = fn(n.value)
            if type(key) == "number" and is_array(parent) then
                parent[key + 1] = n.value
            else
                parent[key] = n.value
            end
        end
    end
    return nodes
end

return M
