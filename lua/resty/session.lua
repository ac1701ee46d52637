-- `require("resty.session")`: lua-resty-session 4.x's API (the version APISIX installs) with
-- cookie storage, written for moongate. APISIX's authz-casdoor, dingtalk-auth and
-- feishu-auth use it.
--
-- Same as 4.x: `init`, `new`, `open`, `start`, `logout`, `destroy`, and on a session `open`,
-- `save`, `touch`, `refresh`, `logout`, `destroy`, `close`, `get`/`set`, `get_data`/`set_data`,
-- `get_audience`/`set_audience`, `get_subject`/`set_subject`, `get_property`,
-- `clear_request_cookie`; the options' names and defaults (`cookie_name` "session",
-- `cookie_path` "/", `cookie_same_site` "Lax", `cookie_http_only`, `idling_timeout` 900,
-- `rolling_timeout` 3600, `absolute_timeout` 86400, `touch_threshold` 60, `audience`
-- "default", `secret`/`secret_fallbacks` hashed with SHA-256 into the key material, `ikm`);
-- the error strings (`missing session cookie`, `session absolute timeout exceeded`, ...).
-- The session data is JSON, sealed with AES-256-GCM under a key derived per session id
-- (HMAC-SHA256 of the key material), and every save makes a new session id.
--
-- Not the same: the cookie's byte layout is moongate's own (a cookie made by APISIX's
-- lua-resty-session is not read, so users sign in again once after a switch); only cookie
-- storage (`storage` other than "cookie" is refused); no `remember` cookie, no chunking of a
-- cookie over 4 KB (`cookie size limit exceeded`), no compression. Without a `secret`, the
-- key material is made at random once per process, so every worker reads the others' cookies
-- (as in nginx, where the library is loaded before the workers fork).
local cjson = require("cjson.safe")
local aes = require("resty.aes")
local hmac = require("resty.hmac")
local resty_sha256 = require("resty.sha256")
local random = require("resty.random")
local b64 = require("ngx.base64")

local type = type
local pairs = pairs
local assert = assert
local setmetatable = setmetatable
local tostring = tostring
local ipairs = ipairs
local error = error
local floor = math.floor
local str_sub = string.sub
local tab_remove = table.remove
local ngx = ngx

local KEY_SIZE = 32
local SID_SIZE = 32
local IV_SIZE = 12
local TAG_SIZE = 16
local MAX_COOKIE_SIZE = 4096
local VERSION = "m1"

local STATE_NEW = "new"
local STATE_OPEN = "open"
local STATE_CLOSED = "closed"

local function sha256(s)
    local h = resty_sha256:new()
    h:update(s)
    return h:final()
end

local function now()
    return ngx.time()
end

-- The key material used when no `secret` or `ikm` is given: one random value for the whole
-- process, kept in a shared dictionary so that every worker VM takes the same.
local PROCESS_IKM
local function process_ikm()
    if PROCESS_IKM then
        return PROCESS_IKM
    end
    local dict = ngx.shared and ngx.shared["internal-status"]
    local fresh = random.bytes(KEY_SIZE, true)
    if dict then
        local key = "moongate:resty.session:ikm"
        dict:add(key, fresh)
        PROCESS_IKM = dict:get(key) or fresh
    else
        PROCESS_IKM = fresh
    end
    return PROCESS_IKM
end

local DEFAULTS

local function opt(conf, name, default)
    if not conf then
        return default
    end
    local v = conf[name]
    if v == nil then
        if name == "ikm" and conf.secret then
            return sha256(conf.secret)
        end
        if name == "ikm_fallbacks" and conf.secret_fallbacks and #conf.secret_fallbacks > 0 then
            local out = {}
            for i, s in ipairs(conf.secret_fallbacks) do
                out[i] = sha256(s)
            end
            return out
        end
        return default
    end
    if name == "ikm" then
        assert(#v == KEY_SIZE, "invalid ikm size")
    elseif name == "ikm_fallbacks" then
        for i = 1, #v do
            assert(#v[i] == KEY_SIZE, "invalid ikm size in ikm_fallbacks")
        end
    elseif name == "storage" then
        if v == false or v == "cookie" then
            return nil
        end
        error("session storage '" .. tostring(v)
              .. "' is not provided by moongate (cookie storage only)", 3)
    end
    return v
end

local session = { _VERSION = "4.1.5" }

-- Every option `new` takes, so options whose default is nil are read too.
local OPTIONS = {
    "ikm", "ikm_fallbacks", "cookie_prefix", "cookie_name", "cookie_path", "cookie_domain",
    "cookie_http_only", "cookie_secure", "cookie_priority", "cookie_same_site",
    "cookie_same_party", "cookie_partitioned", "audience", "subject", "enforce_same_subject",
    "idling_timeout", "rolling_timeout", "absolute_timeout", "touch_threshold", "storage",
}

function session.init(conf)
    DEFAULTS = {
        ikm = opt(conf, "ikm", DEFAULTS and DEFAULTS.ikm),
        ikm_fallbacks = opt(conf, "ikm_fallbacks"),
        cookie_prefix = opt(conf, "cookie_prefix"),
        cookie_name = opt(conf, "cookie_name", "session"),
        cookie_path = opt(conf, "cookie_path", "/"),
        cookie_domain = opt(conf, "cookie_domain"),
        cookie_http_only = opt(conf, "cookie_http_only", true),
        cookie_secure = opt(conf, "cookie_secure"),
        cookie_priority = opt(conf, "cookie_priority"),
        cookie_same_site = opt(conf, "cookie_same_site", "Lax"),
        cookie_same_party = opt(conf, "cookie_same_party"),
        cookie_partitioned = opt(conf, "cookie_partitioned"),
        audience = opt(conf, "audience", "default"),
        subject = opt(conf, "subject"),
        enforce_same_subject = opt(conf, "enforce_same_subject", false),
        idling_timeout = opt(conf, "idling_timeout", 900),
        rolling_timeout = opt(conf, "rolling_timeout", 3600),
        absolute_timeout = opt(conf, "absolute_timeout", 86400),
        touch_threshold = opt(conf, "touch_threshold", 60),
        storage = opt(conf, "storage"),
    }
end

local metatable = {}
metatable.__index = metatable

local function cookie_flags(c)
    local name = c.cookie_name
    local path, domain, secure = c.cookie_path, c.cookie_domain, c.cookie_secure
    if c.cookie_prefix == "__Host-" then
        name = "__Host-" .. name
        path, domain, secure = "/", nil, true
    elseif c.cookie_prefix == "__Secure-" then
        name = "__Secure-" .. name
        secure = true
    elseif c.cookie_same_site == "None" then
        secure = true
    end
    if c.cookie_same_party then
        assert(c.cookie_same_site ~= "Strict",
               "SameParty session cookies cannot use SameSite=Strict")
        secure = true
    end
    local f = ""
    if domain and domain ~= "localhost" and domain ~= "" then
        f = f .. "; Domain=" .. domain
    end
    f = f .. "; Path=" .. path .. "; SameSite=" .. c.cookie_same_site
    if c.cookie_priority then
        f = f .. "; Priority=" .. c.cookie_priority
    end
    if c.cookie_same_party then
        f = f .. "; SameParty"
    end
    if c.cookie_partitioned then
        f = f .. "; Partitioned"
    end
    if secure then
        f = f .. "; Secure"
    end
    if c.cookie_http_only then
        f = f .. "; HttpOnly"
    end
    return name, f
end

function session.new(conf)
    local c = {}
    for _, k in ipairs(OPTIONS) do
        c[k] = opt(conf, k, DEFAULTS[k])
    end
    local name, flags = cookie_flags(c)
    return setmetatable({
        ikm = c.ikm,
        ikm_fallbacks = c.ikm_fallbacks,
        cookie_name = name,
        cookie_flags = flags,
        idling_timeout = c.idling_timeout,
        rolling_timeout = c.rolling_timeout,
        absolute_timeout = c.absolute_timeout,
        touch_threshold = c.touch_threshold,
        enforce_same_subject = c.enforce_same_subject,
        state = STATE_NEW,
        meta = {},
        data_index = 1,
        data = { { {}, c.audience, c.subject } },
    }, metatable)
end

-- Replaces this cookie in the response's Set-Cookie list, or adds it.
local function set_cookie(name, value)
    local cookies = ngx.header["Set-Cookie"]
    local prefix = name .. "="
    if cookies == nil then
        ngx.header["Set-Cookie"] = value
        return
    end
    if type(cookies) == "string" then
        cookies = { cookies }
    end
    local out, replaced = {}, false
    for _, c in ipairs(cookies) do
        if str_sub(c, 1, #prefix) == prefix then
            if not replaced then
                out[#out + 1] = value
                replaced = true
            end
        else
            out[#out + 1] = c
        end
    end
    if not replaced then
        out[#out + 1] = value
    end
    ngx.header["Set-Cookie"] = #out == 1 and out[1] or out
end

local function session_key(ikm, sid)
    local h = hmac:new(ikm, hmac.ALGOS.SHA256)
    return h:final("session encryption key:" .. sid)
end

local function cipher(key, iv)
    return aes:new(key, nil, aes.cipher(256, "gcm"), { iv = iv })
end

-- Reads and checks the request's cookie; fills meta and data. Returns true, or nil, err
-- (and true as third value when only the audience is missing).
local function open(self)
    local raw = ngx.var["cookie_" .. self.cookie_name]
    if not raw or raw == "" then
        return nil, "missing session cookie"
    end
    local version, sid_b64, box_b64 = raw:match("^(%w+)%.([%w_-]+)%.([%w_-]+)$")
    if version ~= VERSION then
        return nil, "invalid session header"
    end
    local sid = b64.decode_base64url(sid_b64)
    if not sid or #sid ~= SID_SIZE then
        return nil, "invalid session id"
    end
    local box = b64.decode_base64url(box_b64)
    if not box or #box <= IV_SIZE + TAG_SIZE then
        return nil, "invalid session payload"
    end
    local iv = str_sub(box, 1, IV_SIZE)
    local tag = str_sub(box, IV_SIZE + 1, IV_SIZE + TAG_SIZE)
    local ct = str_sub(box, IV_SIZE + TAG_SIZE + 1)
    local plain, used_ikm
    local keys = { self.ikm }
    for _, k in ipairs(self.ikm_fallbacks or {}) do
        keys[#keys + 1] = k
    end
    for _, ikm in ipairs(keys) do
        local c = cipher(session_key(ikm, sid), iv)
        plain = c and c:decrypt(ct, tag)
        if plain then
            used_ikm = ikm
            break
        end
    end
    if not plain then
        return nil, "unable to decrypt session data"
    end
    local doc, err = cjson.decode(plain)
    if type(doc) ~= "table" or type(doc.d) ~= "table" then
        return nil, "unable to json decode session data" .. (err and (" (" .. err .. ")") or "")
    end
    if doc.n ~= self.cookie_name then
        return nil, "invalid session payload"
    end
    local t = now()
    local created, rolling, idling = doc.c, doc.r, doc.i
    if type(created) ~= "number" then
        return nil, "invalid session creation time"
    end
    if type(rolling) ~= "number" then
        return nil, "invalid session rolling offset"
    end
    if type(idling) ~= "number" then
        return nil, "invalid session idling offset"
    end
    if self.absolute_timeout > 0 and t - created > self.absolute_timeout then
        return nil, "session absolute timeout exceeded"
    end
    if self.rolling_timeout > 0 and t - created - rolling > self.rolling_timeout then
        return nil, "session rolling timeout exceeded"
    end
    if self.idling_timeout > 0 and t - created - rolling - idling > self.idling_timeout then
        return nil, "session idling timeout exceeded"
    end
    self.meta = {
        sid = sid,
        ikm = used_ikm,
        creation_time = created,
        rolling_offset = rolling,
        idling_offset = idling,
        timestamp = t,
    }
    -- The entry of this session's audience.
    local audience = self.data[self.data_index][2]
    local subject = self.data[self.data_index][3]
    self.data = doc.d
    for i, entry in ipairs(self.data) do
        if entry[2] == audience then
            self.data_index = i
            self.state = STATE_OPEN
            return true
        end
    end
    self.data[#self.data + 1] = { {}, audience, subject }
    self.data_index = #self.data
    return nil, "missing session audience", true
end

-- Seals data and times into a new cookie value under a fresh session id.
local function seal(self, created, rolling, idling)
    local sid = random.bytes(SID_SIZE, true)
    if not sid then
        return nil, "unable to generate session id"
    end
    local data = self.data
    if self.enforce_same_subject and #data > 1 then
        local subject = data[self.data_index][3]
        for i = #data, 1, -1 do
            if data[i][3] ~= subject then
                tab_remove(data, i)
                if i < self.data_index then
                    self.data_index = self.data_index - 1
                end
            end
        end
    end
    local plain, err = cjson.encode({ n = self.cookie_name, c = created, r = rolling,
                                      i = idling, d = data })
    if not plain then
        return nil, "unable to json encode session data (" .. tostring(err) .. ")"
    end
    local iv = random.bytes(IV_SIZE, true)
    local c = cipher(session_key(self.ikm, sid), iv)
    if not c then
        return nil, "unable to encrypt session data"
    end
    local ct, tag = c:encrypt(plain)
    if not ct or not tag then
        return nil, "unable to encrypt session data"
    end
    local value = VERSION .. "." .. b64.encode_base64url(sid) .. "."
                  .. b64.encode_base64url(iv .. tag .. ct)
    local cookie = self.cookie_name .. "=" .. value .. self.cookie_flags
    if #cookie > MAX_COOKIE_SIZE then
        return nil, "cookie size limit exceeded"
    end
    return cookie, sid
end

local function save(self, state)
    local t = now()
    local meta = self.meta
    local created = meta.creation_time or t
    local rolling = t - created
    local cookie, sid = seal(self, created, rolling, 0)
    if not cookie then
        return nil, sid
    end
    set_cookie(self.cookie_name, cookie)
    self.meta = {
        sid = sid,
        ikm = self.ikm,
        creation_time = created,
        rolling_offset = rolling,
        idling_offset = 0,
        timestamp = t,
    }
    self.state = state or STATE_OPEN
    return true
end

local function must_not_be_closed(self, what)
    assert(self.state ~= STATE_CLOSED, "unable to " .. what .. " closed session")
end

function metatable:open()
    must_not_be_closed(self, "open")
    local ok, err = open(self)
    if ok then
        return true
    end
    return nil, err
end

function metatable:save()
    must_not_be_closed(self, "save")
    return save(self)
end

function metatable:touch()
    must_not_be_closed(self, "touch")
    if self.state ~= STATE_OPEN then
        return nil, "unable to touch nonexistent session"
    end
    local meta = self.meta
    local t = now()
    local idling = t - meta.creation_time - meta.rolling_offset
    local cookie, err = seal(self, meta.creation_time, meta.rolling_offset, idling)
    if not cookie then
        return nil, err
    end
    set_cookie(self.cookie_name, cookie)
    meta.idling_offset = idling
    return true
end

function metatable:refresh()
    must_not_be_closed(self, "refresh")
    if self.state ~= STATE_OPEN then
        return nil, "unable to refresh nonexistent session"
    end
    if self.rolling_timeout == 0 and self.idling_timeout == 0 then
        return true
    end
    local meta = self.meta
    local rolling_elapsed = meta.timestamp - meta.creation_time - meta.rolling_offset
    if self.rolling_timeout > 0 and rolling_elapsed > floor(self.rolling_timeout * 0.75) then
        return save(self)
    end
    if self.idling_timeout > 0 and rolling_elapsed - meta.idling_offset > self.touch_threshold then
        return self:touch()
    end
    return true
end

-- An expired cookie of this name in the response, and the state closed.
local function destroy(self)
    set_cookie(self.cookie_name, self.cookie_name
               .. "=; Expires=Thu, 01 Jan 1970 00:00:01 GMT; Max-Age=0" .. self.cookie_flags)
    self.state = STATE_CLOSED
    return true
end

function metatable:destroy()
    must_not_be_closed(self, "destroy")
    if self.state ~= STATE_OPEN then
        return nil, "unable to destroy nonexistent session"
    end
    return destroy(self)
end

function metatable:logout()
    must_not_be_closed(self, "logout")
    if self.state ~= STATE_OPEN then
        return nil, "unable to logout nonexistent session"
    end
    if #self.data == 1 then
        return destroy(self)
    end
    tab_remove(self.data, self.data_index)
    self.data_index = 1
    return save(self, STATE_CLOSED)
end

function metatable:close()
    self.state = STATE_CLOSED
end

function metatable:set_data(data)
    must_not_be_closed(self, "set session data on")
    assert(type(data) == "table", "invalid session data")
    self.data[self.data_index][1] = data
end

function metatable:get_data()
    must_not_be_closed(self, "get session data on")
    return self.data[self.data_index][1]
end

function metatable:set(key, value)
    must_not_be_closed(self, "set session data value on")
    self.data[self.data_index][1][key] = value
end

function metatable:get(key)
    must_not_be_closed(self, "get session data value on")
    return self.data[self.data_index][1][key]
end

function metatable:set_audience(audience)
    must_not_be_closed(self, "set audience on")
    local data = self.data
    for i, entry in ipairs(data) do
        if entry[2] == audience then
            self.data_index = i
            return
        end
    end
    data[self.data_index][2] = audience
end

function metatable:get_audience()
    must_not_be_closed(self, "get audience on")
    return self.data[self.data_index][2]
end

function metatable:set_subject(subject)
    must_not_be_closed(self, "set subject on")
    self.data[self.data_index][3] = subject
end

function metatable:get_subject()
    must_not_be_closed(self, "get subject on")
    return self.data[self.data_index][3]
end

-- "id" (the session id, base64url), "nonce" (none here), "audience", "subject",
-- "timeout" (seconds left before the first timeout), "idling-timeout", "rolling-timeout",
-- "absolute-timeout".
function metatable:get_property(name)
    local meta = self.meta
    if not meta.sid then
        return nil
    end
    if name == "id" then
        return b64.encode_base64url(meta.sid)
    elseif name == "audience" then
        return self.data[self.data_index][2]
    elseif name == "subject" then
        return self.data[self.data_index][3]
    end
    local t = now()
    local left = {}
    if self.idling_timeout > 0 then
        left["idling-timeout"] = self.idling_timeout
            - (t - meta.creation_time - meta.rolling_offset - meta.idling_offset)
    end
    if self.rolling_timeout > 0 then
        left["rolling-timeout"] = self.rolling_timeout
            - (t - meta.creation_time - meta.rolling_offset)
    end
    if self.absolute_timeout > 0 then
        left["absolute-timeout"] = self.absolute_timeout - (t - meta.creation_time)
    end
    if name == "timeout" then
        local m
        for _, v in pairs(left) do
            if not m or v < m then
                m = v
            end
        end
        return m
    end
    return left[name]
end

-- Removes this session's cookie from the request's Cookie header (the upstream does not see it).
function metatable:clear_request_cookie()
    must_not_be_closed(self, "clear session request cookie on")
    if self.state ~= STATE_OPEN then
        return nil, "unable to clear session request cookie on nonexistent session"
    end
    local cookies = ngx.var.http_cookie
    if not cookies then
        return true
    end
    local kept = {}
    for part in cookies:gmatch("[^;]+") do
        local trimmed = part:match("^%s*(.-)%s*$")
        local n = trimmed:match("^([^=]+)=")
        if n ~= self.cookie_name then
            kept[#kept + 1] = trimmed
        end
    end
    if #kept == 0 then
        ngx.req.clear_header("Cookie")
    else
        ngx.req.set_header("Cookie", table.concat(kept, "; "))
    end
    return true
end

function session.open(conf)
    local self = session.new(conf)
    local ok, err = self:open()
    if not ok then
        return self, err, false
    end
    return self, err, true
end

function session.start(conf)
    local self, err, exists = session.open(conf)
    if not exists then
        return self, err, false, false
    end
    local refreshed
    refreshed, err = self:refresh()
    if not refreshed then
        return self, err, true, false
    end
    return self, nil, true, true
end

function session.logout(conf)
    local self, err, exists = session.open(conf)
    if not exists then
        return nil, err, false, false
    end
    local ok
    ok, err = self:logout()
    if not ok then
        return nil, err, true, false
    end
    return true, nil, true, true
end

function session.destroy(conf)
    local self, err, exists = session.open(conf)
    if not exists then
        return nil, err, false, false
    end
    local ok
    ok, err = self:destroy()
    if not ok then
        return nil, err, true, false
    end
    return true, nil, true, true
end

session.init()

-- The process-wide random key material, taken on first use (not at load, when a worker's
-- shared dictionaries may not be reachable yet).
local new = session.new
function session.new(conf)
    if not DEFAULTS.ikm then
        DEFAULTS.ikm = process_ikm()
    end
    return new(conf)
end

return session
