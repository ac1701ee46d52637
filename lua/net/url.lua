--- net.url: the URL parser and builder APISIX's loggers and proxy-mirror require (the
-- `net-url` rock's API, written for moongate): `parse`, `build`/`tostring`, `parseQuery`,
-- `buildQuery`, `normalize`, `resolve`, `removeDotSegments`, `setQuery`, `setAuthority`.
-- A parsed URL is a table: scheme, user, password, host, port (a number), authority, path,
-- query (a table that prints as a query string) and fragment.
local type = type
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local tonumber = tonumber
local setmetatable = setmetatable
local sort = table.sort
local concat = table.concat
local insert = table.insert
local remove = table.remove
local byte = string.byte
local char = string.char
local format = string.format
local gsub = string.gsub
local lower = string.lower
local match = string.match
local sub = string.sub

local M = {
    version = "1.2",
    options = {
        separator = "&",
        -- `a=1&a=2` gives `{a = {"1", "2"}}` when set; the last value wins otherwise.
        cumulative_parameters = false,
        -- `+` in a query is a space (HTML forms).
        query_plus_is_space = true,
        -- characters left as they are in a built path, besides the unreserved ones
        legal_in_path = {
            [":"] = true, ["-"] = true, ["_"] = true, ["."] = true, [","] = true,
            ["!"] = true, ["~"] = true, ["*"] = true, ["'"] = true, ["("] = true,
            [")"] = true, ["@"] = true, ["&"] = true, ["="] = true, ["$"] = true,
            [";"] = true, ["+"] = true, ["/"] = true,
        },
    },
    -- default ports, dropped by `normalize`
    services = {
        ftp = 21, gopher = 70, http = 80, https = 443, imap = 143, ldap = 389,
        nntp = 119, rtsp = 554, sip = 5060, snmp = 161, telnet = 23, ws = 80, wss = 443,
    },
}
M.__index = M

local function decode(s, plus_is_space)
    if plus_is_space then
        s = gsub(s, "+", " ")
    end
    return (gsub(s, "%%(%x%x)", function(h) return char(tonumber(h, 16)) end))
end

local function encode_char(c)
    return format("%%%02X", byte(c))
end

-- Percent-encodes all but the unreserved characters and, if given, `legal`'s.
local function encode(s, legal)
    return (gsub(tostring(s), "[^%w]", function(c)
        if c == "-" or c == "_" or c == "." or c == "~" or (legal and legal[c]) then
            return c
        end
        return encode_char(c)
    end))
end

M.encode = encode
M.decode = function(s) return decode(s, false) end

-- Keys sorted the same way whatever their type, so a built query is stable.
local function sorted_keys(t)
    local keys = {}
    for k in pairs(t) do
        keys[#keys + 1] = k
    end
    sort(keys, function(a, b)
        local ta, tb = type(a), type(b)
        if ta == tb and (ta == "number" or ta == "string") then
            return a < b
        end
        return tostring(a) < tostring(b)
    end)
    return keys
end

--- Builds `k=v&...` from a table; nested tables become `k[i]=v` / `k[name]=v`.
function M.buildQuery(tab, sep, prefix)
    sep = sep or M.options.separator or "&"
    local out = {}
    for _, k in ipairs(sorted_keys(tab)) do
        local v = tab[k]
        local name = encode(k)
        if prefix then
            name = prefix .. "[" .. name .. "]"
        end
        if type(v) == "table" then
            local nested = M.buildQuery(v, sep, name)
            if nested ~= "" then
                out[#out + 1] = nested
            end
        elseif v == true then
            out[#out + 1] = name
        elseif v ~= false and v ~= nil then
            out[#out + 1] = name .. "=" .. encode(v)
        end
    end
    return concat(out, sep)
end

local query_mt = { __tostring = function(t) return M.buildQuery(t) end }

-- Stores `value` under `name`, which may carry brackets: `a[]`, `a[b][c]`.
local function set_param(t, name, value)
    local base, rest = match(name, "^([^%[]+)(%[.*%])$")
    if not base then
        if M.options.cumulative_parameters and t[name] ~= nil then
            if type(t[name]) ~= "table" then
                t[name] = { t[name] }
            end
            insert(t[name], value)
        else
            t[name] = value
        end
        return
    end
    local keys = {}
    for k in rest:gmatch("%[([^%]]*)%]") do
        keys[#keys + 1] = k
    end
    local node = t
    local key = base
    for _, k in ipairs(keys) do
        if type(node[key]) ~= "table" then
            node[key] = {}
        end
        node = node[key]
        if k == "" then
            key = #node + 1
        else
            key = tonumber(k) or k
        end
    end
    node[key] = value
end

--- Parses a query string into a table (with a `tostring` that builds it again).
function M.parseQuery(str, sep)
    sep = sep or M.options.separator or "&"
    local values = setmetatable({}, query_mt)
    if not str or str == "" then
        return values
    end
    local plus = M.options.query_plus_is_space
    local pattern = "([^" .. gsub(sep, "%p", "%%%0") .. "]+)"
    for pair in str:gmatch(pattern) do
        -- a key without `=` is `true`, as ngx.decode_args has it, so it builds back bare
        local k, v = match(pair, "^([^=]*)=(.*)$")
        if k then
            v = decode(v, plus)
        else
            k, v = pair, true
        end
        k = decode(k, plus)
        if k ~= "" then
            set_param(values, k, v)
        end
    end
    return values
end

--- Sets the query from a string or a table; returns the query table.
function M:setQuery(query)
    if type(query) == "table" then
        self.query = setmetatable(query, query_mt)
    else
        self.query = M.parseQuery(query)
    end
    return self.query
end

--- Sets user, password, host and port from `user:password@host:port`; returns the authority.
function M:setAuthority(authority)
    self.authority = authority
    self.user, self.password, self.host, self.port = nil, nil, nil, nil
    local userinfo, hostport = match(authority, "^(.*)@(.*)$")
    if userinfo then
        local user, password = match(userinfo, "^([^:]*):(.*)$")
        if user then
            self.user, self.password = decode(user), decode(password)
        else
            self.user = decode(userinfo)
        end
    else
        hostport = authority
    end
    -- `[v6]:port`, `[v6]`, `host:port`, `host`
    local host, port = match(hostport, "^(%[[^%]]*%]):?(%d*)$")
    if not host then
        host, port = match(hostport, "^([^:]*):?(%d*)$")
    end
    if host then
        self.host = host ~= "" and host or nil
        self.port = tonumber(port)
    else
        self.host = hostport
    end
    return authority
end

--- Parses a URL string.
function M.parse(url)
    local u = setmetatable({ query = setmetatable({}, query_mt) }, M)
    url = tostring(url or "")
    url = gsub(url, "#(.*)$", function(f) u.fragment = f; return "" end)
    url = gsub(url, "%?(.*)$", function(q) u:setQuery(q); return "" end)
    url = gsub(url, "^([%a][%w+.-]*):", function(s) u.scheme = lower(s); return "" end)
    url = gsub(url, "^//([^/]*)", function(a) u:setAuthority(a); return "" end)
    u.path = decode(url, false)
    return u
end

local function build_authority(self)
    if not self.host then
        return self.authority
    end
    local a = self.host
    if self.port then
        a = a .. ":" .. self.port
    end
    if self.user and self.user ~= "" then
        local userinfo = encode(self.user)
        if self.password then
            userinfo = userinfo .. ":" .. encode(self.password)
        end
        a = userinfo .. "@" .. a
    end
    return a
end

--- The URL as a string.
function M:build()
    local out = {}
    if self.scheme then
        out[#out + 1] = self.scheme .. ":"
    end
    local authority = build_authority(self)
    if authority then
        out[#out + 1] = "//" .. authority
    end
    local path = self.path and encode(self.path, M.options.legal_in_path) or ""
    if authority and path ~= "" and sub(path, 1, 1) ~= "/" then
        path = "/" .. path
    end
    local query = type(self.query) == "table" and M.buildQuery(self.query)
        or (self.query and tostring(self.query)) or ""
    if query ~= "" and path == "" and authority then
        path = "/"
    end
    out[#out + 1] = path
    if query ~= "" then
        out[#out + 1] = "?" .. query
    end
    if self.fragment then
        out[#out + 1] = "#" .. self.fragment
    end
    return concat(out)
end
M.__tostring = M.build

--- Removes `.` and `..` segments (RFC 3986, 5.2.4, step by step).
function M.removeDotSegments(path)
    local input, out = path, {}
    while input ~= "" do
        if sub(input, 1, 3) == "../" then
            input = sub(input, 4)
        elseif sub(input, 1, 2) == "./" then
            input = sub(input, 3)
        elseif sub(input, 1, 3) == "/./" then
            input = sub(input, 3)
        elseif input == "/." then
            input = "/"
        elseif sub(input, 1, 4) == "/../" then
            input = sub(input, 4)
            remove(out)
        elseif input == "/.." then
            input = "/"
            remove(out)
        elseif input == "." or input == ".." then
            input = ""
        else
            local seg = match(input, "^/?[^/]*")
            out[#out + 1] = seg
            input = sub(input, #seg + 1)
        end
    end
    return concat(out)
end

--- Lower-cases scheme and host, drops the default port, cleans the path; returns self.
function M:normalize()
    if self.scheme then
        self.scheme = lower(self.scheme)
    end
    if self.host then
        self.host = lower(self.host)
        if self.port and M.services[self.scheme] == self.port then
            self.port = nil
        end
    end
    if self.path then
        local path = gsub(self.path, "//+", "/")
        self.path = M.removeDotSegments(path)
        if self.host and self.path == "" then
            self.path = "/"
        end
    end
    return self
end

--- Resolves `other` (a string or a parsed URL) against this URL (RFC 3986, 5.2).
function M:resolve(other)
    if type(other) == "string" then
        other = M.parse(other)
    end
    local r = setmetatable({ query = setmetatable({}, query_mt) }, M)
    if other.scheme then
        r.scheme = other.scheme
        local a = build_authority(other)
        if a then
            r:setAuthority(a)
        end
        r.path = M.removeDotSegments(other.path or "")
        r:setQuery(tostring(other.query or ""))
    else
        r.scheme = self.scheme
        if other.host then
            r:setAuthority(build_authority(other))
            r.path = M.removeDotSegments(other.path or "")
            r:setQuery(tostring(other.query or ""))
        else
            local a = build_authority(self)
            if a then
                r:setAuthority(a)
            end
            local opath = other.path or ""
            if opath == "" then
                r.path = self.path
                local q = tostring(other.query or "")
                r:setQuery(q ~= "" and q or tostring(self.query or ""))
            else
                if sub(opath, 1, 1) == "/" then
                    r.path = M.removeDotSegments(opath)
                else
                    local base = self.path or ""
                    if self.host and base == "" then
                        base = "/"
                    end
                    local dir = match(base, "^(.*/)") or ""
                    r.path = M.removeDotSegments(dir .. opath)
                end
                r:setQuery(tostring(other.query or ""))
            end
        end
    end
    r.fragment = other.fragment
    return r
end

return M
