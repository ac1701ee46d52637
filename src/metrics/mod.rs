//! Metrics: APISIX's `apisix_*` Prometheus metrics and moongate's own `moongate_*`, and the
//! export server that serves them.
//!
//! Recording happens on the workers with no lock and no allocation once a label set has been
//! seen: each worker keeps its own series in a thread-local map ([`store`]), keyed by a hash
//! of the label values and checked by comparing them, and bumps single-writer atomics. A
//! scrape (on the control runtime) reads every worker's series, merges those with the same
//! labels and encodes the result ([`expose`]) with `prometheus-client`.
//!
//! The node settings are APISIX's `plugin_attr.prometheus` ([`Settings`]); they are read at
//! start-up.

pub mod custom;
pub mod expose;
pub mod http;
pub mod runtime;
pub mod server;
pub mod sources;
pub mod store;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::{from_value_at, ConfigError, NodeConfig};

/// APISIX's default latency buckets, in milliseconds (1 ms to 60 s).
pub const DEFAULT_BUCKETS: [f64; 15] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 30000.0,
    60000.0,
];

/// The request metrics that take `extra_labels`.
pub const LABELLED_METRICS: [&str; 3] = ["http_status", "http_latency", "bandwidth"];

/// `plugin_attr.prometheus`, as APISIX spells it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Attr {
    #[serde(default = "default_export_uri")]
    export_uri: String,
    #[serde(default)]
    export_addr: ExportAddr,
    #[serde(default = "yes")]
    enable_export_server: bool,
    #[serde(default = "default_prefix")]
    metric_prefix: String,
    #[serde(default)]
    metrics: BTreeMap<String, MetricAttr>,
    #[serde(default)]
    default_buckets: Option<Vec<f64>>,
    /// APISIX refreshes a cached exposition this often; moongate reads the live counters on
    /// every scrape, so it is accepted and has no effect.
    #[serde(default)]
    #[allow(dead_code)]
    refresh_interval: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportAddr {
    #[serde(default = "default_ip")]
    ip: String,
    #[serde(default = "default_port")]
    port: u16,
}

impl Default for ExportAddr {
    fn default() -> Self {
        ExportAddr {
            ip: default_ip(),
            port: default_port(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricAttr {
    /// `[{label_name: "$var"}]`: one label per entry, its value `ctx.var[var]` per request.
    #[serde(default)]
    extra_labels: Vec<Map<String, Value>>,
    /// APISIX drops series not updated for this many seconds; accepted, no effect here.
    #[serde(default)]
    #[allow(dead_code)]
    expire: Option<f64>,
}

fn default_export_uri() -> String {
    "/apisix/prometheus/metrics".to_string()
}
fn default_ip() -> String {
    "127.0.0.1".to_string()
}
fn default_port() -> u16 {
    9091
}
fn default_prefix() -> String {
    "apisix_".to_string()
}
fn yes() -> bool {
    true
}

/// One extra label: its name and the `ctx.var` it takes its value from.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtraLabel {
    pub name: String,
    pub var: String,
}

/// The metrics settings in force, from `plugin_attr.prometheus` (defaults when absent).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the export server listens; None when it is off (`enable_export_server: false`
    /// or no `plugin_attr.prometheus` and `prometheus` not named in `plugins`).
    pub export_addr: Option<SocketAddr>,
    pub export_uri: String,
    /// Prefix of APISIX's metric names (`apisix_`).
    pub prefix: String,
    /// Latency bucket bounds in milliseconds, increasing.
    pub buckets: Vec<f64>,
    pub status_labels: Vec<ExtraLabel>,
    pub latency_labels: Vec<ExtraLabel>,
    pub bandwidth_labels: Vec<ExtraLabel>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            export_addr: None,
            export_uri: default_export_uri(),
            prefix: default_prefix(),
            buckets: DEFAULT_BUCKETS.to_vec(),
            status_labels: Vec::new(),
            latency_labels: Vec::new(),
            bandwidth_labels: Vec::new(),
        }
    }
}

const AT: &str = "plugin_attr.prometheus";

/// `apisix_http_status`'s labels, before the extra ones.
pub const STATUS_LABELS: [&str; 7] = [
    "code",
    "route",
    "matched_uri",
    "matched_host",
    "service",
    "consumer",
    "node",
];

/// Built-in label names a request metric has; an extra label may not reuse one.
const BUILTIN_LABELS: [&str; 9] = [
    STATUS_LABELS[0],
    STATUS_LABELS[1],
    STATUS_LABELS[2],
    STATUS_LABELS[3],
    STATUS_LABELS[4],
    STATUS_LABELS[5],
    STATUS_LABELS[6],
    "type",
    "le",
];

impl Settings {
    /// Reads `plugin_attr.prometheus`. The export server runs when that section is present
    /// or the node's `plugins` list names `prometheus` (APISIX runs it whenever the plugin
    /// is enabled; moongate enables every native plugin by default, and a port opened by
    /// default would surprise). Errors name the field.
    pub fn from_node(node: &NodeConfig) -> Result<Settings, ConfigError> {
        let raw = node.plugin_attr.get("prometheus").cloned();
        let named = node
            .plugins
            .as_ref()
            .is_some_and(|p| p.iter().any(|n| n == "prometheus"));
        let enabled_plugin = node
            .plugins
            .as_ref()
            .is_none_or(|p| p.iter().any(|n| n == "prometheus"));
        let present = raw.is_some();
        let attr: Attr = from_value_at(AT, raw.unwrap_or(Value::Object(Map::new())))?;
        let mut s = Settings {
            export_uri: attr.export_uri,
            prefix: attr.metric_prefix,
            ..Settings::default()
        };
        if !s.export_uri.starts_with('/') {
            return Err(ConfigError::new(
                format!("{AT}.export_uri"),
                "must start with /",
            ));
        }
        if !valid_metric_prefix(&s.prefix) {
            return Err(ConfigError::new(
                format!("{AT}.metric_prefix"),
                "must be a metric name prefix: letters, digits, _ and :, not starting with a digit",
            ));
        }
        if let Some(b) = attr.default_buckets {
            if b.is_empty() {
                return Err(ConfigError::new(
                    format!("{AT}.default_buckets"),
                    "must list at least one bucket",
                ));
            }
            for (i, w) in b.windows(2).enumerate() {
                if w[1] <= w[0] {
                    return Err(ConfigError::new(
                        format!("{AT}.default_buckets[{}]", i + 1),
                        "buckets must be increasing",
                    ));
                }
            }
            if b.iter().any(|v| !v.is_finite()) {
                return Err(ConfigError::new(
                    format!("{AT}.default_buckets"),
                    "buckets must be finite numbers",
                ));
            }
            s.buckets = b;
        }
        for (name, m) in &attr.metrics {
            let at = format!("{AT}.metrics.{name}");
            let labels = parse_extra_labels(&at, &m.extra_labels)?;
            match name.as_str() {
                "http_status" => s.status_labels = labels,
                "http_latency" => s.latency_labels = labels,
                "bandwidth" => s.bandwidth_labels = labels,
                // APISIX's other metrics: only `expire` applies to them.
                "upstream_status"
                | "llm_latency"
                | "llm_prompt_tokens"
                | "llm_completion_tokens"
                | "llm_active_connections" => {
                    if !labels.is_empty() {
                        return Err(ConfigError::new(
                            format!("{at}.extra_labels"),
                            format!(
                                "extra labels are supported on {} only",
                                LABELLED_METRICS.join(", ")
                            ),
                        ));
                    }
                }
                _ => {
                    return Err(ConfigError::new(
                        at,
                        format!(
                            "unknown metric; extra labels are supported on {}",
                            LABELLED_METRICS.join(", ")
                        ),
                    ))
                }
            }
        }
        if attr.enable_export_server && enabled_plugin && (present || named) {
            let ip: IpAddr = attr
                .export_addr
                .ip
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .map_err(|_| {
                    ConfigError::new(
                        format!("{AT}.export_addr.ip"),
                        format!("bad address {:?}", attr.export_addr.ip),
                    )
                })?;
            s.export_addr = Some(SocketAddr::new(ip, attr.export_addr.port));
        }
        Ok(s)
    }
}

fn valid_metric_prefix(p: &str) -> bool {
    let mut chars = p.chars();
    match chars.next() {
        None => true,
        Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
            chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        }
        Some(_) => false,
    }
}

fn valid_label_name(n: &str) -> bool {
    let mut chars = n.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !n.starts_with("__")
}

fn parse_extra_labels(
    at: &str,
    items: &[Map<String, Value>],
) -> Result<Vec<ExtraLabel>, ConfigError> {
    let mut out: Vec<ExtraLabel> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("{at}.extra_labels[{i}]");
        let mut entries = item.iter();
        let (Some((name, value)), None) = (entries.next(), entries.next()) else {
            return Err(ConfigError::new(
                at,
                "each extra label is one `name: $variable` pair",
            ));
        };
        let Some(var) = value.as_str().and_then(|v| v.strip_prefix('$')) else {
            return Err(ConfigError::new(
                format!("{at}.{name}"),
                "the value must name a variable, like $upstream_addr",
            ));
        };
        if var.is_empty() {
            return Err(ConfigError::new(
                format!("{at}.{name}"),
                "the value must name a variable, like $upstream_addr",
            ));
        }
        if !valid_label_name(name) {
            return Err(ConfigError::new(
                format!("{at}.{name}"),
                "not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)",
            ));
        }
        if BUILTIN_LABELS.contains(&name.as_str()) || out.iter().any(|l| &l.name == name) {
            return Err(ConfigError::new(
                format!("{at}.{name}"),
                "the metric already has a label of this name",
            ));
        }
        out.push(ExtraLabel {
            name: name.clone(),
            var: var.to_string(),
        });
    }
    Ok(out)
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// Sets the process's metrics settings (once, at start-up, before the workers serve).
pub fn init(settings: Settings) {
    let _ = SETTINGS.set(settings);
}

/// The settings in force (defaults before [`init`]).
pub fn settings() -> &'static Settings {
    SETTINGS.get_or_init(Settings::default)
}

/// Starts the export server when the settings ask for one, on `rt`, serving the request
/// metrics plus `sources`. Logs `prometheus metrics served at http://ADDR/URI`.
pub fn start_export(
    rt: &tokio::runtime::Handle,
    sources: Vec<std::sync::Arc<dyn expose::Source>>,
) -> Result<Option<SocketAddr>, String> {
    let s = settings();
    let Some(addr) = s.export_addr else {
        return Ok(None);
    };
    let handler = server::exporter(s.export_uri.clone(), sources);
    let bound = server::start(rt, addr, handler)
        .map_err(|e| format!("{AT}.export_addr: cannot listen on {addr}: {e}"))?;
    tracing::info!(
        "prometheus metrics served at http://{bound}{}",
        s.export_uri
    );
    Ok(Some(bound))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(yaml: &str) -> NodeConfig {
        crate::config::parse_document(yaml).unwrap().node
    }

    #[test]
    fn defaults_and_when_the_export_server_runs() {
        let s = Settings::from_node(&node("")).unwrap();
        assert_eq!(s.export_addr, None);
        assert_eq!(s.export_uri, "/apisix/prometheus/metrics");
        assert_eq!(s.buckets, DEFAULT_BUCKETS.to_vec());
        let s = Settings::from_node(&node("plugin_attr:\n  prometheus: {}\n")).unwrap();
        assert_eq!(s.export_addr, Some("127.0.0.1:9091".parse().unwrap()));
        let s = Settings::from_node(&node("plugins: [prometheus]\n")).unwrap();
        assert_eq!(s.export_addr, Some("127.0.0.1:9091".parse().unwrap()));
        let s = Settings::from_node(&node(
            "plugins: [openfunction]\nplugin_attr:\n  prometheus: {}\n",
        ))
        .unwrap();
        assert_eq!(s.export_addr, None);
        let s = Settings::from_node(&node(
            "plugin_attr:\n  prometheus: {enable_export_server: false}\n",
        ))
        .unwrap();
        assert_eq!(s.export_addr, None);
    }

    #[test]
    fn extra_labels_and_buckets() {
        let s = Settings::from_node(&node(
            "plugin_attr:\n  prometheus:\n    export_addr: {ip: 127.0.0.2, port: 1}\n    default_buckets: [5, 50]\n    metrics:\n      http_status:\n        extra_labels:\n          - upstream_addr: $upstream_addr\n",
        ))
        .unwrap();
        assert_eq!(s.export_addr, Some("127.0.0.2:1".parse().unwrap()));
        assert_eq!(s.buckets, vec![5.0, 50.0]);
        assert_eq!(
            s.status_labels,
            vec![ExtraLabel {
                name: "upstream_addr".into(),
                var: "upstream_addr".into()
            }]
        );
        let bad = |y: &str| {
            Settings::from_node(&node(&format!("plugin_attr:\n  prometheus:\n{y}")))
                .unwrap_err()
                .to_string()
        };
        assert!(bad("    default_buckets: [5, 5]\n").contains("default_buckets[1]"));
        assert!(
            bad("    metrics: {http_status: {extra_labels: [{code: $x}]}}\n")
                .contains("already has a label")
        );
        assert!(
            bad("    metrics: {http_status: {extra_labels: [{a: x}]}}\n")
                .contains("must name a variable")
        );
        assert!(bad("    metrics: {nope: {}}\n").contains("metrics.nope"));
        assert!(bad("    export_uri: x\n").contains("export_uri"));
        assert!(bad("    export_adr: {}\n").contains("export_adr"));
    }
}
