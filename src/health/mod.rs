//! Upstream health checks, APISIX's `checks`: one active checker per upstream per process,
//! and passive checks counted from real traffic on every worker.
//!
//! The health of an upstream's nodes ([`UpstreamHealth`]) lives outside the snapshot, in the
//! process-wide [`Registry`], keyed by the owning resource (`/apisix/upstreams/1`; a route's or
//! service's inline upstream by the route or service). A snapshot build asks the registry for
//! each upstream with `checks`: when the published one has the same fingerprint (same nodes,
//! scheme and checks) the build shares it, so a reload that leaves the upstream alone keeps its
//! state and its checker; otherwise the build gets a fresh state (all nodes healthy). Building
//! starts nothing: only [`Registry::publish`], called when a snapshot is swapped in, starts the
//! checkers of states it has not seen and stops those no longer published. Builds that are never
//! published (`moongate check`, the Admin API's validation build) leave no task behind.

pub mod active;
pub mod config;
pub mod state;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::runtime::Handle;
use tokio::task::JoinHandle;

pub use config::Checks;
pub use state::{Observation, Source, UpstreamHealth};

use crate::config::Upstream;
use crate::tls::ClientIdentity;

/// The process's health states and their checker tasks.
pub struct Registry {
    published: Mutex<HashMap<Arc<str>, Published>>,
    runtime: OnceLock<Handle>,
}

struct Published {
    health: Arc<UpstreamHealth>,
    task: Option<JoinHandle<()>>,
}

impl Drop for Published {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The process-wide registry.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Registry {
        published: Mutex::new(HashMap::new()),
        runtime: OnceLock::new(),
    })
}

impl Registry {
    /// The health state a snapshot build gives the upstream owned by `key`: the published one
    /// when its nodes and checks are unchanged, else a fresh one. None without `checks`.
    /// `client_cert` is what https probes present; a changed one makes a fresh state (and a
    /// checker that presents the new one).
    pub fn state_for(
        &self,
        key: &str,
        up: &Upstream,
        client_cert: Option<&Arc<ClientIdentity>>,
    ) -> Option<Arc<UpstreamHealth>> {
        let checks = up.checks.as_ref()?;
        let fingerprint = fingerprint(up, client_cert.map(|c| c.fingerprint()));
        let published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = published.get(key) {
            if p.health.fingerprint == fingerprint {
                return Some(p.health.clone());
            }
        }
        drop(published);
        let port = up.scheme.default_port();
        let nodes = up
            .nodes
            .0
            .iter()
            .map(|n| (n.host.clone(), n.port.unwrap_or(port)))
            .collect();
        let mut state = UpstreamHealth::new(key.into(), checks.clone(), fingerprint, nodes);
        state.client_cert = client_cert.cloned();
        Some(Arc::new(state))
    }

    /// Makes `states` (every health state of the snapshot being swapped in) the published set:
    /// a state already published keeps its checker, a new one gets one, and the checkers of
    /// states no longer there stop.
    pub fn publish(&self, states: &[Arc<UpstreamHealth>]) {
        let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        let mut old = std::mem::take(&mut *published);
        for h in states {
            let entry = match old.remove(&h.key) {
                Some(p) if Arc::ptr_eq(&p.health, h) => p,
                // Replaced (or new): the old checker stops when `p` drops.
                _ => Published {
                    health: h.clone(),
                    task: self.spawn(h),
                },
            };
            published.insert(h.key.clone(), entry);
        }
        // What is left in `old` is no longer published: dropping it stops its checkers.
    }

    /// Gives the registry the runtime its checkers run on (the control runtime) and starts the
    /// checkers of what was published before it had one.
    pub fn start(&self, handle: Handle) {
        if self.runtime.set(handle).is_err() {
            return;
        }
        let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        for p in published.values_mut() {
            if p.task.is_none() {
                p.task = self.spawn(&p.health);
            }
        }
    }

    fn spawn(&self, h: &Arc<UpstreamHealth>) -> Option<JoinHandle<()>> {
        let rt = self.runtime.get()?;
        tracing::debug!(upstream = %h.key, nodes = h.nodes.len(), "health checker started");
        Some(rt.spawn(active::run(h.clone())))
    }

    /// The published state of `key`, if it has checks.
    pub fn get(&self, key: &str) -> Option<Arc<UpstreamHealth>> {
        let published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        published.get(key).map(|p| p.health.clone())
    }
}

/// What must be unchanged for a state to carry over a reload: the nodes (with weights and
/// priorities: a changed node list starts fresh, as APISIX's checker does), the scheme, the
/// checks and the client certificate probes present.
fn fingerprint(up: &Upstream, client_cert: Option<String>) -> String {
    serde_json::json!([up.nodes, up.scheme, up.checks, client_cert]).to_string()
}
