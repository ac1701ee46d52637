--- core.version: the gateway's version, as APISIX exposes its own (`core.version.VERSION`).
local mg = __moongate
return {
    VERSION = (mg and type(mg.version) == "string") and mg.version or "0.1.0",
}
