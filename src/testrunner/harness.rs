//! The pieces a test run talks to: the gateway itself, in this process on a loopback listener
//! (the real workers, snapshot, router, phases and plugins), the upstream the runner provides,
//! and the client that sends each case's requests.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tokio::net::{TcpListener, TcpStream};

use crate::config::{self, ConfigErrors, NodeConfig};
use crate::snapshot::{self, Gateway, Registry, Snapshot};
use crate::supervisor::ListenerSet;

use super::expect::{header_value, Got, Seen};
use super::spec::{Case, Request as SpecRequest, TestFile, UpstreamAnswer};

/// How long one request may take before the case fails (a plugin's own time budget is far
/// shorter by default).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The gateway serving in this process: one worker on a loopback port, serving whatever
/// snapshot the runner publishes.
pub struct InProcess {
    gw: Arc<Gateway>,
    pub addr: SocketAddr,
    shutdown: tokio::sync::watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
}

impl InProcess {
    /// Binds 127.0.0.1 on a free port (through the same [`ListenerSet`] `moongate run` uses)
    /// and starts a worker with `node`'s settings, serving an empty snapshot.
    pub fn start(node: &NodeConfig) -> Result<InProcess, String> {
        let node = Arc::new(node.clone());
        let gw = Arc::new(Gateway::new(Snapshot::empty()));
        let mut set = ListenerSet::new();
        // The plain listeners only: tests speak plain HTTP to the gateway.
        let specs: Vec<_> = crate::proxy::listener_specs(&node)
            .into_iter()
            .filter(|l| !l.tls)
            .collect();
        let (listeners, bound) =
            crate::proxy::bind_all(&mut set, &specs, 1).map_err(|e| e.to_string())?;
        let addr = bound.first().ok_or("no listener was bound")?.1;
        let (shutdown, rx) = tokio::sync::watch::channel(false);
        let workers = crate::proxy::start_workers(node, gw.clone(), listeners, rx)
            .map_err(|e| format!("cannot start the gateway worker: {e}"))?;
        Ok(InProcess {
            gw,
            addr,
            shutdown,
            workers,
        })
    }

    /// The generation number for the next snapshot built to be published here.
    pub fn next_generation(&self) -> u64 {
        self.gw.next_generation()
    }

    /// Makes `snap` the snapshot requests are served from.
    pub fn publish(&self, snap: Snapshot) {
        self.gw.publish(snap);
    }

    /// Stops the worker (graceful: in-flight requests end first) and waits for it.
    pub fn stop(self) {
        let _ = self.shutdown.send(true);
        for w in self.workers {
            let _ = w.join();
        }
    }
}

/// The node settings a test file runs with: its `node:` section, its plugin folders, and one
/// worker on a loopback port with the access log on (the runner counts its lines).
pub fn node_config(
    file: &TestFile,
    plugin_dirs: Vec<std::path::PathBuf>,
) -> Result<NodeConfig, ConfigErrors> {
    let mut node: NodeConfig = config::from_value_at("node", Value::Object(file.node.clone()))
        .map_err(|e| ConfigErrors(vec![e]))?;
    node.plugin_dirs = plugin_dirs;
    node.listen = config::NodeListen(vec![config::ListenAddr {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        enable_http2: false,
    }]);
    node.workers = Some(1);
    node.access_log = true;
    node.nginx_config = Default::default();
    node.admin = None;
    node.proxy.graceful_shutdown_timeout = node.proxy.graceful_shutdown_timeout.min(1.0);
    Ok(node)
}

/// The plugins a test file's node offers: built as `moongate run` builds them, all or nothing.
pub fn registry(node: &NodeConfig) -> Result<Arc<Registry>, ConfigErrors> {
    crate::reload::build_registry(node).map(Arc::new)
}

/// Fills `nodes` with the runner's upstream where an upstream has none.
fn with_node(mut upstream: Map<String, Value>, node: &str) -> Value {
    if !upstream.contains_key("nodes") {
        upstream.insert("nodes".into(), json!({ node: 1 }));
    }
    Value::Object(upstream)
}

/// The config document of one case: the file's resources, the case's own, and its route
/// (`routes[0]`, id `test` unless it names one) proxying to `upstream` unless it says
/// otherwise.
pub fn case_document(
    file: &TestFile,
    case: &Case,
    node: &NodeConfig,
    upstream: SocketAddr,
) -> Result<config::Document, ConfigErrors> {
    let up = upstream.to_string();
    let mut route = case.route.clone();
    route
        .entry("id")
        .or_insert_with(|| Value::String("test".into()));
    if !route.contains_key("uri") && !route.contains_key("uris") {
        route.insert("uri".into(), Value::String("/*".into()));
    }
    match route.remove("upstream") {
        Some(Value::Object(u)) => {
            route.insert("upstream".into(), with_node(u, &up));
        }
        Some(other) => {
            route.insert("upstream".into(), other);
        }
        None if !route.contains_key("upstream_id") && !route.contains_key("service_id") => {
            route.insert("upstream".into(), with_node(Map::new(), &up));
        }
        None => {}
    }
    let upstreams: Vec<Value> = file
        .upstreams
        .iter()
        .map(|u| match u {
            Value::Object(m) => with_node(m.clone(), &up),
            other => other.clone(),
        })
        .collect();
    let joined = |a: &[Value], b: &[Value]| -> Value { a.iter().chain(b).cloned().collect() };
    let doc = json!({
        "routes": [Value::Object(route)],
        "upstreams": upstreams,
        "services": file.services,
        "consumers": joined(&file.consumers, &case.consumers),
        "consumer_groups": file.consumer_groups,
        "plugin_metadata": joined(&file.plugin_metadata, &case.plugin_metadata),
        "global_rules": joined(&file.global_rules, &case.global_rules),
    });
    let mut doc = config::parse_document(&doc.to_string()).map_err(rename_route)?;
    doc.node = node.clone();
    Ok(doc)
}

/// A case's route is `routes[0]` to the config code; the author wrote it as `route`.
pub fn rename_route(mut errors: ConfigErrors) -> ConfigErrors {
    for e in &mut errors.0 {
        if let Some(rest) = e.path.strip_prefix("routes[0]") {
            e.path = format!("route{rest}");
        }
    }
    errors
}

/// Builds a case's snapshot with the crate's own snapshot build.
pub fn build_case(
    doc: config::Document,
    registry: &Arc<Registry>,
    generation: u64,
) -> Result<Snapshot, ConfigErrors> {
    snapshot::build(Arc::new(doc), registry.clone(), generation).map_err(rename_route)
}

/// The upstream the runner provides: answers each request as the current step says and keeps
/// what it received.
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<Mutex<UpstreamState>>,
}

struct UpstreamState {
    answer: UpstreamAnswer,
    seen: Vec<Seen>,
}

impl Upstream {
    /// Listens on 127.0.0.1 (a free port) on the current tokio runtime.
    pub async fn start() -> std::io::Result<Upstream> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(UpstreamState {
            answer: UpstreamAnswer::Echo,
            seen: Vec::new(),
        }));
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(answer(req, &st).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Upstream { addr, state })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, UpstreamState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets how the next requests are answered and forgets what was received.
    pub fn prepare(&self, answer: UpstreamAnswer) {
        let mut s = self.lock();
        s.answer = answer;
        s.seen.clear();
    }

    /// What was received since [`Upstream::prepare`].
    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }
}

fn lock_state(st: &Mutex<UpstreamState>) -> std::sync::MutexGuard<'_, UpstreamState> {
    st.lock().unwrap_or_else(|e| e.into_inner())
}

/// Headers as a JSON object (repeated names joined with ", "), for `echo`.
fn headers_json(headers: &HeaderMap) -> Value {
    let mut m = Map::new();
    for name in headers.keys() {
        if let Some(v) = header_value(headers, name.as_str()) {
            m.insert(name.as_str().to_string(), Value::String(v));
        }
    }
    Value::Object(m)
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    st: &Mutex<UpstreamState>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(_) => Vec::new(),
    };
    let seen = Seen {
        method: parts.method.to_string(),
        uri: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| parts.uri.to_string()),
        headers: parts.headers,
        body,
    };
    let answer = {
        let mut s = lock_state(st);
        s.seen.push(seen.clone());
        s.answer.clone()
    };
    match answer {
        UpstreamAnswer::Echo => {
            let v = json!({
                "method": seen.method,
                "uri": seen.uri,
                "headers": headers_json(&seen.headers),
                "body": String::from_utf8_lossy(&seen.body),
            });
            let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        UpstreamAnswer::Fixed(a) => {
            let mut r = Response::new(Full::new(Bytes::from(a.body)));
            *r.status_mut() = StatusCode::from_u16(a.status).unwrap_or(StatusCode::OK);
            for (k, v) in &a.headers {
                if let (Ok(k), Ok(v)) = (
                    HeaderName::try_from(k.as_str()),
                    HeaderValue::try_from(v.as_str()),
                ) {
                    r.headers_mut().append(k, v);
                }
            }
            r
        }
    }
}

/// The path a request goes to when its case names none: the route's `uri` without a trailing
/// wildcard.
pub fn default_path(case: &Case) -> String {
    case.route
        .get("uri")
        .and_then(Value::as_str)
        .map(|u| u.trim_end_matches('*').to_string())
        .filter(|u| u.starts_with('/'))
        .unwrap_or_else(|| "/".to_string())
}

/// Sends one request to the gateway at `addr` on a new connection and reads the whole answer.
pub async fn send(addr: SocketAddr, req: &SpecRequest, path: &str) -> Result<Got, String> {
    let method = req.method.as_deref().unwrap_or("GET");
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| format!("request.method: {method:?} is not an HTTP method"))?;
    let mut builder = Request::builder().method(method).uri(path);
    let mut has_host = false;
    let mut has_ctype = false;
    for (name, values) in &req.headers {
        has_host |= name.eq_ignore_ascii_case("host");
        has_ctype |= name.eq_ignore_ascii_case("content-type");
        for v in values.to_vec() {
            builder = builder.header(name.as_str(), v);
        }
    }
    if !has_host {
        builder = builder.header("host", addr.to_string());
    }
    let body = match (&req.body, &req.json) {
        (Some(b), _) => Bytes::from(b.clone()),
        (None, Some(j)) => {
            if !has_ctype {
                builder = builder.header("content-type", "application/json");
            }
            Bytes::from(j.to_string())
        }
        (None, None) => Bytes::new(),
    };
    let request = builder
        .body(Full::new(body))
        .map_err(|e| format!("bad request: {e}"))?;
    let exchange = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to the gateway: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("cannot talk to the gateway: {e}"))?;
        tokio::spawn(conn);
        let resp = sender
            .send_request(request)
            .await
            .map_err(|e| format!("no answer from the gateway: {e}"))?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("the response body failed: {e}"))?
            .to_bytes()
            .to_vec();
        Ok(Got {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()))?
}
