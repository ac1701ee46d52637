//! The native `opentelemetry` plugin against a real OTLP/HTTP receiver the test starts: spans
//! decoded from the protobuf the gateway posts, the trace context read from the client and
//! sent upstream, samplers, status on upstream errors, and the settings from
//! `plugin_attr.opentelemetry` and from plugin metadata.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

/// What the receiver got: each export's headers and decoded request.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(http::HeaderMap, ExportTraceServiceRequest)>>>);

impl Received {
    fn spans(&self) -> Vec<Span> {
        let r = self.0.lock().unwrap();
        r.iter()
            .flat_map(|(_, req)| req.resource_spans.iter())
            .flat_map(|rs| rs.scope_spans.iter())
            .flat_map(|ss| ss.spans.iter().cloned())
            .collect()
    }

    /// The spans of trace `trace_id` (hex), once there are `n` (bounded).
    fn trace(&self, trace_id: &str, n: usize) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let spans: Vec<Span> = self
                .spans()
                .into_iter()
                .filter(|s| hex(&s.trace_id) == trace_id)
                .collect();
            if spans.len() >= n {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} spans of trace {trace_id} arrived",
                spans.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// An OTLP/HTTP receiver: decodes every `POST /v1/traces`.
fn receiver() -> (Upstream, Received) {
    let got = Received::default();
    let g = got.clone();
    let up = Upstream::start(move |req| {
        let g = g.clone();
        async move {
            let (parts, body) = req.into_parts();
            let bytes: Bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            assert_eq!(parts.uri.path(), "/v1/traces");
            assert_eq!(
                parts.headers.get("content-type").unwrap(),
                "application/x-protobuf"
            );
            let decoded = ExportTraceServiceRequest::decode(bytes).expect("OTLP protobuf");
            g.0.lock().unwrap().push((parts.headers, decoded));
            http::Response::new(empty())
        }
    });
    (up, got)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attrs(kv: &[KeyValue]) -> HashMap<String, String> {
    kv.iter()
        .map(|k| {
            let v = match k.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                Some(any_value::Value::DoubleValue(d)) => d.to_string(),
                Some(any_value::Value::BoolValue(b)) => b.to_string(),
                other => format!("{other:?}"),
            };
            (k.key.clone(), v)
        })
        .collect()
}

/// The `traceparent` the echo upstream received, split: (trace id, parent span id, flags).
fn sent_upstream(r: &Resp) -> (String, String, String) {
    let tp = r.json()["headers"]["traceparent"]
        .as_str()
        .expect("traceparent sent upstream")
        .to_string();
    let p: Vec<&str> = tp.split('-').collect();
    assert_eq!(p.len(), 4, "{tp}");
    assert_eq!(p[0], "00");
    (p[1].to_string(), p[2].to_string(), p[3].to_string())
}

fn route(id: &str, uri: &str, plugins: &str, node: &str) -> String {
    format!(
        "  - id: {id}\n    name: {id}-route\n    uri: {uri}\n    plugins:\n      opentelemetry:\n{plugins}    upstream:\n      nodes:\n        \"{node}\": 1\n"
    )
}

#[test]
fn spans_reach_the_collector_with_the_trace_context_of_the_request() {
    let (collector, got) = receiver();
    let echo = Upstream::echo();
    let failing = Upstream::start(|_req| async move {
        let mut r = http::Response::new(full("down"));
        *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        r
    });
    let on = "        sampler: {name: always_on}\n        additional_attributes: [remote_addr, http_x_missing]\n        additional_header_prefix_attributes: [\"x-tenant-*\"]\n";
    let parent = "        sampler: {name: parent_base, options: {root: {name: always_off}}}\n";
    let yaml = format!(
        "plugin_attr:\n  opentelemetry:\n    collector:\n      address: \"{}\"\n      request_headers: {{x-otel-key: k1}}\n    batch_span_processor: {{batch_timeout: 0.2, inactive_timeout: 0.05}}\n    resource: {{service.name: edge-gw, zone: 3}}\n    set_ngx_var: true\n\
nginx_config:\n  http:\n    access_log: logs/access.log\n    access_log_format: '$uri $opentelemetry_trace_id $opentelemetry_span_id'\n\
routes:\n{}{}{}{}{}",
        collector.node(),
        route("traced", "/traced/*", on, &echo.node()),
        route("parent", "/parent", parent, &echo.node()),
        route("off", "/off", "        sampler: {name: always_off}\n", &echo.node()),
        route("failing", "/failing", on, &failing.node()),
        route("dead", "/dead", on, &format!("127.0.0.1:{}", closed_port())),
    );
    let gw = Gateway::start(&yaml);

    // A request with no trace context starts a trace; the upstream gets the client span.
    let r = Req::get(&gw.url("/traced/a?x=1"))
        .header("user-agent", "otel-test")
        .header("x-tenant-id", "t-7")
        .header("x-tenant-zone", "eu")
        .send();
    assert_eq!(r.status, 200);
    let (trace, up_parent, flags) = sent_upstream(&r);
    assert_eq!(flags, "01");
    let spans = got.trace(&trace, 2);
    assert_eq!(spans.len(), 2, "one server and one client span");
    let server = spans.iter().find(|s| s.kind == 2).expect("a server span");
    let client = spans.iter().find(|s| s.kind == 3).expect("a client span");
    assert_eq!(server.name, "GET /traced/*");
    assert!(server.parent_span_id.is_empty(), "a root span");
    assert_eq!(client.parent_span_id, server.span_id);
    assert_eq!(
        hex(&client.span_id),
        up_parent,
        "traceparent names the upstream call"
    );
    assert!(server.start_time_unix_nano <= client.start_time_unix_nano);
    assert!(client.end_time_unix_nano <= server.end_time_unix_nano);
    let a = attrs(&server.attributes);
    assert_eq!(a["http.method"], "GET");
    assert_eq!(a["http.target"], "/traced/a?x=1");
    assert_eq!(a["http.scheme"], "http");
    assert_eq!(a["http.route"], "/traced/*");
    assert_eq!(a["http.user_agent"], "otel-test");
    assert_eq!(a["apisix.route_id"], "traced");
    assert_eq!(a["apisix.route_name"], "traced-route");
    assert_eq!(a["http.status_code"], "200");
    assert_eq!(a["http.response.status_code"], "200");
    assert_eq!(a["remote_addr"], "127.0.0.1");
    assert_eq!(a["x-tenant-id"], "t-7");
    assert_eq!(a["x-tenant-zone"], "eu");
    assert!(!a.contains_key("http_x_missing"));
    assert_eq!(server.status.as_ref().map(|s| s.code), Some(0));
    let c = attrs(&client.attributes);
    assert_eq!(c["server.address"], "127.0.0.1");
    assert_eq!(c["server.port"], echo.port().to_string());
    assert_eq!(c["http.response.status_code"], "200");
    assert_eq!(c["url.path"], "/traced/a?x=1");
    {
        let r = got.0.lock().unwrap();
        let (headers, req) = r.first().unwrap();
        assert_eq!(headers.get("x-otel-key").unwrap(), "k1");
        let rs = &req.resource_spans[0];
        let res = attrs(&rs.resource.as_ref().unwrap().attributes);
        assert_eq!(res["service.name"], "edge-gw");
        assert_eq!(res["zone"], "3");
        assert!(res.contains_key("hostname"));
        assert_eq!(
            rs.scope_spans[0].scope.as_ref().unwrap().name,
            "opentelemetry-lua"
        );
    }

    // A client's trace continues: same trace id, the client's span as parent.
    let incoming_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let incoming_span = "00f067aa0ba902b7";
    let r = Req::get(&gw.url("/traced/b"))
        .header(
            "traceparent",
            &format!("00-{incoming_trace}-{incoming_span}-01"),
        )
        .send();
    let (trace, _, _) = sent_upstream(&r);
    assert_eq!(trace, incoming_trace);
    let spans = got.trace(incoming_trace, 2);
    let server = spans.iter().find(|s| s.kind == 2).unwrap();
    assert_eq!(hex(&server.parent_span_id), incoming_span);

    // parent_base follows the client's sampled flag, and the root sampler without one.
    let unsampled = "5bf92f3577b34da6a3ce929d0e0e4736";
    let r = Req::get(&gw.url("/parent"))
        .header("traceparent", &format!("00-{unsampled}-{incoming_span}-00"))
        .send();
    let (trace, parent_id, flags) = sent_upstream(&r);
    assert_eq!((trace.as_str(), flags.as_str()), (unsampled, "00"));
    assert_ne!(
        parent_id, incoming_span,
        "the gateway's own span goes upstream"
    );
    let sampled = "6bf92f3577b34da6a3ce929d0e0e4736";
    let r = Req::get(&gw.url("/parent"))
        .header("traceparent", &format!("00-{sampled}-{incoming_span}-01"))
        .send();
    assert_eq!(sent_upstream(&r).2, "01");
    got.trace(sampled, 2);
    let r = get(&gw.url("/parent"));
    let (root_trace, _, flags) = sent_upstream(&r);
    assert_eq!(
        flags, "00",
        "no parent: the root sampler (always_off) decides"
    );

    // always_off: the context still goes upstream, not sampled, and nothing is exported.
    let r = get(&gw.url("/off"));
    let (off_trace, _, flags) = sent_upstream(&r);
    assert_eq!(flags, "00");

    // An upstream that answers 503, and one that cannot be reached: error status.
    let r = get(&gw.url("/failing"));
    assert_eq!(r.status, 503);
    let r = get(&gw.url("/dead"));
    assert_eq!(r.status, 502);
    let deadline = Instant::now() + Duration::from_secs(15);
    let (failing_server, dead_server, dead_client) = loop {
        let spans = got.spans();
        let server_of = |route: &str| {
            spans
                .iter()
                .find(|s| {
                    s.kind == 2
                        && attrs(&s.attributes)
                            .get("apisix.route_id")
                            .map(String::as_str)
                            == Some(route)
                })
                .cloned()
        };
        let client_of = |server: &Span| {
            spans
                .iter()
                .find(|s| s.kind == 3 && s.parent_span_id == server.span_id)
                .cloned()
        };
        if let (Some(f), Some(d)) = (server_of("failing"), server_of("dead")) {
            if let Some(dc) = client_of(&d) {
                break (f, d, dc);
            }
        }
        assert!(Instant::now() < deadline, "error spans did not arrive");
        std::thread::sleep(Duration::from_millis(20));
    };
    let st = failing_server.status.unwrap();
    assert_eq!(st.code, 2, "error");
    assert_eq!(st.message, "upstream response status: 503");
    assert_eq!(attrs(&failing_server.attributes)["http.status_code"], "503");
    assert_eq!(dead_server.status.unwrap().code, 2);
    assert_eq!(dead_client.status.unwrap().code, 2);

    // Unsampled traces were never exported.
    for t in [unsampled, root_trace.as_str(), off_trace.as_str()] {
        assert!(
            got.spans().iter().all(|s| hex(&s.trace_id) != t),
            "trace {t} was not sampled"
        );
    }

    // set_ngx_var: the access log sees the server span's ids.
    let log = gw.config_dir().join("logs/access.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.starts_with("/traced/b ")) {
            break l.to_string();
        }
        assert!(Instant::now() < deadline, "no access log line: {text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let server = got
        .trace(incoming_trace, 2)
        .into_iter()
        .find(|s| s.kind == 2)
        .unwrap();
    assert_eq!(
        line,
        format!("/traced/b {incoming_trace} {}", hex(&server.span_id))
    );
}

#[test]
fn plugin_metadata_settings_win_and_request_ids_become_trace_ids() {
    let (collector, got) = receiver();
    let echo = Upstream::echo();
    let yaml = format!(
        "plugin_attr:\n  opentelemetry:\n    collector: {{address: \"127.0.0.1:{}\"}}\n\
plugin_metadata:\n  - id: opentelemetry\n    trace_id_source: x-request-id\n    collector: {{address: \"http://{}\"}}\n    batch_span_processor: {{batch_timeout: 0.1, inactive_timeout: 0.05}}\n\
routes:\n{}",
        closed_port(),
        collector.node(),
        route(
            "rid",
            "/rid",
            "        sampler: {name: always_on}\n",
            &echo.node()
        ),
    );
    let gw = Gateway::start(&yaml);
    let id = "0f8fad5b-d9cb-469f-a165-70867728950e";
    let r = Req::get(&gw.url("/rid")).header("x-request-id", id).send();
    assert_eq!(r.status, 200);
    let (trace, _, _) = sent_upstream(&r);
    assert_eq!(trace, "0f8fad5bd9cb469fa16570867728950e");
    let spans = got.trace(&trace, 2);
    assert_eq!(spans.len(), 2);
    let res = {
        let r = got.0.lock().unwrap();
        attrs(
            &r[0].1.resource_spans[0]
                .resource
                .as_ref()
                .unwrap()
                .attributes,
        )
    };
    assert_eq!(
        res["service.name"], "APISIX",
        "APISIX's default service name"
    );
}

#[test]
fn bad_opentelemetry_settings_are_refused_with_their_path() {
    let (code, out) = check(
        "plugin_attr:\n  opentelemetry:\n    batch_span_processor: {max_export_batch_size: 0}\nroutes: []\n",
    );
    assert_ne!(code, 0);
    assert!(
        out.contains("plugin_attr.opentelemetry.batch_span_processor.max_export_batch_size"),
        "{out}"
    );
    let (code, out) =
        check("plugin_metadata:\n  - id: opentelemetry\n    trace_id_source: uuid\nroutes: []\n");
    assert_ne!(code, 0);
    assert!(out.contains("trace_id_source"), "{out}");
}

#[test]
fn a_collector_that_is_down_costs_spans_not_requests() {
    let echo = Upstream::echo();
    let yaml = format!(
        "plugin_attr:\n  prometheus:\n    export_addr: {{ip: 127.0.0.1, port: 0}}\n  opentelemetry:\n    collector: {{address: \"127.0.0.1:{}\", request_timeout: 1}}\n    batch_span_processor: {{batch_timeout: 0.1, inactive_timeout: 0.02}}\n\
routes:\n{}",
        closed_port(),
        route("down", "/down", "        sampler: {name: always_on}\n", &echo.node()),
    );
    let gw = Gateway::start(&yaml);
    let url = common::observability::metrics_url(&gw);
    let spans = |outcome| {
        let (_, s, _) = common::observability::scrape(&url, None);
        common::observability::value(&s, "moongate_otel_spans_total", &[("outcome", outcome)])
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut sent = 0;
    // Requests keep being served; each one's two spans fail to export (bounded).
    while spans("failed") < 4.0 {
        assert_eq!(get(&gw.url("/down")).status, 200);
        sent += 1;
        assert!(
            Instant::now() < deadline && sent < 200,
            "failed spans: {}",
            spans("failed")
        );
        std::thread::sleep(Duration::from_millis(30));
    }
    assert_eq!(spans("exported"), 0.0);
    // One line per failing stretch, not one per batch.
    assert_eq!(
        gw.logs().matches("opentelemetry: exporting").count(),
        1,
        "{}",
        gw.logs()
    );
}
