//! The Admin API: APISIX's `/apisix/admin/...` endpoints over the resource store.
//!
//! [`start`] checks the key, opens the store under `data_dir`, joins the store to every build
//! (so the stored resources serve from the first request on), and serves HTTP/1 on the control
//! runtime. [`api`] holds what each call does; this file is HTTP: authentication, paths,
//! methods, body limits. See docs/admin-api.md.

pub mod api;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::Value;
use subtle::ConstantTimeEq;

use crate::config::{AdminConfig, NodeConfig};
use crate::reload::Reloader;
use crate::store::{Kind, RedbStore, ResourceStore, StoreOverlay};
use crate::supervisor::BoundListener;

pub use api::{Admin, Call, Reply, ReplyBody};

/// The environment variable that overrides `admin.key`.
pub const KEY_ENV: &str = "MOONGATE_ADMIN_KEY";

/// The role of the Admin API's listeners in a [`crate::supervisor::ListenerSet`].
pub const ROLE: &str = "admin";

/// Largest request body, as APISIX (1.5 MiB); a larger one gets 413.
pub const MAX_BODY: usize = 1024 * 1024 * 3 / 2;

/// Shortest key accepted on a listener that is not loopback-only.
pub const MIN_REMOTE_KEY_LEN: usize = 16;

/// Keys published in APISIX's docs and default config files: never accepted.
const KNOWN_DEFAULT_KEYS: [&str; 2] = [
    "edd1c9f034335f136f87ad84b625c8f1",
    "4054f7cf07e344346cd3f287985e76a2",
];

/// The store file's name inside `data_dir`.
pub const STORE_FILE: &str = "moongate-admin.redb";

/// Why the Admin API did not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin API: {0}")]
    Key(String),
    #[error("admin API: {0}")]
    Store(String),
    #[error("admin API: the stored resources do not build with the config file, so moongate does not start (fix the config file, or move {store} away): {errors}")]
    Build { store: String, errors: String },
    #[error("admin API: cannot listen on {addr}: {err}")]
    Listen {
        addr: SocketAddr,
        err: std::io::Error,
    },
}

/// The key in force: `MOONGATE_ADMIN_KEY` when set and not empty, else `admin.key`. A key is
/// always required; it must not be an APISIX default, and must be at least
/// [`MIN_REMOTE_KEY_LEN`] characters when any admin address is not loopback.
pub fn resolve_key(conf: &AdminConfig, env: Option<String>) -> Result<String, AdminError> {
    let key = env
        .filter(|k| !k.is_empty())
        .or_else(|| conf.key.clone().filter(|k| !k.is_empty()))
        .ok_or_else(|| {
            AdminError::Key(format!(
                "no key: set admin.key in the config file or the {KEY_ENV} environment variable \
                 (moongate has no built-in default key)"
            ))
        })?;
    if KNOWN_DEFAULT_KEYS.contains(&key.as_str()) {
        return Err(AdminError::Key(
            "the key is a default published in APISIX's documentation; choose your own".into(),
        ));
    }
    let remote = conf.listen.0.iter().find(|a| !a.ip().is_loopback());
    if let Some(addr) = remote {
        if key.chars().count() < MIN_REMOTE_KEY_LEN {
            return Err(AdminError::Key(format!(
                "listening on {addr} (not loopback) needs a key of at least {MIN_REMOTE_KEY_LEN} characters"
            )));
        }
    }
    Ok(key)
}

/// `data_dir`, or `data/` next to the config file when unset.
pub fn data_dir(node: &NodeConfig, config_path: &Path) -> PathBuf {
    match &node.data_dir {
        Some(d) => d.clone(),
        None => {
            let base = config_path.parent().unwrap_or(Path::new("."));
            let base = if base.as_os_str().is_empty() {
                Path::new(".")
            } else {
                base
            };
            base.join("data")
        }
    }
}

/// A running Admin API.
pub struct AdminHandle {
    /// The bound addresses (a `:0` port resolved).
    pub addrs: Vec<SocketAddr>,
    pub admin: Arc<Admin>,
}

/// Starts the Admin API: key check, store, overlay + first build with the stored resources,
/// listeners on `rt`. Prints `admin API listening on http://ADDR` per listener. `external`
/// is a store already joined to the builds (etcd); None opens the embedded store.
pub fn start(
    conf: &AdminConfig,
    node: &NodeConfig,
    reloader: Arc<Reloader>,
    rt: &tokio::runtime::Handle,
    external: Option<Arc<dyn ResourceStore>>,
    listeners: Vec<BoundListener>,
) -> Result<AdminHandle, AdminError> {
    let key = resolve_key(conf, std::env::var(KEY_ENV).ok())?;
    let http = Http {
        key: Arc::from(key),
        body_timeout: body_timeout(conf.client_body_timeout),
    };
    if let Some(store) = external {
        let admin = Arc::new(Admin::new(reloader, store));
        return serve_on(listeners, admin, http, rt);
    }
    let dir = data_dir(node, reloader.config_path());
    std::fs::create_dir_all(&dir)
        .map_err(|e| AdminError::Store(format!("cannot create data_dir {}: {e}", dir.display())))?;
    let store: Arc<dyn ResourceStore> = Arc::new(
        RedbStore::open(&dir.join(STORE_FILE)).map_err(|e| AdminError::Store(e.to_string()))?,
    );
    reloader.set_overlay(Arc::new(StoreOverlay::new(store.clone())));
    if let Err(errors) = reloader.rebuild("admin store", true) {
        return Err(AdminError::Build {
            store: store.describe(),
            errors: errors.to_string().replace('\n', "; "),
        });
    }
    let admin = Arc::new(Admin::new(reloader, store));
    serve_on(listeners, admin, http, rt)
}

/// What every Admin API connection is served with.
#[derive(Clone)]
struct Http {
    key: Arc<str>,
    /// The longest wait for the next piece of a request body.
    body_timeout: Duration,
}

/// `admin.client_body_timeout` as a duration: at least a millisecond, at most a day (so a
/// zero, negative, NaN or infinite value cannot disable the bound or panic).
fn body_timeout(secs: f64) -> Duration {
    const DAY: f64 = 86_400.0;
    Duration::from_secs_f64(if secs.is_nan() {
        10.0
    } else {
        secs.clamp(0.001, DAY)
    })
}

/// Serves `admin` on `rt` over its listeners (bound by the supervisor, or in `main`).
fn serve_on(
    listeners: Vec<BoundListener>,
    admin: Arc<Admin>,
    http: Http,
    rt: &tokio::runtime::Handle,
) -> Result<AdminHandle, AdminError> {
    let mut addrs = Vec::new();
    for bound in listeners {
        let addr = bound.local;
        for std_listener in bound.sockets {
            let listener = {
                let _enter = rt.enter();
                tokio::net::TcpListener::from_std(std_listener)
                    .map_err(|err| AdminError::Listen { addr, err })?
            };
            rt.spawn(accept_loop(listener, admin.clone(), http.clone()));
        }
        tracing::info!("admin API listening on http://{addr}");
        addrs.push(addr);
    }
    Ok(AdminHandle { addrs, admin })
}

async fn accept_loop(listener: tokio::net::TcpListener, admin: Arc<Admin>, http: Http) {
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!("admin API accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let admin = admin.clone();
        let http = http.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let admin = admin.clone();
                let http = http.clone();
                async move { Ok::<_, Infallible>(serve(req, admin, http).await) }
            });
            // A client that never finishes its header must not hold a connection forever.
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%remote, "admin API connection ended with an error: {e}");
            }
        });
    }
}

fn respond(reply: Reply) -> Response<Full<Bytes>> {
    let (body, ctype) = match reply.body {
        ReplyBody::Json(v) => (Bytes::from(v.to_string()), "application/json"),
        ReplyBody::Text(t) => (Bytes::from_static(t.as_bytes()), "text/plain"),
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    resp
}

/// The key the client sent: `api_key` query argument first, then `X-API-KEY` (APISIX's order).
fn sent_key<B>(req: &Request<B>) -> Option<String> {
    if let Some(q) = req.uri().query() {
        if let Some((_, v)) = form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "api_key") {
            return Some(v.into_owned());
        }
    }
    req.headers()
        .get("x-api-key")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// Compares in time that depends only on the lengths, not on where the bytes differ.
fn key_matches(sent: &str, key: &str) -> bool {
    sent.as_bytes().ct_eq(key.as_bytes()).into()
}

async fn serve(req: Request<Incoming>, admin: Arc<Admin>, http: Http) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let Some(rest) = path.strip_prefix("/apisix/admin") else {
        return respond(Reply::error(
            404,
            "not found: the Admin API lives under /apisix/admin/",
        ));
    };
    match sent_key(&req) {
        None => return respond(unauthorized("missing apikey")),
        Some(k) if !key_matches(&k, &http.key) => return respond(unauthorized("wrong apikey")),
        Some(_) => {}
    }
    let segs: Vec<String> = rest
        .split('/')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    let method = req.method().clone();

    // The body: bounded, read before routing so a too-large one is 413 whatever the path.
    let too_large = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > MAX_BODY as u64);
    if too_large {
        // Read and drop what the client is still sending (bounded), so it reads the 413 rather
        // than a connection reset mid-upload: nginx's lingering close.
        crate::body::drain(req.into_body()).await;
        return respond(body_too_large());
    }
    let bytes = match read_body(req.into_body(), http.body_timeout).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => return respond(body_too_large()),
        Err(BodyError::Timeout) => {
            let mut resp = respond(Reply::error(
                408,
                format!(
                    "invalid request body: no data for {:?} (admin.client_body_timeout)",
                    http.body_timeout
                ),
            ));
            // The rest of the body may still come: this connection cannot serve another request.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return resp;
        }
        Err(BodyError::Read(e)) => {
            return respond(Reply::bad(format!("invalid request body: {e}")))
        }
    };
    let body: Option<Value> = if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        None
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(v) => Some(v),
            Err(e) => return respond(Reply::bad(format!("invalid request body: {e}"))),
        }
    };

    let call = match route(&method, &segs, body) {
        Ok(c) => c,
        Err(r) => return respond(r),
    };
    let reply = match tokio::task::spawn_blocking(move || admin.handle(call)).await {
        Ok(r) => r,
        Err(e) => Reply::error(500, format!("admin API call failed: {e}")),
    };
    respond(reply)
}

/// Why a request body was not read.
enum BodyError {
    TooLarge,
    /// No data for the body timeout.
    Timeout,
    Read(Box<dyn std::error::Error + Send + Sync>),
}

/// Reads a request body of at most [`MAX_BODY`] bytes, each wait for data bounded by `timeout`
/// (nginx's `client_body_timeout` is per read too, so a slow but steady upload passes).
async fn read_body(body: Incoming, timeout: Duration) -> Result<Bytes, BodyError> {
    let mut body = Limited::new(body, MAX_BODY);
    let mut out = bytes::BytesMut::new();
    loop {
        match tokio::time::timeout(timeout, body.frame()).await {
            Err(_) => return Err(BodyError::Timeout),
            Ok(None) => return Ok(out.freeze()),
            Ok(Some(Err(e))) if e.downcast_ref::<LengthLimitError>().is_some() => {
                return Err(BodyError::TooLarge)
            }
            Ok(Some(Err(e))) => return Err(BodyError::Read(e)),
            Ok(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    out.extend_from_slice(d);
                }
            }
        }
    }
}

fn unauthorized(why: &str) -> Reply {
    Reply::json(
        401,
        serde_json::json!({ "error_msg": "failed to check token", "description": why }),
    )
}

fn body_too_large() -> Reply {
    Reply::error(
        413,
        format!("invalid request body: the body is larger than the maximum of {MAX_BODY} bytes"),
    )
}

fn method_not_allowed(method: &Method, allowed: &str) -> Reply {
    Reply::error(
        405,
        format!("method {method} is not allowed here; allowed: {allowed}"),
    )
}

/// Maps method and path segments (after `/apisix/admin`) to a [`Call`].
pub fn route(method: &Method, segs: &[String], body: Option<Value>) -> Result<Call, Reply> {
    let Some(first) = segs.first() else {
        return Err(Reply::error(
            404,
            "not found: name a resource type, e.g. /apisix/admin/routes",
        ));
    };
    match (first.as_str(), &segs[1..]) {
        ("plugins", [list]) if list == "list" => match *method {
            Method::GET => Ok(Call::PluginList),
            _ => Err(method_not_allowed(method, "GET")),
        },
        ("plugins", [reload]) if reload == "reload" => match *method {
            Method::PUT => Ok(Call::PluginReload),
            _ => Err(method_not_allowed(method, "PUT")),
        },
        ("plugins", []) => match *method {
            Method::GET => Ok(Call::PluginAll),
            _ => Err(method_not_allowed(method, "GET")),
        },
        ("plugins", [name]) => match *method {
            Method::GET => Ok(Call::PluginSchema(name.clone())),
            _ => Err(method_not_allowed(method, "GET")),
        },
        ("moongate", [status]) if status == "status" => match *method {
            Method::GET => Ok(Call::Status),
            _ => Err(method_not_allowed(method, "GET")),
        },
        ("consumers", [user, cred, rest @ ..]) if cred == "credentials" => {
            credential_call(method, user, rest, body)
        }
        ("consumer_groups", _) if *method == Method::POST => Err(Reply::error(
            405,
            "not supported `POST` method for consumer group",
        )),
        (res, rest) => {
            let Some(kind) = Kind::parse(res).filter(|k| *k != Kind::Credentials) else {
                return Err(Reply::error(
                    404,
                    format!(
                        "unknown resource type \"{res}\": moongate serves routes, upstreams, services, global_rules, consumers, consumer_groups, plugin_metadata, ssls, plugins"
                    ),
                ));
            };
            resource_call(kind, method, rest, body)
        }
    }
}

/// `/consumers/USERNAME/credentials[/ID]` (APISIX 3.8+): GET, PUT and DELETE.
fn credential_call(
    method: &Method,
    user: &str,
    rest: &[String],
    body: Option<Value>,
) -> Result<Call, Reply> {
    let id = match rest {
        [] => None,
        [id] => Some(id.clone()),
        _ => {
            return Err(Reply::bad(format!(
            "invalid credential id: id \"{}\" may only contain letters, digits, '-', '_' and '.'",
            rest.join("/")
        )))
        }
    };
    let missing = || Reply::bad("missing credential id");
    let user = user.to_string();
    match *method {
        Method::GET => Ok(match id {
            None => Call::CredentialList(user),
            Some(id) => Call::CredentialGet(user, id),
        }),
        Method::PUT => Ok(Call::CredentialPut(user, id.ok_or_else(missing)?, body)),
        Method::DELETE => Ok(Call::CredentialDelete(user, id.ok_or_else(missing)?)),
        Method::POST | Method::PATCH => Err(Reply::error(
            405,
            format!("not supported `{method}` method for credential"),
        )),
        _ => Err(method_not_allowed(method, "GET, PUT, DELETE")),
    }
}

fn resource_call(
    kind: Kind,
    method: &Method,
    rest: &[String],
    body: Option<Value>,
) -> Result<Call, Reply> {
    // Outside PATCH, an id is one segment: more segments are an id with a path separator.
    let single_id = |rest: &[String]| -> Result<Option<String>, Reply> {
        match rest {
            [] => Ok(None),
            [id] => Ok(Some(id.clone())),
            _ => Err(Reply::bad(format!(
                "invalid {} id: id \"{}\" may only contain letters, digits, '-', '_' and '.'",
                kind.singular(),
                rest.join("/")
            ))),
        }
    };
    let missing_id = || Reply::bad(format!("missing {} id", kind.singular()));
    match *method {
        Method::GET => Ok(match single_id(rest)? {
            None => Call::List(kind),
            Some(id) => Call::Get(kind, id),
        }),
        Method::PUT => Ok(Call::Put(kind, single_id(rest)?, body)),
        Method::POST => match rest {
            [] => Ok(Call::Post(kind, body)),
            _ => Err(Reply::bad(format!(
                "wrong {} id, do not need it",
                kind.singular()
            ))),
        },
        Method::PATCH => match rest {
            [] => Err(missing_id()),
            [id, sub @ ..] => Ok(Call::Patch(kind, id.clone(), sub.join("/"), body)),
        },
        Method::DELETE => match single_id(rest)? {
            None => Err(missing_id()),
            Some(id) => Ok(Call::Delete(kind, id)),
        },
        _ => Err(method_not_allowed(method, "GET, PUT, POST, PATCH, DELETE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Listen;

    fn conf(listen: &str, key: Option<&str>) -> AdminConfig {
        AdminConfig {
            listen: Listen(vec![listen.parse().unwrap()]),
            key: key.map(String::from),
            client_body_timeout: 10.0,
        }
    }

    #[test]
    fn key_rules() {
        assert!(resolve_key(&conf("127.0.0.1:9180", None), None).is_err());
        assert_eq!(
            resolve_key(&conf("127.0.0.1:9180", Some("short")), None).unwrap(),
            "short"
        );
        assert!(resolve_key(&conf("0.0.0.0:9180", Some("short")), None).is_err());
        assert!(resolve_key(&conf("0.0.0.0:9180", Some("a-long-enough-key-123")), None).is_ok());
        assert!(resolve_key(
            &conf("127.0.0.1:9180", Some("edd1c9f034335f136f87ad84b625c8f1")),
            None
        )
        .is_err());
        // The environment wins.
        assert_eq!(
            resolve_key(&conf("127.0.0.1:9180", Some("file")), Some("env".into())).unwrap(),
            "env"
        );
        assert_eq!(
            resolve_key(&conf("127.0.0.1:9180", Some("file")), Some(String::new())).unwrap(),
            "file"
        );
        assert!(key_matches("abc", "abc"));
        assert!(!key_matches("abd", "abc"));
        assert!(!key_matches("ab", "abc"));
    }

    fn segs(p: &str) -> Vec<String> {
        p.split('/')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    }

    #[test]
    fn routing() {
        assert!(matches!(
            route(&Method::GET, &segs("routes"), None),
            Ok(Call::List(Kind::Routes))
        ));
        assert!(matches!(
            route(&Method::PATCH, &segs("routes/1/plugins"), None),
            Ok(Call::Patch(Kind::Routes, ref id, ref sub, None)) if id == "1" && sub == "plugins"
        ));
        assert!(matches!(
            route(&Method::GET, &segs("consumers/jack"), None),
            Ok(Call::Get(Kind::Consumers, ref id)) if id == "jack"
        ));
        assert!(matches!(
            route(&Method::GET, &segs("ssls/1"), None),
            Ok(Call::Get(Kind::Ssls, ref id)) if id == "1"
        ));
        assert_eq!(
            route(&Method::GET, &segs("protos/1"), None)
                .unwrap_err()
                .status,
            404
        );
        assert_eq!(
            route(&Method::PUT, &segs("routes/a/b"), None)
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            route(&Method::OPTIONS, &segs("routes/1"), None)
                .unwrap_err()
                .status,
            405
        );
        assert_eq!(
            route(&Method::POST, &segs("routes/1"), None)
                .unwrap_err()
                .status,
            400
        );
        assert!(matches!(
            route(&Method::PUT, &segs("plugins/reload"), None),
            Ok(Call::PluginReload)
        ));
    }
}
