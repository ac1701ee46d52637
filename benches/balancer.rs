//! Balancer pick cost per request: `Balancer::begin` + the first `next` (what every proxied
//! request pays; `least_conn` also takes and drops its in-flight guard), for each `type` at 1
//! and 100 nodes, with health checks on (every node healthy, so each candidate costs one
//! atomic load of its health flag).
//!
//! Run: `cargo bench --bench balancer -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use moongate::balancer::Balancer;
use moongate::config::Upstream;
use moongate::health::UpstreamHealth;
use moongate::plugin::Ctx;
use serde_json::json;

fn upstream(kind: &str, nodes: usize) -> Upstream {
    let nodes: serde_json::Map<String, serde_json::Value> = (0..nodes)
        .map(|i| (format!("10.0.{}.{}:8080", i / 250, i % 250), json!(1)))
        .collect();
    serde_json::from_value(json!({
        "type": kind, "hash_on": "header", "key": "X-User", "nodes": nodes
    }))
    .expect("upstream")
}

fn health(up: &Upstream) -> UpstreamHealth {
    let checks = serde_json::from_value(json!({"active": {}})).expect("checks");
    UpstreamHealth::new(
        "/bench".into(),
        checks,
        String::new(),
        up.nodes
            .0
            .iter()
            .map(|n| (n.host.clone(), n.port.unwrap_or(80)))
            .collect(),
    )
}

fn ctx() -> Ctx {
    let mut headers = http::HeaderMap::new();
    headers.insert("x-user", http::HeaderValue::from_static("user-12345"));
    let addr: std::net::SocketAddr = "10.1.2.3:5000".parse().expect("addr");
    Ctx::new(
        http::Method::GET,
        "/api/items".into(),
        None,
        "/api/items".into(),
        http::Version::HTTP_11,
        headers,
        moongate::body::RequestBody::Empty,
        addr,
        addr,
        "http",
    )
}

fn bench(c: &mut Criterion) {
    let ctx = ctx();
    let mut group = c.benchmark_group("balancer_pick");
    for kind in ["roundrobin", "chash", "least_conn", "ewma"] {
        for nodes in [1, 100] {
            let up = upstream(kind, nodes);
            let addrs: Vec<String> = up
                .nodes
                .0
                .iter()
                .map(|n| format!("{}:{}", n.host, n.port.unwrap_or(80)))
                .collect();
            let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
            let b = Balancer::new(&up, &format!("/bench/{kind}/{nodes}"), &refs);
            let h = health(&up);
            if kind == "ewma" {
                for i in 0..nodes {
                    b.observe(i, std::time::Duration::from_micros(500 + i as u64));
                }
            }
            group.bench_function(format!("{kind}/{nodes}"), |bench| {
                bench.iter(|| {
                    let mut sel = b.begin(black_box(&ctx));
                    let i = b.next(&mut sel, Some(&h));
                    let guard = i.and_then(|i| b.start_try(i));
                    black_box((i, guard));
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
