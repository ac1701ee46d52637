-- `require("pl.path")`: Penlight's path functions (POSIX flavour) over `lfs`, with Penlight's
-- names, results and messages: the lfs wrappers answer `nil, "NAME failed for 'P': REASON
-- (code N)", N`; the string functions only look at the text (no file system access).
-- APISIX's aws-lambda (`normpath`), loggly (`join`) and its core modules use it.
local lfs = require("lfs")

local type = type
local select = select
local error = error
local tostring = tostring
local str_sub = string.sub
local str_byte = string.byte
local str_format = string.format
local tab_insert = table.insert
local tab_remove = table.remove
local tab_concat = table.concat

local attrib = lfs.attributes
local link_attrib = lfs.symlinkattributes
local currentdir = lfs.currentdir

local SLASH = 47 -- "/"
local DOT = 46 -- "."

local _M = {
    is_windows = false,
    sep = "/",
    dirsep = ":",
}

local function assert_string(n, v)
    if type(v) ~= "string" then
        error(str_format("argument %d expected a 'string', got a '%s'", n, type(v)), 3)
    end
end

local function failed(name, param, err, code)
    local msg = tostring(name) .. " failed"
    if param ~= nil then
        msg = msg .. " for '" .. tostring(param) .. "'"
    end
    msg = msg .. ": " .. tostring(err)
    if code ~= nil then
        msg = msg .. " (code " .. tostring(code) .. ")"
    end
    return msg
end

-- Wraps an lfs call so that a failure names the call and its argument.
local function wrapped(name, f)
    return function(p, ...)
        local ok, err, code = f(p, ...)
        if not ok then
            return ok, failed(name, p, err, code), code
        end
        return ok, err, code
    end
end

_M.dir = lfs.dir
_M.mkdir = wrapped("mkdir", lfs.mkdir)
_M.rmdir = wrapped("rmdir", lfs.rmdir)
_M.attrib = wrapped("attrib", attrib)
_M.link_attrib = wrapped("link_attrib", link_attrib)
_M.chdir = wrapped("chdir", lfs.chdir)
_M.rename = os.rename

function _M.currentdir()
    local ok, err, code = currentdir()
    if not ok then
        return ok, failed("currentdir", nil, err, code), code
    end
    return ok, err, code
end

function _M.isdir(p)
    assert_string(1, p)
    return attrib(p, "mode") == "directory"
end

function _M.isfile(p)
    assert_string(1, p)
    return attrib(p, "mode") == "file"
end

function _M.islink(p)
    assert_string(1, p)
    return link_attrib(p, "mode") == "link"
end

function _M.getsize(p)
    assert_string(1, p)
    return attrib(p, "size")
end

-- The path itself when something is there, else false.
function _M.exists(p)
    assert_string(1, p)
    return attrib(p, "mode") ~= nil and p
end

function _M.getatime(p)
    assert_string(1, p)
    return attrib(p, "access")
end

function _M.getmtime(p)
    assert_string(1, p)
    return attrib(p, "modification")
end

function _M.getctime(p)
    assert_string(1, p)
    return _M.attrib(p, "change")
end

-- The folder part (without the last slash) and the name after the last slash.
function _M.splitpath(p)
    assert_string(1, p)
    local i = #p
    while i > 0 and str_byte(p, i) ~= SLASH do
        i = i - 1
    end
    if i == 0 then
        return "", p
    end
    return str_sub(p, 1, i - 1), str_sub(p, i + 1)
end

-- The path up to its last dot and the extension from that dot; a dot before the last slash
-- is not an extension.
function _M.splitext(p)
    assert_string(1, p)
    local i = #p
    while i > 0 do
        local c = str_byte(p, i)
        if c == DOT then
            return str_sub(p, 1, i - 1), str_sub(p, i)
        end
        if c == SLASH then
            break
        end
        i = i - 1
    end
    return p, ""
end

function _M.dirname(p)
    assert_string(1, p)
    return (_M.splitpath(p))
end

function _M.basename(p)
    assert_string(1, p)
    local _, name = _M.splitpath(p)
    return name
end

function _M.extension(p)
    assert_string(1, p)
    local _, ext = _M.splitext(p)
    return ext
end

function _M.isabs(p)
    assert_string(1, p)
    return str_byte(p, 1) == SLASH
end

-- Joins with one slash between the parts; an absolute part starts over from itself.
function _M.join(p1, p2, ...)
    assert_string(1, p1)
    assert_string(2, p2)
    local n = select("#", ...)
    if n > 0 then
        local p = _M.join(p1, p2)
        for i = 1, n do
            local part = select(i, ...)
            assert_string(i, part)
            p = _M.join(p, part)
        end
        return p
    end
    if _M.isabs(p2) then
        return p2
    end
    if p1 ~= "" and str_byte(p1, #p1) ~= SLASH then
        p1 = p1 .. "/"
    end
    return p1 .. p2
end

function _M.normcase(p)
    assert_string(1, p)
    return p
end

-- Drops empty and `.` parts and folds `x/..`; keeps a leading `//` (POSIX leaves its
-- meaning to the system) but not `///`; a path that folds to nothing is `.`.
function _M.normpath(p)
    assert_string(1, p)
    local anchor = ""
    if str_sub(p, 1, 2) == "//" and str_sub(p, 3, 3) ~= "/" then
        anchor = "//"
        p = str_sub(p, 3)
    elseif str_byte(p, 1) == SLASH then
        anchor = "/"
        p = p:match("^/*(.*)$")
    end
    local parts = {}
    for part in p:gmatch("[^/]+") do
        if part == ".." then
            if #parts > 0 and parts[#parts] ~= ".." then
                tab_remove(parts)
            else
                tab_insert(parts, part)
            end
        elseif part ~= "." then
            tab_insert(parts, part)
        end
    end
    p = anchor .. tab_concat(parts, "/")
    if p == "" then
        return "."
    end
    return p
end

function _M.abspath(p, pwd)
    assert_string(1, p)
    if pwd ~= nil then
        assert_string(2, pwd)
    end
    if pwd == nil and not currentdir() then
        return p
    end
    p = p:gsub("/$", "")
    pwd = pwd or currentdir()
    if not _M.isabs(p) then
        p = _M.join(pwd, p)
    end
    return _M.normpath(p)
end

local function split_slashes(s)
    local out = {}
    for part in s:gmatch("[^/]+") do
        out[#out + 1] = part
    end
    return out
end

-- `p` relative to `start` (default: the current folder).
function _M.relpath(p, start)
    assert_string(1, p)
    if start ~= nil then
        assert_string(2, start)
    end
    p = _M.abspath(p, start)
    start = start or currentdir()
    local s, t = split_slashes(start), split_slashes(p)
    local n = #s < #t and #s or #t
    local k = n + 1
    for i = 1, n do
        if s[i] ~= t[i] then
            k = i
            break
        end
    end
    local rel = {}
    for i = 1, #s - k + 1 do
        rel[i] = ".."
    end
    for i = k, #t do
        rel[#rel + 1] = t[i]
    end
    return tab_concat(rel, "/")
end

function _M.expanduser(p)
    assert_string(1, p)
    if str_sub(p, 1, 1) == "~" then
        return (os.getenv("HOME") or "") .. str_sub(p, 2)
    end
    return p
end

function _M.tmpname()
    return os.tmpname()
end

-- The longest folder both paths start with.
function _M.common_prefix(path1, path2)
    assert_string(1, path1)
    assert_string(2, path2)
    if #path1 > #path2 then
        path1, path2 = path2, path1
    end
    for i = 1, #path1 do
        if str_byte(path1, i) ~= str_byte(path2, i) then
            local cp = str_sub(path1, 1, i - 1)
            if str_byte(path1, i - 1) ~= SLASH then
                cp = _M.dirname(cp)
            end
            return cp
        end
    end
    if str_byte(path2, #path1 + 1) ~= SLASH then
        path1 = _M.dirname(path1)
    end
    return path1
end

-- Where `require(mod)` would load from: the file and true for a Lua module, false for a C one.
function _M.package_path(mod)
    assert_string(1, mod)
    local res, err1 = package.searchpath(mod, package.path)
    if res then
        return res, true
    end
    local err2
    res, err2 = package.searchpath(mod, package.cpath)
    if res then
        return res, false
    end
    return nil, "cannot find module on path\n" .. err1 .. "\n" .. err2
end

return _M
