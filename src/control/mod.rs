//! APISIX's control API (`enable_control`, `control: {ip, port}`): the health of upstream
//! nodes as APISIX's `GET /v1/healthcheck` and `GET /v1/healthcheck/{routes|services|upstreams}/{id}`
//! show it, read from the current snapshot. Served on the control runtime; no key (it listens
//! on loopback by default, as in APISIX).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

use crate::health::UpstreamHealth;
use crate::snapshot::{Gateway, Snapshot};
use crate::supervisor::BoundListener;

/// The role of the control API's listener in a [`crate::supervisor::ListenerSet`].
pub const ROLE: &str = "control";

/// Serves the control API on `listener` (on `rt`). Logs `control API listening at
/// http://ADDR`.
pub fn start(
    listener: BoundListener,
    gw: Arc<Gateway>,
    rt: &tokio::runtime::Handle,
) -> std::io::Result<SocketAddr> {
    let handler = Arc::new(move |req: &Request<_>| respond(req, &gw.load_full()));
    crate::local_api::serve("control API", listener, rt, handler)
}

fn respond<B>(req: &Request<B>, snap: &Snapshot) -> Response<Full<Bytes>> {
    let html = req
        .headers()
        .get(header::ACCEPT)
        .is_some_and(|v| String::from_utf8_lossy(v.as_bytes()).contains("text/html"));
    let (status, body) = route(req.method(), req.uri().path(), snap);
    if html && status == StatusCode::OK {
        let stats = match &body {
            Value::Array(list) => list.clone(),
            one => vec![one.clone()],
        };
        return reply(status, render_html(&stats).into(), "text/html");
    }
    reply(status, body.to_string().into(), "application/json")
}

fn reply(status: StatusCode, body: Bytes, ctype: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

fn error(status: StatusCode, msg: String) -> (StatusCode, Value) {
    (status, json!({ "error_msg": msg }))
}

/// What a path answers.
fn route(method: &Method, path: &str, snap: &Snapshot) -> (StatusCode, Value) {
    if method != Method::GET {
        return error(StatusCode::NOT_FOUND, "not found".into());
    }
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["v1", "healthcheck"] => (
            StatusCode::OK,
            Value::Array(snap.health.iter().map(|h| checker_info(h)).collect()),
        ),
        ["v1", "healthcheck", kind] => error(
            StatusCode::NOT_FOUND,
            format!("missing src id for src type {kind}"),
        ),
        ["v1", "healthcheck", kind, id] => one_checker(snap, kind, id),
        _ => error(StatusCode::NOT_FOUND, "not found".into()),
    }
}

/// `/v1/healthcheck/{kind}/{id}`, with APISIX's errors.
fn one_checker(snap: &Snapshot, kind: &str, id: &str) -> (StatusCode, Value) {
    let doc = &snap.doc;
    let id_is = |i: &Option<crate::config::Id>| i.as_ref().is_some_and(|i| i.0 == id);
    let exists = match kind {
        "routes" => doc.routes.iter().any(|r| id_is(&r.id)),
        "services" => doc.services.iter().any(|s| id_is(&s.id)),
        "upstreams" => doc.upstreams.iter().any(|u| id_is(&u.id)),
        _ => return error(StatusCode::BAD_REQUEST, format!("invalid src type {kind}")),
    };
    if !exists {
        return error(StatusCode::NOT_FOUND, format!("{kind}[{id}] not found"));
    }
    let key = format!("/apisix/{kind}/{id}");
    match snap.health.iter().find(|h| *h.key == *key) {
        Some(h) => (StatusCode::OK, checker_info(h)),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no checker for {kind}[{id}]"),
        ),
    }
}

/// One checker as APISIX shows it: `name` (the resource key), `type`, and per node its
/// target as lua-resty-healthcheck holds it (`ip`: the address, a named node's current one;
/// `port`: the probed port; `hostname`: `checks.active.host`, else the ip), its status and
/// counters.
fn checker_info(h: &UpstreamHealth) -> Value {
    let active = &h.checks.active;
    let nodes: Vec<Value> = h
        .nodes
        .iter()
        .map(|n| {
            let c = n.counters();
            let ip = crate::dns::current_addr(&n.host)
                .map(|a| a.to_string())
                .unwrap_or_else(|| n.host.clone());
            let hostname = active.host.clone().unwrap_or_else(|| ip.clone());
            json!({
                "ip": ip,
                "port": active.port.unwrap_or(n.port),
                "hostname": hostname,
                "status": n.status(),
                "counter": {
                    "success": c.success,
                    "http_failure": c.http_failure,
                    "tcp_failure": c.tcp_failure,
                    "timeout_failure": c.timeout_failure,
                },
            })
        })
        .collect();
    json!({
        "name": &*h.key,
        "type": h.checks.active.kind.as_str(),
        "nodes": nodes,
    })
}

/// The table APISIX renders for a browser (`Accept: text/html`).
fn render_html(stats: &[Value]) -> String {
    let mut out = String::from(
        "<html xmlns=\"http://www.w3.org/1999/xhtml\">\n<head>\n  <title>upstream check status</title>\n</head>\n<body>\n<h1>upstream check status</h1>\n<table style=\"background-color:white\" cellspacing=\"0\" cellpadding=\"3\" border=\"1\">\n  <tr bgcolor=\"#C0C0C0\">\n    <th>Index</th>\n    <th>Upstream</th>\n    <th>Check type</th>\n    <th>Host</th>\n    <th>Status</th>\n    <th>Success counts</th>\n    <th>TCP Failures</th>\n    <th>HTTP Failures</th>\n    <th>TIMEOUT Failures</th>\n  </tr>\n",
    );
    let mut i = 0;
    for stat in stats {
        let name = stat["name"].as_str().unwrap_or("");
        let kind = stat["type"].as_str().unwrap_or("");
        for n in stat["nodes"].as_array().into_iter().flatten() {
            i += 1;
            let status = n["status"].as_str().unwrap_or("");
            let row = if status == "healthy" || status == "mostly_healthy" {
                "  <tr>\n"
            } else {
                "  <tr bgcolor=\"#FF0000\">\n"
            };
            out.push_str(row);
            let host = format!(
                "{}:{}",
                n["ip"].as_str().unwrap_or(""),
                n["port"].as_u64().unwrap_or(0)
            );
            let c = &n["counter"];
            let cells = [
                i.to_string(),
                name.to_string(),
                kind.to_string(),
                host,
                status.to_string(),
                c["success"].to_string(),
                c["tcp_failure"].to_string(),
                c["http_failure"].to_string(),
                c["timeout_failure"].to_string(),
            ];
            for cell in cells {
                out.push_str("    <td>");
                out.push_str(&escape(&cell));
                out.push_str("</td>\n");
            }
            out.push_str("  </tr>\n");
        }
    }
    out.push_str("</table>\n</body>\n</html>\n");
    out
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_escapes() {
        let stats = vec![
            json!({"name": "/apisix/routes/<x>", "type": "http", "nodes": [
                {"ip": "127.0.0.1", "port": 1, "status": "unhealthy",
                 "counter": {"success": 0, "tcp_failure": 2, "http_failure": 0, "timeout_failure": 0}}
            ]}),
        ];
        let html = render_html(&stats);
        assert!(html.contains("<td>/apisix/routes/&lt;x&gt;</td>"));
        assert!(html.contains("<tr bgcolor=\"#FF0000\">") && html.contains("<td>127.0.0.1:1</td>"));
    }
}
