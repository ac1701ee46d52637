//! The health of one upstream's nodes, shared by the active checker (on the control runtime)
//! and every worker (passive observations, and the balancer's reads).
//!
//! Everything is atomics: a worker reads a node's health with one relaxed load per candidate,
//! and reports an observation with a few atomic operations, no lock. Counters follow
//! lua-resty-healthcheck (APISIX's checker): a success clears the failure counters and a
//! failure clears the success counter; a node changes state when one counter reaches its
//! threshold, and then all counters start again from 0. Two workers racing on a threshold
//! change the state once: the flag is swapped, and only the swap that changed it logs.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use super::config::{Checks, StatusSet};

/// Which checker saw an observation (each has its own thresholds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Active,
    Passive,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Active => "active",
            Source::Passive => "passive",
        }
    }
}

/// What one probe or one proxied request said about a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    Success,
    /// A status the unhealthy list names.
    HttpFailure(u16),
    /// Connection refused or reset, TLS failure, bad response.
    TcpFailure(String),
    Timeout,
}

/// One node's state.
pub struct NodeHealth {
    pub host: String,
    pub port: u16,
    /// `host:port`, for logs.
    pub addr: Arc<str>,
    healthy: AtomicBool,
    success: AtomicU32,
    http_failure: AtomicU32,
    tcp_failure: AtomicU32,
    timeout_failure: AtomicU32,
}

/// The counters as APISIX's control API shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    pub success: u32,
    pub http_failure: u32,
    pub tcp_failure: u32,
    pub timeout_failure: u32,
}

impl NodeHealth {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn counters(&self) -> Counters {
        Counters {
            success: self.success.load(Ordering::Relaxed),
            http_failure: self.http_failure.load(Ordering::Relaxed),
            tcp_failure: self.tcp_failure.load(Ordering::Relaxed),
            timeout_failure: self.timeout_failure.load(Ordering::Relaxed),
        }
    }

    /// APISIX's status words: a healthy node with failures counted is `mostly_healthy`, an
    /// unhealthy one with successes counted `mostly_unhealthy`.
    pub fn status(&self) -> &'static str {
        let c = self.counters();
        match self.is_healthy() {
            true if c.http_failure + c.tcp_failure + c.timeout_failure > 0 => "mostly_healthy",
            true => "healthy",
            false if c.success > 0 => "mostly_unhealthy",
            false => "unhealthy",
        }
    }

    fn clear(&self) {
        self.success.store(0, Ordering::Relaxed);
        self.http_failure.store(0, Ordering::Relaxed);
        self.tcp_failure.store(0, Ordering::Relaxed);
        self.timeout_failure.store(0, Ordering::Relaxed);
    }
}

/// The thresholds of one source, 0 meaning "not counted".
#[derive(Debug, Clone)]
struct Thresholds {
    healthy_statuses: StatusSet,
    unhealthy_statuses: StatusSet,
    successes: u32,
    http_failures: u32,
    tcp_failures: u32,
    timeouts: u32,
}

/// The shared health of one upstream's nodes (same order as the upstream's `nodes`).
pub struct UpstreamHealth {
    /// The owning resource in APISIX's key layout (`/apisix/upstreams/1`, `/apisix/routes/r1`
    /// for an inline upstream).
    pub key: Arc<str>,
    pub checks: Checks,
    /// Equal fingerprints: same nodes and same checks, so the state carries over a reload.
    pub(super) fingerprint: String,
    pub nodes: Vec<NodeHealth>,
    /// The upstream's client certificate, presented by https probes (upstream mTLS).
    pub client_cert: Option<Arc<crate::tls::ClientIdentity>>,
    healthy_count: AtomicUsize,
    active: Thresholds,
    passive: Option<Thresholds>,
}

impl UpstreamHealth {
    /// Every node starts healthy, as in APISIX.
    pub fn new(
        key: Arc<str>,
        checks: Checks,
        fingerprint: String,
        nodes: Vec<(String, u16)>,
    ) -> Self {
        let a = &checks.active;
        let active = Thresholds {
            healthy_statuses: StatusSet::new(&a.healthy.http_statuses),
            unhealthy_statuses: StatusSet::new(&a.unhealthy.http_statuses),
            successes: a.healthy.successes,
            http_failures: a.unhealthy.http_failures,
            tcp_failures: a.unhealthy.tcp_failures,
            timeouts: a.unhealthy.timeouts,
        };
        let passive = checks.passive.as_ref().map(|p| Thresholds {
            healthy_statuses: StatusSet::new(&p.healthy.http_statuses),
            unhealthy_statuses: StatusSet::new(&p.unhealthy.http_statuses),
            successes: p.healthy.successes,
            http_failures: p.unhealthy.http_failures,
            tcp_failures: p.unhealthy.tcp_failures,
            timeouts: p.unhealthy.timeouts,
        });
        let nodes: Vec<NodeHealth> = nodes
            .into_iter()
            .map(|(host, port)| NodeHealth {
                addr: crate::proxy::client::host_port(&host, port).into(),
                host,
                port,
                healthy: AtomicBool::new(true),
                success: AtomicU32::new(0),
                http_failure: AtomicU32::new(0),
                tcp_failure: AtomicU32::new(0),
                timeout_failure: AtomicU32::new(0),
            })
            .collect();
        UpstreamHealth {
            key,
            checks,
            fingerprint,
            client_cert: None,
            healthy_count: AtomicUsize::new(nodes.len()),
            nodes,
            active,
            passive,
        }
    }

    /// Whether node `i` takes traffic: healthy, or every node is down (then all are used, as
    /// APISIX does).
    #[inline]
    pub fn usable(&self, i: usize) -> bool {
        self.nodes.get(i).is_none_or(|n| n.is_healthy()) || self.all_down()
    }

    /// No node is marked down (the balancer then checks no node one by one).
    #[inline]
    pub fn all_healthy(&self) -> bool {
        self.healthy_count.load(Ordering::Relaxed) == self.nodes.len()
    }

    #[inline]
    pub fn all_down(&self) -> bool {
        self.healthy_count.load(Ordering::Relaxed) == 0
    }

    /// Whether passive checks are configured (workers report only then).
    #[inline]
    pub fn passive(&self) -> bool {
        self.passive.is_some()
    }

    /// A proxied response's status, counted by the passive thresholds.
    pub fn report_status(&self, i: usize, source: Source, status: u16) {
        let Some(t) = self.thresholds(source) else {
            return;
        };
        if t.unhealthy_statuses.contains(status) {
            self.report(i, source, Observation::HttpFailure(status));
        } else if t.healthy_statuses.contains(status) {
            self.report(i, source, Observation::Success);
        }
        // A status in neither list says nothing about the node.
    }

    fn thresholds(&self, source: Source) -> Option<&Thresholds> {
        match source {
            Source::Active => Some(&self.active),
            Source::Passive => self.passive.as_ref(),
        }
    }

    /// Counts one observation about node `i`, changing its state when a threshold is met.
    pub fn report(&self, i: usize, source: Source, obs: Observation) {
        let (Some(node), Some(t)) = (self.nodes.get(i), self.thresholds(source)) else {
            return;
        };
        let (counter, threshold, what) = match &obs {
            Observation::Success => {
                if t.successes == 0 {
                    return;
                }
                node.http_failure.store(0, Ordering::Relaxed);
                node.tcp_failure.store(0, Ordering::Relaxed);
                node.timeout_failure.store(0, Ordering::Relaxed);
                if node.is_healthy() {
                    return;
                }
                let n = node.success.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= t.successes {
                    self.set(node, true, || {
                        format!("{n} successes in a row ({} check)", source.as_str())
                    });
                }
                return;
            }
            Observation::HttpFailure(_) => (&node.http_failure, t.http_failures, "HTTP failures"),
            Observation::TcpFailure(_) => (&node.tcp_failure, t.tcp_failures, "TCP failures"),
            Observation::Timeout => (&node.timeout_failure, t.timeouts, "timeouts"),
        };
        if threshold == 0 {
            return;
        }
        node.success.store(0, Ordering::Relaxed);
        if !node.is_healthy() {
            return;
        }
        let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= threshold {
            self.set(node, false, || {
                let last = match &obs {
                    Observation::HttpFailure(s) => format!("status {s}"),
                    Observation::TcpFailure(e) => e.clone(),
                    Observation::Timeout => "timeout".into(),
                    Observation::Success => String::new(),
                };
                format!(
                    "{n} {what} in a row ({} check; last: {last})",
                    source.as_str()
                )
            });
        }
    }

    /// Sets a node's state; only the call that changed it logs.
    fn set(&self, node: &NodeHealth, healthy: bool, why: impl FnOnce() -> String) {
        if node.healthy.swap(healthy, Ordering::AcqRel) == healthy {
            return;
        }
        node.clear();
        if healthy {
            self.healthy_count.fetch_add(1, Ordering::Relaxed);
            tracing::info!(upstream = %self.key, node = %node.addr, "upstream node is healthy again: {}", why());
        } else {
            let left = self.healthy_count.fetch_sub(1, Ordering::Relaxed) - 1;
            tracing::warn!(upstream = %self.key, node = %node.addr, "upstream node marked unhealthy: {}", why());
            if left == 0 {
                tracing::warn!(upstream = %self.key, "every node of the upstream is unhealthy: traffic goes to all of them");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> UpstreamHealth {
        let checks: Checks = serde_json::from_value(serde_json::json!({
            "active": {"unhealthy": {"tcp_failures": 2}, "healthy": {"successes": 2}},
            "passive": {"unhealthy": {"http_failures": 3, "timeouts": 0}}
        }))
        .expect("checks");
        UpstreamHealth::new(
            "/apisix/upstreams/1".into(),
            checks,
            String::new(),
            vec![("127.0.0.1".into(), 1), ("127.0.0.1".into(), 2)],
        )
    }

    #[test]
    fn failures_in_a_row_mark_down_and_successes_bring_back() {
        let h = health();
        let tcp = || Observation::TcpFailure("connection refused".into());
        h.report(0, Source::Active, tcp());
        assert!(h.nodes[0].is_healthy());
        assert_eq!(h.nodes[0].status(), "mostly_healthy");
        // A success in between starts the count again.
        h.report(0, Source::Active, Observation::Success);
        h.report(0, Source::Active, tcp());
        assert!(h.nodes[0].is_healthy());
        h.report(0, Source::Active, tcp());
        assert!(!h.nodes[0].is_healthy());
        assert_eq!(h.nodes[0].status(), "unhealthy");
        assert!(!h.usable(0) && h.usable(1));
        h.report(0, Source::Active, Observation::Success);
        assert_eq!(h.nodes[0].status(), "mostly_unhealthy");
        h.report(0, Source::Active, Observation::Success);
        assert!(h.nodes[0].is_healthy());
        assert_eq!(h.nodes[0].counters(), Counters::default());
    }

    #[test]
    fn passive_statuses_and_disabled_thresholds() {
        let h = health();
        for _ in 0..2 {
            h.report_status(1, Source::Passive, 500);
        }
        // 404 is in neither passive list: no change to the count.
        h.report_status(1, Source::Passive, 404);
        assert!(h.nodes[1].is_healthy());
        h.report_status(1, Source::Passive, 503);
        assert!(!h.nodes[1].is_healthy());
        // timeouts: 0 turns timeouts off.
        for _ in 0..10 {
            h.report(0, Source::Passive, Observation::Timeout);
        }
        assert!(h.nodes[0].is_healthy());
    }

    #[test]
    fn all_down_means_all_usable() {
        let h = health();
        for i in 0..2 {
            for _ in 0..2 {
                h.report(i, Source::Active, Observation::Timeout);
                h.report(i, Source::Active, Observation::Timeout);
                h.report(i, Source::Active, Observation::Timeout);
            }
        }
        assert!(h.all_down());
        assert!(h.usable(0) && h.usable(1));
    }
}
