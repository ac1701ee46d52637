--- apisix.router: the parts of APISIX's router module that plugins call, over moongate's own
-- router and the published config:
--   api                -> apisix.api_router (`api.match(ctx)`: the plugins' API endpoints)
--   http_routes()      -> { { value = route conf, key, modifiedIndex }, ... }, conf_version
-- Route matching itself is moongate's (Rust); this module does not match requests to routes.
local mg = __moongate

local _M = { version = 0.1 }

_M.api = require("apisix.api_router")

function _M.http_routes()
    return mg.routes()
end

return _M
