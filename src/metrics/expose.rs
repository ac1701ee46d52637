//! A scrape: every worker's series merged by label set, and the process-wide gauges, encoded
//! in Prometheus' text format (APISIX's) or OpenMetrics (when the client asks for it).
//!
//! The encoding is `prometheus-client`'s OpenMetrics encoder. APISIX's counters have no
//! `_total` suffix (`apisix_http_status`), which OpenMetrics would add to the sample name and
//! so rename the series dashboards query; in OpenMetrics they are typed `unknown`, which
//! keeps the sample name. The classic text format is the same text with the `# EOF` line
//! dropped and `unknown` written as `counter` for those families.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::store::{self, Labels};
use super::{settings, ExtraLabel};

/// What kind of metric a family is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One sample's value.
#[derive(Debug, Clone)]
pub enum Value {
    Int(u64),
    Float(f64),
    /// Counts per bucket (not cumulative, the last is `+Inf`) and the sum.
    Hist(Vec<u64>, f64),
}

/// One metric family, ready to encode.
#[derive(Debug, Clone)]
pub struct Family {
    /// The full name (`apisix_http_status`, `moongate_config_reloads_total`).
    pub name: String,
    pub help: String,
    pub kind: Kind,
    pub label_names: Vec<String>,
    pub samples: Vec<(Vec<String>, Value)>,
    /// A histogram's bucket bounds when they are not the latency buckets
    /// (`plugin_attr.prometheus.default_buckets`).
    pub bounds: Option<Vec<f64>>,
}

impl Family {
    pub fn new(name: impl Into<String>, help: &str, kind: Kind, label_names: &[&str]) -> Self {
        Family {
            name: name.into(),
            help: help.to_string(),
            kind,
            label_names: label_names.iter().map(|s| s.to_string()).collect(),
            samples: Vec::new(),
            bounds: None,
        }
    }

    /// Adds a sample; `labels` in the order of `label_names`.
    pub fn push(&mut self, labels: Vec<String>, value: Value) {
        self.samples.push((labels, value));
    }
}

/// Something outside the request path that contributes families to a scrape (the gateway's
/// config state, etcd, Lua, pools).
pub trait Source: Send + Sync {
    fn collect(&self, out: &mut Vec<Family>);
}

fn names(extra: &[ExtraLabel]) -> impl Iterator<Item = &str> {
    extra.iter().map(|l| l.name.as_str())
}

/// The request families (`apisix_http_status`, `_http_latency`, `_bandwidth`) and the
/// connection gauges, merged over every worker's shard.
pub fn request_families(out: &mut Vec<Family>) {
    let s = settings();
    let p = &s.prefix;
    let shards = store::all_shards();

    let mut status: BTreeMap<Labels, u64> = BTreeMap::new();
    let nlat = s.latency_labels.len();
    let nb = s.buckets.len() + 1;
    // (type, labels) -> (bucket counts, sum)
    type Merged = BTreeMap<(usize, Vec<Box<str>>), (Vec<u64>, f64)>;
    let mut latency: Merged = BTreeMap::new();
    let mut bandwidth: BTreeMap<(usize, Vec<Box<str>>), u64> = BTreeMap::new();
    let (mut accepted, mut active, mut writing, mut requests) = (0u64, 0u64, 0u64, 0u64);
    for shard in &shards {
        for series in store::lock(&shard.status).iter() {
            *status.entry(series.labels.clone()).or_default() += series.count.get();
        }
        for series in store::lock(&shard.requests).iter() {
            let l = &series.labels;
            let lat_labels: Vec<Box<str>> = l[..(4 + nlat).min(l.len())].to_vec();
            let mut bw_labels: Vec<Box<str>> = l[..4.min(l.len())].to_vec();
            bw_labels.extend(l[(4 + nlat).min(l.len())..].iter().cloned());
            for (t, h) in series.latency.iter().enumerate() {
                let e = latency
                    .entry((t, lat_labels.clone()))
                    .or_insert_with(|| (vec![0; nb], 0.0));
                e.1 += h.add_into(&mut e.0);
            }
            *bandwidth.entry((0, bw_labels.clone())).or_default() += series.ingress.get();
            *bandwidth.entry((1, bw_labels)).or_default() += series.egress.get();
        }
        let c = &shard.conns;
        accepted += c.accepted.get();
        active = active.wrapping_add(c.active.get());
        writing = writing.wrapping_add(c.writing.get());
        requests += c.requests.get();
    }

    let mut f = Family::new(
        format!("{p}bandwidth"),
        "Total bandwidth in bytes consumed per service in APISIX",
        Kind::Counter,
        &["type", "route", "service", "consumer", "node"],
    );
    f.label_names
        .extend(names(&s.bandwidth_labels).map(String::from));
    for ((t, labels), v) in bandwidth {
        let mut l = vec![if t == 0 { "ingress" } else { "egress" }.to_string()];
        l.extend(labels.iter().map(|v| v.to_string()));
        f.push(l, Value::Int(v));
    }
    out.push(f);

    let mut f = Family::new(
        format!("{p}http_latency"),
        "HTTP request latency in milliseconds per service in APISIX",
        Kind::Histogram,
        &["type", "route", "service", "consumer", "node"],
    );
    f.label_names
        .extend(names(&s.latency_labels).map(String::from));
    for ((t, labels), (counts, sum)) in latency {
        // A request without an upstream answer has no upstream latency: no empty series.
        if counts.iter().all(|c| *c == 0) {
            continue;
        }
        let mut l = vec![["request", "upstream", "apisix"][t].to_string()];
        l.extend(labels.iter().map(|v| v.to_string()));
        f.push(l, Value::Hist(counts, sum));
    }
    out.push(f);

    let mut f = Family::new(
        format!("{p}http_requests_total"),
        "The total number of client requests since APISIX started",
        Kind::Gauge,
        &[],
    );
    f.push(Vec::new(), Value::Int(requests));
    out.push(f);

    let mut f = Family::new(
        format!("{p}http_status"),
        "HTTP status codes per service in APISIX",
        Kind::Counter,
        &super::STATUS_LABELS,
    );
    f.label_names
        .extend(names(&s.status_labels).map(String::from));
    for (labels, v) in status {
        f.push(
            labels.iter().map(|v| v.to_string()).collect(),
            Value::Int(v),
        );
    }
    out.push(f);

    let mut f = Family::new(
        format!("{p}nginx_http_current_connections"),
        "Number of HTTP connections",
        Kind::Gauge,
        &["state"],
    );
    let active = active as i64;
    let writing = (writing as i64).min(active);
    for (state, v) in [
        ("accepted", accepted as i64),
        ("active", active),
        ("handled", accepted as i64),
        ("waiting", (active - writing).max(0)),
        ("writing", writing.max(0)),
    ] {
        f.push(vec![state.to_string()], Value::Int(v.max(0) as u64));
    }
    out.push(f);
}

/// The process-wide gauges every node has: node info and the shared dictionaries.
pub fn node_families(out: &mut Vec<Family>) {
    let p = &settings().prefix;
    let mut f = Family::new(
        format!("{p}node_info"),
        "Info of APISIX node",
        Kind::Gauge,
        &["hostname", "version"],
    );
    f.push(
        vec![hostname(), env!("CARGO_PKG_VERSION").to_string()],
        Value::Int(1),
    );
    out.push(f);
    let dicts = crate::plugin::lua::shared_dict::all();
    let mut cap = Family::new(
        format!("{p}shared_dict_capacity_bytes"),
        "The capacity of each nginx shared DICT since APISIX start",
        Kind::Gauge,
        &["name"],
    );
    let mut free = Family::new(
        format!("{p}shared_dict_free_space_bytes"),
        "The free space of each nginx shared DICT since APISIX start",
        Kind::Gauge,
        &["name"],
    );
    for (name, d) in dicts {
        cap.push(vec![name.clone()], Value::Int(d.capacity() as u64));
        free.push(vec![name], Value::Int(d.free_space() as u64));
    }
    out.push(cap);
    out.push(free);
}

/// The host's name (APISIX's `core.utils.gethostname`).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer it is given.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Every family of a scrape: the request metrics, node gauges and each source's.
pub fn gather(sources: &[Arc<dyn Source>]) -> Vec<Family> {
    let mut out = Vec::new();
    request_families(&mut out);
    node_families(&mut out);
    for s in sources {
        s.collect(&mut out);
    }
    super::custom::families(&settings().prefix, &mut out);
    out.retain(|f| !f.samples.is_empty() || f.kind != Kind::Histogram);
    // Stable: of two families with one name, the gateway's own (pushed first) stays.
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out.dedup_by(|later, first| later.name == first.name);
    out
}

#[derive(Debug)]
struct Families(Vec<Family>);

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            let (name, ty) = match f.kind {
                Kind::Counter => match f.name.strip_suffix("_total") {
                    Some(base) => (base, MetricType::Counter),
                    None => (f.name.as_str(), MetricType::Unknown),
                },
                Kind::Gauge => (f.name.as_str(), MetricType::Gauge),
                Kind::Histogram => (f.name.as_str(), MetricType::Histogram),
            };
            let mut metric = encoder.encode_descriptor(name, &f.help, None, ty)?;
            for (values, value) in &f.samples {
                let labels: Vec<(&str, &str)> = f
                    .label_names
                    .iter()
                    .map(String::as_str)
                    .zip(values.iter().map(String::as_str))
                    .collect();
                // A family without labels encodes its one sample with no `{}`.
                let bounds = f.bounds.as_deref().unwrap_or(&settings().buckets);
                if labels.is_empty() {
                    encode_value(&mut metric, value, ty, bounds)?;
                } else {
                    encode_value(&mut metric.encode_family(&labels)?, value, ty, bounds)?;
                }
            }
        }
        Ok(())
    }
}

fn encode_value(
    m: &mut MetricEncoder,
    value: &Value,
    ty: MetricType,
    bounds: &[f64],
) -> Result<(), std::fmt::Error> {
    match (value, ty) {
        (Value::Int(v), MetricType::Counter) => m.encode_counter::<NoLabelSet, _, u64>(v, None),
        (Value::Int(v), _) => m.encode_gauge(v),
        (Value::Float(v), MetricType::Counter) => m.encode_counter::<NoLabelSet, _, u64>(v, None),
        (Value::Float(v), _) => m.encode_gauge(v),
        (Value::Hist(counts, sum), _) => {
            let buckets: Vec<(f64, u64)> = counts
                .iter()
                .enumerate()
                .map(|(i, c)| (bounds.get(i).copied().unwrap_or(f64::MAX), *c))
                .collect();
            let count = counts.iter().sum();
            m.encode_histogram::<NoLabelSet>(*sum, count, &buckets, None)
        }
    }
}

/// The content type of the text format APISIX serves.
pub const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// OpenMetrics' content type.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether an `Accept` header asks for OpenMetrics (Prometheus sends it with a higher q than
/// the text format when it can read both).
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    let Some(accept) = accept else { return false };
    let mut best: Option<(f32, bool)> = None;
    for item in accept.split(',') {
        let mut parts = item.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        let om = match media.as_str() {
            "application/openmetrics-text" => true,
            "text/plain" | "*/*" | "text/*" => false,
            _ => continue,
        };
        if q > 0.0 && best.is_none_or(|(bq, _)| q > bq) {
            best = Some((q, om));
        }
    }
    best.is_some_and(|(_, om)| om)
}

/// Encodes families in OpenMetrics, or in the classic text format.
pub fn encode(families: Vec<Family>, openmetrics: bool) -> String {
    let classic_counters: Vec<String> = families
        .iter()
        .filter(|f| f.kind == Kind::Counter && !f.name.ends_with("_total"))
        .map(|f| f.name.clone())
        .collect();
    let total_counters: Vec<String> = families
        .iter()
        .filter(|f| f.kind == Kind::Counter && f.name.ends_with("_total"))
        .map(|f| f.name.clone())
        .collect();
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Families(families)));
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
        tracing::error!("encoding the metrics failed");
    }
    if openmetrics {
        return text;
    }
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line == "# EOF" {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap_or((rest, ""));
            let full = format!("{name}_total");
            let ty = match ty {
                "unknown" if classic_counters.iter().any(|c| c == name) => "counter",
                "unknown" => "untyped",
                t => t,
            };
            let name = if ty == "counter" && total_counters.contains(&full) {
                full.as_str()
            } else {
                name
            };
            let _ = writeln!(out, "# TYPE {name} {ty}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let full = format!("{name}_total");
            let name = if total_counters.contains(&full) {
                full.as_str()
            } else {
                name
            };
            let _ = writeln!(out, "# HELP {name} {help}");
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_negotiation() {
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1"
        )));
        assert!(!wants_openmetrics(Some(
            "application/openmetrics-text;q=0.2,text/plain;q=0.5"
        )));
    }

    #[test]
    fn both_formats_keep_apisix_names() {
        let fam = || {
            let mut c = Family::new("apisix_http_status", "h", Kind::Counter, &["code"]);
            c.push(vec!["200".into()], Value::Int(3));
            let mut t = Family::new("moongate_config_reloads_total", "r", Kind::Counter, &[]);
            t.push(vec![], Value::Int(2));
            let mut h = Family::new("apisix_http_latency", "l", Kind::Histogram, &["type"]);
            h.push(vec!["request".into()], Value::Hist(vec![1; 16], 7.5));
            vec![c, t, h]
        };
        let text = encode(fam(), false);
        assert!(
            text.contains("# TYPE apisix_http_status counter\n"),
            "{text}"
        );
        assert!(
            text.contains("apisix_http_status{code=\"200\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE moongate_config_reloads_total counter\n"),
            "{text}"
        );
        assert!(text.contains("moongate_config_reloads_total 2\n"), "{text}");
        assert!(
            text.contains("apisix_http_latency_count{type=\"request\"} 16\n"),
            "{text}"
        );
        assert!(
            text.contains("_bucket{le=\"+Inf\",type=\"request\"} 16\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
        let om = encode(fam(), true);
        assert!(om.contains("# TYPE apisix_http_status unknown\n"), "{om}");
        assert!(om.contains("apisix_http_status{code=\"200\"} 3\n"), "{om}");
        assert!(om.contains("moongate_config_reloads_total 2\n"), "{om}");
        assert!(om.ends_with("# EOF\n"));
    }
}
