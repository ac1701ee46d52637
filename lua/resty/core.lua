--- resty.core: in OpenResty this installs the FFI versions of the ngx API. moongate's `ngx` is
-- native already, so requiring it only has to succeed.
return { version = 0.1 }
