//! The node config's `ssl` block (APISIX's `apisix.ssl`): TLS listeners and the settings they
//! serve with.

use serde::{Deserialize, Serialize};

use crate::config::{listen_items, ListenAddr};

/// `ssl:` in the node config.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SslNodeConfig {
    /// APISIX's switch; `false` keeps the block but binds no TLS listener.
    #[serde(default = "yes")]
    pub enable: bool,
    /// TLS listeners (default: `0.0.0.0:9443` with HTTP/2).
    #[serde(default = "default_listen")]
    pub listen: SslListen,
    /// Protocol versions offered when an `ssls` entry names none: `"TLSv1.2 TLSv1.3"` (APISIX's
    /// string form) or a list.
    #[serde(default)]
    pub ssl_protocols: Protocols,
    /// Stateless session tickets besides the session cache (APISIX's default: off).
    #[serde(default)]
    pub ssl_session_tickets: bool,
    /// The server name whose certificate serves a client that sent no SNI, or one no `ssls`
    /// entry matches.
    #[serde(default)]
    pub fallback_sni: Option<String>,
    /// The CA certificates outgoing TLS connections trust when they verify the server
    /// (upstreams, health checks, openfunction, Lua cosockets, etcd): a comma-separated list
    /// of `system` (the default: the operating system's CA bundle) and PEM files, relative to
    /// the config file. See [`super::trust`].
    #[serde(default)]
    pub ssl_trusted_certificate: Option<String>,
}

fn yes() -> bool {
    true
}

fn default_listen() -> SslListen {
    SslListen(vec![ListenAddr {
        addr: std::net::SocketAddr::from(([0, 0, 0, 0], 9443)),
        enable_http2: true,
    }])
}

impl Default for SslNodeConfig {
    fn default() -> Self {
        SslNodeConfig {
            enable: true,
            listen: default_listen(),
            ssl_protocols: Protocols::default(),
            ssl_session_tickets: false,
            fallback_sni: None,
            ssl_trusted_certificate: None,
        }
    }
}

impl SslNodeConfig {
    /// The TLS listeners to bind (none when `enable` is false).
    pub fn listeners(&self) -> &[ListenAddr] {
        if self.enable {
            &self.listen.0
        } else {
            &[]
        }
    }
}

/// `ssl.listen`: as the plain `listen`, with `enable_http2` on unless set to false.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SslListen(pub Vec<ListenAddr>);

impl<'de> Deserialize<'de> for SslListen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        listen_items(d, true).map(SslListen)
    }
}

/// A TLS protocol version moongate serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    Tls12,
    Tls13,
}

impl Protocol {
    /// APISIX's (OpenSSL's) name.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tls12 => "TLSv1.2",
            Protocol::Tls13 => "TLSv1.3",
        }
    }
}

/// A set of protocol versions, parsed from APISIX's names. `TLSv1.1` is accepted and left out
/// (rustls does not speak it); a set that is left empty is an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protocols(pub Vec<Protocol>);

impl Default for Protocols {
    fn default() -> Self {
        Protocols(vec![Protocol::Tls12, Protocol::Tls13])
    }
}

impl Protocols {
    /// Parses names (`TLSv1.2`, `TLSv1.3`, `TLSv1.1`).
    pub fn parse<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Protocols, String> {
        let mut out = Vec::new();
        let mut seen_any = false;
        for name in names {
            seen_any = true;
            let p = match name {
                "TLSv1.2" => Protocol::Tls12,
                "TLSv1.3" => Protocol::Tls13,
                "TLSv1.1" | "TLSv1" => continue,
                other => {
                    return Err(format!(
                        "unknown protocol {other:?}: expected TLSv1.2 or TLSv1.3"
                    ))
                }
            };
            if !out.contains(&p) {
                out.push(p);
            }
        }
        if out.is_empty() {
            return Err(if seen_any {
                "no supported protocol: moongate serves TLSv1.2 and TLSv1.3".to_string()
            } else {
                "at least one protocol is required".to_string()
            });
        }
        out.sort();
        Ok(Protocols(out))
    }
}

impl<'de> Deserialize<'de> for Protocols {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            List(Vec<String>),
        }
        let raw = Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected \"TLSv1.2 TLSv1.3\" or a list of protocol names")
        })?;
        match raw {
            Raw::Text(s) => Protocols::parse(s.split_whitespace()),
            Raw::List(v) => Protocols::parse(v.iter().map(String::as_str)),
        }
        .map_err(serde::de::Error::custom)
    }
}

impl Serialize for Protocols {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|p| p.name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apisix_forms() {
        let d = crate::config::parse_document(
            "ssl:\n  listen:\n    - port: 9443\n    - {ip: 127.0.0.1, port: 9444, enable_http2: false}\n  ssl_protocols: TLSv1.2 TLSv1.3\n  fallback_sni: a.test\n",
        )
        .unwrap();
        let ssl = d.node.ssl.unwrap();
        assert_eq!(ssl.listen.0[0].addr, "0.0.0.0:9443".parse().unwrap());
        assert!(ssl.listen.0[0].enable_http2);
        assert!(!ssl.listen.0[1].enable_http2);
        assert_eq!(ssl.ssl_protocols.0, [Protocol::Tls12, Protocol::Tls13]);
        assert!(!ssl.ssl_session_tickets);
        assert_eq!(ssl.fallback_sni.as_deref(), Some("a.test"));
        let d = crate::config::parse_document("ssl: {ssl_protocols: [TLSv1.3]}\n").unwrap();
        let ssl = d.node.ssl.unwrap();
        assert_eq!(ssl.ssl_protocols.0, [Protocol::Tls13]);
        assert_eq!(ssl.listeners()[0].addr.port(), 9443);
        let e = crate::config::parse_document("ssl: {ssl_protocols: TLSv1.1}\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("ssl.ssl_protocols: no supported protocol"),
            "{e}"
        );
        let e = crate::config::parse_document("ssl: {listen: [{port: 1, enable_http3: true}]}\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("ssl.listen"), "{e}");
    }
}
