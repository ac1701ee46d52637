-- `require("resty.jit-uuid")`: random (version 4) UUIDs, as lua-resty-jit-uuid makes them:
-- seed(), generate_v4() (also the module called as a function), is_valid(s).
local random = math.random
local str_format = string.format
local str_find = string.find

local _M = { _VERSION = "0.0.7" }

function _M.seed(s)
    math.randomseed(s or (ngx.now() * 1000 + (ngx.worker.pid() or 0)))
end

function _M.generate_v4()
    return str_format("%08x-%04x-4%03x-%x%03x-%012x",
        random(0, 0xffffffff), random(0, 0xffff), random(0, 0xfff),
        random(8, 11), random(0, 0xfff), random(0, 0xffffffffffff))
end

function _M.is_valid(s)
    return type(s) == "string" and str_find(s,
        "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$") ~= nil
end

return setmetatable(_M, { __call = function() return _M.generate_v4() end })
