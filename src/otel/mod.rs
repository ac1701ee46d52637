//! OpenTelemetry tracing: W3C trace context (`traceparent`), samplers, the tracing settings
//! (APISIX's `opentelemetry` plugin metadata, or `plugin_attr.opentelemetry`) and the OTLP/HTTP
//! export of finished spans ([`export`]).
//!
//! The `opentelemetry` plugin (`src/plugins/opentelemetry.rs`) makes the spans; this module
//! holds what does not depend on a request. A span is built on the worker as OTLP's protobuf
//! message and handed to the exporter's thread through a bounded channel: a worker never waits
//! on the collector, and a full queue drops the span (counted) rather than blocking.

pub mod export;

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderName, HeaderValue};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use serde_json::Value;

use crate::config::ConfigError;

/// A span's identity as `traceparent` carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The `sampled` trace flag.
    pub sampled: bool,
}

impl SpanContext {
    /// The W3C `traceparent` value: `00-<trace id>-<span id>-<flags>`.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{}",
            hex(&self.trace_id),
            hex(&self.span_id),
            if self.sampled { "01" } else { "00" }
        )
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// `N` bytes from exactly `2 * N` hex digits (either case).
fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (digit(s[2 * i])? << 4) | digit(s[2 * i + 1])?;
    }
    Some(out)
}

/// Parses a `traceparent` header as W3C Trace Context says: version `00` is exactly
/// `00-<32 hex>-<16 hex>-<2 hex>`; a later version may carry more after a `-`; version `ff`,
/// an all-zero trace or span id, or anything malformed is ignored (None: a new trace starts).
pub fn parse_traceparent(v: &str) -> Option<SpanContext> {
    let v = v.trim();
    let mut parts = v.splitn(5, '-');
    let version = unhex::<1>(parts.next()?)?[0];
    let trace_id = unhex::<16>(parts.next()?)?;
    let span_id = unhex::<8>(parts.next()?)?;
    let flags = unhex::<1>(parts.next()?)?[0];
    let rest = parts.next();
    if version == 0xff || (version == 0 && rest.is_some()) {
        return None;
    }
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(SpanContext {
        trace_id,
        span_id,
        sampled: flags & 1 == 1,
    })
}

/// Random bytes from the operating system (a non-zero id).
fn random_id<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    loop {
        if getrandom::fill(&mut b).is_err() {
            // No OS random source at all: fall back on the clock and a counter.
            static N: AtomicU64 = AtomicU64::new(1);
            let mut x = unix_nanos(SystemTime::now()) ^ N.fetch_add(1, Relaxed).rotate_left(32);
            for o in b.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *o = x as u8;
            }
        }
        if b != [0u8; N] {
            return b;
        }
    }
}

/// A new random trace id.
pub fn new_trace_id() -> [u8; 16] {
    random_id()
}

/// A new random span id.
pub fn new_span_id() -> [u8; 8] {
    random_id()
}

/// The trace id a request id stands for (`trace_id_source: x-request-id`): 32 hex digits,
/// hyphens ignored, as a UUID or moongate's `$request_id` are. None for an id of another shape.
pub fn trace_id_from_request_id(id: &str) -> Option<[u8; 16]> {
    let digits: String = id.chars().filter(|c| *c != '-').collect();
    unhex::<16>(&digits).filter(|t| *t != [0; 16])
}

/// Nanoseconds since the Unix epoch.
pub fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// APISIX's samplers (the plugin's `sampler`).
#[derive(Debug, Clone, PartialEq)]
pub enum Sampler {
    AlwaysOn,
    AlwaysOff,
    /// Samples this fraction of traces, decided by the trace id so every gateway that sees the
    /// trace decides alike.
    TraceIdRatio(f64),
    /// Follows the incoming `traceparent`'s sampled flag; a request without one is decided by
    /// the root sampler.
    ParentBase(Box<Sampler>),
}

impl Sampler {
    /// From a schema-checked `sampler` conf (`{name, options: {fraction, root}}`).
    pub fn from_conf(v: &Value) -> Sampler {
        let fraction = |o: &Value| o["fraction"].as_f64().unwrap_or(0.0);
        let simple = |name: &str, options: &Value| match name {
            "always_on" => Sampler::AlwaysOn,
            "trace_id_ratio" => Sampler::TraceIdRatio(fraction(options)),
            _ => Sampler::AlwaysOff,
        };
        let options = &v["options"];
        match v["name"].as_str().unwrap_or("always_off") {
            "parent_base" => {
                let root = &options["root"];
                Sampler::ParentBase(Box::new(match root["name"].as_str() {
                    Some(name) => simple(name, &root["options"]),
                    None => Sampler::AlwaysOff,
                }))
            }
            name => simple(name, options),
        }
    }

    /// Whether a span of `trace_id` whose parent is `parent` (from the client) is recorded.
    pub fn sampled(&self, parent: Option<&SpanContext>, trace_id: &[u8; 16]) -> bool {
        match self {
            Sampler::AlwaysOn => true,
            Sampler::AlwaysOff => false,
            Sampler::TraceIdRatio(f) => {
                if *f >= 1.0 {
                    return true;
                }
                if *f <= 0.0 {
                    return false;
                }
                // The OpenTelemetry specification's ratio: the low 8 bytes of the trace id,
                // less one bit, against fraction * 2^63.
                let mut low = [0u8; 8];
                low.copy_from_slice(&trace_id[8..]);
                let x = u64::from_be_bytes(low) >> 1;
                (x as f64) < f * (1u64 << 63) as f64
            }
            Sampler::ParentBase(root) => match parent {
                Some(p) => p.sampled,
                None => root.sampled(None, trace_id),
            },
        }
    }
}

/// Where a request's trace id comes from when the client sent no `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceIdSource {
    Random,
    /// The `X-Request-Id` header, else `$request_id` (APISIX's `x-request-id`).
    RequestId,
}

/// An attribute value: OTLP's string, int, double or bool.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Double(f64),
    Bool(bool),
}

/// One OTLP attribute.
pub fn attr(key: &str, value: AttrValue) -> KeyValue {
    let v = match value {
        AttrValue::Str(s) => any_value::Value::StringValue(s),
        AttrValue::Int(i) => any_value::Value::IntValue(i),
        AttrValue::Double(d) => any_value::Value::DoubleValue(d),
        AttrValue::Bool(b) => any_value::Value::BoolValue(b),
    };
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}

/// A string attribute.
pub fn str_attr(key: &str, value: impl Into<String>) -> KeyValue {
    attr(key, AttrValue::Str(value.into()))
}

/// The batch span processor's settings (`batch_span_processor`), with the defaults of the
/// OpenTelemetry Lua SDK APISIX uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// A full queue drops new spans. moongate always drops then (a worker never waits on the
    /// collector); `false` is accepted and logged once.
    pub drop_on_queue_full: bool,
    pub max_queue_size: usize,
    /// The longest a span waits in a batch that is not full.
    pub batch_timeout: Duration,
    /// A batch is sent once no span has come for this long.
    pub inactive_timeout: Duration,
    pub max_export_batch_size: usize,
}

impl Default for Batch {
    fn default() -> Self {
        Batch {
            drop_on_queue_full: true,
            max_queue_size: 2048,
            batch_timeout: Duration::from_secs(5),
            inactive_timeout: Duration::from_secs(2),
            max_export_batch_size: 256,
        }
    }
}

/// Where spans go (`collector`).
#[derive(Debug, Clone, PartialEq)]
pub struct Collector {
    /// `http://ADDRESS/v1/traces`, or the address itself when it has a scheme.
    pub endpoint: String,
    pub timeout: Duration,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// The tracing settings in force: the plugin's metadata, else `plugin_attr.opentelemetry`.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub trace_id_source: TraceIdSource,
    /// `resource` attributes besides `hostname` (and `service.name`, `APISIX` unless given).
    pub resource: Vec<(String, AttrValue)>,
    pub collector: Collector,
    pub batch: Batch,
    /// Sets `$opentelemetry_context_traceparent`, `$opentelemetry_trace_id` and
    /// `$opentelemetry_span_id` for the access log and later plugins.
    pub set_ngx_var: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings::from_value(&Value::Object(Default::default()), "")
            .expect("the empty settings are valid")
    }
}

fn bad(at: &str, field: &str, why: impl Into<String>) -> ConfigError {
    let path = match (at.is_empty(), field.is_empty()) {
        (true, _) => field.to_string(),
        (false, true) => at.to_string(),
        (false, false) => format!("{at}.{field}"),
    };
    ConfigError::new(path, why)
}

/// A number of seconds, as a duration.
fn seconds(v: &Value, at: &str, field: &str, default: Duration) -> Result<Duration, ConfigError> {
    match v {
        Value::Null => Ok(default),
        Value::Number(n) => match n.as_f64() {
            Some(s) if s > 0.0 && s.is_finite() && s < 1e9 => Ok(Duration::from_secs_f64(s)),
            _ => Err(bad(at, field, "must be a positive number of seconds")),
        },
        _ => Err(bad(at, field, "must be a number of seconds")),
    }
}

fn count(v: &Value, at: &str, field: &str, default: usize) -> Result<usize, ConfigError> {
    match v {
        Value::Null => Ok(default),
        _ => match v.as_u64() {
            Some(n) if n > 0 => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
            _ => Err(bad(at, field, "must be a positive integer")),
        },
    }
}

impl Settings {
    /// Reads the settings in APISIX's shape (`trace_id_source`, `resource`, `collector
    /// {address, request_timeout, request_headers}`, `batch_span_processor`, `set_ngx_var`);
    /// errors name the field under `at` (`plugin_attr.opentelemetry`).
    pub fn from_value(v: &Value, at: &str) -> Result<Settings, ConfigError> {
        let Value::Object(m) = v else {
            return Err(bad(at, "", "must be an object"));
        };
        let trace_id_source = match m.get("trace_id_source").and_then(Value::as_str) {
            None if m.get("trace_id_source").is_none() => TraceIdSource::Random,
            Some("random") => TraceIdSource::Random,
            Some("x-request-id") => TraceIdSource::RequestId,
            _ => {
                return Err(bad(
                    at,
                    "trace_id_source",
                    "must be \"random\" or \"x-request-id\"",
                ))
            }
        };
        let mut resource = Vec::new();
        match m.get("resource") {
            None | Some(Value::Null) => {}
            Some(Value::Object(r)) => {
                for (k, v) in r {
                    let value = match v {
                        Value::String(s) => AttrValue::Str(s.clone()),
                        Value::Bool(b) => AttrValue::Bool(*b),
                        Value::Number(n) => AttrValue::Double(n.as_f64().unwrap_or(0.0)),
                        _ => {
                            return Err(bad(
                                at,
                                &format!("resource.{k}"),
                                "must be a string, a number or a boolean",
                            ))
                        }
                    };
                    resource.push((k.clone(), value));
                }
            }
            Some(_) => return Err(bad(at, "resource", "must be an object")),
        }
        let none = Value::Null;
        let c = m.get("collector").unwrap_or(&none);
        if !c.is_null() && !c.is_object() {
            return Err(bad(at, "collector", "must be an object"));
        }
        let address = match &c["address"] {
            Value::Null => "127.0.0.1:4318".to_string(),
            Value::String(s) if !s.trim().is_empty() => s.trim().to_string(),
            _ => return Err(bad(at, "collector.address", "must be host:port or a URL")),
        };
        let base = if address.starts_with("http://") || address.starts_with("https://") {
            address.trim_end_matches('/').to_string()
        } else {
            format!("http://{address}")
        };
        let endpoint = format!("{base}/v1/traces");
        if endpoint.parse::<http::Uri>().is_err() {
            return Err(bad(at, "collector.address", "must be host:port or a URL"));
        }
        let timeout = seconds(
            &c["request_timeout"],
            at,
            "collector.request_timeout",
            Duration::from_secs(3),
        )?;
        let mut headers = Vec::new();
        match &c["request_headers"] {
            Value::Null => {}
            Value::Object(h) => {
                for (k, v) in h {
                    let text = match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => b.to_string(),
                        _ => {
                            return Err(bad(
                                at,
                                &format!("collector.request_headers.{k}"),
                                "must be a string, a number or a boolean",
                            ))
                        }
                    };
                    let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| {
                        bad(
                            at,
                            &format!("collector.request_headers.{k}"),
                            "is not a header name",
                        )
                    })?;
                    let value = HeaderValue::from_str(&text).map_err(|_| {
                        bad(
                            at,
                            &format!("collector.request_headers.{k}"),
                            "is not a header value",
                        )
                    })?;
                    headers.push((name, value));
                }
            }
            _ => return Err(bad(at, "collector.request_headers", "must be an object")),
        }
        let b = m.get("batch_span_processor").unwrap_or(&none);
        if !b.is_null() && !b.is_object() {
            return Err(bad(at, "batch_span_processor", "must be an object"));
        }
        let d = Batch::default();
        let batch = Batch {
            drop_on_queue_full: match &b["drop_on_queue_full"] {
                Value::Null => d.drop_on_queue_full,
                Value::Bool(x) => *x,
                _ => {
                    return Err(bad(
                        at,
                        "batch_span_processor.drop_on_queue_full",
                        "must be a boolean",
                    ))
                }
            },
            max_queue_size: count(
                &b["max_queue_size"],
                at,
                "batch_span_processor.max_queue_size",
                d.max_queue_size,
            )?,
            batch_timeout: seconds(
                &b["batch_timeout"],
                at,
                "batch_span_processor.batch_timeout",
                d.batch_timeout,
            )?,
            inactive_timeout: seconds(
                &b["inactive_timeout"],
                at,
                "batch_span_processor.inactive_timeout",
                d.inactive_timeout,
            )?,
            max_export_batch_size: count(
                &b["max_export_batch_size"],
                at,
                "batch_span_processor.max_export_batch_size",
                d.max_export_batch_size,
            )?,
        };
        let set_ngx_var = match m.get("set_ngx_var") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(x)) => *x,
            Some(_) => return Err(bad(at, "set_ngx_var", "must be a boolean")),
        };
        Ok(Settings {
            trace_id_source,
            resource,
            collector: Collector {
                endpoint,
                timeout,
                headers,
            },
            batch,
            set_ngx_var,
        })
    }

    /// The resource's attributes as exported: `hostname`, `service.name` (`APISIX` unless the
    /// settings name one) and the configured ones.
    pub fn resource_attributes(&self) -> Vec<KeyValue> {
        let mut out = vec![str_attr("hostname", crate::metrics::expose::hostname())];
        if !self.resource.iter().any(|(k, _)| k == "service.name") {
            out.push(str_attr("service.name", "APISIX"));
        }
        out.extend(self.resource.iter().map(|(k, v)| attr(k, v.clone())));
        out
    }
}

/// The settings in force and the exporter they feed.
pub struct Tracing {
    pub settings: Settings,
    pub exporter: Arc<export::Exporter>,
    /// The metadata's `modifiedIndex` these came from (0: `plugin_attr`).
    source: u64,
}

/// `plugin_attr.opentelemetry`, read at start-up.
static NODE_ATTR: Mutex<Option<Settings>> = Mutex::new(None);

/// The one exporter in use: settings that change make a new one, and the old one sends what
/// it holds and ends once no request holds it.
static EXPORTER: Mutex<Option<(Settings, Arc<export::Exporter>)>> = Mutex::new(None);

/// Records `plugin_attr.opentelemetry` (checked by the start-up already).
pub fn set_node_attr(v: Option<&Value>) -> Result<(), ConfigError> {
    let s = match v {
        Some(v) => Some(Settings::from_value(v, "plugin_attr.opentelemetry")?),
        None => None,
    };
    *NODE_ATTR.lock().unwrap_or_else(|e| e.into_inner()) = s;
    Ok(())
}

fn exporter_for(settings: &Settings) -> Arc<export::Exporter> {
    let mut slot = EXPORTER.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((s, e)) = slot.as_ref() {
        if s == settings {
            return e.clone();
        }
    }
    let e = Arc::new(export::Exporter::start(settings));
    *slot = Some((settings.clone(), e.clone()));
    e
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<Tracing>>> = const { RefCell::new(None) };
}

/// The tracing settings for a request now: the published `opentelemetry` plugin metadata,
/// else `plugin_attr.opentelemetry`, else the defaults. Kept per worker thread and rebuilt
/// only when the metadata changes.
pub fn current(plugin: &str) -> Arc<Tracing> {
    let meta = crate::plugin::metadata::get(plugin);
    let source = meta.as_ref().map_or(0, |m| m.modified_index);
    CURRENT.with(|c| {
        if let Some(t) = c.borrow().as_ref() {
            if t.source == source {
                return t.clone();
            }
        }
        let settings = meta
            .as_ref()
            .and_then(|m| Settings::from_value(&m.value, "").ok())
            .or_else(|| NODE_ATTR.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default();
        let t = Arc::new(Tracing {
            exporter: exporter_for(&settings),
            settings,
            source,
        });
        *c.borrow_mut() = Some(t.clone());
        t
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn traceparent_round_trips_and_refuses_bad_ones() {
        let v = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let c = parse_traceparent(v).unwrap();
        assert!(c.sampled);
        assert_eq!(hex(&c.trace_id), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(c.traceparent(), v);
        let unsampled =
            parse_traceparent("00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-00");
        assert!(!unsampled.unwrap().sampled);
        // A later version may carry more; 00 may not.
        assert!(parse_traceparent(&format!("01-{}-x", &v[3..])).is_some());
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
    }

    #[test]
    fn samplers_decide_as_configured() {
        let t = new_trace_id();
        let parent = |sampled| SpanContext {
            trace_id: t,
            span_id: new_span_id(),
            sampled,
        };
        let s = Sampler::from_conf(&json!({"name": "always_on"}));
        assert!(s.sampled(None, &t));
        assert!(!Sampler::from_conf(&json!({})).sampled(None, &t));
        let pb = Sampler::from_conf(
            &json!({"name": "parent_base", "options": {"root": {"name": "always_on"}}}),
        );
        assert!(pb.sampled(None, &t));
        assert!(!pb.sampled(Some(&parent(false)), &t));
        assert!(pb.sampled(Some(&parent(true)), &t));
        let half =
            Sampler::from_conf(&json!({"name": "trace_id_ratio", "options": {"fraction": 0.5}}));
        let n = (0..4000)
            .filter(|_| half.sampled(None, &new_trace_id()))
            .count();
        assert!((1600..2400).contains(&n), "{n} of 4000 sampled at 0.5");
        assert!(!Sampler::TraceIdRatio(0.0).sampled(None, &t));
        assert!(Sampler::TraceIdRatio(1.0).sampled(None, &t));
    }

    #[test]
    fn request_ids_make_trace_ids() {
        let t = trace_id_from_request_id("4bf92f35-77b3-4da6-a3ce-929d0e0e4736").unwrap();
        assert_eq!(hex(&t), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(trace_id_from_request_id("not-an-id"), None);
    }

    #[test]
    fn settings_have_apisix_defaults_and_name_bad_fields() {
        let s = Settings::default();
        assert_eq!(s.collector.endpoint, "http://127.0.0.1:4318/v1/traces");
        assert_eq!(s.collector.timeout, Duration::from_secs(3));
        assert_eq!(s.batch, Batch::default());
        assert_eq!(s.trace_id_source, TraceIdSource::Random);
        let s = Settings::from_value(
            &json!({"collector": {"address": "https://otel.example:4318/"}, "resource": {"service.name": "edge", "zone": 3}}),
            "x",
        )
        .unwrap();
        assert_eq!(s.collector.endpoint, "https://otel.example:4318/v1/traces");
        let r = s.resource_attributes();
        assert_eq!(r.iter().filter(|k| k.key == "service.name").count(), 1);
        let err = Settings::from_value(
            &json!({"batch_span_processor": {"max_queue_size": 0}}),
            "plugin_attr.opentelemetry",
        )
        .unwrap_err();
        assert_eq!(
            err.path,
            "plugin_attr.opentelemetry.batch_span_processor.max_queue_size"
        );
        let err = Settings::from_value(&json!({"trace_id_source": "uuid"}), "m").unwrap_err();
        assert_eq!(err.path, "m.trace_id_source");
    }
}
