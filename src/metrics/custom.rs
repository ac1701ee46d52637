//! Metrics that Lua plugins define: APISIX's custom metrics, registered on the object
//! `require("apisix.plugins.prometheus.exporter").get_prometheus()` returns (the
//! nginx-lua-prometheus API: `counter`, `gauge`, `histogram`, then `inc`, `set`, `observe`,
//! `del`, `reset`).
//!
//! One registry per process, shared by every worker's VM and kept across plugin reloads:
//! registering a name again with the same type and labels hands back the same metric, so a
//! plugin that registers in its module body or `init` keeps counting through a reload. A
//! name registered with another type or other labels is refused ("Duplicate metric").
//!
//! Names are stored without the prefix (`plugin_attr.prometheus.metric_prefix`, `apisix_`),
//! which is added when a scrape encodes them, as nginx-lua-prometheus does. Each operation
//! takes the metric's own lock; these are a plugin's metrics, recorded where the plugin
//! chooses, not the per-request families of [`super::store`].

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::expose::{Family, Kind, Value};

/// nginx-lua-prometheus' default histogram buckets (seconds, 5 ms to 10 s).
pub const DEFAULT_BUCKETS: [f64; 19] = [
    0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0,
    5.0, 10.0,
];

/// The counter of errors in metric calls (nginx-lua-prometheus' own, exported with the prefix).
pub const ERRORS_NAME: &str = "nginx_metric_errors_total";

/// The suffixes of a histogram's sample names.
const HISTOGRAM_SUFFIXES: [&str; 3] = ["_bucket", "_count", "_sum"];

/// Families the gateway exports itself under the prefix: a plugin may not take their names.
const BUILT_IN: [&str; 11] = [
    "bandwidth",
    "http_latency",
    "http_requests_total",
    "http_status",
    "nginx_http_current_connections",
    "node_info",
    "shared_dict_capacity_bytes",
    "shared_dict_free_space_bytes",
    "etcd_reachable",
    "etcd_modify_indexes",
    "upstream_status",
];

/// One series' value.
enum Series {
    Num(f64),
    /// Counts per bucket (not cumulative, the last is `+Inf`) and the sum.
    Hist(Vec<u64>, f64),
}

/// A metric a plugin registered.
pub struct Metric {
    kind: Kind,
    name: String,
    help: String,
    label_names: Vec<String>,
    /// Histogram bucket bounds, increasing; empty for counters and gauges.
    bounds: Vec<f64>,
    series: Mutex<HashMap<Vec<String>, Series>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

static REGISTRY: Mutex<BTreeMap<String, Arc<Metric>>> = Mutex::new(BTreeMap::new());
static ERRORS: AtomicU64 = AtomicU64::new(0);

/// Counts one error in a metric call (the caller logs it) and hands it back.
fn error(message: String) -> String {
    ERRORS.fetch_add(1, Ordering::Relaxed);
    message
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Registers (or finds again) a metric. `buckets` is for histograms (None: the default
/// buckets). Errors are nginx-lua-prometheus' messages, and are counted.
pub fn register(
    kind: Kind,
    name: &str,
    help: &str,
    label_names: Vec<String>,
    buckets: Option<Vec<f64>>,
) -> Result<Arc<Metric>, String> {
    if !valid_name(name) {
        return Err(error(format!("Metric name '{name}' is invalid")));
    }
    for l in &label_names {
        if l == "le" {
            return Err(error(format!("Invalid label name 'le' in {name}")));
        }
        if !valid_label(l) {
            return Err(error(format!(
                "Metric '{name}' label name '{l}' is invalid"
            )));
        }
    }
    let bounds = match kind {
        Kind::Histogram => {
            let b = buckets.unwrap_or_else(|| DEFAULT_BUCKETS.to_vec());
            if b.iter().any(|v| !v.is_finite()) || b.windows(2).any(|w| w[0] >= w[1]) {
                return Err(error(format!(
                    "Histogram {name}: bucket boundaries should be numbers in increasing order"
                )));
            }
            b
        }
        _ => Vec::new(),
    };
    // The names a histogram's samples take, or a counter's that ends like one.
    let base = HISTOGRAM_SUFFIXES
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name);
    let mut registry = lock(&REGISTRY);
    if let Some(m) = registry.get(name) {
        if m.kind == kind && m.label_names == label_names && m.bounds == bounds {
            return Ok(m.clone());
        }
        return Err(error(format!("Duplicate metric {name}")));
    }
    let clash = BUILT_IN.contains(&name)
        || name == ERRORS_NAME
        || (base != name
            && registry
                .get(base)
                .is_some_and(|m| m.kind == Kind::Histogram))
        || (kind == Kind::Histogram
            && HISTOGRAM_SUFFIXES
                .iter()
                .any(|s| registry.contains_key(&format!("{name}{s}"))));
    if clash {
        return Err(error(format!("Duplicate metric {name}")));
    }
    let m = Arc::new(Metric {
        kind,
        name: name.to_string(),
        help: help.to_string(),
        label_names,
        bounds,
        series: Mutex::new(HashMap::new()),
    });
    registry.insert(name.to_string(), m.clone());
    Ok(m)
}

impl Metric {
    fn key(&self, values: Vec<String>) -> Result<Vec<String>, String> {
        if values.len() != self.label_names.len() {
            return Err(error(format!(
                "inconsistent labels count, expected {}, got {}",
                self.label_names.len(),
                values.len()
            )));
        }
        Ok(values)
    }

    /// `counter:inc(value, labels)` / `gauge:inc(value, labels)`.
    pub fn inc(&self, value: f64, labels: Vec<String>) -> Result<(), String> {
        if self.kind == Kind::Counter && value < 0.0 {
            return Err(error(format!(
                "{}: {value}: Value should not be negative",
                self.name
            )));
        }
        self.add(value, labels)
    }

    fn add(&self, value: f64, labels: Vec<String>) -> Result<(), String> {
        if !value.is_finite() {
            return Err(error(format!(
                "{}: {value}: Value is not finite",
                self.name
            )));
        }
        let key = self.key(labels)?;
        match lock(&self.series).entry(key).or_insert(Series::Num(0.0)) {
            Series::Num(v) => *v += value,
            Series::Hist(..) => {}
        }
        Ok(())
    }

    /// `gauge:set(value, labels)`.
    pub fn set(&self, value: f64, labels: Vec<String>) -> Result<(), String> {
        if !value.is_finite() {
            return Err(error(format!(
                "{}: {value}: Value is not finite",
                self.name
            )));
        }
        let key = self.key(labels)?;
        lock(&self.series).insert(key, Series::Num(value));
        Ok(())
    }

    /// `histogram:observe(value, labels)`.
    pub fn observe(&self, value: f64, labels: Vec<String>) -> Result<(), String> {
        if value.is_nan() {
            return Err(error(format!(
                "{}: {value}: Value is not a number",
                self.name
            )));
        }
        let key = self.key(labels)?;
        let n = self.bounds.len() + 1;
        let i = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(n - 1);
        let mut series = lock(&self.series);
        if let Series::Hist(counts, sum) = series
            .entry(key)
            .or_insert_with(|| Series::Hist(vec![0; n], 0.0))
        {
            counts[i] += 1;
            *sum += value;
        }
        Ok(())
    }

    /// `metric:del(labels)`: that series goes from the scrape.
    pub fn del(&self, labels: Vec<String>) -> Result<(), String> {
        let key = self.key(labels)?;
        lock(&self.series).remove(&key);
        Ok(())
    }

    /// `metric:reset()`: every series goes.
    pub fn reset(&self) {
        lock(&self.series).clear();
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The name as registered (without the prefix).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn family(&self, prefix: &str) -> Family {
        let labels: Vec<&str> = self.label_names.iter().map(String::as_str).collect();
        let mut f = Family::new(
            format!("{prefix}{}", self.name),
            &self.help,
            self.kind,
            &labels,
        );
        if self.kind == Kind::Histogram {
            f.bounds = Some(self.bounds.clone());
        }
        let series = lock(&self.series);
        let mut samples: Vec<(Vec<String>, Value)> = series
            .iter()
            .map(|(k, s)| {
                let v = match s {
                    Series::Num(v) => Value::Float(*v),
                    Series::Hist(c, sum) => Value::Hist(c.clone(), *sum),
                };
                (k.clone(), v)
            })
            .collect();
        drop(series);
        samples.sort_by(|a, b| a.0.cmp(&b.0));
        f.samples = samples;
        f
    }
}

/// The plugins' families and the error counter, for a scrape.
pub fn families(prefix: &str, out: &mut Vec<Family>) {
    let metrics: Vec<Arc<Metric>> = lock(&REGISTRY).values().cloned().collect();
    for m in metrics {
        out.push(m.family(prefix));
    }
    let mut f = Family::new(
        format!("{prefix}{ERRORS_NAME}"),
        "Number of nginx-lua-prometheus errors",
        Kind::Counter,
        &[],
    );
    f.push(Vec::new(), Value::Int(ERRORS.load(Ordering::Relaxed)));
    out.push(f);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn registering_again_finds_the_same_metric_and_clashes_are_refused() {
        let a = register(Kind::Counter, "t_reg_hits", "h", l(&["route"]), None).unwrap();
        a.inc(2.0, l(&["r1"])).unwrap();
        let b = register(Kind::Counter, "t_reg_hits", "h", l(&["route"]), None).unwrap();
        b.inc(1.0, l(&["r1"])).unwrap();
        let f = a.family("apisix_");
        assert_eq!(f.name, "apisix_t_reg_hits");
        assert!(matches!(f.samples[0].1, Value::Float(v) if v == 3.0));
        let e = register(Kind::Gauge, "t_reg_hits", "h", l(&["route"]), None)
            .err()
            .unwrap();
        assert_eq!(e, "Duplicate metric t_reg_hits");
        let e = register(Kind::Counter, "http_status", "h", vec![], None)
            .err()
            .unwrap();
        assert_eq!(e, "Duplicate metric http_status");
        register(Kind::Histogram, "t_reg_lat", "h", vec![], None).unwrap();
        let e = register(Kind::Counter, "t_reg_lat_count", "h", vec![], None)
            .err()
            .unwrap();
        assert_eq!(e, "Duplicate metric t_reg_lat_count");
        assert_eq!(
            register(Kind::Counter, "9x", "h", vec![], None)
                .err()
                .unwrap(),
            "Metric name '9x' is invalid"
        );
        assert_eq!(
            register(Kind::Counter, "t_x", "h", l(&["le"]), None)
                .err()
                .unwrap(),
            "Invalid label name 'le' in t_x"
        );
        assert_eq!(
            register(Kind::Counter, "t_x", "h", l(&["a-b"]), None)
                .err()
                .unwrap(),
            "Metric 't_x' label name 'a-b' is invalid"
        );
    }

    #[test]
    fn operations_check_their_labels_and_values() {
        let c = register(Kind::Counter, "t_ops_c", "h", l(&["a", "b"]), None).unwrap();
        assert_eq!(
            c.inc(1.0, l(&["x"])).unwrap_err(),
            "inconsistent labels count, expected 2, got 1"
        );
        assert!(c
            .inc(-1.0, l(&["x", "y"]))
            .unwrap_err()
            .ends_with("Value should not be negative"));
        let g = register(Kind::Gauge, "t_ops_g", "h", vec![], None).unwrap();
        g.set(5.0, vec![]).unwrap();
        g.inc(-2.0, vec![]).unwrap();
        assert!(matches!(g.family("").samples[0].1, Value::Float(v) if v == 3.0));
        g.del(vec![]).unwrap();
        assert!(g.family("").samples.is_empty());
        let h = register(
            Kind::Histogram,
            "t_ops_h",
            "h",
            vec![],
            Some(vec![1.0, 5.0]),
        )
        .unwrap();
        for v in [0.5, 1.0, 3.0, 9.0] {
            h.observe(v, vec![]).unwrap();
        }
        match &h.family("").samples[0].1 {
            Value::Hist(c, sum) => {
                assert_eq!(c, &vec![2, 1, 1]);
                assert_eq!(*sum, 13.5);
            }
            _ => panic!("not a histogram"),
        }
        h.reset();
        assert!(h.family("").samples.is_empty());
        assert!(register(
            Kind::Histogram,
            "t_ops_h2",
            "h",
            vec![],
            Some(vec![5.0, 1.0])
        )
        .is_err());
    }
}
