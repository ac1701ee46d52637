//! APISIX's status API (`status: {ip, port}`, APISIX's `apisix.status`): `GET /status` answers
//! 200 while the process serves; `GET /status/ready` answers 200 only when every worker has
//! taken up the configuration generation in force and, with `config_provider: etcd`, the etcd
//! watch is connected, else 503 with the reason. For load balancers' health probes. Served on
//! the control runtime; no key (loopback by default).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::snapshot::Gateway;
use crate::store::ResourceStore;
use crate::supervisor::BoundListener;

/// The role of the status API's listener in a [`crate::supervisor::ListenerSet`].
pub const ROLE: &str = "status";

/// `status`: where the status API listens (APISIX's default 127.0.0.1:7085).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    #[serde(default = "default_ip")]
    pub ip: std::net::IpAddr,
    #[serde(default = "default_port")]
    pub port: u16,
}

fn default_ip() -> std::net::IpAddr {
    std::net::IpAddr::from([127, 0, 0, 1])
}

fn default_port() -> u16 {
    7085
}

impl StatusConfig {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }
}

/// Not reported yet.
const NONE: u64 = u64::MAX;

/// Per worker, the generation it has taken up (APISIX's `status-report` dictionary).
static WORKERS: OnceLock<Box<[AtomicU64]>> = OnceLock::new();

/// Makes room for `n` workers' reports (before they start).
pub fn init_workers(n: usize) {
    let _ = WORKERS.set((0..n).map(|_| AtomicU64::new(NONE)).collect());
}

/// Worker `id` serves `generation` from now on.
pub fn report(id: usize, generation: u64) {
    if let Some(slot) = WORKERS.get().and_then(|w| w.get(id)) {
        slot.store(generation, Ordering::Release);
    }
}

/// Runs on a worker's event loop for its whole life: reports each generation the gateway
/// publishes, so a worker whose loop is stuck (or gone) stops being ready.
pub async fn follow(id: usize, gw: Arc<Gateway>) {
    let mut rx = gw.subscribe();
    loop {
        let generation = *rx.borrow_and_update();
        report(id, generation);
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Why the node is not ready, or None when it is.
pub fn not_ready(gw: &Gateway, store: Option<&dyn ResourceStore>) -> Option<String> {
    let current = gw.load().generation;
    let Some(workers) = WORKERS.get() else {
        return Some("worker count: 0 but status report count: 0".into());
    };
    let reported = workers
        .iter()
        .filter(|w| w.load(Ordering::Acquire) != NONE)
        .count();
    if reported != workers.len() {
        return Some(format!(
            "worker count: {} but status report count: {reported}",
            workers.len()
        ));
    }
    for (id, w) in workers.iter().enumerate() {
        if w.load(Ordering::Acquire) != current {
            return Some(format!("worker id: {id} has not received configuration"));
        }
    }
    if let Some(status) = store.and_then(|s| s.status()) {
        if status.get("connected").and_then(|c| c.as_bool()) == Some(false) {
            let why = status
                .get("last_error")
                .and_then(|e| e.as_str())
                .unwrap_or("no answer");
            return Some(format!("etcd is not connected: {why}"));
        }
    }
    None
}

/// Serves the status API on `listener` (on `rt`). Logs `status API listening at
/// http://ADDR`.
pub fn start(
    listener: BoundListener,
    gw: Arc<Gateway>,
    store: Option<Arc<dyn ResourceStore>>,
    rt: &tokio::runtime::Handle,
) -> std::io::Result<SocketAddr> {
    let handler = Arc::new(move |req: &Request<_>| respond(req, &gw, store.as_deref()));
    crate::local_api::serve("status API", listener, rt, handler)
}

fn respond<B>(
    req: &Request<B>,
    gw: &Gateway,
    store: Option<&dyn ResourceStore>,
) -> Response<Full<Bytes>> {
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/status") => (StatusCode::OK, json!({"status": "ok"})),
        (&Method::GET | &Method::HEAD, "/status/ready") => match not_ready(gw, store) {
            None => (StatusCode::OK, json!({"status": "ok"})),
            Some(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "error", "error": why}),
            ),
        },
        _ => (StatusCode::NOT_FOUND, json!({"error_msg": "not found"})),
    };
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}
