--
-- example-batch-logger: sends one JSON line per request to an HTTP collector, in batches.
-- Shows the pattern APISIX's loggers (http-logger and friends) use: the log phase only
-- records an entry in a per-worker buffer, and a timer (`ngx.timer.at`) does the sending,
-- because the log phase may not use cosockets (as in OpenResty: `API disabled in the context
-- of log_by_lua*`).
--
--   plugins:
--     example-batch-logger:
--       endpoint: http://logs.internal:9000/ingest
--       batch_max_size: 100       # a batch is sent as soon as this many entries wait...
--       inactive_timeout: 5       # ...or this many seconds after the first of them came
--       max_buffered: 10000       # at most this many wait while the collector is down;
--                                 # past it the oldest are dropped (and counted in a warning)
--       max_retry_count: 3        # attempts after a failed send, retry_delay seconds apart
--
-- Each batch is one POST with `Content-Type: application/x-ndjson`, a body of lines like
--   {"time":1764800000.123,"route_id":"r1","client_ip":"127.0.0.1","method":"GET",
--    "uri":"/a?b=1","host":"example.com","status":200,"upstream_status":"200",
--    "latency_ms":1.234}
-- Any 2xx answer means the batch was delivered.
--
-- Buffers are per worker and per endpoint: routes that log to the same endpoint share one
-- (the settings of the conf that logged last apply). A batch that still fails after its
-- retries goes back into the buffer and is tried again `inactive_timeout` later, so nothing
-- is lost while the collector is down for a while, except what does not fit in
-- `max_buffered`. At shutdown the pending timer runs at once and makes one last attempt.
--
-- Copy this file as a starting point for your own plugin; see docs/plugin-guide.md.
--
local core = require("apisix.core")
local http = require("resty.http")

local ngx = ngx
local ngx_now = ngx.now
local tab_concat = table.concat

local plugin_name = "example-batch-logger"

local schema = {
    type = "object",
    properties = {
        endpoint = { type = "string", pattern = [[^https?://]] },
        batch_max_size = { type = "integer", minimum = 1, default = 100 },
        -- Seconds; fractions are allowed.
        inactive_timeout = { type = "number", exclusiveMinimum = 0, default = 5 },
        max_buffered = { type = "integer", minimum = 1, default = 10000 },
        max_retry_count = { type = "integer", minimum = 0, default = 3 },
        retry_delay = { type = "number", minimum = 0, default = 1 },
        -- Milliseconds for each of connect, send and read.
        timeout = { type = "integer", minimum = 1, default = 3000 },
    },
    required = { "endpoint" },
}

local _M = {
    version = 0.1,
    priority = 15,
    name = plugin_name,
    schema = schema,
}

function _M.check_schema(conf)
    return core.schema.check(schema, conf)
end

-- endpoint -> buffer. A buffer is a queue of encoded lines, entries[first .. last], plus the
-- state of its timer. Module-level, so each worker VM has its own.
local buffers = {}

local function new_buffer(endpoint)
    return {
        endpoint = endpoint,
        entries = {},
        first = 1,
        last = 0,
        in_flight = 0,     -- lines taken out for the send under way
        dropped = 0,       -- dropped since the last warning
        running = false,   -- a flush is sending
        timer_seq = 0,     -- the timer whose number this is is the live one
        timer_due = nil,   -- when the live timer fires (nil: none pending)
    }
end

local function queued(buf)
    return buf.last - buf.first + 1
end

local function drop_oldest(buf)
    buf.entries[buf.first] = nil
    buf.first = buf.first + 1
    buf.dropped = buf.dropped + 1
end

-- Takes up to n lines off the front of the queue.
local function take(buf, n)
    local batch = {}
    for i = 1, math.min(n, queued(buf)) do
        local at = buf.first
        batch[i] = buf.entries[at]
        buf.entries[at] = nil
        buf.first = at + 1
    end
    return batch
end

-- Puts a batch that could not be sent back at the front, then trims the oldest lines to
-- the bound: the newer entries win.
local function put_back(buf, batch, max_buffered)
    for i = #batch, 1, -1 do
        buf.first = buf.first - 1
        buf.entries[buf.first] = batch[i]
    end
    while queued(buf) > max_buffered do
        drop_oldest(buf)
    end
end

local function post(conf, batch)
    local httpc = http.new()
    httpc:set_timeouts(conf.timeout, conf.timeout, conf.timeout)
    local res, err = httpc:request_uri(conf.endpoint, {
        method = "POST",
        -- One JSON object per line, each line ended by "\n".
        body = tab_concat(batch, "\n") .. "\n",
        headers = { ["Content-Type"] = "application/x-ndjson" },
    })
    if not res then
        return nil, err
    end
    if res.status < 200 or res.status > 299 then
        return nil, "status " .. res.status
    end
    return true
end

local schedule

-- The timer's function: sends what is buffered, in batches of at most batch_max_size. It
-- keeps sending while full batches wait; a partial batch that is left waits for the next
-- timer. `premature` is true at shutdown: one attempt per batch then, no retry delays.
local function flush(premature, buf, seq)
    if seq ~= buf.timer_seq or buf.running then
        return      -- a later schedule() replaced this timer, or a flush is under way
    end
    buf.timer_due = nil
    buf.running = true
    local conf = buf.conf
    local first_batch = true
    while queued(buf) > 0 and (first_batch or premature or queued(buf) >= conf.batch_max_size) do
        first_batch = false
        local batch = take(buf, conf.batch_max_size)
        buf.in_flight = #batch
        local ok, err = post(conf, batch)
        local retries = 0
        while not ok and not premature and retries < conf.max_retry_count do
            retries = retries + 1
            ngx.sleep(conf.retry_delay)
            ok, err = post(conf, batch)
        end
        buf.in_flight = 0
        if not ok then
            core.log.error("cannot send ", #batch, " log entries to ", buf.endpoint, " after ",
                           retries + 1, " attempts: ", err, "; keeping them for the next try")
            put_back(buf, batch, conf.max_buffered)
            break
        end
    end
    if buf.dropped > 0 then
        core.log.warn("dropped ", buf.dropped, " log entries for ", buf.endpoint,
                      ": more than max_buffered (", conf.max_buffered, ") were waiting")
        buf.dropped = 0
    end
    buf.running = false
    if queued(buf) > 0 and not premature then
        schedule(buf, queued(buf) >= conf.batch_max_size and 0 or conf.inactive_timeout)
    end
end

-- Makes sure a timer fires within `delay` seconds. One timer is live per buffer; asking for
-- an earlier one replaces it (the old one finds its number stale and does nothing).
schedule = function(buf, delay)
    if buf.running then
        return      -- the running flush schedules what it leaves behind
    end
    local due = ngx_now() + delay
    if buf.timer_due and buf.timer_due <= due then
        return
    end
    local seq = buf.timer_seq + 1
    local ok, err = ngx.timer.at(delay, flush, buf, seq)
    if not ok then
        core.log.error("cannot start the log timer: ", err)
        return
    end
    buf.timer_seq = seq
    buf.timer_due = due
end

function _M.log(conf, ctx)
    local var = ctx.var
    -- Copy what the entry needs now: ctx is reused by a later request once this one ends.
    local line = core.json.encode({
        time = ngx.req.start_time(),
        route_id = var.route_id,
        client_ip = var.remote_addr,
        method = var.request_method,
        uri = var.request_uri,
        host = var.host,
        status = tonumber(var.status),
        upstream_status = var.upstream_status,
        latency_ms = (ngx_now() - ngx.req.start_time()) * 1000,
    })

    local buf = buffers[conf.endpoint]
    if not buf then
        buf = new_buffer(conf.endpoint)
        buffers[conf.endpoint] = buf
    end
    buf.conf = conf

    -- The bound counts the batch being sent too; the oldest waiting entry makes room.
    while queued(buf) > 0 and queued(buf) + buf.in_flight >= conf.max_buffered do
        drop_oldest(buf)
    end
    if queued(buf) + buf.in_flight >= conf.max_buffered then
        buf.dropped = buf.dropped + 1    -- the batch in flight alone fills the buffer
    else
        buf.last = buf.last + 1
        buf.entries[buf.last] = line
    end

    schedule(buf, queued(buf) >= conf.batch_max_size and 0 or conf.inactive_timeout)
end

return _M
