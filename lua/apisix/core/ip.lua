--- core.ip: IP address and CIDR parsing and matching, in pure Lua.
-- `create_ip_matcher({"10.0.0.0/8", "::1"})` returns a matcher with `:match(ip)`, or nil (and
-- logs) when an entry is invalid. `validate_cidr_or_ip(s)` tells whether `s` is an address or a
-- CIDR range.
local type = type
local tonumber = tonumber
local ipairs = ipairs
local setmetatable = setmetatable
local str_find = string.find
local str_sub = string.sub
local str_match = string.match
local str_gmatch = string.gmatch
local math_floor = math.floor

local _M = {}

--- The address as a number (0 .. 2^32-1), or false.
local function parse_ipv4(s)
    if type(s) ~= "string" then
        return false
    end
    local a, b, c, d = str_match(s, "^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
    if not a then
        return false
    end
    local n = 0
    for _, part in ipairs({ a, b, c, d }) do
        if #part > 1 and str_sub(part, 1, 1) == "0" then
            return false
        end
        local v = tonumber(part)
        if v > 255 then
            return false
        end
        n = n * 256 + v
    end
    return n
end
_M.parse_ipv4 = parse_ipv4

--- The address as an array of eight 16-bit groups, or false. Accepts "::" and a trailing
-- dotted IPv4 part; brackets are not accepted.
local function parse_ipv6(s)
    if type(s) ~= "string" or not str_find(s, ":", 1, true) then
        return false
    end
    local head, tail = s, nil
    local dc = str_find(s, "::", 1, true)
    if dc then
        head = str_sub(s, 1, dc - 1)
        tail = str_sub(s, dc + 2)
        if str_find(tail, "::", 1, true) then
            return false
        end
    end
    local function groups(part)
        local out = {}
        if part == "" then
            return out
        end
        for g in str_gmatch(part .. ":", "([^:]*):") do
            out[#out + 1] = g
        end
        return out
    end
    local h, t = groups(head), tail and groups(tail) or {}
    -- an embedded IPv4 address counts as two groups
    local function expand_v4(list)
        local last = list[#list]
        if last and str_find(last, ".", 1, true) then
            local v4 = parse_ipv4(last)
            if not v4 then
                return false
            end
            list[#list] = math_floor(v4 / 65536)
            list[#list + 1] = v4 % 65536
        end
        return true
    end
    if tail then
        if not expand_v4(t) then
            return false
        end
    elseif not expand_v4(h) then
        return false
    end
    local total = #h + #t
    if (tail and total > 7) or (not tail and total ~= 8) then
        return false
    end
    local out = {}
    local function push(g)
        if type(g) == "number" then
            out[#out + 1] = g
            return true
        end
        if not str_match(g, "^%x%x?%x?%x?$") then
            return false
        end
        out[#out + 1] = tonumber(g, 16)
        return true
    end
    for _, g in ipairs(h) do
        if not push(g) then
            return false
        end
    end
    for _ = 1, 8 - total do
        out[#out + 1] = 0
    end
    for _, g in ipairs(t) do
        if not push(g) then
            return false
        end
    end
    return out
end
_M.parse_ipv6 = parse_ipv6

-- Parses "addr" or "addr/bits" into {v = 4|6, addr = ..., bits = n}, or nil.
local function parse_cidr(s)
    if type(s) ~= "string" then
        return nil
    end
    local addr, bits = str_match(s, "^(.-)/(%d+)$")
    addr = addr or s
    local v4 = parse_ipv4(addr)
    if v4 then
        bits = bits and tonumber(bits) or 32
        if bits > 32 then
            return nil
        end
        return { v = 4, addr = v4, bits = bits }
    end
    local v6 = parse_ipv6(addr)
    if v6 then
        bits = bits and tonumber(bits) or 128
        if bits > 128 then
            return nil
        end
        return { v = 6, addr = v6, bits = bits }
    end
    return nil
end

--- True when `s` is an IPv4/IPv6 address or CIDR range.
function _M.validate_cidr_or_ip(s)
    return parse_cidr(s) ~= nil
end

local function v4_in(range, addr)
    local shift = 2 ^ (32 - range.bits)
    return math_floor(range.addr / shift) == math_floor(addr / shift)
end

local function v6_in(range, groups)
    local bits = range.bits
    for i = 1, 8 do
        if bits <= 0 then
            return true
        end
        local a, b = range.addr[i], groups[i]
        if bits >= 16 then
            if a ~= b then
                return false
            end
        else
            local shift = 2 ^ (16 - bits)
            return math_floor(a / shift) == math_floor(b / shift)
        end
        bits = bits - 16
    end
    return true
end

local matcher_mt = {}
matcher_mt.__index = matcher_mt

--- True when `ip` is in one of the matcher's ranges.
function matcher_mt:match(ip)
    local v4 = parse_ipv4(ip)
    if v4 then
        for _, r in ipairs(self.v4) do
            if v4_in(r, v4) then
                return true
            end
        end
        return false
    end
    local v6 = parse_ipv6(ip)
    if not v6 then
        return false, "invalid IP address"
    end
    for _, r in ipairs(self.v6) do
        if v6_in(r, v6) then
            return true
        end
    end
    return false
end

--- A matcher for a list of addresses and CIDR ranges, or `nil, err`.
function _M.new_matcher(list)
    local m = setmetatable({ v4 = {}, v6 = {} }, matcher_mt)
    for _, s in ipairs(list) do
        local r = parse_cidr(s)
        if not r then
            return nil, "invalid ip address: " .. tostring(s)
        end
        if r.v == 4 then
            m.v4[#m.v4 + 1] = r
        else
            m.v6[#m.v6 + 1] = r
        end
    end
    return m
end

--- Like new_matcher, but logs the error and returns nil (APISIX's `create_ip_matcher`).
function _M.create_ip_matcher(list)
    local m, err = _M.new_matcher(list)
    if not m then
        require("apisix.core.log").error("failed to create ip matcher: ", err,
                                         " ip list: ", require("apisix.core.json").delay_encode(list))
        return nil
    end
    return m
end

return _M
