//! Helpers for the observability tests: the export server's URL from the gateway's log, a
//! scrape, and Prometheus' own text parser (PyPI `prometheus-client`) to read it.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::{Gateway, Req};

/// The metrics URL from the `prometheus metrics served at http://...` line.
pub fn metrics_url(gw: &Gateway) -> String {
    const NEEDLE: &str = "prometheus metrics served at ";
    assert!(
        gw.wait_for_log(NEEDLE, Duration::from_secs(20)),
        "no export server line; log:\n{}",
        gw.logs()
    );
    gw.logs()
        .lines()
        .find_map(|l| {
            let rest = l.split(NEEDLE).nth(1)?;
            Some(rest.split_whitespace().next()?.to_string())
        })
        .expect("metrics url")
}

/// The status API's address, from its `status API listening at http://ADDR` line.
pub fn status_addr(gw: &Gateway) -> std::net::SocketAddr {
    const NEEDLE: &str = "status API listening at http://";
    assert!(
        gw.wait_for_log(NEEDLE, Duration::from_secs(20)),
        "no status API line; log:\n{}",
        gw.logs()
    );
    gw.logs()
        .lines()
        .find_map(|l| {
            l.split(NEEDLE)
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .expect("status address")
}

/// One sample as the parser read it.
#[derive(Debug, Clone)]
pub struct Sample {
    pub family: String,
    pub kind: String,
    pub name: String,
    pub labels: serde_json::Map<String, Value>,
    pub value: f64,
}

impl Sample {
    /// Whether every `(name, value)` pair is among the sample's labels.
    pub fn has(&self, labels: &[(&str, &str)]) -> bool {
        labels
            .iter()
            .all(|(k, v)| self.labels.get(*k).and_then(Value::as_str) == Some(*v))
    }
}

const PARSER: &str = r#"
import json, sys
fmt = sys.argv[1]
text = sys.stdin.read()
if fmt == "openmetrics":
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
else:
    from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(text):
    for s in fam.samples:
        out.append({"family": fam.name, "type": fam.type, "name": s.name,
                    "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;

/// Parses an exposition with PyPI `prometheus-client` (its text parser, or its OpenMetrics
/// parser, which also checks the format strictly). Panics with the text when it does not
/// parse.
pub fn parse(text: &str, openmetrics: bool) -> Vec<Sample> {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(PARSER)
        .arg(if openmetrics { "openmetrics" } else { "text" })
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write exposition");
    let out = child.wait_with_output().expect("parser ends");
    assert!(
        out.status.success(),
        "the Prometheus parser refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("parser output is JSON");
    v.as_array()
        .expect("a list")
        .iter()
        .map(|s| Sample {
            family: s["family"].as_str().unwrap_or_default().to_string(),
            kind: s["type"].as_str().unwrap_or_default().to_string(),
            name: s["name"].as_str().unwrap_or_default().to_string(),
            labels: s["labels"].as_object().cloned().unwrap_or_default(),
            value: s["value"].as_f64().unwrap_or(f64::NAN),
        })
        .collect()
}

/// Scrapes `url` (with `Accept: accept` when given) and parses the answer in the format its
/// content type names: (content type, samples, the text).
pub fn scrape(url: &str, accept: Option<&str>) -> (String, Vec<Sample>, String) {
    let mut req = Req::get(url);
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let r = req.send();
    assert_eq!(r.status, 200, "scrape: {}", r.text());
    let ctype = r.header("content-type").unwrap_or_default();
    let om = ctype.starts_with("application/openmetrics-text");
    let text = r.text();
    let samples = parse(&text, om);
    (ctype, samples, text)
}

/// Whether `s` is a sample of `name` as the exposition wrote it. (The parser models every
/// counter the OpenMetrics way: APISIX's `apisix_http_status` samples come back named
/// `apisix_http_status_total` in the family `apisix_http_status`.)
pub fn is(s: &Sample, name: &str) -> bool {
    s.name == name
        || (s.kind == "counter" && s.family == name && s.name.strip_suffix("_total") == Some(name))
}

/// The value of the one sample named `name` with these labels (0 when there is none;
/// panics when several match).
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let hits: Vec<&Sample> = samples
        .iter()
        .filter(|s| is(s, name) && s.has(labels))
        .collect();
    assert!(hits.len() <= 1, "several {name} {labels:?}: {hits:#?}");
    hits.first().map_or(0.0, |s| s.value)
}
