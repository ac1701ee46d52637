--- resty.core.base: the helpers lua-resty-core's modules and the libraries built on them
-- share (`new_tab`, `clear_tab`, the FFI scratch buffers, `ref_in_table`, the `FFI_*` return
-- codes), for libraries that require it (lua-resty-ldap's ASN.1 reader, APISIX's SNI router).
--
-- moongate has no nginx request struct: `get_request()` answers a table standing for the
-- current request during a request's phases and nil elsewhere (init, timers), which is what
-- callers test it for. lua-resty-core's version check against the nginx module is not made:
-- none of its C functions are here, and this module calls none.
local ffi = require("ffi")
local new_tab = require("table.new")
local clear_tab = require("table.clear")
local ceil = math.ceil
local type = type
local select = select
local pcall = pcall
local setmetatable = setmetatable

local _M = new_tab(0, 24)

_M.version = "0.1.28"
_M.new_tab = new_tab
_M.clear_tab = clear_tab

_M.FFI_OK = 0
_M.FFI_NO_REQ_CTX = -100
_M.FFI_BAD_CONTEXT = -101
_M.FFI_ERROR = -1
_M.FFI_AGAIN = -2
_M.FFI_BUSY = -3
_M.FFI_DONE = -4
_M.FFI_DECLINED = -5
_M.FFI_ABORT = -6

local c_buf_type = ffi.typeof("char[?]")
local buf_size = 4096
local buf
local size_ptr
local errmsg_ptr

--- A scratch `char[?]` of at least `size` bytes, reused across calls unless `must_alloc`.
function _M.get_string_buf(size, must_alloc)
    if size > buf_size or must_alloc then
        local b = ffi.new(c_buf_type, size)
        if not must_alloc then
            buf, buf_size = b, size
        end
        return b
    end
    if not buf then
        buf = ffi.new(c_buf_type, buf_size)
    end
    return buf
end

function _M.get_string_buf_size()
    return buf_size
end

function _M.set_string_buf_size(size)
    if size <= 0 then
        return
    end
    buf = nil
    buf_size = ceil(size)
end

function _M.get_size_ptr()
    if not size_ptr then
        size_ptr = ffi.new("size_t[1]")
    end
    return size_ptr
end

function _M.get_errmsg_ptr()
    if not errmsg_ptr then
        errmsg_ptr = ffi.new("char *[1]")
    end
    return errmsg_ptr
end

--- `tb[key]`, made a new table first when it is not one.
function _M.ref_in_table(tb, key)
    if key == nil then
        return nil
    end
    local t = tb[key]
    if type(t) ~= "table" then
        t = new_tab(0, 4)
        tb[key] = t
    end
    return t
end

--- True when this runtime is one of the named nginx subsystems (moongate serves `http`).
function _M.allows_subsystem(...)
    for i = 1, select("#", ...) do
        if select(i, ...) == "http" then
            return true
        end
    end
    return false
end

local no_request = { init = true, init_worker = true, timer = true }
local request = setmetatable({}, { __tostring = function() return "request" end })

function _M.get_request()
    local ok, phase = pcall(ngx.get_phase)
    if not ok or no_request[phase] then
        return nil
    end
    return request
end

return _M
