//! The network example plugins in `plugins/` (example-token-introspection,
//! example-batch-logger) in the real gateway binary, against servers this test runs on
//! loopback: an RFC 7662 introspection endpoint that counts its calls, and a log collector
//! that keeps every batch it receives. `plugins/tests/*.test.yaml` cover what needs no server.

mod common;

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};

use common::*;

fn repo_plugins() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("plugins")
        .display()
        .to_string()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Polls `f` every 20 ms for up to 10 s.
fn poll(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What the introspection endpoint was sent, per call.
#[derive(Clone, Debug)]
struct Call {
    authorization: Option<String>,
    content_type: Option<String>,
    form: HashMap<String, String>,
}

/// An RFC 7662 endpoint: `good` and `other` are active (`other` without a scope), `expired`
/// says active with an `exp` in the past, `broken` answers 500, anything else is inactive.
/// With `basic`, a call without that Authorization header gets 401.
fn introspection_server(basic: Option<&'static str>) -> (Upstream, Arc<Mutex<Vec<Call>>>) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    let up = Upstream::start(move |req| {
        let seen = seen.clone();
        async move {
            let header = |n: &str| {
                req.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let authorization = header("authorization");
            let content_type = header("content-type");
            let body = req.into_body().collect().await.expect("body").to_bytes();
            let form: HashMap<String, String> =
                form_urlencoded::parse(&body).into_owned().collect();
            let token = form.get("token").cloned().unwrap_or_default();
            seen.lock().unwrap().push(Call {
                authorization: authorization.clone(),
                content_type,
                form,
            });
            if basic.is_some() && authorization.as_deref() != basic {
                return Response::builder()
                    .status(StatusCode::UNAUTHORIZED)
                    .body(full("{\"error\":\"invalid_client\"}"))
                    .expect("response");
            }
            let answer = match token.as_str() {
                "good" => json!({"active": true, "sub": "alice", "scope": "read write",
                                 "client_id": "app", "exp": now() + 3600}),
                "other" => json!({"active": true, "sub": "bob", "exp": now() + 3600}),
                "expired" => json!({"active": true, "sub": "carol", "exp": now() - 10}),
                "broken" => {
                    return Response::builder()
                        .status(StatusCode::INTERNAL_SERVER_ERROR)
                        .body(full("oops"))
                        .expect("response")
                }
                _ => json!({"active": false}),
            };
            Response::builder()
                .header("content-type", "application/json")
                .body(full(answer.to_string()))
                .expect("response")
        }
    });
    (up, calls)
}

fn bearer(gw: &Gateway, path: &str, token: &str) -> Resp {
    Req::get(&gw.url(path))
        .header("authorization", &format!("Bearer {token}"))
        .send()
}

#[test]
fn token_introspection_caches_active_answers() {
    // The client secret has a ':' in it: RFC 6749 form-encodes id and secret before joining.
    let basic = "Basic Z3c6cyUzQWNyZXQ="; // base64("gw:s%3Acret")
    let (idp, calls) = introspection_server(Some(basic));
    let up = Upstream::echo();
    let endpoint = format!("http://{}/introspect", idp.node());
    let gw = Gateway::start(&format!(
        r#"plugin_dirs: [{plugins}]
workers: 1
lua:
  shared_dicts:
    example-token-introspection: 1m
routes:
  - id: api
    uri: /api/*
    plugins:
      example-token-introspection:
        introspection_endpoint: {endpoint}
        client_id: gw
        client_secret: "s:cret"
        token_type_hint: access_token
        hide_credentials: true
    upstream:
      nodes:
        "{up}": 1
  - id: nocache
    uri: /nocache/*
    plugins:
      example-token-introspection:
        introspection_endpoint: {endpoint}
        client_id: gw
        client_secret: "s:cret"
        cache_ttl: 0
        negative_cache_ttl: 0
    upstream:
      nodes:
        "{up}": 1
"#,
        plugins = repo_plugins(),
        up = up.node()
    ));
    let calls_made = || calls.lock().unwrap().len();

    // An active token: the upstream gets its subject and scope, not what the client claimed,
    // and (hide_credentials) not the token.
    let r = Req::get(&gw.url("/api/a"))
        .header("authorization", "Bearer good")
        .header("x-token-sub", "mallory")
        .send();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    let seen = r.json();
    assert_eq!(seen["headers"]["x-token-sub"], "alice", "{seen}");
    assert_eq!(seen["headers"]["x-token-scope"], "read write", "{seen}");
    assert!(seen["headers"].get("authorization").is_none(), "{seen}");
    assert_eq!(calls_made(), 1);
    let call = calls.lock().unwrap()[0].clone();
    assert_eq!(call.authorization.as_deref(), Some(basic));
    assert_eq!(
        call.content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(call.form.get("token").map(String::as_str), Some("good"));
    assert_eq!(
        call.form.get("token_type_hint").map(String::as_str),
        Some("access_token")
    );

    // The same token again: answered from the shared dictionary, no call.
    let r = bearer(&gw, "/api/b", "good");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["headers"]["x-token-sub"], "alice");
    assert_eq!(
        calls_made(),
        1,
        "the second request was not served from the cache"
    );

    // Another token is another entry; a token without a scope sends no scope header even
    // when the client sets one.
    let r = Req::get(&gw.url("/api/c"))
        .header("authorization", "Bearer other")
        .header("x-token-scope", "admin")
        .send();
    assert_eq!(r.status, 200);
    let seen = r.json();
    assert_eq!(seen["headers"]["x-token-sub"], "bob");
    assert!(seen["headers"].get("x-token-scope").is_none(), "{seen}");
    assert_eq!(calls_made(), 2);

    // An inactive token: 401 with the RFC 6750 challenge; the negative answer is cached too.
    for _ in 0..2 {
        let r = bearer(&gw, "/api/d", "revoked");
        assert_eq!(r.status, 401);
        assert_eq!(
            r.header("www-authenticate").as_deref(),
            Some(
                "Bearer realm=\"moongate\", error=\"invalid_token\", \
                 error_description=\"The access token is not active\""
            )
        );
        assert_eq!(r.json()["message"], "The access token is not active");
    }
    assert_eq!(calls_made(), 3, "the inactive answer was not cached");

    // `active: true` with an `exp` already past is not active.
    let r = bearer(&gw, "/api/e", "expired");
    assert_eq!(r.status, 401);
    assert_eq!(calls_made(), 4);

    // No token: refused before any call.
    let r = get(&gw.url("/api/f"));
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate").as_deref(),
        Some("Bearer realm=\"moongate\"")
    );
    assert_eq!(calls_made(), 4);

    // With the caches off every request asks.
    for _ in 0..2 {
        assert_eq!(bearer(&gw, "/nocache/a", "good").status, 200);
        assert_eq!(bearer(&gw, "/nocache/a", "revoked").status, 401);
    }
    assert_eq!(calls_made(), 8);
    // One kept-alive connection served every call (the worker's cosocket pool).
    assert_eq!(idp.connections(), 1);
}

#[test]
fn token_introspection_failures_are_not_cached() {
    let (idp, calls) = introspection_server(Some("Basic Z3c6cw==")); // gw:s
    let up = Upstream::echo();
    let gw = Gateway::start(&format!(
        r#"plugin_dirs: [{plugins}]
workers: 1
lua:
  shared_dicts:
    example-token-introspection: 1m
routes:
  - id: down
    uri: /down
    plugins:
      example-token-introspection:
        introspection_endpoint: http://127.0.0.1:{closed}/introspect
    upstream:
      nodes:
        "{up}": 1
  - id: broken
    uri: /broken
    plugins:
      example-token-introspection:
        introspection_endpoint: http://{idp}/introspect
        client_id: gw
        client_secret: s
    upstream:
      nodes:
        "{up}": 1
  - id: wrongauth
    uri: /wrongauth
    plugins:
      example-token-introspection:
        introspection_endpoint: http://{idp}/introspect
        client_id: gw
        client_secret: x
        failure_status: 502
    upstream:
      nodes:
        "{up}": 1
"#,
        plugins = repo_plugins(),
        closed = closed_port(),
        idp = idp.node(),
        up = up.node()
    ));

    // The service is down: 503, the reason in the log, the upstream not reached.
    let r = bearer(&gw, "/down", "good");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["message"], "Token introspection failed");
    assert!(gw.wait_for_log("failed: connection refused", Duration::from_secs(5)));
    assert_eq!(up.requests(), 0);

    // The service answers 500: 503 each time, and each time it is asked again.
    for i in 1..=2 {
        let r = bearer(&gw, "/broken", "broken");
        assert_eq!(r.status, 503);
        assert_eq!(calls.lock().unwrap().len(), i);
    }
    assert!(gw.wait_for_log("failed: status 500", Duration::from_secs(5)));
    // The endpoint refuses the gateway's credentials: the configured status.
    let r = bearer(&gw, "/wrongauth", "good");
    assert_eq!(r.status, 502);
    assert!(gw.wait_for_log("failed: status 401", Duration::from_secs(5)));
    assert_eq!(up.requests(), 0);
}

/// A log collector: keeps each batch's lines (parsed) and Content-Type.
fn collector_on(l: TcpListener) -> (Upstream, Arc<Mutex<Vec<Vec<Value>>>>) {
    let batches = Arc::new(Mutex::new(Vec::new()));
    let kept = batches.clone();
    let up = Upstream::start_on(l, move |req| {
        let kept = kept.clone();
        async move {
            let ct = req
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = req.into_body().collect().await.expect("body").to_bytes();
            let text = String::from_utf8_lossy(&body).to_string();
            assert_eq!(ct, "application/x-ndjson");
            assert!(text.ends_with('\n'), "{text:?}");
            let lines = text
                .lines()
                .map(|l| serde_json::from_str(l).expect("a JSON line"))
                .collect();
            kept.lock().unwrap().push(lines);
            Response::new(full("ok"))
        }
    });
    (up, batches)
}

fn lines(batches: &Mutex<Vec<Vec<Value>>>) -> Vec<Value> {
    batches.lock().unwrap().iter().flatten().cloned().collect()
}

#[test]
fn batch_logger_sends_batches_from_a_timer() {
    let (col, batches) = collector_on(TcpListener::bind("127.0.0.1:0").expect("bind"));
    let up = Upstream::echo();
    let gw = Gateway::start(&format!(
        r#"plugin_dirs: [{plugins}]
workers: 1
routes:
  - id: full
    uri: /full
    plugins:
      example-batch-logger:
        endpoint: http://{col}/ingest
        batch_max_size: 5
        inactive_timeout: 3600
    upstream:
      nodes:
        "{up}": 1
  - id: idle
    uri: /idle
    plugins:
      example-batch-logger:
        endpoint: http://{col}/other
        batch_max_size: 100
        inactive_timeout: 0.2
    upstream:
      nodes:
        "{up}": 1
"#,
        plugins = repo_plugins(),
        col = col.node(),
        up = up.node()
    ));

    // batch_max_size 5, no timeout to speak of: ten requests are two batches of five.
    for i in 0..10 {
        let r = get(&gw.url(&format!("/full?n={i}")));
        assert_eq!(r.status, 200, "{}", gw.logs());
    }
    poll("two batches", || lines(&batches).len() >= 10);
    let sizes: Vec<usize> = batches.lock().unwrap().iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![5, 5]);
    let got = lines(&batches);
    for (i, entry) in got.iter().enumerate() {
        assert_eq!(entry["uri"], format!("/full?n={i}"), "{entry}");
    }
    let e = &got[0];
    assert_eq!(e["route_id"], "full");
    assert_eq!(e["method"], "GET");
    assert_eq!(e["status"], 200);
    assert_eq!(e["upstream_status"], "200");
    assert_eq!(e["client_ip"], "127.0.0.1");
    assert!(e["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0), "{e}");
    assert!(e["time"].as_f64().is_some_and(|t| t > 1.0e9), "{e}");

    // Fewer than a batch: sent once inactive_timeout has passed.
    for i in 0..3 {
        assert_eq!(get(&gw.url(&format!("/idle?n={i}"))).status, 200);
    }
    poll("the partial batch", || batches.lock().unwrap().len() >= 3);
    assert_eq!(batches.lock().unwrap()[2].len(), 3);
    // The collector saw one connection, kept alive across batches (and endpoints).
    assert_eq!(col.connections(), 1);
}

/// The sum of N over the gateway's `dropped N log entries` warnings.
fn dropped(logs: &str) -> u64 {
    logs.lines()
        .filter_map(|l| l.split("dropped ").nth(1))
        .filter_map(|rest| rest.split(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn batch_logger_keeps_the_newest_entries_while_the_collector_is_down() {
    let port = closed_port();
    let up = Upstream::echo();
    let gw = Gateway::start(&format!(
        r#"plugin_dirs: [{plugins}]
workers: 1
routes:
  - id: r
    uri: /r
    plugins:
      example-batch-logger:
        endpoint: http://127.0.0.1:{port}/ingest
        batch_max_size: 100
        inactive_timeout: 0.2
        max_buffered: 20
        max_retry_count: 1
        retry_delay: 0.05
    upstream:
      nodes:
        "{up}": 1
"#,
        plugins = repo_plugins(),
        up = up.node()
    ));

    // The collector is down: the requests are served, and past 20 waiting entries the oldest
    // go, with a warning counting them.
    for i in 0..50 {
        assert_eq!(get(&gw.url(&format!("/r?n={i}"))).status, 200);
    }
    poll("the dropped entries to be counted", || {
        dropped(&gw.logs()) == 30
    });
    assert!(
        gw.logs().contains("log entries to http://127.0.0.1:"),
        "{}",
        gw.logs()
    );
    assert!(gw
        .logs()
        .contains("attempts: connection refused; keeping them for the next try"));

    // The collector comes up on that port: the 20 newest entries arrive, in order.
    let (_col, batches) = collector_on(TcpListener::bind(("127.0.0.1", port)).expect("rebind"));
    poll("the buffered entries", || lines(&batches).len() >= 20);
    let uris: Vec<String> = lines(&batches)
        .iter()
        .map(|e| e["uri"].as_str().unwrap_or("").to_string())
        .collect();
    let want: Vec<String> = (30..50).map(|i| format!("/r?n={i}")).collect();
    assert_eq!(uris, want);

    // Nothing else was waiting: the next entry is the only one after them.
    assert_eq!(get(&gw.url("/r?n=last")).status, 200);
    poll("the next entry", || lines(&batches).len() >= 21);
    let got = lines(&batches);
    assert_eq!(got.len(), 21);
    assert_eq!(got[20]["uri"], "/r?n=last");
    assert_eq!(dropped(&gw.logs()), 30);
}
