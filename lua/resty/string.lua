-- `require("resty.string")`: to_hex and atoi from lua-resty-string.
local str_format = string.format
local str_byte = string.byte
local tab_concat = table.concat
local tonumber = tonumber

local _M = { _VERSION = "0.16" }

function _M.to_hex(s)
    local out = {}
    for i = 1, #s do
        out[i] = str_format("%02x", str_byte(s, i))
    end
    return tab_concat(out)
end

function _M.atoi(s)
    return tonumber(s)
end

return _M
