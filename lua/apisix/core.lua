--- apisix.core: the API APISIX plugins program against, re-implemented for moongate.
-- `local core = require("apisix.core")`, then `core.log`, `core.json`, `core.table`,
-- `core.string`, `core.schema`, `core.request`, `core.response`, `core.ctx`, `core.utils`,
-- `core.lrucache`, `core.ip`, `core.config.local_conf()`, `core.version.VERSION`,
-- `core.sleep`, `core.tablepool`. docs/plugin-guide.md lists every function.
local config_local = require("apisix.core.config_local")
local utils = require("apisix.core.utils")

return {
    version = require("apisix.core.version"),
    log = require("apisix.core.log"),
    config = {
        type = "yaml",
        local_conf = config_local.local_conf,
    },
    config_local = config_local,
    sleep = utils.sleep,
    json = require("apisix.core.json"),
    table = require("apisix.core.table"),
    request = require("apisix.core.request"),
    response = require("apisix.core.response"),
    lrucache = require("apisix.core.lrucache"),
    schema = require("apisix.core.schema"),
    string = require("apisix.core.string"),
    ctx = require("apisix.core.ctx"),
    utils = utils,
    ip = require("apisix.core.ip"),
    tablepool = require("tablepool"),
    empty_tab = {},
}
