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
//!
//! `require("resty.apisix.upstream")`, for a plugin that calls the upstream itself (APISIX's
//! `ai-proxy`), so the access log and loggers show that call:
//!
//! * `push_upstream_state({addr, status, connect_time, header_time})`: `$upstream_addr` and
//!   `$upstream_status` from now on (the last call pushed; nginx would list every one).
//! * `update_upstream_state({response_time, response_length})`: `$upstream_response_time` from
//!   `response_time` (milliseconds). The connect and header times and the length are taken and
//!   not shown (moongate has no `$upstream_connect_time`, `$upstream_header_time`,
//!   `$upstream_response_length`). The SSL setters of APISIX-Runtime's module are not provided.
//!
//! And `require("resty.apisix.response")`, what APISIX's `gzip` calls:
//!
//! * `set_gzip({buffer_num, buffer_size, compress_level})`: compress this response with gzip at
//!   that level (1-9), where nginx's gzip filter would ([`crate::compress`]). Called in
//!   header_filter, before the head goes out; the buffer sizes are checked and otherwise unused.

use std::net::{IpAddr, SocketAddr};

use mlua::{Lua, Table, Value};

use super::runtime::with_ctx;

/// Registers `resty.apisix.client` in `package.preload`.
pub(crate) fn install(lua: &Lua, preload: &Table) -> mlua::Result<()> {
    preload.set(
        "resty.apisix.client",
        lua.create_function(|lua, _: mlua::MultiValue| client_module(lua))?,
    )?;
    preload.set(
        "resty.apisix.response",
        lua.create_function(|lua, _: mlua::MultiValue| response_module(lua))?,
    )?;
    preload.set(
        "resty.apisix.upstream",
        lua.create_function(|lua, _: mlua::MultiValue| upstream_module(lua))?,
    )
}

/// A number option of an upstream state table: nil when absent.
fn state_number(opts: &Table, key: &str) -> mlua::Result<Option<f64>> {
    Ok(match opts.get::<Value>(key)? {
        Value::Integer(n) => Some(n as f64),
        Value::Number(n) if n.is_finite() => Some(n),
        _ => None,
    })
}

fn upstream_module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set(
        "push_upstream_state",
        lua.create_function(|lua, opts: Value| {
            let Value::Table(opts) = opts else {
                return fail(lua, "opts must be a table");
            };
            let addr = match opts.get::<Value>("addr")? {
                Value::Nil => None,
                Value::String(s) => Some(s.to_str()?.to_string()),
                _ => return fail(lua, "addr must be a string"),
            };
            let status = state_number(&opts, "status")?
                .filter(|s| *s > 0.0 && *s < 1000.0)
                .map(|s| s as u16);
            let pushed = with_ctx(|c| {
                if let Some(a) = addr {
                    c.upstream_addr = Some(a.into());
                }
                if let Some(s) = status {
                    c.upstream_status = Some(s);
                }
            });
            if pushed.is_err() {
                return fail(lua, "no request found");
            }
            Ok((Value::Boolean(true), Value::Nil))
        })?,
    )?;
    m.set(
        "update_upstream_state",
        lua.create_function(|lua, opts: Value| {
            let Value::Table(opts) = opts else {
                return fail(lua, "opts must be a table");
            };
            let ms = state_number(&opts, "response_time")?.filter(|t| *t >= 0.0);
            let updated = with_ctx(|c| {
                if let Some(ms) = ms {
                    c.upstream_response_time = Some(ms / 1000.0);
                }
            });
            if updated.is_err() {
                return fail(lua, "no request found");
            }
            Ok((Value::Boolean(true), Value::Nil))
        })?,
    )?;
    Ok(m)
}

fn response_module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set(
        "set_gzip",
        lua.create_function(|lua, opts: Value| {
            let Value::Table(opts) = opts else {
                return Err(mlua::Error::runtime(format!(
                    "bad opts type: {}",
                    opts.type_name()
                )));
            };
            let int = |k: &str| -> mlua::Result<Option<i64>> {
                Ok(match opts.get::<Value>(k)? {
                    Value::Integer(n) => Some(n),
                    Value::Number(n) if n.fract() == 0.0 => Some(n as i64),
                    _ => None,
                })
            };
            let (Some(num), Some(size), Some(level)) = (
                int("buffer_num")?,
                int("buffer_size")?,
                int("compress_level")?,
            ) else {
                return fail(lua, "failed to set gzip");
            };
            if num < 1 || size < 1 || !(1..=9).contains(&level) {
                return fail(lua, "failed to set gzip");
            }
            with_ctx(|c| {
                c.gzip = Some(crate::compress::GzipRequest {
                    level: level as u32,
                })
            })?;
            Ok((Value::Boolean(true), Value::Nil))
        })?,
    )?;
    Ok(m)
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
