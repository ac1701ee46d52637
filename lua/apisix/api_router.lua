--- apisix.api_router: the API endpoints plugins declare with `api()`, as APISIX's public-api
-- plugin serves them. Each enabled plugin's `api()` returns a list of
-- `{ methods = {...}, uri = "/path" or {...}, handler = function(ctx) }`; `match(ctx)` finds
-- the one for `ctx.var.uri` and the request method and runs its handler. A handler that
-- returns `code, body` ends the request with them (a table body as JSON). The routes are
-- rebuilt when the set of loaded plugins changes (a reload).
local core = require("apisix.core")
local radixtree = require("resty.radixtree")
local mg = __moongate
local ipairs = ipairs
local type = type

local _M = {}

local built_key, built_router
local outside_apisix

local function wrap(handler)
    return function(api_ctx)
        local code, body = handler(api_ctx)
        if code or body then
            if type(body) == "table" and ngx.header["Content-Type"] == nil then
                core.response.set_header("Content-Type", "application/json")
            end
            core.response.exit(code, body)
        end
    end
end

local function build(modules)
    local routes = {}
    local outside = false
    for _, mod in ipairs(modules) do
        local list = mod.api()
        for _, route in ipairs(type(list) == "table" and list or {}) do
            if route.uri == nil then
                core.log.error("got nil uri in api route: ", core.json.delay_encode(route, true))
                break
            end
            local uris = type(route.uri) == "table" and route.uri or { route.uri }
            for _, uri in ipairs(uris) do
                if not core.string.has_prefix(uri, "/apisix/") then
                    outside = true
                end
            end
            routes[#routes + 1] = {
                methods = route.methods,
                paths = route.uri,
                handler = wrap(route.handler),
            }
        end
    end
    local router, err = radixtree.new(routes)
    if not router then
        return nil, err
    end
    return router, outside
end

local function current()
    local modules, key = mg.api_plugins()
    if built_router and key == built_key then
        return built_router
    end
    local router, outside = build(modules)
    if not router then
        core.log.error("failed to build the plugins' API routes: ", outside)
        return nil
    end
    built_key, built_router, outside_apisix = key, router, outside
    return router
end

--- Whether some plugin declares an API path outside `/apisix/` (true until the routes are
-- first built, as APISIX answers).
function _M.has_route_not_under_apisix()
    if outside_apisix == nil then
        return true
    end
    return outside_apisix
end

--- Runs the API endpoint for `api_ctx.var.uri` and the request's method; false when none
-- matches. A handler ending the request does not return here.
function _M.match(api_ctx)
    local router = current()
    if not router then
        return false
    end
    local opts = { method = api_ctx.var.request_method }
    return router:dispatch(api_ctx.var.uri, opts, api_ctx)
end

return _M
