-- `require("cjson.safe")`: lua-cjson's API that returns `nil, err` instead of raising.
return require("cjson").__new(true)
