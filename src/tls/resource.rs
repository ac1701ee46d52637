//! The `ssls` resource in APISIX 3.x's shape (`/apisix/admin/ssls/{id}`, `ssls:` in the config
//! file).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::config::Protocols;
use crate::config::Id;

/// What a certificate is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SslType {
    /// Served to clients on the TLS listeners, chosen by SNI.
    #[default]
    Server,
    /// Presented to upstreams that ask for a client certificate (upstream mTLS).
    Client,
}

/// One `ssls` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Ssl {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, rename = "type")]
    pub kind: SslType,
    /// PEM certificate, optionally followed by its intermediates.
    pub cert: String,
    /// PEM private key of `cert`.
    pub key: String,
    /// Extra certificate/key pairs for the same names (e.g. ECDSA beside RSA); the handshake
    /// picks one the client supports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certs: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<String>>,
    /// One server name (APISIX's older form of `snis`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// Server names: exact (`a.example.com`) or one-label wildcards (`*.example.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snis: Option<Vec<String>>,
    /// Client certificate verification (mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<SslClient>,
    /// `1` serves, `0` keeps the entry without serving it.
    #[serde(default = "one")]
    pub status: u8,
    /// Protocol versions for these names; default: the node's `ssl.ssl_protocols`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_protocols: Option<Protocols>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_time: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<u64>,
}

fn one() -> u8 {
    1
}

/// `client`: the CA that client certificates must chain to.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SslClient {
    /// PEM CA certificate(s).
    pub ca: String,
    /// How many CA certificates a client chain may have above the client's own, the trusted
    /// one included (nginx's `ssl_verify_depth`; APISIX's default 1: issued by the CA itself).
    #[serde(default = "one_u32")]
    pub depth: u32,
}

fn one_u32() -> u32 {
    1
}

impl Ssl {
    /// The entry's server names as written (`sni` or `snis`).
    pub fn names(&self) -> Vec<&str> {
        match (&self.snis, &self.sni) {
            (Some(list), _) => list.iter().map(String::as_str).collect(),
            (None, Some(one)) => vec![one.as_str()],
            (None, None) => Vec::new(),
        }
    }

    /// The field `names()` came from, for error paths.
    pub fn names_field(&self) -> &'static str {
        if self.snis.is_some() {
            "snis"
        } else {
            "sni"
        }
    }
}
