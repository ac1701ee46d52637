//! Upstream health checks (APISIX's `checks`) over real loopback nodes the tests kill, bring
//! back and make answer 500: passive checks from traffic, the active checker, what the
//! balancer does with the result, what clients see while a node dies, and state kept over a
//! reload that leaves the upstream alone.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::health::{poll_until, LoadClient, Node};
use common::*;

/// Upper bound for anything the tests wait for (never reached when things work).
const WAIT: Duration = Duration::from_secs(20);

fn route(nodes: &[&Node], checks: &str) -> String {
    let nodes: String = nodes
        .iter()
        .map(|n| format!("        \"{}\": 1\n", n.node()))
        .collect();
    format!(
        "workers: 2\nroutes:\n  - id: r1\n    uri: /x\n    upstream_id: u1\nupstreams:\n  - id: u1\n    nodes:\n{nodes}    checks:\n{checks}"
    )
}

fn marked_down(gw: &Gateway, node: &Node) -> usize {
    gw.log_count(&[
        "upstream node marked unhealthy",
        &format!("node={}", node.node()),
    ])
}

fn marked_up(gw: &Gateway, node: &Node) -> usize {
    gw.log_count(&[
        "upstream node is healthy again",
        &format!("node={}", node.node()),
    ])
}

/// Sends `n` requests; how many each node's port served, and the non-200 count.
fn spread(client: &mut LoadClient, n: usize) -> (std::collections::HashMap<String, usize>, usize) {
    let mut by = std::collections::HashMap::new();
    let mut bad = 0;
    for _ in 0..n {
        match client.get("/x") {
            Ok((200, body)) => *by.entry(body).or_insert(0) += 1,
            _ => bad += 1,
        }
    }
    (by, bad)
}

#[test]
fn passive_checks_take_a_failing_node_out_and_active_checks_bring_it_back() {
    let a = Node::start();
    let b = Node::start();
    // Healthy nodes are probed once a minute (so the passive checks are what notices), an
    // unhealthy one every second.
    let checks = "      active:\n        http_path: /health\n        healthy: {interval: 60, successes: 2}\n        unhealthy: {interval: 1}\n      passive:\n        unhealthy: {http_failures: 3}\n";
    let gw = Gateway::start(&route(&[&a, &b], checks));
    let mut client = LoadClient::new(gw.addr());
    let (by, bad) = spread(&mut client, 40);
    assert_eq!(bad, 0);
    assert!(by.contains_key(&a.port().to_string()) && by.contains_key(&b.port().to_string()));

    a.set_failing(true);
    let mut served_500 = 0;
    for _ in 0..200 {
        if let Ok((500, _)) = client.get("/x") {
            served_500 += 1;
        }
        if marked_down(&gw, &a) == 1 {
            break;
        }
    }
    assert_eq!(marked_down(&gw, &a), 1, "{}", gw.logs());
    // Exactly the configured failures reached a client before the node was taken out.
    assert_eq!(served_500, 3);
    let line = gw
        .logs()
        .lines()
        .find(|l| l.contains("upstream node marked unhealthy"))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(
        line.contains("upstream=/apisix/upstreams/u1")
            && line.contains("3 HTTP failures in a row (passive check; last: status 500)"),
        "{line}"
    );

    // No traffic reaches it now: every request is served by the other node.
    let before = a.traffic();
    let (by, bad) = spread(&mut client, 40);
    assert_eq!((bad, by.get(&b.port().to_string())), (0, Some(&40)));
    assert_eq!(a.traffic(), before);

    // Recovered: the active checker's probes (every second while unhealthy) bring it back
    // after 2 successes.
    a.set_failing(false);
    assert!(
        poll_until(WAIT, || marked_up(&gw, &a) == 1),
        "{}",
        gw.logs()
    );
    assert!(a.probes() >= 2);
    let (by, bad) = spread(&mut client, 40);
    assert_eq!(bad, 0);
    assert!(by.get(&a.port().to_string()).is_some_and(|&n| n > 0));
    // Each change was logged once.
    assert_eq!((marked_down(&gw, &a), marked_up(&gw, &a)), (1, 1));
}

#[test]
fn a_killed_node_is_taken_out_by_active_checks_and_few_requests_fail() {
    let checks = "      active:\n        type: http\n        timeout: 1\n        http_path: /health\n        healthy: {interval: 1, successes: 2}\n        unhealthy: {interval: 1, tcp_failures: 2}\n";
    kill_under_load(checks, "active check");
}

#[test]
fn a_killed_node_is_taken_out_by_passive_checks_and_few_requests_fail() {
    // Healthy nodes are probed once a minute: the traffic's connect failures are what notices.
    let checks = "      active:\n        http_path: /health\n        healthy: {interval: 60, successes: 2}\n        unhealthy: {interval: 1}\n      passive:\n        unhealthy: {tcp_failures: 2}\n";
    kill_under_load(checks, "passive check");
}

/// Kills one of two nodes under the load of four clients and checks what the clients see: at
/// most the requests in flight on the node when it died fail, the node is marked down once
/// (by `by`), then gets no traffic and no request fails; brought back, it serves again.
fn kill_under_load(checks: &str, by: &str) {
    let a = Node::start();
    let b = Node::start();
    let gw = Gateway::start(&route(&[&a, &b], checks));
    let addr = gw.addr();

    // Four clients send requests one after the other, counting what fails.
    const CLIENTS: usize = 4;
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let done: Arc<Vec<AtomicU64>> = Arc::new((0..CLIENTS).map(|_| AtomicU64::new(0)).collect());
    let threads: Vec<_> = (0..CLIENTS)
        .map(|t| {
            let (stop, failed, done) = (stop.clone(), failed.clone(), done.clone());
            std::thread::spawn(move || {
                let mut c = LoadClient::new(addr);
                let end = Instant::now() + Duration::from_secs(60);
                for _ in 0..200_000 {
                    if stop.load(Ordering::SeqCst) || Instant::now() > end {
                        break;
                    }
                    if !matches!(c.get("/x"), Ok((200, _))) {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                    done[t].fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    let total = |done: &Vec<AtomicU64>| done.iter().map(|d| d.load(Ordering::SeqCst)).sum::<u64>();
    assert!(poll_until(WAIT, || total(&done) >= 200 && a.traffic() > 0));

    let killed = Instant::now();
    a.kill();
    assert!(
        poll_until(WAIT, || marked_down(&gw, &a) == 1),
        "{}",
        gw.logs()
    );
    let took = killed.elapsed();
    let failed_during_kill = failed.load(Ordering::SeqCst);
    let line = gw
        .logs()
        .lines()
        .find(|l| l.contains("upstream node marked unhealthy"))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(
        line.contains(&format!("TCP failures in a row ({by}; last: ")),
        "{line}"
    );
    // Let each client finish the request it had in flight when the node was marked down.
    let at_mark: Vec<u64> = done.iter().map(|d| d.load(Ordering::SeqCst)).collect();
    assert!(poll_until(WAIT, || done
        .iter()
        .zip(&at_mark)
        .all(|(d, m)| d.load(Ordering::SeqCst) >= m + 2)));
    let connect_failures =
        || gw.log_count(&["upstream connect failed", &format!("node={}", a.node())]);
    let tried_after_mark = connect_failures();
    let failed_at_mark = failed.load(Ordering::SeqCst);
    let start = total(&done);
    assert!(poll_until(WAIT, || total(&done) >= start + 400));
    // Once marked down the dead node is not tried at all, and nothing fails.
    assert_eq!(connect_failures(), tried_after_mark);
    assert_eq!(failed.load(Ordering::SeqCst), failed_at_mark);
    println!(
        "node killed: marked down by the {by} after {took:?}; \
         client requests failed meanwhile: {failed_during_kill} of {}; \
         connect attempts to the dead node: {tried_after_mark}",
        total(&done)
    );
    // Connect failures are retried on the other node: at most the requests in flight on the
    // node when it died can fail.
    assert!(
        failed_during_kill <= CLIENTS as u64,
        "{failed_during_kill} failed"
    );

    // Back on the same port: 2 successful probes bring it back, and it serves again.
    a.revive();
    let traffic = a.traffic();
    assert!(
        poll_until(WAIT, || marked_up(&gw, &a) == 1),
        "{}",
        gw.logs()
    );
    assert!(poll_until(WAIT, || a.traffic() > traffic));
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().expect("client thread");
    }
    assert_eq!(failed.load(Ordering::SeqCst), failed_at_mark);
}

#[test]
fn probes_go_to_the_configured_port_with_host_and_headers_and_all_nodes_down_still_serve() {
    let a = Node::start();
    let b = Node::start();
    // The nodes' health is served on another port (here: another node's).
    let h = Node::start();
    let checks = format!(
        "      active:\n        http_path: /status\n        host: health.example\n        port: {}\n        req_headers: [\"X-Probe: yes\", \"X-Zone: a\"]\n        healthy: {{interval: 1, successes: 1}}\n        unhealthy: {{interval: 1, http_failures: 1}}\n",
        h.port()
    );
    let gw = Gateway::start(&format!(
        "control: {{ip: 127.0.0.1, port: 0}}\n{}",
        route(&[&a, &b], &checks)
    ));
    assert!(poll_until(WAIT, || h.probes() >= 2), "{}", gw.logs());
    assert_eq!((a.probes(), b.probes()), (0, 0));
    // The control API shows the targets as APISIX's checker holds them: the probed port, the
    // probe's host name.
    let one = get(&format!(
        "http://{}/v1/healthcheck/upstreams/u1",
        gw.control_addr()
    ))
    .json();
    let nodes = one["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 2, "{one}");
    for n in nodes {
        assert_eq!(
            (n["ip"].as_str(), n["port"].as_u64(), n["hostname"].as_str()),
            (
                Some("127.0.0.1"),
                Some(u64::from(h.port())),
                Some("health.example")
            ),
            "{one}"
        );
    }
    let (path, headers) = h.last_probe().expect("a probe");
    assert_eq!(path, "/status");
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    assert_eq!(header("host").as_deref(), Some("health.example"));
    assert_eq!(header("x-probe").as_deref(), Some("yes"));
    assert_eq!(header("x-zone").as_deref(), Some("a"));

    // The health port fails: both nodes are marked down though they serve. With every node
    // down the balancer uses all of them (APISIX's behaviour) and says so once.
    h.set_failing(true);
    assert!(
        poll_until(WAIT, || marked_down(&gw, &a) == 1
            && marked_down(&gw, &b) == 1),
        "{}",
        gw.logs()
    );
    let all_down = "every node of the upstream is unhealthy: traffic goes to all of them";
    assert!(gw.wait_for_log(all_down, WAIT), "{}", gw.logs());
    let mut client = LoadClient::new(gw.addr());
    let (by, bad) = spread(&mut client, 40);
    assert_eq!(bad, 0, "{}", gw.logs());
    assert!(by.contains_key(&a.port().to_string()) && by.contains_key(&b.port().to_string()));
    assert_eq!(gw.logs().matches(all_down).count(), 1, "{}", gw.logs());
    let line = gw
        .logs()
        .lines()
        .find(|l| l.contains(all_down))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(
        line.contains("WARN") && line.contains("upstream=/apisix/upstreams/u1"),
        "{line}"
    );

    h.set_failing(false);
    assert!(
        poll_until(WAIT, || marked_up(&gw, &a) == 1 && marked_up(&gw, &b) == 1),
        "{}",
        gw.logs()
    );
}

#[test]
fn a_node_that_stops_answering_is_marked_down_by_timeouts() {
    // Each accepts, reads the request and answers nothing for 30 s.
    let probed = RawUpstream::start(vec![(Duration::from_secs(30), b"")]);
    let proxied = RawUpstream::start(vec![(Duration::from_secs(30), b"")]);
    let good = Node::start();
    let gw = Gateway::start(&format!(
        "workers: 2\nroutes:\n  - id: ra\n    uri: /a\n    upstream_id: ua\n  - id: rp\n    uri: /x\n    upstream_id: up\nupstreams:\n  - id: ua\n    nodes:\n      \"{probed}\": 1\n    checks:\n      active:\n        timeout: 0.2\n        healthy: {{interval: 1}}\n        unhealthy: {{interval: 1, timeouts: 2}}\n  - id: up\n    timeout: {{connect: 1, send: 0.3, read: 0.3}}\n    nodes:\n      \"{proxied}\": 1\n      \"{good}\": 1\n    checks:\n      active:\n        healthy: {{interval: 60}}\n        unhealthy: {{interval: 60}}\n      passive:\n        unhealthy: {{timeouts: 2}}\n",
        probed = probed.node(),
        proxied = proxied.node(),
        good = good.node(),
    ));
    let down = |upstream: &str| {
        gw.logs()
            .lines()
            .filter(|l| {
                l.contains("upstream node marked unhealthy")
                    && l.contains(&format!("upstream=/apisix/upstreams/{upstream} "))
            })
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    // Active probes time out (0.2 s each, every second): two in a row take the node out.
    assert!(poll_until(WAIT, || down("ua").len() == 1), "{}", gw.logs());
    assert!(
        down("ua")[0].contains("2 timeouts in a row (active check; last: timeout)"),
        "{:?}",
        down("ua")
    );

    // Proxied requests time out on it (read 0.3 s) and are retried on the other node; the
    // passive checks count the timeouts and take it out.
    let mut client = LoadClient::new(gw.addr());
    for _ in 0..20 {
        assert_eq!(client.get("/x"), Ok((200, good.port().to_string())));
        if down("up").len() == 1 {
            break;
        }
    }
    assert_eq!(down("up").len(), 1, "{}", gw.logs());
    assert!(
        down("up")[0].contains("timeouts in a row (passive check; last: timeout)"),
        "{:?}",
        down("up")
    );
    let reached = proxied.requests();
    let (by, bad) = spread(&mut client, 20);
    assert_eq!((bad, by.get(&good.port().to_string())), (0, Some(&20)));
    assert_eq!(proxied.requests(), reached);
}

#[test]
fn a_reload_that_leaves_the_upstream_alone_keeps_its_health() {
    let a = Node::start();
    let b = Node::start();
    a.set_failing(true);
    let checks = "      active:\n        http_path: /health\n        healthy: {interval: 1}\n        unhealthy: {interval: 1, http_failures: 1}\n";
    let gw = Gateway::start(&route(&[&a, &b], checks));
    assert!(
        poll_until(WAIT, || marked_down(&gw, &a) == 1),
        "{}",
        gw.logs()
    );

    // Another route changes; the upstream does not.
    let file = std::fs::read_to_string(gw.config_path()).expect("read config");
    let edited = format!("{file}  # edited\n").replace(
        "routes:\n",
        "routes:\n  - id: r2\n    uri: /other\n    upstream_id: u1\n",
    );
    std::fs::write(gw.config_path(), &edited).expect("write");
    assert!(gw.wait_for_log("new configuration generation is serving", WAIT));
    // A fresh state would start with the node healthy and send it about half of these.
    let before = a.traffic();
    let mut client = LoadClient::new(gw.addr());
    let (_, bad) = spread(&mut client, 30);
    assert_eq!(bad, 0);
    assert_eq!(a.traffic(), before);
    assert_eq!(marked_down(&gw, &a), 1);

    // The upstream changes (a node's weight): its checker starts fresh and finds the node
    // failing again.
    let changed = edited.replace(
        &format!("\"{}\": 1", a.node()),
        &format!("\"{}\": 2", a.node()),
    );
    std::fs::write(gw.config_path(), changed).expect("write");
    assert!(
        poll_until(WAIT, || marked_down(&gw, &a) == 2),
        "{}",
        gw.logs()
    );
}

#[test]
fn bad_checks_are_refused_with_the_field_path() {
    let base = "routes:\n  - id: r1\n    uri: /x\n    upstream:\n      nodes: {\"127.0.0.1:1\": 1}\n      checks:\n";
    let (code, out) = check(&format!(
        "{base}        active:\n          healthy: {{successes: 0}}\n"
    ));
    assert_ne!(code, 0);
    assert!(
        out.contains(
            "routes[0].upstream: checks.active.healthy.successes must be between 1 and 254, got 0"
        ),
        "{out}"
    );
    let (code, out) = check(&format!(
        "{base}        active:\n          unhealthy: {{intervall: 1}}\n"
    ));
    assert_ne!(code, 0);
    assert!(
        out.contains("checks.active.unhealthy") && out.contains("unknown field `intervall`"),
        "{out}"
    );
    let (code, out) = check(&format!("{base}        passive: {{}}\n"));
    assert_ne!(code, 0);
    assert!(out.contains("missing field `active`"), "{out}");
    let (code, out) = check(&format!("{base}        active: {{}}\n"));
    assert_eq!(code, 0, "{out}");
}

#[test]
fn the_control_api_shows_node_health_in_apisix_s_shapes() {
    let a = Node::start();
    let b = Node::start();
    a.set_failing(true);
    let checks = "      active:\n        http_path: /health\n        unhealthy: {interval: 1, http_failures: 1}\n";
    // u1 (a named upstream, used by r1), r2's inline upstream and service s1's.
    let yaml = route(&[&a, &b], checks).replace(
        "upstreams:\n",
        &format!(
            "  - id: r2\n    uri: /inline\n    upstream:\n      nodes: {{\"{b}\": 1}}\n      checks:\n        active: {{type: tcp}}\n  - id: r3\n    uri: /service\n    service_id: s1\nservices:\n  - id: s1\n    upstream:\n      nodes: {{\"{a}\": 1}}\n      checks:\n        active: {{http_path: /health, unhealthy: {{interval: 1, http_failures: 1}}}}\nupstreams:\n",
            b = b.node(),
            a = a.node(),
        ),
    );
    let yaml = format!(
        "control: {{ip: 127.0.0.1, port: 0}}\nplugin_attr:\n  prometheus:\n    export_addr: {{ip: 127.0.0.1, port: 0}}\n{yaml}"
    );
    let gw = Gateway::start(&yaml);
    let control = gw.control_addr();
    // APISIX's `apisix_upstream_status{name, ip, port}`: 1 healthy, 0 not.
    let metrics = common::observability::metrics_url(&gw);
    let status_metric = |name: &str, port: u16| {
        let (_, samples, _) = common::observability::scrape(&metrics, None);
        common::observability::value(
            &samples,
            "apisix_upstream_status",
            &[
                ("name", name),
                ("ip", "127.0.0.1"),
                ("port", &port.to_string()),
            ],
        )
    };
    let url = |p: &str| format!("http://{control}{p}");
    // Down in u1 and in s1.
    assert!(
        poll_until(WAIT, || marked_down(&gw, &a) == 2),
        "{}",
        gw.logs()
    );

    let all = get(&url("/v1/healthcheck"));
    assert_eq!(all.status, 200);
    let all = all.json();
    let names: Vec<&str> = all
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "/apisix/routes/r2",
            "/apisix/services/s1",
            "/apisix/upstreams/u1"
        ]
    );
    assert_eq!(all[0]["type"], "tcp");
    // The service's checker took its node out too.
    let svc = get(&url("/v1/healthcheck/services/s1")).json();
    assert_eq!(svc["name"], "/apisix/services/s1", "{svc}");
    assert_eq!(svc["nodes"][0]["status"], "unhealthy", "{svc}");

    let one = get(&url("/v1/healthcheck/upstreams/u1"));
    assert_eq!(one.status, 200);
    let one = one.json();
    assert_eq!(
        (one["name"].as_str(), one["type"].as_str()),
        (Some("/apisix/upstreams/u1"), Some("http"))
    );
    let node = |port: u16| {
        one["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["port"] == port).cloned())
            .expect("node listed")
    };
    let down = node(a.port());
    assert_eq!(down["ip"], "127.0.0.1");
    assert!(
        down["status"] == "unhealthy" || down["status"] == "mostly_unhealthy",
        "{down}"
    );
    for k in ["success", "http_failure", "tcp_failure", "timeout_failure"] {
        assert!(down["counter"][k].is_u64(), "{down}");
    }
    assert_eq!(node(b.port())["status"], "healthy");
    assert_eq!(status_metric("/apisix/upstreams/u1", a.port()), 0.0);
    assert_eq!(status_metric("/apisix/upstreams/u1", b.port()), 1.0);
    assert_eq!(status_metric("/apisix/routes/r2", b.port()), 1.0);

    // Recovery shows too.
    a.set_failing(false);
    assert!(poll_until(WAIT, || {
        get(&url("/v1/healthcheck/upstreams/u1")).json()["nodes"]
            .as_array()
            .is_some_and(|ns| ns.iter().all(|n| n["status"] == "healthy"))
    }));
    assert_eq!(status_metric("/apisix/upstreams/u1", a.port()), 1.0);

    // APISIX's errors.
    let r = get(&url("/v1/healthcheck/upstreams/nope"));
    assert_eq!(
        (r.status, r.json()["error_msg"].as_str()),
        (404, Some("upstreams[nope] not found"))
    );
    let r = get(&url("/v1/healthcheck/routes/r1"));
    assert_eq!(
        (r.status, r.json()["error_msg"].as_str()),
        (404, Some("no checker for routes[r1]"))
    );
    let r = get(&url("/v1/healthcheck/plugins/1"));
    assert_eq!(
        (r.status, r.json()["error_msg"].as_str()),
        (400, Some("invalid src type plugins"))
    );

    // A browser gets APISIX's table.
    let r = Req::get(&url("/v1/healthcheck"))
        .header("Accept", "text/html")
        .send();
    assert_eq!(r.header("content-type").as_deref(), Some("text/html"));
    assert!(
        r.text()
            .contains(&format!("<td>127.0.0.1:{}</td>", a.port())),
        "{}",
        r.text()
    );
}

#[test]
fn a_control_address_in_use_leaves_the_control_api_off_and_traffic_served() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let b = Node::start();
    let gw = Gateway::start(&format!(
        "control: {{ip: 127.0.0.1, port: {port}}}\nroutes:\n  - id: r1\n    uri: /x\n    upstream:\n      nodes: {{\"{}\": 1}}\n",
        b.node()
    ));
    assert!(gw.wait_for_log("control API: ", WAIT), "{}", gw.logs());
    assert!(gw.logs().contains("it is off"));
    assert_eq!(get(&gw.url("/x")).status, 200);
}
