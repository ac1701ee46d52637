//! Host names to addresses, for everything that connects out by name: upstream nodes (the
//! HTTP/1.1 client and gRPC), openfunction's `function_uri`, active health checks and Lua
//! cosockets. They share one process-wide cache.
//!
//! - IP literals and `localhost` never go through DNS; other names are looked up in the hosts
//!   file, then with the DNS servers of `dns_resolver` (default: /etc/resolv.conf's), each
//!   lookup bounded by `resolver_timeout` ([`resolver`], on hickory-resolver).
//! - An answer is kept for its TTL (at least [`MIN_TTL`]; `dns_resolver_valid` replaces the
//!   TTL) and looked up again in the background when it expires, for as long as the name is in
//!   use, so a request asking for a known name never waits on DNS: until the new answer is in,
//!   the last one serves. A changed answer moves new connections to the new addresses, and
//!   pooled connections made under an older answer are not reused.
//! - A name the DNS says does not exist (NXDOMAIN, no A/AAAA record) is *down*: upstream nodes
//!   with it are skipped by the balancer, as APISIX leaves them out of the nodes it balances
//!   over (one log line per node when that changes, naming the upstream, node and error),
//!   until it resolves again (asked again after 1 s, backing off to 5 s). On a failure that is
//!   not an answer (timeout, SERVFAIL, REFUSED, network), the last good answer keeps serving,
//!   as APISIX's DNS client keeps its cached record on such errors; a name never resolved is
//!   down.
//!
//! All lookups and refreshes run on one thread of their own (`moongate-dns`), started by
//! [`start`] (`moongate run`) or by the first lookup; building a snapshot only registers the
//! names it uses ([`node_name`]), so `moongate check` sends no query.

mod cache;
mod config;
mod resolver;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

#[cfg(test)]
pub(crate) use cache::force;
pub use cache::{start, NodeName, Pin};
pub use config::{DnsServer, DnsServers, ResolverTimeout, Settings};

/// The shortest time an answer is kept, whatever its TTL (a TTL of 0 would mean a query per
/// connection).
pub const MIN_TTL: Duration = Duration::from_secs(1);

/// The addresses to connect to for one host, and (for a looked-up name) what tells a pooled
/// connection made with them whether they are still the answer.
#[derive(Debug, Clone)]
pub struct Resolved {
    addrs: Arc<[IpAddr]>,
    /// Where this connection starts in `addrs`, so several addresses share the connections.
    first: usize,
    pub pin: Option<Pin>,
}

impl Resolved {
    /// The addresses with `port`, in the order to try them.
    pub fn socket_addrs(&self, port: u16) -> impl Iterator<Item = SocketAddr> + '_ {
        let n = self.addrs.len();
        (0..n).map(move |i| SocketAddr::new(self.addrs[(self.first + i) % n], port))
    }
}

/// The literal address `host` names, if it is one (IPv6 with or without brackets), or
/// `localhost`'s.
fn literal(host: &str) -> Option<Arc<[IpAddr]>> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Some(Arc::from([ip]));
    }
    if bare.eq_ignore_ascii_case("localhost") || bare.eq_ignore_ascii_case("localhost.") {
        return Some(Arc::from([
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ]));
    }
    None
}

/// Whether `host` goes through the resolver (not an IP literal, not `localhost`).
pub fn is_name(host: &str) -> bool {
    literal(host).is_none()
}

/// The addresses of `host`. A literal or a cached name answers at once; a name not yet known
/// waits for its first lookup (at most `resolver_timeout`). The error is the resolver's.
pub async fn resolve(host: &str) -> Result<Resolved, String> {
    if let Some(addrs) = literal(host) {
        return Ok(Resolved {
            addrs,
            first: 0,
            pin: None,
        });
    }
    cache::resolve(host).await
}

/// The address `host` stands for now, without waiting: a literal's own, a name's first
/// cached address (None while it has none), for showing a node as APISIX does (by its IP).
pub fn current_addr(host: &str) -> Option<IpAddr> {
    match literal(host) {
        Some(addrs) => addrs.first().copied(),
        None => cache::current_addr(host),
    }
}

/// The handle an upstream node keeps on its host name (None for a literal): it registers the
/// name as in use (so it is refreshed) and says whether it is down. `upstream` and `node` name
/// the node in the log lines about it.
pub fn node_name(host: &str, upstream: &str, node: &str) -> Option<NodeName> {
    if literal(host).is_some() {
        return None;
    }
    Some(cache::node_name(host, upstream, node))
}
