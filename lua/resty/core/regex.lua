--- resty.core.regex: the one function APISIX plugins take from it.
-- `re_match_compile(regex, opts)` returns a truthy handle when the pattern compiles (with
-- OpenResty option letters), or nil and `pcre2_compile() failed: MSG in "REGEX"`.
local mg = __moongate

local _M = { version = 0.1 }

function _M.re_match_compile(regex, opts)
    return mg.re_compile(regex, opts)
end

return _M
