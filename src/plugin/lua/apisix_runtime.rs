//! `require("resty.apisix.client")`: the per-request client controls that APISIX-Runtime (APISIX's
//! patched OpenResty) gives plugins, and that APISIX's `real-ip`, `client-control` and
//! `proxy-control` call. Same names, arguments and return values (`true`, or `nil, err`).
//!
//! * `set_real_ip(ip, port?)`: the request's client address from now on (`$remote_addr`,
//!   `$remote_port`, the X-Forwarded-For sent upstream, the access log, later plugins); the
//!   connection's own stays in `$realip_remote_addr`/`$realip_remote_port`. A port of 0 or none
//!   leaves `$remote_port` empty, as nginx's realip module does.
//! * `set_client_max_body_size(bytes)`: this request's `client_max_body_size` (0: no limit),
//!   applied when the body is read, by a plugin or for the upstream.
//! * `set_proxy_request_buffering(on)`: read the whole body before the upstream request (it then
//!   goes with a Content-Length) instead of streaming it.
//! * `enable_mirror()`: request mirroring is not provided; it answers `nil, err`.

use std::net::{IpAddr, SocketAddr};

use mlua::{Lua, Table, Value};

use super::runtime::with_ctx;

/// Registers `resty.apisix.client` in `package.preload`.
pub(crate) fn install(lua: &Lua, preload: &Table) -> mlua::Result<()> {
    preload.set(
        "resty.apisix.client",
        lua.create_function(|lua, _: mlua::MultiValue| client_module(lua))?,
    )
}

fn client_module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set(
        "set_real_ip",
        lua.create_function(|lua, (ip, port): (mlua::String, Option<i64>)| {
            let parsed = std::str::from_utf8(&ip.as_bytes())
                .ok()
                .and_then(|s| s.parse::<IpAddr>().ok());
            let port = port.unwrap_or(0);
            let (Some(ip), Ok(port)) = (parsed, u16::try_from(port)) else {
                // APISIX-Runtime's answer for an address nginx cannot parse (NGX_ERROR).
                return fail(lua, "error while setting real ip, rc: -1");
            };
            with_ctx(|c| {
                c.client.realip_from.get_or_insert(c.remote_addr);
                c.remote_addr = SocketAddr::new(ip, port);
            })?;
            Ok((Value::Boolean(true), Value::Nil))
        })?,
    )?;
    m.set(
        "set_client_max_body_size",
        lua.create_function(|lua, bytes: Value| {
            let n = match bytes {
                Value::Integer(n) if n >= 0 => n as u64,
                Value::Number(n) if n >= 0.0 && n.is_finite() => n as u64,
                Value::String(s) => match s.to_str().ok().and_then(|s| s.parse::<u64>().ok()) {
                    Some(n) => n,
                    None => return fail(lua, "error while setting client max body size"),
                },
                _ => return fail(lua, "error while setting client max body size"),
            };
            with_ctx(|c| c.client.max_body_size = n)?;
            Ok((Value::Boolean(true), Value::Nil))
        })?,
    )?;
    m.set(
        "set_proxy_request_buffering",
        lua.create_function(|_, on: Value| {
            let on = !matches!(on, Value::Nil | Value::Boolean(false));
            with_ctx(|c| c.client.request_buffering = on)?;
            Ok((Value::Boolean(true), Value::Nil))
        })?,
    )?;
    m.set(
        "enable_mirror",
        lua.create_function(|lua, ()| fail(lua, "request mirroring is not supported"))?,
    )?;
    Ok(m)
}

fn fail(lua: &Lua, msg: &str) -> mlua::Result<(Value, Value)> {
    Ok((Value::Nil, Value::String(lua.create_string(msg)?)))
}
