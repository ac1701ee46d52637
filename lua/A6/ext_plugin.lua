--- APISIX's ext-plugin protocol (ext-plugin-proto's `ext-plugin.fbs`, namespace `A6`) for
--- `require("A6.HTTPReqCall.Req")` and its siblings: each table type gives the readers and
--- builder functions `flatc --lua` would make (`GetRootAsReq`, `New`, `Init`, one getter per
--- field, `Start`/`AddX`/`StartXVector`/`End`), made here from the schema below rather than
--- generated. Field ids follow declaration order; a union takes two (its type, then its value).
local flatbuffers = require("flatbuffers")

local N = flatbuffers.N
local view_new = flatbuffers.view.New
local binary_new = flatbuffers.binaryArray.New
local setmetatable, type, ipairs = setmetatable, type, ipairs
local str_upper, str_gsub, str_sub = string.upper, string.gsub, string.sub

local function camel(name)
    local s = str_gsub(name, "_(%l)", str_upper)
    return str_upper(str_sub(s, 1, 1)) .. str_sub(s, 2)
end

local scalars = { uint8 = N.Uint8, uint16 = N.Uint16, uint32 = N.Uint32 }
local prepend_slot = {
    uint8 = "PrependUint8Slot", uint16 = "PrependUint16Slot", uint32 = "PrependUint32Slot",
}
local types = {}

-- A table type: `fields` is a list of `{name, kind, element}`; kind is a scalar name,
-- "string", "bytes" ([ubyte]), "vector" (of the table type `element`) or "union".
local function table_type(modname, fields)
    local M = {}
    local mt = {}
    mt.__index = mt
    local short = modname:match("([^.]+)$")

    function M.New()
        return setmetatable({}, mt)
    end

    M["GetRootAs" .. short] = function(buf, offset)
        if type(buf) == "string" then
            buf = binary_new(buf)
        end
        offset = offset or 0
        local o = M.New()
        o:Init(buf, N.UOffsetT:Unpack(buf, offset) + offset)
        return o
    end

    function mt:Init(buf, pos)
        self.view = view_new(buf, pos)
    end

    local slot = 0
    local numfields = 0
    for _, f in ipairs(fields) do
        numfields = numfields + (f[2] == "union" and 2 or 1)
    end

    for _, f in ipairs(fields) do
        local name, kind, elem = f[1], f[2], f[3]
        local C = camel(name)
        if kind == "union" then
            local tslot, vslot = slot, slot + 1
            local tvo, vvo = 4 + 2 * tslot, 4 + 2 * vslot
            mt[C .. "Type"] = function(self)
                return self.view:GetSlot(tvo, 0, N.Uint8)
            end
            -- A view of the member table; `Init(obj.bytes, obj.pos)` reads it as its type.
            mt[C] = function(self)
                local o = self.view:Offset(vvo)
                if o ~= 0 then
                    local obj = view_new(self.view.bytes, 0)
                    self.view:Union(obj, o)
                    return obj
                end
                return nil
            end
            M["Add" .. C .. "Type"] = function(builder, v)
                builder:PrependUint8Slot(tslot, v, 0)
            end
            M["Add" .. C] = function(builder, off)
                builder:PrependUOffsetTRelativeSlot(vslot, off, 0)
            end
            slot = slot + 2
        else
            local s = slot
            local vo = 4 + 2 * s
            if scalars[kind] then
                local flags = scalars[kind]
                mt[C] = function(self)
                    return self.view:GetSlot(vo, 0, flags)
                end
                local prepend = prepend_slot[kind]
                M["Add" .. C] = function(builder, v)
                    builder[prepend](builder, s, v, 0)
                end
            elseif kind == "string" then
                mt[C] = function(self)
                    local o = self.view:Offset(vo)
                    if o ~= 0 then
                        return self.view:String(o + self.view.pos)
                    end
                    return nil
                end
                M["Add" .. C] = function(builder, off)
                    builder:PrependUOffsetTRelativeSlot(s, off, 0)
                end
            else
                -- vectors: `X(j)` (1-based), `XLength()`, `StartXVector(builder, n)`
                mt[C .. "Length"] = function(self)
                    local o = self.view:Offset(vo)
                    if o ~= 0 then
                        return self.view:VectorLen(o)
                    end
                    return 0
                end
                M["Add" .. C] = function(builder, off)
                    builder:PrependUOffsetTRelativeSlot(s, off, 0)
                end
                if kind == "bytes" then
                    mt[C] = function(self, j)
                        local o = self.view:Offset(vo)
                        if o ~= 0 then
                            return self.view:Get(N.Uint8, self.view:Vector(o) + j - 1)
                        end
                        return 0
                    end
                    mt[C .. "AsString"] = function(self, start, stop)
                        return self.view:VectorAsString(vo, start, stop)
                    end
                    M["Start" .. C .. "Vector"] = function(builder, n)
                        return builder:StartVector(1, n, 1)
                    end
                else
                    mt[C] = function(self, j)
                        local o = self.view:Offset(vo)
                        if o ~= 0 then
                            local x = self.view:Vector(o) + (j - 1) * 4
                            x = self.view:Indirect(x)
                            local obj = types[elem].New()
                            obj:Init(self.view.bytes, x)
                            return obj
                        end
                        return nil
                    end
                    M["Start" .. C .. "Vector"] = function(builder, n)
                        return builder:StartVector(4, n, 4)
                    end
                end
            end
            slot = slot + 1
        end
    end

    function M.Start(builder)
        builder:StartObject(numfields)
    end

    function M.End(builder)
        return builder:EndObject()
    end

    -- The `flatc` names with the table's name in them, for older generated callers.
    M[short .. "Start"] = M.Start
    M[short .. "End"] = M.End
    types[modname] = M
    return M
end

local E = {}

E["A6.TextEntry"] = table_type("A6.TextEntry", {
    { "name", "string" }, { "value", "string" },
})
E["A6.DataEntry"] = table_type("A6.DataEntry", {
    { "name", "string" }, { "value", "bytes" },
})
E["A6.Method"] = {
    GET = 0, HEAD = 1, POST = 2, PUT = 3, DELETE = 4, MKCOL = 5, COPY = 6, MOVE = 7,
    OPTIONS = 8, PROPFIND = 9, PROPPATCH = 10, LOCK = 11, UNLOCK = 12, PATCH = 13, TRACE = 14,
}

E["A6.Err.Code"] = { BAD_REQUEST = 0, SERVICE_UNAVAILABLE = 1, CONF_TOKEN_NOT_FOUND = 2 }
E["A6.Err.Resp"] = table_type("A6.Err.Resp", { { "code", "uint8" } })

E["A6.PrepareConf.Req"] = table_type("A6.PrepareConf.Req", {
    { "conf", "vector", "A6.TextEntry" }, { "key", "string" },
})
E["A6.PrepareConf.Resp"] = table_type("A6.PrepareConf.Resp", { { "conf_token", "uint32" } })

E["A6.HTTPReqCall.Req"] = table_type("A6.HTTPReqCall.Req", {
    { "id", "uint32" },
    { "src_ip", "bytes" },
    { "method", "uint8" },
    { "path", "string" },
    { "args", "vector", "A6.TextEntry" },
    { "headers", "vector", "A6.TextEntry" },
    { "conf_token", "uint32" },
})
E["A6.HTTPReqCall.Stop"] = table_type("A6.HTTPReqCall.Stop", {
    { "status", "uint16" },
    { "headers", "vector", "A6.TextEntry" },
    { "body", "bytes" },
})
E["A6.HTTPReqCall.Rewrite"] = table_type("A6.HTTPReqCall.Rewrite", {
    { "path", "string" },
    { "headers", "vector", "A6.TextEntry" },
    { "args", "vector", "A6.TextEntry" },
    { "resp_headers", "vector", "A6.TextEntry" },
    { "body", "bytes" },
})
E["A6.HTTPReqCall.Action"] = { NONE = 0, Stop = 1, Rewrite = 2 }
E["A6.HTTPReqCall.Resp"] = table_type("A6.HTTPReqCall.Resp", {
    { "id", "uint32" }, { "action", "union" },
})

E["A6.ExtraInfo.Var"] = table_type("A6.ExtraInfo.Var", { { "name", "string" } })
E["A6.ExtraInfo.ReqBody"] = table_type("A6.ExtraInfo.ReqBody", {})
E["A6.ExtraInfo.RespBody"] = table_type("A6.ExtraInfo.RespBody", {})
E["A6.ExtraInfo.Info"] = { NONE = 0, Var = 1, ReqBody = 2, RespBody = 3 }
E["A6.ExtraInfo.Req"] = table_type("A6.ExtraInfo.Req", { { "info", "union" } })
E["A6.ExtraInfo.Resp"] = table_type("A6.ExtraInfo.Resp", { { "result", "bytes" } })

E["A6.HTTPRespCall.Req"] = table_type("A6.HTTPRespCall.Req", {
    { "id", "uint32" },
    { "status", "uint16" },
    { "headers", "vector", "A6.TextEntry" },
    { "conf_token", "uint32" },
})
E["A6.HTTPRespCall.Resp"] = table_type("A6.HTTPRespCall.Resp", {
    { "id", "uint32" },
    { "status", "uint16" },
    { "headers", "vector", "A6.TextEntry" },
    { "body", "bytes" },
})

return E
