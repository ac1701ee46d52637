--- resty.radixtree: lua-resty-radixtree's route matcher API (`new`, `match`, `dispatch`) in
-- plain Lua, for libraries that route with it (lua-resty-openapi-validator). The original is
-- a C radix tree behind FFI; here each route's paths are compiled to segment lists and tried in
-- lua-resty-radixtree's order: exact paths first, then paths with parameters (`/users/:id`)
-- or a trailing wildcard (`/static/*`, `/files/*rest`) by longest literal prefix, each group by
-- `priority` (higher first), then by the order given. A route may also name `methods`,
-- `hosts` (exact, or `*.example.com`) and `filter_fun(vars, opts)`. `match(path, opts)` returns
-- the route's `metadata` and fills `opts.matched` with the parameters, `_path` and `_method`;
-- `dispatch(path, opts, ...)` calls the route's `handler(...)` instead.
local type = type
local ipairs = ipairs
local pairs = pairs
local tostring = tostring
local setmetatable = setmetatable
local str_find = string.find
local str_sub = string.sub
local str_byte = string.byte
local str_lower = string.lower
local tab_sort = table.sort
local error = error

local _M = { _VERSION = "2.9.2" }
local mt = { __index = _M }

local SLASH, COLON, STAR = str_byte("/"), str_byte(":"), str_byte("*")

-- A compiled path: { exact = path } or { segments = {...}, prefix_len = n, wildcard = name }.
local function compile_path(path)
    if type(path) ~= "string" or str_byte(path, 1) ~= SLASH then
        error("invalid path: " .. tostring(path), 3)
    end
    if not str_find(path, "[:*]") then
        return { exact = path }
    end
    local first = str_find(path, "[:*]")
    local c = { segments = {}, prefix_len = first - 1, path = path }
    local pos = 2
    while pos <= #path + 1 do
        local slash = str_find(path, "/", pos, true)
        local seg = str_sub(path, pos, (slash or #path + 1) - 1)
        local b = str_byte(seg, 1)
        if b == STAR then
            c.wildcard = str_sub(seg, 2)
            if slash then
                error("a wildcard must end the path: " .. path, 3)
            end
            break
        elseif b == COLON then
            c.segments[#c.segments + 1] = { param = str_sub(seg, 2) }
        elseif str_byte(seg, #seg) == STAR then
            -- `/api/v1*`: a literal prefix of the segment, then anything.
            c.segments[#c.segments + 1] = { starts = str_sub(seg, 1, #seg - 1) }
            c.wildcard = ""
            if slash then
                error("a wildcard must end the path: " .. path, 3)
            end
            break
        else
            c.segments[#c.segments + 1] = { literal = seg }
        end
        if not slash then
            break
        end
        pos = slash + 1
    end
    return c
end

-- Matches `path` against a compiled pattern; fills `out` with its parameters.
local function match_pattern(c, path, out)
    local pos = 2
    local n = #c.segments
    for i, seg in ipairs(c.segments) do
        local slash = str_find(path, "/", pos, true)
        local piece = str_sub(path, pos, (slash or #path + 1) - 1)
        if seg.literal then
            if piece ~= seg.literal then return false end
        elseif seg.param then
            if piece == "" then return false end
            out[seg.param] = piece
        else
            -- starts: the rest of the path after the prefix is the wildcard
            if str_sub(piece, 1, #seg.starts) ~= seg.starts then return false end
            return true
        end
        if i == n then
            if c.wildcard then
                if not slash then
                    -- `/a/*` matches `/a/` and deeper, not `/a`
                    return false
                end
                if c.wildcard ~= "" then
                    out[c.wildcard] = str_sub(path, slash + 1)
                end
                return true
            end
            return slash == nil
        end
        if not slash then return false end
        pos = slash + 1
    end
    -- no segments at all: `/*`
    if c.wildcard then
        if c.wildcard ~= "" then
            out[c.wildcard] = str_sub(path, 2)
        end
        return true
    end
    return path == "/"
end

local function host_matches(hosts, host)
    if not hosts then return true end
    if not host then return false end
    host = str_lower(host)
    for _, h in ipairs(hosts) do
        if str_byte(h, 1) == STAR then
            local suffix = str_sub(h, 2)
            if #host > #suffix and str_sub(host, -#suffix) == suffix then
                return true
            end
        elseif h == host then
            return true
        end
    end
    return false
end

function _M.new(routes)
    if type(routes) ~= "table" then
        return nil, "invalid argument routes"
    end
    local self = setmetatable({ exact = {}, patterns = {} }, mt)
    local order = 0
    for _, route in ipairs(routes) do
        local paths = route.paths or { route.path }
        if type(paths) == "string" then paths = { paths } end
        local methods
        if route.methods then
            methods = {}
            for _, m in ipairs(type(route.methods) == "table" and route.methods
                               or { route.methods }) do
                methods[m] = true
            end
        end
        local hosts
        if route.hosts then
            hosts = {}
            for _, h in ipairs(type(route.hosts) == "table" and route.hosts or { route.hosts }) do
                hosts[#hosts + 1] = str_lower(h)
            end
        end
        for _, path in ipairs(paths) do
            order = order + 1
            local c = compile_path(path)
            c.route, c.methods, c.hosts, c.order = route, methods, hosts, order
            c.priority = route.priority or 0
            if c.exact then
                local list = self.exact[c.exact] or {}
                list[#list + 1] = c
                self.exact[c.exact] = list
            else
                self.patterns[#self.patterns + 1] = c
            end
        end
    end
    local function by_rank(a, b)
        if a.prefix_len ~= b.prefix_len then return (a.prefix_len or 0) > (b.prefix_len or 0) end
        if a.priority ~= b.priority then return a.priority > b.priority end
        return a.order < b.order
    end
    for _, list in pairs(self.exact) do
        tab_sort(list, by_rank)
    end
    tab_sort(self.patterns, by_rank)
    return self
end

local function accepts(c, opts)
    if c.methods and not (opts.method and c.methods[opts.method]) then
        return false
    end
    if not host_matches(c.hosts, opts.host) then
        return false
    end
    local f = c.route.filter_fun
    if f and not f(opts.vars or {}, opts) then
        return false
    end
    return true
end

local function find(self, path, opts)
    opts = opts or {}
    if type(path) ~= "string" then
        return nil
    end
    local list = self.exact[path]
    if list then
        for _, c in ipairs(list) do
            if accepts(c, opts) then
                return c, {}
            end
        end
    end
    for _, c in ipairs(self.patterns) do
        local params = {}
        if match_pattern(c, path, params) and accepts(c, opts) then
            return c, params
        end
    end
    return nil
end

local function fill(opts, c, params)
    local matched = opts and opts.matched
    if matched then
        for k, v in pairs(params) do
            matched[k] = v
        end
        matched._path = c.exact or c.path
        matched._method = opts.method
    end
end

function _M.match(self, path, opts)
    local c, params = find(self, path, opts)
    if not c then
        return nil
    end
    fill(opts, c, params)
    return c.route.metadata
end

function _M.dispatch(self, path, opts, ...)
    local c, params = find(self, path, opts)
    if not c then
        return false
    end
    fill(opts, c, params)
    local handler = c.route.handler
    if type(handler) == "function" then
        handler(...)
    end
    return true
end

return _M
