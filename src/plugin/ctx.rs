//! The per-request context plugins see: the request (as plugins have changed it so far), the
//! matched route, APISIX's `ctx.var` variables, and room for plugin data.

use std::any::{Any, TypeId};
use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::Hasher;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::{HeaderMap, Method, Version};

use crate::body::{KeptBody, RequestBody};
use crate::plugin::chain::Chain;
use crate::router::RouteMatch;
use crate::snapshot::{ConsumerEntry, RouteEntry};

/// Per-request state, created when the request head has been read and dropped after `log`.
pub struct Ctx {
    pub method: Method,
    /// The normalised, percent-decoded path (`ctx.var.uri`): what routes match against.
    pub uri: String,
    /// The raw query string, without `?`.
    pub args: Option<String>,
    /// The request target as the client sent it (`ctx.var.request_uri`).
    pub request_uri: String,
    pub version: Version,
    /// Request headers; changes made by plugins are forwarded upstream.
    pub headers: HeaderMap,
    /// Response headers set before the response exists (a Lua plugin's `ngx.header` writes in
    /// rewrite/access/before_proxy): a local response made by a plugin starts from them, and
    /// the proxy applies them to the upstream's response before header_filter, as nginx does.
    pub staged_headers: HeaderMap,
    pub body: RequestBody,
    /// The copy of a streamed body the proxy keeps for the log phase (see
    /// [`Ctx::body_for_log`]).
    pub kept_body: Option<KeptBody>,
    /// The upstream a plugin chose for this request instead of the route's (APISIX's
    /// `ctx.upstream_id`, `apisix.upstream.set`).
    pub upstream_choice: Option<UpstreamChoice>,
    /// The client's address: the connection's peer, or the one a plugin set from a header
    /// (APISIX's `real-ip`); [`ClientControl::realip_from`] keeps the peer then.
    pub remote_addr: SocketAddr,
    pub local_addr: SocketAddr,
    /// How plugins changed this request's client handling (APISIX-Runtime's
    /// `resty.apisix.client`).
    pub client: ClientControl,
    /// Compress this response with gzip (APISIX-Runtime's `resty.apisix.response.set_gzip`,
    /// called in header_filter by APISIX's `gzip`): applied as the head goes out, where
    /// [`crate::compress::applies`] says nginx would.
    pub gzip: Option<crate::compress::GzipRequest>,
    pub scheme: &'static str,
    /// The connection's TLS parameters, on a TLS listener (`ssl_*` variables).
    pub tls: Option<std::rc::Rc<crate::tls::TlsInfo>>,
    /// The request host, lower-cased, without port (nginx's `$host`).
    pub host: String,
    /// The matched route, once routing has run.
    pub route: Option<Arc<RouteEntry>>,
    /// What the router captured (`:name` params and the `*` tail, APISIX's `:ext`).
    pub matched: Option<RouteMatch>,
    /// Overrides the path and query sent upstream (`ctx.var.upstream_uri`).
    pub upstream_uri: Option<String>,
    /// Overrides the Host header sent upstream (`ctx.var.upstream_host`).
    pub upstream_host: Option<String>,
    /// The node the request went to, `host:port`.
    pub upstream_addr: Option<Arc<str>>,
    pub upstream_status: Option<u16>,
    /// When the proxy started on the upstream (its first connection attempt): the upstream
    /// latency and `$upstream_response_time` run from here.
    pub upstream_start: Option<Instant>,
    /// `$upstream_response_time` (seconds) as a plugin that called the upstream itself
    /// reported it (`resty.apisix.upstream.update_upstream_state`).
    pub upstream_response_time: Option<f64>,
    /// Bytes of the response sent to the client so far: the head (estimated when it is
    /// written) and the body frames handed to the server (nginx's `$bytes_sent`).
    pub bytes_sent: u64,
    /// Body bytes of the response handed to the server (nginx's `$body_bytes_sent`).
    pub body_bytes_sent: u64,
    /// Counts the request as in flight for the metrics until the ctx is dropped.
    _in_flight: crate::metrics::store::InFlight,
    /// The request counted as in flight on its upstream node (`least_conn`) until the ctx is
    /// dropped, after the log phase.
    pub upstream_load: Option<crate::balancer::InFlight>,
    /// The status sent to the client (0 until the response head is known).
    pub status: u16,
    /// APISIX's `conf_type`, `conf_id`, `conf_version` for the route (and service) in effect.
    pub conf_type: &'static str,
    pub conf_id: Arc<str>,
    pub conf_version: Arc<str>,
    pub start: Instant,
    pub start_time: SystemTime,
    /// Variables set by plugins (`ctx.var.NAME = v`); consulted before the built-in ones.
    pub vars: HashMap<String, String>,
    /// The consumer an auth plugin identified (APISIX's `ctx.consumer`), once one has.
    pub consumer: Option<Arc<ConsumerEntry>>,
    /// The route's plugins with the consumer's (and its group's) merged in: set after rewrite
    /// when a consumer brings plugins, and run instead of the route's own from then on.
    pub plugins: Option<Arc<Chain>>,
    /// Whether a plugin in effect has a header_filter, body_filter or log phase, which see the
    /// response's headers (true until the handler knows the chains; see
    /// [`Ctx::response_untouched`]).
    pub response_phases: bool,
    /// nginx's `$request_id` (32 hex digits), made on first read.
    request_id: std::cell::OnceCell<Box<str>>,
    /// Per-type data, few entries per request (the Lua plugins' state, a native plugin's): a
    /// list searched by `TypeId` costs less than hashing into a map, and one allocation less.
    data: Vec<(TypeId, Box<dyn Any>)>,
}

/// A hasher for keys that are already well-mixed ids (process-unique counters): one multiply
/// instead of SipHash, which showed up in every Lua hook call's profile.
/// Not for keys a client chooses.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

/// How one request's client is handled: the node's settings, as plugins changed them
/// (APISIX-Runtime's `resty.apisix.client`, which APISIX's `real-ip`, `client-control` and
/// `proxy-control` call).
#[derive(Debug, Default, Clone, Copy)]
pub struct ClientControl {
    /// The connection's own peer, once a plugin replaced [`Ctx::remote_addr`] (nginx's
    /// `$realip_remote_addr` and `$realip_remote_port`).
    pub realip_from: Option<SocketAddr>,
    /// `client_max_body_size` for this request, 0 for no limit (the node's until a plugin sets
    /// it; checked when the body is read, by a plugin or for the upstream).
    pub max_body_size: u64,
    /// `proxy_request_buffering`: read the whole body before the upstream request (which then
    /// carries a Content-Length) instead of streaming it.
    pub request_buffering: bool,
}

impl ClientControl {
    /// The body size limit in effect, None for no limit.
    pub fn body_limit(&self) -> Option<u64> {
        (self.max_body_size > 0).then_some(self.max_body_size)
    }
}

/// An upstream a plugin chose for one request.
#[derive(Debug, Clone)]
pub enum UpstreamChoice {
    /// One of the configured upstreams, by id.
    Id(String),
    /// An upstream the plugin made (`apisix.upstream.set`): its cache key (APISIX's
    /// `upstream_key` and conf version) and its checked configuration.
    Conf {
        key: String,
        conf: Box<crate::config::Upstream>,
    },
}

impl Ctx {
    /// Whether nothing will see or change the response's headers (no plugin in effect with a
    /// response phase, none staged by an earlier phase): a response made from a peer's (the
    /// upstream's, a function's) may then pass the peer's header lines on unparsed.
    pub fn response_untouched(&self) -> bool {
        !self.response_phases && self.staged_headers.is_empty()
    }

    /// The request body as a log-phase plugin sees it (`ngx.req.get_body_data()`): the body
    /// read into memory, or the copy the proxy kept while it streamed upstream; None for no
    /// body, or one that was not kept whole.
    pub fn body_for_log(&self) -> Option<bytes::Bytes> {
        match &self.body {
            RequestBody::Full(b) => Some(b.clone()),
            _ => self.kept_body.as_ref().and_then(KeptBody::get),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        method: Method,
        uri: String,
        args: Option<String>,
        request_uri: String,
        version: Version,
        headers: HeaderMap,
        body: RequestBody,
        remote_addr: SocketAddr,
        local_addr: SocketAddr,
        scheme: &'static str,
    ) -> Self {
        let host = request_host(&headers, local_addr);
        Ctx {
            method,
            uri,
            args,
            request_uri,
            version,
            headers,
            staged_headers: HeaderMap::new(),
            response_phases: true,
            body,
            kept_body: None,
            upstream_choice: None,
            remote_addr,
            local_addr,
            client: ClientControl::default(),
            gzip: None,
            scheme,
            tls: None,
            host,
            route: None,
            matched: None,
            upstream_uri: None,
            upstream_host: None,
            upstream_addr: None,
            upstream_status: None,
            upstream_start: None,
            upstream_response_time: None,
            bytes_sent: 0,
            body_bytes_sent: 0,
            _in_flight: crate::metrics::store::InFlight::new(),
            upstream_load: None,
            status: 0,
            conf_type: "",
            conf_id: Arc::from(""),
            conf_version: Arc::from(""),
            start: Instant::now(),
            start_time: SystemTime::now(),
            vars: HashMap::new(),
            consumer: None,
            plugins: None,
            request_id: std::cell::OnceCell::new(),
            data: Vec::new(),
        }
    }

    /// Per-request data of one type (native plugins keep their state here).
    pub fn data<T: 'static>(&self) -> Option<&T> {
        let id = TypeId::of::<T>();
        self.data
            .iter()
            .find(|(k, _)| *k == id)
            .and_then(|(_, b)| b.downcast_ref())
    }

    pub fn data_mut<T: 'static>(&mut self) -> Option<&mut T> {
        let id = TypeId::of::<T>();
        self.data
            .iter_mut()
            .find(|(k, _)| *k == id)
            .and_then(|(_, b)| b.downcast_mut())
    }

    pub fn set_data<T: 'static>(&mut self, value: T) {
        let id = TypeId::of::<T>();
        match self.data.iter_mut().find(|(k, _)| *k == id) {
            Some((_, b)) => *b = Box::new(value),
            None => self.data.push((id, Box::new(value))),
        }
    }

    pub fn take_data<T: 'static>(&mut self) -> Option<T> {
        let id = TypeId::of::<T>();
        let i = self.data.iter().position(|(k, _)| *k == id)?;
        self.data.swap_remove(i).1.downcast().ok().map(|b| *b)
    }

    /// The route id, or "" before routing.
    pub fn route_id(&self) -> &str {
        self.route.as_ref().map(|r| r.id.as_str()).unwrap_or("")
    }

    /// APISIX's `:ext`: the tail matched by a route uri ending in `*`.
    pub fn matched_ext(&self) -> Option<&str> {
        self.matched.as_ref().and_then(|m| m.ext.as_deref())
    }

    /// One request header's value, as text (the first one if repeated).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The path and query the upstream will be asked for.
    pub fn effective_upstream_uri(&self) -> &str {
        self.upstream_uri.as_deref().unwrap_or(&self.request_uri)
    }

    /// nginx's `$binary_remote_addr`: the client address as 4 (IPv4) or 16 (IPv6) bytes. Not
    /// text, so [`Ctx::var`] does not give it; the Lua `var` readers ask for it by name.
    pub fn binary_remote_addr(&self) -> Vec<u8> {
        match self.remote_addr.ip() {
            std::net::IpAddr::V4(a) => a.octets().to_vec(),
            std::net::IpAddr::V6(a) => a.octets().to_vec(),
        }
    }

    /// APISIX's `ctx.var.NAME`. Returns None for an unknown or unset variable.
    pub fn var(&self, name: &str) -> Option<Cow<'_, str>> {
        if let Some(v) = self.vars.get(name) {
            return Some(Cow::Borrowed(v));
        }
        if let Some(h) = name.strip_prefix("http_") {
            return self.header_var(h);
        }
        if let Some(a) = name.strip_prefix("arg_") {
            return self.arg(a);
        }
        if let Some(c) = name.strip_prefix("cookie_") {
            return self.cookie(c).map(Cow::Borrowed);
        }
        if name.starts_with("ssl_") || name == "https" {
            return match &self.tls {
                Some(t) => t.var(name),
                None => crate::tls::plain_var(name),
            };
        }
        let v: Cow<str> = match name {
            "uri" => Cow::Borrowed(&self.uri),
            "request_uri" => Cow::Borrowed(&self.request_uri),
            "args" | "query_string" => Cow::Borrowed(self.args.as_deref()?),
            "is_args" => Cow::Borrowed(if self.args.is_some() { "?" } else { "" }),
            "host" => Cow::Borrowed(&self.host),
            // `method` is APISIX's own `ctx.var` name for it (core/ctx.lua's `var_methods`).
            "request_method" | "method" => Cow::Borrowed(self.method.as_str()),
            "scheme" => Cow::Borrowed(self.scheme),
            "server_protocol" => Cow::Borrowed(version_str(self.version)),
            "remote_addr" => Cow::Owned(self.remote_addr.ip().to_string()),
            // nginx prints no port for an address given without one (port 0).
            "remote_port" => Cow::Owned(port_str(self.remote_addr.port())),
            "realip_remote_addr" => Cow::Owned(
                self.client
                    .realip_from
                    .unwrap_or(self.remote_addr)
                    .ip()
                    .to_string(),
            ),
            "realip_remote_port" => Cow::Owned(port_str(
                self.client.realip_from.unwrap_or(self.remote_addr).port(),
            )),
            "server_addr" => Cow::Owned(self.local_addr.ip().to_string()),
            "server_port" => Cow::Owned(self.local_addr.port().to_string()),
            // APISIX's proxy server block is `server_name _;`.
            "server_name" => Cow::Borrowed("_"),
            "hostname" => Cow::Borrowed(host_name()),
            "route_id" => Cow::Borrowed(self.route.as_ref()?.id.as_str()),
            "service_id" => Cow::Borrowed(self.route.as_ref()?.service_id.as_deref()?),
            "upstream_uri" => Cow::Borrowed(self.effective_upstream_uri()),
            "upstream_addr" => Cow::Borrowed(self.upstream_addr.as_deref()?),
            "upstream_status" => Cow::Owned(self.upstream_status?.to_string()),
            "status" => Cow::Owned(self.status.to_string()),
            "content_type" => self.header_var("content_type")?,
            "content_length" => self.header_var("content_length")?,
            "request_time" => Cow::Owned(format!("{:.3}", self.start.elapsed().as_secs_f64())),
            "route_name"
            | "service_name"
            | "consumer_name"
            | "remote_user"
            | "request"
            | "body_bytes_sent"
            | "bytes_sent"
            | "upstream_scheme"
            | "upstream_response_time"
            | "request_id"
            | "apisix_request_id"
            | "time_local"
            | "time_iso8601"
            | "pid"
            | "upstream_host" => return self.log_var(name),
            "msec" => Cow::Owned(format!(
                "{:.3}",
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0)
            )),
            _ => return None,
        };
        Some(v)
    }

    /// Whether `name` is one of the variables [`Ctx::var`] computes itself (or a family of
    /// them); any other name can only be set by a plugin or registered by a Lua one.
    pub fn is_builtin_var(name: &str) -> bool {
        const NAMES: &[&str] = &[
            "uri",
            "request_uri",
            "args",
            "query_string",
            "is_args",
            "host",
            "request_method",
            "method",
            "scheme",
            "server_protocol",
            "remote_addr",
            "binary_remote_addr",
            "remote_port",
            "realip_remote_addr",
            "realip_remote_port",
            "server_addr",
            "server_port",
            "server_name",
            "hostname",
            "route_id",
            "route_name",
            "service_id",
            "service_name",
            "consumer_name",
            "remote_user",
            "request",
            "body_bytes_sent",
            "bytes_sent",
            "upstream_scheme",
            "upstream_response_time",
            "upstream_uri",
            "upstream_host",
            "upstream_addr",
            "upstream_status",
            "status",
            "content_type",
            "content_length",
            "request_time",
            "request_id",
            "apisix_request_id",
            "time_local",
            "time_iso8601",
            "msec",
            "pid",
            "https",
        ];
        NAMES.contains(&name)
            || ["http_", "arg_", "cookie_", "ssl_"]
                .iter()
                .any(|p| name.starts_with(p))
    }

    /// The variables access logs mostly ask for (kept out of [`Ctx::var`]'s common arms).
    fn log_var(&self, name: &str) -> Option<Cow<'_, str>> {
        let route = self.route.as_deref();
        let v: Cow<str> = match name {
            "route_name" => Cow::Borrowed(route?.name.as_deref()?),
            "service_name" => Cow::Borrowed(route?.service_name.as_deref()?),
            "consumer_name" => Cow::Borrowed(self.consumer.as_ref()?.username.as_str()),
            "remote_user" => Cow::Owned(self.basic_auth_user()?),
            "request" => Cow::Owned(format!(
                "{} {} {}",
                self.method,
                self.request_uri,
                version_str(self.version)
            )),
            "body_bytes_sent" => Cow::Owned(self.body_bytes_sent.to_string()),
            "bytes_sent" => Cow::Owned(self.bytes_sent.to_string()),
            // As APISIX's defaults in nginx.conf: `http` and the client's Host until an
            // upstream says otherwise.
            "upstream_scheme" => Cow::Borrowed(
                route
                    .and_then(|r| r.upstream.as_ref())
                    .map_or("http", |u| u.config.scheme.as_str()),
            ),
            "upstream_host" => return self.upstream_host_var(),
            "upstream_response_time" => {
                if let Some(t) = self.upstream_response_time {
                    return Some(Cow::Owned(format!("{t:.3}")));
                }
                self.upstream_status?;
                let start = self.upstream_start?;
                Cow::Owned(format!("{:.3}", start.elapsed().as_secs_f64()))
            }
            // The request-id plugin sets `apisix_request_id` in `vars`, read before this.
            "request_id" | "apisix_request_id" => Cow::Borrowed(self.request_id()),
            "time_local" => Cow::Owned(crate::accesslog::time::local()),
            "time_iso8601" => Cow::Owned(crate::accesslog::time::iso8601()),
            // nginx's `$pid`: the worker's process, here the serving process.
            "pid" => Cow::Owned(std::process::id().to_string()),
            _ => return None,
        };
        Some(v)
    }

    /// `$upstream_host`: the Host the upstream request carries (a plugin's choice, else as
    /// the upstream's `pass_host` says), the client's before an upstream is known.
    fn upstream_host_var(&self) -> Option<Cow<'_, str>> {
        use crate::config::PassHost;
        if let Some(h) = &self.upstream_host {
            return Some(Cow::Borrowed(h));
        }
        let client = || self.header("host").map(Cow::Borrowed);
        let Some(up) = self.route.as_ref().and_then(|r| r.upstream.as_ref()) else {
            return client();
        };
        match up.config.pass_host {
            PassHost::Pass => client(),
            PassHost::Rewrite => up.config.upstream_host.as_deref().map(Cow::Borrowed),
            PassHost::Node => {
                let addr = self.upstream_addr.as_deref()?;
                let default = format!(":{}", up.config.scheme.default_port());
                Some(Cow::Borrowed(
                    addr.strip_suffix(default.as_str()).unwrap_or(addr),
                ))
            }
        }
    }

    /// nginx's `$request_id`: 16 random bytes as hex, the same for the whole request.
    pub fn request_id(&self) -> &str {
        self.request_id
            .get_or_init(|| uuid::Uuid::new_v4().simple().to_string().into_boxed_str())
    }

    /// nginx's `$remote_user`: the user name of a `Basic` `Authorization` header.
    fn basic_auth_user(&self) -> Option<String> {
        use base64::Engine;
        let v = self.header("authorization")?;
        let (scheme, cred) = v.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(cred.trim())
            .ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (user, _) = text.split_once(':')?;
        Some(user.to_string())
    }

    /// `http_NAME`: the header with `_` read as `-`, case-insensitive; repeated headers joined
    /// with ", " as nginx does.
    fn header_var(&self, name: &str) -> Option<Cow<'_, str>> {
        let lookup: Cow<str> = if name.contains('_') {
            Cow::Owned(name.replace('_', "-"))
        } else {
            Cow::Borrowed(name)
        };
        let mut values = self.headers.get_all(lookup.as_ref()).iter();
        let first = values.next()?.to_str().ok()?;
        match values.next() {
            None => Some(Cow::Borrowed(first)),
            Some(second) => {
                let mut s = format!("{first}, {}", second.to_str().ok()?);
                for v in values {
                    s.push_str(", ");
                    s.push_str(v.to_str().ok()?);
                }
                Some(Cow::Owned(s))
            }
        }
    }

    /// `arg_NAME`: the first query argument of that name, percent-decoded.
    pub fn arg(&self, name: &str) -> Option<Cow<'_, str>> {
        let args = self.args.as_deref()?;
        form_urlencoded::parse(args.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| Cow::Owned(v.into_owned()))
    }

    /// `cookie_NAME`.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        for h in self.headers.get_all(http::header::COOKIE) {
            let Ok(s) = h.to_str() else { continue };
            for pair in s.split(';') {
                if let Some((k, v)) = pair.trim().split_once('=') {
                    if k == name {
                        return Some(v);
                    }
                }
            }
        }
        None
    }
}

fn port_str(port: u16) -> String {
    if port == 0 {
        String::new()
    } else {
        port.to_string()
    }
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// nginx's `$host`: the Host header without port, lower-cased; the server address if absent.
fn request_host(headers: &HeaderMap, local: SocketAddr) -> String {
    match headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
    {
        Some(h) => strip_port(h).to_ascii_lowercase(),
        None => local.ip().to_string(),
    }
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `[::1]`.
pub fn strip_port(host: &str) -> &str {
    // Byte searches (every request runs this on its Host header): the separators are ASCII, so
    // each cut falls on a character boundary.
    let b = host.as_bytes();
    if b.first() == Some(&b'[') {
        return match b.iter().position(|&c| c == b']') {
            Some(i) => &host[..=i],
            None => host,
        };
    }
    match b.iter().rposition(|&c| c == b':') {
        Some(i) if b[i + 1..].iter().all(u8::is_ascii_digit) => &host[..i],
        _ => host,
    }
}

/// nginx's `$uri` from a raw path: percent-decoded, `//` merged, `.` and `..` resolved.
/// Errors (400) on a path that climbs above the root, an encoded NUL, or invalid UTF-8.
pub fn normalize_path(raw: &str) -> Result<String, &'static str> {
    if !raw.starts_with('/') {
        return Err("the request path must start with /");
    }
    // The usual path is already normal: nothing encoded, no empty, "." or ".." segment. Skip the
    // decode/split/join (three allocations) and copy it as it is.
    if is_plain_path(raw.as_bytes()) {
        return Ok(raw.to_string());
    }
    let decoded = percent_encoding::percent_decode_str(raw).collect::<Vec<u8>>();
    if decoded.contains(&0) {
        return Err("the request path contains a NUL byte");
    }
    let decoded = String::from_utf8(decoded).map_err(|_| "the request path is not valid UTF-8")?;
    let mut segments: Vec<&str> = Vec::new();
    for seg in decoded.split('/').skip(1) {
        match seg {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err("the request path climbs above the root");
                }
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    // A trailing slash (or a trailing "." / "..") keeps the path a "directory", as nginx does.
    let ends_dir = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    if out.is_empty() || ends_dir {
        out.push('/');
    }
    Ok(out)
}

/// No `%`, `//`, `/./`, `/../`, and no trailing `/.` or `/..`: one pass over the bytes (four
/// substring searches cost several hundred instructions on an ordinary path).
fn is_plain_path(b: &[u8]) -> bool {
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'%' => return false,
            b'/' => match &b[i + 1..] {
                [b'/', ..] | [b'.'] | [b'.', b'/', ..] | [b'.', b'.'] | [b'.', b'.', b'/', ..] => {
                    return false
                }
                _ => {}
            },
            _ => {}
        }
    }
    true
}

/// nginx's `$hostname`: the machine's host name, read once.
fn host_name() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(crate::metrics::expose::hostname)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_path_check_matches_the_substring_rules() {
        let old = |raw: &str| {
            !raw.contains('%')
                && !raw.contains("//")
                && !raw.contains("/./")
                && !raw.contains("/../")
                && !raw.ends_with("/.")
                && !raw.ends_with("/..")
        };
        let parts = ["/", "a", ".", "..", "%", "...", ".a", "b."];
        // Every sequence of up to four parts.
        let mut paths = vec![String::new()];
        for _ in 0..4 {
            let mut next = Vec::new();
            for p in &paths {
                for q in parts {
                    next.push(format!("{p}{q}"));
                }
            }
            paths.extend(next);
            paths.sort();
            paths.dedup();
        }
        for p in &paths {
            assert_eq!(is_plain_path(p.as_bytes()), old(p), "{p:?}");
        }
    }

    #[test]
    fn normalize() {
        assert_eq!(normalize_path("/").unwrap(), "/");
        assert_eq!(normalize_path("/a//b///c").unwrap(), "/a/b/c");
        assert_eq!(normalize_path("/a/./b/../c/").unwrap(), "/a/c/");
        assert_eq!(normalize_path("/%41bc%2Fd").unwrap(), "/Abc/d");
        assert_eq!(normalize_path("/hello/").unwrap(), "/hello/");
        assert!(normalize_path("/../x").is_err());
        assert!(normalize_path("/a%00").is_err());
        assert_eq!(normalize_path("/a/b.c/d").unwrap(), "/a/b.c/d");
        assert_eq!(normalize_path("/a/..b/.c/").unwrap(), "/a/..b/.c/");
        assert_eq!(normalize_path("/a/.").unwrap(), "/a/");
        assert_eq!(normalize_path("/a/b/..").unwrap(), "/a/");
        assert_eq!(normalize_path("/.").unwrap(), "/");
    }

    #[test]
    fn ports() {
        assert_eq!(strip_port("Example.com:80"), "Example.com");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("host"), "host");
    }
}
