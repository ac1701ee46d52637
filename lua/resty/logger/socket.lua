-- `require("resty.logger.socket")`: lua-resty-logger-socket's API (the 2.x line APISIX
-- installs, with loggers made by `new`), written for moongate over its cosockets. APISIX's
-- syslog plugin uses it.
--
-- A logger buffers messages and sends them to a TCP, UDP or unix-socket log server in a
-- timer: `log(msg)` keeps a message while the buffer stays under `flush_limit`, starts a
-- flush when it reaches it, and drops a message that would pass `drop_limit` (answering 0
-- bytes); a failed connect or send is retried `max_retry_times` times, `retry_interval` ms
-- apart, and the last error is handed back by the next `log`. `periodic_flush` (seconds)
-- flushes what is left on a timer. Options, defaults and messages are the library's
-- (`"host"/"port" or "path" is required`, `"flush_limit" should be < "drop_limit"`, ...).
-- `tls` is taken as `ssl` (APISIX's syslog passes `tls`).
local tcp = ngx.socket.tcp
local udp = ngx.socket.udp
local timer_at = ngx.timer.at
local sleep = ngx.sleep
local type = type
local pairs = pairs
local tostring = tostring
local setmetatable = setmetatable
local concat = table.concat

local MAX_PORT = 65535

local _M = { _VERSION = "0.03" }
local methods = {}
local mt = { __index = methods }

-- The module-level logger of the 1.x API (`init`, `log`, `flush`, `initted` on the module).
local default_logger

local function connect(self)
    local sock, err
    if self.sock_type == "udp" then
        sock, err = udp()
    else
        sock, err = tcp()
    end
    if not sock then
        return nil, err
    end
    sock:settimeout(self.timeout)
    local ok
    if self.host and self.port then
        if self.sock_type == "udp" then
            ok, err = sock:setpeername(self.host, self.port)
        else
            ok, err = sock:connect(self.host, self.port)
        end
    else
        ok, err = sock:connect("unix:" .. self.path)
    end
    if not ok then
        return nil, err
    end
    if self.ssl and self.sock_type ~= "udp" then
        local session
        session, err = sock:sslhandshake(self.ssl_session, self.sni_host or self.host,
                                         self.ssl_verify)
        if not session then
            return nil, err
        end
        self.ssl_session = session
    end
    return sock
end

local function connect_with_retries(self)
    if self.connecting then
        return nil, "previous connection not finished"
    end
    self.connecting = true
    local sock, err
    for _ = 0, self.max_retry_times do
        sock, err = connect(self)
        if sock then
            break
        end
        if not self.exiting then
            sleep(self.retry_interval / 1000)
        end
    end
    self.connecting = false
    if not sock then
        return nil, "try to connect to the log server failed after "
                    .. self.max_retry_times .. " retries: " .. tostring(err)
    end
    return sock
end

local function send_once(self)
    local sock, err = connect_with_retries(self)
    if not sock then
        return nil, err
    end
    local bytes
    bytes, err = sock:send(self.send_buffer)
    if not bytes then
        return nil, err
    end
    if self.sock_type ~= "udp" then
        local ok
        ok, err = sock:setkeepalive(0, self.pool_size)
        if not ok then
            return nil, err
        end
    else
        sock:close()
    end
    return bytes
end

-- Moves the buffered messages to the send buffer and sends it, with retries. Signature of a
-- timer callback (`premature, logger`); `logger:flush()` works too.
local function flush(premature, self)
    if self == nil then
        self = premature
    end
    if self.flushing then
        return true
    end
    if self.buffer_size <= 0 then
        return true
    end
    self.flushing = true
    local bytes, err
    for _ = 0, self.max_retry_times do
        if self.log_index > 0 then
            self.send_buffer = self.send_buffer .. concat(self.log_buffer, "", 1, self.log_index)
            self.log_index = 0
        end
        bytes, err = send_once(self)
        if bytes then
            break
        end
        if not self.exiting then
            sleep(self.retry_interval / 1000)
        end
    end
    self.flushing = false
    if not bytes then
        local msg = "try to send log messages to the log server failed after "
                    .. self.max_retry_times .. " retries: " .. tostring(err)
        self.last_error = msg
        return nil, msg
    end
    self.buffer_size = self.buffer_size - #self.send_buffer
    self.send_buffer = ""
    return bytes
end

local function flush_soon(self)
    self.need_periodic_flush = false
    local ok, err = timer_at(0, flush, self)
    if not ok then
        self.last_error = err
    end
end

local function periodic(premature, self)
    if premature then
        self.exiting = true
    end
    if self.need_periodic_flush or self.exiting then
        flush(nil, self)
    else
        self.need_periodic_flush = true
    end
    if not premature then
        timer_at(self.periodic_flush, periodic, self)
    end
end

local function fresh()
    return setmetatable({
        flush_limit = 4096,
        drop_limit = 1048576,
        timeout = 1000,
        ssl = false,
        ssl_verify = true,
        sock_type = "tcp",
        max_retry_times = 3,
        retry_interval = 100,
        pool_size = 10,
        max_buffer_reuse = 10000,
        buffer_size = 0,
        send_buffer = "",
        log_buffer = {},
        log_index = 0,
    }, mt)
end

local function number_opt(v, name)
    if type(v) ~= "number" or v < 0 then
        return nil, 'invalid "' .. name .. '"'
    end
    return v
end

local NUMBERS = {
    flush_limit = true, drop_limit = true, timeout = true, max_retry_times = true,
    retry_interval = true, pool_size = true, max_buffer_reuse = true, periodic_flush = true,
}

function methods.init(self, conf)
    if type(conf) ~= "table" then
        return nil, "user_config must be a table"
    end
    for k, v in pairs(conf) do
        if k == "host" or k == "path" or k == "sni_host" then
            if type(v) ~= "string" then
                return nil, '"' .. k .. '" must be a string'
            end
            self[k] = v
        elseif k == "port" then
            if type(v) ~= "number" then
                return nil, '"port" must be a number'
            end
            if v < 0 or v > MAX_PORT then
                return nil, ('"port" out of range 0~%s'):format(MAX_PORT)
            end
            self.port = v
        elseif k == "sock_type" then
            if type(v) ~= "string" then
                return nil, '"sock_type" must be a string'
            end
            if v ~= "tcp" and v ~= "udp" then
                return nil, '"sock_type" must be "tcp" or "udp"'
            end
            self.sock_type = v
        elseif NUMBERS[k] then
            local n, err = number_opt(v, k)
            if not n then
                return nil, err
            end
            self[k] = n
        elseif k == "ssl" or k == "tls" or k == "ssl_verify" then
            if type(v) ~= "boolean" then
                return nil, '"' .. k .. '" must be a boolean value'
            end
            self[k == "tls" and "ssl" or k] = v
        end
    end
    if not (self.host and self.port) and not self.path then
        return nil, 'no logging server configured. "host"/"port" or "path" is required.'
    end
    if self.flush_limit >= self.drop_limit then
        return nil, '"flush_limit" should be < "drop_limit"'
    end
    self.flushing = false
    self.exiting = false
    self.connecting = false
    self.logger_initted = true
    if self.periodic_flush then
        self.need_periodic_flush = true
        timer_at(self.periodic_flush, periodic, self)
    end
    return true
end

function methods.log(self, msg)
    if not self.logger_initted then
        return nil, "not initialized"
    end
    if type(msg) ~= "string" then
        msg = tostring(msg)
    end
    local len = #msg
    local bytes
    if ngx.worker.exiting() then
        self.exiting = true
        self.log_index = self.log_index + 1
        self.log_buffer[self.log_index] = msg
        self.buffer_size = self.buffer_size + len
        flush_soon(self)
        bytes = 0
    elseif len + self.buffer_size < self.flush_limit then
        self.log_index = self.log_index + 1
        self.log_buffer[self.log_index] = msg
        self.buffer_size = self.buffer_size + len
        bytes = len
    elseif len + self.buffer_size <= self.drop_limit then
        self.log_index = self.log_index + 1
        self.log_buffer[self.log_index] = msg
        self.buffer_size = self.buffer_size + len
        flush_soon(self)
        bytes = len
    else
        -- It does not fit: dropped, and what is buffered goes out.
        flush_soon(self)
        bytes = 0
    end
    if self.last_error then
        local err = self.last_error
        self.last_error = nil
        return bytes, err
    end
    return bytes
end

methods.flush = flush

function methods.initted(self)
    return self.logger_initted == true
end

-- `socket:new(conf)` (2.x): a logger of its own; with a conf it is initialised at once.
function _M.new(_, conf)
    local logger = fresh()
    if conf then
        local ok, err = logger:init(conf)
        if not ok then
            return nil, err
        end
    end
    default_logger = logger
    return logger
end

function _M.init(conf)
    default_logger = fresh()
    return default_logger:init(conf)
end

function _M.log(msg)
    if not default_logger then
        return nil, "not initialized"
    end
    return default_logger:log(msg)
end

function _M.flush()
    if not default_logger then
        default_logger = fresh()
    end
    return flush(nil, default_logger)
end

function _M.initted()
    return default_logger ~= nil and default_logger.logger_initted == true
end

return _M
