use super::*;
use serde_json::json;

fn upstream(v: serde_json::Value) -> Upstream {
    serde_json::from_value(v).expect("upstream")
}

fn balancer(v: serde_json::Value) -> (Upstream, Balancer) {
    let u = upstream(v);
    let addrs: Vec<String> = u
        .nodes
        .0
        .iter()
        .map(|n| format!("{}:{}", n.host, n.port.unwrap_or(80)))
        .collect();
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    // A key of its own per test: load state is process-wide.
    let key = format!("/test/{}", serde_json::to_string(&u.nodes).expect("nodes"));
    let b = Balancer::new(&u, &key, &refs);
    (u, b)
}

fn ctx(query: &str, headers: &[(&str, &str)]) -> Ctx {
    let mut map = http::HeaderMap::new();
    for (k, v) in headers {
        map.insert(
            http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            http::HeaderValue::from_str(v).expect("value"),
        );
    }
    let addr: std::net::SocketAddr = "10.1.2.3:5000".parse().expect("addr");
    Ctx::new(
        http::Method::GET,
        "/".into(),
        Some(query.to_string()),
        format!("/?{query}"),
        http::Version::HTTP_11,
        map,
        crate::body::RequestBody::Empty,
        addr,
        addr,
        "http",
    )
}

fn all_picks(b: &Balancer, c: &Ctx, health: Option<&UpstreamHealth>) -> Vec<usize> {
    let mut sel = b.begin(c);
    std::iter::from_fn(|| b.next(&mut sel, health)).collect()
}

fn health(n: usize) -> UpstreamHealth {
    let checks = serde_json::from_value(json!({"active": {"unhealthy": {"tcp_failures": 1}}}))
        .expect("checks");
    UpstreamHealth::new(
        "/test".into(),
        checks,
        String::new(),
        (0..n)
            .map(|i| ("127.0.0.1".to_string(), i as u16 + 1))
            .collect(),
    )
}

fn mark_down(h: &UpstreamHealth, i: usize) {
    h.report(
        i,
        crate::health::Source::Active,
        crate::health::Observation::TcpFailure("refused".into()),
    );
}

#[test]
fn retries_never_repeat_a_node_and_weight_zero_is_never_picked() {
    let (_, b) = balancer(json!({"nodes": {"a:1": 1, "b:1": 2, "c:1": 0, "d:1": 1}}));
    let c = ctx("", &[]);
    for _ in 0..8 {
        let mut picks = all_picks(&b, &c, None);
        assert_eq!(picks.len(), 3, "{picks:?}");
        picks.sort_unstable();
        assert_eq!(picks, vec![0, 1, 3]);
    }
}

#[test]
fn priority_groups_are_tried_highest_first() {
    let (_, b) = balancer(json!({"type": "roundrobin", "nodes": [
        {"host": "low", "port": 1, "weight": 1, "priority": -1},
        {"host": "hi1", "port": 1, "weight": 1, "priority": 5},
        {"host": "mid", "port": 1, "weight": 1},
        {"host": "hi2", "port": 1, "weight": 1, "priority": 5},
    ]}));
    let c = ctx("", &[]);
    let picks = all_picks(&b, &c, None);
    assert_eq!(&picks[2..], &[2, 0]);
    assert!(picks[..2].contains(&1) && picks[..2].contains(&3));
    // Both high nodes down: the default priority takes the traffic; all down: all are used,
    // highest first.
    let h = health(4);
    mark_down(&h, 1);
    mark_down(&h, 3);
    for _ in 0..4 {
        assert_eq!(all_picks(&b, &c, Some(&h)), vec![2, 0]);
    }
    mark_down(&h, 0);
    mark_down(&h, 2);
    assert_eq!(all_picks(&b, &c, Some(&h)).len(), 4);
}

#[test]
fn every_type_skips_unhealthy_nodes() {
    for kind in ["roundrobin", "chash", "least_conn", "ewma"] {
        let (_, b) = balancer(json!({"type": kind, "key": "arg_k",
            "nodes": {"a:1": 1, "b:1": 1, "c:1": 1}}));
        let h = health(3);
        mark_down(&h, 1);
        for k in 0..30 {
            let c = ctx(&format!("k={k}"), &[]);
            let mut sel = b.begin(&c);
            let first = b.next(&mut sel, Some(&h));
            assert!(matches!(first, Some(0 | 2)), "{kind}: {first:?}");
        }
    }
}

#[test]
fn every_type_leaves_out_nodes_whose_name_does_not_resolve() {
    crate::dns::force("down.balancer.test", true);
    crate::dns::force("up.balancer.test", false);
    for kind in ["roundrobin", "chash", "least_conn", "ewma"] {
        let nodes = json!({"type": kind, "key": "arg_k",
            "nodes": {"up.balancer.test:1": 1, "down.balancer.test:1": 1, "127.0.0.1:1": 1}});
        let (u, b) = balancer(nodes);
        let names = u
            .nodes
            .0
            .iter()
            .map(|n| crate::dns::node_name(&n.host, "/test/dns", &n.host))
            .collect();
        let b = b.with_names(names);
        for k in 0..30 {
            let c = ctx(&format!("k={k}"), &[]);
            let picks = all_picks(&b, &c, None);
            assert!(picks.len() == 2 && !picks.contains(&1), "{kind}: {picks:?}");
        }
        // The nodes that resolve are unhealthy, the one out by DNS is not: the others are
        // used all the same, never the one that does not resolve.
        let h = health(3);
        mark_down(&h, 0);
        mark_down(&h, 2);
        let c = ctx("k=1", &[]);
        let mut sel = b.begin(&c);
        let first = b.next(&mut sel, Some(&h));
        assert!(matches!(first, Some(0 | 2)), "{kind}: {first:?}");
    }
}

#[test]
fn chash_is_sticky_per_key_and_hashes_header_cookie_and_combinations() {
    let (_, b) = balancer(
        json!({"type": "chash", "hash_on": "header", "key": "X-User",
        "nodes": {"a:1": 1, "b:1": 1, "c:1": 1, "d:1": 1}}),
    );
    let mut seen = std::collections::HashSet::new();
    for k in 0..200 {
        let user = format!("u{k}");
        let first = all_picks(&b, &ctx("", &[("x-user", &user)]), None)[0];
        for _ in 0..3 {
            assert_eq!(
                all_picks(&b, &ctx("", &[("x-user", &user)]), None)[0],
                first
            );
        }
        seen.insert(first);
    }
    assert_eq!(seen.len(), 4);
    // A retry walks the ring on: every node once.
    let mut picks = all_picks(&b, &ctx("", &[("x-user", "u1")]), None);
    picks.sort_unstable();
    assert_eq!(picks, vec![0, 1, 2, 3]);

    let (_, b) = balancer(json!({"type": "chash", "hash_on": "cookie", "key": "sid",
        "nodes": {"a:1": 1, "b:1": 1, "c:1": 1, "d:1": 1}}));
    let (_, v) = balancer(json!({"type": "chash", "hash_on": "vars", "key": "arg_sid",
        "nodes": {"a:1": 1, "b:1": 1, "c:1": 1, "d:1": 1}}));
    let (_, t) = balancer(json!({"type": "chash", "hash_on": "vars_combinations",
        "key": "${arg_sid}", "nodes": {"a:1": 1, "b:1": 1, "c:1": 1, "d:1": 1}}));
    for k in 0..50 {
        let sid = format!("s{k}");
        let by_cookie = all_picks(
            &b,
            &ctx("", &[("cookie", &format!("x=1; sid={sid}"))]),
            None,
        );
        let by_arg = all_picks(&v, &ctx(&format!("sid={sid}"), &[]), None);
        let by_tpl = all_picks(&t, &ctx(&format!("sid={sid}"), &[]), None);
        // The same key on the same ring lands on the same node, whatever carried it.
        assert_eq!(by_cookie[0], by_arg[0]);
        assert_eq!(by_arg[0], by_tpl[0]);
    }
    // No key: remote_addr is hashed (the same node every time).
    let none = all_picks(&v, &ctx("", &[]), None)[0];
    let remote = all_picks(&v, &ctx("sid=10.1.2.3", &[]), None)[0];
    assert_eq!(none, remote);
}

#[test]
fn chash_keeps_keys_of_healthy_nodes_when_one_goes_down() {
    let (_, b) = balancer(json!({"type": "chash", "key": "arg_k",
        "nodes": {"a:1": 1, "b:1": 1, "c:1": 1}}));
    let h = health(3);
    let before: Vec<usize> = (0..300)
        .map(|k| all_picks(&b, &ctx(&format!("k={k}"), &[]), Some(&h))[0])
        .collect();
    mark_down(&h, 2);
    for (k, &was) in before.iter().enumerate() {
        let now = all_picks(&b, &ctx(&format!("k={k}"), &[]), Some(&h))[0];
        if was != 2 {
            assert_eq!(now, was);
        } else {
            assert_ne!(now, 2);
        }
    }
}

/// The remap fraction when a node leaves the configuration (a new balancer without it, as a
/// reload builds): only the removed node's keys move, about 1/N of them.
#[test]
fn chash_removing_one_of_n_nodes_moves_only_its_keys_about_one_nth() {
    const KEYS: usize = 10_000;
    for n in [4usize, 10, 30] {
        let nodes = |without: Option<usize>| {
            let m: serde_json::Map<String, serde_json::Value> = (0..n)
                .filter(|&i| Some(i) != without)
                .map(|i| (format!("10.0.0.{i}:80"), json!(1)))
                .collect();
            json!({"type": "chash", "key": "arg_k", "nodes": m})
        };
        let (u_all, all) = balancer(nodes(None));
        let (u_less, less) = balancer(nodes(Some(n - 1)));
        let removed = format!("10.0.0.{}", n - 1);
        let owner = |u: &Upstream, b: &Balancer, c: &Ctx| {
            let mut sel = b.begin(c);
            let i = b.next(&mut sel, None).expect("a node");
            u.nodes.0[i].host.clone()
        };
        let mut moved = 0;
        for k in 0..KEYS {
            let c = ctx(&format!("k={k}"), &[]);
            let (before, after) = (owner(&u_all, &all, &c), owner(&u_less, &less, &c));
            if before != after {
                assert_eq!(before, removed, "key {k} of a node that stayed moved");
                moved += 1;
            }
        }
        let fraction = moved as f64 / KEYS as f64;
        println!(
            "chash, {n} nodes, one removed: {fraction:.4} of {KEYS} keys moved (1/N = {:.4})",
            1.0 / n as f64
        );
        let expected = 1.0 / n as f64;
        assert!(
            (fraction - expected).abs() < expected / 2.0,
            "{n} nodes: moved {fraction}"
        );
    }
}

#[test]
fn least_conn_prefers_fewer_in_flight_per_weight_and_rotates_ties() {
    let (_, b) = balancer(json!({"type": "least_conn",
        "nodes": {"a:1": 1, "b:1": 1, "c:1": 2}}));
    let c = ctx("", &[]);
    let pick = || {
        let mut sel = b.begin(&c);
        b.next(&mut sel, None).expect("a node")
    };
    // All idle: c (weight 2) scores 1/2, the others 1.
    assert_eq!(pick(), 2);
    let _c1 = b.start_try(2);
    // c: (1+1)/2 = 1 ties a and b, which take turns with it.
    let mut firsts: Vec<usize> = (0..6).map(|_| pick()).collect();
    firsts.sort_unstable();
    firsts.dedup();
    assert_eq!(firsts, vec![0, 1, 2]);
    let _a = b.start_try(0);
    let _c2 = b.start_try(2);
    // a 2, b 1, c 3/2: b.
    for _ in 0..4 {
        assert_eq!(pick(), 1);
    }
    drop(_a);
    drop(_c2);
    drop(_c1);
    assert_eq!(b.loads.iter().map(|l| l.in_flight()).sum::<u64>(), 0);
}

#[test]
fn ewma_prefers_the_faster_node() {
    let (_, b) = balancer(json!({"type": "ewma", "nodes": {"a:1": 1, "b:1": 1}}));
    b.observe(0, Duration::from_millis(200));
    b.observe(1, Duration::from_millis(5));
    let c = ctx("", &[]);
    for _ in 0..20 {
        let mut sel = b.begin(&c);
        assert_eq!(b.next(&mut sel, None), Some(1));
        // The retry takes the other.
        assert_eq!(b.next(&mut sel, None), Some(0));
        assert_eq!(b.next(&mut sel, None), None);
    }
    // Among many, the slow ones are picked less.
    let (_, b) = balancer(json!({"type": "ewma",
        "nodes": {"a:2": 1, "b:2": 1, "c:2": 1, "d:2": 1}}));
    b.observe(0, Duration::from_millis(1));
    for i in 1..4 {
        b.observe(i, Duration::from_millis(100));
    }
    let fast = (0..400).filter(|_| all_picks(&b, &c, None)[0] == 0).count();
    // Node 0 wins every pair it is in: half of the pairs.
    assert!(fast > 150, "{fast}");
}

#[test]
fn random_below_stays_in_range() {
    for n in 1..50 {
        for _ in 0..50 {
            assert!(random_below(n) < n);
        }
    }
}
