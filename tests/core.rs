//! The gateway core end to end: the real binary, real upstream servers on loopback.

mod common;

use std::time::Duration;

use common::*;

/// A route list entry proxying `uri` to `node`, with optional extra YAML lines (indented 4).
fn route(id: &str, uri: &str, node: &str, extra: &str) -> String {
    format!(
        "  - id: \"{id}\"\n    uri: \"{uri}\"\n{extra}    upstream:\n      nodes:\n        \"{node}\": 1\n"
    )
}

/// `plugins: response-headers: set: X-Route: $route_id`, so a response names its route.
const TAG_ROUTE: &str =
    "    plugins:\n      response-headers:\n        set:\n          X-Route: \"$route_id\"\n";

fn tagged(id: &str, uri: &str, node: &str, extra: &str) -> String {
    route(id, uri, node, &format!("{extra}{TAG_ROUTE}"))
}

// ---------------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------------

#[test]
fn exact_uri_and_404_body() {
    let up = Upstream::echo();
    let gw = Gateway::start(&format!(
        "routes:\n{}",
        route("1", "/hello", &up.node(), "")
    ));
    let r = get(&gw.url("/hello"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["uri"], "/hello");
    for miss in ["/hello/", "/hello/x", "/hell", "/"] {
        let r = get(&gw.url(miss));
        assert_eq!(r.status, 404, "{miss}");
        // APISIX's core.response.exit ends a JSON body with a newline.
        assert_eq!(
            r.text(),
            "{\"error_msg\":\"404 Route Not Found\"}\n",
            "{miss}"
        );
    }
}

#[test]
fn prefix_route_keeps_the_tail() {
    let up = Upstream::echo();
    let gw = Gateway::start(&format!(
        "routes:\n{}",
        route(
            "1",
            "/api/*",
            &up.node(),
            "    plugins:\n      response-headers:\n        set:\n          X-Uri: \"$uri\"\n"
        )
    ));
    let r = get(&gw.url("/api/a/b?q=1"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["uri"], "/api/a/b?q=1");
    assert_eq!(r.header("x-uri").as_deref(), Some("/api/a/b"));
    assert_eq!(get(&gw.url("/api/")).status, 200);
    assert_eq!(get(&gw.url("/apix")).status, 404);
}

#[test]
fn param_segments() {
    let up = Upstream::echo();
    let gw = Gateway::start(&format!(
        "routes:\n{}",
        route("1", "/user/:id/profile", &up.node(), "")
    ));
    assert_eq!(get(&gw.url("/user/42/profile")).status, 200);
    assert_eq!(get(&gw.url("/user/abc/profile")).status, 200);
    assert_eq!(get(&gw.url("/user/42")).status, 404);
    assert_eq!(get(&gw.url("/user/42/profile/x")).status, 404);
}

#[test]
fn methods() {
    let up = Upstream::echo();
    let gw = Gateway::start(&format!(
        "routes:\n{}",
        route("1", "/m", &up.node(), "    methods: [POST, PUT]\n")
    ));
    assert_eq!(request("GET", &gw.url("/m")).status, 404);
    let r = request("POST", &gw.url("/m"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["method"], "POST");
    assert_eq!(request("PUT", &gw.url("/m")).status, 200);
}

#[test]
fn hosts_exact_and_wildcard() {
    let up = Upstream::echo();
    let node = up.node();
    let gw = Gateway::start(&format!(
        "routes:\n{}{}{}",
        tagged("exact", "/h", &node, "    hosts: [api.example.com]\n"),
        tagged("wild", "/h", &node, "    host: \"*.example.com\"\n"),
        tagged("any", "/h", &node, ""),
    ));
    let tag = |host: &str| get_host(&gw.url("/h"), host).header("x-route");
    assert_eq!(tag("api.example.com").as_deref(), Some("exact"));
    assert_eq!(tag("API.Example.com").as_deref(), Some("exact"));
    assert_eq!(tag("api.example.com:9080").as_deref(), Some("exact"));
    assert_eq!(tag("a.example.com").as_deref(), Some("wild"));
    assert_eq!(tag("a.b.example.com").as_deref(), Some("wild"));
    assert_eq!(tag("example.com").as_deref(), Some("any"));
    assert_eq!(tag("other.org").as_deref(), Some("any"));
}

#[test]
fn priority_then_documented_tie_break() {
    let up = Upstream::echo();
    let node = up.node();
    let gw = Gateway::start(&format!(
        "routes:\n{}{}{}{}{}",
        tagged("low", "/p/*", &node, ""),
        tagged("high", "/p/*", &node, "    priority: 10\n"),
        // Same priority and pattern: numeric ids first, compared as numbers ("2" < "10").
        tagged("10", "/t/*", &node, ""),
        tagged("2", "/t/*", &node, ""),
        tagged("b", "/t/*", &node, ""),
    ));
    assert_eq!(
        get(&gw.url("/p/x")).header("x-route").as_deref(),
        Some("high")
    );
    assert_eq!(get(&gw.url("/t/x")).header("x-route").as_deref(), Some("2"));
}

#[test]
fn exact_beats_prefix_and_longer_prefix_wins() {
    let up = Upstream::echo();
    let node = up.node();
    let gw = Gateway::start(&format!(
        "routes:\n{}{}{}",
        tagged("all", "/*", &node, ""),
        tagged("api", "/api/*", &node, ""),
        tagged("exact", "/api/health", &node, ""),
    ));
    let tag = |p: &str| get(&gw.url(p)).header("x-route");
    assert_eq!(tag("/api/health").as_deref(), Some("exact"));
    assert_eq!(tag("/api/other").as_deref(), Some("api"));
    assert_eq!(tag("/else").as_deref(), Some("all"));
}

#[test]
fn disabled_route_is_not_matched() {
    let up = Upstream::echo();
    let gw = Gateway::start(&format!(
        "routes:\n{}",
        route("1", "/off", &up.node(), "    status: 0\n")
    ));
    assert_eq!(get(&gw.url("/off")).status, 404);
}

// ---------------------------------------------------------------------------------------------
// Forwarding
// ---------------------------------------------------------------------------------------------

#[test]
fn path_query_and_forwarding_headers() {
    let up = Upstream::echo();
    let gw = Gateway::start(&format!(
        "routes:\n{}",
        route("1", "/fwd/*", &up.node(), "")
    ));
    let r = Req::get(&gw.url("/fwd/a%20b/c?x=1&y=%2F&x=2"))
        .header("host", "client.test")
        .header("x-forwarded-for", "10.0.0.1")
        .send();
    assert_eq!(r.status, 200);
    let seen = r.json();
    assert_eq!(seen["uri"], "/fwd/a%20b/c?x=1&y=%2F&x=2");
    let h = &seen["headers"];
    assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
    assert_eq!(h["x-real-ip"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "client.test");
    assert_eq!(h["host"], "client.test");
}

#[test]
fn hop_by_hop_headers_removed_both_ways() {
    let up = Upstream::start(|req| async move {
        let mut resp = echo_response(req).await;
        let h = resp.headers_mut();
        h.insert("connection", "x-up-secret".parse().expect("value"));
        h.insert("x-up-secret", "1".parse().expect("value"));
        h.insert("keep-alive", "timeout=5".parse().expect("value"));
        h.insert("proxy-connection", "keep-alive".parse().expect("value"));
        h.insert("x-up-kept", "1".parse().expect("value"));
        resp
    });
    let gw = Gateway::start(&format!("routes:\n{}", route("1", "/h", &up.node(), "")));
    let r = Req::get(&gw.url("/h"))
        .header("connection", "keep-alive, x-secret")
        .header("x-secret", "1")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("proxy-connection", "keep-alive")
        .header("x-kept", "1")
        .send();
    assert_eq!(r.status, 200);
    let seen = r.json();
    let h = seen["headers"].as_object().expect("headers");
    for gone in ["x-secret", "keep-alive", "te", "proxy-connection"] {
        assert!(!h.contains_key(gone), "{gone} reached the upstream: {h:?}");
    }
    assert_eq!(h["x-kept"], "1");
    assert!(r.header("x-up-secret").is_none(), "{:?}", r.headers);
    assert!(r.header("keep-alive").is_none(), "{:?}", r.headers);
    assert!(r.header("proxy-connection").is_none(), "{:?}", r.headers);
    assert_eq!(r.header("x-up-kept").as_deref(), Some("1"));
}

/// The upstream's response headers reach the client the same whether they pass unparsed (no
/// plugin looks at them) or through a header_filter plugin.
#[test]
fn response_headers_same_with_and_without_plugins() {
    let up = Upstream::start(|req| async move {
        let status = if req.uri().path().ends_with("/304") {
            304
        } else {
            200
        };
        let mut b = hyper::Response::builder()
            .status(status)
            .header("server", "upstream")
            .header("date", "Mon, 30 Nov 2026 06:00:00 GMT")
            .header("x-a", "1")
            .header("set-cookie", "a=1")
            .header("set-cookie", "b=2")
            .header("connection", "x-conn")
            .header("x-conn", "1")
            .header("etag", "\"e\"");
        if status == 304 {
            b = b.header("content-length", "7");
        }
        b.body(full(if status == 304 { "" } else { "hello" }))
            .expect("response")
    });
    let gw = Gateway::start(&format!(
        "routes:\n{}{}",
        route("plain", "/plain/*", &up.node(), ""),
        tagged("tagged", "/tagged/*", &up.node(), "")
    ));
    for tail in ["x", "304"] {
        let plain = get(&gw.url(&format!("/plain/{tail}")));
        let tagged = get(&gw.url(&format!("/tagged/{tail}")));
        assert_eq!(plain.status, tagged.status, "{tail}");
        assert_eq!(tagged.header("x-route").as_deref(), Some("tagged"));
        let mut a: Vec<(String, String)> = plain
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let mut b: Vec<(String, String)> = tagged
            .headers
            .iter()
            .filter(|(k, _)| k.as_str() != "x-route")
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{tail}");
        let h = &plain.headers;
        assert!(
            h["server"].to_str().unwrap().starts_with("moongate"),
            "{h:?}"
        );
        assert_eq!(h.get_all("date").iter().count(), 1, "{h:?}");
        assert_eq!(h["date"], "Mon, 30 Nov 2026 06:00:00 GMT");
        assert_eq!(h.get_all("set-cookie").iter().count(), 2, "{h:?}");
        assert!(!h.contains_key("x-conn"), "{h:?}");
        assert_eq!(h["etag"], "\"e\"");
        if tail == "304" {
            assert!(plain.body.is_empty());
        } else {
            assert_eq!(plain.text(), "hello");
            assert_eq!(h["content-length"], "5");
        }
    }
}

#[test]
fn pass_host_modes() {
    let up = Upstream::echo();
    let node = up.node();
    let ups = |mode: &str| {
        format!(
            "    upstream:\n      pass_host: {mode}\n      upstream_host: rewritten.test\n      nodes:\n        \"{node}\": 1\n"
        )
    };
    let gw = Gateway::start(&format!(
        "routes:\n  - id: p\n    uri: /pass\n{}  - id: n\n    uri: /node\n{}  - id: r\n    uri: /rewrite\n{}",
        ups("pass"),
        ups("node"),
        ups("rewrite")
    ));
    let host_seen =
        |path: &str| get_host(&gw.url(path), "client.test").json()["headers"]["host"].clone();
    assert_eq!(host_seen("/pass"), "client.test");
    assert_eq!(host_seen("/node"), node.as_str());
    assert_eq!(host_seen("/rewrite"), "rewritten.test");
}

// ---------------------------------------------------------------------------------------------
// Streaming and connections
// ---------------------------------------------------------------------------------------------

const BIG: u64 = 256 * 1024 * 1024;

#[test]
fn large_bodies_stream_both_ways_with_bounded_memory() {
    let echo = Upstream::echo();
    let big = Upstream::streaming(BIG);
    let gw = Gateway::start(&format!(
        "routes:\n{}{}",
        route("up", "/upload", &echo.node(), ""),
        route("down", "/download", &big.node(), "")
    ));
    let r = Req::post(&gw.url("/upload"))
        .body_stream(generated(BIG))
        .send();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], BIG);

    let (status, n) = Req::get(&gw.url("/download")).send_counting();
    assert_eq!(status, 200);
    assert_eq!(n, BIG);

    let peak_kib = gw.peak_rss_kib();
    eprintln!(
        "gateway peak RSS {peak_kib} KiB after {} MiB each way",
        BIG >> 20
    );
    assert!(
        peak_kib < 64 * 1024,
        "gateway peak RSS {peak_kib} KiB while streaming {} MiB",
        BIG >> 20
    );
}

#[test]
fn upstream_connections_are_reused() {
    let up = Upstream::echo();
    let gw = Gateway::start(&format!(
        "workers: 2\nroutes:\n{}",
        route("1", "/ka", &up.node(), "")
    ));
    for _ in 0..50 {
        assert_eq!(get(&gw.url("/ka")).status, 200);
    }
    assert_eq!(up.requests(), 50);
    // One pool per worker, so sequential requests need about one connection per worker; a
    // little slack for a request that arrives before its worker's pool got the connection back.
    assert!(
        up.connections() <= 5,
        "{} upstream connections for 50 requests",
        up.connections()
    );
}

/// A burst of concurrent requests needs more upstream connections than `keepalive_pool.size`:
/// they are kept while the next burst reuses them, and once the load has passed the pool
/// closes all but `size`.
#[test]
fn pool_keeps_a_burst_s_connections_and_settles_at_its_size() {
    const BURST: usize = 8;
    let up = Upstream::slow(Duration::from_millis(300));
    let gw = Gateway::start(&format!(
        "workers: 1\nroutes:\n  - id: b\n    uri: /b\n    upstream:\n      keepalive_pool: {{size: 2, idle_timeout: 60}}\n      nodes:\n        \"{}\": 1\n",
        up.node()
    ));
    let burst = || {
        let threads: Vec<_> = (0..BURST)
            .map(|_| {
                let url = gw.url("/b");
                std::thread::spawn(move || get(&url).status)
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().expect("request thread"), 200);
        }
    };
    burst();
    // Each request held its connection for the upstream's delay, all at once.
    assert_eq!(up.connections(), BURST as u64);
    burst();
    assert_eq!(
        up.connections(),
        BURST as u64,
        "the second burst reuses the first one's connections"
    );
    assert_eq!(up.requests(), 2 * BURST as u64);
    assert!(
        health::poll_until(Duration::from_secs(15), || up.open_connections() == 2),
        "{} upstream connections open once idle, keepalive_pool.size is 2",
        up.open_connections()
    );
}

#[test]
fn client_keep_alive() {
    let up = Upstream::echo();
    let gw = Gateway::start(&format!("routes:\n{}", route("1", "/ka", &up.node(), "")));
    let mut conn = Conn::open(gw.addr());
    for _ in 0..5 {
        let r = conn.get("/ka").expect("connection stays open");
        assert_eq!(r.status, 200);
    }
    // 404s are answered on the same connection too.
    assert_eq!(conn.get("/nope").expect("still open").status, 404);
    assert_eq!(conn.get("/ka").expect("still open").status, 200);
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[test]
fn refused_upstream_is_502_with_a_log_line() {
    let port = closed_port();
    let gw = Gateway::start(&format!(
        "routes:\n{}",
        route("r502", "/x", &format!("127.0.0.1:{port}"), "")
    ));
    assert_eq!(get(&gw.url("/x")).status, 502);
    assert!(
        gw.wait_for_log(&format!("127.0.0.1:{port}"), Duration::from_secs(5)),
        "{}",
        gw.logs()
    );
    assert!(
        gw.wait_for_log("r502", Duration::from_secs(5)),
        "{}",
        gw.logs()
    );
}

#[test]
fn slow_upstream_is_504() {
    let up = Upstream::slow(Duration::from_secs(3));
    let gw = Gateway::start(&format!(
        "routes:\n  - id: r504\n    uri: /slow\n    upstream:\n      timeout: {{connect: 1, send: 1, read: 0.5}}\n      nodes:\n        \"{}\": 1\n",
        up.node()
    ));
    assert_eq!(get(&gw.url("/slow")).status, 504);
    assert!(
        gw.wait_for_log("r504", Duration::from_secs(5)),
        "{}",
        gw.logs()
    );
}

#[test]
fn route_timeout_overrides_the_upstreams() {
    let up = Upstream::slow(Duration::from_secs(3));
    let gw = Gateway::start(&format!(
        "routes:\n  - id: rt\n    uri: /slow\n    timeout: {{connect: 1, send: 1, read: 0.5}}\n    upstream:\n      timeout: {{connect: 60, send: 60, read: 60}}\n      nodes:\n        \"{}\": 1\n",
        up.node()
    ));
    assert_eq!(get(&gw.url("/slow")).status, 504);
}

/// One pooled upstream connection serves routes with different timeouts in turn: each request
/// gets its own route's deadline, whatever the connection's earlier requests had.
#[test]
fn reused_connection_keeps_each_requests_timeout() {
    // `/wait/N` answers after N ms.
    let up = Upstream::start(|req| async move {
        let ms: u64 = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        hyper::Response::new(full("done"))
    });
    let node = up.node();
    let gw = Gateway::start(&format!(
        "routes:\n  - id: long\n    uri: /long/*\n    timeout: {{connect: 1, send: 60, read: 60}}\n    upstream:\n      nodes:\n        \"{node}\": 1\n  - id: short\n    uri: /short/*\n    timeout: {{connect: 1, send: 0.2, read: 0.3}}\n    upstream:\n      nodes:\n        \"{node}\": 1\n"
    ));
    // A long-timeout request first, then a short-timeout one on the same kept connection: the
    // short one still times out at its own deadline.
    assert_eq!(get(&gw.url("/long/wait/0")).status, 200);
    let t = std::time::Instant::now();
    assert_eq!(get(&gw.url("/short/wait/3000")).status, 504);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // A short-timeout request, then an idle pause past its deadline, then a request that takes
    // longer than the pause but less than its own timeout: not timed out by the old deadline.
    assert_eq!(get(&gw.url("/short/wait/0")).status, 200);
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(get(&gw.url("/short/wait/200")).status, 200);
    assert_eq!(get(&gw.url("/long/wait/900")).status, 200);
}

#[test]
fn body_over_client_max_body_size_is_413() {
    let up = Upstream::echo();
    let gw = Gateway::start(&format!(
        "proxy:\n  client_max_body_size: 1024\nroutes:\n{}",
        route("1", "/up", &up.node(), "")
    ));
    let r = Req::post(&gw.url("/up")).body(vec![b'a'; 1024]).send();
    assert_eq!(r.status, 200);
    assert_eq!(
        Req::post(&gw.url("/up"))
            .body(vec![b'a'; 1025])
            .send()
            .status,
        413
    );
    // Chunked: no length up front, refused once the limit is crossed.
    let chunk = "b".repeat(2048);
    let resp = raw(
        gw.addr(),
        format!(
            "POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n800\r\n{chunk}\r\n0\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(raw_status(&resp), 413, "{resp}");
}

#[test]
fn huge_request_header_is_431() {
    let up = Upstream::echo();
    let gw = Gateway::start(&format!("routes:\n{}", route("1", "/h", &up.node(), "")));
    let big = "v".repeat(64 * 1024);
    let resp = raw(
        gw.addr(),
        format!("GET /h HTTP/1.1\r\nHost: t\r\nX-Big: {big}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(raw_status(&resp), 431, "{}", &resp[..resp.len().min(200)]);
    assert_eq!(up.requests(), 0);
}

#[test]
fn retries_skip_a_refused_node() {
    let up = Upstream::echo();
    let port = closed_port();
    let gw = Gateway::start(&format!(
        "routes:\n  - id: r\n    uri: /r\n    upstream:\n      retries: 1\n      nodes:\n        \"127.0.0.1:{port}\": 1\n        \"{}\": 1\n",
        up.node()
    ));
    for i in 0..10 {
        assert_eq!(get(&gw.url("/r")).status, 200, "request {i}");
    }
    assert_eq!(up.requests(), 10);
}

// ---------------------------------------------------------------------------------------------
// Plugins
// ---------------------------------------------------------------------------------------------

#[test]
fn response_headers_plugin_sets_adds_removes() {
    let up = Upstream::start(|req| async move {
        let mut resp = echo_response(req).await;
        resp.headers_mut()
            .insert("x-drop", "1".parse().expect("value"));
        resp.headers_mut()
            .insert("x-multi", "up".parse().expect("value"));
        resp
    });
    let gw = Gateway::start(&format!(
        "routes:\n{}",
        route(
            "rh",
            "/rh",
            &up.node(),
            "    plugins:\n      response-headers:\n        set:\n          X-Route: \"$route_id\"\n          X-Who: \"$remote_addr via $http_x_client\"\n        add:\n          X-Multi: added\n        remove: [X-Drop]\n"
        )
    ));
    let r = Req::get(&gw.url("/rh")).header("x-client", "tester").send();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-route").as_deref(), Some("rh"));
    assert_eq!(r.header("x-who").as_deref(), Some("127.0.0.1 via tester"));
    assert!(r.header("x-drop").is_none());
    let multi: Vec<_> = r.headers.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["up", "added"]);
}

#[test]
fn global_rules_run_first_and_on_404() {
    let up = Upstream::echo();
    let gw = Gateway::start(&format!(
        "global_rules:\n  - id: g\n    plugins:\n      response-headers:\n        set:\n          X-Global: yes\n          X-Order: global\nroutes:\n{}",
        route(
            "1",
            "/g",
            &up.node(),
            "    plugins:\n      response-headers:\n        set:\n          X-Order: route\n"
        )
    ));
    let r = get(&gw.url("/g"));
    assert_eq!(r.header("x-global").as_deref(), Some("yes"));
    // Both set X-Order; the route's runs after the global rule's, so its value stays.
    assert_eq!(r.header("x-order").as_deref(), Some("route"));
    let r = get(&gw.url("/missing"));
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-global").as_deref(), Some("yes"));
}

#[test]
fn service_plugins_and_upstream_merge_with_the_route() {
    let up = Upstream::echo();
    let gw = Gateway::start(&format!(
        "services:\n  - id: s1\n    upstream:\n      nodes:\n        \"{}\": 1\n    plugins:\n      response-headers:\n        set:\n          X-From: service\n          X-Only-Service: yes\nroutes:\n  - id: plain\n    uri: /svc\n    service_id: s1\n  - id: own\n    uri: /own\n    service_id: s1\n    plugins:\n      response-headers:\n        set:\n          X-From: route\n",
        up.node()
    ));
    let r = get(&gw.url("/svc"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-from").as_deref(), Some("service"));
    assert_eq!(r.header("x-only-service").as_deref(), Some("yes"));
    // Same plugin on both: the route's conf replaces the service's, as in APISIX.
    let r = get(&gw.url("/own"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-from").as_deref(), Some("route"));
    assert!(r.header("x-only-service").is_none());
}

// ---------------------------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------------------------

#[test]
fn sigterm_finishes_in_flight_requests_then_exits_0() {
    let up = Upstream::slow(Duration::from_secs(2));
    let mut gw = Gateway::start(&format!("routes:\n{}", route("1", "/slow", &up.node(), "")));
    let url = gw.url("/slow");
    let in_flight = std::thread::spawn(move || get(&url));
    for _ in 0..200 {
        if up.requests() == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(up.requests(), 1, "the request never reached the upstream");
    gw.terminate();
    assert!(
        gw.wait_for_log("shutting down", Duration::from_secs(5)),
        "{}",
        gw.logs()
    );
    // Workers close their listeners as they see the signal: bounded wait for that.
    let mut refused = false;
    for _ in 0..100 {
        if !accepts_connections(gw.addr()) {
            refused = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(refused, "new connections still accepted after SIGTERM");
    let r = in_flight.join().expect("client thread");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "slow");
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", gw.logs());
}

// ---------------------------------------------------------------------------------------------
// `moongate check`
// ---------------------------------------------------------------------------------------------

const NODE: &str = "    upstream:\n      nodes:\n        \"127.0.0.1:1980\": 1\n";

#[test]
fn check_accepts_a_good_config() {
    let (code, out) = check(&format!("routes:\n  - id: 1\n    uri: /a\n{NODE}"));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok (1 routes"), "{out}");
}

#[test]
fn check_names_an_unknown_field_by_path() {
    let (code, out) = check(&format!("routes:\n  - id: 1\n    urii: /a\n{NODE}"));
    assert_eq!(code, 1);
    assert!(
        out.starts_with("routes[0].urii: unknown field `urii`, expected one of `id`"),
        "{out}"
    );
    let (code, out) = check("listne: 127.0.0.1:9080\n");
    assert_eq!(code, 1);
    assert!(out.starts_with("listne: unknown field `listne`"), "{out}");
}

#[test]
fn check_bad_nodes() {
    let (code, out) = check(&format!(
        "routes:\n  - id: 1\n    uri: /a\n{NODE}  - id: 2\n    uri: /b\n    upstream:\n      nodes: \"127.0.0.1:80\"\n"
    ));
    assert_eq!(code, 1);
    assert_eq!(
        out.trim_end(),
        "routes[1].upstream.nodes: expected a map of \"host:port\" to weight, or a list of {host, port, weight}"
    );
}

#[test]
fn check_unknown_plugin_and_upstream_id() {
    let (code, out) = check(&format!(
        "routes:\n  - id: 1\n    uri: /a\n    plugins:\n      no-such-plugin: {{}}\n{NODE}  - id: 2\n    uri: /b\n    upstream_id: missing\n"
    ));
    assert_eq!(code, 1);
    let lines: Vec<_> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    // The full wording (with the folders searched) is in tests/startup.rs.
    assert!(
        lines[0].starts_with("routes[0].plugins.no-such-plugin: unknown plugin [no-such-plugin]: it is not a native plugin"),
        "{out}"
    );
    assert_eq!(
        lines[1],
        "routes[1].upstream_id: upstream \"missing\" not found"
    );
}

#[test]
fn check_plugin_conf_error_in_apisix_wording() {
    let (code, out) = check(&format!(
        "routes:\n  - id: 1\n    uri: /a\n    plugins:\n      response-headers:\n        set: 5\n{NODE}"
    ));
    assert_eq!(code, 1);
    assert_eq!(
        out.trim_end(),
        "routes[0].plugins.response-headers: failed to check the configuration of plugin response-headers err: property \"set\" validation failed: wrong type: expected object, got number"
    );
}

#[test]
fn run_refuses_a_bad_config() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let file = tmp.path().join("config.yaml");
    std::fs::write(
        &file,
        "listen: 127.0.0.1:0\nroutes:\n  - id: 1\n    urii: /a\n",
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moongate"))
        .args(["run", "-c"])
        .arg(&file)
        .output()
        .expect("run moongate");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("routes[0].urii: unknown field"));
}

#[test]
fn shipped_config_passes_check() {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/config.yaml");
    let (code, out) = check_file(&file);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn slow_request_header_is_cut_off() {
    use std::io::{Read, Write};
    let up = Upstream::echo();
    let gw = Gateway::start(&format!(
        "proxy:\n  client_header_timeout: 1\nroutes:\n{}",
        route("1", "/h", &up.node(), "")
    ));
    let mut s = std::net::TcpStream::connect(gw.addr()).expect("connect");
    s.write_all(b"GET /h HTTP/1.1\r\nHost: t\r\n")
        .expect("write");
    // The header never ends; the gateway must close the connection on its own.
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let mut buf = Vec::new();
    // EOF or a reset both mean closed; a timeout means it was left open.
    let closed = match s.read_to_end(&mut buf) {
        Ok(_) => true,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    };
    assert!(closed, "connection still open after client_header_timeout");
    assert_eq!(up.requests(), 0);
}
