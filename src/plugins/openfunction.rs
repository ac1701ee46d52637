//! `openfunction`: answers a route with a function (OpenFunction, or any HTTP endpoint), the
//! native Rust version of APISIX's `openfunction` plugin (3.18 behaviour).
//!
//! The plugin runs in `access` and always ends the request there: it sends the request (method,
//! headers as earlier plugins left them, query, body) to `function_uri` and answers with the
//! function's status, headers and body. The route's upstream, if any, is never contacted.
//!
//! ```yaml
//! routes:
//!   - uri: /hello/*
//!     plugins:
//!       openfunction:
//!         function_uri: http://127.0.0.1:3233/default/function-sample
//!         authorization: {service_token: "test:test"}
//! ```
//!
//! Differences from APISIX are listed in `docs/compatibility.md` under "openfunction".

use std::any::Any;
use std::borrow::Cow;
use std::cell::Cell;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use bytes::Bytes;
use bytes::BytesMut;
use http::header::{self, HeaderName, HeaderValue};
use http::{StatusCode, Uri};
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use serde_json::{json, Value};

use crate::body::{ClientBodyFault, IdleTimeout, RequestBody, ResponseBody, UpstreamRequestBody};
use crate::http1::client::{put_header, HeadEdit, RequestHead, ResponseLines};
use crate::metrics::runtime::{self, OpenFunctionOutcome as Outcome};
use crate::plugin::{
    ConfScope, Ctx, Flow, LocalResponse, Phase, PhaseResult, PhaseSet, Plugin, PluginConf,
    PluginError, Schema,
};
use crate::proxy::client::{worker_client, PoolOptions, Target};
use crate::proxy::headers::HopByHop;

/// The plugin's name, as routes enable it.
pub const NAME: &str = "openfunction";

/// APISIX's priority for `openfunction` (between openwhisk -1901 and serverless-post-function).
pub const PRIORITY: i64 = -1902;

/// The `openfunction` plugin. One instance serves every route; per-route state lives in the
/// compiled [`OpenFunctionConf`].
pub struct OpenFunction;

/// A route's `openfunction` conf, parsed once when the snapshot is built.
#[derive(Debug, Clone)]
pub struct OpenFunctionConf {
    /// Where the function lives.
    pub uri: FunctionUri,
    /// `Basic base64(service_token)`, when `authorization.service_token` is set.
    pub authorization: Option<HeaderValue>,
    /// Bounds connect, send + response head, and each gap between response body chunks.
    pub timeout: Duration,
    /// Verify the function's TLS certificate.
    pub ssl_verify: bool,
    /// Connection reuse: `keepalive_pool` idle connections for `keepalive_timeout`, or none.
    pub pool: PoolOptions,
    /// Largest request body forwarded; larger ones get 400.
    pub max_req_body_size: u64,
}

/// `function_uri`, split into what a request needs.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionUri {
    /// `Some(true)` for https, `Some(false)` for http, `None` for a scheme-less `//host/...`
    /// (the client's scheme is used, as lua-resty-http does).
    pub tls: Option<bool>,
    /// Host to connect to: lower-cased, IPv6 without brackets.
    pub host: Arc<str>,
    /// The `Host` header sent: the host without port (IPv6 in brackets), as APISIX sends it.
    pub host_header: HeaderValue,
    /// The explicit port, if any (else 80 or 443).
    pub port: Option<u16>,
    /// The path part, `""` when the uri has none. Its query and fragment are dropped: the
    /// client's query replaces the query.
    pub base_path: String,
}

impl FunctionUri {
    /// Where to connect for a request that came in with `client_scheme`.
    fn target(&self, client_scheme: &str, verify: bool) -> Target {
        let tls = self.tls.unwrap_or(client_scheme == "https");
        Target {
            tls,
            host: self.host.clone(),
            port: self.port.unwrap_or(if tls { 443 } else { 80 }),
            verify,
            client_cert: None,
        }
    }
}

fn schema() -> &'static Schema {
    static S: OnceLock<Schema> = OnceLock::new();
    S.get_or_init(|| {
        // APISIX's generic-upstream schema, property for property. `authorization` is validated
        // as an object with a string `service_token` (APISIX declares it in a way its
        // validator ignores; see docs/compatibility.md).
        Schema::compile(&json!({
            "type": "object",
            "properties": {
                "max_req_body_size": {
                    "type": "integer",
                    "minimum": 1,
                    "default": 67108864,
                    "description": "maximum request body size in bytes buffered into memory; larger request bodies are rejected"
                },
                "function_uri": {"type": "string"},
                "authorization": {
                    "type": "object",
                    "properties": {"service_token": {"type": "string"}}
                },
                "timeout": {"type": "integer", "minimum": 100, "default": 3000},
                "ssl_verify": {"type": "boolean", "default": true},
                "keepalive": {"type": "boolean", "default": true},
                "keepalive_timeout": {"type": "integer", "minimum": 1000, "default": 60000},
                "keepalive_pool": {"type": "integer", "minimum": 1, "default": 5}
            },
            "required": ["function_uri"]
        }))
        .expect("the openfunction schema compiles")
    })
}

/// Parses `function_uri` as lua-resty-http does (`[http[s]:]//host[:port][/path][?query]`), and
/// refuses what would fail on every request there: another scheme, user info, an empty host, a
/// bad port, or a path that is not a valid request path.
pub fn parse_function_uri(uri: &str) -> Result<FunctionUri, String> {
    let bad = |why: &str| format!("bad uri \"{uri}\": {why}");
    let (scheme, rest) = uri
        .split_once("//")
        .ok_or_else(|| bad("expected http://host[:port][/path] or https://..."))?;
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "" => None,
        "http:" => Some(false),
        "https:" => Some(true),
        _ => return Err(bad("only http and https are supported")),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if authority.contains('@') {
        return Err(bad(
            "user info is not supported; use authorization.service_token",
        ));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (addr, after) = v6
            .split_once(']')
            .ok_or_else(|| bad("unclosed [ in the host"))?;
        addr.parse::<std::net::Ipv6Addr>()
            .map_err(|_| bad("the host is not a valid IPv6 address"))?;
        (addr.to_ascii_lowercase(), after)
    } else {
        let (h, after) = match authority.find(':') {
            Some(i) => authority.split_at(i),
            None => (authority, ""),
        };
        let valid = !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !valid {
            return Err(bad("the host is missing or not a valid host name"));
        }
        (h.to_ascii_lowercase(), after)
    };
    let port = match port {
        "" => None,
        p => {
            let digits = p.strip_prefix(':').unwrap_or(p);
            match digits.parse::<u16>() {
                Ok(n) if n > 0 && digits.bytes().all(|b| b.is_ascii_digit()) => Some(n),
                _ => return Err(bad("the port must be a number from 1 to 65535")),
            }
        }
    };
    let path_end = tail.find(['?', '#']).unwrap_or(tail.len());
    let base_path = tail[..path_end].to_string();
    if !base_path.is_empty() && base_path.parse::<Uri>().is_err() {
        return Err(bad(
            "the path has characters that are not allowed in a URL path",
        ));
    }
    let host_header = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    let host_header = HeaderValue::from_str(&host_header).map_err(|_| bad("bad host"))?;
    let host: Arc<str> = host.into();
    Ok(FunctionUri {
        tls,
        host,
        host_header,
        port,
        base_path,
    })
}

/// Bytes of the (decoded) route tail that must be escaped again to form a request path.
const PATH_ESCAPE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'|')
    .add(b'\\')
    .add(b'^');

/// The path sent to the function: the base path, joined with the tail matched by a route uri
/// ending in `*` (APISIX's `:ext`) by APISIX's rule: one `/` between them unless the base ends
/// in `/` or the tail starts with one. The tail is decoded (it was matched against `$uri`), so
/// it is escaped again where a path needs it.
pub fn function_path(base: &str, ext: Option<&str>) -> String {
    let Some(ext) = ext else {
        return if base.is_empty() {
            "/".to_string()
        } else {
            base.to_string()
        };
    };
    let ext: Cow<str> = utf8_percent_encode(ext, PATH_ESCAPE).into();
    let mut path = String::with_capacity(base.len() + ext.len() + 1);
    path.push_str(base);
    if !base.ends_with('/') && !ext.starts_with('/') {
        path.push('/');
    }
    path.push_str(&ext);
    path
}

/// Byte classes of a request target, as `http::uri::PathAndQuery` sorts them (the parse this
/// check stands for, so the same targets are refused): bytes a path or a query may hold as
/// they are, the `?` that starts the query, the `#` that starts a fragment (cut off), and the
/// rest (refused).
const TARGET_OK: u8 = 0;
const TARGET_QUERY: u8 = 1;
const TARGET_FRAGMENT: u8 = 2;
const TARGET_BAD: u8 = 3;

const fn target_classes(query: bool) -> [u8; 256] {
    let mut t = [TARGET_BAD; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = match i as u8 {
            b'#' => TARGET_FRAGMENT,
            b'?' if !query => TARGET_QUERY,
            // Non-ASCII: the target is a `String`, so always valid UTF-8.
            0x80..=0xff => TARGET_OK,
            0x21 | 0x24..=0x3b | 0x3d => TARGET_OK,
            0x3f..=0x7e if query => TARGET_OK,
            // In the path also `"`, `{` and `}` (JSON in paths), but not `<`, `>`, `` ` ``.
            0x22 | 0x40..=0x5f | 0x61..=0x7e if !query => TARGET_OK,
            _ => TARGET_BAD,
        };
        i += 1;
    }
    t
}

static PATH_BYTES: [u8; 256] = target_classes(false);
static QUERY_BYTES: [u8; 256] = target_classes(true);

/// How much of `target` (a path, then maybe `?query`) is sent: all of it, or what comes before
/// a `#`. None when it is too long or holds a byte a request target cannot (a space, a control
/// character, `<` or `>` ...): the function is not called, as APISIX fails such a request
/// (`invalid characters found in path`).
fn request_target_len(target: &[u8]) -> Option<usize> {
    // `http`'s limit on a URI's length.
    if target.len() > usize::from(u16::MAX - 1) {
        return None;
    }
    let mut classes = &PATH_BYTES;
    for (i, &b) in target.iter().enumerate() {
        match classes[usize::from(b)] {
            TARGET_OK => {}
            TARGET_QUERY => classes = &QUERY_BYTES,
            TARGET_FRAGMENT => return Some(i),
            _ => return None,
        }
    }
    Some(target.len())
}

/// The changes to the client's headers made while the function's request head is written.
struct FunctionHead<'a> {
    /// `Host`: the function's.
    host: &'a HeaderValue,
    /// Replaces the client's `Authorization` when a service token is configured.
    authorization: Option<&'a HeaderValue>,
    /// The client's hop-by-hop headers, left out.
    hop: HopByHop,
}

impl HeadEdit for FunctionHead<'_> {
    fn extra_len(&self) -> usize {
        8 + self.host.len() + self.authorization.map_or(0, |a| a.len() + 17)
    }

    fn write_first(&self, dst: &mut BytesMut) {
        put_header(dst, b"host", self.host.as_bytes());
        if let Some(auth) = self.authorization {
            put_header(dst, b"authorization", auth.as_bytes());
        }
    }

    fn skip(&self, name: &HeaderName) -> bool {
        name == header::HOST
            || (self.authorization.is_some() && name == header::AUTHORIZATION)
            || self.hop.skip(name)
    }
}

fn int(conf: &Value, key: &str) -> u64 {
    // The schema has checked the type and minimum and filled the default; integers may arrive
    // as `100.0`, which APISIX also accepts.
    conf.get(key)
        .and_then(|v| v.as_u64().or_else(|| v.as_f64().map(|f| f as u64)))
        .unwrap_or(0)
}

fn compile(conf: &Value) -> Result<OpenFunctionConf, String> {
    let function_uri = conf
        .get("function_uri")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let uri = parse_function_uri(function_uri)
        .map_err(|e| format!("property \"function_uri\" validation failed: {e}"))?;
    let authorization = conf
        .get("authorization")
        .and_then(|a| a.get("service_token"))
        .and_then(Value::as_str)
        .map(|token| {
            let encoded = base64::engine::general_purpose::STANDARD.encode(token);
            // Base64 output is always a valid header value.
            HeaderValue::from_str(&format!("Basic {encoded}")).map_err(|_| {
                "property \"authorization\" validation failed: bad service_token".to_string()
            })
        })
        .transpose()?;
    let keepalive = conf
        .get("keepalive")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let pool = if keepalive {
        PoolOptions {
            max_idle: usize::try_from(int(conf, "keepalive_pool")).unwrap_or(usize::MAX),
            idle_timeout: Duration::from_millis(int(conf, "keepalive_timeout")),
            max_requests: 0,
        }
    } else {
        PoolOptions::NONE
    };
    Ok(OpenFunctionConf {
        uri,
        authorization,
        timeout: Duration::from_millis(int(conf, "timeout")),
        ssl_verify: conf
            .get("ssl_verify")
            .and_then(Value::as_bool)
            .unwrap_or(true),
        pool,
        max_req_body_size: int(conf, "max_req_body_size"),
    })
}

/// The request phase's failure modes that end in a status without a body.
fn exit(status: StatusCode) -> PhaseResult {
    tracing::warn!("{NAME} exits with http status code {}", status.as_u16());
    Ok(Flow::respond(LocalResponse::text(status, Bytes::new())))
}

#[async_trait(?Send)]
impl Plugin for OpenFunction {
    fn name(&self) -> &str {
        NAME
    }

    fn priority(&self) -> i64 {
        PRIORITY
    }

    fn version(&self) -> &str {
        "0.1"
    }

    fn schema(&self) -> &Schema {
        schema()
    }

    fn check_conf(
        &self,
        conf: &mut Value,
        _scope: ConfScope,
    ) -> Result<Arc<dyn Any + Send + Sync>, String> {
        self.schema().check(conf)?;
        Ok(Arc::new(compile(conf)?))
    }

    fn phases(&self) -> PhaseSet {
        PhaseSet::empty().with(Phase::Access)
    }

    async fn access(&self, conf: &PluginConf, ctx: &mut Ctx) -> PhaseResult {
        let c = conf
            .compiled::<OpenFunctionConf>()
            .ok_or_else(|| PluginError::new(NAME, Phase::Access, "conf was not compiled"))?;
        let body = match ctx.body.read_all(c.max_req_body_size).await {
            Ok(b) => b,
            Err(e) => {
                match e.client_fault() {
                    // A malformed body or a client gone mid-body: the client's error.
                    Some(f) if f != ClientBodyFault::TooLarge => {
                        f.log(ctx.route_id(), &ctx.remote_addr, &e)
                    }
                    _ => tracing::error!(
                        route = ctx.route_id(),
                        "error while reading request body: {e}"
                    ),
                }
                runtime::openfunction(Outcome::BadRequest);
                return exit(StatusCode::BAD_REQUEST);
            }
        };
        match call(c, ctx, body).await {
            Ok(local) => {
                if local.status.as_u16() >= 400 {
                    runtime::openfunction(Outcome::FunctionError);
                    tracing::warn!(
                        "{NAME} exits with http status code {}",
                        local.status.as_u16()
                    );
                } else {
                    runtime::openfunction(Outcome::Ok);
                }
                Ok(Flow::respond(local))
            }
            Err(reason) => {
                tracing::error!(
                    route = ctx.route_id(),
                    "failed to process {NAME}, err: {reason}"
                );
                runtime::openfunction(Outcome::Failed);
                exit(StatusCode::SERVICE_UNAVAILABLE)
            }
        }
    }
}

/// Calls the function and turns its answer into the route's response. Err is the reason, as
/// it goes into the `failed to process openfunction, err: <reason>` log line.
async fn call(
    c: &OpenFunctionConf,
    ctx: &Ctx,
    body: Option<Bytes>,
) -> Result<LocalResponse, String> {
    let mut target = function_path(&c.uri.base_path, ctx.matched_ext());
    if let Some(args) = ctx.args.as_deref().filter(|a| !a.is_empty()) {
        target.reserve(args.len() + 1);
        target.push('?');
        target.push_str(args);
    }
    let len = request_target_len(target.as_bytes()).ok_or("invalid characters found in path")?;
    target.truncate(len);

    // The request as the plugins before this one left it, written without a copy: `Host` is
    // the function's, `Authorization` the service token's, and what describes the client's
    // connection or framing stays out (the client frames the body it sends, `Content-Length:
    // 0` for a POST, PUT or PATCH without one).
    let edit = FunctionHead {
        host: &c.uri.host_header,
        authorization: c.authorization.as_ref(),
        hop: HopByHop::of(&ctx.headers),
    };
    // When no plugin in effect sees response headers (and none are staged), the function's
    // header lines pass to the client unparsed, as a proxied response's do; `TE` and `Trailer`
    // among them, as APISIX passes them.
    let lines = if ctx.response_untouched() {
        ResponseLines::RawWithTe
    } else {
        ResponseLines::Parsed
    };
    let head = RequestHead {
        method: &ctx.method,
        target: &target,
        headers: &ctx.headers,
        edit: &edit,
        lines,
    };
    let req_body = UpstreamRequestBody::new(
        body.map_or(RequestBody::Empty, RequestBody::Full),
        None,
        Rc::new(Cell::new(None)),
    );

    let client = worker_client();
    let target = c.uri.target(ctx.scheme, c.ssl_verify);
    let conn = client
        .checkout(&target, c.timeout, c.pool)
        .await
        .map_err(|e| e.to_string())?;
    let res = conn
        .send_head(&client, &head, req_body, c.timeout, c.pool)
        .await
        .map_err(|e| e.to_string())?;

    // The headers that describe the function's connection (`Connection` and those it names,
    // `Keep-Alive`, `Proxy-Connection`, `Upgrade`, `Transfer-Encoding`) were left out by the
    // client, as APISIX removes them; `TE` and `Trailer` pass, as there.
    let incoming = res.body;
    Ok(LocalResponse {
        status: res.status,
        headers: res.headers,
        raw: res.raw,
        // `timeout` bounds each wait for the function, as lua-resty-http's read timeout does.
        body: ResponseBody::Timed(
            IdleTimeout::new(incoming, c.timeout).on_timeout(log_body_timeout),
        ),
    })
}

/// The log line APISIX writes when a function call fails, for a body that stalls.
fn log_body_timeout() {
    tracing::error!("failed to process {NAME}, err: timeout while reading the response body");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(mut v: Value) -> Result<(Value, OpenFunctionConf), String> {
        schema().check(&mut v)?;
        let c = compile(&v)?;
        Ok((v, c))
    }

    #[test]
    fn defaults_are_filled() {
        let (v, c) = checked(json!({"function_uri": "http://127.0.0.1:30585/default/test-body"}))
            .expect("valid");
        assert_eq!(v["timeout"], 3000);
        assert_eq!(v["ssl_verify"], true);
        assert_eq!(v["keepalive"], true);
        assert_eq!(v["keepalive_timeout"], 60000);
        assert_eq!(v["keepalive_pool"], 5);
        assert_eq!(v["max_req_body_size"], 67108864);
        assert_eq!(c.timeout, Duration::from_millis(3000));
        assert_eq!(c.pool.max_idle, 5);
        assert!(c.authorization.is_none());
    }

    #[test]
    fn schema_errors_use_apisix_wording() {
        let e = |v: Value| checked(v).err().unwrap_or_default();
        assert_eq!(
            e(json!({"timeout": 60000})),
            "property \"function_uri\" is required"
        );
        assert_eq!(
            e(json!({"function_uri": 30858})),
            "property \"function_uri\" validation failed: wrong type: expected string, got number"
        );
        assert_eq!(
            e(json!({"function_uri": "http://h", "timeout": 99})),
            "property \"timeout\" validation failed: expected 99 to be at least 100"
        );
        assert_eq!(
            e(json!({"function_uri": "http://h", "timeout": 1.5})),
            "property \"timeout\" validation failed: wrong type: expected integer, got number"
        );
        assert_eq!(
            e(json!({"function_uri": "http://h", "authorization": {"service_token": 1}})),
            "property \"authorization\" validation failed: property \"service_token\" validation failed: wrong type: expected string, got number"
        );
    }

    #[test]
    fn token_is_base64_of_the_whole_string() {
        let (_, c) = checked(
            json!({"function_uri": "http://h", "authorization": {"service_token": "test:test"}}),
        )
        .expect("valid");
        assert_eq!(
            c.authorization.as_ref().map(|h| h.as_bytes()),
            Some(&b"Basic dGVzdDp0ZXN0"[..])
        );
    }

    #[test]
    fn uris() {
        let u = parse_function_uri("http://LocalHost:8080/Default/fn?x=1#f").expect("valid");
        assert_eq!(u.tls, Some(false));
        assert_eq!(&*u.host, "localhost");
        assert_eq!(u.host_header, "localhost");
        assert_eq!(u.port, Some(8080));
        assert_eq!(u.base_path, "/Default/fn");
        let u = parse_function_uri("https://[::1]").expect("valid");
        assert_eq!(
            (u.tls, &*u.host, u.port, u.base_path.as_str()),
            (Some(true), "::1", None, "")
        );
        assert_eq!(u.host_header, "[::1]");
        assert_eq!(parse_function_uri("//h/x").expect("valid").tls, None);
        for bad in [
            "abc",
            "ftp://h/",
            "http://",
            "http://u:p@h/",
            "http://h:0/",
            "http://h:x/",
            "http://h:70000",
            "http://h/a b",
        ] {
            assert!(parse_function_uri(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn targets_are_checked_as_http_parses_them() {
        // Every byte, in the path and in the query, against the parse the check stands for.
        let expected = |t: &str| {
            t.parse::<Uri>()
                .ok()
                .map(|u| u.path_and_query().map_or(0, |p| p.as_str().len()))
        };
        for b in 0..=0x7fu8 {
            let c = char::from(b);
            for t in [
                format!("/fn/a{c}b"),
                format!("/fn?a{c}b"),
                format!("/fn?a=1?{c}"),
                format!("/{c}"),
            ] {
                assert_eq!(request_target_len(t.as_bytes()), expected(&t), "{t:?}");
            }
        }
        assert_eq!(request_target_len("/fn/é?q=ü".as_bytes()), Some(11));
        assert_eq!(request_target_len(b"/fn?a=1#frag ment"), Some(7));
        assert_eq!(request_target_len(b"/fn?a<b"), None);
        let long = format!("/{}", "a".repeat(70000));
        assert_eq!(request_target_len(long.as_bytes()), expected(&long));
    }

    #[test]
    fn head_edit_sets_host_and_token_and_drops_hop_by_hop() {
        let mut h = http::HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("client.test"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        h.insert(header::CONNECTION, HeaderValue::from_static("x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        // As the request arrived at the handler: what `Connection` names is already gone.
        crate::proxy::headers::remove_connection_named(&mut h);
        let host = HeaderValue::from_static("fn.test");
        let token = HeaderValue::from_static("Basic dGVzdDp0ZXN0");
        let written = |authorization: Option<&HeaderValue>| {
            let edit = FunctionHead {
                host: &host,
                authorization,
                hop: HopByHop::of(&h),
            };
            let mut out = BytesMut::new();
            edit.write_first(&mut out);
            for (k, v) in &h {
                if !edit.skip(k) {
                    put_header(&mut out, k.as_str().as_bytes(), v.as_bytes());
                }
            }
            edit.write_last(&mut out);
            String::from_utf8(out.to_vec()).unwrap()
        };
        assert_eq!(
            written(Some(&token)),
            "host: fn.test\r\nauthorization: Basic dGVzdDp0ZXN0\r\nx-kept: 1\r\n"
        );
        assert_eq!(
            written(None),
            "host: fn.test\r\nauthorization: Bearer x\r\nx-kept: 1\r\n"
        );
    }

    #[test]
    fn paths_join_like_apisix() {
        assert_eq!(function_path("", Some("openfunction")), "/openfunction");
        assert_eq!(
            function_path("/api", Some("http/trigger")),
            "/api/http/trigger"
        );
        assert_eq!(function_path("/api", Some("")), "/api/");
        assert_eq!(function_path("/api/", Some("x")), "/api/x");
        assert_eq!(function_path("/api", Some("/x")), "/api/x");
        assert_eq!(function_path("", Some("")), "/");
        assert_eq!(function_path("/fn", Some("Abc/d")), "/fn/Abc/d");
        assert_eq!(function_path("/fn", Some("a b?%")), "/fn/a%20b%3F%25");
        assert_eq!(function_path("/fn", None), "/fn");
        assert_eq!(function_path("", None), "/");
    }
}
