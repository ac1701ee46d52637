--- apisix.timers: APISIX's background timers. Plugins register a callback by name and it runs
-- once a second until unregistered. A callback registered as privileged runs in one worker of
-- the process (moongate has no privileged agent process: worker 0 stands in for it), the
-- others in every worker. A failing callback is logged and does not stop the others.
local core = require("apisix.core")
local pairs = pairs
local pcall = pcall

local check_interval = 1
local timers = {}
local started = false

local _M = {}

local function run_all(premature)
    if premature then
        return
    end
    for name, f in pairs(timers) do
        local ok, err = pcall(f)
        if not ok then
            core.log.error("timer [", name, "] failed: ", err)
        end
    end
end

local function privileged_here()
    return ngx.worker.id() == 0
end

local function start()
    if started then
        return
    end
    local ok, err = ngx.timer.every(check_interval, run_all)
    if not ok then
        core.log.error("failed to create the background timer: ", err)
        return
    end
    started = true
end

function _M.init_worker()
    start()
end

function _M.register_timer(name, f, privileged)
    if privileged and not privileged_here() then
        return
    end
    timers[name] = f
    start()
end

function _M.unregister_timer(name, privileged)
    if privileged and not privileged_here() then
        return
    end
    timers[name] = nil
end

function _M.check_interval()
    return check_interval
end

return _M
