//! The node settings the resolver reads, with APISIX's names: `dns_resolver`,
//! `resolver_timeout`, `dns_resolver_valid` (top-level keys of the config file).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::NodeConfig;

/// One DNS server of `dns_resolver`: `ip` (port 53) or `ip:port` (`[v6]:port` for IPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DnsServer(pub SocketAddr);

impl TryFrom<String> for DnsServer {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let text = s.trim();
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(DnsServer(SocketAddr::new(ip, 53)));
        }
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(DnsServer(addr));
        }
        if let Some(ip) = text
            .strip_prefix('[')
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse::<IpAddr>().ok())
        {
            return Ok(DnsServer(SocketAddr::new(ip, 53)));
        }
        Err(format!(
            "`{s}` is not a DNS server address: expected `ip` or `ip:port` ([v6]:port for IPv6)"
        ))
    }
}

impl From<DnsServer> for String {
    fn from(s: DnsServer) -> String {
        s.0.to_string()
    }
}

/// `dns_resolver`: at least one server (APISIX's schema has `minItems: 1`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<DnsServer>", into = "Vec<DnsServer>")]
pub struct DnsServers(pub Vec<DnsServer>);

impl TryFrom<Vec<DnsServer>> for DnsServers {
    type Error = String;

    fn try_from(v: Vec<DnsServer>) -> Result<Self, String> {
        if v.is_empty() {
            return Err(
                "expected at least one DNS server; leave dns_resolver out to use /etc/resolv.conf's"
                    .to_string(),
            );
        }
        Ok(DnsServers(v))
    }
}

impl From<DnsServers> for Vec<DnsServer> {
    fn from(s: DnsServers) -> Self {
        s.0
    }
}

/// `resolver_timeout`: seconds one resolution of a name may take, every server and retry
/// included (APISIX's default 5).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct ResolverTimeout(pub f64);

impl Default for ResolverTimeout {
    fn default() -> Self {
        ResolverTimeout(5.0)
    }
}

impl TryFrom<f64> for ResolverTimeout {
    type Error = String;

    fn try_from(v: f64) -> Result<Self, String> {
        if v.is_finite() && v > 0.0 && v <= 3600.0 {
            Ok(ResolverTimeout(v))
        } else {
            Err(format!(
                "expected seconds above 0 and at most 3600, got {v}"
            ))
        }
    }
}

impl From<ResolverTimeout> for f64 {
    fn from(t: ResolverTimeout) -> f64 {
        t.0
    }
}

/// What the resolver runs with, made from the node settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// `dns_resolver`; `None`: the nameservers (and search domains) of /etc/resolv.conf.
    pub servers: Option<Vec<SocketAddr>>,
    /// `resolver_timeout`.
    pub timeout: Duration,
    /// `dns_resolver_valid`: how long every positive answer is kept, instead of its TTL.
    pub valid: Option<Duration>,
    /// `enable_resolv_search_opt`: /etc/resolv.conf's `search` and `domain` apply to names.
    pub search: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            servers: None,
            timeout: Duration::from_secs_f64(ResolverTimeout::default().0),
            valid: None,
            search: true,
        }
    }
}

impl Settings {
    pub fn from_node(node: &NodeConfig) -> Settings {
        Settings {
            servers: node
                .dns_resolver
                .as_ref()
                .map(|s| s.0.iter().map(|d| d.0).collect()),
            timeout: Duration::from_secs_f64(node.resolver_timeout.0),
            valid: node.dns_resolver_valid.map(Duration::from_secs),
            search: node.enable_resolv_search_opt.unwrap_or(true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_forms() {
        let p = |s: &str| DnsServer::try_from(s.to_string()).map(|d| d.0.to_string());
        assert_eq!(p("1.1.1.1").unwrap(), "1.1.1.1:53");
        assert_eq!(p("127.0.0.1:5353").unwrap(), "127.0.0.1:5353");
        assert_eq!(p("::1").unwrap(), "[::1]:53");
        assert_eq!(p("[::1]").unwrap(), "[::1]:53");
        assert_eq!(p("[::1]:5353").unwrap(), "[::1]:5353");
        assert!(p("dns.example.com").is_err());
        assert!(p("1.1.1.1:99999").is_err());
    }

    #[test]
    fn node_settings_with_paths() {
        let doc = crate::config::parse_document(
            "dns_resolver:\n  - 127.0.0.1:5353\n  - 10.0.0.1\nresolver_timeout: 2\ndns_resolver_valid: 30\n",
        )
        .unwrap();
        let s = Settings::from_node(&doc.node);
        assert_eq!(
            s.servers.unwrap(),
            vec![
                "127.0.0.1:5353".parse::<SocketAddr>().unwrap(),
                "10.0.0.1:53".parse().unwrap()
            ]
        );
        assert_eq!(s.timeout, Duration::from_secs(2));
        assert_eq!(s.valid, Some(Duration::from_secs(30)));

        let defaults = crate::config::parse_document("").unwrap();
        assert_eq!(Settings::from_node(&defaults.node), Settings::default());

        let err = crate::config::parse_document("dns_resolver:\n  - 127.0.0.1\n  - nope\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("dns_resolver[1]: `nope` is not a DNS server"),
            "{err}"
        );
        let err = crate::config::parse_document("dns_resolver: []\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("dns_resolver: expected at least one"),
            "{err}"
        );
        let err = crate::config::parse_document("resolver_timeout: 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("resolver_timeout: expected seconds above 0"),
            "{err}"
        );
        let err = crate::config::parse_document("dns_resolver_valid: -1\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("dns_resolver_valid: "), "{err}");
    }
}
