--- core.response: answer the client or change the response (APISIX's API over `ngx.*`).
local encode_json = require("cjson.safe").encode
local ngx = ngx
local type = type
local select = select
local pairs = pairs
local error = error
local tonumber = tonumber
local concat = table.concat
local str_sub = string.sub

local _M = { version = 0.1 }

-- Writes the body parts (tables as JSON + "\n", as APISIX does) and, with a code, sets the
-- status and ends the request.
local function resp_exit(code, ...)
    local parts = {}
    local idx = 0
    if code and type(code) ~= "number" then
        idx = 1
        parts[1] = code
        code = nil
    end
    if code then
        ngx.status = code
    end
    for i = 1, select("#", ...) do
        local v = select(i, ...)
        if type(v) == "table" then
            local body, err = encode_json(v)
            if not body then
                error("failed to encode data: " .. tostring(err), 2)
            end
            parts[idx + 1] = body
            parts[idx + 2] = "\n"
            idx = idx + 2
        elseif v ~= nil then
            idx = idx + 1
            parts[idx] = tostring(v)
        end
    end
    if idx > 0 then
        ngx.print(concat(parts, "", 1, idx))
    end
    if code then
        local nctx = ngx.ctx
        local ctx = nctx and nctx.api_ctx
        if ctx and not ctx._resp_source then
            ctx._resp_source = "apisix"
        end
        return ngx.exit(code)
    end
end

--- `exit(code, body...)`: sets the status, sends the body (a table becomes JSON with a trailing
-- newline) and ends the request. In rewrite/access plugins usually `return code, body` instead.
_M.exit = resp_exit

--- Sends body parts without ending the request.
function _M.say(...)
    resp_exit(nil, ...)
end

local function add_one(name, value)
    local current = ngx.header[name]
    if current == nil then
        ngx.header[name] = value
        return
    end
    local values = {}
    if type(current) == "table" then
        for i = 1, #current do
            values[i] = current[i]
        end
    else
        values[1] = current
    end
    if type(value) == "table" then
        for i = 1, #value do
            values[#values + 1] = value[i]
        end
    else
        values[#values + 1] = value
    end
    ngx.header[name] = values
end

local function set_header(append, ...)
    if ngx.headers_sent then
        error("headers have already been sent", 3)
    end
    local count = select("#", ...)
    if count == 1 then
        local headers = select(1, ...)
        if type(headers) ~= "table" then
            -- set_header(name): remove it
            ngx.header[headers] = nil
            return
        end
        for k, v in pairs(headers) do
            if append then
                add_one(k, v)
            else
                ngx.header[k] = v
            end
        end
        return
    end
    for i = 1, count, 2 do
        local name, value = select(i, ...)
        if append then
            add_one(name, value)
        else
            ngx.header[name] = value
        end
    end
end

--- `set_header(name, value[, name2, value2 ...])` or `set_header({name = value})`; a nil value
-- removes the header.
function _M.set_header(...)
    set_header(false, ...)
end

--- Like set_header, but keeps the header's existing values.
function _M.add_header(...)
    set_header(true, ...)
end

--- The upstream's status as a number (the last one after retries), or nil.
function _M.get_upstream_status(ctx)
    local var = ctx and ctx.var or ngx.var
    return tonumber(str_sub(tostring(var.upstream_status or ""), -3))
end

--- Marks where the response came from ("apisix", "upstream", ...).
function _M.set_response_source(ctx, source)
    if ctx then
        ctx._resp_source = source
    end
end

function _M.get_response_source(ctx)
    if not ctx then
        return "apisix"
    end
    if ctx._resp_source then
        return ctx._resp_source
    end
    if ctx.var and ctx.var.upstream_status then
        return "upstream"
    end
    return "apisix"
end

--- Drops the headers that describe the original body: call it in header_filter when a
-- body_filter will change the body.
function _M.clear_header_as_body_modified()
    ngx.header.content_length = nil
    ngx.header.content_encoding = nil
    ngx.header.last_modified = nil
    ngx.header.etag = nil
end

--- In body_filter: collects the chunks (per plugin, in the ctx) and returns the whole body at
-- the last chunk, nil before. Unless `hold_the_copy`, the chunks are withheld from the client
-- meanwhile, so the plugin sends the body it returns (`ngx.arg[1] = new_body`). With
-- `max_resp_body_bytes`, returns the first that many bytes as soon as they are in.
function _M.hold_body_chunk(ctx, hold_the_copy, max_resp_body_bytes)
    local arg = ngx.arg
    local chunk, eof = arg[1], arg[2]
    local key = ctx._plugin_name or "_"
    local buffers = ctx._body_buffer
    if not buffers then
        buffers = {}
        ctx._body_buffer = buffers
    end

    if type(chunk) == "string" and chunk ~= "" then
        local buf = buffers[key]
        if not buf then
            buf = { chunk, n = 1 }
            buffers[key] = buf
            ctx._resp_body_bytes = #chunk
        else
            local n = buf.n + 1
            buf.n = n
            buf[n] = chunk
            ctx._resp_body_bytes = ctx._resp_body_bytes + #chunk
        end
        if max_resp_body_bytes and ctx._resp_body_bytes >= max_resp_body_bytes then
            return str_sub(concat(buf, "", 1, buf.n), 1, max_resp_body_bytes)
        end
    end

    if eof then
        local buf = buffers[key]
        if not buf then
            chunk = chunk or ""
            if max_resp_body_bytes and #chunk >= max_resp_body_bytes then
                chunk = str_sub(chunk, 1, max_resp_body_bytes)
            end
            return chunk
        end
        buffers[key] = nil
        return concat(buf, "", 1, buf.n)
    end

    if not hold_the_copy then
        -- withhold this chunk; the whole body goes out at eof
        arg[1] = ""
    end
    return nil
end

return _M
