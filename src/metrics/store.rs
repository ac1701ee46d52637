//! Per-worker series: what the workers write on the request path and a scrape reads.
//!
//! Each thread that records (a worker) owns a [`Shard`]: its series, found through a
//! thread-local map keyed by a hash of the label values, so recording takes no lock and, once
//! a label set has been seen, allocates nothing. A new label set is pushed onto the shard's
//! list under a mutex that only a scrape contends. Values are atomics with one writer (the
//! owning thread), so an update is a plain load and store, not a locked read-modify-write.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::plugin::ctx::IdHasher;

/// A number one thread writes and any thread reads.
#[derive(Debug, Default)]
pub struct Cell(AtomicU64);

impl Cell {
    /// Adds `n` (wrapping). Only the owning thread calls this, so load + store is exact.
    #[inline]
    pub fn add(&self, n: u64) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.wrapping_add(n), Ordering::Relaxed);
    }

    /// Subtracts `n` (wrapping; a gauge's sum over shards comes out right).
    #[inline]
    pub fn sub(&self, n: u64) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.wrapping_sub(n), Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A histogram's counts per bucket (not cumulative; the last is `+Inf`) and its sum.
#[derive(Debug)]
pub struct Histogram {
    counts: Box<[Cell]>,
    sum: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: usize) -> Self {
        Histogram {
            counts: (0..=bounds).map(|_| Cell::default()).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// Counts `v` in the first bucket whose bound is at least `v` (Prometheus' `le`).
    #[inline]
    pub fn observe(&self, bounds: &[f64], v: f64) {
        let i = bounds.partition_point(|b| *b < v);
        if let Some(c) = self.counts.get(i) {
            c.add(1);
        }
        let s = f64::from_bits(self.sum.load(Ordering::Relaxed)) + v;
        self.sum.store(s.to_bits(), Ordering::Relaxed);
    }

    /// Adds this histogram's counts into `counts` (same length) and returns its sum.
    pub fn add_into(&self, counts: &mut [u64]) -> f64 {
        for (acc, c) in counts.iter_mut().zip(self.counts.iter()) {
            *acc += c.get();
        }
        f64::from_bits(self.sum.load(Ordering::Relaxed))
    }
}

/// Label values of one series, in the family's label order.
pub type Labels = Box<[Box<str>]>;

/// Something kept per label set.
pub trait Series: Send + Sync + 'static {
    fn labels(&self) -> &[Box<str>];
}

/// `apisix_http_status`: labels code, route, matched_uri, matched_host, service, consumer,
/// node, then the extra labels.
#[derive(Debug)]
pub struct StatusSeries {
    pub labels: Labels,
    pub count: Cell,
}

impl Series for StatusSeries {
    fn labels(&self) -> &[Box<str>] {
        &self.labels
    }
}

/// One label set of `apisix_http_latency` (three types) and `apisix_bandwidth` (two):
/// route, service, consumer, node, then the latency extra labels, then the bandwidth ones.
#[derive(Debug)]
pub struct RequestSeries {
    pub labels: Labels,
    /// `request`, `upstream`, `apisix`.
    pub latency: [Histogram; 3],
    pub ingress: Cell,
    pub egress: Cell,
}

impl Series for RequestSeries {
    fn labels(&self) -> &[Box<str>] {
        &self.labels
    }
}

/// Connection and request counts of one worker (`apisix_nginx_http_current_connections`,
/// `apisix_http_requests_total`).
#[derive(Debug, Default)]
pub struct ConnCounts {
    pub accepted: Cell,
    /// Open client connections (a gauge: wrapping add/sub).
    pub active: Cell,
    /// Requests being served (a gauge).
    pub writing: Cell,
    pub requests: Cell,
}

/// What one recording thread owns and a scrape reads.
#[derive(Default)]
pub struct Shard {
    pub status: Mutex<Vec<Arc<StatusSeries>>>,
    pub requests: Mutex<Vec<Arc<RequestSeries>>>,
    pub conns: ConnCounts,
}

fn shards() -> &'static Mutex<Vec<Arc<Shard>>> {
    static SHARDS: Mutex<Vec<Arc<Shard>>> = Mutex::new(Vec::new());
    &SHARDS
}

/// Every shard so far (a scrape reads them; a thread that ended keeps its counts here).
pub fn all_shards() -> Vec<Arc<Shard>> {
    lock(shards()).clone()
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A map from a label-value hash to the series with that hash (usually one).
struct SeriesMap<T> {
    map: HashMap<u64, Vec<Arc<T>>, BuildHasherDefault<IdHasher>>,
}

impl<T> Default for SeriesMap<T> {
    fn default() -> Self {
        SeriesMap {
            map: HashMap::default(),
        }
    }
}

/// The values' hash (FxHash over each value and a separator; not keyed, but label values are
/// bounded by the config and the status codes, and a collision costs only a comparison).
fn hash_values(values: &[&str]) -> u64 {
    let mut h = rustc_hash::FxHasher::default();
    for v in values {
        h.write(v.as_bytes());
        h.write_u8(0xff);
    }
    h.finish()
}

impl<T: Series> SeriesMap<T> {
    /// The series for `values`, made by `make` (and pushed onto `shared`) the first time.
    fn get(
        &mut self,
        values: &[&str],
        shared: &Mutex<Vec<Arc<T>>>,
        make: impl FnOnce(Labels) -> T,
    ) -> Arc<T> {
        let list = self.map.entry(hash_values(values)).or_default();
        if let Some(s) = list.iter().find(|s| {
            let l = s.labels();
            l.len() == values.len() && l.iter().zip(values).all(|(a, b)| &**a == *b)
        }) {
            return s.clone();
        }
        let labels: Labels = values.iter().map(|v| Box::<str>::from(*v)).collect();
        let s = Arc::new(make(labels));
        lock(shared).push(s.clone());
        list.push(s.clone());
        s
    }
}

struct Local {
    shard: Arc<Shard>,
    status: RefCell<SeriesMap<StatusSeries>>,
    requests: RefCell<SeriesMap<RequestSeries>>,
}

impl Local {
    fn new() -> Self {
        let shard = Arc::new(Shard::default());
        lock(shards()).push(shard.clone());
        Local {
            shard,
            status: RefCell::default(),
            requests: RefCell::default(),
        }
    }
}

thread_local! {
    static LOCAL: Local = Local::new();
}

/// Runs `f` on this thread's status series for `values`.
pub fn with_status<R>(values: &[&str], f: impl FnOnce(&StatusSeries) -> R) -> Option<R> {
    LOCAL
        .try_with(|l| {
            let s = l
                .status
                .borrow_mut()
                .get(values, &l.shard.status, |labels| StatusSeries {
                    labels,
                    count: Cell::default(),
                });
            f(&s)
        })
        .ok()
}

/// Runs `f` on this thread's latency/bandwidth series for `values`; `bounds` is the number
/// of latency buckets.
pub fn with_request<R>(
    values: &[&str],
    bounds: usize,
    f: impl FnOnce(&RequestSeries) -> R,
) -> Option<R> {
    LOCAL
        .try_with(|l| {
            let s = l
                .requests
                .borrow_mut()
                .get(values, &l.shard.requests, |labels| RequestSeries {
                    labels,
                    latency: [
                        Histogram::new(bounds),
                        Histogram::new(bounds),
                        Histogram::new(bounds),
                    ],
                    ingress: Cell::default(),
                    egress: Cell::default(),
                });
            f(&s)
        })
        .ok()
}

/// Runs `f` on this thread's connection counts.
#[inline]
pub fn with_conns(f: impl FnOnce(&ConnCounts)) {
    let _ = LOCAL.try_with(|l| f(&l.shard.conns));
}

/// A client connection: counted as accepted and active until dropped.
pub struct ConnectionGuard(());

impl ConnectionGuard {
    pub fn new() -> Self {
        with_conns(|c| {
            c.accepted.add(1);
            c.active.add(1);
        });
        ConnectionGuard(())
    }
}

impl Default for ConnectionGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        with_conns(|c| c.active.sub(1));
    }
}

/// A request being served: counted in `apisix_http_requests_total` and as `writing` until
/// dropped (it lives in the request's ctx).
pub struct InFlight(());

impl InFlight {
    pub fn new() -> Self {
        with_conns(|c| {
            c.requests.add(1);
            c.writing.add(1);
        });
        InFlight(())
    }
}

impl Default for InFlight {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        with_conns(|c| c.writing.sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_series_per_label_set_and_no_new_one_on_repeat() {
        let a = with_status(&["200", "r1"], |s| {
            s.count.add(1);
            s as *const StatusSeries as usize
        })
        .unwrap();
        let b = with_status(&["200", "r1"], |s| {
            s.count.add(1);
            s as *const StatusSeries as usize
        })
        .unwrap();
        let c = with_status(&["200", "r2"], |s| s as *const StatusSeries as usize).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        // Values that concatenate alike are different label sets.
        let d = with_status(&["20", "0r1"], |s| s as *const StatusSeries as usize).unwrap();
        assert_ne!(a, d);
        assert_eq!(with_status(&["200", "r1"], |s| s.count.get()), Some(2));
    }

    #[test]
    fn histogram_buckets_follow_le() {
        let bounds = [1.0, 5.0];
        let h = Histogram::new(bounds.len());
        for v in [0.5, 1.0, 1.5, 5.0, 9.0] {
            h.observe(&bounds, v);
        }
        let mut counts = vec![0; 3];
        let sum = h.add_into(&mut counts);
        assert_eq!(counts, vec![2, 2, 1]);
        assert_eq!(sum, 17.0);
    }
}
