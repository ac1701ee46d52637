//! Host names in upstream nodes and Lua cosockets, resolved through `dns_resolver`: a dnsmasq
//! this test runs on loopback answers for `*.moongate.test` (TTL 1 s), and two upstreams on the
//! same port of 127.0.0.2 and 127.0.0.3 tell by their answer which address a name led to.

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::dns::Dnsmasq;
use common::*;

/// Two upstreams on one port, at 127.0.0.2 (answering `a`) and 127.0.0.3 (answering `b`).
fn pair() -> (Upstream, Upstream, u16) {
    loop {
        let la = TcpListener::bind("127.0.0.2:0").expect("bind 127.0.0.2");
        let port = la.local_addr().expect("local addr").port();
        let Ok(lb) = TcpListener::bind(("127.0.0.3", port)) else {
            continue;
        };
        let a = Upstream::start_on(la, |_req| async { http::Response::new(full("a")) });
        let b = Upstream::start_on(lb, |_req| async { http::Response::new(full("b")) });
        return (a, b, port);
    }
}

fn gateway(dns: &Dnsmasq, nodes: &[String], extra: &str) -> Gateway {
    let nodes: String = nodes
        .iter()
        .map(|n| format!("        \"{n}\": 1\n"))
        .collect();
    Gateway::start(&format!(
        "dns_resolver:\n  - {}\nresolver_timeout: 1\n{extra}routes:\n  - id: r\n    uri: /r\n    upstream:\n      nodes:\n{nodes}",
        dns.server()
    ))
}

/// GETs `url` until the body is `want` (at most 10 s, 500 requests); panics otherwise.
fn until_body(url: &str, want: &str, logs: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for _ in 0..500 {
        let r = get(url);
        if r.status == 200 && r.text() == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no answer {want} within 10 s (last {} {}); gateway log:\n{}",
            r.status,
            r.text(),
            logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no answer {want} in 500 requests; gateway log:\n{}", logs());
}

#[test]
fn a_node_by_name_follows_its_record_without_a_reload() {
    let (_a, _b, port) = pair();
    let mut dns = Dnsmasq::start("127.0.0.2 svc.moongate.test\n");
    let gw = gateway(&dns, &[format!("svc.moongate.test:{port}")], "");
    let url = gw.url("/r");
    for _ in 0..5 {
        let r = get(&url);
        assert_eq!((r.status, r.text().as_str()), (200, "a"), "{}", gw.logs());
    }

    // After the record's TTL the new address takes the traffic, pooled connections to the old
    // one included (they were made under the old answer).
    dns.set("127.0.0.3 svc.moongate.test\n");
    until_body(&url, "b", || gw.logs());
    for _ in 0..20 {
        let r = get(&url);
        assert_eq!((r.status, r.text().as_str()), (200, "b"), "{}", gw.logs());
    }
    assert!(
        gw.logs()
            .contains("the answer for svc.moongate.test changed: 127.0.0.2 -> 127.0.0.3"),
        "{}",
        gw.logs()
    );
}

#[test]
fn a_name_that_stops_resolving_is_left_out_and_logged_once() {
    let (_a, _b, port) = pair();
    let both = "127.0.0.2 svc-a.moongate.test\n127.0.0.3 svc-b.moongate.test\n";
    let mut dns = Dnsmasq::start(both);
    let gw = gateway(
        &dns,
        &[
            format!("svc-a.moongate.test:{port}"),
            format!("svc-b.moongate.test:{port}"),
        ],
        "",
    );
    let url = gw.url("/r");
    let bodies: Vec<String> = (0..10).map(|_| get(&url).text()).collect();
    assert!(
        bodies.iter().any(|b| b == "a") && bodies.iter().any(|b| b == "b"),
        "{bodies:?}"
    );

    // svc-b is NXDOMAIN now: its node is left out (as APISIX drops a node whose name does not
    // resolve), the other keeps serving every request.
    dns.set("127.0.0.2 svc-a.moongate.test\n");
    let down = "upstream node is down: failed to resolve svc-b.moongate.test";
    assert!(
        gw.wait_for_log(down, Duration::from_secs(10)),
        "{}",
        gw.logs()
    );
    // Over a few of the name's retries (1 s, 2 s): every request served, one log line.
    let until = Instant::now() + Duration::from_secs(3);
    let mut served = 0;
    while Instant::now() < until && served < 300 {
        let r = get(&url);
        assert_eq!((r.status, r.text().as_str()), (200, "a"), "{}", gw.logs());
        served += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(gw.logs().matches(down).count(), 1, "{}", gw.logs());
    let line = gw
        .logs()
        .lines()
        .find(|l| l.contains(down))
        .unwrap()
        .to_string();
    assert!(
        line.contains("ERROR")
            && line.contains("upstream=/apisix/routes/r")
            && line.contains(&format!("node=svc-b.moongate.test:{port}"))
            && line.contains("NXDOMAIN"),
        "{line}"
    );

    // No name resolves: no node to pick, 503 as APISIX's "no valid upstream node".
    dns.set("");
    assert!(
        gw.wait_for_log(
            "upstream node is down: failed to resolve svc-a.moongate.test",
            Duration::from_secs(10)
        ),
        "{}",
        gw.logs()
    );
    let r = get(&url);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        gw.wait_for_log("no valid upstream node", Duration::from_secs(5)),
        "{}",
        gw.logs()
    );

    // Back: both serve again, each return logged.
    dns.set(both);
    assert!(
        gw.wait_for_log(
            "upstream node is up again: svc-b.moongate.test resolves to 127.0.0.3",
            Duration::from_secs(10)
        ),
        "{}",
        gw.logs()
    );
    until_body(&url, "b", || gw.logs());
    until_body(&url, "a", || gw.logs());
}

#[test]
fn the_control_api_shows_a_named_node_by_its_address() {
    let (_a, _b, port) = pair();
    let dns = Dnsmasq::start("127.0.0.2 svc.moongate.test\n");
    let gw = gateway(
        &dns,
        &[format!("svc.moongate.test:{port}")],
        "control: {ip: 127.0.0.1, port: 0}\n",
    );
    // The route's upstream gets a checker (the helper's config has none): add one.
    let file = std::fs::read_to_string(gw.config_path()).expect("read config");
    std::fs::write(
        gw.config_path(),
        format!("{file}      checks:\n        active: {{type: tcp}}\n"),
    )
    .expect("write config");
    assert!(gw.wait_for_log(
        "new configuration generation is serving",
        Duration::from_secs(10)
    ));
    let url = format!("http://{}/v1/healthcheck/routes/r", gw.control_addr());
    // As APISIX's checker holds a node: by the address its name resolved to.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let one = get(&url).json();
        let n = &one["nodes"][0];
        if n["ip"] == "127.0.0.2" {
            assert_eq!(
                (n["port"].as_u64(), n["hostname"].as_str()),
                (Some(u64::from(port)), Some("127.0.0.2")),
                "{one}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{one}\n{}", gw.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_silent_dns_server_leaves_the_last_answer_serving() {
    let (_a, _b, port) = pair();
    let mut dns = Dnsmasq::start("127.0.0.2 svc.moongate.test\n");
    let gw = gateway(&dns, &[format!("svc.moongate.test:{port}")], "");
    let url = gw.url("/r");
    assert_eq!(get(&url).text(), "a");

    // Unanswered queries are no answer that the name is gone: as APISIX's DNS client keeps
    // its cached record on server errors, the last answer keeps serving.
    dns.stop();
    assert!(
        gw.wait_for_log(
            "failed to resolve svc.moongate.test: DNS query timed out; its last answer keeps serving",
            Duration::from_secs(10)
        ),
        "{}",
        gw.logs()
    );
    for _ in 0..10 {
        let r = get(&url);
        assert_eq!((r.status, r.text().as_str()), (200, "a"), "{}", gw.logs());
    }
    assert!(
        !gw.logs().contains("upstream node is down"),
        "{}",
        gw.logs()
    );
}

const PROBE: &str = r#"
local _M = { version = 0.1, priority = 100, name = "dns-probe", schema = { type = "object" } }

function _M.access(conf, ctx)
    if ngx.var.arg_http then
        -- lua-resty-http, over the same cosockets.
        local httpc = require("resty.http").new()
        local res, err = httpc:request_uri("http://" .. ngx.var.arg_host .. ":" .. conf.port .. "/")
        if not res then
            return 502, { err = err }
        end
        return 200, { body = res.body }
    end
    local s = ngx.socket.tcp()
    local ok, err = s:connect(ngx.var.arg_host, conf.port)
    if not ok then
        return 502, { err = err }
    end
    s:send("GET / HTTP/1.0\r\nHost: probe\r\n\r\n")
    local answer = s:receive("*a")
    s:close()
    return 200, { body = answer:match("\r\n\r\n(.*)$") }
end

return _M
"#;

#[test]
fn lua_cosockets_connect_by_name_through_the_same_resolver() {
    let (_a, _b, port) = pair();
    let mut dns = Dnsmasq::start("127.0.0.2 svc.moongate.test\n");
    let gw = Gateway::start_with_plugins(
        &[("dns-probe", PROBE)],
        &format!(
            "dns_resolver:\n  - {}\nroutes:\n  - id: p\n    uri: /p\n    plugins:\n      dns-probe: {{port: {port}}}\n    upstream:\n      nodes:\n        \"127.0.0.1:1\": 1\n",
            dns.server()
        ),
    );
    let probe = |host: &str| get(&gw.url(&format!("/p?host={host}"))).json();
    let http_probe = |host: &str| get(&gw.url(&format!("/p?http=1&host={host}"))).json();
    assert_eq!(probe("svc.moongate.test")["body"], "a", "{}", gw.logs());
    assert_eq!(
        http_probe("svc.moongate.test")["body"],
        "a",
        "{}",
        gw.logs()
    );

    dns.set("127.0.0.3 svc.moongate.test\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    while probe("svc.moongate.test")["body"] != "b" {
        assert!(Instant::now() < deadline, "{}", gw.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        http_probe("svc.moongate.test")["body"],
        "b",
        "{}",
        gw.logs()
    );

    // nginx's wording for a name that does not resolve.
    assert_eq!(
        probe("gone.moongate.test")["err"],
        "gone.moongate.test could not be resolved (3: Host not found)",
        "{}",
        gw.logs()
    );
}

#[test]
fn openfunction_s_function_uri_follows_its_record_through_the_same_resolver() {
    let (_a, _b, port) = pair();
    let mut dns = Dnsmasq::start("127.0.0.2 fn.moongate.test\n");
    let gw = Gateway::start(&format!(
        "dns_resolver:\n  - {}\nroutes:\n  - id: f\n    uri: /f\n    plugins:\n      openfunction: {{function_uri: \"http://fn.moongate.test:{port}/\"}}\n    upstream:\n      nodes:\n        \"127.0.0.1:1\": 1\n",
        dns.server()
    ));
    let url = gw.url("/f");
    until_body(&url, "a", || gw.logs());
    // The record changes: the function's next connections go to the new address, no reload.
    dns.set("127.0.0.3 fn.moongate.test\n");
    until_body(&url, "b", || gw.logs());
}

#[test]
fn bad_dns_settings_are_refused_with_their_path() {
    for (yaml, want) in [
        (
            "dns_resolver:\n  - 127.0.0.1:5353\n  - dns.example\n",
            "dns_resolver[1]: `dns.example` is not a DNS server address",
        ),
        (
            "dns_resolver: []\n",
            "dns_resolver: expected at least one DNS server",
        ),
        (
            "resolver_timeout: 0\n",
            "resolver_timeout: expected seconds above 0",
        ),
        ("dns_resolver_valid: soon\n", "dns_resolver_valid: "),
    ] {
        let (code, out) = check(yaml);
        assert_ne!(code, 0, "{yaml} was accepted: {out}");
        assert!(out.contains(want), "{yaml}: {out}");
    }
    let (code, out) = check("dns_resolver:\n  - 127.0.0.1\n  - \"[::1]:5353\"\nresolver_timeout: 2\ndns_resolver_valid: 30\nenable_resolv_search_opt: false\n");
    assert_eq!(code, 0, "{out}");
}
