-- wrk script for `bench/run.py --mode routes`: cycles through the requests listed in a file,
-- one "HOST PATH" line each (the script's first argument), so the load is spread over every
-- route. The requests are formatted once, in init.
local reqs = {}
local i = 0

function init(args)
    for line in io.lines(args[1]) do
        local host, path = line:match("^(%S+) (%S+)$")
        if host then
            reqs[#reqs + 1] = wrk.format("GET", path, { Host = host })
        end
    end
    -- Each wrk thread starts at its own place in the list.
    i = math.random(#reqs) - 1
end

function request()
    i = i % #reqs + 1
    return reqs[i]
end
