//! Route matching compatible with APISIX's default `radixtree_uri` router
//! (lua-resty-radixtree): uri patterns, methods and hosts.
//!
//! Pure logic, no I/O. Build a [`Router`] once from a slice of
//! [`RouteSpec`]s, then call [`Router::find`] per request.

mod hash;
mod pattern;
mod radix;

#[cfg(test)]
mod tests;

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;

use hash::FastMap;
use pattern::{Parsed, Tail};
use radix::PrefixTree;

/// One route as configured: the parts of an APISIX route the router needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteSpec {
    /// Route id, used for the deterministic tie-break.
    pub id: String,
    /// At least one APISIX uri pattern: `/exact`, `/prefix/*`, `/prefix*`,
    /// `/user/:id`, `/files/*path`.
    pub uris: Vec<String>,
    /// Upper-case method names; empty matches any method.
    pub methods: Vec<String>,
    /// Empty matches any host; otherwise `example.com` (exact) or
    /// `*.example.com` (any host ending in `.example.com`), case-insensitive.
    pub hosts: Vec<String>,
    /// Higher wins among routes registered under the same uri prefix.
    pub priority: i64,
}

/// A route that matched a request.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteMatch {
    /// Index into the `routes` slice given to [`Router::new`].
    pub index: usize,
    /// The uri pattern that matched, exactly as configured (e.g.
    /// `"/hello/*"`); APISIX's `ctx.curr_req_matched._path`. Shared with the
    /// router, so cloning it is cheap.
    pub uri: Arc<str>,
    /// `:name` captures and the named `*name` wildcard capture, in pattern
    /// order. Empty for exact and plain prefix routes.
    pub params: Vec<(String, String)>,
    /// APISIX's `:ext`: the tail matched by an anonymous trailing `*`
    /// (`Some("")` for `/hello/` on `/hello/*`); `None` when the matched
    /// pattern has no anonymous `*`.
    pub ext: Option<String>,
}

impl RouteMatch {
    /// The value of the parameter `name` (`:name` or `*name`), if captured.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a set of routes could not be turned into a [`Router`].
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// A uri is not a valid pattern.
    #[error("route {id:?}: invalid uri {uri:?}: {reason}")]
    InvalidUri {
        id: String,
        uri: String,
        reason: &'static str,
    },
    /// A route has an empty `uris` list.
    #[error("route {id:?}: no uri given")]
    NoUri { id: String },
    /// More routes or uris than the router can index (2^32 - 1).
    #[error("too many routes")]
    TooManyRoutes,
}

/// Immutable route table; `Send + Sync`, share it behind an `Arc`.
///
/// # Matching order
///
/// Lookup follows APISIX's default `radixtree_uri` router:
///
/// 1. Routes with an **exact** uri (no `:` parameter and no `*`) equal to the
///    request path are tried first.
/// 2. Then **pattern** routes (with a `:param` or a `*`), grouped by their
///    literal prefix (the uri text before the first `:param` or `*`),
///    starting with the **longest** prefix of the request path and falling
///    back to shorter ones. A `:` that does not start a path segment is an
///    ordinary character.
///
/// Within one exact path or one prefix, candidates are tried in this order:
///
/// 1. higher `priority` first;
/// 2. longer uri pattern first (as in APISIX, so `/api/:ver/users` is tried
///    before `/api/*` although both have the prefix `/api/`);
/// 3. routes that set `hosts` before routes that accept any host;
/// 4. `id` ascending: ids made only of ASCII digits compare as numbers and
///    come before all other ids, which compare byte-wise
///    (`"2" < "10" < "a" < "b1"`);
/// 5. finally the order of the routes (and of the uris within a route) in
///    the configuration.
///
/// The first candidate whose methods and hosts accept the request, and whose
/// pattern matches the whole path, wins.
///
/// Hosts compare case-insensitively; `*.example.com` matches any host ending
/// in `.example.com` (`a.example.com`, `a.b.example.com`), not `example.com`.
/// Methods compare exactly (upper-case); an empty list accepts any method.
#[derive(Debug, Default)]
pub struct Router {
    routes: Box<[RouteData]>,
    /// Exact uri -> index into `groups`.
    exact: FastMap<Box<str>, u32>,
    /// Literal prefix of pattern uris -> index into `groups`.
    tree: Option<PrefixTree>,
    groups: Box<[Group]>,
    /// Whether any group has a host index (so `find` lower-cases the host).
    indexed: bool,
}

#[derive(Debug)]
struct RouteData {
    uris: Box<[Arc<str>]>,
    methods: MethodSet,
    hosts: Box<[HostPattern]>,
}

/// Candidates registered under one exact uri or one literal prefix.
#[derive(Debug)]
struct Group {
    /// Sorted in matching order.
    cands: Box<[Candidate]>,
    /// Present for large groups with host-constrained routes.
    host_index: Option<HostIndex>,
}

#[derive(Debug)]
struct Candidate {
    route: u32,
    uri: u32,
    /// `None` for exact uris.
    tail: Option<Tail>,
}

/// Groups with at least this many candidates get a [`HostIndex`].
const HOST_INDEX_MIN: usize = 8;
/// Longest mixed-case host the index path handles (longer ones that need
/// lower-casing fall back to a scan).
const HOST_BUF: usize = 256;
/// Most candidate lists merged by an indexed lookup.
const MAX_LISTS: usize = 12;

/// Positions (into `Group::cands`, ascending) by the hosts that can accept
/// them, so a group of thousands of virtual hosts is not scanned linearly.
#[derive(Debug)]
struct HostIndex {
    /// Lower-case exact host -> positions of routes listing it.
    exact: FastMap<Box<[u8]>, Box<[u32]>>,
    /// Lower-case suffix starting with '.' (from `*.example.com`) ->
    /// positions of routes listing it.
    suffix: FastMap<Box<[u8]>, Box<[u32]>>,
    /// Routes without hosts or with other wildcards (`*example.com`).
    rest: Box<[u32]>,
}

#[derive(Debug, Default)]
struct MethodSet {
    /// Bits of the standard methods (see [`method_bit`]).
    bits: u16,
    /// Non-standard methods.
    other: Box<[Box<str>]>,
}

#[derive(Debug)]
enum HostPattern {
    /// Lower-case host.
    Exact(Box<[u8]>),
    /// Lower-case suffix: the pattern without its leading `*`.
    Suffix(Box<[u8]>),
}

/// Per-request view of the method and host.
struct Request<'a> {
    method: &'a str,
    method_bit: u16,
    host: &'a [u8],
    /// Lower-cased host, when some group has a host index and the host fits.
    host_lower: Option<&'a [u8]>,
}

#[inline]
fn method_bit(m: &str) -> u16 {
    match m {
        "GET" => 1,
        "POST" => 1 << 1,
        "PUT" => 1 << 2,
        "DELETE" => 1 << 3,
        "PATCH" => 1 << 4,
        "HEAD" => 1 << 5,
        "OPTIONS" => 1 << 6,
        "CONNECT" => 1 << 7,
        "TRACE" => 1 << 8,
        "PURGE" => 1 << 9,
        _ => 0,
    }
}

impl MethodSet {
    fn new(methods: &[String]) -> MethodSet {
        let mut set = MethodSet::default();
        let mut other: Vec<Box<str>> = Vec::new();
        for m in methods {
            let m = m.to_ascii_uppercase();
            match method_bit(&m) {
                0 => {
                    if !other.iter().any(|o| **o == *m) {
                        other.push(m.into());
                    }
                }
                bit => set.bits |= bit,
            }
        }
        set.other = other.into_boxed_slice();
        set
    }

    #[inline]
    fn accepts(&self, req: &Request<'_>) -> bool {
        if self.bits == 0 && self.other.is_empty() {
            return true;
        }
        if req.method_bit != 0 {
            self.bits & req.method_bit != 0
        } else {
            self.other.iter().any(|o| **o == *req.method)
        }
    }
}

impl HostPattern {
    fn new(host: &str) -> HostPattern {
        let lower = host.to_ascii_lowercase().into_bytes();
        match lower.strip_prefix(b"*") {
            Some(suffix) => HostPattern::Suffix(suffix.into()),
            None => HostPattern::Exact(lower.into_boxed_slice()),
        }
    }

    #[inline]
    fn accepts(&self, host: &[u8]) -> bool {
        match self {
            HostPattern::Exact(h) => host.eq_ignore_ascii_case(h),
            HostPattern::Suffix(s) => {
                host.len() >= s.len() && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
            }
        }
    }
}

/// Orders route ids: decimal ids numerically and before all others, which
/// compare byte-wise. A total order, so sorting with it is well-defined.
fn cmp_ids(a: &str, b: &str) -> Ordering {
    fn numeric(s: &str) -> Option<&str> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit())).then(|| s.trim_start_matches('0'))
    }
    match (numeric(a), numeric(b)) {
        (Some(na), Some(nb)) => na
            .len()
            .cmp(&nb.len())
            .then_with(|| na.cmp(nb))
            .then_with(|| a.cmp(b)),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => a.cmp(b),
    }
}

impl Router {
    /// Builds a router; fails on the first route with no uri or a bad uri.
    pub fn new(routes: &[RouteSpec]) -> Result<Router, RouterError> {
        if routes.len() >= u32::MAX as usize {
            return Err(RouterError::TooManyRoutes);
        }
        let mut data = Vec::with_capacity(routes.len());
        // Candidates keyed by exact uri / literal prefix, in route order.
        let mut exact: HashMap<&str, Vec<Candidate>> = HashMap::new();
        let mut prefixed: HashMap<&str, Vec<Candidate>> = HashMap::new();

        for (ri, spec) in routes.iter().enumerate() {
            if spec.uris.is_empty() {
                return Err(RouterError::NoUri {
                    id: spec.id.clone(),
                });
            }
            if spec.uris.len() >= u32::MAX as usize {
                return Err(RouterError::TooManyRoutes);
            }
            let mut uris: Vec<Arc<str>> = Vec::with_capacity(spec.uris.len());
            for (ui, uri) in spec.uris.iter().enumerate() {
                let parsed = pattern::parse(uri).map_err(|reason| RouterError::InvalidUri {
                    id: spec.id.clone(),
                    uri: uri.clone(),
                    reason,
                })?;
                uris.push(Arc::from(uri.as_str()));
                // A route listing the same uri twice is registered once.
                if spec.uris[..ui].contains(uri) {
                    continue;
                }
                let (key, list, tail) = match parsed {
                    Parsed::Exact => (uri.as_str(), &mut exact, None),
                    Parsed::Pattern { prefix, tail } => (prefix, &mut prefixed, Some(tail)),
                };
                list.entry(key).or_default().push(Candidate {
                    route: ri as u32,
                    uri: ui as u32,
                    tail,
                });
            }
            let mut hosts: Vec<HostPattern> = Vec::with_capacity(spec.hosts.len());
            for h in &spec.hosts {
                let h = HostPattern::new(h);
                let dup = hosts.iter().any(|o| match (o, &h) {
                    (HostPattern::Exact(a), HostPattern::Exact(b)) => a == b,
                    (HostPattern::Suffix(a), HostPattern::Suffix(b)) => a == b,
                    _ => false,
                });
                if !dup {
                    hosts.push(h);
                }
            }
            data.push(RouteData {
                uris: uris.into_boxed_slice(),
                methods: MethodSet::new(&spec.methods),
                hosts: hosts.into_boxed_slice(),
            });
        }

        let mut router = Router {
            routes: data.into_boxed_slice(),
            ..Router::default()
        };
        let mut groups = Vec::with_capacity(exact.len() + prefixed.len());
        let mut exact_map = FastMap::default();
        exact_map.reserve(exact.len());
        for (uri, cands) in exact {
            exact_map.insert(Box::from(uri), groups.len() as u32);
            groups.push(router.make_group(routes, cands));
        }
        let mut keys = Vec::with_capacity(prefixed.len());
        for (prefix, cands) in prefixed {
            keys.push((prefix.as_bytes(), groups.len() as u32));
            groups.push(router.make_group(routes, cands));
        }
        if groups.len() >= u32::MAX as usize {
            return Err(RouterError::TooManyRoutes);
        }
        router.indexed = groups.iter().any(|g| g.host_index.is_some());
        router.exact = exact_map;
        router.tree = (!keys.is_empty()).then(|| PrefixTree::build(keys));
        router.groups = groups.into_boxed_slice();
        Ok(router)
    }

    /// Sorts one group's candidates into matching order and indexes them.
    fn make_group(&self, specs: &[RouteSpec], mut cands: Vec<Candidate>) -> Group {
        cands.sort_by(|a, b| {
            let (sa, sb) = (&specs[a.route as usize], &specs[b.route as usize]);
            let ua = &self.routes[a.route as usize].uris[a.uri as usize];
            let ub = &self.routes[b.route as usize].uris[b.uri as usize];
            sb.priority
                .cmp(&sa.priority)
                .then_with(|| ub.len().cmp(&ua.len()))
                .then_with(|| sa.hosts.is_empty().cmp(&sb.hosts.is_empty()))
                .then_with(|| cmp_ids(&sa.id, &sb.id))
                .then_with(|| a.route.cmp(&b.route))
                .then_with(|| a.uri.cmp(&b.uri))
        });
        let host_index = self.make_host_index(&cands);
        Group {
            cands: cands.into_boxed_slice(),
            host_index,
        }
    }

    fn make_host_index(&self, cands: &[Candidate]) -> Option<HostIndex> {
        if cands.len() < HOST_INDEX_MIN {
            return None;
        }
        let mut exact: FastMap<&[u8], Vec<u32>> = FastMap::default();
        let mut suffix: FastMap<&[u8], Vec<u32>> = FastMap::default();
        let mut rest = Vec::new();
        for (pos, c) in cands.iter().enumerate() {
            let pos = pos as u32;
            let hosts = &self.routes[c.route as usize].hosts;
            let mut in_rest = hosts.is_empty();
            for h in hosts.iter() {
                match h {
                    HostPattern::Exact(h) => exact.entry(h).or_default().push(pos),
                    HostPattern::Suffix(s) if s.first() == Some(&b'.') => {
                        suffix.entry(s).or_default().push(pos)
                    }
                    HostPattern::Suffix(_) => in_rest = true,
                }
            }
            if in_rest {
                rest.push(pos);
            }
        }
        // Only worth it if it actually splits the group.
        if rest.len() * 2 > cands.len() {
            return None;
        }
        let freeze = |m: FastMap<&[u8], Vec<u32>>| -> FastMap<Box<[u8]>, Box<[u32]>> {
            m.into_iter()
                .map(|(k, v)| (Box::from(k), v.into_boxed_slice()))
                .collect()
        };
        Some(HostIndex {
            exact: freeze(exact),
            suffix: freeze(suffix),
            rest: rest.into_boxed_slice(),
        })
    }

    /// Number of routes the router was built from.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether the router was built from no routes.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Finds the route for a request.
    ///
    /// `host` is the request host without port, any case; `path` is the
    /// request path without query string (matched as given: decode it first
    /// if routes should see a decoded path). Allocates only for the returned
    /// captures.
    pub fn find(&self, method: &str, host: &str, path: &str) -> Option<RouteMatch> {
        // Lower-cased host for the host indexes; copied only if it has
        // upper-case letters (initialised in that branch only).
        let mut buf: [u8; HOST_BUF];
        let host_lower = if !self.indexed {
            None
        } else if !host.bytes().any(|b| b.is_ascii_uppercase()) {
            Some(host.as_bytes())
        } else if host.len() <= HOST_BUF {
            buf = [0u8; HOST_BUF];
            let b = &mut buf[..host.len()];
            b.copy_from_slice(host.as_bytes());
            b.make_ascii_lowercase();
            Some(&*b)
        } else {
            None
        };
        let req = Request {
            method,
            method_bit: method_bit(method),
            host: host.as_bytes(),
            host_lower,
        };

        if !self.exact.is_empty() {
            if let Some(&g) = self.exact.get(path) {
                if let Some(c) = self.pick(&self.groups[g as usize], &req, "") {
                    return Some(RouteMatch {
                        index: c.route as usize,
                        uri: self.uri_of(c),
                        params: Vec::new(),
                        ext: None,
                    });
                }
            }
        }

        let tree = self.tree.as_ref()?;
        for (g, depth) in tree.prefixes_of(path.as_bytes()) {
            // Keys are whole str prefixes of `path`, so `depth` is a char
            // boundary.
            let rest = &path[depth..];
            if let Some(c) = self.pick(&self.groups[g as usize], &req, rest) {
                let (params, ext) = match &c.tail {
                    Some(t) => t.captures(rest)?,
                    None => (Vec::new(), None),
                };
                return Some(RouteMatch {
                    index: c.route as usize,
                    uri: self.uri_of(c),
                    params,
                    ext,
                });
            }
        }
        None
    }

    #[inline]
    fn uri_of(&self, c: &Candidate) -> Arc<str> {
        self.routes[c.route as usize].uris[c.uri as usize].clone()
    }

    #[inline]
    fn accepts(&self, c: &Candidate, req: &Request<'_>, rest: &str) -> bool {
        let r = &self.routes[c.route as usize];
        r.methods.accepts(req)
            && (r.hosts.is_empty() || r.hosts.iter().any(|h| h.accepts(req.host)))
            && c.tail.as_ref().is_none_or(|t| t.matches(rest))
    }

    /// The first candidate of `g` (in matching order) that accepts the request.
    #[inline]
    fn pick<'g>(&self, g: &'g Group, req: &Request<'_>, rest: &str) -> Option<&'g Candidate> {
        if let (Some(ix), Some(host)) = (&g.host_index, req.host_lower) {
            if let Some(found) = self.pick_indexed(g, ix, host, req, rest) {
                return found;
            }
        }
        g.cands.iter().find(|c| self.accepts(c, req, rest))
    }

    /// Merges the position lists that can accept `host` in ascending order
    /// and checks each candidate once. Returns `None` (meaning: scan
    /// instead) if the host has too many labels to merge on the stack.
    fn pick_indexed<'g>(
        &self,
        g: &'g Group,
        ix: &HostIndex,
        host: &[u8],
        req: &Request<'_>,
        rest: &str,
    ) -> Option<Option<&'g Candidate>> {
        let mut lists: [&[u32]; MAX_LISTS] = [&[]; MAX_LISTS];
        let mut n = 0usize;
        lists[n] = &ix.rest;
        n += 1;
        if let Some(l) = ix.exact.get(host) {
            lists[n] = l;
            n += 1;
        }
        if !ix.suffix.is_empty() {
            for (i, &b) in host.iter().enumerate() {
                if b != b'.' {
                    continue;
                }
                if let Some(l) = ix.suffix.get(&host[i..]) {
                    if n == MAX_LISTS {
                        return None;
                    }
                    lists[n] = l;
                    n += 1;
                }
            }
        }
        let lists = &mut lists[..n];
        loop {
            let mut min = u32::MAX;
            for l in lists.iter() {
                if let Some(&p) = l.first() {
                    min = min.min(p);
                }
            }
            if min == u32::MAX {
                return Some(None);
            }
            for l in lists.iter_mut() {
                if l.first() == Some(&min) {
                    *l = &l[1..];
                }
            }
            let c = &g.cands[min as usize];
            if self.accepts(c, req, rest) {
                return Some(Some(c));
            }
        }
    }
}
