--- `require("apisix.events")`: APISIX's worker-event API (`event_list`, `register`, `post`).
--- APISIX broadcasts a post to every nginx worker through lua-resty-events; here a post
--- reaches the handlers registered in the worker (Lua VM) that posts it, which is where
--- APISIX's plugins both register and post (ext-plugin's `runner_exit`). Handlers are called
--- as lua-resty-events calls them: `handler(data, event, source, pid)`.
local error, tostring, pairs, select, setmetatable, pcall = error, tostring, pairs, select,
    setmetatable, pcall
local core = require("apisix.core")

local _M = { inited = false }

-- handlers[source][event] = { handler, ... }; a source-wide handler sits under event `*`.
local handlers = {}

function _M.init_worker()
    _M.inited = true
end

function _M.event_list(_, source, ...)
    local events = { _source = source }
    for i = 1, select("#", ...) do
        local e = select(i, ...)
        events[e] = e
    end
    return setmetatable(events, {
        __index = function(_, key)
            error("event '" .. tostring(key) .. "' is an unknown event", 2)
        end,
    })
end

-- `register(handler, source, event1, event2, ...)`; no event names: every event of source.
function _M.register(_, handler, source, ...)
    local by_event = handlers[source]
    if not by_event then
        by_event = {}
        handlers[source] = by_event
    end
    local n = select("#", ...)
    if n == 0 then
        by_event["*"] = by_event["*"] or {}
        by_event["*"][#by_event["*"] + 1] = handler
        return
    end
    for i = 1, n do
        local e = select(i, ...)
        by_event[e] = by_event[e] or {}
        by_event[e][#by_event[e] + 1] = handler
    end
end

local function run(list, data, event, source)
    if not list then
        return
    end
    for _, h in pairs(list) do
        local ok, err = pcall(h, data, event, source, ngx.worker.pid())
        if not ok then
            core.log.error("worker event handler for ", source, " ", event, " failed: ", err)
        end
    end
end

-- `post(source, event, data)`: true once the handlers ran.
function _M.post(_, source, event, data)
    local by_event = handlers[source]
    if by_event then
        run(by_event[event], data, event, source)
        run(by_event["*"], data, event, source)
    end
    return true
end

return _M
