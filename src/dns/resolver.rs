//! One lookup of one name, on hickory-resolver: the hosts file first, then the DNS servers
//! (`dns_resolver`, else /etc/resolv.conf's), bounded by `resolver_timeout`. hickory's own
//! cache is off: the answers are cached, refreshed and shared by [`super::cache`].

use std::net::IpAddr;
use std::time::{Duration, Instant};

use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfigGroup, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::TokioResolver;

use super::Settings;

/// A name's addresses and how long they may be used.
#[derive(Debug, Clone)]
pub(super) struct Answer {
    pub addrs: Vec<IpAddr>,
    pub ttl: Duration,
}

/// Why a lookup gave no address.
#[derive(Debug, Clone)]
pub(super) enum Failure {
    /// The DNS says the name has no address (NXDOMAIN, or no A/AAAA record): believed at once.
    Gone(String),
    /// No usable answer (timeout, SERVFAIL, REFUSED, network error): the last good answer
    /// may be kept a while.
    Transient(String),
}

impl Failure {
    pub fn text(&self) -> &str {
        match self {
            Failure::Gone(t) | Failure::Transient(t) => t,
        }
    }
}

pub(super) struct Resolver {
    inner: Result<TokioResolver, String>,
    timeout: Duration,
}

impl Resolver {
    /// Built on the DNS thread's runtime (hickory's connections run where it is used).
    pub fn new(settings: &Settings) -> Resolver {
        // /etc/resolv.conf gives the servers when dns_resolver is not set, and its search
        // domains and ndots either way (as APISIX's client reads them).
        let system = hickory_resolver::system_conf::read_system_conf();
        let (config, mut opts) = match (&settings.servers, system) {
            (Some(servers), system) => {
                let mut group = NameServerConfigGroup::new();
                for s in servers {
                    group.merge(NameServerConfigGroup::from_ips_clear(
                        &[s.ip()],
                        s.port(),
                        true,
                    ));
                }
                match system {
                    Ok((c, o)) => (
                        ResolverConfig::from_parts(c.domain().cloned(), c.search().to_vec(), group),
                        o,
                    ),
                    Err(_) => (
                        ResolverConfig::from_parts(None, Vec::new(), group),
                        ResolverOpts::default(),
                    ),
                }
            }
            (None, Ok(c)) => c,
            (None, Err(e)) => {
                tracing::error!(
                    "DNS: cannot read /etc/resolv.conf ({e}) and dns_resolver is not set: \
                     host names in upstreams will not resolve"
                );
                return Resolver {
                    inner: Err(format!("no DNS server: /etc/resolv.conf: {e}")),
                    timeout: settings.timeout,
                };
            }
        };
        let config = if settings.search {
            config
        } else {
            ResolverConfig::from_parts(None, Vec::new(), config.name_servers().to_vec())
        };
        // Each query gets half the budget, so a lost datagram is asked again once within it.
        opts.timeout = (settings.timeout / 2).max(Duration::from_millis(50));
        opts.attempts = 1;
        // A records first, AAAA when there is none (APISIX's order: A, then AAAA).
        opts.ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
        opts.cache_size = 0;
        // As APISIX: the hosts file (read once, at start) answers before any DNS server.
        opts.use_hosts_file = ResolveHosts::Always;
        let inner = TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
            .with_options(opts)
            .build();
        Resolver {
            inner: Ok(inner),
            timeout: settings.timeout,
        }
    }

    /// The addresses of `host` (IPv4 first, IPv6 when it has no IPv4 address).
    pub async fn lookup(&self, host: &str) -> Result<Answer, Failure> {
        let resolver = self
            .inner
            .as_ref()
            .map_err(|e| Failure::Transient(e.clone()))?;
        let started = Instant::now();
        let found = match tokio::time::timeout(self.timeout, resolver.lookup_ip(host)).await {
            Err(_) => return Err(Failure::Transient("DNS query timed out".to_string())),
            Ok(r) => r,
        };
        match found {
            Ok(lookup) => {
                let addrs: Vec<IpAddr> = lookup.iter().collect();
                if addrs.is_empty() {
                    return Err(Failure::Gone("no A/AAAA record".to_string()));
                }
                let ttl = lookup.valid_until().saturating_duration_since(started);
                Ok(Answer { addrs, ttl })
            }
            Err(e) if e.is_nx_domain() => Err(Failure::Gone("no such name (NXDOMAIN)".into())),
            Err(e) if e.is_no_records_found() => Err(Failure::Gone("no A/AAAA record".into())),
            Err(e) => Err(Failure::Transient(describe(&e))),
        }
    }
}

/// hickory's error text, shortened where it is a timeout.
fn describe(e: &hickory_resolver::ResolveError) -> String {
    let text = e.to_string();
    if text.contains("timed out") {
        "DNS query timed out".to_string()
    } else {
        text
    }
}
