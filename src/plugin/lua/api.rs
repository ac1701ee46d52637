//! The Rust-provided Lua API: the global `ngx` (OpenResty's names and semantics) and the
//! internal `__moongate` table the Lua layer (`lua/apisix/core*.lua`) builds on, plus `require`
//! support for the embedded `lua/` tree and for plugins in `plugin_dirs`.
//!
//! Request-bound functions read the request through the runtime's frame (see `runtime.rs`) and
//! fail with a Lua error outside a request.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method};
use md5::{Digest, Md5};
use mlua::{Function, Lua, MultiValue, Table, Value};

use super::convert::{self, Unsupported, ARRAY_MT};
use super::embedded;
use super::fast;
use super::prelude::PRELUDE;
use super::runtime::{self, frame, lua_request, with_chunk, with_ctx, with_head, LuaRequest};
use super::Settings;
use crate::body::RequestBody;
use crate::plugin::{Ctx, Phase, Schema};

/// Registry name of the lazy `ctx` metatable.
pub(crate) const CTX_MT: &str = "moongate.ctx_mt";
const HEADERS_MT: &str = "moongate.headers_mt";
const HEADERS_MT_C: &std::ffi::CStr = c"moongate.headers_mt";
const SCHEMA_CACHE: &str = "moongate.schema_cache";

/// OpenResty's log levels.
const NGX_LEVELS: [(&str, i64); 9] = [
    ("STDERR", 0),
    ("EMERG", 1),
    ("ALERT", 2),
    ("CRIT", 3),
    ("ERR", 4),
    ("WARN", 5),
    ("NOTICE", 6),
    ("INFO", 7),
    ("DEBUG", 8),
];

const HTTP_STATUS: &[(&str, i64)] = &[
    ("HTTP_CONTINUE", 100),
    ("HTTP_SWITCHING_PROTOCOLS", 101),
    ("HTTP_OK", 200),
    ("HTTP_CREATED", 201),
    ("HTTP_ACCEPTED", 202),
    ("HTTP_NO_CONTENT", 204),
    ("HTTP_PARTIAL_CONTENT", 206),
    ("HTTP_SPECIAL_RESPONSE", 300),
    ("HTTP_MOVED_PERMANENTLY", 301),
    ("HTTP_MOVED_TEMPORARILY", 302),
    ("HTTP_SEE_OTHER", 303),
    ("HTTP_NOT_MODIFIED", 304),
    ("HTTP_TEMPORARY_REDIRECT", 307),
    ("HTTP_PERMANENT_REDIRECT", 308),
    ("HTTP_BAD_REQUEST", 400),
    ("HTTP_UNAUTHORIZED", 401),
    ("HTTP_PAYMENT_REQUIRED", 402),
    ("HTTP_FORBIDDEN", 403),
    ("HTTP_NOT_FOUND", 404),
    ("HTTP_NOT_ALLOWED", 405),
    ("HTTP_NOT_ACCEPTABLE", 406),
    ("HTTP_REQUEST_TIMEOUT", 408),
    ("HTTP_CONFLICT", 409),
    ("HTTP_GONE", 410),
    ("HTTP_UPGRADE_REQUIRED", 426),
    ("HTTP_TOO_MANY_REQUESTS", 429),
    ("HTTP_CLOSE", 444),
    ("HTTP_ILLEGAL", 451),
    ("HTTP_INTERNAL_SERVER_ERROR", 500),
    ("HTTP_METHOD_NOT_IMPLEMENTED", 501),
    ("HTTP_BAD_GATEWAY", 502),
    ("HTTP_SERVICE_UNAVAILABLE", 503),
    ("HTTP_GATEWAY_TIMEOUT", 504),
    ("HTTP_VERSION_NOT_SUPPORTED", 505),
    ("HTTP_INSUFFICIENT_STORAGE", 507),
];

/// OpenResty's method constants (bit flags, as `ngx.req.set_method` takes them).
const HTTP_METHODS: &[(&str, i64)] = &[
    ("GET", 0x0002),
    ("HEAD", 0x0004),
    ("POST", 0x0008),
    ("PUT", 0x0010),
    ("DELETE", 0x0020),
    ("MKCOL", 0x0040),
    ("COPY", 0x0080),
    ("MOVE", 0x0100),
    ("OPTIONS", 0x0200),
    ("PROPFIND", 0x0400),
    ("PROPPATCH", 0x0800),
    ("LOCK", 0x1000),
    ("UNLOCK", 0x2000),
    ("PATCH", 0x4000),
    ("TRACE", 0x8000),
];

fn err(msg: impl Into<String>) -> mlua::Error {
    mlua::Error::runtime(msg.into())
}

fn phase_name(p: Option<Phase>) -> &'static str {
    match p {
        // OpenResty has one body filter phase; APISIX's delayed one runs inside it.
        Some(Phase::DelayedBodyFilter) => "body_filter",
        p => p.map(Phase::as_str).unwrap_or("init"),
    }
}

fn is_request_phase(p: Option<Phase>) -> bool {
    matches!(p, Some(Phase::Rewrite | Phase::Access | Phase::BeforeProxy))
}

/// The highest ngx log level that tracing lets through.
fn max_log_level() -> i64 {
    if tracing::enabled!(target: "moongate::lua", tracing::Level::DEBUG) {
        8
    } else if tracing::enabled!(target: "moongate::lua", tracing::Level::INFO) {
        7
    } else if tracing::enabled!(target: "moongate::lua", tracing::Level::WARN) {
        5
    } else {
        4
    }
}

/// Installs `ngx`, `__moongate`, the require hooks and the prelude into `lua`.
pub fn install(lua: &Lua, settings: &Settings) -> mlua::Result<()> {
    // First: every Lua source loaded after this captures the string-raising `pcall`.
    super::errors::install(lua)?;
    let g = lua.globals();
    let ngx = lua.create_table()?;
    let mg = lua.create_table()?;

    let array_mt = lua.create_table()?;
    lua.set_named_registry_value(ARRAY_MT, &array_mt)?;
    mg.set("array_mt", &array_mt)?;
    let cache = lua.create_table()?;
    let weak = lua.create_table()?;
    weak.set("__mode", "k")?;
    cache.set_metatable(Some(weak))?;
    lua.set_named_registry_value(SCHEMA_CACHE, cache)?;
    let headers_mt: Table = lua
        .load(
            r#"local type, rawget, lower, find, gsub = type, rawget, string.lower, string.find, string.gsub
            return { __index = function(t, k)
                if type(k) ~= "string" then return nil end
                -- gsub only when needed: it stops LuaJIT's trace, lower and a plain find do not.
                local lk = lower(k)
                if find(lk, "_", 1, true) then lk = gsub(lk, "_", "-") end
                return rawget(t, lk)
            end }"#,
        )
        .set_name("=moongate.headers_mt")
        .eval()?;
    lua.set_named_registry_value(HEADERS_MT, headers_mt)?;

    constants(lua, &ngx)?;
    install_misc(lua, &ngx, &mg)?;
    install_req(lua, &ngx)?;
    install_resp(lua, &ngx)?;
    install_internal(lua, &mg)?;
    super::re::install(lua, &ngx, &mg)?;
    install_consumers(lua, &mg)?;
    super::upstream::install(lua, &mg)?;
    super::resources::install(lua, &mg)?;
    super::metrics::install(lua, &mg)?;
    install_plugin_metadata(lua, &mg)?;
    install_local_conf(lua, &mg)?;
    install_require(lua, settings)?;

    g.set("ngx", &ngx)?;
    g.set("__moongate", &mg)?;
    lua.load(PRELUDE)
        .set_name("=moongate.prelude")
        .call::<()>((ngx, &mg))?;
    let ctx_mt: Table = mg.get("CTX_MT")?;
    lua.set_named_registry_value(CTX_MT, ctx_mt)?;
    Ok(())
}

fn constants(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    for (k, v) in NGX_LEVELS {
        ngx.set(k, v)?;
    }
    for (k, v) in HTTP_STATUS {
        ngx.set(*k, *v)?;
    }
    for (k, v) in HTTP_METHODS {
        ngx.set(format!("HTTP_{k}"), *v)?;
    }
    ngx.set("OK", 0)?;
    ngx.set("ERROR", -1)?;
    ngx.set("AGAIN", -2)?;
    ngx.set("DONE", -4)?;
    ngx.set("DECLINED", -5)?;
    ngx.set("null", convert::null())?;
    let config = lua.create_table()?;
    config.set("subsystem", "http")?;
    config.set("debug", false)?;
    config.set("ngx_lua_version", 10026)?;
    config.set("nginx_version", 1025003)?;
    config.set("is_console", false)?;
    config.set("nginx_configure", lua.create_function(|_, ()| Ok(""))?)?;
    config.set(
        "prefix",
        lua.create_function(|_, ()| {
            Ok(std::env::current_dir()
                .map(|d| format!("{}/", d.display()))
                .unwrap_or_else(|_| "./".into()))
        })?,
    )?;
    ngx.set("config", config)?;
    let worker = lua.create_table()?;
    worker.set("id", lua.create_function(|_, ()| Ok(worker_id()))?)?;
    worker.set(
        "count",
        lua.create_function(|_, ()| Ok(super::worker_count()))?,
    )?;
    worker.set("pid", lua.create_function(|_, ()| Ok(std::process::id()))?)?;
    worker.set("exiting", lua.create_function(|_, ()| Ok(false))?)?;
    ngx.set("worker", worker)?;
    super::shared_dict::install(lua, ngx)?;
    super::timer::install(lua, ngx)?;
    super::cosocket::install(lua, ngx)?;
    super::thread::install(lua, ngx)?;
    super::runtime::install_coroutines(lua)?;
    Ok(())
}

/// `ngx.worker.id()`: the worker number (threads are named `moongate-worker-N`); nil elsewhere.
fn worker_id() -> Option<i64> {
    std::thread::current()
        .name()
        .and_then(|n| n.strip_prefix("moongate-worker-"))
        .and_then(|n| n.parse().ok())
}

fn install_misc(lua: &Lua, ngx: &Table, _mg: &Table) -> mlua::Result<()> {
    ngx.set(
        "encode_base64",
        lua.create_function(|_, (s, no_pad): (mlua::String, Option<bool>)| {
            let b = s.as_bytes();
            Ok(if no_pad.unwrap_or(false) {
                base64::engine::general_purpose::STANDARD_NO_PAD.encode(&*b)
            } else {
                base64::engine::general_purpose::STANDARD.encode(&*b)
            })
        })?,
    )?;
    ngx.set(
        "decode_base64",
        lua.create_function(|lua, s: mlua::String| {
            let b = s.as_bytes();
            let cfg = base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent);
            let eng = base64::engine::GeneralPurpose::new(&base64::alphabet::STANDARD, cfg);
            match eng.decode(&*b) {
                Ok(v) => Ok(Value::String(lua.create_string(v)?)),
                Err(_) => Ok(Value::Nil),
            }
        })?,
    )?;
    ngx.set(
        "escape_uri",
        lua.create_function(|lua, (s, kind): (mlua::String, Option<i64>)| {
            lua.create_string(escape_uri(&s.as_bytes(), kind.unwrap_or(2)))
        })?,
    )?;
    ngx.set(
        "unescape_uri",
        lua.create_function(|lua, s: mlua::String| lua.create_string(unescape_uri(&s.as_bytes())))?,
    )?;
    ngx.set(
        "encode_args",
        lua.create_function(|_, t: Table| encode_args(&t))?,
    )?;
    ngx.set(
        "decode_args",
        lua.create_function(|lua, (s, max): (mlua::String, Option<i64>)| {
            decode_args(lua, &s.as_bytes(), max.unwrap_or(100))
        })?,
    )?;
    ngx.set(
        "md5",
        lua.create_function(|_, s: mlua::String| {
            let d = Md5::digest(&*s.as_bytes());
            Ok(hex(&d))
        })?,
    )?;
    ngx.set(
        "md5_bin",
        lua.create_function(|lua, s: mlua::String| {
            lua.create_string(Md5::digest(&*s.as_bytes()).as_slice())
        })?,
    )?;
    ngx.set(
        "sha1_bin",
        lua.create_function(|lua, s: mlua::String| {
            let d = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &s.as_bytes());
            lua.create_string(d.as_ref())
        })?,
    )?;
    let crc = lua.create_function(|_, s: mlua::String| Ok(crc32(&s.as_bytes())))?;
    ngx.set("crc32_short", crc.clone())?;
    ngx.set("crc32_long", crc)?;
    ngx.set("now", lua.create_function(|_, ()| Ok(now_secs()))?)?;
    ngx.set(
        "time",
        lua.create_function(|_, ()| Ok(now_secs().floor() as i64))?,
    )?;
    ngx.set("update_time", lua.create_function(|_, ()| Ok(()))?)?;
    ngx.set(
        "today",
        lua.create_function(|_, ()| {
            let (y, m, d, ..) = civil(now_secs() as i64);
            Ok(format!("{y:04}-{m:02}-{d:02}"))
        })?,
    )?;
    let datetime = lua.create_function(|_, ()| {
        let (y, mo, d, h, mi, s, _) = civil(now_secs() as i64);
        Ok(format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}"))
    })?;
    ngx.set("localtime", datetime.clone())?;
    ngx.set("utctime", datetime)?;
    ngx.set(
        "http_time",
        lua.create_function(|_, t: f64| Ok(http_time(t as i64)))?,
    )?;
    ngx.set(
        "cookie_time",
        lua.create_function(|_, t: f64| {
            let (y, mo, d, h, mi, s, wd) = civil(t as i64);
            Ok(format!(
                "{}, {:02}-{}-{:02} {h:02}:{mi:02}:{s:02} GMT",
                WEEKDAYS[wd],
                d,
                MONTHS[(mo - 1) as usize],
                y % 100
            ))
        })?,
    )?;
    ngx.set(
        "get_phase",
        lua.create_function(|_, ()| {
            Ok(if super::timer::in_timer() {
                "timer"
            } else {
                phase_name(frame().phase)
            })
        })?,
    )?;
    ngx.set(
        "sleep",
        runtime::create_waiting_function(lua, |_, secs: f64| async move {
            if tokio::runtime::Handle::try_current().is_err() {
                return Err(err(
                    "API disabled in the current context: ngx.sleep needs a request",
                ));
            }
            let secs = if secs.is_finite() && secs > 0.0 {
                secs
            } else {
                0.0
            };
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            Ok(())
        })?,
    )?;
    ngx.set("flush", lua.create_function(|_, _: MultiValue| Ok(1))?)?;
    ngx.set("eof", lua.create_function(|_, _: MultiValue| Ok(1))?)?;
    Ok(())
}

fn install_req(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let req = lua.create_table()?;
    req.set(
        "get_method",
        fast::wrap(
            lua,
            lua.create_function(|_, ()| with_ctx(|c| c.method.as_str().to_string()))?,
            fast::get_method,
        )?,
    )?;
    req.set(
        "set_method",
        lua.create_function(|_, m: Value| {
            let name = match &m {
                Value::Integer(i) => method_by_flag(*i),
                Value::Number(n) => method_by_flag(*n as i64),
                Value::String(s) => Some(s.to_string_lossy()),
                _ => None,
            }
            .ok_or_else(|| err("unsupported HTTP method"))?;
            let method =
                Method::from_bytes(name.as_bytes()).map_err(|_| err("unsupported HTTP method"))?;
            with_ctx(|c| c.method = method)
        })?,
    )?;
    req.set(
        "get_headers",
        fast::wrap(
            lua,
            lua.create_function(|lua, (max, raw): (Option<i64>, Option<bool>)| {
                let flat = with_ctx(|c| FlatHeaders::of(&c.headers))?;
                headers_table(lua, &flat, max.unwrap_or(100), raw.unwrap_or(false))
            })?,
            fast::get_headers,
        )?,
    )?;
    req.set(
        "set_header",
        fast::wrap(
            lua,
            lua.create_function(|_, (name, value): (mlua::String, Value)| {
                put_request_header(&name, &value, true)
            })?,
            fast::set_header,
        )?,
    )?;
    req.set(
        "add_header",
        fast::wrap(
            lua,
            lua.create_function(|_, (name, value): (mlua::String, Value)| {
                put_request_header(&name, &value, false)
            })?,
            fast::add_header,
        )?,
    )?;
    req.set(
        "clear_header",
        fast::wrap(
            lua,
            lua.create_function(|_, name: mlua::String| {
                let name = header_name(&name.as_bytes())?;
                with_ctx(|c| {
                    c.headers.remove(&name);
                })
            })?,
            fast::clear_header,
        )?,
    )?;
    req.set(
        "get_uri_args",
        lua.create_function(|lua, max: Option<i64>| {
            let args = with_ctx(|c| c.args.clone())?;
            decode_args(
                lua,
                args.as_deref().unwrap_or("").as_bytes(),
                max.unwrap_or(100),
            )
        })?,
    )?;
    req.set(
        "set_uri_args",
        lua.create_function(|_, args: Value| {
            let encoded = match &args {
                Value::String(s) => s.to_string_lossy(),
                Value::Table(t) => encode_args(t)?,
                Value::Nil => String::new(),
                _ => {
                    return Err(err(
                        "bad argument #1 to 'set_uri_args' (string or table expected)",
                    ))
                }
            };
            with_ctx(|c| {
                c.args = if encoded.is_empty() {
                    None
                } else {
                    Some(encoded)
                };
                rebuild_upstream_uri(c);
            })
        })?,
    )?;
    req.set(
        "set_uri",
        lua.create_function(|_, (uri, jump): (String, Option<bool>)| {
            if jump.unwrap_or(false) {
                return Err(err("ngx.req.set_uri with jump = true is not supported"));
            }
            if uri.is_empty() {
                return Err(err("attempt to use zero-length uri"));
            }
            with_ctx(|c| {
                c.uri = uri;
                let path = escape_uri(c.uri.as_bytes(), 0);
                let path = String::from_utf8_lossy(&path).into_owned();
                c.upstream_uri = Some(match &c.args {
                    Some(a) => format!("{path}?{a}"),
                    None => path,
                });
            })
        })?,
    )?;
    req.set(
        "read_body",
        runtime::create_waiting_function(lua, |_, ()| async move {
            // The request's client_max_body_size holds here too (nginx checks it as the body
            // is read): a chunked body has no length to refuse up front.
            let (mut body, limit) =
                with_ctx(|c| (std::mem::take(&mut c.body), c.client.body_limit()))?;
            let r = body.read_all(limit.unwrap_or(u64::MAX)).await;
            // The request may have moved on to another poll; put the body back through the
            // frame of this request (the coroutine only resumes inside its own request's poll).
            match r {
                Ok(Some(b)) => with_ctx(|c| c.body = RequestBody::Full(b))?,
                Ok(None) => with_ctx(|c| c.body = RequestBody::Empty)?,
                Err(e) => match e.client_fault() {
                    // The client's error, not the plugin's: the runtime ends the request with
                    // it instead of resuming the plugin.
                    Some(fault) => with_ctx(|c| {
                        fault.log(c.route_id(), &c.remote_addr, &e);
                        lua_request(c).body_fault = Some(fault);
                    })?,
                    None => return Err(err(e.to_string())),
                },
            }
            Ok(())
        })?,
    )?;
    req.set(
        "get_body_data",
        lua.create_function(|lua, ()| {
            let b = with_ctx(|c| c.body_for_log())?;
            match b {
                Some(b) => Ok(Value::String(lua.create_string(&b[..])?)),
                None => Ok(Value::Nil),
            }
        })?,
    )?;
    req.set(
        "set_body_data",
        lua.create_function(|_, s: mlua::String| {
            let b = Bytes::copy_from_slice(&s.as_bytes());
            with_ctx(|c| c.body = RequestBody::Full(b))
        })?,
    )?;
    req.set(
        "get_body_file",
        lua.create_function(|_, ()| Ok(Value::Nil))?,
    )?;
    req.set("discard_body", lua.create_function(|_, ()| Ok(()))?)?;
    req.set("is_internal", lua.create_function(|_, ()| Ok(false))?)?;
    req.set(
        "get_post_args",
        lua.create_function(|lua, max: Option<i64>| {
            let b = with_ctx(|c| match &c.body {
                RequestBody::Full(b) => Ok(Some(b.clone())),
                RequestBody::Empty => Ok(None),
                RequestBody::Stream(_) => Err(()),
            })?;
            match b {
                Ok(Some(b)) => decode_args(lua, &b, max.unwrap_or(100)),
                Ok(None) => decode_args(lua, b"", 100),
                Err(()) => Err(err("request body not read")),
            }
        })?,
    )?;
    req.set(
        "http_version",
        lua.create_function(|_, ()| {
            with_ctx(|c| match c.version {
                http::Version::HTTP_09 => 0.9,
                http::Version::HTTP_10 => 1.0,
                http::Version::HTTP_2 => 2.0,
                http::Version::HTTP_3 => 3.0,
                _ => 1.1,
            })
        })?,
    )?;
    req.set(
        "start_time",
        lua.create_function(|_, ()| {
            with_ctx(|c| {
                c.start_time
                    .duration_since(UNIX_EPOCH)
                    .map(|d| (d.as_millis() as f64) / 1000.0)
                    .unwrap_or(0.0)
            })
        })?,
    )?;
    req.set(
        "raw_header",
        lua.create_function(|_, no_request_line: Option<bool>| {
            with_ctx(|c| {
                let mut s = String::new();
                if !no_request_line.unwrap_or(false) {
                    let _ = write!(s, "{} {} HTTP/1.1\r\n", c.method, c.request_uri);
                }
                for (k, v) in &c.headers {
                    let _ = write!(s, "{}: {}\r\n", k, String::from_utf8_lossy(v.as_bytes()));
                }
                s.push_str("\r\n");
                s
            })
        })?,
    )?;
    ngx.set("req", req)?;
    Ok(())
}

fn install_resp(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let resp = lua.create_table()?;
    resp.set(
        "get_headers",
        lua.create_function(|lua, (max, raw): (Option<i64>, Option<bool>)| {
            let flat = response_headers()?;
            headers_table(lua, &flat, max.unwrap_or(100), raw.unwrap_or(false))
        })?,
    )?;
    resp.set(
        "add_header",
        lua.create_function(|_, (name, value): (mlua::String, Value)| {
            let name = header_name(&name.as_bytes())?;
            let values = header_values(&value)?;
            set_response_header(name, values, true)
        })?,
    )?;
    ngx.set("resp", resp)?;
    Ok(())
}

/// The response headers as the current phase sees them: the response head in header_filter,
/// the staged ones before the response exists.
fn response_headers() -> mlua::Result<FlatHeaders> {
    if let Some(flat) = with_head(|h| FlatHeaders::of(&h.headers)) {
        return Ok(flat);
    }
    with_ctx(|c| FlatHeaders::of(&c.staged_headers))
}

fn set_response_header(name: HeaderName, values: Vec<HeaderValue>, add: bool) -> mlua::Result<()> {
    let apply = |h: &mut HeaderMap| {
        if !add {
            h.remove(&name);
        }
        for v in values.iter() {
            h.append(name.clone(), v.clone());
        }
    };
    if with_head(|h| apply(&mut h.headers)).is_some() {
        return Ok(());
    }
    let fr = frame();
    if matches!(
        fr.phase,
        Some(Phase::BodyFilter | Phase::DelayedBodyFilter | Phase::Log)
    ) {
        tracing::warn!(
            target: "moongate::lua",
            plugin = %runtime::current_plugin(),
            "attempt to set ngx.header.{} after sending out response headers",
            name
        );
        return Ok(());
    }
    with_ctx(|c| apply(&mut c.staged_headers))
}

/// `ngx.req.set_header` (`replace`) and `ngx.req.add_header` on the request's headers.
fn put_request_header(name: &mlua::String, value: &Value, replace: bool) -> mlua::Result<()> {
    let name = header_name(&name.as_bytes())?;
    let values = header_values(value)?;
    with_ctx(|c| {
        let mut values = values.into_iter();
        if replace {
            // Every value replaced, the first where the old first one was (as nginx does).
            match values.next() {
                Some(first) => {
                    c.headers.insert(name.clone(), first);
                }
                None => {
                    c.headers.remove(&name);
                }
            }
        }
        for v in values {
            c.headers.append(name.clone(), v);
        }
    })
}

fn install_internal(lua: &Lua, mg: &Table) -> mlua::Result<()> {
    mg.set("log_level", max_log_level())?;
    mg.set(
        "log",
        lua.create_function(|_, (level, msg): (i64, String)| {
            let plugin = runtime::current_plugin();
            let phase = phase_name(frame().phase);
            match level {
                0..=4 => tracing::error!(target: "moongate::lua", plugin = %plugin, phase, "{msg}"),
                5 => tracing::warn!(target: "moongate::lua", plugin = %plugin, phase, "{msg}"),
                6 | 7 => tracing::info!(target: "moongate::lua", plugin = %plugin, phase, "{msg}"),
                _ => tracing::debug!(target: "moongate::lua", plugin = %plugin, phase, "{msg}"),
            }
            Ok(())
        })?,
    )?;
    mg.set(
        "json_encode",
        lua.create_function(|lua, v: Value| match convert::encode(lua, &v) {
            Ok(s) => Ok((Value::String(lua.create_string(s)?), Value::Nil)),
            Err(e) => Ok((Value::Nil, Value::String(lua.create_string(e)?))),
        })?,
    )?;
    mg.set(
        "json_decode",
        lua.create_function(|lua, s: mlua::String| {
            match serde_json::from_slice::<serde_json::Value>(&s.as_bytes()) {
                Ok(v) => Ok((convert::json_to_lua(lua, &v)?, Value::Nil)),
                Err(e) => Ok((
                    Value::Nil,
                    Value::String(
                        lua.create_string(format!("Expected value but found invalid token: {e}"))?,
                    ),
                )),
            }
        })?,
    )?;
    mg.set(
        "schema_check",
        lua.create_function(|lua, (schema, conf): (Table, Value)| {
            let compiled = match compiled_schema(lua, &schema) {
                Ok(s) => s,
                Err(e) => return Ok((false, Some(e))),
            };
            let mut json = match convert::lua_to_json(lua, &conf, Unsupported::Skip) {
                Ok(j) => j,
                Err(e) => return Ok((false, Some(e))),
            };
            let r = compiled.check(&mut json);
            if let Value::Table(t) = &conf {
                convert::fill_defaults(lua, t, &json)?;
            }
            Ok(match r {
                Ok(()) => (true, None),
                Err(e) => (false, Some(e)),
            })
        })?,
    )?;
    mg.set(
        "schema_valid",
        lua.create_function(|lua, schema: Value| {
            let Value::Table(t) = schema else {
                return Ok((false, Some("schema must be a table".to_string())));
            };
            Ok(match compiled_schema(lua, &t) {
                Ok(_) => (true, None),
                Err(e) => (false, Some(e)),
            })
        })?,
    )?;
    mg.set(
        "var_get",
        fast::wrap(
            lua,
            lua.create_function(|lua, k: mlua::String| {
                let k = k.to_str()?;
                if &*k == "binary_remote_addr" {
                    let b = with_ctx(|c| c.binary_remote_addr())?;
                    return Ok(Value::String(lua.create_string(b)?));
                }
                let v = with_ctx(|c| c.var(&k).map(Cow::into_owned))?;
                match v {
                    Some(v) => Ok(Value::String(lua.create_string(v)?)),
                    None => Ok(Value::Nil),
                }
            })?,
            fast::var_get,
        )?,
    )?;
    mg.set(
        "var_set",
        lua.create_function(|_, (k, v): (String, Option<String>)| {
            with_ctx(|c| set_var(c, &k, v))?.map_err(err)
        })?,
    )?;
    mg.set(
        "ctx_field",
        lua.create_function(|lua, k: String| ctx_field(lua, &k))?,
    )?;
    mg.set("get_api_ctx", lua.create_function(|lua, ()| api_ctx(lua))?)?;
    mg.set("get_ngx_ctx", lua.create_function(|lua, ()| ngx_ctx(lua))?)?;
    mg.set(
        "set_ngx_ctx",
        lua.create_function(|_, t: Table| with_ctx(|c| lua_request(c).ngx_ctx = Some(t)))?,
    )?;
    mg.set(
        "get_status",
        lua.create_function(|_, ()| {
            if let Some(s) = with_head(|h| h.status.as_u16()) {
                return Ok(s);
            }
            if frame().ctx.is_null() {
                return Ok(0);
            }
            with_ctx(|c| {
                c.data::<LuaRequest>()
                    .and_then(|r| r.status)
                    .unwrap_or(c.status)
            })
        })?,
    )?;
    mg.set(
        "set_status",
        lua.create_function(|_, v: Value| {
            let n = match v {
                Value::Integer(i) => i,
                Value::Number(n) => n as i64,
                Value::String(s) => s.to_str()?.parse().map_err(|_| err("invalid status"))?,
                _ => return Err(err("attempt to set ngx.status to a non-number")),
            };
            let code = u16::try_from(n)
                .ok()
                .and_then(|n| http::StatusCode::from_u16(n).ok())
                .ok_or_else(|| err(format!("invalid status {n}")))?;
            if with_head(|h| h.status = code).is_some() {
                return Ok(());
            }
            if is_request_phase(frame().phase) {
                return with_ctx(|c| lua_request(c).status = Some(code.as_u16()));
            }
            tracing::warn!(target: "moongate::lua", plugin = %runtime::current_plugin(), "attempt to set ngx.status after sending out response headers");
            Ok(())
        })?,
    )?;
    mg.set(
        "headers_sent",
        lua.create_function(|_, ()| {
            Ok(matches!(
                frame().phase,
                Some(Phase::BodyFilter | Phase::DelayedBodyFilter | Phase::Log)
            ))
        })?,
    )?;
    mg.set(
        "header_get",
        lua.create_function(|lua, k: mlua::String| {
            let name = k.to_string_lossy().replace('_', "-").to_ascii_lowercase();
            let values: Vec<String> = match with_head(|h| header_strings(&h.headers, &name)) {
                Some(v) => v,
                None => {
                    if frame().ctx.is_null() {
                        return Ok(Value::Nil);
                    }
                    with_ctx(|c| header_strings(&c.staged_headers, &name))?
                }
            };
            match values.len() {
                0 => Ok(Value::Nil),
                1 => Ok(Value::String(lua.create_string(&values[0])?)),
                _ => Ok(Value::Table(lua.create_sequence_from(values)?)),
            }
        })?,
    )?;
    mg.set(
        "header_set",
        lua.create_function(|_, (k, v): (mlua::String, Value)| {
            let name = k.to_string_lossy().replace('_', "-");
            let name = header_name(name.as_bytes())?;
            let values = header_values(&v)?;
            set_response_header(name, values, false)
        })?,
    )?;
    mg.set(
        "arg_get",
        lua.create_function(|lua, i: Value| {
            let idx = match i {
                Value::Integer(i) => i,
                Value::Number(n) => n as i64,
                _ => return Ok(Value::Nil),
            };
            let got = with_chunk(|c| match idx {
                1 => Some(Ok(c.data.clone())),
                2 => Some(Err(c.eof)),
                _ => None,
            });
            match got.flatten() {
                Some(Ok(b)) => Ok(Value::String(lua.create_string(&b[..])?)),
                Some(Err(eof)) => Ok(Value::Boolean(eof)),
                None => Ok(Value::Nil),
            }
        })?,
    )?;
    mg.set(
        "arg_set",
        lua.create_function(|_, (i, v): (i64, Value)| {
            let data = if i == 1 {
                Some(match &v {
                    Value::Nil => Bytes::new(),
                    Value::String(s) => Bytes::copy_from_slice(&s.as_bytes()),
                    Value::Table(t) => {
                        let mut out = Vec::new();
                        for item in t.sequence_values::<mlua::String>() {
                            out.extend_from_slice(&item?.as_bytes());
                        }
                        Bytes::from(out)
                    }
                    other => Bytes::from(other.to_string()?),
                })
            } else {
                None
            };
            let eof = !matches!(v, Value::Nil | Value::Boolean(false));
            with_chunk(|c| match i {
                1 => c.data = data.unwrap_or_default(),
                2 => c.eof = eof,
                _ => {}
            })
            .ok_or_else(|| {
                err("API disabled in the current context: ngx.arg is writable in body_filter only")
            })
        })?,
    )?;
    mg.set(
        "output",
        lua.create_function(|_, s: mlua::String| {
            if !is_request_phase(frame().phase) {
                return Err(err(format!(
                    "API disabled in the context of {}",
                    phase_name(frame().phase)
                )));
            }
            let b = s.as_bytes().to_vec();
            with_ctx(|c| lua_request(c).output.extend_from_slice(&b))?;
            Ok(1)
        })?,
    )?;
    mg.set(
        "can_exit",
        lua.create_function(|_, ()| Ok(is_request_phase(frame().phase)))?,
    )?;
    mg.set(
        "exit_async",
        runtime::create_waiting_function(lua, |_, status: i64| {
            // Runs now, inside the request's poll: record the exit. The future never completes;
            // the runtime sees the flag when the coroutine yields and ends the call.
            let recorded = with_ctx(|c| lua_request(c).exit = Some(status));
            async move {
                recorded?;
                std::future::pending::<()>().await;
                Ok(())
            }
        })?,
    )?;
    Ok(())
}

/// Compiles (once per schema table, cached weakly) a Lua schema.
fn compiled_schema(lua: &Lua, schema: &Table) -> Result<std::sync::Arc<Schema>, String> {
    let cache: Table = lua
        .named_registry_value(SCHEMA_CACHE)
        .map_err(|e| e.to_string())?;
    if let Ok(Value::UserData(ud)) = cache.raw_get::<Value>(schema) {
        if let Ok(s) = ud.borrow::<std::sync::Arc<Schema>>() {
            return Ok(s.clone());
        }
    }
    let json = convert::schema_to_json(lua, schema)?;
    let compiled = std::sync::Arc::new(Schema::compile(&json)?);
    if let Ok(ud) = lua.create_any_userdata(compiled.clone()) {
        let _ = cache.raw_set(schema, ud);
    }
    Ok(compiled)
}

/// Writes `ctx.var.NAME`.
fn set_var(c: &mut Ctx, k: &str, v: Option<String>) -> Result<(), String> {
    match k {
        "upstream_uri" => c.upstream_uri = v,
        "upstream_host" => c.upstream_host = v,
        "args" | "query_string" => {
            c.args = v.filter(|a| !a.is_empty());
            rebuild_upstream_uri(c);
        }
        "request_method" => {
            let m = v.ok_or("variable \"request_method\" cannot be cleared")?;
            c.method = Method::from_bytes(m.as_bytes())
                .map_err(|_| "unsupported HTTP method".to_string())?;
        }
        "uri" | "request_uri" | "host" | "scheme" | "remote_addr" | "remote_port"
        | "realip_remote_addr" | "realip_remote_port" | "server_addr" | "server_port"
        | "server_protocol" | "is_args" | "route_id" | "route_name" | "service_id"
        | "upstream_addr" | "upstream_status" | "status" | "request_time" | "msec" | "pid" => {
            return Err(format!("variable \"{k}\" not changeable"))
        }
        _ => match v {
            Some(v) => {
                c.vars.insert(k.to_string(), v);
            }
            None => {
                c.vars.remove(k);
            }
        },
    }
    Ok(())
}

/// After the query changed: the upstream gets the request's path with the new query (or the
/// plugin-set upstream_uri's path with it).
fn rebuild_upstream_uri(c: &mut Ctx) {
    let base = c.upstream_uri.as_deref().unwrap_or(&c.request_uri);
    let path = base
        .split_once('?')
        .map(|(p, _)| p)
        .unwrap_or(base)
        .to_string();
    c.upstream_uri = Some(match &c.args {
        Some(a) => format!("{path}?{a}"),
        None => path,
    });
}

/// The router's match: pattern, `:ext`, params.
type Matched = (String, Option<String>, Vec<(String, String)>);

/// The lazily filled fields of APISIX's `ctx`.
fn ctx_field(lua: &Lua, k: &str) -> mlua::Result<Value> {
    enum F {
        Str(Option<String>),
        Route(Option<(String, Option<String>, Option<String>)>),
        Matched(Option<Matched>),
        NgxCtx,
        Picked(Option<String>),
    }
    let f = with_ctx(|c| match k {
        "route_id" => F::Str(c.route.as_ref().map(|r| r.id.clone())),
        "route_name" => F::Str(c.route.as_ref().and_then(|r| r.name.clone())),
        "service_id" => F::Str(c.route.as_ref().and_then(|r| r.service_id.clone())),
        "conf_type" => F::Str((!c.conf_type.is_empty()).then(|| c.conf_type.to_string())),
        "conf_id" => F::Str((!c.conf_id.is_empty()).then(|| c.conf_id.to_string())),
        "conf_version" => F::Str((!c.conf_version.is_empty()).then(|| c.conf_version.to_string())),
        "matched_route" => F::Route(
            c.route
                .as_ref()
                .map(|r| (r.id.clone(), r.name.clone(), r.service_id.clone())),
        ),
        "curr_req_matched" | "matched_params" => F::Matched(
            c.matched
                .as_ref()
                .map(|m| (m.uri.to_string(), m.ext.clone(), m.params.clone())),
        ),
        "ngx_ctx" => F::NgxCtx,
        // APISIX's `ctx.picked_server`: the node the balancer chose for this try.
        "picked_server" => F::Picked(c.upstream_addr.as_deref().map(str::to_string)),
        "upstream_scheme" => F::Str(c.var("upstream_scheme").map(Cow::into_owned)),
        _ => F::Str(None),
    })?;
    Ok(match f {
        F::Str(Some(s)) => Value::String(lua.create_string(s)?),
        F::Str(None) | F::Route(None) | F::Matched(None) => Value::Nil,
        F::Route(Some((id, name, sid))) => {
            let value = lua.create_table()?;
            value.set("id", id.as_str())?;
            value.set("name", name)?;
            value.set("service_id", sid)?;
            let t = lua.create_table()?;
            t.set("key", format!("/apisix/routes/{id}"))?;
            t.set("value", value)?;
            Value::Table(t)
        }
        F::Matched(Some((path, ext, params))) => {
            let t = lua.create_table()?;
            if k == "curr_req_matched" {
                t.set("_path", path)?;
                if let Some(e) = ext {
                    t.set(":ext", e)?;
                }
            }
            for (name, v) in params {
                t.set(name, v)?;
            }
            Value::Table(t)
        }
        F::NgxCtx => Value::Table(ngx_ctx(lua)?),
        F::Picked(None) => Value::Nil,
        F::Picked(Some(addr)) => {
            let (host, port) = match addr.rsplit_once(':') {
                Some((h, p)) => (h.trim_start_matches('[').trim_end_matches(']'), p),
                None => (addr.as_str(), ""),
            };
            let t = lua.create_table()?;
            t.set("host", host)?;
            t.set("port", port.parse::<u16>().ok())?;
            Value::Table(t)
        }
    })
}

/// The request's `ctx` table (APISIX's `api_ctx`), made on first use.
pub(crate) fn api_ctx(_lua: &Lua) -> mlua::Result<Table> {
    let rt = runtime::current_runtime()
        .ok_or_else(|| err("API disabled in the current context: no request is being served"))?;
    let slot = with_ctx(|c| rt.ctx_slot(c))?;
    rt.ctx_table(slot)
}

/// `ngx.ctx`: a per-request table, with `api_ctx` set as APISIX does.
fn ngx_ctx(lua: &Lua) -> mlua::Result<Table> {
    if let Some(t) = with_ctx(|c| c.data::<LuaRequest>().and_then(|r| r.ngx_ctx.clone()))? {
        return Ok(t);
    }
    let t = lua.create_table()?;
    t.set("api_ctx", api_ctx(lua)?)?;
    let t2 = t.clone();
    with_ctx(move |c| lua_request(c).ngx_ctx = Some(t2))?;
    Ok(t)
}

fn header_strings(h: &HeaderMap, name: &str) -> Vec<String> {
    h.get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect()
}

/// A copy of a header map made for `get_headers`: every name and value in one buffer, so the
/// copy costs two allocations whatever the number of headers, and the table is built without
/// borrowing the request (building it allocates, which may run Lua finalizers).
#[derive(Default)]
pub(super) struct FlatHeaders {
    buf: Vec<u8>,
    /// Per header line: where its name and value end in `buf` (each starts where the previous
    /// piece ended), and whether it repeats the previous line's name.
    lines: Vec<(usize, usize, bool)>,
}

impl FlatHeaders {
    /// How many lines `get_headers(max)` returns, and its second result.
    pub(super) fn take(&self, max: i64) -> (usize, Option<&'static str>) {
        let take = if max > 0 {
            self.lines.len().min(max as usize)
        } else {
            self.lines.len()
        };
        (take, (take < self.lines.len()).then_some("truncated"))
    }

    pub(super) fn of(h: &HeaderMap) -> FlatHeaders {
        let size = h.iter().map(|(k, v)| k.as_str().len() + v.len()).sum();
        let mut flat = FlatHeaders {
            buf: Vec::with_capacity(size),
            lines: Vec::with_capacity(h.len()),
        };
        let mut prev: Option<&HeaderName> = None;
        // HeaderMap yields a name's values one after another.
        for (k, v) in h.iter() {
            let repeat = prev == Some(k);
            flat.buf.extend_from_slice(k.as_str().as_bytes());
            let name_end = flat.buf.len();
            flat.buf.extend_from_slice(v.as_bytes());
            flat.lines.push((name_end, flat.buf.len(), repeat));
            prev = Some(k);
        }
        flat
    }
}

/// `get_headers`' table: lower-case keys (with a metatable for `Content-Type`/`content_type`
/// lookups unless `raw`), repeated headers as arrays; `"truncated"` as the second value past `max`
/// lines.
///
/// The table is built with the C API inside one protected call: through mlua's table methods
/// every key and value would be a protected call of its own while a memory limit is set (a C
/// closure made and thrown away each), which made this cost 4 µs per header.
fn headers_table(
    lua: &Lua,
    flat: &FlatHeaders,
    max: i64,
    raw: bool,
) -> mlua::Result<(Table, Option<&'static str>)> {
    let (take, truncated) = flat.take(max);
    // SAFETY: runs inside mlua's protected call on an empty stack (LUA_MINSTACK free slots, of
    // which `push_headers` uses four) and leaves exactly the result table on it.
    let t: Table = unsafe { lua.exec_raw((), |l| push_headers(l, flat, take, raw))? };
    Ok((t, truncated))
}

/// Pushes `get_headers`' table for the first `take` lines of `flat`.
///
/// # Safety
/// Four free stack slots on `l`, in a protected call or a C function called from Lua (this
/// raises on out of memory); nothing that needs dropping may be live in the caller's frames if
/// it does.
pub(super) unsafe fn push_headers(
    l: *mut mlua::ffi::lua_State,
    flat: &FlatHeaders,
    take: usize,
    raw: bool,
) {
    use mlua::ffi;
    let lines = &flat.lines[..take];
    let buf = &flat.buf;
    let groups = lines.iter().filter(|x| !x.2).count();
    ffi::lua_createtable(l, 0, groups as _);
    let mut start = 0;
    let mut i = 0;
    while i < lines.len() {
        let (name_end, _, _) = lines[i];
        let name = &buf[start..name_end];
        let mut n = 1;
        while i + n < lines.len() && lines[i + n].2 {
            n += 1;
        }
        ffi::lua_pushlstring(l, name.as_ptr().cast(), name.len());
        if n > 1 {
            ffi::lua_createtable(l, n as _, 0);
        }
        for (j, &(name_end, value_end, _)) in lines[i..i + n].iter().enumerate() {
            let value = &buf[name_end..value_end];
            ffi::lua_pushlstring(l, value.as_ptr().cast(), value.len());
            if n > 1 {
                ffi::lua_rawseti(l, -2, (j + 1) as _);
            }
            start = value_end;
        }
        ffi::lua_rawset(l, -3);
        i += n;
    }
    if !raw {
        ffi::lua_getfield(l, ffi::LUA_REGISTRYINDEX, HEADERS_MT_C.as_ptr());
        ffi::lua_setmetatable(l, -2);
    }
}

fn header_name(b: &[u8]) -> mlua::Result<HeaderName> {
    HeaderName::from_bytes(b).map_err(|_| {
        err(format!(
            "invalid header name \"{}\"",
            String::from_utf8_lossy(b)
        ))
    })
}

fn header_value(v: &Value) -> mlua::Result<HeaderValue> {
    let s: Vec<u8> = match v {
        Value::String(s) => s.as_bytes().to_vec(),
        Value::Integer(_) | Value::Number(_) | Value::Boolean(_) => v.to_string()?.into_bytes(),
        other => {
            return Err(err(format!(
                "invalid header value type {}",
                other.type_name()
            )))
        }
    };
    HeaderValue::from_bytes(&s)
        .map_err(|_| err("invalid header value: it contains control characters"))
}

/// A header value argument: nil (remove), one value, or an array of values.
fn header_values(v: &Value) -> mlua::Result<Vec<HeaderValue>> {
    match v {
        Value::Nil => Ok(Vec::new()),
        Value::Table(t) => t
            .sequence_values::<Value>()
            .map(|x| header_value(&x?))
            .collect(),
        other => Ok(vec![header_value(other)?]),
    }
}

fn method_by_flag(flag: i64) -> Option<String> {
    HTTP_METHODS
        .iter()
        .find(|(_, f)| *f == flag)
        .map(|(m, _)| m.to_string())
}

fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

/// `ngx.escape_uri(s, type)`: type 2 (the default) escapes everything but `A-Za-z0-9-._~`;
/// type 0 (a whole URI) also keeps the reserved characters a path or query may hold.
pub(crate) fn escape_uri(s: &[u8], kind: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    for &b in s {
        let keep = b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (kind == 0
                && matches!(
                    b,
                    b'/' | b'?'
                        | b'&'
                        | b'='
                        | b':'
                        | b'@'
                        | b'!'
                        | b'$'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'#'
                        | b'%'
                ));
        if keep {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

/// `ngx.unescape_uri`: `%XX` decoded and `+` read as a space, as OpenResty does.
pub(crate) fn unescape_uri(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let decoded = s
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match decoded {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// `ngx.encode_args`: keys in sorted order (Lua's own order is unspecified), `true` gives the
/// bare key, `false` is left out, arrays repeat the key.
fn encode_args(t: &Table) -> mlua::Result<String> {
    let mut pairs: Vec<(String, Value)> = Vec::new();
    for kv in t.pairs::<Value, Value>() {
        let (k, v) = kv?;
        let key = match k {
            Value::String(s) => s.to_string_lossy(),
            Value::Integer(i) => i.to_string(),
            Value::Number(n) => convert::fmt_g14(n),
            _ => {
                return Err(err(
                    "bad argument #1 to 'encode_args' (table keys must be strings)",
                ))
            }
        };
        pairs.push((key, v));
    }
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = String::new();
    let push = |out: &mut String, k: &str, v: Option<&[u8]>| {
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(&String::from_utf8_lossy(&escape_uri(k.as_bytes(), 2)));
        if let Some(v) = v {
            out.push('=');
            out.push_str(&String::from_utf8_lossy(&escape_uri(v, 2)));
        }
    };
    for (k, v) in pairs {
        match v {
            Value::Boolean(true) => push(&mut out, &k, None),
            Value::Boolean(false) => {}
            Value::Table(items) => {
                for item in items.sequence_values::<Value>() {
                    match item? {
                        Value::Boolean(true) => push(&mut out, &k, None),
                        Value::Boolean(false) => {}
                        x => push(&mut out, &k, Some(x.to_string()?.as_bytes())),
                    }
                }
            }
            Value::String(s) => push(&mut out, &k, Some(&s.as_bytes())),
            x => push(&mut out, &k, Some(x.to_string()?.as_bytes())),
        }
    }
    Ok(out)
}

/// `ngx.decode_args` / `get_uri_args`: repeated keys become arrays, a bare key is `true`.
fn decode_args(lua: &Lua, s: &[u8], max: i64) -> mlua::Result<(Table, Option<&'static str>)> {
    let t = lua.create_table()?;
    let mut n = 0i64;
    let mut truncated = None;
    for part in s.split(|b| *b == b'&') {
        if part.is_empty() {
            continue;
        }
        if max > 0 && n >= max {
            truncated = Some("truncated");
            break;
        }
        n += 1;
        let (k, v) = match part.iter().position(|b| *b == b'=') {
            Some(i) => (&part[..i], Some(&part[i + 1..])),
            None => (part, None),
        };
        let key = lua.create_string(unescape_uri(k))?;
        let val = match v {
            Some(v) => Value::String(lua.create_string(unescape_uri(v))?),
            None => Value::Boolean(true),
        };
        match t.raw_get::<Value>(&key)? {
            Value::Nil => t.raw_set(key, val)?,
            Value::Table(arr) => arr.raw_push(val)?,
            prev => {
                let arr = lua.create_table()?;
                arr.raw_push(prev)?;
                arr.raw_push(val)?;
                t.raw_set(key, arr)?;
            }
        }
    }
    Ok((t, truncated))
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| (d.as_millis() as f64) / 1000.0)
        .unwrap_or(0.0)
}

const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// UTC calendar fields of a Unix time: (year, month, day, hour, minute, second, weekday index
/// into [`WEEKDAYS`]).
fn civil(t: i64) -> (i64, i64, i64, i64, i64, i64, usize) {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    let wd = days.rem_euclid(7) as usize;
    (y, m, d, secs / 3600, (secs % 3600) / 60, secs % 60, wd)
}

fn http_time(t: i64) -> String {
    let (y, mo, d, h, mi, s, wd) = civil(t);
    format!(
        "{}, {:02} {} {y} {h:02}:{mi:02}:{s:02} GMT",
        WEEKDAYS[wd],
        d,
        MONTHS[(mo - 1) as usize]
    )
}

/// One consumer as an APISIX-shaped Lua table (without `auth_conf`).
fn consumer_table(
    lua: &Lua,
    c: &crate::snapshot::ConsumerEntry,
    generation: u64,
) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("username", c.username.as_str())?;
    t.set("consumer_name", c.username.as_str())?;
    t.set("id", c.username.as_str())?;
    if let Some(d) = &c.desc {
        t.set("desc", d.as_str())?;
    }
    if !c.labels.is_empty() {
        let labels = lua.create_table()?;
        for (k, v) in &c.labels {
            labels.set(k.as_str(), v.as_str())?;
        }
        t.set("labels", labels)?;
        if let Some(id) = c.labels.get("custom_id") {
            t.set("custom_id", id.as_str())?;
        }
    }
    if let Some(g) = &c.group_id {
        t.set("group_id", g.as_str())?;
    }
    let plugins = serde_json::Value::Object(c.plugins.clone());
    t.set("plugins", convert::json_to_lua(lua, &plugins)?)?;
    t.set("modifiedIndex", generation)?;
    Ok(t)
}

/// `__moongate.consumers_version()` and `__moongate.consumers(plugin_name)`: the matched
/// route's snapshot consumers, for `apisix.consumer`. The version is the snapshot generation
/// (nil outside a routed request); `apisix.consumer` caches what it builds per version, so the
/// tables below are made once per plugin per snapshot in each VM.
fn install_consumers(lua: &Lua, mg: &Table) -> mlua::Result<()> {
    fn current() -> Option<std::sync::Arc<crate::snapshot::Consumers>> {
        with_ctx(|c| c.route.as_ref().map(|r| r.consumers.clone()))
            .ok()
            .flatten()
    }
    mg.set(
        "consumers_version",
        lua.create_function(|_, ()| Ok(current().map(|c| c.generation)))?,
    )?;
    // An array of APISIX-shaped consumer tables; with a plugin name, one per consumer conf or
    // credential of that auth plugin, each with the conf as `auth_conf` (and `credential_id`
    // for a credential), as APISIX's consumer.lua builds them.
    mg.set(
        "consumers",
        lua.create_function(|lua, plugin: Option<String>| {
            let Some(all) = current() else {
                return Ok(Value::Nil);
            };
            let out = lua.create_table()?;
            match &plugin {
                Some(p) => {
                    for (i, a) in all.by_plugin.get(p).into_iter().flatten().enumerate() {
                        let t = consumer_table(lua, &a.consumer, all.generation)?;
                        t.set("auth_conf", convert::json_to_lua(lua, &a.conf)?)?;
                        if let Some(id) = &a.credential_id {
                            t.set("credential_id", id.as_str())?;
                        }
                        out.raw_set(i + 1, t)?;
                    }
                }
                None => {
                    for (i, c) in all.all.iter().enumerate() {
                        out.raw_set(i + 1, consumer_table(lua, c, all.generation)?)?;
                    }
                }
            }
            Ok(Value::Table(out))
        })?,
    )?;
    // `attach_consumer`: the Rust side learns who the request is, to merge the consumer's
    // plugins (and its group's) into the route's after rewrite.
    mg.set(
        "attach_consumer",
        lua.create_function(|_, username: Option<mlua::String>| {
            let username = username.map(|u| u.to_string_lossy());
            with_ctx(|c| {
                // A consumer the snapshot does not know (a table a plugin made up) brings no
                // plugins.
                let found = username
                    .as_deref()
                    .and_then(|u| c.route.as_ref().and_then(|r| r.consumers.get(u).cloned()));
                c.consumer = found;
            })
        })?,
    )?;
    Ok(())
}

/// Where luarocks and Debian install Lua 5.1 modules, searched after `lua.package_path` and
/// before LuaJIT's built-in path.
const SYSTEM_LUA_PATH: &[&str] = &[
    "/usr/local/share/lua/5.1/?.lua",
    "/usr/local/share/lua/5.1/?/init.lua",
    "/usr/share/lua/5.1/?.lua",
    "/usr/share/lua/5.1/?/init.lua",
];

/// Where luarocks and Debian install Lua 5.1 C modules (Debian's under the multiarch folder),
/// searched after `lua.package_cpath` and before LuaJIT's built-in cpath.
fn system_lua_cpath() -> [String; 3] {
    [
        "/usr/local/lib/lua/5.1/?.so".to_string(),
        format!("/usr/lib/{}-linux-gnu/lua/5.1/?.so", std::env::consts::ARCH),
        "/usr/lib/lua/5.1/?.so".to_string(),
    ]
}

/// `package.path` (or `cpath`): the node's patterns, the system's, then what LuaJIT started
/// with (its built-in path, or `LUA_PATH`), each pattern once.
fn package_path<S: AsRef<str>>(node: &[String], system: &[S], builtin: &str) -> String {
    let mut seen = std::collections::HashSet::new();
    node.iter()
        .map(String::as_str)
        .chain(system.iter().map(AsRef::as_ref))
        .chain(builtin.split(';'))
        .filter(|p| !p.is_empty() && seen.insert(*p))
        .collect::<Vec<_>>()
        .join(";")
}

/// `ffi.load(name, true)` for each of `lua.ffi_global_libraries`; the library objects are
/// kept in the registry (a collected one would be unloaded under the code that uses it).
fn load_ffi_global_libraries(lua: &Lua, names: &[String]) -> mlua::Result<()> {
    if names.is_empty() {
        return Ok(());
    }
    let load: Function = lua
        .load("local ffi = require('ffi'); return function(name) return ffi.load(name, true) end")
        .set_name("=moongate.ffi_load")
        .eval()?;
    let kept = lua.create_table()?;
    for name in names {
        match load.call::<Value>(name.as_str()) {
            Ok(lib) => kept.set(name.as_str(), lib)?,
            Err(e) => tracing::warn!("lua.ffi_global_libraries: {name} not loaded: {e}"),
        }
    }
    lua.set_named_registry_value("moongate.ffi_global_libraries", kept)
}

/// `require` for the embedded `lua/` tree (package.preload) and for `apisix.plugins.NAME`
/// (searched in `plugin_dirs`).
fn install_require(lua: &Lua, settings: &Settings) -> mlua::Result<()> {
    let package: Table = lua.globals().get("package")?;
    let preload: Table = package.get("preload")?;
    let stand_ins = lua.create_table()?;
    for (name, src) in embedded::MODULES {
        let chunk = format!("@lua/{}.lua", name.replace('.', "/"));
        let src: &'static str = src;
        let loader = lua.create_function(move |lua, args: MultiValue| {
            lua.load(src)
                .set_name(chunk.as_str())
                .call::<MultiValue>(args)
        })?;
        if embedded::STAND_INS.contains(name) {
            stand_ins.set(*name, loader)?;
        } else {
            preload.set(*name, loader)?;
        }
    }
    super::crypto::install(lua, &preload)?;
    super::compress::install(lua, &preload)?;
    super::pkey::install(lua, &preload)?;
    super::semaphore::install(lua, &preload)?;
    super::xml::install(lua, &preload)?;
    super::lfs::install(lua, &preload)?;
    super::pack::install(lua, &preload)?;
    super::shell::install(lua, &preload)?;
    super::pipe::install(lua, &preload)?;
    super::apisix_runtime::install(lua, &preload)?;
    package.set(
        "path",
        package_path(
            &settings.package_path,
            SYSTEM_LUA_PATH,
            &package.get::<String>("path")?,
        ),
    )?;
    // C modules (lpeg, lua-protobuf, ...) find the Lua C API in the binary, which exports it
    // (build.rs), as OpenResty's nginx does.
    package.set(
        "cpath",
        package_path(
            &settings.package_cpath,
            &system_lua_cpath(),
            &package.get::<String>("cpath")?,
        ),
    )?;
    load_ffi_global_libraries(lua, &settings.ffi_global_libraries)?;
    // The plugin folders are not on `package.path`: a plugin file named like a library
    // (`brotli.lua`, `prometheus.lua`) would be found by its own `require("brotli")`. Our
    // searcher serves `apisix.plugins.NAME[.SUB]` from `NAME.lua`/`NAME/SUB.lua` (or
    // `init.lua`) and other dotted names from the same path under the folder (APISIX helper
    // modules staged there, e.g. `apisix/utils/log-util.lua`); a name without a dot never
    // resolves to a plugin folder.
    let dirs: Vec<std::path::PathBuf> = settings.plugin_dirs.clone();
    let searcher = lua.create_function(move |lua, name: String| {
        let Some(rel) = super::folder_path(&name) else {
            return Ok(Value::Nil);
        };
        let mut tried = String::new();
        for d in &dirs {
            for cand in [d.join(format!("{rel}.lua")), d.join(&rel).join("init.lua")] {
                match std::fs::read(&cand) {
                    Ok(src) => {
                        let f: Function = lua
                            .load(&src)
                            .set_name(format!("@{}", cand.display()))
                            .into_function()?;
                        // What was loaded as a library, so the runtime can take the same
                        // table when it loads the same file as a plugin.
                        searched_table(lua)?.raw_set(name.as_str(), lua.create_string(&src)?)?;
                        return Ok(Value::Function(f));
                    }
                    Err(_) => {
                        let _ = write!(tried, "\n\tno file '{}'", cand.display());
                    }
                }
            }
        }
        Ok(Value::String(lua.create_string(tried)?))
    })?;
    // LuaJIT keeps searchers in package.loaders; ours goes right after preload.
    let loaders: Table = package.get("loaders")?;
    loaders.raw_insert(2, searcher)?;
    // The stand-ins come last, after package.path and cpath.
    let last = lua.create_function(move |_, name: String| {
        Ok(stand_ins
            .get::<Option<Function>>(name.as_str())?
            .map_or(Value::Nil, Value::Function))
    })?;
    loaders.raw_push(last)?;
    Ok(())
}

/// The registry table of sources `require` loaded from a plugin folder, by module name.
pub(crate) fn searched_table(lua: &Lua) -> mlua::Result<Table> {
    const KEY: &str = "moongate.searched";
    if let Ok(t) = lua.named_registry_value::<Table>(KEY) {
        return Ok(t);
    }
    let t = lua.create_table()?;
    lua.set_named_registry_value(KEY, &t)?;
    Ok(t)
}

/// `__moongate.plugin_metadata_index(name)` and `__moongate.plugin_metadata(name)`: the published
/// plugin metadata (see `plugin::metadata`), for `apisix.plugin.plugin_metadata`. The index is
/// APISIX's `modifiedIndex` (nil when the plugin has no metadata); `apisix.plugin` converts the
/// value once per index in each VM.
fn install_plugin_metadata(lua: &Lua, mg: &Table) -> mlua::Result<()> {
    mg.set(
        "plugin_metadata_index",
        lua.create_function(|_, name: String| {
            Ok(crate::plugin::metadata::get(&name).map(|m| m.modified_index))
        })?,
    )?;
    mg.set(
        "plugin_metadata",
        lua.create_function(
            |lua, name: String| match crate::plugin::metadata::get(&name) {
                Some(m) => Ok((
                    convert::json_to_lua(lua, &m.value)?,
                    Value::Number(m.modified_index as f64),
                )),
                None => Ok((Value::Nil, Value::Nil)),
            },
        )?,
    )?;
    Ok(())
}

/// `__moongate.local_conf_version()` and `__moongate.local_conf()`: the node config in
/// APISIX's `local_conf` shape (see `plugin::local_conf`); `apisix.core.config_local` converts
/// it once per version in each VM.
fn install_local_conf(lua: &Lua, mg: &Table) -> mlua::Result<()> {
    mg.set(
        "local_conf_version",
        lua.create_function(|_, ()| Ok(crate::plugin::local_conf::version()))?,
    )?;
    mg.set(
        "local_conf",
        lua.create_function(|lua, ()| match crate::plugin::local_conf::current() {
            Some(c) => convert::json_to_lua(lua, &c.value),
            None => Ok(Value::Nil),
        })?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_escaping() {
        assert_eq!(escape_uri(b"a b/c", 2), b"a%20b%2Fc");
        assert_eq!(escape_uri(b"/a b/c", 0), b"/a%20b/c");
        assert_eq!(unescape_uri(b"b%20r56+7"), b"b r56 7");
        assert_eq!(unescape_uri(b"100%"), b"100%");
        assert_eq!(unescape_uri(b"%4"), b"%4");
    }

    #[test]
    fn dates() {
        assert_eq!(http_time(1290079655), "Thu, 18 Nov 2010 11:27:35 GMT");
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }
}
