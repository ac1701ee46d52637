--- apisix.utils.auth: helpers APISIX's auth plugins share.
local _M = { version = 0.1 }

--- True while `multi-auth` runs the auth plugin (it wants the raw failure reason).
function _M.is_running_under_multi_auth(ctx)
    return ctx ~= nil and ctx._plugin_name == "multi-auth"
end

return _M
