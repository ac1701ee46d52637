-- `require("resty.http")`: lua-resty-http's client API over moongate's cosockets
-- (ngx.socket.tcp), so its connections are kept alive in the worker's cosocket pool.
-- HTTP/1.1 (and 1.0) over TCP, and over TLS (`https`, the cosocket's sslhandshake).
local ngx = ngx
local tcp = ngx.socket.tcp
local str_lower, str_upper, str_find, str_sub, str_format, str_gsub =
    string.lower, string.upper, string.find, string.sub, string.format, string.gsub
local concat = table.concat
local type, tostring, tonumber, pairs, ipairs, setmetatable, rawget, rawset =
    type, tostring, tonumber, pairs, ipairs, setmetatable, rawget, rawset

local _M = { _VERSION = "0.17.1" }
local mt = { __index = _M }

local USER_AGENT = "lua-resty-http/" .. _M._VERSION .. " (Lua) ngx_lua/10026"

-- Response headers: looked up without regard to case, `_` read as `-`.
local function norm(k)
    return (str_gsub(str_lower(k), "_", "-"))
end

-- Each headers table's normalized name -> name as received, kept aside so `pairs` over the
-- headers sees only the headers.
local NAMES = setmetatable({}, { __mode = "k" })
local HEADERS_MT = {
    __index = function(t, k)
        if type(k) ~= "string" then return nil end
        local names = NAMES[t]
        local real = names and names[norm(k)]
        return real and rawget(t, real)
    end,
}

local function new_headers()
    local t = setmetatable({}, HEADERS_MT)
    NAMES[t] = {}
    return t
end

local function add_header(t, k, v)
    local names = NAMES[t]
    local n = norm(k)
    local real = names[n]
    if not real then
        names[n] = k
        rawset(t, k, v)
        return
    end
    local cur = rawget(t, real)
    if type(cur) == "table" then
        cur[#cur + 1] = v
    else
        rawset(t, real, { cur, v })
    end
end

function _M.new()
    local sock, err = tcp()
    if not sock then
        return nil, err
    end
    return setmetatable({ sock = sock, keepalive = true }, mt)
end

function _M.set_timeout(self, timeout)
    return self.sock:settimeout(timeout)
end

function _M.set_timeouts(self, connect, send, read)
    return self.sock:settimeouts(connect, send, read)
end

function _M.get_reused_times(self)
    return self.sock:getreusedtimes()
end

--- The cosocket's sslhandshake on this client's connection (lua-resty-http's old API, which
-- APISIX's http-logger and clickhouse-logger use after connect(host, port)).
function _M.ssl_handshake(self, ...)
    local ok, err = self.sock:sslhandshake(...)
    if ok then
        self.scheme = "https"
    end
    return ok, err
end

function _M.close(self)
    return self.sock:close()
end

--- connect(host, port, opts?) or connect{ scheme, host, port, pool, pool_size, backlog,
-- ssl_verify, ssl_server_name, proxy_opts }.
function _M.connect(self, host_or_opts, port, sock_opts)
    local opts
    if type(host_or_opts) == "table" then
        opts = host_or_opts
    else
        opts = { host = host_or_opts, port = port, scheme = "http" }
        if sock_opts then
            opts.pool, opts.pool_size, opts.backlog = sock_opts.pool, sock_opts.pool_size, sock_opts.backlog
        end
    end
    local scheme = str_lower(opts.scheme or "http")
    local host = opts.host
    if type(host) ~= "string" or host == "" then
        return nil, "no host specified"
    end
    if scheme ~= "http" and scheme ~= "https" then
        return nil, "unsupported scheme: " .. scheme
    end
    local ssl = scheme == "https"
    -- As lua-resty-http: the server's certificate is checked unless ssl_verify is false, and
    -- its name is the host's unless ssl_server_name says another.
    local ssl_verify = opts.ssl_verify ~= false
    local ssl_server_name = opts.ssl_server_name
    local unix = str_sub(host, 1, 5) == "unix:"
    if ssl and not ssl_server_name and not unix then
        ssl_server_name = host
    end
    port = tonumber(opts.port) or (ssl and 443 or 80)
    local pool = opts.pool
    if not pool then
        -- TLS connections (per name and check) never mix with plain ones in the pool.
        pool = (unix and host or (host .. ":" .. port))
        if ssl then
            pool = pool .. ":ssl:" .. (ssl_server_name or "") .. ":" .. tostring(ssl_verify)
        end
    end
    local copts = { pool = pool, pool_size = opts.pool_size, backlog = opts.backlog }
    local ok, err
    if unix then
        ok, err = self.sock:connect(host, copts)
    else
        ok, err = self.sock:connect(host, port, copts)
    end
    if not ok then
        return nil, err
    end
    if ssl and self.sock:getreusedtimes() == 0 then
        ok, err = self.sock:sslhandshake(false, ssl_server_name, ssl_verify,
            opts.ssl_send_status_req)
        if not ok then
            self.sock:close()
            return nil, err
        end
    end
    self.host, self.port, self.scheme, self.unix = host, port, scheme, unix
    self.keepalive = true
    self.body_pending = false
    return true
end

function _M.set_keepalive(self, ...)
    if self.body_pending then
        self.sock:close()
        return nil, "response not fully read"
    end
    if not self.keepalive then
        -- The response said the connection closes.
        return self.sock:close()
    end
    return self.sock:setkeepalive(...)
end

local function send_all(sock, data)
    local bytes, err = sock:send(data)
    if not bytes then
        return nil, err
    end
    return true
end

local function format_request(self, params, headers, body_len, chunked)
    local method = str_upper(params.method or "GET")
    local path = params.path or "/"
    local query = params.query
    if type(query) == "table" then
        query = ngx.encode_args(query)
    end
    if type(query) == "string" and query ~= "" then
        if str_sub(query, 1, 1) ~= "?" then
            query = "?" .. query
        end
        path = path .. query
    end
    local version = params.version == 1.0 and "1.0" or "1.1"
    local out = { method, " ", path, " HTTP/", version, "\r\n" }
    local has = {}
    for k, v in pairs(headers) do
        has[norm(k)] = true
        if type(v) == "table" then
            for _, vv in ipairs(v) do
                out[#out + 1] = k .. ": " .. tostring(vv) .. "\r\n"
            end
        else
            out[#out + 1] = k .. ": " .. tostring(v) .. "\r\n"
        end
    end
    if not has["host"] then
        local h = self.host or ""
        local default_port = self.scheme == "https" and 443 or 80
        if not self.unix and self.port ~= default_port then
            h = h .. ":" .. self.port
        end
        out[#out + 1] = "Host: " .. h .. "\r\n"
    end
    if not has["user-agent"] then
        out[#out + 1] = "User-Agent: " .. USER_AGENT .. "\r\n"
    end
    if body_len and not has["content-length"] then
        out[#out + 1] = "Content-Length: " .. body_len .. "\r\n"
    end
    if chunked and not has["transfer-encoding"] then
        out[#out + 1] = "Transfer-Encoding: chunked\r\n"
    end
    out[#out + 1] = "\r\n"
    return out, method, version
end

local function read_status(sock)
    local line, err = sock:receive("*l")
    if not line then
        return nil, err
    end
    local version, status, reason = line:match("^HTTP/(%d%.%d) (%d%d%d) ?(.*)$")
    if not status then
        return nil, "bad status line: " .. line
    end
    return tonumber(status), tonumber(version), reason
end

local function read_headers(sock)
    local headers = new_headers()
    while true do
        local line, err = sock:receive("*l")
        if not line then
            return nil, err
        end
        if line == "" then
            return headers
        end
        local k, v = line:match("^([^:%s]+)%s*:%s*(.-)%s*$")
        if k then
            add_header(headers, k, v)
        end
    end
end

local function chunked_reader(self, sock)
    local remaining = 0 -- of the current chunk
    local done = false
    return function(max)
        if done then
            return nil
        end
        if remaining == 0 then
            local line, err = sock:receive("*l")
            if not line then
                return nil, err
            end
            local size = tonumber(line:match("^%s*(%x+)"), 16)
            if not size then
                return nil, "bad chunk size: " .. line
            end
            if size == 0 then
                -- Trailers, then the empty line.
                repeat
                    line, err = sock:receive("*l")
                    if not line then
                        return nil, err
                    end
                until line == ""
                done = true
                self.body_pending = false
                return nil
            end
            remaining = size
        end
        local n = remaining
        if max and max > 0 and max < n then
            n = max
        end
        local data, err = sock:receive(n)
        if not data then
            return nil, err
        end
        remaining = remaining - n
        if remaining == 0 then
            local _, e = sock:receive(2)
            if e then
                return nil, e
            end
        end
        return data
    end
end

local function length_reader(self, sock, length)
    local remaining = length
    if remaining == 0 then
        self.body_pending = false
    end
    return function(max)
        if remaining <= 0 then
            return nil
        end
        local n = remaining
        if max and max > 0 and max < n then
            n = max
        end
        local data, err = sock:receive(n)
        if not data then
            return nil, err
        end
        remaining = remaining - n
        if remaining == 0 then
            self.body_pending = false
        end
        return data
    end
end

local function eof_reader(self, sock)
    local done = false
    return function(max)
        if done then
            return nil
        end
        local data, err
        if max and max > 0 then
            data, err = sock:receiveany(max)
            if not data and err == "closed" then
                done = true
                self.body_pending = false
                return nil
            end
            return data, err
        end
        data, err = sock:receive("*a")
        done = true
        self.body_pending = false
        if not data then
            return nil, err
        end
        return data
    end
end

local function read_body(res)
    local reader = res.body_reader
    if not reader then
        return nil, "no body to be read"
    end
    local chunks = {}
    while true do
        local chunk, err = reader()
        if err then
            return nil, err, concat(chunks)
        end
        if not chunk then
            break
        end
        chunks[#chunks + 1] = chunk
    end
    return concat(chunks)
end

local function send_body(sock, body)
    if type(body) == "function" then
        -- An iterator: sent chunked.
        while true do
            local chunk, err = body()
            if err then
                return nil, err
            end
            if chunk == nil then
                break
            end
            if #chunk > 0 then
                local ok, e = send_all(sock, { str_format("%x\r\n", #chunk), chunk, "\r\n" })
                if not ok then
                    return nil, e
                end
            end
        end
        return send_all(sock, "0\r\n\r\n")
    end
    return send_all(sock, body)
end

local function body_length(body)
    if type(body) == "string" then
        return #body
    end
    if type(body) == "table" then
        local n = 0
        local function walk(t)
            for _, v in ipairs(t) do
                if type(v) == "table" then walk(v) else n = n + #tostring(v) end
            end
        end
        walk(body)
        return n
    end
end

--- request{ version, method, path, query, headers, body } -> res | nil, err
function _M.request(self, params)
    params = params or {}
    local sock = self.sock
    local headers = params.headers or {}
    local body = params.body
    local len = body ~= nil and type(body) ~= "function" and body_length(body) or nil
    local chunked = type(body) == "function"
    local head, method, version = format_request(self, params, headers, len, chunked)
    if body ~= nil and not chunked then
        -- One write for head and body.
        head[#head + 1] = body
        body = nil
    end
    local ok, err = send_all(sock, head)
    if not ok then
        return nil, err
    end
    if chunked then
        ok, err = send_body(sock, body)
        if not ok then
            return nil, err
        end
    end
    local status, rversion, reason = read_status(sock)
    while status and status >= 100 and status < 200 and status ~= 101 do
        -- 1xx: skip its headers, read the real status.
        local h, e = read_headers(sock)
        if not h then
            return nil, e
        end
        status, rversion, reason = read_status(sock)
    end
    if not status then
        return nil, rversion
    end
    local res_headers, herr = read_headers(sock)
    if not res_headers then
        return nil, herr
    end
    local conn = res_headers["Connection"]
    conn = type(conn) == "table" and concat(conn, ",") or conn
    conn = conn and str_lower(conn) or ""
    if rversion == 1.0 then
        self.keepalive = str_find(conn, "keep-alive", 1, true) ~= nil
    else
        self.keepalive = str_find(conn, "close", 1, true) == nil
    end
    local res = {
        status = status,
        reason = reason,
        headers = res_headers,
        has_body = false,
        read_body = read_body,
        read_trailers = function() end,
    }
    local no_body = method == "HEAD" or status == 204 or status == 304
    if not no_body then
        local te = res_headers["Transfer-Encoding"]
        local cl = tonumber(type(res_headers["Content-Length"]) == "string" and res_headers["Content-Length"] or nil)
        if te and str_find(str_lower(type(te) == "table" and concat(te, ",") or te), "chunked", 1, true) then
            self.body_pending = true
            res.body_reader = chunked_reader(self, sock)
            res.has_body = true
        elseif cl then
            self.body_pending = cl > 0
            res.body_reader = length_reader(self, sock, cl)
            res.has_body = cl > 0
        else
            self.body_pending = true
            self.keepalive = false
            res.body_reader = eof_reader(self, sock)
            res.has_body = true
        end
    else
        self.body_pending = false
    end
    return res
end

function _M.request_pipeline()
    return nil, "request_pipeline is not supported by moongate's resty.http"
end

--- request_uri(uri, params) -> res (with res.body) | nil, err
function _M.request_uri(self, uri, params)
    params = params or {}
    local parsed, err = _M.parse_uri(self, uri, false)
    if not parsed then
        return nil, err
    end
    local scheme, host, port, path, query = parsed[1], parsed[2], parsed[3], parsed[4], parsed[5]
    local ok, cerr = self:connect({
        scheme = scheme,
        host = host,
        port = port,
        pool = params.pool,
        pool_size = params.pool_size,
        backlog = params.backlog,
        ssl_verify = params.ssl_verify,
        ssl_server_name = params.ssl_server_name,
    })
    if not ok then
        return nil, cerr
    end
    local req = {
        version = params.version,
        method = params.method,
        path = params.path or path,
        query = params.query or query,
        headers = params.headers,
        body = params.body,
    }
    local res, rerr = self:request(req)
    if not res then
        self:close()
        return nil, rerr
    end
    local body, berr = res:read_body()
    if not body and res.body_reader then
        self:close()
        return nil, berr
    end
    res.body = body
    if params.keepalive == false then
        self:close()
    else
        local kok, kerr = self:set_keepalive(params.keepalive_timeout, params.keepalive_pool)
        if not kok then
            ngx.log(ngx.DEBUG, "resty.http: keepalive failed: ", kerr)
        end
    end
    return res
end

--- get_client_body_reader(chunksize) -> iterator over the client's request body.
function _M.get_client_body_reader(_, chunksize)
    chunksize = chunksize or 65536
    ngx.req.read_body()
    local data = ngx.req.get_body_data()
    if not data then
        return nil, "no body"
    end
    local pos = 1
    return function()
        if pos > #data then
            return nil
        end
        local chunk = str_sub(data, pos, pos + chunksize - 1)
        pos = pos + chunksize
        return chunk
    end
end

--- parse_uri(self, uri, query_in_path?) -> { scheme, host, port, path, query } | nil, err.
-- IPv6 literals are not parsed (as lua-resty-http before 0.13 did not).
function _M.parse_uri(_, uri, query_in_path)
    if type(uri) ~= "string" then
        return nil, "bad uri: " .. tostring(uri)
    end
    local scheme, rest = uri:match("^(%a[%w+.-]*)://(.*)$")
    if not scheme then
        return nil, "bad uri: " .. uri
    end
    scheme = str_lower(scheme)
    local authority, tail = rest:match("^([^/?#]*)(.*)$")
    authority = authority:gsub("^.*@", "")
    local host, port = authority:match("^([^:]*):(%d+)$")
    if not host then
        host = authority
    end
    if host == "" then
        return nil, "bad uri: " .. uri
    end
    port = tonumber(port)
    if not port then
        port = (scheme == "https") and 443 or 80
    end
    tail = tail:gsub("#.*$", "")
    local path, query = tail:match("^([^?]*)%??(.*)$")
    if path == "" then
        path = "/"
    end
    if query_in_path == nil or query_in_path then
        if query ~= "" then
            path = path .. "?" .. query
        end
        query = ""
    end
    return { scheme, host, port, path, query }
end

return _M
