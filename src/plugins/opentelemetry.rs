//! `opentelemetry`: APISIX's plugin of that name, native. Traces each request it runs on: a
//! server span for the request and, when the request went upstream, a client span for the
//! upstream call, exported over OTLP/HTTP (`src/otel/`).
//!
//! ```yaml
//! plugins:
//!   opentelemetry:
//!     sampler: {name: parent_base, options: {root: {name: trace_id_ratio, options: {fraction: 0.1}}}}
//!     additional_attributes: [consumer_name]
//!     additional_header_prefix_attributes: ["x-tenant-*"]
//! plugin_metadata:                     # or plugin_attr.opentelemetry in the node settings
//!   - id: opentelemetry
//!     collector: {address: 127.0.0.1:4318, request_timeout: 3}
//!     trace_id_source: random          # or x-request-id
//!     batch_span_processor: {max_export_batch_size: 256, batch_timeout: 5}
//! ```
//!
//! rewrite reads the client's `traceparent` (its trace continues), decides sampling and sends
//! `traceparent` upstream; log finishes the spans. The `traceparent` the upstream gets names
//! the client span, so the upstream's own spans hang under the upstream call.

use std::any::Any;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use http::HeaderValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode, Span, Status};
use serde_json::{json, Value};

use crate::otel::{self, attr, str_attr, AttrValue, Sampler, SpanContext, TraceIdSource};
use crate::plugin::{
    ConfScope, Ctx, Flow, Phase, PhaseCall, PhaseResult, PhaseSet, Plugin, PluginConf, Schema,
};

pub struct OpenTelemetry;

const NAME: &str = "opentelemetry";

fn schema() -> &'static Schema {
    static S: OnceLock<Schema> = OnceLock::new();
    S.get_or_init(|| {
        let fraction = json!({"type": "number", "minimum": 0, "maximum": 1, "default": 0});
        Schema::compile(&json!({
            "type": "object",
            "properties": {
                "sampler": {
                    "type": "object",
                    "properties": {
                        "name": {
                            "type": "string",
                            "enum": ["always_on", "always_off", "trace_id_ratio", "parent_base"],
                            "default": "always_off"
                        },
                        "options": {
                            "type": "object",
                            "properties": {
                                "fraction": fraction,
                                "root": {
                                    "type": "object",
                                    "properties": {
                                        "name": {
                                            "type": "string",
                                            "enum": ["always_on", "always_off", "trace_id_ratio"],
                                            "default": "always_off"
                                        },
                                        "options": {
                                            "type": "object",
                                            "properties": {"fraction": fraction},
                                            "default": {"fraction": 0}
                                        }
                                    },
                                    "default": {"name": "always_off", "options": {"fraction": 0}}
                                }
                            },
                            "default": {"fraction": 0, "root": {"name": "always_off"}}
                        }
                    },
                    "default": {"name": "always_off", "options": {"fraction": 0, "root": {"name": "always_off"}}}
                },
                "additional_attributes": {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1}
                },
                "additional_header_prefix_attributes": {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1}
                }
            }
        }))
        .expect("the opentelemetry schema compiles")
    })
}

fn metadata_schema() -> &'static Schema {
    static S: OnceLock<Schema> = OnceLock::new();
    S.get_or_init(|| {
        let scalar =
            json!({"anyOf": [{"type": "boolean"}, {"type": "number"}, {"type": "string"}]});
        Schema::compile(&json!({
            "type": "object",
            "properties": {
                "trace_id_source": {
                    "type": "string",
                    "enum": ["x-request-id", "random"],
                    "default": "random"
                },
                "resource": {"type": "object", "additionalProperties": scalar},
                "collector": {
                    "type": "object",
                    "properties": {
                        "address": {"type": "string", "default": "127.0.0.1:4318"},
                        "request_timeout": {"type": "integer", "default": 3},
                        "request_headers": {"type": "object", "additionalProperties": scalar}
                    },
                    "default": {"address": "127.0.0.1:4318", "request_timeout": 3}
                },
                "batch_span_processor": {
                    "type": "object",
                    "properties": {
                        "drop_on_queue_full": {"type": "boolean"},
                        "max_queue_size": {"type": "integer"},
                        "batch_timeout": {"type": "number"},
                        "inactive_timeout": {"type": "number"},
                        "max_export_batch_size": {"type": "integer"}
                    },
                    "default": {}
                },
                "set_ngx_var": {"type": "boolean", "default": false}
            }
        }))
        .expect("the opentelemetry metadata schema compiles")
    })
}

/// The compiled conf.
#[derive(Debug)]
struct Conf {
    sampler: Sampler,
    /// `ctx.var` names whose values become attributes.
    attributes: Vec<String>,
    /// Request header names, or prefixes ending in `*`, whose values become attributes.
    header_attributes: Vec<String>,
}

/// What rewrite started and log finishes.
struct Trace {
    tracing: Arc<otel::Tracing>,
    server: SpanContext,
    /// The client's span, the server span's parent.
    parent: Option<[u8; 8]>,
    /// The id the upstream call's span will have (sent upstream in `traceparent`).
    client_span: [u8; 8],
    name: String,
    attributes: Vec<KeyValue>,
    start: SystemTime,
}

/// The attributes of `wanted` found in `source`; with `prefixes`, a name ending in `*` takes
/// every key that starts with the rest (request headers, as APISIX).
fn add_attributes<'a>(
    out: &mut Vec<KeyValue>,
    wanted: &[String],
    prefixes: bool,
    lookup: impl Fn(&str) -> Option<String>,
    keys: impl Fn() -> Vec<(&'a str, String)>,
) {
    for key in wanted {
        match key.strip_suffix('*').filter(|_| prefixes && key.len() >= 2) {
            Some(prefix) => {
                let prefix = prefix.to_ascii_lowercase();
                for (k, v) in keys() {
                    if k.starts_with(&prefix) {
                        out.push(str_attr(k, v));
                    }
                }
            }
            None => {
                if let Some(v) = lookup(key) {
                    out.push(str_attr(key, v));
                }
            }
        }
    }
}

/// The trace id for a request that brought none.
fn new_trace_id(source: TraceIdSource, ctx: &Ctx) -> [u8; 16] {
    if source == TraceIdSource::RequestId {
        let id = ctx
            .header("x-request-id")
            .unwrap_or_else(|| ctx.request_id());
        if let Some(t) = otel::trace_id_from_request_id(id) {
            return t;
        }
    }
    otel::new_trace_id()
}

impl OpenTelemetry {
    fn rewrite_now(&self, conf: &PluginConf, ctx: &mut Ctx) -> PhaseResult {
        let Some(c) = conf.compiled::<Conf>() else {
            return Ok(Flow::Continue);
        };
        let tracing = otel::current(NAME);
        let incoming = ctx.header("traceparent").and_then(otel::parse_traceparent);
        let trace_id = match &incoming {
            Some(p) => p.trace_id,
            None => new_trace_id(tracing.settings.trace_id_source, ctx),
        };
        let sampled = c.sampler.sampled(incoming.as_ref(), &trace_id);
        let server = SpanContext {
            trace_id,
            span_id: otel::new_span_id(),
            sampled,
        };
        // Unsampled, there is no client span: the upstream hears of the server span, as
        // APISIX sends it, with the sampled flag clear (and no id is drawn for nothing).
        let client_span = if sampled {
            otel::new_span_id()
        } else {
            server.span_id
        };
        let upstream = SpanContext {
            span_id: client_span,
            ..server
        };
        if let Ok(v) = HeaderValue::from_str(&upstream.traceparent()) {
            ctx.headers.insert("traceparent", v);
        }
        if tracing.settings.set_ngx_var {
            ctx.vars.insert(
                "opentelemetry_context_traceparent".into(),
                server.traceparent(),
            );
            ctx.vars
                .insert("opentelemetry_trace_id".into(), otel::hex(&server.trace_id));
            ctx.vars
                .insert("opentelemetry_span_id".into(), otel::hex(&server.span_id));
        }
        if !sampled {
            return Ok(Flow::Continue);
        }
        let mut name = ctx.method.as_str().to_string();
        let mut attributes = vec![
            str_attr("net.host.name", ctx.host.as_str()),
            str_attr("http.method", ctx.method.as_str()),
            str_attr("http.scheme", ctx.scheme),
            str_attr("http.target", ctx.request_uri.as_str()),
        ];
        if let Some(ua) = ctx.header("user-agent") {
            attributes.push(str_attr("http.user_agent", ua));
        }
        if let Some(route) = &ctx.route {
            attributes.push(str_attr("apisix.route_id", route.id.as_str()));
            attributes.push(str_attr(
                "apisix.route_name",
                route.name.as_deref().unwrap_or(""),
            ));
            if let Some(m) = &ctx.matched {
                attributes.push(str_attr("http.route", &*m.uri));
                name.push(' ');
                name.push_str(&m.uri);
            }
            if let Some(s) = &route.service_id {
                attributes.push(str_attr("apisix.service_id", s.as_str()));
                attributes.push(str_attr(
                    "apisix.service_name",
                    route.service_name.as_deref().unwrap_or(""),
                ));
            }
        }
        add_attributes(
            &mut attributes,
            &c.attributes,
            false,
            |k| ctx.var(k).map(|v| v.into_owned()),
            Vec::new,
        );
        add_attributes(
            &mut attributes,
            &c.header_attributes,
            true,
            |k| ctx.header(k).map(str::to_string),
            || {
                ctx.headers
                    .iter()
                    .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?.to_string())))
                    .collect()
            },
        );
        ctx.set_data(Trace {
            tracing,
            server,
            parent: incoming.map(|p| p.span_id),
            client_span,
            name,
            attributes,
            start: ctx.start_time,
        });
        Ok(Flow::Continue)
    }
}

/// One finished span of this request: what differs between the server and the client span.
struct SpanParts {
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    name: String,
    kind: SpanKind,
    start: SystemTime,
    end: SystemTime,
    attributes: Vec<KeyValue>,
    /// The status message of a span that failed; None leaves the status unset.
    error: Option<String>,
}

impl SpanParts {
    /// The span in `ctx`'s trace, as OTLP carries it.
    fn into_span(self, ctx: &SpanContext) -> Span {
        let status = match self.error {
            Some(message) => Status {
                message,
                code: StatusCode::Error as i32,
            },
            None => Status {
                message: String::new(),
                code: StatusCode::Unset as i32,
            },
        };
        Span {
            trace_id: ctx.trace_id.to_vec(),
            span_id: self.span_id.to_vec(),
            parent_span_id: self.parent.map(|p| p.to_vec()).unwrap_or_default(),
            flags: u32::from(ctx.sampled),
            name: self.name,
            kind: self.kind as i32,
            start_time_unix_nano: otel::unix_nanos(self.start),
            end_time_unix_nano: otel::unix_nanos(self.end),
            attributes: self.attributes,
            status: Some(status),
            ..Default::default()
        }
    }
}

#[async_trait(?Send)]
impl Plugin for OpenTelemetry {
    fn name(&self) -> &str {
        NAME
    }

    fn priority(&self) -> i64 {
        12009
    }

    fn schema(&self) -> &Schema {
        schema()
    }

    fn metadata_schema(&self) -> Option<&Schema> {
        Some(metadata_schema())
    }

    /// The metadata schema, then what moongate checks beyond it (the collector's address,
    /// positive sizes and timeouts).
    fn check_metadata(&self, conf: &mut Value) -> Result<(), String> {
        metadata_schema().check(conf)?;
        otel::Settings::from_value(conf, "")
            .map_err(|e| format!("property \"{}\" {}", e.path, e.message))?;
        Ok(())
    }

    fn check_conf(
        &self,
        conf: &mut Value,
        _scope: ConfScope,
    ) -> Result<Arc<dyn Any + Send + Sync>, String> {
        schema().check(conf)?;
        let strings = |k: &str| -> Vec<String> {
            conf[k]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        };
        Ok(Arc::new(Conf {
            sampler: Sampler::from_conf(&conf["sampler"]),
            attributes: strings("additional_attributes"),
            header_attributes: strings("additional_header_prefix_attributes"),
        }))
    }

    fn phases(&self) -> PhaseSet {
        PhaseSet::empty().with(Phase::Rewrite).with(Phase::Log)
    }

    async fn rewrite(&self, conf: &PluginConf, ctx: &mut Ctx) -> PhaseResult {
        self.rewrite_now(conf, ctx)
    }

    /// The rewrite never waits: no boxed future for it.
    fn start_phase<'a>(
        &'a self,
        phase: Phase,
        conf: &'a PluginConf,
        ctx: &'a mut Ctx,
    ) -> PhaseCall<'a> {
        match phase {
            Phase::Rewrite => PhaseCall::Ready(self.rewrite_now(conf, ctx)),
            _ => PhaseCall::Ready(Ok(Flow::Continue)),
        }
    }

    fn log(&self, _conf: &PluginConf, ctx: &mut Ctx) {
        let Some(t) = ctx.take_data::<Trace>() else {
            return;
        };
        let end = SystemTime::now();
        let status = ctx.upstream_status.unwrap_or(ctx.status);
        let error = (status >= 500).then(|| match ctx.upstream_status {
            Some(s) => format!("upstream response status: {s}"),
            None => format!("response status: {status}"),
        });
        let mut attributes = t.attributes;
        attributes.push(attr("http.status_code", AttrValue::Int(i64::from(status))));
        attributes.push(attr(
            "http.response.status_code",
            AttrValue::Int(i64::from(status)),
        ));
        // The upstream call, from the first connection attempt to the end of its response.
        if let Some(up_start) = ctx.upstream_start {
            let start = t.start + up_start.saturating_duration_since(ctx.start);
            let mut a = vec![
                str_attr("http.request.method", ctx.method.as_str()),
                str_attr("http.method", ctx.method.as_str()),
                str_attr("url.path", ctx.effective_upstream_uri()),
            ];
            if let Some(addr) = ctx.upstream_addr.as_deref() {
                let (host, port) = match addr.rsplit_once(':') {
                    Some((h, p)) => (h, p.parse::<i64>().ok()),
                    None => (addr, None),
                };
                a.push(str_attr("server.address", host.trim_matches(['[', ']'])));
                if let Some(p) = port {
                    a.push(attr("server.port", AttrValue::Int(p)));
                }
            }
            if let Some(s) = ctx.upstream_status {
                a.push(attr("http.status_code", AttrValue::Int(i64::from(s))));
                a.push(attr(
                    "http.response.status_code",
                    AttrValue::Int(i64::from(s)),
                ));
            }
            let client_error = match ctx.upstream_status {
                Some(s) if s >= 500 => Some(format!("upstream response status: {s}")),
                None => Some("no response from the upstream".to_string()),
                _ => None,
            };
            let client = SpanParts {
                span_id: t.client_span,
                parent: Some(t.server.span_id),
                name: format!("{} upstream", ctx.method),
                kind: SpanKind::Client,
                start,
                end: end.max(start + Duration::from_nanos(1)),
                attributes: a,
                error: client_error,
            };
            t.tracing.exporter.send(client.into_span(&t.server));
        }
        let server = SpanParts {
            span_id: t.server.span_id,
            parent: t.parent,
            name: t.name,
            kind: SpanKind::Server,
            start: t.start,
            end,
            attributes,
            error,
        };
        t.tracing.exporter.send(server.into_span(&t.server));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_fills_apisix_defaults() {
        let mut c = json!({});
        OpenTelemetry.check_conf(&mut c, ConfScope::Route).unwrap();
        assert_eq!(c["sampler"]["name"], "always_off");
        let mut bad = json!({"sampler": {"name": "sometimes"}});
        assert!(OpenTelemetry
            .check_conf(&mut bad, ConfScope::Route)
            .is_err());
        let mut m = json!({"collector": {"address": "127.0.0.1:4318"}});
        OpenTelemetry.check_metadata(&mut m).unwrap();
        assert_eq!(m["trace_id_source"], "random");
        let mut m = json!({"batch_span_processor": {"max_queue_size": 0}});
        let e = OpenTelemetry.check_metadata(&mut m).unwrap_err();
        assert!(e.contains("batch_span_processor.max_queue_size"), "{e}");
    }
}
