--- ngx.re as a module (`local ngx_re = require("ngx.re")`), as lua-resty-core provides it:
-- the same table as the global `ngx.re` (`split`, `opt`, and the matching functions).
return ngx.re
