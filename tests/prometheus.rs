//! The `prometheus` plugin and its export server: a real scrape after known traffic, read
//! with Prometheus' own parser (PyPI `prometheus-client`).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::observability::{is, metrics_url, scrape, value, Sample};
use common::*;

/// The shared token-auth plugin, registering a variable used as an extra metrics label.
fn token_auth() -> String {
    common::lua_plugins::TOKEN_AUTH.replace(
        "\nreturn _M\n",
        r#"
local core = require("apisix.core")
core.ctx.register_var("tier", function(ctx)
    return ctx.consumer_name and "paid" or "free"
end)
return _M
"#,
    )
}

fn config(up: &Upstream) -> String {
    let node = up.node();
    format!(
        "workers: 2\n\
plugin_attr:\n  prometheus:\n    export_addr: {{ip: 127.0.0.1, port: 0}}\n    metrics:\n      http_status:\n        extra_labels:\n          - method: $request_method\n          - tier: $tier\n\
global_rules:\n  - id: g\n    plugins:\n      prometheus: {{}}\n\
services:\n  - id: s1\n    name: shop\n    upstream:\n      nodes:\n        \"{node}\": 1\n\
routes:\n\
\x20 - id: r1\n    name: hello\n    uri: /hello\n    service_id: s1\n    plugins:\n      prometheus: {{prefer_name: true}}\n\
\x20 - id: r2\n    uris: [/auth, /auth2]\n    hosts: [\"*.example.com\"]\n    plugins:\n      token-auth: {{}}\n    upstream:\n      nodes:\n        \"{node}\": 1\n\
\x20 - id: r3\n    uri: /nowhere\n    upstream:\n      nodes:\n        \"127.0.0.1:{closed}\": 1\n\
consumers:\n  - username: jack\n    plugins:\n      token-auth: {{token: jack-token}}\n",
        closed = closed_port()
    )
}

fn samples_named<'a>(samples: &'a [Sample], name: &str) -> Vec<&'a Sample> {
    samples.iter().filter(|s| is(s, name)).collect()
}

#[test]
fn a_scrape_after_known_traffic_counts_it_exactly() {
    let up = Upstream::echo();
    let gw = Gateway::start_with_plugins(&[("token-auth", &token_auth())], &config(&up));
    let url = metrics_url(&gw);

    for _ in 0..5 {
        assert_eq!(get(&gw.url("/hello")).status, 200);
    }
    for _ in 0..3 {
        assert_eq!(get(&gw.url("/no-route")).status, 404);
    }
    for path in ["/auth", "/auth2"] {
        let r = Req::get(&gw.url(path))
            .header("host", "a.example.com")
            .header("x-token", "jack-token")
            .send();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = Req::post(&gw.url("/auth"))
        .header("host", "b.example.com")
        .body("12345")
        .send();
    assert_eq!(r.status, 401);
    assert_eq!(get(&gw.url("/nowhere")).status, 502);

    // The log phase runs once the response is sent, so the last request may still be
    // recording as the client reads it: scrape until all 12 are in (bounded).
    let deadline = Instant::now() + Duration::from_secs(20);
    let (ctype, s, text) = loop {
        let got = scrape(&url, None);
        let total: f64 = samples_named(&got.1, "apisix_http_status")
            .iter()
            .map(|x| x.value)
            .sum();
        if total >= 12.0 || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    // APISIX's names as its exporter writes them.
    assert!(
        text.contains("\n# TYPE apisix_http_status counter\napisix_http_status{code="),
        "{text}"
    );

    // The route's own conf (prefer_name) wins over the global rule's: one count each, by name.
    let status = |labels: &[(&str, &str)]| value(&s, "apisix_http_status", labels);
    assert_eq!(
        status(&[
            ("code", "200"),
            ("route", "hello"),
            ("matched_uri", "/hello"),
            ("matched_host", ""),
            ("service", "shop"),
            ("consumer", ""),
            ("node", "127.0.0.1"),
            ("method", "GET"),
            ("tier", "free"),
        ]),
        5.0
    );
    assert_eq!(status(&[("code", "200"), ("route", "r1")]), 0.0);
    // The Lua-registered label, on the route whose plugin registers it: paid with a consumer,
    // free without.
    assert_eq!(
        status(&[("code", "401"), ("route", "r2"), ("tier", "free")]),
        1.0
    );
    // No route: the global rule records it with empty route labels.
    assert_eq!(
        status(&[
            ("code", "404"),
            ("route", ""),
            ("matched_uri", ""),
            ("node", "")
        ]),
        3.0
    );
    for uri in ["/auth", "/auth2"] {
        assert_eq!(
            status(&[
                ("code", "200"),
                ("route", "r2"),
                ("matched_uri", uri),
                ("matched_host", "*.example.com"),
                ("consumer", "jack"),
                ("tier", "paid"),
            ]),
            1.0,
            "{uri}"
        );
    }
    assert_eq!(
        status(&[
            ("code", "401"),
            ("route", "r2"),
            ("consumer", ""),
            ("node", ""),
            ("method", "POST"),
        ]),
        1.0
    );
    assert_eq!(status(&[("code", "502"), ("route", "r3")]), 1.0);
    let total: f64 = samples_named(&s, "apisix_http_status")
        .iter()
        .map(|x| x.value)
        .sum();
    assert_eq!(total, 12.0);

    // Latency histograms: buckets are cumulative and +Inf is the count.
    let counts = samples_named(&s, "apisix_http_latency_count");
    assert!(!counts.is_empty());
    for c in &counts {
        let mut buckets: Vec<&Sample> = s
            .iter()
            .filter(|b| {
                b.name == "apisix_http_latency_bucket"
                    && c.labels.iter().all(|(k, v)| b.labels.get(k) == Some(v))
            })
            .collect();
        buckets.sort_by(|a, b| {
            let le = |x: &Sample| {
                x.labels["le"]
                    .as_str()
                    .unwrap()
                    .parse::<f64>()
                    .unwrap_or(f64::INFINITY)
            };
            le(a).partial_cmp(&le(b)).unwrap()
        });
        assert_eq!(buckets.len(), 16, "{:?}", c.labels);
        assert!(buckets.windows(2).all(|w| w[0].value <= w[1].value));
        assert_eq!(buckets.last().unwrap().labels["le"], "+Inf");
        assert_eq!(buckets.last().unwrap().value, c.value, "{:?}", c.labels);
    }
    let lat = |t: &str, route: &str| {
        value(
            &s,
            "apisix_http_latency_count",
            &[("type", t), ("route", route), ("consumer", "")],
        )
    };
    assert_eq!(lat("request", "hello"), 5.0);
    assert_eq!(lat("upstream", "hello"), 5.0);
    assert_eq!(lat("apisix", "hello"), 5.0);
    // A request no upstream answered has no upstream latency.
    assert_eq!(lat("request", ""), 3.0);
    assert_eq!(lat("upstream", ""), 0.0);
    assert_eq!(lat("upstream", "r3"), 0.0);
    assert_eq!(lat("request", "r3"), 1.0);

    // Bandwidth: the 401 answered a 5-byte body; egress counts every response byte.
    let ingress = value(
        &s,
        "apisix_bandwidth",
        &[("type", "ingress"), ("route", "r2"), ("consumer", "")],
    );
    assert!(ingress > 5.0, "{ingress}");
    let egress = value(
        &s,
        "apisix_bandwidth",
        &[("type", "egress"), ("route", "hello")],
    );
    assert!(egress > 5.0 * 100.0, "{egress}");

    // Node gauges.
    assert!(value(&s, "apisix_http_requests_total", &[]) >= 12.0);
    let info = samples_named(&s, "apisix_node_info");
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].labels["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        value(
            &s,
            "apisix_shared_dict_capacity_bytes",
            &[("name", "internal-status")]
        ) > 0.0
            || !samples_named(&s, "apisix_shared_dict_capacity_bytes").is_empty()
    );
    assert_eq!(value(&s, "moongate_config_generation", &[]), 1.0);
    assert_eq!(value(&s, "moongate_config_reloads_refused_total", &[]), 0.0);
    let reloads = s
        .iter()
        .find(|x| x.name == "moongate_config_reloads_total")
        .expect("reloads counter");
    assert_eq!(reloads.kind, "counter");

    // OpenMetrics on Accept: the same names (APISIX's counters keep theirs), and the strict
    // OpenMetrics parser reads it.
    let (ctype, om, om_text) = scrape(
        &url,
        Some("application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4"),
    );
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(om_text.contains("\napisix_http_status{code="), "{om_text}");
    assert_eq!(
        value(
            &om,
            "apisix_http_status",
            &[("code", "200"), ("route", "hello")]
        ),
        5.0
    );
    assert_eq!(
        value(&om, "moongate_config_reloads_refused_total", &[]),
        0.0
    );

    // Other paths on the export server are 404.
    assert_eq!(
        get(&url.replace("/apisix/prometheus/metrics", "/x")).status,
        404
    );
}

/// `apisix_nginx_http_current_connections` by state, from one scrape.
fn connections(url: &str) -> std::collections::HashMap<String, f64> {
    let (_, s, _) = scrape(url, None);
    s.iter()
        .filter(|x| x.name == "apisix_nginx_http_current_connections")
        .map(|x| {
            (
                x.labels["state"].as_str().unwrap_or("").to_string(),
                x.value,
            )
        })
        .collect()
}

/// One keep-alive request on a raw socket, left open.
fn open_idle(gw: &Gateway) -> TcpStream {
    let mut c = TcpStream::connect(gw.addr()).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    while !got.windows(5).any(|w| w == b"hello" || w == b"\"uri\"") {
        let n = c.read(&mut buf).expect("read");
        assert!(n > 0, "closed");
        got.extend_from_slice(&buf[..n]);
    }
    c
}

#[test]
fn the_connections_gauge_follows_open_connections() {
    let up = Upstream::text("hello");
    let gw = Gateway::start(&format!(
        "plugin_attr:\n  prometheus:\n    export_addr: {{ip: 127.0.0.1, port: 0}}\nroutes:\n  - id: h\n    uri: /hello\n    upstream:\n      nodes:\n        \"{}\": 1\n",
        up.node()
    ));
    let url = metrics_url(&gw);
    let before = connections(&url);
    let conns: Vec<TcpStream> = (0..3).map(|_| open_idle(&gw)).collect();
    // A request counts as writing until its log phase is done, just after the client has
    // the response: poll, bounded.
    let deadline = Instant::now() + Duration::from_secs(20);
    let open = loop {
        let c = connections(&url);
        if c["writing"] == 0.0 || Instant::now() > deadline {
            break c;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(open["active"], before["active"] + 3.0, "{open:?}");
    assert_eq!(open["waiting"], before["waiting"] + 3.0, "{open:?}");
    assert_eq!(open["writing"], 0.0, "{open:?}");
    assert_eq!(open["accepted"], before["accepted"] + 3.0, "{open:?}");
    assert_eq!(open["handled"], open["accepted"], "{open:?}");
    drop(conns);
    // The server notices the closes on its own time: poll, bounded.
    let deadline = Instant::now() + Duration::from_secs(20);
    while connections(&url)["active"] != before["active"] {
        assert!(Instant::now() < deadline, "connections still counted");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_bad_export_setting_stops_the_start_with_its_path() {
    let (code, out) = check("plugin_attr:\n  prometheus:\n    default_buckets: [10, 5]\n");
    assert_ne!(code, 0);
    assert!(
        out.contains("plugin_attr.prometheus.default_buckets[1]: buckets must be increasing"),
        "{out}"
    );
}

/// Stops a call by spinning (`spin`) or by filling the VM past its cap (`hog`). The test's
/// budget is a second: filling the VM near its cap takes over 100 ms on a loaded machine.
const MISBEHAVE: &str = r#"
local _M = { version = 0.1, priority = 100, name = "misbehave", schema = { type = "object" } }
function _M.check_schema(conf) return true end
function _M.access(conf, ctx)
    if conf.spin then
        while true do end
    end
    if conf.hog then
        local t = {}
        for i = 1, 1e8 do t[i] = string.rep("x", 1024) .. i end
    end
end
return _M
"#;

/// moongate's runtime families: Lua calls stopped by reason, the worker's VM memory, upstream
/// connections made, idle and active, openfunction calls by outcome.
#[test]
fn moongate_runtime_families_follow_what_happened() {
    let up = Upstream::echo();
    let function = Upstream::start(|req| async move {
        let mut res = http::Response::new(full("from the function"));
        if req.uri().path() == "/err" {
            *res.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
        }
        res
    });
    let node = up.node();
    let f = function.node();
    let route = |id: &str, plugins: &str| {
        format!("  - id: {id}\n    uri: /{id}\n    plugins:\n{plugins}    upstream:\n      nodes:\n        \"{node}\": 1\n")
    };
    let yaml = format!(
        "workers: 1\nlua:\n  call_budget_ms: 1000\n  memory_limit_mb: 32\nplugin_attr:\n  prometheus:\n    export_addr: {{ip: 127.0.0.1, port: 0}}\nroutes:\n{}{}{}{}{}{}",
        route("hello", "      misbehave: {}\n"),
        route("spin", "      misbehave: {spin: true}\n"),
        route("hog", "      misbehave: {hog: true}\n"),
        route("ok", &format!("      openfunction: {{function_uri: \"http://{f}/ok\"}}\n")),
        route("err", &format!("      openfunction: {{function_uri: \"http://{f}/err\"}}\n")),
        route(
            "dead",
            &format!(
                "      openfunction: {{function_uri: \"http://127.0.0.1:{}/\"}}\n",
                closed_port()
            )
        ),
    );
    let gw = Gateway::start_with_plugins(&[("misbehave", MISBEHAVE)], &yaml);
    let url = metrics_url(&gw);

    assert_eq!(get(&gw.url("/spin")).status, 500);
    assert_eq!(get(&gw.url("/hog")).status, 500);
    assert_eq!(get(&gw.url("/hog")).status, 500);
    assert_eq!(get(&gw.url("/ok")).status, 200);
    assert_eq!(get(&gw.url("/ok")).status, 200);
    assert_eq!(get(&gw.url("/err")).status, 500);
    assert_eq!(get(&gw.url("/dead")).status, 503);
    assert_eq!(get(&gw.url("/hello")).status, 200);

    // The worker publishes its gauges once a second: scrape until the two kept-alive
    // connections (the echo upstream's, the function's) show as idle (bounded).
    let deadline = Instant::now() + Duration::from_secs(20);
    let s = loop {
        let (_, s, _) = scrape(&url, None);
        let idle = value(
            &s,
            "moongate_upstream_connections",
            &[("worker", "0"), ("state", "idle")],
        );
        if idle == 2.0 {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "idle upstream connections: {idle}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let stopped = |reason| {
        value(
            &s,
            "moongate_lua_calls_stopped_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(stopped("time_budget"), 1.0);
    assert_eq!(stopped("memory_cap"), 2.0);
    let calls = |outcome| {
        value(
            &s,
            "moongate_openfunction_calls_total",
            &[("outcome", outcome)],
        )
    };
    assert_eq!(calls("ok"), 2.0);
    assert_eq!(calls("function_error"), 1.0);
    assert_eq!(calls("failed"), 1.0);
    assert_eq!(calls("bad_request"), 0.0);
    assert_eq!(
        value(
            &s,
            "moongate_upstream_connections",
            &[("worker", "0"), ("state", "active")]
        ),
        0.0
    );
    let lua = value(&s, "moongate_lua_memory_bytes", &[("worker", "0")]);
    assert!(lua > 100_000.0 && lua < 32.0 * 1024.0 * 1024.0, "{lua}");
    let created = value(&s, "moongate_upstream_connections_created_total", &[]);
    assert!(created >= 2.0, "{created}");
    // Kept-alive connections are reused: more requests make none.
    for _ in 0..3 {
        assert_eq!(get(&gw.url("/hello")).status, 200);
        assert_eq!(get(&gw.url("/ok")).status, 200);
    }
    let (_, s, _) = scrape(&url, None);
    assert_eq!(
        value(&s, "moongate_upstream_connections_created_total", &[]),
        created
    );
}

/// A Lua plugin's own metrics, registered as APISIX plugins do (`exporter.get_prometheus()`,
/// then nginx-lua-prometheus' `counter`/`gauge`/`histogram`). `VERSION` is what the plugin
/// adds to its counter per request, and answers in `x-metrics-version`.
const CUSTOM_METRICS: &str = r#"
local exporter = require("apisix.plugins.prometheus.exporter")
local prometheus = exporter.get_prometheus()
local hits = prometheus:counter("plugin_hits_total", "Requests the plugin saw", {"route", "tier"})
local level = prometheus:gauge("plugin_level", "The level asked for, per value", {"route", "v"})
local sizes = prometheus:histogram("plugin_value", "Values asked for", {"route"}, {1, 5, 10})
-- The same name with other labels: refused and logged, nil.
local clash = prometheus:gauge("plugin_hits_total", "x", {"route"})
local VERSION = 1

local _M = {version = 0.1, priority = 10, name = "custom-metrics",
            schema = {type = "object", properties = {tier = {type = "string"}}}}

function _M.header_filter(conf, ctx)
    ngx.header["x-metrics-version"] = tostring(VERSION)
    ngx.header["x-clash-is-nil"] = tostring(clash == nil)
end

function _M.log(conf, ctx)
    local route = ctx.var.route_id
    -- One label for a two-label metric: an error, logged and counted, nothing recorded.
    hits:inc(1, {route})
    hits:inc(VERSION, {route, conf.tier or "none"})
    -- One series per request (two workers may run log phases out of request order).
    level:set(tonumber(ctx.var.arg_level) or 0, {route, ctx.var.arg_v or ""})
    -- Last: a scrape that sees this request's observation sees all of the above.
    sizes:observe(tonumber(ctx.var.arg_v) or 0, {route})
end

return _M
"#;

#[test]
fn lua_plugins_register_their_own_metrics_and_keep_them_across_a_reload() {
    let up = Upstream::echo();
    let yaml = format!(
        "workers: 2\n\
plugin_attr:\n  prometheus:\n    export_addr: {{ip: 127.0.0.1, port: 0}}\n\
routes:\n\
\x20 - id: r1\n    uri: /m\n    plugins:\n      custom-metrics: {{tier: gold}}\n    upstream:\n      nodes:\n        \"{node}\": 1\n\
\x20 - id: r2\n    uri: /poll\n    plugins:\n      custom-metrics: {{}}\n    upstream:\n      nodes:\n        \"{node}\": 1\n",
        node = up.node()
    );
    let gw = Gateway::start_with_plugins(&[("custom-metrics", CUSTOM_METRICS)], &yaml);
    let url = metrics_url(&gw);

    for (v, level) in [("0.5", "7"), ("3", "2"), ("20", "4")] {
        let r = get(&gw.url(&format!("/m?v={v}&level={level}")));
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-clash-is-nil").as_deref(), Some("true"));
    }
    let hits = |s: &[Sample], route: &str, tier: &str| {
        value(
            s,
            "apisix_plugin_hits_total",
            &[("route", route), ("tier", tier)],
        )
    };
    // The log phase runs after the response: scrape until the three are in (bounded).
    let scrape_until = |want: &dyn Fn(&[Sample]) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = scrape(&url, None);
            if want(&got.1) || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let (_, s, text) =
        scrape_until(&|s| value(s, "apisix_plugin_value_count", &[("route", "r1")]) >= 3.0);
    assert!(
        text.contains("# TYPE apisix_plugin_hits counter\n")
            || text.contains("# TYPE apisix_plugin_hits_total counter\n"),
        "{text}"
    );
    // Both workers count into one series.
    assert_eq!(hits(&s, "r1", "gold"), 3.0, "{text}");
    let level = |v: &str| value(&s, "apisix_plugin_level", &[("route", "r1"), ("v", v)]);
    assert_eq!([level("0.5"), level("3"), level("20")], [7.0, 2.0, 4.0]);
    let bucket = |le: &str| {
        value(
            &s,
            "apisix_plugin_value_bucket",
            &[("route", "r1"), ("le", le)],
        )
    };
    assert_eq!(
        [bucket("1.0"), bucket("5.0"), bucket("10.0"), bucket("+Inf")],
        [1.0, 2.0, 2.0, 3.0],
        "{text}"
    );
    assert_eq!(
        value(&s, "apisix_plugin_value_sum", &[("route", "r1")]),
        23.5
    );
    // Every wrong call was counted (3 label mistakes, and the clash in each VM that loaded
    // the plugin) and logged with nginx-lua-prometheus' words.
    assert!(
        value(&s, "apisix_nginx_metric_errors_total", &[]) >= 4.0,
        "{text}"
    );
    assert!(gw.wait_for_log(
        "inconsistent labels count, expected 2, got 1",
        Duration::from_secs(5)
    ));
    assert!(gw.logs().contains("Duplicate metric plugin_hits_total"));

    // A new version of the plugin registers the same metrics again: they keep their values.
    let file = gw.config_dir().join("plugins/custom-metrics.lua");
    std::fs::write(
        &file,
        CUSTOM_METRICS.replace("local VERSION = 1", "local VERSION = 100"),
    )
    .unwrap();
    // Each worker takes the new file up on its own: request r1 until one answers with it,
    // counting what the old version added meanwhile.
    let (mut old, mut sent) = (0.0, 0.0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = get(&gw.url("/m?v=1&level=1"));
        assert_eq!(r.status, 200);
        sent += 1.0;
        match r.header("x-metrics-version").as_deref() {
            Some("100") => break,
            _ => old += 1.0,
        }
        assert!(
            Instant::now() < deadline,
            "the new plugin file does not serve; log:\n{}",
            gw.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, s, text) =
        scrape_until(&|s| value(s, "apisix_plugin_value_count", &[("route", "r1")]) >= 3.0 + sent);
    assert_eq!(hits(&s, "r1", "gold"), 3.0 + old + 100.0, "{text}");
    assert_eq!(
        value(&s, "apisix_plugin_value_count", &[("route", "r1")]),
        3.0 + sent
    );
}
