//! The etcd store: a cluster of moongate nodes sharing APISIX's etcd layout.
//!
//! Keys are `PREFIX/KIND/ID` (`/apisix/routes/1`) and values the resource JSON with `id`,
//! `create_time` and `update_time`, exactly as APISIX's Admin API stores them, so APISIX's
//! tooling and moongate read the same data.
//!
//! The node talks to etcd's v3 JSON gateway (`/v3/kv/range`, `/v3/kv/put`,
//! `/v3/kv/deleterange`, `/v3/watch`) over the hyper client the project already has: no protoc,
//! no gRPC stack (see docs/deployment.md for the reasoning).
//!
//! [`start`] reads the whole prefix into a local copy, builds with it, and spawns a task that
//! watches from the read's revision. Every batch of events updates the copy and goes through
//! [`sync`]: a value that does not build is skipped (logged with its key, listed in the status
//! endpoint) while every other resource serves; the build that is published is a whole,
//! validated snapshot, never half of a change. A compacted revision, a cancelled or broken
//! watch, or a failed health probe lead to a full re-read. While etcd cannot be reached the
//! node keeps serving what it has, says so, and reconnects with backoff; Admin API writes fail
//! with 503 because nothing is acknowledged that etcd did not store.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use super::{
    insert_resource, resource_ids, InsertError, InsertMode, Kind, ResourceStore, StoreError,
};
use crate::config::{validate_id, ConfigErrors, Document, EtcdConfig, NodeConfig};
use crate::reload::{Reloader, ResourceOverlay};

/// First pause after a failed etcd contact; doubled up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(200);
/// Longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(3);
/// How often a watching node checks that etcd still answers (a silent partition does not
/// end the watch stream by itself).
const PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// Attempts of the start-up read before the node gives up.
const STARTUP_ATTEMPTS: u32 = 5;

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Why an etcd call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint answered (refused, timed out, reset).
    #[error("etcd is unreachable ({0})")]
    Unreachable(String),
    /// etcd answered with an error.
    #[error("etcd refused the request: {0}")]
    Rejected(String),
}

impl From<EtcdError> for StoreError {
    fn from(e: EtcdError) -> StoreError {
        StoreError(e.to_string())
    }
}

/// One key of the local copy. `value` None is a deletion (kept until a full read or the watch
/// has moved past it, so a late event cannot bring the key back).
#[derive(Debug, Clone)]
struct Entry {
    value: Option<Value>,
    mod_rev: i64,
}

type Slot = (Kind, String);

#[derive(Debug, Default)]
struct State {
    entries: BTreeMap<Slot, Entry>,
    /// Values that do not build, with the revision judged and why.
    skipped: BTreeMap<Slot, (i64, String)>,
    /// Keys under the prefix that cannot be resources at all (not JSON, a bad id).
    unreadable: BTreeMap<String, (i64, String)>,
    /// This node's own writes not yet seen on the watch, by revision: a full read that
    /// started before such a write keeps it (once) instead of dropping it until the watch
    /// catches up.
    pending: BTreeMap<Slot, i64>,
    /// The revision the copy is complete up to.
    revision: i64,
    connected: bool,
    last_error: Option<String>,
    unreachable_since: Option<SystemTime>,
    last_full_read: Option<SystemTime>,
    full_reads: u64,
    watch_events: u64,
    /// The last sync that failed as a whole (an error no single etcd value is to blame for).
    sync_error: Option<String>,
}

struct Shared {
    endpoints: Vec<String>,
    /// Without the trailing slash: `/apisix`.
    prefix: String,
    timeout: Duration,
    user: Option<(String, String)>,
    client: HttpClient,
    rt: tokio::runtime::Handle,
    /// Index of the endpoint that answered last; tried first.
    preferred: AtomicUsize,
    token: Mutex<Option<String>>,
    state: Mutex<State>,
    /// One sync (exclusion search + publish) at a time.
    sync_lock: Mutex<()>,
}

/// A [`ResourceStore`] on etcd. Reads come from the node's local copy (what it serves);
/// writes go to etcd and, once etcd stored them, into the copy.
pub struct EtcdStore {
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// etcd's JSON gateway writes int64 fields as strings; accepts both.
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

/// The end of the key range holding every key that starts with `prefix`.
fn range_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff: the range runs to the end of the key space.
    vec![0]
}

/// What a key under the prefix is.
#[derive(Debug, PartialEq)]
enum KeyKind {
    Resource(Kind, String),
    /// Not a resource moongate serves (consumers, `gen_id`, APISIX's `init_dir` markers).
    Ignored,
    /// A resource key moongate cannot use.
    Bad(String),
}

/// The outcome of reading one value.
enum Parsed {
    Value(Value),
    Unreadable(String),
}

/// Builds the client and the first snapshot, then starts watching. Blocks until the first
/// read of the prefix succeeded (or failed [`STARTUP_ATTEMPTS`] times: the node does not start
/// without its data, as APISIX refuses to start without a reachable etcd).
pub fn start(
    node: &NodeConfig,
    reloader: Arc<Reloader>,
    rt: &tokio::runtime::Handle,
) -> Result<Arc<dyn ResourceStore>, StoreError> {
    let conf = node.etcd.as_ref().ok_or_else(|| {
        StoreError("config_provider is etcd but the config file has no `etcd` section".into())
    })?;
    let store = EtcdStore::new(conf, rt)?;
    let shared = store.shared.clone();

    let mut backoff = MIN_BACKOFF;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match rt.block_on(shared.full_read()) {
            Ok(_) => break,
            Err(e) if attempt < STARTUP_ATTEMPTS => {
                tracing::warn!(
                    "etcd start-up read of {} failed (attempt {attempt} of {STARTUP_ATTEMPTS}): {e}",
                    shared.prefix
                );
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(e) => {
                return Err(StoreError(format!(
                    "cannot read {} from etcd at {}: {e}; moongate does not start without its etcd data",
                    shared.prefix,
                    shared.endpoints.join(", ")
                )))
            }
        }
    }
    reloader.set_overlay(Arc::new(EtcdOverlay(shared.clone())));
    sync(&shared, &reloader, "etcd").map_err(|errors| {
        StoreError(format!(
            "the etcd data does not build with the config file, so moongate does not start: {}",
            errors.to_string().replace('\n', "; ")
        ))
    })?;
    let revision = lock(&shared.state).revision;
    tracing::info!(
        endpoints = %shared.endpoints.join(","),
        prefix = %shared.prefix,
        revision,
        "etcd data loaded; watching for changes"
    );
    rt.spawn(run(shared, reloader));
    Ok(Arc::new(store))
}

impl EtcdStore {
    /// A store for `conf` whose requests run on `rt`. Does not contact etcd.
    pub fn new(conf: &EtcdConfig, rt: &tokio::runtime::Handle) -> Result<EtcdStore, StoreError> {
        check_conf(conf)?;
        let user = conf.user.clone().zip(conf.password.clone());
        let prefix = conf.prefix.trim_end_matches('/').to_string();
        let tls = tls_config(conf)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs_f64(conf.timeout)));
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            // A restarted etcd leaves dead pooled connections; keep idle ones short-lived.
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(EtcdStore {
            shared: Arc::new(Shared {
                endpoints: conf
                    .endpoints
                    .iter()
                    .map(|e| e.trim_end_matches('/').to_string())
                    .collect(),
                prefix,
                timeout: Duration::from_secs_f64(conf.timeout),
                user,
                client,
                rt: rt.clone(),
                preferred: AtomicUsize::new(0),
                token: Mutex::new(None),
                state: Mutex::new(State::default()),
                sync_lock: Mutex::new(()),
            }),
        })
    }
}

/// The checks of an `etcd` section that need no cluster (`moongate check` makes them too):
/// endpoints, timeout, user and password, prefix, and the TLS settings.
pub fn check_conf(conf: &EtcdConfig) -> Result<(), StoreError> {
    if conf.endpoints.is_empty() {
        return Err(StoreError(
            "etcd.endpoints is empty: list at least one URL like http://127.0.0.1:2379".into(),
        ));
    }
    for e in &conf.endpoints {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            return Err(StoreError(format!(
                "etcd endpoint {e:?} must start with http:// or https://"
            )));
        }
    }
    if !(conf.timeout > 0.0 && conf.timeout.is_finite()) {
        return Err(StoreError(
            "etcd.timeout must be a positive number of seconds".into(),
        ));
    }
    if conf.user.is_some() != conf.password.is_some() {
        return Err(StoreError(
            "etcd.user and etcd.password go together: set both or neither".into(),
        ));
    }
    if !conf.prefix.trim_end_matches('/').starts_with('/') {
        return Err(StoreError(format!(
            "etcd.prefix {:?} must start with '/', like \"/apisix\"",
            conf.prefix
        )));
    }
    tls_config(conf).map(|_| ())
}

fn tls_config(conf: &EtcdConfig) -> Result<rustls::ClientConfig, StoreError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    // The node's trusted CAs (`ssl.ssl_trusted_certificate`, as APISIX trusts for etcd),
    // plus `etcd.tls.ca_file`.
    let mut roots = (*crate::tls::trust::roots()).clone();
    if let Some(ca) = conf.tls.as_ref().and_then(|t| t.ca_file.as_ref()) {
        let certs = CertificateDer::pem_file_iter(ca)
            .map_err(|e| StoreError(format!("etcd.tls.ca_file {}: {e}", ca.display())))?;
        for cert in certs {
            let cert =
                cert.map_err(|e| StoreError(format!("etcd.tls.ca_file {}: {e}", ca.display())))?;
            roots
                .add(cert)
                .map_err(|e| StoreError(format!("etcd.tls.ca_file {}: {e}", ca.display())))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl Shared {
    fn key(&self, kind: Kind, id: &str) -> String {
        format!("{}/{}/{id}", self.prefix, kind.dir())
    }

    fn classify(&self, key: &str) -> KeyKind {
        let Some(rest) = key
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
        else {
            return KeyKind::Ignored;
        };
        let Some((kind, id)) = rest.split_once('/') else {
            return KeyKind::Ignored;
        };
        let Some(kind) = Kind::parse(kind).filter(|k| *k != Kind::Credentials) else {
            return KeyKind::Ignored;
        };
        if id.is_empty() {
            // APISIX's `init_dir` marker of the folder.
            return KeyKind::Ignored;
        }
        if kind == Kind::Consumers && id.contains("/credentials/") {
            // `consumers/jack/credentials/1`: a credential of consumer jack.
            return match crate::config::validate_credential_id(id) {
                Ok(()) => KeyKind::Resource(Kind::Credentials, id.to_string()),
                Err(e) => KeyKind::Bad(format!("invalid credential id: {e}")),
            };
        }
        match validate_id(id) {
            Ok(()) => KeyKind::Resource(kind, id.to_string()),
            Err(e) => KeyKind::Bad(format!("invalid {} id: {e}", kind.singular())),
        }
    }

    /// One JSON request to the endpoints, the preferred one first. Connection failures move on
    /// to the next endpoint (and retry the only one once, for a pooled connection etcd closed).
    async fn call(&self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let n = self.endpoints.len();
        let start = self.preferred.load(Ordering::Relaxed) % n;
        let attempts = n.max(2);
        let mut last = String::new();
        let mut reauthenticated = false;
        let mut i = 0;
        while i < attempts {
            let idx = (start + i) % n;
            i += 1;
            let endpoint = &self.endpoints[idx];
            let token = match self.token_for(endpoint).await {
                Ok(t) => t,
                Err(EtcdError::Unreachable(e)) => {
                    last = format!("{endpoint}: {e}");
                    continue;
                }
                Err(e) => return Err(e),
            };
            match self.post(endpoint, path, body, token.as_deref()).await {
                Ok((StatusCode::OK, v)) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok(v);
                }
                Ok((status, v)) => {
                    let msg = error_message(&v).unwrap_or_else(|| status.to_string());
                    let auth_failed = status == StatusCode::UNAUTHORIZED
                        || msg.contains("invalid auth token")
                        || msg.contains("user name is empty");
                    if auth_failed && self.user.is_some() && !reauthenticated {
                        // An expired token: fetch a new one and try again.
                        *lock(&self.token) = None;
                        reauthenticated = true;
                        i -= 1;
                        continue;
                    }
                    if status.is_server_error() && msg.contains("no leader") {
                        last = format!("{endpoint}: {msg}");
                        continue;
                    }
                    return Err(EtcdError::Rejected(msg));
                }
                Err(e) => last = format!("{endpoint}: {e}"),
            }
        }
        Err(EtcdError::Unreachable(last))
    }

    async fn token_for(&self, endpoint: &str) -> Result<Option<String>, EtcdError> {
        let Some((user, password)) = &self.user else {
            return Ok(None);
        };
        if let Some(t) = lock(&self.token).clone() {
            return Ok(Some(t));
        }
        let body = json!({ "name": user, "password": password });
        match self
            .post(endpoint, "/v3/auth/authenticate", &body, None)
            .await
        {
            Ok((StatusCode::OK, v)) => {
                let token = v
                    .get("token")
                    .and_then(Value::as_str)
                    .ok_or_else(|| EtcdError::Rejected("authentication: no token".into()))?
                    .to_string();
                *lock(&self.token) = Some(token.clone());
                Ok(Some(token))
            }
            Ok((status, v)) => Err(EtcdError::Rejected(format!(
                "authentication as {user:?} failed: {}",
                error_message(&v).unwrap_or_else(|| status.to_string())
            ))),
            Err(e) => Err(EtcdError::Unreachable(e)),
        }
    }

    /// One POST; Err is a transport failure or timeout.
    async fn post(
        &self,
        endpoint: &str,
        path: &str,
        body: &Value,
        token: Option<&str>,
    ) -> Result<(StatusCode, Value), String> {
        let mut req = Request::post(format!("{endpoint}{path}"))
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, t);
        }
        let req = req
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| format!("bad request: {e}"))?;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| describe_client_error(&e))?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            let v = serde_json::from_slice(&bytes).unwrap_or_else(
                |_| json!({ "error": String::from_utf8_lossy(&bytes).trim().to_string() }),
            );
            Ok((status, v))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }

    /// Reads the whole prefix and replaces the local copy with it. Returns the revision.
    async fn full_read(&self) -> Result<i64, EtcdError> {
        let body = json!({
            "key": b64(&format!("{}/", self.prefix)),
            "range_end": B64.encode(range_end(&format!("{}/", self.prefix))),
        });
        let v = self.call("/v3/kv/range", &body).await?;
        let revision = int(&v["header"]["revision"]);
        let mut entries = BTreeMap::new();
        let mut unreadable = BTreeMap::new();
        for kv in v["kvs"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            let (key, parsed, mod_rev) = self.decode_kv(kv);
            match self.classify(&key) {
                KeyKind::Ignored => {}
                KeyKind::Bad(why) => {
                    unreadable.insert(key, (mod_rev, why));
                }
                KeyKind::Resource(kind, id) => match parsed {
                    Parsed::Value(value) => {
                        entries.insert(
                            (kind, id),
                            Entry {
                                value: Some(value),
                                mod_rev,
                            },
                        );
                    }
                    Parsed::Unreadable(why) => {
                        unreadable.insert(key, (mod_rev, why));
                    }
                },
            }
        }
        let mut st = lock(&self.state);
        // A write this node made after the read's revision stays (the watch confirms it).
        // Only once: etcd restored from a backup with lower revisions must not keep
        // resurrecting it.
        for (slot, rev) in std::mem::take(&mut st.pending) {
            if rev > revision {
                if let Some(e) = st.entries.get(&slot).filter(|e| e.mod_rev == rev) {
                    entries.insert(slot, e.clone());
                }
            }
        }
        for (key, (rev, why)) in &unreadable {
            if !st.unreadable.contains_key(key) {
                tracing::error!(key = %key, revision = rev, "etcd value skipped: {why}");
            }
        }
        st.entries = entries;
        st.unreadable = unreadable;
        st.revision = revision;
        st.full_reads += 1;
        st.last_full_read = Some(SystemTime::now());
        drop(st);
        self.mark_reachable();
        Ok(revision)
    }

    /// A kv object of the gateway: its key, its value read as a resource, its revision.
    fn decode_kv(&self, kv: &Value) -> (String, Parsed, i64) {
        let key = kv["key"]
            .as_str()
            .and_then(|k| B64.decode(k).ok())
            .map(|k| String::from_utf8_lossy(&k).into_owned())
            .unwrap_or_default();
        let mod_rev = int(&kv["mod_revision"]);
        let raw = kv["value"]
            .as_str()
            .and_then(|v| B64.decode(v).ok())
            .unwrap_or_default();
        let parsed = match serde_json::from_slice::<Value>(&raw) {
            Ok(Value::Object(mut m)) => {
                if let KeyKind::Resource(kind, id) = self.classify(&key) {
                    // The key names the resource, as in APISIX (which sets `value.id = key`;
                    // a consumer's id field is `username`).
                    let field = if kind == Kind::Consumers {
                        "username"
                    } else {
                        "id"
                    };
                    // A credential's `id` is its own, the key's last segment.
                    let id = match crate::config::split_credential_id(&id) {
                        Some((_, cred)) if kind == Kind::Credentials => cred.to_string(),
                        _ => id,
                    };
                    m.insert(field.into(), Value::String(id));
                }
                Parsed::Value(Value::Object(m))
            }
            Ok(_) => Parsed::Unreadable("the value is not a JSON object".into()),
            Err(e) => Parsed::Unreadable(format!("the value is not JSON: {e}")),
        };
        (key, parsed, mod_rev)
    }

    /// Applies one watch message's events; true when the copy changed.
    fn apply_events(&self, events: &[Value], header_rev: i64) -> bool {
        let mut changed = false;
        let mut st = lock(&self.state);
        for ev in events {
            let kv = &ev["kv"];
            let (key, parsed, mod_rev) = self.decode_kv(kv);
            let deleted = ev["type"].as_str() == Some("DELETE");
            st.watch_events += 1;
            let (kind, id) = match self.classify(&key) {
                KeyKind::Ignored => continue,
                KeyKind::Bad(why) => {
                    if deleted {
                        changed |= st.unreadable.remove(&key).is_some();
                    } else {
                        tracing::error!(key = %key, revision = mod_rev, "etcd value skipped: {why}");
                        st.unreadable.insert(key, (mod_rev, why));
                        changed = true;
                    }
                    continue;
                }
                KeyKind::Resource(kind, id) => (kind, id),
            };
            let slot = (kind, id);
            if st.pending.get(&slot).is_some_and(|r| *r <= mod_rev) {
                st.pending.remove(&slot);
            }
            if st.entries.get(&slot).is_some_and(|e| e.mod_rev >= mod_rev) {
                // This node's own write, already in the copy.
                continue;
            }
            let value = if deleted {
                st.unreadable.remove(&key);
                None
            } else {
                match parsed {
                    Parsed::Value(v) => {
                        st.unreadable.remove(&key);
                        Some(v)
                    }
                    Parsed::Unreadable(why) => {
                        tracing::error!(key = %key, revision = mod_rev, "etcd value skipped: {why}");
                        st.unreadable.insert(key, (mod_rev, why));
                        None
                    }
                }
            };
            st.entries.insert(slot, Entry { value, mod_rev });
            changed = true;
        }
        if header_rev > st.revision {
            st.revision = header_rev;
        }
        // Deletions the watch has passed can no longer be undone by a late event.
        let rev = st.revision;
        st.entries
            .retain(|_, e| e.value.is_some() || e.mod_rev > rev);
        changed
    }

    fn mark_reachable(&self) {
        let mut st = lock(&self.state);
        if !st.connected {
            if let Some(since) = st.unreachable_since.take() {
                tracing::info!(
                    down_for_s = since.elapsed().map(|d| d.as_secs_f64()).unwrap_or(0.0),
                    "etcd is reachable again"
                );
            }
        }
        st.connected = true;
        st.last_error = None;
    }

    fn mark_unreachable(&self, err: &EtcdError, retry_in: Duration) {
        let mut st = lock(&self.state);
        if st.connected || st.unreachable_since.is_none() {
            tracing::error!(
                "{err}; serving the last good configuration and reconnecting (next try in {:.1}s)",
                retry_in.as_secs_f64()
            );
            st.unreachable_since = Some(SystemTime::now());
        } else {
            tracing::debug!("etcd still unreachable: {err}");
        }
        st.connected = false;
        st.last_error = Some(err.to_string());
    }

    /// Blocks on an etcd call from a thread outside the runtime (Admin API writes run on
    /// `spawn_blocking` threads).
    fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt.block_on(f)
    }

    /// Puts `value` at `key`; the revision etcd gave the write.
    async fn put_raw(&self, key: &str, value: &str) -> Result<i64, EtcdError> {
        let body = json!({ "key": b64(key), "value": b64(value) });
        let v = self.call("/v3/kv/put", &body).await?;
        Ok(int(&v["header"]["revision"]))
    }

    async fn delete_raw(&self, key: &str) -> Result<i64, EtcdError> {
        let body = json!({ "key": b64(key) });
        let v = self.call("/v3/kv/deleterange", &body).await?;
        Ok(int(&v["header"]["revision"]))
    }

    /// Cheap liveness check of the current endpoint set.
    async fn probe(&self) -> Result<(), EtcdError> {
        let body = json!({ "key": b64(&format!("{}/", self.prefix)), "count_only": true });
        self.call("/v3/kv/range", &body).await.map(|_| ())
    }
}

fn error_message(v: &Value) -> Option<String> {
    v.get("error")
        .or_else(|| v.get("message"))
        .and_then(Value::as_str)
        .map(String::from)
}

fn describe_client_error(e: &hyper_util::client::legacy::Error) -> String {
    use std::error::Error as _;
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

impl ResourceStore for EtcdStore {
    fn get(&self, kind: Kind, id: &str) -> Result<Option<Value>, StoreError> {
        let st = lock(&self.shared.state);
        Ok(st
            .entries
            .get(&(kind, id.to_string()))
            .and_then(|e| e.value.clone()))
    }

    fn list(&self, kind: Kind) -> Result<Vec<(String, Value)>, StoreError> {
        let st = lock(&self.shared.state);
        Ok(st
            .entries
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .filter_map(|((_, id), e)| e.value.clone().map(|v| (id.clone(), v)))
            .collect())
    }

    fn put(&self, kind: Kind, id: &str, value: &Value) -> Result<Option<Value>, StoreError> {
        let key = self.shared.key(kind, id);
        let rev = self
            .shared
            .block_on(self.shared.put_raw(&key, &value.to_string()))?;
        self.shared.mark_reachable();
        let mut st = lock(&self.shared.state);
        let slot = (kind, id.to_string());
        let previous = st.entries.get(&slot).and_then(|e| e.value.clone());
        if st.entries.get(&slot).is_none_or(|e| e.mod_rev < rev) {
            st.entries.insert(
                slot.clone(),
                Entry {
                    value: Some(value.clone()),
                    mod_rev: rev,
                },
            );
            st.pending.insert(slot, rev);
        }
        st.unreadable.remove(&key);
        Ok(previous)
    }

    fn delete(&self, kind: Kind, id: &str) -> Result<Option<Value>, StoreError> {
        let key = self.shared.key(kind, id);
        let rev = self.shared.block_on(self.shared.delete_raw(&key))?;
        self.shared.mark_reachable();
        let mut st = lock(&self.shared.state);
        let slot = (kind, id.to_string());
        let previous = st.entries.get(&slot).and_then(|e| e.value.clone());
        if st.entries.get(&slot).is_none_or(|e| e.mod_rev < rev) {
            st.entries.insert(
                slot.clone(),
                Entry {
                    value: None,
                    mod_rev: rev,
                },
            );
            st.pending.insert(slot, rev);
        }
        Ok(previous)
    }

    /// APISIX's scheme: write `PREFIX/gen_id` and use the revision etcd gave it, zero-padded
    /// to 20 digits, so ids are unique across every node of the cluster.
    fn generate_id(&self, _kind: Kind) -> Result<String, StoreError> {
        let key = format!("{}/gen_id", self.shared.prefix);
        let rev = self.shared.block_on(self.shared.put_raw(&key, "1"))?;
        self.shared.mark_reachable();
        Ok(format!("{rev:020}"))
    }

    fn describe(&self) -> String {
        format!(
            "etcd {} (prefix {})",
            self.shared.endpoints.join(","),
            self.shared.prefix
        )
    }

    fn status(&self) -> Option<Value> {
        let st = lock(&self.shared.state);
        let mut skipped: Vec<Value> = st
            .skipped
            .iter()
            .map(|((kind, id), (rev, why))| {
                json!({ "key": self.shared.key(*kind, id), "revision": rev, "error": why })
            })
            .collect();
        skipped.extend(
            st.unreadable
                .iter()
                .map(|(key, (rev, why))| json!({ "key": key, "revision": rev, "error": why })),
        );
        // APISIX's `apisix_etcd_modify_indexes`: per kind the newest modification of an item
        // this node holds (0 with none), their maximum, and the revision the copy is at.
        let mut indexes = serde_json::Map::new();
        let mut max = 0i64;
        for kind in [
            Kind::Routes,
            Kind::Services,
            Kind::Ssls,
            Kind::Consumers,
            Kind::GlobalRules,
            Kind::Upstreams,
        ] {
            // Entries are ordered by kind first: read only this kind's.
            let newest = st
                .entries
                .range((kind, String::new())..)
                .take_while(|((k, _), _)| *k == kind)
                .filter(|(_, e)| e.value.is_some())
                .map(|(_, e)| e.mod_rev)
                .max()
                .unwrap_or(0);
            max = max.max(newest);
            indexes.insert(kind.as_str().into(), json!(newest));
        }
        indexes.insert("max_modify_index".into(), json!(max));
        indexes.insert("x_etcd_index".into(), json!(st.revision));
        Some(json!({
            "provider": "etcd",
            "modify_indexes": indexes,
            "endpoints": self.shared.endpoints,
            "prefix": self.shared.prefix,
            "connected": st.connected,
            "revision": st.revision,
            "last_error": st.last_error,
            "unreachable_since": st.unreachable_since.map(unix),
            "last_full_read": st.last_full_read.map(unix),
            "full_reads": st.full_reads,
            "watch_events": st.watch_events,
            "skipped": skipped,
            "sync_error": st.sync_error,
        }))
    }
}

thread_local! {
    /// Set while [`sync`] builds on this thread: the overlay then adds nothing, because the
    /// sync places the etcd resources itself to learn which of them fail.
    static BARE: Cell<bool> = const { Cell::new(false) };
}

/// Resets [`BARE`] however the build ends.
struct BareGuard;

impl BareGuard {
    fn set() -> BareGuard {
        BARE.with(|b| b.set(true));
        BareGuard
    }
}

impl Drop for BareGuard {
    fn drop(&mut self) {
        BARE.with(|b| b.set(false));
    }
}

/// Adds the etcd resources that build (every value in the local copy but the skipped ones)
/// to every snapshot build: hot reloads of the config file, Admin API writes, etcd events.
struct EtcdOverlay(Arc<Shared>);

impl ResourceOverlay for EtcdOverlay {
    fn apply(&self, doc: &mut Document) -> Result<(), ConfigErrors> {
        if BARE.with(|b| b.get()) {
            return Ok(());
        }
        let st = lock(&self.0.state);
        for ((kind, id), e) in &st.entries {
            let Some(v) = &e.value else { continue };
            let slot = (*kind, id.clone());
            if st
                .skipped
                .get(&slot)
                .is_some_and(|(rev, _)| *rev == e.mod_rev)
            {
                continue;
            }
            // A value that no longer fits (the config file changed under it) is left out here
            // and reported by the next sync; the build itself must not fail for it.
            if let Err(err) = insert_resource(doc, *kind, id, v.clone(), InsertMode::Append) {
                tracing::debug!(key = %self.0.key(*kind, id), "etcd value left out: {err:?}");
            }
        }
        Ok(())
    }
}

/// `routes[3].plugins.x` → (routes, 3, "plugins.x").
fn split_path(path: &str) -> Option<(Kind, usize, &str)> {
    let (kind, rest) = path.split_once('[')?;
    let kind = Kind::parse(kind)?;
    let (index, rest) = rest.split_once(']')?;
    let index = index.parse().ok()?;
    Some((kind, index, rest.trim_start_matches('.')))
}

/// Makes what serves match the local copy: finds the values that do not build (each is
/// skipped, logged with its key once, and listed in the status), then publishes a build with
/// every other value through the reloader. Blocking.
fn sync(shared: &Shared, reloader: &Reloader, trigger: &str) -> Result<(), ConfigErrors> {
    let _one = lock(&shared.sync_lock);
    let candidates: Vec<(Slot, i64, Value)> = {
        let st = lock(&shared.state);
        st.entries
            .iter()
            .filter_map(|(s, e)| e.value.clone().map(|v| (s.clone(), e.mod_rev, v)))
            .collect()
    };
    let mut skipped: BTreeMap<Slot, (i64, String)> = BTreeMap::new();
    // Each round skips at least one more value or ends, so this is bounded.
    for _ in 0..=candidates.len() {
        // Per kind: how many resources the config file has, then the etcd ids in order.
        let mut placed: BTreeMap<Kind, (usize, Vec<String>)> = BTreeMap::new();
        let built = {
            let _bare = BareGuard::set();
            reloader.try_build(|doc| {
                for kind in Kind::ALL {
                    placed.insert(kind, (resource_ids(doc, kind).len(), Vec::new()));
                }
                for ((kind, id), rev, v) in &candidates {
                    let slot = (*kind, id.clone());
                    if skipped.contains_key(&slot) {
                        continue;
                    }
                    match insert_resource(doc, *kind, id, v.clone(), InsertMode::Append) {
                        Ok(_) => {
                            if let Some((_, ids)) = placed.get_mut(kind) {
                                ids.push(id.clone());
                            }
                        }
                        Err(InsertError::Conflict) => {
                            skipped.insert(
                                slot,
                                (
                                    *rev,
                                    format!(
                                        "{} {id} is also defined in the config file; remove it from one of them",
                                        kind.singular()
                                    ),
                                ),
                            );
                        }
                        Err(InsertError::Invalid(e)) => {
                            let msg = if e.path.is_empty() {
                                format!("invalid configuration: {}", e.message)
                            } else {
                                format!("invalid configuration: {}: {}", e.path, e.message)
                            };
                            skipped.insert(slot, (*rev, msg));
                        }
                    }
                }
                Ok(())
            })
        };
        let errors = match built {
            Ok(_) => break,
            Err(errors) => errors,
        };
        let mut blamed = false;
        for e in &errors.0 {
            let Some((kind, index, rest)) = split_path(&e.path) else {
                continue;
            };
            let Some((file_count, ids)) = placed.get(&kind) else {
                continue;
            };
            let Some(id) = index.checked_sub(*file_count).and_then(|i| ids.get(i)) else {
                continue;
            };
            let Some((_, rev, _)) = candidates
                .iter()
                .find(|(s, _, _)| s.0 == kind && s.1 == *id)
            else {
                continue;
            };
            let msg = if rest.is_empty() {
                e.message.clone()
            } else {
                format!("{rest}: {}", e.message)
            };
            skipped
                .entry((kind, id.clone()))
                .and_modify(|(_, m)| {
                    m.push_str("; ");
                    m.push_str(&msg);
                })
                .or_insert((*rev, msg));
            blamed = true;
        }
        if !blamed {
            // A problem no single etcd value explains (the config file, a plugin file): the
            // serving generation stays, as with any failed reload.
            let text = errors.to_string().replace('\n', "; ");
            tracing::error!(
                trigger,
                "etcd sync refused, the current generation keeps serving: {text}"
            );
            lock(&shared.state).sync_error = Some(text);
            return Err(errors);
        }
    }
    {
        let mut st = lock(&shared.state);
        for ((kind, id), (rev, why)) in &skipped {
            let known = st
                .skipped
                .get(&(*kind, id.clone()))
                .is_some_and(|(r, _)| r == rev);
            if !known {
                tracing::error!(
                    key = %shared.key(*kind, id),
                    revision = rev,
                    "etcd value skipped, the rest serves: {why}"
                );
            }
        }
        st.skipped = skipped;
        st.sync_error = None;
    }
    reloader.rebuild(trigger, true).map(|_| ())
}

/// Runs [`sync`] off the async runtime (builds are CPU work and may load Lua plugins).
async fn sync_async(shared: &Arc<Shared>, reloader: &Arc<Reloader>) {
    let (s, r) = (shared.clone(), reloader.clone());
    match tokio::task::spawn_blocking(move || sync(&s, &r, "etcd")).await {
        Ok(_) => {}
        Err(e) => tracing::error!("etcd sync task failed: {e}"),
    }
}

/// Why a watch ended.
enum WatchEnd {
    /// The start revision was compacted away: re-read everything.
    Compacted(i64),
    /// etcd cancelled the watch.
    Canceled(String),
}

/// The watch loop: watch from the copy's revision; on any end, re-read everything (with
/// backoff while etcd is unreachable) and watch again.
async fn run(shared: Arc<Shared>, reloader: Arc<Reloader>) {
    let mut backoff = MIN_BACKOFF;
    let mut need_read = false;
    loop {
        if need_read {
            match shared.full_read().await {
                Ok(_) => {
                    backoff = MIN_BACKOFF;
                    sync_async(&shared, &reloader).await;
                }
                Err(e) => {
                    shared.mark_unreachable(&e, backoff);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
        }
        need_read = true;
        let from = lock(&shared.state).revision + 1;
        match watch(&shared, &reloader, from).await {
            Ok(WatchEnd::Compacted(rev)) => {
                tracing::warn!(
                    compact_revision = rev,
                    "etcd compacted the revisions this node had not seen; reading everything again"
                );
            }
            Ok(WatchEnd::Canceled(why)) => {
                tracing::warn!("etcd cancelled the watch ({why}); reading everything again");
            }
            Err(e) => {
                shared.mark_unreachable(&e, backoff);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Opens a watch on the prefix from revision `from` and applies its events until it ends.
async fn watch(
    shared: &Arc<Shared>,
    reloader: &Arc<Reloader>,
    from: i64,
) -> Result<WatchEnd, EtcdError> {
    let prefix = format!("{}/", shared.prefix);
    let body = json!({
        "create_request": {
            "key": b64(&prefix),
            "range_end": B64.encode(range_end(&prefix)),
            "start_revision": from.to_string(),
        }
    });
    let n = shared.endpoints.len();
    let start = shared.preferred.load(Ordering::Relaxed) % n;
    let mut last = String::new();
    let mut response = None;
    for i in 0..n {
        let endpoint = &shared.endpoints[(start + i) % n];
        let token = match shared.token_for(endpoint).await {
            Ok(t) => t,
            Err(e) => {
                last = format!("{endpoint}: {e}");
                continue;
            }
        };
        let mut req = Request::post(format!("{endpoint}/v3/watch"))
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(t) = &token {
            req = req.header(header::AUTHORIZATION, t.as_str());
        }
        let req = match req.body(Full::new(Bytes::from(body.to_string()))) {
            Ok(r) => r,
            Err(e) => return Err(EtcdError::Rejected(format!("bad watch request: {e}"))),
        };
        match tokio::time::timeout(shared.timeout, shared.client.request(req)).await {
            Ok(Ok(resp)) if resp.status() == StatusCode::OK => {
                shared.preferred.store((start + i) % n, Ordering::Relaxed);
                response = Some(resp);
                break;
            }
            Ok(Ok(resp)) => {
                if resp.status() == StatusCode::UNAUTHORIZED {
                    *lock(&shared.token) = None;
                }
                last = format!("{endpoint}: watch answered {}", resp.status());
            }
            Ok(Err(e)) => last = format!("{endpoint}: {}", describe_client_error(&e)),
            Err(_) => last = format!("{endpoint}: no answer within {:?}", shared.timeout),
        }
    }
    let Some(resp) = response else {
        return Err(EtcdError::Unreachable(last));
    };
    shared.mark_reachable();
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    let mut probe = tokio::time::interval(PROBE_INTERVAL);
    probe.tick().await;
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = probe.tick() => {
                shared.probe().await?;
                continue;
            }
        };
        let bytes = match frame {
            Some(Ok(f)) => match f.into_data() {
                Ok(b) => b,
                Err(_) => continue,
            },
            Some(Err(e)) => {
                return Err(EtcdError::Unreachable(format!("the watch broke: {e}")));
            }
            None => return Err(EtcdError::Unreachable("etcd ended the watch".into())),
        };
        buf.extend_from_slice(&bytes);
        // The gateway writes one JSON object per line; act on every complete one, then build
        // once for all of them.
        let mut changed = false;
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let msg: Value = match serde_json::from_slice(&line) {
                Ok(v) => v,
                Err(e) => {
                    return Err(EtcdError::Rejected(format!(
                        "unreadable watch message: {e}"
                    )))
                }
            };
            if let Some(err) = msg.get("error") {
                return Ok(WatchEnd::Canceled(
                    error_message(err)
                        .or_else(|| err.as_str().map(String::from))
                        .unwrap_or_else(|| err.to_string()),
                ));
            }
            let result = &msg["result"];
            let compact = int(&result["compact_revision"]);
            if compact > 0 {
                return Ok(WatchEnd::Compacted(compact));
            }
            if result["canceled"].as_bool() == Some(true) {
                return Ok(WatchEnd::Canceled(
                    result["cancel_reason"]
                        .as_str()
                        .unwrap_or("no reason given")
                        .to_string(),
                ));
            }
            let events = result["events"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            changed |= shared.apply_events(events, int(&result["header"]["revision"]));
        }
        if changed {
            sync_async(shared, reloader).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_end_is_the_next_prefix() {
        assert_eq!(range_end("/apisix/"), b"/apisix0".to_vec());
        assert_eq!(range_end("a\u{7f}"), b"a\x80".to_vec());
    }

    #[test]
    fn paths_name_the_resource() {
        assert_eq!(
            split_path("routes[3].plugins.x"),
            Some((Kind::Routes, 3, "plugins.x"))
        );
        assert_eq!(
            split_path("global_rules[0]"),
            Some((Kind::GlobalRules, 0, ""))
        );
        assert_eq!(split_path("plugins[0]"), None);
        assert_eq!(split_path(""), None);
    }

    #[test]
    fn keys_in_apisix_layout() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let conf: EtcdConfig =
            serde_json::from_value(json!({"endpoints": ["http://127.0.0.1:2379"]})).unwrap();
        let store = EtcdStore::new(&conf, rt.handle()).unwrap();
        let s = &store.shared;
        assert_eq!(s.key(Kind::Routes, "1"), "/apisix/routes/1");
        assert_eq!(
            s.classify("/apisix/routes/1"),
            KeyKind::Resource(Kind::Routes, "1".into())
        );
        assert_eq!(s.classify("/apisix/routes/"), KeyKind::Ignored);
        assert_eq!(
            s.classify("/apisix/consumers/jack"),
            KeyKind::Resource(Kind::Consumers, "jack".into())
        );
        assert_eq!(
            s.classify("/apisix/consumers/jack/credentials/k1"),
            KeyKind::Resource(Kind::Credentials, "jack/credentials/k1".into())
        );
        assert_eq!(
            s.key(Kind::Credentials, "jack/credentials/k1"),
            "/apisix/consumers/jack/credentials/k1"
        );
        assert_eq!(
            s.classify("/apisix/consumer_groups/g1"),
            KeyKind::Resource(Kind::ConsumerGroups, "g1".into())
        );
        assert!(matches!(
            s.classify("/apisix/consumers/jack/credentials/a/b"),
            KeyKind::Bad(_)
        ));
        assert_eq!(
            s.classify("/apisix/ssls/1"),
            KeyKind::Resource(Kind::Ssls, "1".into())
        );
        assert_eq!(s.classify("/apisix/protos/1"), KeyKind::Ignored);
        assert_eq!(s.classify("/apisix/gen_id"), KeyKind::Ignored);
        assert!(matches!(s.classify("/apisix/routes/a/b"), KeyKind::Bad(_)));
        // APISIX's `host` spelling is accepted.
        let conf: EtcdConfig =
            serde_json::from_value(json!({"host": ["http://127.0.0.1:2379"], "prefix": "/x/"}))
                .unwrap();
        let store = EtcdStore::new(&conf, rt.handle()).unwrap();
        assert_eq!(store.shared.key(Kind::Upstreams, "u"), "/x/upstreams/u");
    }
}
