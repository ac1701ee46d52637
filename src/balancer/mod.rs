//! Upstream node selection, APISIX's balancer `type`s: `roundrobin` (weighted), `chash`
//! (consistent hashing on `hash_on` / `key`), `least_conn` (in-flight requests per unit of
//! weight, counted across the process) and `ewma` (decayed response time, best of two random
//! nodes), over the nodes' `priority` groups.
//!
//! A [`Balancer`] is built once per upstream per snapshot: the round-robin cycles and the hash
//! rings are laid out then, never per request. A request carries its own [`Selection`] (where
//! its last pick was, which nodes it tried), so retries go to another node and, once every node
//! of a priority is unhealthy or tried, to the next lower priority (apisix/balancer/priority.lua).
//! Every type skips nodes the health checks marked down, unless every node of the upstream is
//! down (then all are used, as APISIX does; the health state logs that once). A node whose host
//! name does not resolve is left out altogether, as APISIX leaves it out of the nodes it
//! balances over (`parse_domain_for_nodes`): with every node's name down, no node is picked.

mod chash;
mod load;
mod roundrobin;

use std::cell::Cell;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{BalancerType, HashOn, Upstream};
use crate::dns::NodeName;
use crate::health::UpstreamHealth;
use crate::plugin::Ctx;

pub use chash::check_key;
pub use load::InFlight;
use load::NodeLoad;

/// One upstream's balancer.
pub struct Balancer {
    kind: BalancerType,
    /// Priority groups, highest priority first; each holds the nodes with a weight above 0.
    groups: Vec<Group>,
    /// Per node (the upstream's order).
    weights: Vec<u32>,
    /// Per node, for `least_conn` and `ewma` (empty for the others).
    loads: Vec<Arc<NodeLoad>>,
    /// `chash`: what a request is hashed on.
    hash_key: Option<chash::HashKey>,
    /// Nodes with a weight above 0.
    live: usize,
    /// The `remote_addr` fallback of `chash` has been logged at WARN once.
    warned_fallback: AtomicBool,
    /// Per node, its host name in the DNS cache (None for an IP literal); empty when every
    /// node is a literal, so such upstreams look at none.
    names: Vec<Option<NodeName>>,
}

struct Group {
    /// Node indices, in the upstream's order.
    nodes: Vec<usize>,
    pick: GroupPick,
}

enum GroupPick {
    RoundRobin(roundrobin::Schedule),
    Chash(chash::Ring),
    /// Where the scan for the least loaded node starts, moved on each pick so ties rotate.
    LeastConn(AtomicUsize),
    Ewma,
}

/// One request's progress through the balancer.
pub struct Selection {
    group: usize,
    /// The last pick's position in its group (round-robin: in the node list; chash: on the ring).
    at: Option<usize>,
    /// `chash`: the request key's hash.
    hash: u32,
    tried: Tried,
}

/// The nodes a request has tried: the first without allocating, retries in a list.
struct Tried {
    first: Option<usize>,
    more: Vec<usize>,
}

impl Tried {
    fn contains(&self, i: usize) -> bool {
        self.first == Some(i) || self.more.contains(&i)
    }

    fn push(&mut self, i: usize) {
        if self.first.is_none() {
            self.first = Some(i);
        } else {
            self.more.push(i);
        }
    }
}

impl Balancer {
    /// `key`: the owning resource (`/apisix/upstreams/1`), which keys the load state kept over
    /// reloads; `addrs`: each node's `host:port`. The upstream was checked by
    /// [`crate::snapshot::check_upstream`].
    pub fn new(cfg: &Upstream, key: &str, addrs: &[&str]) -> Balancer {
        let nodes = &cfg.nodes.0;
        let kind = cfg.kind;
        let mut priorities: Vec<i64> = nodes
            .iter()
            .filter(|n| n.weight > 0)
            .map(|n| n.priority)
            .collect();
        priorities.sort_unstable_by(|a, b| b.cmp(a));
        priorities.dedup();
        let groups = priorities
            .into_iter()
            .map(|p| {
                let members: Vec<usize> = (0..nodes.len())
                    .filter(|&i| nodes[i].weight > 0 && nodes[i].priority == p)
                    .collect();
                let pick = match kind {
                    BalancerType::Roundrobin => GroupPick::RoundRobin(roundrobin::Schedule::new(
                        &members.iter().map(|&i| nodes[i].weight).collect::<Vec<_>>(),
                    )),
                    BalancerType::Chash => GroupPick::Chash(chash::Ring::new(
                        &members
                            .iter()
                            .map(|&i| (i, nodes[i].weight, addrs[i]))
                            .collect::<Vec<_>>(),
                    )),
                    BalancerType::LeastConn => GroupPick::LeastConn(AtomicUsize::new(0)),
                    BalancerType::Ewma => GroupPick::Ewma,
                };
                Group {
                    nodes: members,
                    pick,
                }
            })
            .collect();
        let loads = match kind {
            BalancerType::LeastConn | BalancerType::Ewma => {
                load::loads_for(key, addrs.iter().copied())
            }
            _ => Vec::new(),
        };
        let hash_key = (kind == BalancerType::Chash)
            .then(|| chash::HashKey::new(cfg.hash_on.unwrap_or_default(), cfg.key.as_deref()));
        Balancer {
            kind,
            groups,
            weights: nodes.iter().map(|n| n.weight).collect(),
            loads,
            hash_key,
            live: nodes.iter().filter(|n| n.weight > 0).count(),
            warned_fallback: AtomicBool::new(false),
            names: Vec::new(),
        }
    }

    /// The nodes' host names (per node, None for an IP literal; see [`crate::dns::node_name`]):
    /// a node is skipped while its name does not resolve.
    pub fn with_names(mut self, names: Vec<Option<NodeName>>) -> Balancer {
        if names.iter().any(Option::is_some) {
            self.names = names;
        }
        self
    }

    /// Node `i`'s host name does not resolve.
    fn unresolved(&self, i: usize) -> bool {
        self.names
            .get(i)
            .is_some_and(|n| n.as_ref().is_some_and(NodeName::is_down))
    }

    /// Nodes with a weight above 0.
    pub fn live(&self) -> usize {
        self.live
    }

    /// Starts a request's selection (for `chash`, hashes its key: after the access phase, so
    /// what plugins set counts, as in APISIX).
    pub fn begin(&self, ctx: &Ctx) -> Selection {
        let hash = match &self.hash_key {
            // One node: nothing to choose, no key to read.
            Some(k) if self.live > 1 => match k.key(ctx) {
                Some(key) => chash::hash(key.as_bytes()),
                None => {
                    let addr = ctx.remote_addr.ip().to_string();
                    if !self.warned_fallback.swap(true, Ordering::Relaxed) {
                        tracing::warn!(route = ctx.route_id(), "chash key fetch is nil, use default chash_key remote_addr: {addr} (logged once per upstream; later ones at debug)");
                    } else {
                        tracing::debug!(
                            route = ctx.route_id(),
                            "chash key fetch is nil, use default chash_key remote_addr: {addr}"
                        );
                    }
                    chash::hash(addr.as_bytes())
                }
            },
            _ => 0,
        };
        Selection {
            group: 0,
            at: None,
            hash,
            tried: Tried {
                first: None,
                more: Vec::new(),
            },
        }
    }

    /// The next node to try (an index into the upstream's nodes), never one the request tried:
    /// the first pick, then each retry. None when every node with a weight has been tried.
    pub fn next(&self, sel: &mut Selection, health: Option<&UpstreamHealth>) -> Option<usize> {
        let Selection {
            group,
            at,
            hash,
            tried,
        } = sel;
        // The usual first pick: nothing tried, no node down, so no node needs a look (at 100
        // nodes this halves least_conn's and ewma's cost).
        let resolved = self.names.iter().flatten().all(|n| !n.is_down());
        let all_ok =
            tried.first.is_none() && resolved && health.is_none_or(UpstreamHealth::all_healthy);
        while let Some(g) = self.groups.get(*group) {
            let ok = |i: usize| {
                all_ok
                    || (!tried.contains(i)
                        && health.is_none_or(|h| h.usable(i))
                        && (resolved || !self.unresolved(i)))
            };
            let found = match &g.pick {
                GroupPick::RoundRobin(s) => {
                    let pos = match *at {
                        None => s.first(&g.nodes, ok),
                        Some(last) => roundrobin::after(&g.nodes, last, ok),
                    };
                    *at = pos;
                    pos.map(|p| g.nodes[p])
                }
                GroupPick::Chash(ring) => {
                    let start = match *at {
                        None => ring.find(*hash),
                        Some(last) => last + 1,
                    };
                    let pos = ring.walk(start, || g.nodes.iter().any(|&i| ok(i)), ok);
                    *at = pos;
                    pos.map(|p| ring.node_at(p))
                }
                GroupPick::LeastConn(start) => self.least_conn(&g.nodes, start, ok),
                GroupPick::Ewma => self.ewma(&g.nodes, all_ok, ok),
            };
            if let Some(i) = found {
                tried.push(i);
                return Some(i);
            }
            *group += 1;
            *at = None;
        }
        // The nodes that resolve are all unhealthy, while a node out by DNS still counts as
        // healthy: "every node down: use them all" is about the nodes that resolve (APISIX
        // checks only those), so the first pick is made again without health.
        if tried.first.is_none() && !resolved && health.is_some() {
            *group = 0;
            return self.next(sel, None);
        }
        None
    }

    /// `least_conn`: the node with the lowest (1 + in flight) / weight (APISIX's score),
    /// compared without division; the scan starts one node further each pick, so equal
    /// scores take turns instead of all going to the first node.
    fn least_conn(
        &self,
        nodes: &[usize],
        start: &AtomicUsize,
        ok: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let first = start.fetch_add(1, Ordering::Relaxed) % nodes.len().max(1);
        let mut best: Option<(usize, u64, u64)> = None;
        // Two slices rather than an index modulo the length: a division per node was most of
        // the pick's cost at 100 nodes.
        for &i in nodes[first..].iter().chain(&nodes[..first]) {
            if !ok(i) {
                continue;
            }
            let load = 1 + self.loads[i].in_flight();
            let w = u64::from(self.weights[i]);
            match best {
                // In-flight counts and weights stay far below 2^32: the products fit.
                Some((_, bl, bw)) if load.saturating_mul(bw) >= bl.saturating_mul(w) => {}
                _ => best = Some((i, load, w)),
            }
        }
        best.map(|b| b.0)
    }

    /// `ewma`: of two different random acceptable nodes, the one with the lower decayed
    /// response time (APISIX's pick of two; weights are not used, as in APISIX).
    fn ewma(&self, nodes: &[usize], all_ok: bool, ok: impl Fn(usize) -> bool) -> Option<usize> {
        let count = if all_ok {
            nodes.len()
        } else {
            nodes.iter().filter(|&&i| ok(i)).count()
        };
        let nth = |k: usize| nodes.iter().copied().filter(|&i| ok(i)).nth(k);
        match count {
            0 => None,
            1 => nth(0),
            _ => {
                let a = random_below(count);
                let mut b = random_below(count - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = if count == nodes.len() {
                    (nodes[a], nodes[b])
                } else {
                    (nth(a)?, nth(b)?)
                };
                let now = load::now_nanos();
                Some(if self.loads[b].score(now) < self.loads[a].score(now) {
                    b
                } else {
                    a
                })
            }
        }
    }

    /// Counts a try on node `i` as in flight (`least_conn`) until the returned guard drops.
    pub fn start_try(&self, i: usize) -> Option<InFlight> {
        (self.kind == BalancerType::LeastConn).then(|| InFlight::start(&self.loads[i]))
    }

    /// A try on node `i` got its response head after `rtt` (connect included): `ewma` folds it
    /// into the node's average.
    pub fn observe(&self, i: usize, rtt: Duration) {
        if self.kind == BalancerType::Ewma {
            self.loads[i].observe(rtt, load::now_nanos());
        }
    }
}

/// Checks `hash_on` and `key` of a `chash` upstream (nothing for the other types).
pub fn check(cfg: &Upstream) -> Result<(), String> {
    if cfg.kind != BalancerType::Chash {
        return Ok(());
    }
    check_key(cfg.hash_on.unwrap_or(HashOn::Vars), cfg.key.as_deref())
}

/// A random number below `n` (n > 0) from a per-thread xorshift generator (the pick needs
/// spread, not secrecy).
fn random_below(n: usize) -> usize {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(
            std::collections::hash_map::RandomState::new().hash_one(std::thread::current().id()) | 1,
        );
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        ((x >> 32) as usize * n) >> 32
    })
}

#[cfg(test)]
mod tests;
