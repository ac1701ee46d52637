--- resty.jwt: the part of lua-resty-jwt's API that APISIX's plugins call, for JWS tokens
-- (compact serialization): `load_jwt`, `sign`, `verify`, `verify_jwt_obj`. Signatures use
-- `resty.openssl.mac` (HS*) and `resty.openssl.pkey` (RS*, PS*, ES256/ES384, EdDSA). Not
-- provided: JWE, x5u/x5c retrieval. Claim specs take `resty.jwt-validators`' validators.
local cjson = require("cjson.safe")
local base64 = require("ngx.base64")
local mac = require("resty.openssl.mac")
local pkey = require("resty.openssl.pkey")
local type = type
local pairs = pairs
local select = select
local tostring = tostring
local pcall = pcall
local setmetatable = setmetatable
local str_find = string.find
local str_sub = string.sub
local ngx_time = ngx.time

local _M = { _VERSION = "0.2.3" }
local mt = { __index = _M }

local hmac_md = { HS256 = "sha256", HS384 = "sha384", HS512 = "sha512" }
local pkey_alg = {
    RS256 = { md = "sha256" }, RS384 = { md = "sha384" }, RS512 = { md = "sha512" },
    PS256 = { md = "sha256", pss = true }, PS384 = { md = "sha384", pss = true },
    PS512 = { md = "sha512", pss = true },
    ES256 = { md = "sha256", raw = true }, ES384 = { md = "sha384", raw = true },
    EdDSA = {},
}

function _M.new()
    return setmetatable({}, mt)
end

local function split3(s)
    local a = str_find(s, ".", 1, true)
    if not a then return nil end
    local b = str_find(s, ".", a + 1, true)
    if not b or str_find(s, ".", b + 1, true) then return nil end
    return str_sub(s, 1, a - 1), str_sub(s, a + 1, b - 1), str_sub(s, b + 1)
end

local function decode_part(part)
    local raw = base64.decode_base64url(part)
    if not raw then return nil end
    local v = cjson.decode(raw)
    if type(v) ~= "table" then return nil end
    return v
end

--- Splits and decodes a token without checking its signature. Returns a table with
-- `raw_header`, `raw_payload`, `signature` (still base64url), `header`, `payload`, `valid`,
-- and `reason` when it is not valid.
function _M.load_jwt(_, token)
    if type(token) ~= "string" then
        return { valid = false, reason = "invalid jwt string" }
    end
    local h, p, s = split3(token)
    if not h then
        return { valid = false, reason = "invalid jwt string" }
    end
    local header = decode_part(h)
    if not header then
        return { valid = false, reason = "invalid header: " .. h }
    end
    local payload = decode_part(p)
    if not payload then
        return { valid = false, reason = "invalid payload: " .. p }
    end
    return {
        raw_header = h, raw_payload = p, signature = s,
        header = header, payload = payload, valid = true,
    }
end

local function signature_of(alg, key, data)
    local md = hmac_md[alg]
    if md then
        local m, err = mac.new(key, "HMAC", nil, md)
        if not m then return nil, err end
        return m:final(data)
    end
    local a = pkey_alg[alg]
    if not a then return nil, "unsupported algorithm: " .. tostring(alg) end
    local k, err = pkey.new(key)
    if not k then return nil, err end
    return k:sign(data, a.md, a.pss and pkey.PADDINGS.RSA_PKCS1_PSS_PADDING or nil,
        a.raw and { ecdsa_use_raw = true } or nil)
end

--- `jwt:sign(key, {header = {...}, payload = {...}})` → the compact token.
function _M.sign(_, key, obj)
    local header = obj and obj.header
    if type(header) ~= "table" or type(header.alg) ~= "string" then
        error("header must be a table with an alg", 2)
    end
    local h = base64.encode_base64url(cjson.encode(header))
    local p = base64.encode_base64url(cjson.encode(obj.payload or {}))
    local sig, err = signature_of(header.alg, key, h .. "." .. p)
    if not sig then
        error(err, 2)
    end
    return h .. "." .. p .. "." .. base64.encode_base64url(sig)
end

local function check_time_claims(payload, leeway)
    local now = ngx_time()
    leeway = leeway or 0
    if payload.exp ~= nil then
        if type(payload.exp) ~= "number" then return "'exp' claim must be a number" end
        if payload.exp <= now - leeway then return "'exp' claim expired at " .. ngx.http_time(payload.exp) end
    end
    if payload.nbf ~= nil then
        if type(payload.nbf) ~= "number" then return "'nbf' claim must be a number" end
        if payload.nbf > now + leeway then return "'nbf' claim not valid until " .. ngx.http_time(payload.nbf) end
    end
end

local validators = require("resty.jwt-validators")

--- Runs one claim spec's validators (`claim = function(value, claim, obj)`; `__jwt` gets the
-- whole object) and its legacy options (`lifetime_grace_period`, `valid_issuers`), as
-- lua-resty-jwt does. Returns the failure's reason, or nil.
local function check_spec(spec, obj)
    local payload = obj.payload
    if spec.lifetime_grace_period ~= nil then
        local reason = check_time_claims(payload, spec.lifetime_grace_period)
        if reason then return reason end
    end
    if spec.valid_issuers ~= nil then
        local ok, res = pcall(validators.equals_any_of(spec.valid_issuers), payload.iss, "iss", obj)
        if not ok then return tostring(res) end
        if not res then
            return "Claim 'iss' ('" .. tostring(payload.iss) .. "') returned failure"
        end
    end
    for claim, check in pairs(spec) do
        if type(check) == "function" then
            local value = claim == "__jwt" and obj or payload[claim]
            local ok, res = pcall(check, value, claim, obj)
            if not ok then return tostring(res) end
            if not res then
                return "Claim '" .. tostring(claim) .. "' ('" .. tostring(value)
                    .. "') returned failure"
            end
        end
    end
end

--- Checks a loaded token's signature, then its claims: with no claim specs, `exp`/`nbf`
-- when present (allowing `jwt-validators`' system leeway); else each spec in turn. Sets
-- `verified` and `reason` on it and returns it.
function _M.verify_jwt_obj(_, key, obj, ...)
    if not obj.valid then
        obj.verified = false
        return obj
    end
    local alg = obj.header.alg
    local data = obj.raw_header .. "." .. obj.raw_payload
    local sig = base64.decode_base64url(obj.signature or "")
    local ok, err
    if not sig then
        ok, err = false, "wrong signature"
    elseif hmac_md[alg] then
        local want = signature_of(alg, key, data)
        ok = want ~= nil and want == sig
    elseif pkey_alg[alg] then
        local a = pkey_alg[alg]
        local k, kerr = pkey.new(key)
        if not k then
            ok, err = false, kerr
        else
            local pok, res = pcall(k.verify, k, sig, data, a.md,
                a.pss and pkey.PADDINGS.RSA_PKCS1_PSS_PADDING or nil,
                a.raw and { ecdsa_use_raw = true } or nil)
            ok = pok and res == true
        end
    else
        ok, err = false, "unsupported algorithm: " .. tostring(alg)
    end
    if not ok then
        obj.verified = false
        obj.reason = err or "signature mismatch: " .. tostring(obj.signature)
        return obj
    end
    local reason
    local n = select("#", ...)
    if n == 0 then
        reason = check_time_claims(obj.payload, validators.get_system_leeway())
    else
        for i = 1, n do
            local spec = select(i, ...)
            if type(spec) == "table" then
                reason = check_spec(spec, obj)
                if reason then break end
            end
        end
    end
    obj.verified = reason == nil
    obj.reason = reason
    return obj
end

--- `jwt:verify(key, token, spec, ...)` = `load_jwt` then `verify_jwt_obj`.
function _M.verify(self, key, token, ...)
    local obj = type(token) == "table" and token or _M.load_jwt(self, token)
    return _M.verify_jwt_obj(self, key, obj, ...)
end

return setmetatable(_M, mt)
