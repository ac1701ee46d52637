//! The node configuration file: node settings plus resources (routes, upstreams, services,
//! global rules, consumers) in APISIX 3.x shapes.
//!
//! Loading is two steps. [`parse_document`] turns YAML or JSON into a [`Document`], collecting
//! one [`ConfigError`] per bad resource with the path of the bad field (so `moongate check`
//! reports every problem at once). Cross-references and plugin confs are checked later, when a
//! snapshot is built (`crate::snapshot`), because they need the plugin registry.

pub mod resources;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use resources::*;

/// One problem in a config, with the path of the field it is about.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// e.g. `routes[1].upstream.nodes`; empty for the document as a whole.
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// A list of problems; displayed one per line.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// `listen`: one address or a list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Listen(pub Vec<SocketAddr>);

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        let list = match OneOrMany::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected an address like \"0.0.0.0:9080\" or a list of them")
        })? {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        };
        let mut out = Vec::with_capacity(list.len());
        for s in list {
            out.push(parse_listen(&s).map_err(serde::de::Error::custom)?);
        }
        if out.is_empty() {
            return Err(serde::de::Error::custom("at least one address is required"));
        }
        Ok(Listen(out))
    }
}

/// Accepts `ip:port`, `[v6]:port` and a bare port (all interfaces).
fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    s.parse()
        .map_err(|_| format!("bad listen address {s:?}: expected \"ip:port\""))
}

impl Default for Listen {
    fn default() -> Self {
        Listen(vec![SocketAddr::from(([0, 0, 0, 0], 9080))])
    }
}

/// One proxy listener address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr {
    pub addr: SocketAddr,
    /// HTTP/2 with prior knowledge (h2c) besides HTTP/1.1 on this plain listener.
    pub enable_http2: bool,
}

impl Serialize for ListenAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(3))?;
        m.serialize_entry("ip", &self.addr.ip().to_string())?;
        m.serialize_entry("port", &self.addr.port())?;
        m.serialize_entry("enable_http2", &self.enable_http2)?;
        m.end()
    }
}

/// The proxy's `listen`: an address (`"127.0.0.1:9080"`, `9080`), or a list of addresses and
/// APISIX's `node_listen` objects `{ip, port, enable_http2}` (`ip` defaults to `0.0.0.0`,
/// `enable_http2` to false).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeListen(pub Vec<ListenAddr>);

impl NodeListen {
    /// The addresses, in order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.0.iter().map(|l| l.addr).collect()
    }
}

impl Default for NodeListen {
    fn default() -> Self {
        NodeListen(vec![ListenAddr {
            addr: SocketAddr::from(([0, 0, 0, 0], 9080)),
            enable_http2: false,
        }])
    }
}

impl<'de> Deserialize<'de> for NodeListen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        listen_items(d, false).map(NodeListen)
    }
}

/// A `listen` value: an address (`"127.0.0.1:9080"`), a port, an `{ip, port, enable_http2}`
/// object, or a list of them. `ip` defaults to `0.0.0.0`, `enable_http2` to `default_http2`
/// (false for plain listeners, true for APISIX's `ssl.listen`).
pub(crate) fn listen_items<'de, D: serde::Deserializer<'de>>(
    d: D,
    default_http2: bool,
) -> Result<Vec<ListenAddr>, D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Object {
        #[serde(default)]
        ip: Option<String>,
        port: u16,
        #[serde(default)]
        enable_http2: Option<bool>,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Item {
        Port(u16),
        Text(String),
        Object(Object),
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(Item),
        Many(Vec<Item>),
    }
    let items = match OneOrMany::deserialize(d).map_err(|_| {
        serde::de::Error::custom(
            "expected an address like \"0.0.0.0:9080\", a port, {ip, port, enable_http2}, or a list of them",
        )
    })? {
        OneOrMany::One(i) => vec![i],
        OneOrMany::Many(v) => v,
    };
    let mut out = Vec::with_capacity(items.len());
    for (n, item) in items.into_iter().enumerate() {
        let l = match item {
            Item::Port(port) => ListenAddr {
                addr: SocketAddr::from(([0, 0, 0, 0], port)),
                enable_http2: default_http2,
            },
            Item::Text(s) => ListenAddr {
                addr: parse_listen(&s).map_err(serde::de::Error::custom)?,
                enable_http2: default_http2,
            },
            Item::Object(o) => {
                let ip = o.ip.as_deref().unwrap_or("0.0.0.0");
                let ip: std::net::IpAddr = ip
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse()
                    .map_err(|_| {
                        serde::de::Error::custom(format!(
                            "[{n}].ip: bad address {ip:?}: expected an IPv4 or IPv6 address"
                        ))
                    })?;
                ListenAddr {
                    addr: SocketAddr::new(ip, o.port),
                    enable_http2: o.enable_http2.unwrap_or(default_http2),
                }
            }
        };
        out.push(l);
    }
    if out.is_empty() {
        return Err(serde::de::Error::custom("at least one address is required"));
    }
    Ok(out)
}

/// `admin`: the Admin API listener.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_listen")]
    pub listen: Listen,
    /// The `X-API-KEY` value; `MOONGATE_ADMIN_KEY` overrides it.
    #[serde(default)]
    pub key: Option<String>,
    /// Seconds a request body may go without sending data before the request is answered 408
    /// (nginx's `client_body_timeout`).
    #[serde(default = "default_admin_body_timeout")]
    pub client_body_timeout: f64,
}

fn default_admin_listen() -> Listen {
    Listen(vec![SocketAddr::from(([127, 0, 0, 1], 9180))])
}

fn default_admin_body_timeout() -> f64 {
    10.0
}

/// Limits and timeouts of the client side of the proxy.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Seconds a client has to send the request header (nginx's `client_header_timeout`).
    #[serde(default = "sixty")]
    pub client_header_timeout: f64,
    /// Largest request header block in bytes; a larger one gets 431.
    #[serde(default = "default_max_header")]
    pub client_header_buffer_size: usize,
    /// Largest request body in bytes; a larger one gets 413. 0 means unlimited (APISIX's default).
    #[serde(default)]
    pub client_max_body_size: u64,
    /// nginx's `client_body_buffer_size`: a request body up to this many bytes that streams
    /// to the upstream is also kept in memory until the request ends, when a Lua plugin in
    /// effect has a log phase (`ngx.req.get_body_data()` there, the loggers'
    /// `include_req_body`, data-mask). 0 keeps none.
    #[serde(default = "default_body_buffer")]
    pub client_body_buffer_size: usize,
    /// Seconds in-flight requests get to finish on SIGTERM/Ctrl-C before the process exits.
    #[serde(default = "default_shutdown")]
    pub graceful_shutdown_timeout: f64,
}

fn sixty() -> f64 {
    60.0
}
fn default_max_header() -> usize {
    // nginx's large_client_header_buffers default is 4 x 8k.
    32 * 1024
}
fn default_body_buffer() -> usize {
    // nginx's default on 64-bit platforms (two pages).
    16 * 1024
}
fn default_shutdown() -> f64 {
    30.0
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            client_header_timeout: sixty(),
            client_header_buffer_size: default_max_header(),
            client_max_body_size: 0,
            client_body_buffer_size: default_body_buffer(),
            graceful_shutdown_timeout: default_shutdown(),
        }
    }
}

/// Settings of the Lua plugin runtime.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LuaConfig {
    /// Milliseconds of CPU one plugin call may run before it is stopped (its request gets 500).
    #[serde(default = "default_lua_budget")]
    pub call_budget_ms: u64,
    /// Memory cap per worker VM, in MiB.
    #[serde(default = "default_lua_memory")]
    pub memory_limit_mb: usize,
    /// `ngx.shared` dictionaries in addition to (or resizing) the built-in ones: name -> size
    /// (`"10m"`, `"512k"`), like nginx's `lua_shared_dict`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub shared_dicts: std::collections::BTreeMap<String, ShmSize>,
    /// Module search patterns (`/opt/lua/?.lua`) searched before the system's, like nginx's
    /// `lua_package_path` and APISIX's `extra_lua_path`. Relative ones are relative to the
    /// config file's folder.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub package_path: Vec<LuaPathPattern>,
    /// C module search patterns (`/opt/lua/?.so`) searched before the system's, like nginx's
    /// `lua_package_cpath` and APISIX's `extra_lua_cpath`. Relative ones are relative to the
    /// config file's folder.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub package_cpath: Vec<LuaPathPattern>,
    /// Shared libraries loaded into each VM's FFI global namespace (`ffi.load(name, true)`)
    /// before plugins load, so `ffi.C.NAME` finds their functions as it finds OpenSSL's inside
    /// OpenResty's nginx (lua-resty-ldap's ASN.1 coder, lua-resty-openssl). One that does not
    /// load is skipped with a warning.
    #[serde(default = "default_ffi_global_libraries")]
    pub ffi_global_libraries: Vec<String>,
}

fn default_ffi_global_libraries() -> Vec<String> {
    vec!["libcrypto.so.3".to_string()]
}

/// One `package.path` pattern: a path with `?` where the module name (dots made slashes) goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct LuaPathPattern(pub String);

impl<'de> Deserialize<'de> for LuaPathPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if !s.contains('?') {
            return Err(serde::de::Error::custom(format!(
                "\"{s}\" has no \"?\" where the module name goes (e.g. \"/opt/lua/?.lua\")"
            )));
        }
        if s.contains(';') {
            return Err(serde::de::Error::custom(format!(
                "\"{s}\": give one pattern per list item instead of \";\"-separated ones"
            )));
        }
        Ok(LuaPathPattern(s))
    }
}

/// A shared dictionary's size in bytes, written as nginx sizes are: a number of bytes with an
/// optional `k` or `m` suffix (`"10m"`, `"512k"`, `65536`). At least 8k, as nginx requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShmSize(pub usize);

impl ShmSize {
    /// The smallest zone nginx accepts.
    pub const MIN: usize = 8 * 1024;

    /// Parses `"10m"`, `"512k"`, `"65536"`.
    pub fn parse(s: &str) -> Result<ShmSize, String> {
        let t = s.trim();
        let (digits, unit) = match t.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c.to_ascii_lowercase()),
            _ => (t, 'b'),
        };
        let mult: usize = match unit {
            'b' => 1,
            'k' => 1024,
            'm' => 1024 * 1024,
            _ => {
                return Err(format!(
                    "invalid size {s:?}: use a number of bytes with k or m"
                ))
            }
        };
        let n: usize = digits
            .parse()
            .map_err(|_| format!("invalid size {s:?}: use a number of bytes with k or m"))?;
        let bytes = n
            .checked_mul(mult)
            .ok_or_else(|| format!("size {s:?} is too large"))?;
        if bytes < Self::MIN {
            return Err(format!("size {s:?} is too small: at least 8k"));
        }
        Ok(ShmSize(bytes))
    }
}

impl<'de> Deserialize<'de> for ShmSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        let s = match Raw::deserialize(d)? {
            Raw::N(n) => n.to_string(),
            Raw::S(s) => s,
        };
        ShmSize::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for ShmSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 % (1024 * 1024) == 0 {
            s.serialize_str(&format!("{}m", self.0 / (1024 * 1024)))
        } else if self.0 % 1024 == 0 {
            s.serialize_str(&format!("{}k", self.0 / 1024))
        } else {
            s.serialize_u64(self.0 as u64)
        }
    }
}

fn default_lua_budget() -> u64 {
    1000
}
fn default_lua_memory() -> usize {
    256
}

impl Default for LuaConfig {
    fn default() -> Self {
        LuaConfig {
            call_budget_ms: default_lua_budget(),
            memory_limit_mb: default_lua_memory(),
            shared_dicts: Default::default(),
            package_path: Vec::new(),
            package_cpath: Vec::new(),
            ffi_global_libraries: default_ffi_global_libraries(),
        }
    }
}

/// `config_provider`: where the resources written through the Admin API live.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ConfigProvider {
    /// One redb file under `data_dir`: a single node.
    #[default]
    Embedded,
    /// An etcd cluster in APISIX's key layout, shared by every node (see docs/deployment.md).
    Etcd,
}

/// `etcd`: the cluster a `config_provider: etcd` node reads, watches and writes.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs, `http://127.0.0.1:2379` or `https://...`; `host` is accepted as in APISIX.
    #[serde(alias = "host")]
    pub endpoints: Vec<String>,
    /// Key prefix of every resource, as APISIX's `etcd.prefix`.
    #[serde(default = "default_etcd_prefix")]
    pub prefix: String,
    /// Seconds one etcd request may take before the next endpoint is tried.
    #[serde(default = "default_etcd_timeout")]
    pub timeout: f64,
    /// etcd user for authentication (with `password`).
    #[serde(default)]
    pub user: Option<String>,
    /// Password of `user`.
    #[serde(default)]
    pub password: Option<String>,
    /// TLS settings for `https://` endpoints.
    #[serde(default)]
    pub tls: Option<EtcdTls>,
}

/// `etcd.tls`: how `https://` endpoints are verified (always verified).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    /// A PEM file of CA certificates trusted besides the Mozilla roots (a private CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_etcd_prefix() -> String {
    "/apisix".to_string()
}
fn default_etcd_timeout() -> f64 {
    30.0
}

/// Node settings: everything in the file that is not a resource.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    #[serde(default)]
    pub listen: NodeListen,
    /// Worker threads; default: number of cores.
    #[serde(default)]
    pub workers: Option<usize>,
    /// Folders searched for `NAME.lua` plugins, relative to the config file.
    #[serde(default = "default_plugin_dirs")]
    pub plugin_dirs: Vec<PathBuf>,
    /// Enabled plugin names; default: every native plugin and every Lua plugin found.
    #[serde(default)]
    pub plugins: Option<Vec<String>>,
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Where Admin API resources live: the embedded store (default) or etcd.
    #[serde(default)]
    pub config_provider: ConfigProvider,
    /// The etcd cluster, for `config_provider: etcd`.
    #[serde(default)]
    pub etcd: Option<EtcdConfig>,
    /// Log level filter (`info`, `debug`, `moongate=debug,info`, ...); `RUST_LOG` overrides it.
    #[serde(default)]
    pub log_level: Option<String>,
    /// moongate's one-line summary per request on stderr (default true), when
    /// `nginx_config.http` sets no access log of its own.
    #[serde(default = "yes")]
    pub access_log: bool,
    /// APISIX's `nginx_config`: the access log (`nginx_config.http.access_log`, ...).
    #[serde(default)]
    pub nginx_config: crate::accesslog::NginxConfig,
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub lua: LuaConfig,
    /// Per-plugin node attributes, APISIX's `plugin_attr`.
    #[serde(default)]
    pub plugin_attr: Map<String, Value>,
    /// APISIX's top-level `ext-plugin` settings, handed to Lua's `local_conf()` as written
    /// (`path_for_test`: the unix socket of a plugin runner started beside the gateway).
    #[serde(
        default,
        rename = "ext-plugin",
        skip_serializing_if = "Option::is_none"
    )]
    pub ext_plugin: Option<Map<String, Value>>,
    /// Serve APISIX's control API (`/v1/healthcheck`) on `control` (default true, as APISIX).
    #[serde(default = "yes")]
    pub enable_control: bool,
    /// The control API's address, APISIX's `control: {ip, port}`.
    #[serde(default)]
    pub control: ControlConfig,
    /// APISIX's status API (`/status`, `/status/ready`), `status: {ip, port}`; off when absent.
    #[serde(default)]
    pub status: Option<crate::status::StatusConfig>,
    /// TLS listeners and their settings, APISIX's `apisix.ssl` (see docs/tls.md).
    #[serde(default)]
    pub ssl: Option<crate::tls::SslNodeConfig>,
    /// APISIX's `apisix.data_encryption`: the keyring `ssls` keys are stored encrypted with.
    #[serde(default)]
    pub data_encryption: Option<crate::tls::DataEncryption>,
    /// DNS servers for host names in upstream nodes and the like (`ip` or `ip:port`);
    /// default: /etc/resolv.conf's nameservers (see `crate::dns`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_resolver: Option<crate::dns::DnsServers>,
    /// Seconds one resolution may take (default 5).
    #[serde(default)]
    pub resolver_timeout: crate::dns::ResolverTimeout,
    /// Seconds every positive DNS answer is kept, instead of its TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_resolver_valid: Option<u64>,
    /// /etc/resolv.conf's `search` and `domain` apply to host names (unset: true, as APISIX).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_resolv_search_opt: Option<bool>,
}

impl NodeConfig {
    /// The `data_encryption.keyring` (empty when unset).
    pub fn keyring(&self) -> crate::tls::Keyring {
        self.data_encryption
            .as_ref()
            .map(|d| d.keyring.clone())
            .unwrap_or_default()
    }
}

/// `control`: where the control API listens (APISIX's default 127.0.0.1:9090).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    #[serde(default = "default_control_ip")]
    pub ip: std::net::IpAddr,
    #[serde(default = "default_control_port")]
    pub port: u16,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            ip: default_control_ip(),
            port: default_control_port(),
        }
    }
}

impl ControlConfig {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }
}

fn default_control_ip() -> std::net::IpAddr {
    std::net::IpAddr::from([127, 0, 0, 1])
}

fn default_control_port() -> u16 {
    9090
}

fn yes() -> bool {
    true
}

fn default_plugin_dirs() -> Vec<PathBuf> {
    vec![PathBuf::from("plugins")]
}

/// A whole config file, parsed.
#[derive(Debug, Clone, Default)]
pub struct Document {
    pub node: NodeConfig,
    pub routes: Vec<Route>,
    pub upstreams: Vec<Upstream>,
    pub services: Vec<Service>,
    pub global_rules: Vec<GlobalRule>,
    pub consumers: Vec<Consumer>,
    pub consumer_groups: Vec<ConsumerGroup>,
    /// Consumer credentials: in a config file, `consumers:` items whose `id` reads
    /// `USERNAME/credentials/ID` (APISIX's standalone form).
    pub credentials: Vec<Credential>,
    /// Plugin metadata (`plugin_metadata:`), one per plugin name.
    pub plugin_metadata: Vec<PluginMetadataConf>,
    /// Certificates (`ssls:`), APISIX's `/apisix/ssls`.
    pub ssls: Vec<crate::tls::Ssl>,
    /// The file it came from (for reload and error messages), if any.
    pub path: Option<PathBuf>,
    /// A hash of the file's text as it was parsed: reload compares what a snapshot was built
    /// from with what is on disk by it (0 when the document did not come from a file).
    pub source_hash: u64,
}

const RESOURCE_KEYS: [&str; 8] = [
    "routes",
    "upstreams",
    "services",
    "global_rules",
    "consumers",
    "consumer_groups",
    "plugin_metadata",
    "ssls",
];

/// The hash reload compares file texts by (`Document::source_hash`, `Plugin::source_digest`).
pub fn text_hash(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// Reads and parses a config file (YAML, or JSON, which YAML accepts too).
pub fn load_file(path: &Path) -> Result<Document, ConfigErrors> {
    load_partial(path)?.into_document()
}

/// Reads a config file and parses as much of it as parses ([`Partial`]). Only a file that
/// cannot be read, or text that is not YAML/JSON (`FILE:LINE:COLUMN: message`), is an `Err`.
pub fn load_partial(path: &Path) -> Result<Partial, ConfigErrors> {
    let text = read_text(path)?;
    partial_from_text(path, &text)
}

/// A config file's text, for [`document_from_text`].
pub fn read_text(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError::new(
            "",
            format!("cannot read {}: {e}", path.display()),
        )])
    })
}

/// [`load_file`] on text already read from `path`.
pub fn document_from_text(path: &Path, text: &str) -> Result<Document, ConfigErrors> {
    partial_from_text(path, text)?.into_document()
}

fn partial_from_text(path: &Path, text: &str) -> Result<Partial, ConfigErrors> {
    let mut partial = parse_partial(text, Some(path))?;
    partial.doc.source_hash = text_hash(text);
    let base = path.parent().unwrap_or(Path::new("."));
    let base = if base.as_os_str().is_empty() {
        Path::new(".")
    } else {
        base
    };
    resolve_paths(&mut partial.doc.node, base);
    partial.doc.path = Some(path.to_path_buf());
    Ok(partial)
}

/// Makes the file's relative paths relative to the folder the file is in.
fn resolve_paths(node: &mut NodeConfig, base: &Path) {
    for pat in node
        .lua
        .package_path
        .iter_mut()
        .chain(node.lua.package_cpath.iter_mut())
    {
        if Path::new(&pat.0).is_relative() {
            pat.0 = base.join(&pat.0).to_string_lossy().into_owned();
        }
    }
    for dir in &mut node.plugin_dirs {
        if dir.is_relative() {
            *dir = base.join(&*dir);
        }
    }
    if let Some(ca) = node
        .etcd
        .as_mut()
        .and_then(|e| e.tls.as_mut())
        .and_then(|t| t.ca_file.as_mut())
    {
        if ca.is_relative() {
            *ca = base.join(&*ca);
        }
    }
    if let Some(list) = node
        .ssl
        .as_mut()
        .and_then(|s| s.ssl_trusted_certificate.as_mut())
    {
        // `system, ca.pem`: each file item relative to the config file.
        let items: Vec<String> = list
            .split(',')
            .map(|item| {
                let item = item.trim();
                if item == "system" || item.is_empty() || Path::new(item).is_absolute() {
                    item.to_string()
                } else {
                    base.join(item).to_string_lossy().into_owned()
                }
            })
            .collect();
        *list = items.join(", ");
    }
    crate::accesslog::resolve_path(&mut node.nginx_config.http, base);
    crate::errorlog::resolve_path(&mut node.nginx_config.error_log, base);
    if let Some(d) = &mut node.data_dir {
        if d.is_relative() {
            *d = base.join(&*d);
        }
    }
}

/// A config text parsed as far as it goes: every resource and node setting that parsed, the
/// problems of the rest, and where each parsed resource sits in the text. `moongate check`
/// builds what parsed, so a typo in one route does not hide a problem in another.
#[derive(Debug, Clone, Default)]
pub struct Partial {
    /// What parsed; node settings that did not parse have their defaults.
    pub doc: Document,
    /// One per resource or node setting that did not parse, in the text's order per list.
    pub errors: Vec<ConfigError>,
    /// The text's top-level keys, in its order.
    pub keys: Vec<String>,
    /// Per list of `doc` (`routes`, ..., `credentials`), the index in the text of each parsed
    /// item: `doc.routes[i]` is the text's `routes[origin["routes"][i]]`.
    pub origin: HashMap<&'static str, Vec<usize>>,
    /// Per list, the ids (for `consumers`, the usernames) of the items that did not parse.
    pub unparsed: HashMap<&'static str, HashSet<String>>,
    /// The top-level node settings that did not parse.
    pub unparsed_node: Vec<String>,
}

impl Partial {
    /// The whole document, or every problem found.
    pub fn into_document(self) -> Result<Document, ConfigErrors> {
        if self.errors.is_empty() {
            Ok(self.doc)
        } else {
            Err(ConfigErrors(self.errors))
        }
    }

    /// `path` as the text has it: a path into `doc` (`routes[1].plugins.x`, `credentials[0]`)
    /// with the item's index in the text (`routes[2].plugins.x`, `consumers[3]`).
    pub fn text_path(&self, path: &str) -> String {
        let Some((list, rest)) = path.split_once('[') else {
            return path.to_string();
        };
        let Some((index, tail)) = rest.split_once(']') else {
            return path.to_string();
        };
        let (Some((key, origin)), Ok(i)) =
            (self.origin.get_key_value(list), index.parse::<usize>())
        else {
            return path.to_string();
        };
        match origin.get(i) {
            Some(at) => format!("{}[{at}]{tail}", text_list(key)),
            None => path.to_string(),
        }
    }

    /// Whether the list `list` of the text had an item with this id that did not parse.
    pub fn unparsed(&self, list: &str, id: &str) -> bool {
        self.unparsed.get(list).is_some_and(|ids| ids.contains(id))
    }
}

/// The text's list a list of [`Document`] comes from (credentials are `consumers:` items).
fn text_list(list: &'static str) -> &'static str {
    match list {
        "credentials" => "consumers",
        other => other,
    }
}

/// The top-level key a path is under: `routes` for `routes[1].uri`, `admin` for `admin.key`.
pub fn top_key(path: &str) -> &str {
    let end = path.find(['.', '[']).unwrap_or(path.len());
    &path[..end]
}

/// Parses config text, collecting every problem with its path.
pub fn parse_document(text: &str) -> Result<Document, ConfigErrors> {
    parse_partial(text, None)?.into_document()
}

/// The text as a JSON value. A syntax error is `FILE:LINE:COLUMN: message` when the file is
/// known.
fn parse_text(text: &str, file: Option<&Path>) -> Result<Value, ConfigError> {
    if text.trim().is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    serde_yaml_ng::from_str(text).map_err(|e| match (file, e.location()) {
        (Some(file), Some(at)) => {
            let full = e.to_string();
            let mark = format!(" at line {} column {}", at.line(), at.column());
            ConfigError::new(
                format!("{}:{}:{}", file.display(), at.line(), at.column()),
                full.replacen(&mark, "", 1),
            )
        }
        (Some(file), None) => ConfigError::new(file.display().to_string(), e.to_string()),
        (None, _) => ConfigError::new("", format!("not valid YAML/JSON: {e}")),
    })
}

/// Parses config text as far as it goes (see [`Partial`]). Only text that is not YAML/JSON or
/// not a mapping is an `Err`.
pub fn parse_partial(text: &str, file: Option<&Path>) -> Result<Partial, ConfigErrors> {
    let value = parse_text(text, file).map_err(|e| ConfigErrors(vec![e]))?;
    let Value::Object(mut top) = value else {
        return Err(ConfigErrors(vec![ConfigError::new(
            "",
            "the config must be a mapping of settings",
        )]));
    };
    let mut p = Partial {
        keys: top.keys().cloned().collect(),
        ..Partial::default()
    };

    let mut take_list = |key: &str, errors: &mut Vec<ConfigError>| -> Vec<Value> {
        match top.shift_remove(key) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items,
            Some(_) => {
                errors.push(ConfigError::new(key, "expected a list of resources"));
                Vec::new()
            }
        }
    };
    let routes = take_list("routes", &mut p.errors);
    let upstreams = take_list("upstreams", &mut p.errors);
    let services = take_list("services", &mut p.errors);
    let global_rules = take_list("global_rules", &mut p.errors);
    let consumers = take_list("consumers", &mut p.errors);
    let consumer_groups = take_list("consumer_groups", &mut p.errors);
    let plugin_metadata = take_list("plugin_metadata", &mut p.errors);
    let ssls = take_list("ssls", &mut p.errors);

    p.doc.routes = parse_list("routes", routes, &mut p);
    p.doc.upstreams = parse_list("upstreams", upstreams, &mut p);
    p.doc.services = parse_list("services", services, &mut p);
    p.doc.global_rules = parse_list("global_rules", global_rules, &mut p);
    // A `consumers:` item whose id reads `USERNAME/credentials/ID` is a credential.
    for (i, item) in consumers.into_iter().enumerate() {
        let is_credential = item
            .get("id")
            .and_then(Value::as_str)
            .is_some_and(|id| id.contains("/credentials/"));
        let at = format!("consumers[{i}]");
        if is_credential {
            match from_value_at::<Credential>(&at, item) {
                Ok(c) => {
                    p.doc.credentials.push(c);
                    p.origin.entry("credentials").or_default().push(i);
                }
                Err(e) => p.errors.push(e),
            }
        } else {
            let username = id_of(&item, "username");
            match from_value_at::<Consumer>(&at, item) {
                Ok(c) => {
                    p.doc.consumers.push(c);
                    p.origin.entry("consumers").or_default().push(i);
                }
                Err(e) => {
                    p.errors.push(e);
                    if let Some(name) = username {
                        p.unparsed.entry("consumers").or_default().insert(name);
                    }
                }
            }
        }
    }
    p.doc.consumer_groups = parse_list("consumer_groups", consumer_groups, &mut p);
    p.doc.plugin_metadata = parse_list("plugin_metadata", plugin_metadata, &mut p);
    p.doc.ssls = parse_list("ssls", ssls, &mut p);
    // Node settings: a setting that does not parse is reported and left at its default, and
    // the rest are parsed again without it, so every bad setting is found in one pass.
    loop {
        match from_value_at::<NodeConfig>("", Value::Object(top.clone())) {
            Ok(node) => {
                p.doc.node = node;
                break;
            }
            Err(e) => {
                let key = top_key(&e.path).to_string();
                p.errors.push(e);
                if top.shift_remove(&key).is_none() {
                    break;
                }
                p.unparsed_node.push(key);
            }
        }
    }
    Ok(p)
}

/// An item's id (or other key field) as the text has it, if it is a string or a number.
fn id_of(item: &Value, field: &str) -> Option<String> {
    match item.get(field)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn parse_list<T: DeserializeOwned>(
    key: &'static str,
    items: Vec<Value>,
    p: &mut Partial,
) -> Vec<T> {
    debug_assert!(RESOURCE_KEYS.contains(&key));
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let id = id_of(&item, "id");
        match from_value_at::<T>(&format!("{key}[{i}]"), item) {
            Ok(v) => {
                out.push(v);
                p.origin.entry(key).or_default().push(i);
            }
            Err(e) => {
                p.errors.push(e);
                if let Some(id) = id {
                    p.unparsed.entry(key).or_default().insert(id);
                }
            }
        }
    }
    out
}

/// Deserializes `value`, reporting the path of the bad field below `prefix`.
pub fn from_value_at<T: DeserializeOwned>(prefix: &str, value: Value) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.path().to_string();
        let path = match (prefix.is_empty(), inner == ".") {
            (true, _) => inner,
            (false, true) => prefix.to_string(),
            (false, false) if inner.starts_with('[') => format!("{prefix}{inner}"),
            (false, false) => format!("{prefix}.{inner}"),
        };
        let path = if path == "." { String::new() } else { path };
        ConfigError::new(path, e.into_inner().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_nodes_named_by_path() {
        let err = parse_document(
            "routes:\n  - id: 1\n    uri: /a\n  - id: 2\n    uri: /b\n    upstream:\n      nodes: \"x\"\n",
        )
        .unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert_eq!(err.0[0].path, "routes[1].upstream.nodes");
        assert!(err.0[0]
            .message
            .starts_with("expected a map of \"host:port\" to weight"));
    }

    #[test]
    fn unknown_field_is_an_error() {
        let err = parse_document("routes:\n  - id: 1\n    urii: /a\n").unwrap_err();
        assert_eq!(err.0[0].path, "routes[0].urii");
        assert!(err.0[0].message.contains("unknown field `urii`"), "{}", err);
        let err = parse_document("listne: 1\n").unwrap_err();
        assert_eq!(err.0[0].path, "listne");
    }

    #[test]
    fn collects_every_problem() {
        let err = parse_document(
            "routes:\n  - uri: 5\n  - uri: /b\n    priority: x\nupstreams:\n  - nodes: {}\n    type: maglev\n",
        )
        .unwrap_err();
        let paths: Vec<_> = err.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["routes[0].uri", "routes[1].priority", "upstreams[0].type"]
        );
    }

    #[test]
    fn listen_forms() {
        let d = parse_document("listen: 127.0.0.1:9080\n").unwrap();
        assert_eq!(d.node.listen.0.len(), 1);
        let d = parse_document("listen: [\"127.0.0.1:1\", \"[::1]:2\"]\n").unwrap();
        assert_eq!(d.node.listen.0.len(), 2);
        assert!(parse_document("listen: nowhere\n").is_err());
        // APISIX's node_listen forms: a port, and objects beside strings.
        let d = parse_document(
            "listen:\n  - 9080\n  - \"127.0.0.1:9081\"\n  - {ip: 127.0.0.2, port: 9082, enable_http2: true}\n  - port: 9083\n",
        )
        .unwrap();
        let l = &d.node.listen.0;
        assert_eq!(l.len(), 4);
        assert_eq!(l[0].addr, "0.0.0.0:9080".parse().unwrap());
        assert!(!l[0].enable_http2 && !l[1].enable_http2);
        assert_eq!(l[2].addr, "127.0.0.2:9082".parse().unwrap());
        assert!(l[2].enable_http2);
        assert_eq!(l[3].addr, "0.0.0.0:9083".parse().unwrap());
        assert!(!l[3].enable_http2);
        let d = parse_document("listen: [{ip: \"::1\", port: 1, enable_http2: true}]\n").unwrap();
        assert_eq!(d.node.listen.0[0].addr, "[::1]:1".parse().unwrap());
        // A bad object is refused with the field's path.
        let e = parse_document(
            "listen: [{ip: 127.0.0.1, port: 1, enable_http2: true}, {ip: nowhere, port: 2}]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("listen") && e.contains("[1].ip") && e.contains("nowhere"),
            "{e}"
        );
        let e = parse_document("listen: [{ip: 127.0.0.1, port: 1, http2: true}]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen"), "{e}");
    }

    #[test]
    fn a_partial_parse_keeps_what_parses_and_maps_paths_back() {
        let p = parse_partial(
            "routes:\n  - id: a\n    urii: /x\n  - id: b\n    uri: /b\nconsumers:\n  - username: 5x\n    plugins: 1\n  - username: u\n  - id: u/credentials/c\n    plugins: {}\nworkers: x\nlistne: 1\n",
            None,
        )
        .unwrap();
        assert_eq!(p.doc.routes.len(), 1);
        assert_eq!(p.text_path("routes[0].plugins.x"), "routes[1].plugins.x");
        assert_eq!(p.text_path("credentials[0].id"), "consumers[2].id");
        assert_eq!(p.text_path("consumers[0]"), "consumers[1]");
        assert_eq!(p.text_path("admin.key"), "admin.key");
        assert!(p.unparsed("routes", "a") && !p.unparsed("routes", "b"));
        assert!(p.unparsed("consumers", "5x"));
        // Both bad node settings are found; the rest keep their defaults.
        assert_eq!(p.unparsed_node, ["workers", "listne"]);
        let paths: Vec<_> = p.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "routes[0].urii",
                "consumers[0].plugins",
                "workers",
                "listne"
            ]
        );
        assert_eq!(p.keys, ["routes", "consumers", "workers", "listne"]);
    }

    #[test]
    fn a_syntax_error_names_the_file() {
        let e = parse_partial("a: [1\n", Some(Path::new("conf/x.yaml"))).unwrap_err();
        assert!(e.0[0].path.starts_with("conf/x.yaml:2:1"), "{e}");
        let e = parse_partial("a: [1\n", None).unwrap_err();
        assert!(e.0[0].message.starts_with("not valid YAML/JSON: "), "{e}");
    }

    #[test]
    fn json_is_accepted() {
        let d = parse_document(
            r#"{"routes":[{"id":"r","uri":"/x","upstream":{"nodes":{"127.0.0.1:80":1}}}]}"#,
        )
        .unwrap();
        assert_eq!(d.routes[0].uri.as_deref(), Some("/x"));
    }
}
