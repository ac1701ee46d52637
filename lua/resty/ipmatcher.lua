-- `require("resty.ipmatcher")`: the subset of api7/lua-resty-ipmatcher that plugins use
-- (`new(list)` -> matcher with `:match(ip)`, `parse_ipv4`, `parse_ipv6`), over core.ip.
local ip = require("apisix.core.ip")

return {
    _VERSION = "0.6.1",
    new = ip.new_matcher,
    parse_ipv4 = ip.parse_ipv4,
    parse_ipv6 = ip.parse_ipv6,
}
