//! Balancer types (`chash`, `least_conn`, `ewma`), node priorities and retries over real
//! loopback nodes the tests start, stall and kill.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::health::{poll_until, LoadClient, Node};
use common::*;

/// Upper bound for anything the tests wait for (never reached when things work).
const WAIT: Duration = Duration::from_secs(20);

/// `nodes` in the list form, `(address, priority)`.
fn listed(nodes: &[(String, i64)]) -> String {
    nodes
        .iter()
        .map(|(addr, p)| {
            let (host, port) = addr.rsplit_once(':').expect("host:port");
            format!("        - {{host: \"{host}\", port: {port}, weight: 1, priority: {p}}}\n")
        })
        .collect()
}

fn chash_config(nodes: &[&Node]) -> String {
    let nodes: String = nodes
        .iter()
        .map(|n| format!("        \"{}\": 1\n", n.node()))
        .collect();
    format!(
        "workers: 2\nroutes:\n  - id: r1\n    uri: /x\n    upstream_id: u1\nupstreams:\n  - id: u1\n    type: chash\n    hash_on: header\n    key: X-User\n    nodes:\n{nodes}"
    )
}

/// Which node (its port, the body) serves each of `keys`.
fn owners(client: &mut LoadClient, keys: usize) -> Vec<String> {
    (0..keys)
        .map(|k| {
            let user = format!("user-{k}");
            match client.get_with("/x", &[("X-User", &user)]) {
                Ok((200, port)) => port,
                other => panic!("key {user}: {other:?}"),
            }
        })
        .collect()
}

#[test]
fn chash_keeps_each_key_on_its_node_and_a_removed_node_moves_only_its_keys() {
    let nodes: Vec<Node> = (0..4).map(|_| Node::start()).collect();
    let refs: Vec<&Node> = nodes.iter().collect();
    let gw = Gateway::start(&chash_config(&refs));
    let mut client = LoadClient::new(gw.addr());
    const KEYS: usize = 1000;
    let first = owners(&mut client, KEYS);
    // Every key again (on two workers): the same node each time.
    assert_eq!(owners(&mut client, KEYS), first);
    let mut share: HashMap<&str, usize> = HashMap::new();
    for p in &first {
        *share.entry(p.as_str()).or_insert(0) += 1;
    }
    assert_eq!(share.len(), 4, "{share:?}");
    assert!(share.values().all(|&n| n > 100), "{share:?}");

    // The last node leaves the upstream.
    let removed = nodes[3].port().to_string();
    std::fs::write(gw.config_path(), chash_config(&refs[..3])).expect("write");
    assert!(gw.wait_for_log("new configuration generation is serving", WAIT));
    let after = owners(&mut client, KEYS);
    let mut moved = 0;
    for (before, now) in first.iter().zip(&after) {
        assert_ne!(now, &removed);
        if before == &removed {
            moved += 1;
        } else {
            assert_eq!(before, now, "a key of a node that stayed moved");
        }
    }
    // Only the removed node's keys moved: about a quarter.
    let fraction = moved as f64 / KEYS as f64;
    assert!((0.12..=0.40).contains(&fraction), "moved {fraction}");
}

#[test]
fn least_conn_sends_new_requests_to_the_node_with_fewer_in_flight() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let held = gate.clone();
    let slow = Upstream::start(move |_req| {
        let gate = held.clone();
        async move {
            // Held until the test opens the gate (bounded, in case it never does).
            let _ = tokio::time::timeout(WAIT, gate.acquire()).await;
            http::Response::new(full("slow"))
        }
    });
    let fast = Upstream::text("fast");
    let gw = Gateway::start(&format!(
        "workers: 2\nroutes:\n  - id: r1\n    uri: /x\n    upstream:\n      type: least_conn\n      nodes:\n        \"{}\": 1\n        \"{}\": 1\n",
        slow.node(),
        fast.node()
    ));
    let fast_done = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for i in 0..20u64 {
        let addr = gw.addr();
        let done = fast_done.clone();
        threads.push(std::thread::spawn(move || {
            let r = LoadClient::new(addr).get("/x");
            if matches!(&r, Ok((200, b)) if b == "fast") {
                done.fetch_add(1, Ordering::SeqCst);
            }
            r
        }));
        // One request at a time: each is either held by the slow node or answered.
        assert!(
            poll_until(WAIT, || slow.requests() + fast_done.load(Ordering::SeqCst)
                == i + 1),
            "request {i} went nowhere: {}",
            gw.logs()
        );
    }
    // The slow node holds one request; round-robin would have sent it about half.
    assert_eq!(slow.requests(), 1);
    assert_eq!(fast_done.load(Ordering::SeqCst), 19);
    gate.add_permits(100);
    let results: Vec<_> = threads
        .into_iter()
        .map(|t| t.join().expect("client thread"))
        .collect();
    assert!(results
        .iter()
        .any(|r| matches!(r, Ok((200, b)) if b == "slow")));
}

#[test]
fn ewma_sends_traffic_to_the_faster_node() {
    let slow = Upstream::slow(Duration::from_millis(300));
    let fast = Upstream::text("fast");
    let gw = Gateway::start(&format!(
        "routes:\n  - id: r1\n    uri: /x\n    upstream:\n      type: ewma\n      nodes:\n        \"{}\": 1\n        \"{}\": 1\n",
        slow.node(),
        fast.node()
    ));
    let mut client = LoadClient::new(gw.addr());
    for _ in 0..30 {
        assert!(matches!(client.get("/x"), Ok((200, _))));
    }
    // A node's first answer sets its average; from then on the slow one loses every pair.
    // Round-robin would have sent it 15.
    assert!(slow.requests() <= 2, "slow node got {}", slow.requests());
    assert!(fast.requests() >= 28);
}

#[test]
fn lower_priorities_take_traffic_only_when_the_higher_ones_fail() {
    let dead = format!("127.0.0.1:{}", closed_port());
    let mid = Node::start();
    let low = Node::start();
    let gw = Gateway::start(&format!(
        "routes:\n  - id: r1\n    uri: /x\n    upstream:\n      nodes:\n{}",
        listed(&[(dead, 10), (mid.node(), 0), (low.node(), -5)])
    ));
    let mut client = LoadClient::new(gw.addr());
    for _ in 0..20 {
        assert_eq!(client.get("/x"), Ok((200, mid.port().to_string())));
    }
    assert_eq!(low.traffic(), 0);
    // The default priority dies too: the lowest serves (two retries, the default for three
    // nodes).
    mid.kill();
    for _ in 0..10 {
        assert_eq!(client.get("/x"), Ok((200, low.port().to_string())));
    }
}

fn retry_config(nodes: &[(String, i64)], extra: &str) -> String {
    format!(
        "routes:\n  - id: r1\n    uri: /x\n    upstream:\n      timeout: {{connect: 2, send: 0.3, read: 0.3}}\n{extra}      nodes:\n{}",
        listed(nodes)
    )
}

#[test]
fn a_dead_first_node_is_retried_on_the_next_and_retries_zero_does_not() {
    let dead = format!("127.0.0.1:{}", closed_port());
    let alive = Node::start();
    let nodes = [(dead, 1), (alive.node(), 0)];
    let gw = Gateway::start(&retry_config(&nodes, ""));
    let mut client = LoadClient::new(gw.addr());
    assert_eq!(client.get("/x"), Ok((200, alive.port().to_string())));
    drop(gw);
    let gw = Gateway::start(&retry_config(&nodes, "      retries: 0\n"));
    let mut client = LoadClient::new(gw.addr());
    assert_eq!(client.get("/x").map(|r| r.0), Ok(502));
    assert_eq!(alive.traffic(), 1);
}

#[test]
fn a_timeout_before_the_response_is_retried_for_idempotent_requests_only() {
    let stall = RawUpstream::start(vec![(Duration::from_secs(30), b"")]);
    let alive = Node::start();
    let gw = Gateway::start(&retry_config(&[(stall.node(), 1), (alive.node(), 0)], ""));
    let mut client = LoadClient::new(gw.addr());
    assert_eq!(client.get("/x"), Ok((200, alive.port().to_string())));
    assert_eq!(stall.requests(), 1);
    // A POST may have been acted on by the node that timed out: not sent again (nginx's
    // proxy_next_upstream without non_idempotent).
    let r = Req::post(&gw.url("/x")).body("payload").send();
    assert_eq!(r.status, 504);
    assert_eq!(stall.requests(), 2);
    assert_eq!(alive.traffic(), 1);
    // An idempotent method, but its body streamed from the client went to the node and is
    // not kept: not sent again either.
    let r = Req::new("PUT", &gw.url("/x")).body("payload").send();
    assert_eq!(r.status, 504);
    assert_eq!(stall.requests(), 3);
    assert_eq!(alive.traffic(), 1);
}

#[test]
fn retry_timeout_stops_retries_once_it_has_passed() {
    let a = RawUpstream::start(vec![(Duration::from_secs(30), b"")]);
    let b = RawUpstream::start(vec![(Duration::from_secs(30), b"")]);
    let good = Node::start();
    let nodes = [(a.node(), 2), (b.node(), 1), (good.node(), 0)];
    // Without a budget the request gets through on the third node.
    let gw = Gateway::start(&retry_config(&nodes, ""));
    let mut client = LoadClient::new(gw.addr());
    assert_eq!(client.get("/x"), Ok((200, good.port().to_string())));
    assert_eq!((a.requests(), b.requests()), (1, 1));
    drop(gw);
    // A budget shorter than one try: no retry starts after the first try timed out.
    let gw = Gateway::start(&retry_config(&nodes, "      retry_timeout: 0.1\n"));
    let mut client = LoadClient::new(gw.addr());
    assert_eq!(client.get("/x").map(|r| r.0), Ok(502));
    assert_eq!((a.requests(), b.requests()), (2, 1));
    assert_eq!(good.traffic(), 1);
    assert!(gw.wait_for_log("proxy retry timeout, retry count: 0", WAIT));
}

#[test]
fn bad_hash_on_and_key_are_refused_with_the_field_path() {
    let base = "routes:\n  - id: r1\n    uri: /x\n    upstream:\n      nodes: {\"127.0.0.1:1\": 1}\n      type: chash\n";
    let (code, out) = check(base);
    assert_ne!(code, 0);
    assert!(out.contains("routes[0].upstream.key: missing key"), "{out}");
    let (code, out) = check(&format!(
        "{base}      hash_on: header\n      key: \"X User\"\n"
    ));
    assert_ne!(code, 0);
    assert!(
        out.contains(
            "routes[0].upstream.key: failed to match pattern \"^[a-zA-Z0-9-_]+$\" with \"X User\""
        ),
        "{out}"
    );
    let (code, out) = check(&format!("{base}      key: http_x_user\n"));
    assert_ne!(code, 0);
    assert!(
        out.contains("routes[0].upstream.key: failed to match pattern"),
        "{out}"
    );
    let (code, out) = check(&format!("{base}      hash_on: body\n      key: x\n"));
    assert_ne!(code, 0);
    assert!(out.contains("routes[0].upstream.hash_on"), "{out}");
    // A consumer needs no key; vars_combinations takes any template.
    let (code, out) = check(&format!("{base}      hash_on: consumer\n"));
    assert_eq!(code, 0, "{out}");
    let (code, out) = check(&format!(
        "{base}      hash_on: vars_combinations\n      key: \"$remote_addr-${{http_x_user ?? anon}}\"\n"
    ));
    assert_eq!(code, 0, "{out}");
}

#[test]
fn chash_on_consumer_hashes_the_consumer_name() {
    let nodes: Vec<Node> = (0..3).map(|_| Node::start()).collect();
    let list: String = nodes
        .iter()
        .map(|n| format!("        \"{}\": 1\n", n.node()))
        .collect();
    let consumers: String = (0..30)
        .map(|i| {
            format!("  - username: user{i}\n    plugins:\n      token-auth: {{token: t{i}}}\n")
        })
        .collect();
    // The same nodes hashed on a header carrying the user name: the consumer's name is the key
    // exactly when both routes agree.
    let gw = Gateway::start_with_plugins(
        &[("token-auth", common::lua_plugins::TOKEN_AUTH)],
        &format!(
            "workers: 2\nroutes:\n  - id: by-consumer\n    uri: /x\n    plugins:\n      token-auth: {{}}\n    upstream:\n      type: chash\n      hash_on: consumer\n      nodes:\n{list}  - id: by-header\n    uri: /h\n    upstream:\n      type: chash\n      hash_on: header\n      key: X-Name\n      nodes:\n{list}consumers:\n{consumers}"
        ),
    );
    let mut client = LoadClient::new(gw.addr());
    let mut used = std::collections::HashSet::new();
    for i in 0..30 {
        let token = format!("t{i}");
        let name = format!("user{i}");
        let by_header = client.get_with("/h", &[("X-Name", &name)]);
        for _ in 0..3 {
            let by_consumer = client.get_with("/x", &[("X-Token", &token)]);
            assert!(matches!(&by_consumer, Ok((200, _))), "{by_consumer:?}");
            assert_eq!(by_consumer, by_header, "{name}");
        }
        used.insert(by_header.map(|r| r.1).unwrap_or_default());
    }
    assert_eq!(used.len(), 3, "{used:?}");
}

/// A node on 127.0.0.1 that closes its first connection after reading the request head and
/// answers `200 ok` on the later ones; how many connections it took.
fn closes_first_connection() -> (String, Arc<AtomicU64>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let conns = Arc::new(AtomicU64::new(0));
    let seen = conns.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(10) {
            let Ok(mut s) = stream else { continue };
            let n = seen.fetch_add(1, Ordering::SeqCst);
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => head.extend_from_slice(&buf[..k]),
                }
            }
            if n > 0 {
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
            }
        }
    });
    (addr, conns)
}

#[test]
fn a_single_node_is_retried_itself_when_retries_allow() {
    let (node, conns) = closes_first_connection();
    let cfg = |extra: &str| {
        format!("routes:\n  - id: r1\n    uri: /x\n    upstream:\n{extra}      nodes:\n        \"{node}\": 1\n")
    };
    let gw = Gateway::start(&cfg("      retries: 1\n"));
    assert_eq!(LoadClient::new(gw.addr()).get("/x"), Ok((200, "ok".into())));
    assert_eq!(conns.load(Ordering::SeqCst), 2);
    drop(gw);
    // One node: no retry by default.
    let (node2, conns2) = closes_first_connection();
    let gw = Gateway::start(&cfg("").replace(&node, &node2));
    assert_eq!(LoadClient::new(gw.addr()).get("/x").map(|r| r.0), Ok(502));
    assert_eq!(conns2.load(Ordering::SeqCst), 1);
}
