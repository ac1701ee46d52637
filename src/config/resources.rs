//! Resource shapes: routes, upstreams, services, global rules, consumers and plugin metadata,
//! with APISIX 3.x field names.
//!
//! Every struct denies unknown fields: a typo in a config file or an Admin API body must be an
//! error that names the field, never a setting that silently does nothing.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A resource id. APISIX accepts ids as strings or integers; both become strings here.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Id(pub String);

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct IdVisitor;
        impl Visitor<'_> for IdVisitor {
            type Value = Id;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or integer id")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Id, E> {
                validate_id(v).map_err(E::custom)?;
                Ok(Id(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Id, E> {
                Ok(Id(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Id, E> {
                if v < 0 {
                    return Err(E::custom("id must not be negative"));
                }
                Ok(Id(v.to_string()))
            }
        }
        d.deserialize_any(IdVisitor)
    }
}

/// APISIX's id rule: 1 to 64 characters of `a-zA-Z0-9-_.`.
pub fn validate_id(v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > 64 {
        return Err(format!("id must be 1 to 64 characters, got {}", v.len()));
    }
    if !v
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(format!(
            "id {v:?} may only contain letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn default_status() -> u8 {
    1
}

/// A route, as APISIX's `/apisix/admin/routes/{id}` body.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Route {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uris: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<Method>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    #[serde(default)]
    pub priority: i64,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub plugins: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<Upstream>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_id: Option<Id>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_id: Option<Id>,
    #[serde(default = "default_status")]
    pub status: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Timeout>,
    /// APISIX's `enable_websocket`: an `Upgrade: websocket` request is proxied with its upgrade
    /// headers and, on the upstream's 101, tunnelled. Unset: the service's setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_websocket: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_time: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<u64>,
}

/// HTTP methods APISIX accepts in `methods`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Method {
    GET,
    POST,
    PUT,
    DELETE,
    PATCH,
    HEAD,
    OPTIONS,
    CONNECT,
    TRACE,
    PURGE,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::GET => "GET",
            Method::POST => "POST",
            Method::PUT => "PUT",
            Method::DELETE => "DELETE",
            Method::PATCH => "PATCH",
            Method::HEAD => "HEAD",
            Method::OPTIONS => "OPTIONS",
            Method::CONNECT => "CONNECT",
            Method::TRACE => "TRACE",
            Method::PURGE => "PURGE",
        }
    }
}

/// Upstream timeouts in seconds, as APISIX's `timeout` object.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Timeout {
    pub connect: f64,
    pub send: f64,
    pub read: f64,
}

impl Default for Timeout {
    /// APISIX's (nginx's) defaults: 60 s each.
    fn default() -> Self {
        Timeout {
            connect: 60.0,
            send: 60.0,
            read: 60.0,
        }
    }
}

/// Load-balancing algorithm, APISIX's upstream `type` (`src/balancer/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BalancerType {
    /// Weighted round-robin.
    #[default]
    Roundrobin,
    /// Consistent hashing on `hash_on` / `key`.
    Chash,
    /// Fewest in-flight requests per unit of weight.
    LeastConn,
    /// Lowest decayed response time of two random nodes.
    Ewma,
}

impl BalancerType {
    pub fn as_str(self) -> &'static str {
        match self {
            BalancerType::Roundrobin => "roundrobin",
            BalancerType::Chash => "chash",
            BalancerType::LeastConn => "least_conn",
            BalancerType::Ewma => "ewma",
        }
    }
}

/// What `chash` hashes (APISIX's `hash_on`; `key` names the variable, header or cookie).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum HashOn {
    /// An nginx variable named by `key` (`uri`, `remote_addr`, `arg_NAME`, ...).
    #[default]
    Vars,
    /// The request header `key`.
    Header,
    /// The cookie `key`.
    Cookie,
    /// The consumer an auth plugin identified (`key` unused).
    Consumer,
    /// `key` is a template of variables, `$remote_addr-${http_x_user}`.
    VarsCombinations,
}

impl HashOn {
    pub fn as_str(self) -> &'static str {
        match self {
            HashOn::Vars => "vars",
            HashOn::Header => "header",
            HashOn::Cookie => "cookie",
            HashOn::Consumer => "consumer",
            HashOn::VarsCombinations => "vars_combinations",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    #[default]
    Http,
    Https,
    /// gRPC: HTTP/2 with prior knowledge.
    Grpc,
    /// gRPC over TLS: HTTP/2 chosen by ALPN.
    Grpcs,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
            Scheme::Grpc => "grpc",
            Scheme::Grpcs => "grpcs",
        }
    }
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http | Scheme::Grpc => 80,
            Scheme::Https | Scheme::Grpcs => 443,
        }
    }
    /// The upstream is reached over TLS.
    pub fn is_tls(self) -> bool {
        matches!(self, Scheme::Https | Scheme::Grpcs)
    }
    /// The upstream speaks HTTP/2 (gRPC).
    pub fn is_http2(self) -> bool {
        matches!(self, Scheme::Grpc | Scheme::Grpcs)
    }
}

/// How the upstream request's Host header is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PassHost {
    /// The client's Host header.
    #[default]
    Pass,
    /// The picked node's host (and port when not the scheme's default).
    Node,
    /// The upstream's `upstream_host`.
    Rewrite,
}

/// One upstream node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    pub host: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub weight: u32,
    /// APISIX's node `priority` (list form only; default 0): nodes of a lower priority take
    /// traffic only when every node of the higher ones is unhealthy or failed for the request.
    pub priority: i64,
}

/// `nodes`: either `{"host:port": weight}` or `[{"host": .., "port": .., "weight": ..}]`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Nodes(pub Vec<Node>);

const NODES_EXPECTED: &str =
    "expected a map of \"host:port\" to weight, or a list of {host, port, weight}";

impl Serialize for Nodes {
    /// The map form, unless a node has a priority (which only the list form can carry).
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        if self.0.iter().any(|n| n.priority != 0) {
            return s.collect_seq(&self.0);
        }
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for n in &self.0 {
            let key = match n.port {
                Some(p) if n.host.contains(':') => format!("[{}]:{p}", n.host),
                Some(p) => format!("{}:{p}", n.host),
                None => n.host.clone(),
            };
            m.serialize_entry(&key, &n.weight)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Nodes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct NodesVisitor;
        impl<'de> Visitor<'de> for NodesVisitor {
            type Value = Nodes;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                // serde prefixes this with "expected ".
                f.write_str(NODES_EXPECTED.trim_start_matches("expected "))
            }
            // Scalars get the plain message (not serde's "invalid type: ..."), so `check`
            // prints `...nodes: expected a map of "host:port" to weight, ...`.
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Nodes, E> {
                Err(E::custom(NODES_EXPECTED))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Nodes, E> {
                Err(E::custom(NODES_EXPECTED))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Nodes, E> {
                Err(E::custom(NODES_EXPECTED))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Nodes, E> {
                Err(E::custom(NODES_EXPECTED))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Nodes, E> {
                Err(E::custom(NODES_EXPECTED))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Nodes, E> {
                Err(E::custom(NODES_EXPECTED))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Nodes, A::Error> {
                let mut out = Vec::new();
                while let Some((key, weight)) = map.next_entry::<String, Value>()? {
                    let weight = weight
                        .as_u64()
                        .and_then(|w| u32::try_from(w).ok())
                        .ok_or_else(|| de::Error::custom(NODES_EXPECTED))?;
                    let (host, port) = parse_host_port(&key).map_err(de::Error::custom)?;
                    out.push(Node {
                        host,
                        port,
                        weight,
                        priority: 0,
                    });
                }
                Ok(Nodes(out))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Nodes, A::Error> {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct ListNode {
                    host: String,
                    #[serde(default)]
                    port: Option<u16>,
                    #[serde(default = "one")]
                    weight: u32,
                    #[serde(default)]
                    priority: i64,
                }
                fn one() -> u32 {
                    1
                }
                let mut out = Vec::new();
                while let Some(n) = seq.next_element::<ListNode>()? {
                    if n.host.is_empty() {
                        return Err(de::Error::custom("node host must not be empty"));
                    }
                    out.push(Node {
                        host: n.host,
                        port: n.port,
                        weight: n.weight,
                        priority: n.priority,
                    });
                }
                Ok(Nodes(out))
            }
        }
        d.deserialize_any(NodesVisitor)
    }
}

/// Splits `host:port`, `host`, `[v6]:port` or `[v6]`.
pub fn parse_host_port(s: &str) -> Result<(String, Option<u16>), String> {
    let bad = || format!("bad node address {s:?}: {NODES_EXPECTED}");
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(bad)?
                    .parse()
                    .map_err(|_| bad())?,
            ),
        };
        return Ok((host.to_string(), port));
    }
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains(':') => {
            Ok((host.to_string(), Some(port.parse().map_err(|_| bad())?)))
        }
        Some(_) => Err(bad()),
        None if !s.is_empty() => Ok((s.to_string(), None)),
        None => Err(bad()),
    }
}

/// Upstream connection-pool settings, APISIX's `keepalive_pool`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeepalivePool {
    /// Idle connections kept per node.
    #[serde(default = "default_pool_size")]
    pub size: usize,
    /// Seconds an idle connection is kept.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: f64,
    /// Requests served on one connection before it is closed.
    #[serde(default = "default_pool_requests")]
    pub requests: u64,
}

fn default_pool_size() -> usize {
    320
}
fn default_idle_timeout() -> f64 {
    60.0
}
fn default_pool_requests() -> u64 {
    1000
}

impl Default for KeepalivePool {
    fn default() -> Self {
        KeepalivePool {
            size: default_pool_size(),
            idle_timeout: default_idle_timeout(),
            requests: default_pool_requests(),
        }
    }
}

/// Upstream TLS settings (APISIX's upstream `tls`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// Verify the upstream's certificate (default false, as APISIX).
    #[serde(default)]
    pub verify: bool,
    /// PEM certificate (and intermediates) presented to the upstream when it asks for one;
    /// needs `client_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<String>,
    /// PEM private key of `client_cert`, or the key encrypted with `data_encryption.keyring`
    /// (as the Admin API stores it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<String>,
    /// The id of an `ssls` entry of `type: client` whose certificate is presented instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_id: Option<Id>,
}

/// An upstream, as APISIX's `/apisix/admin/upstreams/{id}` body.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(rename = "type", default)]
    pub kind: BalancerType,
    pub nodes: Nodes,
    #[serde(default)]
    pub scheme: Scheme,
    #[serde(default)]
    pub pass_host: PassHost,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Timeout>,
    /// `chash`: what is hashed (default `vars`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<HashOn>,
    /// `chash`: the variable, header or cookie name, or the `vars_combinations` template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Tries after the first on another node (connect errors, timeouts and failures before
    /// any response byte); default: number of nodes - 1 (as APISIX).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// Seconds after the first try's start past which no retry starts (0: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_timeout: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_pool: Option<KeepalivePool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
    /// Health checks (`src/health/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checks: Option<crate::health::Checks>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_time: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<u64>,
}

/// A service: plugins and an upstream shared by routes that name it in `service_id`.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Service {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub plugins: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<Upstream>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_id: Option<Id>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    /// APISIX's `enable_websocket`, for the service's routes that do not set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_websocket: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_time: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<u64>,
}

/// A global rule: plugins that run for every request, before the route's.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GlobalRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
    #[serde(default)]
    pub plugins: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_time: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<u64>,
}

/// A consumer, as APISIX 3.x's `/apisix/admin/consumers/{username}` body: who a request is,
/// once an auth plugin has recognised its credential.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Consumer {
    /// The consumer's name, which is its id (APISIX's `username`).
    pub username: Id,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desc: Option<String>,
    /// Free labels; `custom_id` becomes the upstream header `X-Consumer-Custom-ID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Auth plugin confs (checked with the plugin's consumer schema) and other plugins.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub plugins: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<Id>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_time: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<u64>,
}

/// A consumer group, as APISIX 3.x's `/apisix/admin/consumer_groups/{id}` body: plugins shared
/// by the consumers whose `group_id` names it (a consumer's own conf of a plugin wins).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerGroup {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    pub plugins: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_time: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<u64>,
}

/// A consumer credential (APISIX 3.8+): one auth plugin conf that identifies its consumer, as
/// `/apisix/admin/consumers/{username}/credentials/{id}` holds it. `id` is the whole
/// `USERNAME/credentials/ID`, the form APISIX's standalone file uses in its `consumers:` list.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    #[serde(deserialize_with = "credential_id")]
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub plugins: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_time: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<u64>,
}

impl Credential {
    /// The consumer's username and the credential's own id.
    pub fn split_id(&self) -> (&str, &str) {
        split_credential_id(&self.id).unwrap_or((&self.id, ""))
    }
}

/// `USERNAME/credentials/ID` -> (username, id); None when the id has another shape.
pub fn split_credential_id(id: &str) -> Option<(&str, &str)> {
    let (user, cred) = id.split_once("/credentials/")?;
    Some((user, cred))
}

/// Checks a credential id of the form `USERNAME/credentials/ID`.
pub fn validate_credential_id(id: &str) -> Result<(), String> {
    let Some((user, cred)) = split_credential_id(id) else {
        return Err(format!(
            "credential id {id:?} must read USERNAME/credentials/ID"
        ));
    };
    validate_id(user).map_err(|e| format!("consumer name: {e}"))?;
    validate_id(cred)
}

fn credential_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    validate_credential_id(&s).map_err(serde::de::Error::custom)?;
    Ok(s)
}

/// Plugin metadata, as APISIX's `/apisix/admin/plugin_metadata/{plugin name}` body: a
/// node-wide conf of one plugin, checked against the plugin's `metadata_schema`. In a config
/// file (as in APISIX's standalone `apisix.yaml`) the plugin name is `id`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PluginMetadataConf {
    /// The plugin's name.
    pub id: Id,
    /// The metadata conf (every other field).
    #[serde(flatten)]
    pub conf: Map<String, Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(
            parse_host_port("127.0.0.1:80").unwrap(),
            ("127.0.0.1".into(), Some(80))
        );
        assert_eq!(
            parse_host_port("example.com").unwrap(),
            ("example.com".into(), None)
        );
        assert_eq!(
            parse_host_port("[::1]:8080").unwrap(),
            ("::1".into(), Some(8080))
        );
        assert!(parse_host_port("a:b").is_err());
        assert!(parse_host_port("").is_err());
        assert!(parse_host_port(":80").is_err());
    }

    #[test]
    fn nodes_both_shapes() {
        let n: Nodes = serde_json::from_str(r#"{"127.0.0.1:1980": 2}"#).unwrap();
        assert_eq!(n.0[0].weight, 2);
        let n: Nodes =
            serde_json::from_str(r#"[{"host":"127.0.0.1","port":1980,"weight":3}]"#).unwrap();
        assert_eq!(n.0[0].port, Some(1980));
        assert!(serde_json::from_str::<Nodes>(r#""127.0.0.1""#).is_err());
    }

    #[test]
    fn ids() {
        assert!(validate_id("a/b").is_err());
        assert!(validate_id(&"x".repeat(65)).is_err());
        let id: Id = serde_json::from_str("12").unwrap();
        assert_eq!(id.0, "12");
    }
}
