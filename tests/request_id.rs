//! The native `request-id` plugin (APISIX's schema): ids from each algorithm sent upstream and
//! back, a client's own id kept, `include_in_response: false`, a custom header, and the id in
//! `ctx.var.apisix_request_id` for later plugins and the access log.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Puts what it reads from `ctx.var.apisix_request_id` into an `X-Seen` response header.
const SEE_ID: &str = r#"
local core = require("apisix.core")
local _M = { version = 0.1, priority = 10, name = "see-id", schema = { type = "object" } }
function _M.check_schema(conf) return true end
function _M.header_filter(conf, ctx)
    core.response.set_header("X-Seen", ctx.var.apisix_request_id)
end
return _M
"#;

fn route(id: &str, conf: &str, node: &str) -> String {
    format!(
        "  - id: {id}\n    uri: /{id}\n    plugins:\n      request-id: {conf}\n      see-id: {{}}\n    upstream:\n      nodes:\n        \"{node}\": 1\n"
    )
}

fn start(up: &Upstream) -> Gateway {
    let n = up.node();
    Gateway::start_with_plugins(
        &[("see-id", SEE_ID)],
        &format!(
            "nginx_config:\n  http:\n    access_log: logs/access.log\n    access_log_format: '$uri $apisix_request_id'\n\
routes:\n{}{}{}{}{}{}",
            route("uuid", "{}", &n),
            route("nanoid", "{algorithm: nanoid}", &n),
            route("range", "{algorithm: range_id, range_id: {char_set: xyz123, length: 10}}", &n),
            route("quiet", "{include_in_response: false}", &n),
            route("custom", "{header_name: X-Trace-Id, algorithm: uuidv7}", &n),
            route("ksuid", "{algorithm: ksuid}", &n),
        ),
    )
}

/// `8-4-4-4-12` lower-case hex with the given version digit.
fn is_uuid(s: &str, version: char) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.iter().map(|p| p.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
        && s.bytes()
            .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && parts[2].starts_with(version)
}

/// The id the upstream got in `header`, the one in the response, and `X-Seen`.
fn call(
    gw: &Gateway,
    path: &str,
    header: &str,
    sent: Option<&str>,
) -> (String, Option<String>, Option<String>) {
    let mut req = Req::get(&gw.url(path));
    if let Some(s) = sent {
        req = req.header(header, s);
    }
    let r = req.send();
    assert_eq!(r.status, 200, "{}", r.text());
    let upstream = r.json()["headers"][header.to_ascii_lowercase()]
        .as_str()
        .unwrap_or_else(|| panic!("no {header} upstream: {}", r.text()))
        .to_string();
    (upstream, r.header(header), r.header("x-seen"))
}

#[test]
fn each_algorithm_makes_an_id_sent_upstream_and_back() {
    let up = Upstream::echo();
    let gw = start(&up);

    let (id, back, seen) = call(&gw, "/uuid", "X-Request-Id", None);
    assert!(is_uuid(&id, '4'), "{id}");
    assert_eq!(back.as_deref(), Some(id.as_str()));
    assert_eq!(seen.as_deref(), Some(id.as_str()));
    let (other, _, _) = call(&gw, "/uuid", "X-Request-Id", None);
    assert_ne!(id, other);

    let (id, back, _) = call(&gw, "/nanoid", "X-Request-Id", None);
    assert_eq!(id.len(), 21, "{id}");
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "{id}"
    );
    assert_eq!(back.as_deref(), Some(id.as_str()));

    let (id, back, _) = call(&gw, "/range", "X-Request-Id", None);
    assert_eq!(id.len(), 10, "{id}");
    assert!(id.bytes().all(|b| b"xyz123".contains(&b)), "{id}");
    assert_eq!(back.as_deref(), Some(id.as_str()));

    let (id, back, seen) = call(&gw, "/custom", "X-Trace-Id", None);
    assert!(is_uuid(&id, '7'), "{id}");
    assert_eq!(back.as_deref(), Some(id.as_str()));
    assert_eq!(seen.as_deref(), Some(id.as_str()));

    let (id, back, _) = call(&gw, "/ksuid", "X-Request-Id", None);
    assert_eq!(id.len(), 27, "{id}");
    assert!(id.bytes().all(|b| b.is_ascii_alphanumeric()), "{id}");
    assert_eq!(back.as_deref(), Some(id.as_str()));
}

#[test]
fn a_client_id_is_kept_and_include_in_response_false_keeps_it_upstream_only() {
    let up = Upstream::echo();
    let gw = start(&up);
    let (id, back, seen) = call(&gw, "/uuid", "X-Request-Id", Some("client-id-1"));
    assert_eq!(id, "client-id-1");
    assert_eq!(back.as_deref(), Some("client-id-1"));
    assert_eq!(seen.as_deref(), Some("client-id-1"));

    let (id, back, seen) = call(&gw, "/quiet", "X-Request-Id", None);
    assert!(is_uuid(&id, '4'), "{id}");
    assert_eq!(back, None);
    // Later plugins still see it.
    assert_eq!(seen.as_deref(), Some(id.as_str()));

    // The access log's `$apisix_request_id` is the same id.
    let path = gw.config_dir().join("logs/access.log");
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.lines().count() >= 2 {
            break text;
        }
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(10));
    };
    // Two workers hand over their own batches of lines: the file is in batch order.
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort_unstable();
    let quiet = format!("/quiet {id}");
    assert_eq!(lines, [quiet.as_str(), "/uuid client-id-1"]);
}

#[test]
fn bad_confs_are_refused_with_apisix_wording() {
    let (code, out) = check(
        "routes:\n  - id: r\n    uri: /r\n    plugins:\n      request-id: {algorithm: snowflake}\n    upstream:\n      nodes:\n        \"127.0.0.1:1\": 1\n",
    );
    assert_eq!(code, 1);
    assert!(
        out.contains("request-id") && out.contains("algorithm"),
        "{out}"
    );
    let (code, out) = check(
        "routes:\n  - id: r\n    uri: /r\n    plugins:\n      request-id: {algorithm: range_id, range_id: {length: 3}}\n    upstream:\n      nodes:\n        \"127.0.0.1:1\": 1\n",
    );
    assert_eq!(code, 1);
    assert!(
        out.contains("property \"range_id\" validation failed: property \"length\" validation failed: expected 3 to be at least 6"),
        "{out}"
    );
}
