//! Weighted round-robin (`type: roundrobin`, the default): one cycle of picks laid out when the
//! snapshot is built, walked by one shared atomic counter.

use std::sync::atomic::{AtomicUsize, Ordering};

/// A group's round-robin cycle: positions into the group's node list, interleaved by weight.
pub struct Schedule {
    cycle: Vec<usize>,
    next: AtomicUsize,
}

impl Schedule {
    /// `weights`: the group's nodes' weights, in the group's order (all above 0).
    pub fn new(weights: &[u32]) -> Schedule {
        Schedule {
            cycle: weighted_cycle(weights),
            next: AtomicUsize::new(0),
        }
    }

    /// The first pick of a request: the next position of the cycle whose node `ok` accepts
    /// (one probe when every node is healthy: a pick is one atomic increment, shared by all
    /// workers without a lock).
    pub fn first(&self, nodes: &[usize], ok: impl Fn(usize) -> bool) -> Option<usize> {
        let len = self.cycle.len();
        if len == 0 {
            return None;
        }
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        (0..len)
            .map(|j| self.cycle[(k + j) % len])
            .find(|&pos| ok(nodes[pos]))
    }
}

/// A retry within a group: the next node after position `last`, in the group's order.
pub fn after(nodes: &[usize], last: usize, ok: impl Fn(usize) -> bool) -> Option<usize> {
    let n = nodes.len();
    (1..n).map(|i| (last + i) % n).find(|&pos| ok(nodes[pos]))
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Greatest common divisor of the weights (0 when all are 0).
pub fn weights_gcd(weights: impl IntoIterator<Item = u32>) -> u32 {
    weights.into_iter().fold(0, gcd)
}

/// Interleaves positions by weight (smooth weighted round-robin over one cycle), so a
/// weight-3/weight-1 pair gives a,a,b,a rather than bursts.
fn weighted_cycle(weights: &[u32]) -> Vec<usize> {
    let g = weights_gcd(weights.iter().copied());
    if g == 0 {
        return Vec::new();
    }
    let mut weights: Vec<i64> = weights.iter().map(|&w| (w / g) as i64).collect();
    let total: i64 = weights.iter().sum();
    // Cap the cycle length; very large weight ratios are scaled down proportionally.
    const MAX_CYCLE: i64 = 4096;
    if total > MAX_CYCLE {
        for w in &mut weights {
            if *w > 0 {
                *w = (*w * MAX_CYCLE / total).max(1);
            }
        }
    }
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..weights.len() {
            current[i] += weights[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycle_is_smooth_and_weighted() {
        assert_eq!(weighted_cycle(&[3, 1]), vec![0, 0, 1, 0]);
        assert_eq!(weighted_cycle(&[2, 2]), vec![0, 1]);
        assert!(weighted_cycle(&[0]).is_empty());
        let s = weighted_cycle(&[1_000_000, 1]);
        assert!(s.len() <= 4097 && s.contains(&1));
    }

    #[test]
    fn first_skips_refused_nodes_and_after_walks_the_group() {
        let s = Schedule::new(&[1, 1, 1]);
        let nodes = [4, 5, 6];
        let picks: Vec<_> = (0..3).filter_map(|_| s.first(&nodes, |i| i != 5)).collect();
        assert_eq!(picks, vec![0, 2, 2]);
        assert_eq!(after(&nodes, 0, |i| i != 5), Some(2));
        assert_eq!(after(&nodes, 2, |i| i == 6), None);
    }
}
