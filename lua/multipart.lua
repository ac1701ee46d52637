--- multipart: the `multipart/form-data` parser and builder APISIX's body-transformer and
-- core.request require (the `multipart` rock's API, written for moongate):
--   local m = multipart(body, content_type)
--   m:get(name) -> { name, value, headers = { "Content-Disposition: ...", ... } } | nil
--   m:get_all() -> { name = value } (the last part of a name wins)
--   m:get_all_with_arrays() -> { name = value | { value, ... } }
--   m:get_as_array(name) -> { value, ... };  m:get_all_as_arrays() -> { name = { ... } }
--   m:set_simple(name, value, filename?, content_type?);  m:delete(name);  m:tostring()
-- A body that is not multipart (no boundary) gives an object with no parts.
local type = type
local ipairs = ipairs
local setmetatable = setmetatable
local concat = table.concat
local insert = table.insert
local remove = table.remove
local find = string.find
local sub = string.sub
local match = string.match
local lower = string.lower
local format = string.format

local MultipartData = {}
MultipartData.__index = MultipartData

local function boundary_of(content_type)
    if type(content_type) ~= "string" then
        return nil
    end
    local b = match(content_type, '[Bb][Oo][Uu][Nn][Dd][Aa][Rr][Yy]="([^"]+)"')
        or match(content_type, "[Bb][Oo][Uu][Nn][Dd][Aa][Rr][Yy]=([^;%s]+)")
    return b
end

local function disposition_param(line, key)
    return match(line, ";%s*" .. key .. '="([^"]*)"') or match(line, ";%s*" .. key .. "=([^;%s]+)")
end

-- One part's text (headers, blank line, value) as a part table, or nil.
local function parse_part(text)
    local head_end = find(text, "\r\n\r\n", 1, true)
    local head, value
    if head_end then
        head, value = sub(text, 1, head_end - 1), sub(text, head_end + 4)
    else
        head, value = text, ""
    end
    local part = { headers = {}, value = value }
    for line in head:gmatch("[^\r\n]+") do
        part.headers[#part.headers + 1] = line
        local name, rest = match(line, "^([^:]+):%s*(.*)$")
        if name and lower(name) == "content-disposition" then
            part.name = disposition_param(rest, "name")
            part.filename = disposition_param(rest, "filename")
        end
    end
    if not part.name then
        return nil
    end
    return part
end

local function parse(body, boundary)
    local parts = {}
    if not boundary or type(body) ~= "string" then
        return parts
    end
    local delim = "--" .. boundary
    local pos = find(body, delim, 1, true)
    while pos do
        local start = pos + #delim
        if sub(body, start, start + 1) == "--" then
            break -- the closing delimiter
        end
        -- the delimiter line ends with CRLF (or LF)
        local line_end = find(body, "\n", start, true)
        if not line_end then
            break
        end
        local next_pos = find(body, "\r\n" .. delim, line_end + 1, true)
        local stop
        if next_pos then
            stop = next_pos - 1
            next_pos = next_pos + 2
        else
            next_pos = find(body, "\n" .. delim, line_end + 1, true)
            if not next_pos then
                break
            end
            stop = next_pos - 1
            next_pos = next_pos + 1
        end
        local part = parse_part(sub(body, line_end + 1, stop))
        if part then
            parts[#parts + 1] = part
        end
        pos = next_pos
    end
    return parts
end

--- Parses `body` with the boundary of `content_type`.
local function new(body, content_type)
    local boundary = boundary_of(content_type)
    return setmetatable({ _boundary = boundary or "moongate-boundary", _parts = parse(body, boundary) },
        MultipartData)
end

function MultipartData:get(name)
    local found
    for _, p in ipairs(self._parts) do
        if p.name == name then
            found = p
        end
    end
    return found
end

function MultipartData:get_as_array(name)
    local out = {}
    for _, p in ipairs(self._parts) do
        if p.name == name then
            out[#out + 1] = p.value
        end
    end
    return out
end

function MultipartData:get_all()
    local out = {}
    for _, p in ipairs(self._parts) do
        out[p.name] = p.value
    end
    return out
end

function MultipartData:get_all_as_arrays()
    local out = {}
    for _, p in ipairs(self._parts) do
        local list = out[p.name]
        if not list then
            list = {}
            out[p.name] = list
        end
        list[#list + 1] = p.value
    end
    return out
end

function MultipartData:get_all_with_arrays()
    local out, many = {}, {}
    for _, p in ipairs(self._parts) do
        local old = out[p.name]
        if old == nil then
            out[p.name] = p.value
        elseif many[p.name] then
            insert(old, p.value)
        else
            out[p.name] = { old, p.value }
            many[p.name] = true
        end
    end
    return out
end

--- Sets a part to a plain value (replacing every part of that name, where the first was).
function MultipartData:set_simple(name, value, filename, content_type)
    local disposition = format('Content-Disposition: form-data; name="%s"', name)
    if filename then
        disposition = disposition .. format('; filename="%s"', filename)
    end
    local part = { name = name, filename = filename, value = value, headers = { disposition } }
    if content_type then
        part.headers[2] = "Content-Type: " .. content_type
    end
    local at
    for i = #self._parts, 1, -1 do
        if self._parts[i].name == name then
            remove(self._parts, i)
            at = i
        end
    end
    insert(self._parts, at or #self._parts + 1, part)
end

function MultipartData:delete(name)
    for i = #self._parts, 1, -1 do
        if self._parts[i].name == name then
            remove(self._parts, i)
        end
    end
end

--- The parts as a multipart body with the same boundary.
function MultipartData:tostring()
    local out = {}
    for _, p in ipairs(self._parts) do
        out[#out + 1] = "--" .. self._boundary .. "\r\n" .. concat(p.headers, "\r\n")
            .. "\r\n\r\n" .. p.value .. "\r\n"
    end
    out[#out + 1] = "--" .. self._boundary .. "--\r\n"
    return concat(out)
end

return setmetatable({ new = new }, { __call = function(_, body, content_type)
    return new(body, content_type)
end })
