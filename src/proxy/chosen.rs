//! The upstream a plugin chose for a request in place of the route's: one of the configured
//! upstreams by id (APISIX's `ctx.upstream_id`, which traffic-split sets), or one the plugin
//! made (`apisix.upstream.set`, traffic-split's inline `upstream`).
//!
//! A made upstream is built once per key (APISIX's `upstream_key` with the route's conf
//! version) and kept per worker while the snapshot that saw it is the published one, so its
//! balancer (round-robin position, least_conn counts, ewma scores) carries across requests as
//! a configured upstream's does. The cache is bounded: a plugin that makes a new key on every
//! request costs a rebuild, not memory.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use crate::plugin::ctx::UpstreamChoice;
use crate::snapshot::{Snapshot, UpstreamEntry};

/// Made upstreams kept per worker at most; past it the cache starts over.
const MAX_MADE: usize = 256;

thread_local! {
    /// (snapshot generation, key) -> the built upstream.
    static MADE: RefCell<(u64, HashMap<String, Arc<UpstreamEntry>>)> =
        RefCell::new((0, HashMap::new()));
}

/// The upstream `choice` names, or the message a 503 carries (APISIX's wording for an
/// unknown id).
pub fn resolve(
    snap: &Snapshot,
    route_id: &str,
    choice: &UpstreamChoice,
) -> Result<Arc<UpstreamEntry>, String> {
    match choice {
        UpstreamChoice::Id(id) => snap
            .upstreams
            .get(id)
            .cloned()
            .ok_or_else(|| format!("failed to find upstream by id: {id}")),
        UpstreamChoice::Conf { key, conf } => made(snap, route_id, key, conf),
    }
}

/// The made upstream for `key`, built on first use per snapshot; Err when its client
/// certificate (`tls`) does not resolve (a bad PEM, an id naming no client certificate).
fn made(
    snap: &Snapshot,
    route_id: &str,
    key: &str,
    conf: &crate::config::Upstream,
) -> Result<Arc<UpstreamEntry>, String> {
    MADE.with(|m| {
        let mut m = m.borrow_mut();
        if m.0 != snap.generation || m.1.len() >= MAX_MADE {
            m.0 = snap.generation;
            m.1.clear();
        }
        if let Some(u) = m.1.get(key) {
            return Ok(u.clone());
        }
        let client_cert = crate::tls::upstream_identity(
            "",
            conf.tls.as_ref(),
            &snap.tls,
            &snap.doc.node.keyring(),
        )
        .map_err(|e| format!("invalid upstream: {e}"))?;
        // Per-request upstreams get no health checker: `checks` would start one per key.
        let mut conf = conf.clone();
        conf.checks = None;
        let state_key = format!("/apisix/routes/{route_id}#{key}");
        let u = Arc::new(UpstreamEntry::new(None, conf, &state_key, client_cert));
        m.1.insert(key.to_string(), u.clone());
        Ok(u)
    })
}
