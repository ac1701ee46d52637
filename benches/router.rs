//! `Router::find` with 10,000 routes: exact, prefix, param and virtual-host
//! routes, a quarter of them host-constrained.
//!
//! Run: `cargo bench --bench router -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use moongate::router::{RouteSpec, Router};

fn spec(id: String, uri: String, methods: &[&str], hosts: Vec<String>) -> RouteSpec {
    RouteSpec {
        id,
        uris: vec![uri],
        methods: methods.iter().map(|m| m.to_string()).collect(),
        hosts,
        priority: 0,
    }
}

/// 4,000 exact, 3,001 prefix, 2,000 param and 999 virtual-host (`/*`)
/// routes.
fn routes() -> Vec<RouteSpec> {
    let mut rs = Vec::with_capacity(10_000);
    for i in 0..4_000 {
        let hosts = if i % 4 == 0 {
            vec![format!("svc{i}.example.com")]
        } else {
            vec![]
        };
        rs.push(spec(
            format!("e{i}"),
            format!("/api/v{}/svc{i}/items", i % 3 + 1),
            &["GET", "POST"],
            hosts,
        ));
    }
    for i in 0..3_000 {
        let hosts = if i % 5 == 0 {
            vec![format!("*.cdn{i}.example.net")]
        } else {
            vec![]
        };
        rs.push(spec(
            format!("p{i}"),
            format!("/static/app{i}/*"),
            &[],
            hosts,
        ));
    }
    for i in 0..2_000 {
        let methods: &[&str] = if i % 2 == 0 { &["GET"] } else { &[] };
        rs.push(spec(
            format!("q{i}"),
            format!("/users/grp{i}/:uid/orders/:oid"),
            methods,
            vec![],
        ));
    }
    for i in 0..999 {
        rs.push(spec(
            format!("v{i}"),
            "/*".to_string(),
            &[],
            vec![format!("site{i}.example.org")],
        ));
    }
    // A longer prefix whose method does not match, over a shorter one.
    rs.push(spec(
        "fallback-long".into(),
        "/static/app77/admin/*".into(),
        &["POST"],
        vec![],
    ));
    rs
}

fn bench(c: &mut Criterion) {
    let rs = routes();
    let router = Router::new(&rs).expect("bench routes are valid");
    assert_eq!(router.len(), 10_000);

    let cases: &[(&str, &str, &str, &str, Option<&str>)] = &[
        (
            "exact",
            "GET",
            "api.example.com",
            "/api/v2/svc1234/items",
            Some("e1234"),
        ),
        (
            "exact_host",
            "POST",
            "SVC2000.example.com",
            "/api/v3/svc2000/items",
            Some("e2000"),
        ),
        (
            "prefix",
            "GET",
            "www.example.com",
            "/static/app1234/js/main.js",
            Some("p1234"),
        ),
        (
            "prefix_wildcard_host",
            "GET",
            "img.cdn1235.example.net",
            "/static/app1235/a.png",
            Some("p1235"),
        ),
        (
            "param",
            "GET",
            "api.example.com",
            "/users/grp1500/u42/orders/o9",
            Some("q1500"),
        ),
        (
            "vhost",
            "GET",
            "site777.example.org",
            "/index.html",
            Some("v777"),
        ),
        ("miss", "GET", "nobody.example.com", "/nothing/here", None),
        (
            "miss_method",
            "DELETE",
            "api.example.com",
            "/api/v2/svc1234/items",
            None,
        ),
    ];
    let mut g = c.benchmark_group("router_find_10k");
    for &(name, method, host, path, want) in cases {
        let got = router
            .find(method, host, path)
            .map(|m| rs[m.index].id.as_str());
        assert_eq!(got, want, "{name}");
        g.bench_function(name, |b| {
            b.iter(|| router.find(black_box(method), black_box(host), black_box(path)))
        });
    }
    // Walks /static/app77/admin/ (POST only) then falls back to /static/app77/.
    assert_eq!(
        router
            .find("GET", "x", "/static/app77/admin/a")
            .map(|m| m.index),
        rs.iter().position(|r| r.id == "p77")
    );
    g.bench_function("prefix_fallback", |b| {
        b.iter(|| {
            router.find(
                black_box("GET"),
                black_box("x"),
                black_box("/static/app77/admin/a"),
            )
        })
    });
    g.finish();

    c.bench_function("router_build_10k", |b| {
        b.iter(|| Router::new(black_box(&rs)).unwrap())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
