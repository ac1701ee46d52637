//! Per-node load the `least_conn` and `ewma` balancers read: in-flight requests and a decayed
//! response time, atomics shared by every worker of the process (no lock on the request path).
//!
//! The state of an upstream's node outlives snapshots: a build takes the published one for the
//! same owning resource and node address ([`loads_for`]), so a reload (of this upstream or of
//! anything else) does not forget the requests still in flight on a node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// APISIX's ewma `DECAY_TIME`: an observation's weight halves about every 7 s (e^(-t/10)).
const DECAY_SECS: f64 = 10.0;

/// One node's load.
#[derive(Default)]
pub struct NodeLoad {
    in_flight: AtomicU64,
    /// The decayed response time in seconds, as f64 bits.
    ewma: AtomicU64,
    /// When `ewma` was last set: nanoseconds since [`epoch`], 0 for never.
    touched: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since the process's epoch, never 0.
pub fn now_nanos() -> u64 {
    (epoch().elapsed().as_nanos() as u64).max(1)
}

/// e^(-elapsed/DECAY): how much of the old value is kept after `elapsed_ns` (0 when never set).
fn keep(touched: u64, now: u64) -> f64 {
    if touched == 0 {
        return 0.0;
    }
    let td = now.saturating_sub(touched) as f64 / 1e9;
    (-td / DECAY_SECS).exp()
}

impl NodeLoad {
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The ewma score at `now`: the last value decayed toward 0 (APISIX scores with rtt 0), so
    /// a node not used for a while gets tried again.
    pub fn score(&self, now: u64) -> f64 {
        let ewma = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        ewma * keep(self.touched.load(Ordering::Relaxed), now)
    }

    /// Folds one response time in (APISIX's `decay_ewma`). Two workers racing here may lose
    /// one observation, which a moving average can afford; APISIX skips the update when its
    /// lock is taken.
    pub fn observe(&self, rtt: Duration, now: u64) {
        let old = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        let w = keep(self.touched.load(Ordering::Relaxed), now);
        let new = old * w + rtt.as_secs_f64() * (1.0 - w);
        self.ewma.store(new.to_bits(), Ordering::Relaxed);
        self.touched.store(now, Ordering::Relaxed);
    }
}

/// A request in flight on a node (`least_conn`): counted from the pick until it drops, when the
/// request's log phase is done or its try failed.
pub struct InFlight(Arc<NodeLoad>);

impl InFlight {
    pub fn start(load: &Arc<NodeLoad>) -> InFlight {
        load.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(load.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The load of each node of the upstream owned by `key` (same order as `addrs`): the state a
/// published snapshot has for the same node, else a fresh one. Build time only (one lock).
pub fn loads_for<'a>(key: &str, addrs: impl Iterator<Item = &'a str>) -> Vec<Arc<NodeLoad>> {
    static LOADS: OnceLock<Mutex<HashMap<String, Weak<NodeLoad>>>> = OnceLock::new();
    let mut map = LOADS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let out = addrs
        .map(|addr| {
            let id = format!("{key}#{addr}");
            if let Some(l) = map.get(&id).and_then(Weak::upgrade) {
                return l;
            }
            let l = Arc::new(NodeLoad::default());
            map.insert(id, Arc::downgrade(&l));
            l
        })
        .collect();
    // Forget the nodes no snapshot holds any more, now and then (not at every build).
    if map.len() > 64 && map.len() % 64 == 0 {
        map.retain(|_, w| w.strong_count() > 0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ewma_takes_the_first_value_then_decays() {
        let l = NodeLoad::default();
        assert_eq!(l.score(5), 0.0);
        let t0 = 1_000_000_000;
        l.observe(Duration::from_millis(100), t0);
        assert!((l.score(t0) - 0.1).abs() < 1e-9);
        // 10 s later the old value weighs e^-1.
        let t1 = t0 + 10_000_000_000;
        assert!((l.score(t1) - 0.1 / std::f64::consts::E).abs() < 1e-9);
        l.observe(Duration::from_millis(300), t1);
        let w = 1.0 / std::f64::consts::E;
        assert!((l.score(t1) - (0.1 * w + 0.3 * (1.0 - w))).abs() < 1e-9);
    }

    #[test]
    fn in_flight_counts_until_drop_and_state_is_shared_by_key() {
        let a = loads_for("/apisix/upstreams/t", ["n:1", "n:2"].into_iter());
        let g = InFlight::start(&a[1]);
        let again = loads_for("/apisix/upstreams/t", ["n:2"].into_iter());
        assert_eq!(again[0].in_flight(), 1);
        drop(g);
        assert_eq!(a[1].in_flight(), 0);
        let other = loads_for("/apisix/upstreams/other", ["n:2"].into_iter());
        assert!(!Arc::ptr_eq(&other[0], &a[1]));
    }
}
