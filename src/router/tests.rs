use super::*;

fn route(id: &str, uris: &[&str]) -> RouteSpec {
    RouteSpec {
        id: id.into(),
        uris: uris.iter().map(|s| s.to_string()).collect(),
        ..RouteSpec::default()
    }
}

fn with_methods(mut r: RouteSpec, m: &[&str]) -> RouteSpec {
    r.methods = m.iter().map(|s| s.to_string()).collect();
    r
}

fn with_hosts(mut r: RouteSpec, h: &[&str]) -> RouteSpec {
    r.hosts = h.iter().map(|s| s.to_string()).collect();
    r
}

fn with_priority(mut r: RouteSpec, p: i64) -> RouteSpec {
    r.priority = p;
    r
}

fn router(routes: &[RouteSpec]) -> Router {
    Router::new(routes).expect("valid routes")
}

/// The id of the route that matches, or None.
fn hit<'a>(routes: &'a [RouteSpec], r: &Router, m: &str, h: &str, p: &str) -> Option<&'a str> {
    r.find(m, h, p).map(|x| routes[x.index].id.as_str())
}

fn params(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn router_is_send_sync() {
    fn check<T: Send + Sync + 'static>() {}
    check::<Router>();
    check::<RouteMatch>();
}

#[test]
fn empty_router() {
    let r = router(&[]);
    assert!(r.is_empty());
    assert_eq!(r.len(), 0);
    assert_eq!(r.find("GET", "a.com", "/"), None);
    let d = Router::default();
    assert_eq!(d.find("GET", "", "/x"), None);
}

#[test]
fn len_counts_routes() {
    let rs = [route("1", &["/a", "/b/*"]), route("2", &["/c"])];
    let r = router(&rs);
    assert_eq!(r.len(), 2);
    assert!(!r.is_empty());
}

#[test]
fn exact_match_only() {
    let rs = [route("1", &["/hello"])];
    let r = router(&rs);
    let m = r.find("GET", "x", "/hello").unwrap();
    assert_eq!(
        m,
        RouteMatch {
            index: 0,
            uri: Arc::from("/hello"),
            params: vec![],
            ext: None
        }
    );
    assert_eq!(r.find("GET", "x", "/hello/"), None);
    assert_eq!(r.find("GET", "x", "/hell"), None);
    assert_eq!(r.find("GET", "x", "/hellox"), None);
    assert_eq!(r.find("GET", "x", "/Hello"), None);
    assert_eq!(r.find("GET", "x", ""), None);
}

#[test]
fn prefix_with_slash_star() {
    let rs = [route("1", &["/hello/*"])];
    let r = router(&rs);
    let m = r.find("GET", "", "/hello/").unwrap();
    assert_eq!(m.uri.as_ref(), "/hello/*");
    assert_eq!(m.ext.as_deref(), Some(""));
    assert!(m.params.is_empty());
    let m = r.find("GET", "", "/hello/a/b").unwrap();
    assert_eq!(m.ext.as_deref(), Some("a/b"));
    assert_eq!(r.find("GET", "", "/hello"), None);
    assert_eq!(r.find("GET", "", "/hellox"), None);
    assert_eq!(r.find("GET", "", "/"), None);
}

#[test]
fn prefix_without_slash() {
    let rs = [route("1", &["/hello*"])];
    let r = router(&rs);
    assert_eq!(
        r.find("GET", "", "/hello").unwrap().ext.as_deref(),
        Some("")
    );
    assert_eq!(
        r.find("GET", "", "/hellox").unwrap().ext.as_deref(),
        Some("x")
    );
    assert_eq!(
        r.find("GET", "", "/hello/x").unwrap().ext.as_deref(),
        Some("/x")
    );
    assert_eq!(r.find("GET", "", "/hell"), None);
}

#[test]
fn catch_all() {
    let rs = [route("all", &["/*"])];
    let r = router(&rs);
    assert_eq!(r.find("GET", "", "/").unwrap().ext.as_deref(), Some(""));
    assert_eq!(
        r.find("GET", "", "/any/thing").unwrap().ext.as_deref(),
        Some("any/thing")
    );
    assert_eq!(r.find("GET", "", ""), None);
    assert_eq!(r.find("GET", "", "relative"), None);
}

#[test]
fn exact_beats_prefix_and_param() {
    let rs = [
        with_priority(route("p", &["/hello/*"]), 100),
        with_priority(route("q", &["/hello/:name"]), 100),
        route("e", &["/hello/world"]),
    ];
    let r = router(&rs);
    assert_eq!(hit(&rs, &r, "GET", "", "/hello/world"), Some("e"));
    // Longer pattern first within the same prefix: /hello/:name before /hello/*.
    assert_eq!(hit(&rs, &r, "GET", "", "/hello/other"), Some("q"));
    assert_eq!(hit(&rs, &r, "GET", "", "/hello/other/x"), Some("p"));
}

#[test]
fn exact_falls_back_to_pattern_when_method_differs() {
    let rs = [
        with_methods(route("e", &["/hello/world"]), &["POST"]),
        route("p", &["/hello/*"]),
    ];
    let r = router(&rs);
    assert_eq!(hit(&rs, &r, "POST", "", "/hello/world"), Some("e"));
    let m = r.find("GET", "", "/hello/world").unwrap();
    assert_eq!(rs[m.index].id, "p");
    assert_eq!(m.ext.as_deref(), Some("world"));
}

#[test]
fn longest_prefix_first() {
    let rs = [
        route("root", &["/*"]),
        route("a", &["/a/*"]),
        route("ab", &["/a/b/*"]),
        route("abc", &["/a/b/c*"]),
    ];
    let r = router(&rs);
    assert_eq!(hit(&rs, &r, "GET", "", "/x"), Some("root"));
    assert_eq!(hit(&rs, &r, "GET", "", "/a/x"), Some("a"));
    assert_eq!(hit(&rs, &r, "GET", "", "/a/b"), Some("a"));
    assert_eq!(hit(&rs, &r, "GET", "", "/a/b/"), Some("ab"));
    assert_eq!(hit(&rs, &r, "GET", "", "/a/b/cde"), Some("abc"));
    assert_eq!(hit(&rs, &r, "GET", "", "/a/b/d"), Some("ab"));
    // Longer prefix wins regardless of priority (APISIX semantics).
    let rs = [
        with_priority(route("short", &["/api/*"]), 1000),
        route("long", &["/api/v1/*"]),
    ];
    let r = router(&rs);
    assert_eq!(hit(&rs, &r, "GET", "", "/api/v1/x"), Some("long"));
    assert_eq!(hit(&rs, &r, "GET", "", "/api/v2/x"), Some("short"));
}

#[test]
fn fallback_from_longer_prefix_on_method_mismatch() {
    let rs = [
        with_methods(route("long", &["/api/v1/*"]), &["POST", "PUT"]),
        with_methods(route("mid", &["/api/:ver/*"]), &["DELETE"]),
        route("short", &["/api*"]),
    ];
    let r = router(&rs);
    assert_eq!(hit(&rs, &r, "POST", "", "/api/v1/users"), Some("long"));
    assert_eq!(hit(&rs, &r, "PUT", "", "/api/v1/users"), Some("long"));
    assert_eq!(hit(&rs, &r, "DELETE", "", "/api/v1/users"), Some("mid"));
    let m = r.find("GET", "", "/api/v1/users").unwrap();
    assert_eq!(rs[m.index].id, "short");
    assert_eq!(m.ext.as_deref(), Some("/v1/users"));
    assert_eq!(m.uri.as_ref(), "/api*");
}

#[test]
fn fallback_from_longer_prefix_on_host_or_param_mismatch() {
    let rs = [
        with_hosts(route("long", &["/a/b/*"]), &["only.example.com"]),
        route("param", &["/a/:x/:y"]),
        route("short", &["/a/*"]),
    ];
    let r = router(&rs);
    assert_eq!(
        hit(&rs, &r, "GET", "only.example.com", "/a/b/c"),
        Some("long")
    );
    assert_eq!(hit(&rs, &r, "GET", "other.com", "/a/b/c"), Some("param"));
    assert_eq!(hit(&rs, &r, "GET", "other.com", "/a/b/c/d"), Some("short"));
    assert_eq!(hit(&rs, &r, "GET", "other.com", "/a/b/"), Some("short"));
}

#[test]
fn priority_within_same_uri() {
    let rs = [
        with_priority(route("low", &["/p/*"]), 1),
        with_priority(route("high", &["/p/*"]), 10),
        route("zero", &["/p/*"]),
        with_priority(route("neg", &["/x"]), -5),
        route("zero-x", &["/x"]),
    ];
    let r = router(&rs);
    assert_eq!(hit(&rs, &r, "GET", "", "/p/q"), Some("high"));
    assert_eq!(hit(&rs, &r, "GET", "", "/x"), Some("zero-x"));

    // Priority beats uri length within a prefix.
    let rs = [
        route("long", &["/u/:id/profile/*"]),
        with_priority(route("short", &["/u/*"]), 1),
    ];
    let r = router(&rs);
    assert_eq!(hit(&rs, &r, "GET", "", "/u/1/profile/x"), Some("short"));
}

#[test]
fn priority_then_method_fallback_same_uri() {
    let rs = [
        with_methods(with_priority(route("high", &["/r"]), 5), &["POST"]),
        with_methods(route("low", &["/r"]), &["GET"]),
    ];
    let r = router(&rs);
    assert_eq!(hit(&rs, &r, "POST", "", "/r"), Some("high"));
    assert_eq!(hit(&rs, &r, "GET", "", "/r"), Some("low"));
    assert_eq!(hit(&rs, &r, "PUT", "", "/r"), None);
}

#[test]
fn tie_break_hosts_then_id() {
    let rs = [
        route("a", &["/t"]),
        with_hosts(route("z", &["/t"]), &["*.com"]),
        route("b", &["/t"]),
    ];
    let r = router(&rs);
    assert_eq!(hit(&rs, &r, "GET", "x.com", "/t"), Some("z"));
    assert_eq!(hit(&rs, &r, "GET", "x.org", "/t"), Some("a"));

    // Order of the input does not matter.
    let rs = [
        route("b", &["/t/*"]),
        with_hosts(route("y", &["/t/*"]), &["h"]),
        route("a", &["/t/*"]),
        with_hosts(route("x", &["/t/*"]), &["h"]),
    ];
    let r = router(&rs);
    assert_eq!(hit(&rs, &r, "GET", "h", "/t/1"), Some("x"));
    assert_eq!(hit(&rs, &r, "GET", "H", "/t/1"), Some("x"));
    assert_eq!(hit(&rs, &r, "GET", "g", "/t/1"), Some("a"));
}

#[test]
fn numeric_ids_compare_as_numbers() {
    assert_eq!(cmp_ids("2", "10"), Ordering::Less);
    assert_eq!(cmp_ids("010", "9"), Ordering::Greater);
    assert_eq!(cmp_ids("10", "010"), Ordering::Greater);
    assert_eq!(cmp_ids("10", "010").reverse(), cmp_ids("010", "10"));
    assert_eq!(cmp_ids("99", "a"), Ordering::Less);
    assert_eq!(cmp_ids("a", "b1"), Ordering::Less);
    assert_eq!(cmp_ids("", "0"), Ordering::Greater);
    assert_eq!(cmp_ids("x", "x"), Ordering::Equal);

    let rs = [
        route("10", &["/n"]),
        route("9", &["/n"]),
        route("abc", &["/n"]),
    ];
    let r = router(&rs);
    assert_eq!(hit(&rs, &r, "GET", "", "/n"), Some("9"));
}

#[test]
fn duplicate_ids_fall_back_to_config_order() {
    let rs = [
        with_methods(route("same", &["/d"]), &["GET"]),
        route("same", &["/d"]),
    ];
    let r = router(&rs);
    assert_eq!(r.find("GET", "", "/d").unwrap().index, 0);
    assert_eq!(r.find("POST", "", "/d").unwrap().index, 1);
}

#[test]
fn param_captures() {
    let rs = [route("1", &["/user/:id/profile"])];
    let r = router(&rs);
    let m = r.find("GET", "", "/user/42/profile").unwrap();
    assert_eq!(m.params, params(&[("id", "42")]));
    assert_eq!(m.param("id"), Some("42"));
    assert_eq!(m.param("nope"), None);
    assert_eq!(m.ext, None);
    assert_eq!(m.uri.as_ref(), "/user/:id/profile");
    assert_eq!(r.find("GET", "", "/user//profile"), None);
    assert_eq!(r.find("GET", "", "/user/42/profile/"), None);
    assert_eq!(r.find("GET", "", "/user/4/2/profile"), None);
    assert_eq!(r.find("GET", "", "/user/42"), None);
    assert_eq!(r.find("GET", "", "/user/"), None);
}

#[test]
fn params_at_end_and_several() {
    let rs = [
        route("one", &["/item/:id"]),
        route("two", &["/org/:org/repo/:repo"]),
        route("root", &["/:page"]),
    ];
    let r = router(&rs);
    let m = r.find("GET", "", "/item/abc").unwrap();
    assert_eq!(m.params, params(&[("id", "abc")]));
    assert_eq!(r.find("GET", "", "/item/abc/"), None);
    assert_eq!(r.find("GET", "", "/item/"), None);
    let m = r.find("GET", "", "/org/moon/repo/gate").unwrap();
    assert_eq!(m.params, params(&[("org", "moon"), ("repo", "gate")]));
    let m = r.find("GET", "", "/index.html").unwrap();
    assert_eq!(rs[m.index].id, "root");
    assert_eq!(m.params, params(&[("page", "index.html")]));
    assert_eq!(r.find("GET", "", "/"), None);
    assert_eq!(r.find("GET", "", "/a/b"), None);
}

#[test]
fn params_with_wildcards() {
    let rs = [
        route("anon", &["/u/:id/files/*"]),
        route("named", &["/g/:id/*rest"]),
    ];
    let r = router(&rs);
    let m = r.find("GET", "", "/u/7/files/a/b.txt").unwrap();
    assert_eq!(m.params, params(&[("id", "7")]));
    assert_eq!(m.ext.as_deref(), Some("a/b.txt"));
    let m = r.find("GET", "", "/u/7/files/").unwrap();
    assert_eq!(m.ext.as_deref(), Some(""));
    assert_eq!(r.find("GET", "", "/u/7/files"), None);
    let m = r.find("GET", "", "/g/1/x/y").unwrap();
    assert_eq!(m.params, params(&[("id", "1"), ("rest", "x/y")]));
    assert_eq!(m.ext, None);
}

#[test]
fn named_wildcard() {
    let rs = [route("f", &["/files/*path"])];
    let r = router(&rs);
    let m = r.find("GET", "", "/files/a/b/c.txt").unwrap();
    assert_eq!(m.params, params(&[("path", "a/b/c.txt")]));
    assert_eq!(m.ext, None);
    let m = r.find("GET", "", "/files/").unwrap();
    assert_eq!(m.params, params(&[("path", "")]));
    assert_eq!(r.find("GET", "", "/files"), None);
}

#[test]
fn literal_colon_is_not_a_param() {
    let rs = [
        route("c", &["/v1/things:batchGet"]),
        route("d", &["/v1/x:y/:id"]),
    ];
    let r = router(&rs);
    assert_eq!(hit(&rs, &r, "POST", "", "/v1/things:batchGet"), Some("c"));
    assert_eq!(hit(&rs, &r, "POST", "", "/v1/things:other"), None);
    let m = r.find("GET", "", "/v1/x:y/5").unwrap();
    assert_eq!(m.params, params(&[("id", "5")]));
    assert_eq!(r.find("GET", "", "/v1/x:z/5"), None);
}

#[test]
fn non_ascii_paths() {
    let rs = [route("u", &["/ünï/:名前/*"]), route("e", &["/é"])];
    let r = router(&rs);
    let m = r.find("GET", "", "/ünï/値/ß/x").unwrap();
    assert_eq!(m.params, params(&[("名前", "値")]));
    assert_eq!(m.ext.as_deref(), Some("ß/x"));
    assert_eq!(hit(&rs, &r, "GET", "", "/é"), Some("e"));
    assert_eq!(r.find("GET", "", "/ün"), None);
}

#[test]
fn methods() {
    let rs = [
        with_methods(route("g", &["/m"]), &["GET", "HEAD"]),
        with_methods(route("custom", &["/m"]), &["PROPFIND"]),
        with_methods(route("lower", &["/l"]), &["post"]),
        route("any", &["/any"]),
    ];
    let r = router(&rs);
    assert_eq!(hit(&rs, &r, "GET", "", "/m"), Some("g"));
    assert_eq!(hit(&rs, &r, "HEAD", "", "/m"), Some("g"));
    assert_eq!(hit(&rs, &r, "PROPFIND", "", "/m"), Some("custom"));
    assert_eq!(hit(&rs, &r, "POST", "", "/m"), None);
    assert_eq!(hit(&rs, &r, "get", "", "/m"), None);
    assert_eq!(hit(&rs, &r, "", "", "/m"), None);
    assert_eq!(hit(&rs, &r, "POST", "", "/l"), Some("lower"));
    for m in ["GET", "PURGE", "BREW", ""] {
        assert_eq!(hit(&rs, &r, m, "", "/any"), Some("any"));
    }
}

#[test]
fn hosts_exact_and_wildcard() {
    let rs = [
        with_hosts(route("exact", &["/h"]), &["Example.COM"]),
        with_hosts(route("wild", &["/h"]), &["*.example.com"]),
        with_hosts(route("multi", &["/h"]), &["a.org", "*.b.org"]),
    ];
    let r = router(&rs);
    assert_eq!(hit(&rs, &r, "GET", "example.com", "/h"), Some("exact"));
    assert_eq!(hit(&rs, &r, "GET", "EXAMPLE.com", "/h"), Some("exact"));
    assert_eq!(hit(&rs, &r, "GET", "a.example.com", "/h"), Some("wild"));
    assert_eq!(hit(&rs, &r, "GET", "A.B.Example.Com", "/h"), Some("wild"));
    assert_eq!(hit(&rs, &r, "GET", "xexample.com", "/h"), None);
    assert_eq!(hit(&rs, &r, "GET", "example.com.evil", "/h"), None);
    assert_eq!(hit(&rs, &r, "GET", "a.org", "/h"), Some("multi"));
    assert_eq!(hit(&rs, &r, "GET", "x.b.org", "/h"), Some("multi"));
    assert_eq!(hit(&rs, &r, "GET", "b.org", "/h"), None);
    assert_eq!(hit(&rs, &r, "GET", "", "/h"), None);
}

#[test]
fn host_constrained_routes_with_fallback_to_any_host() {
    let rs = [
        with_hosts(route("api", &["/*"]), &["api.example.com"]),
        route("default", &["/*"]),
    ];
    let r = router(&rs);
    assert_eq!(hit(&rs, &r, "GET", "api.example.com", "/x"), Some("api"));
    assert_eq!(
        hit(&rs, &r, "GET", "www.example.com", "/x"),
        Some("default")
    );
}

#[test]
fn multiple_uris_per_route() {
    let rs = [
        route("multi", &["/a", "/b/*", "/c/:id", "/a"]),
        route("other", &["/b/x"]),
    ];
    let r = router(&rs);
    let m = r.find("GET", "", "/a").unwrap();
    assert_eq!((m.index, m.uri.as_ref()), (0, "/a"));
    let m = r.find("GET", "", "/b/q").unwrap();
    assert_eq!((m.index, m.uri.as_ref()), (0, "/b/*"));
    assert_eq!(hit(&rs, &r, "GET", "", "/b/x"), Some("other"));
    let m = r.find("GET", "", "/c/9").unwrap();
    assert_eq!((m.index, m.uri.as_ref()), (0, "/c/:id"));
    assert_eq!(m.params, params(&[("id", "9")]));
}

#[test]
fn not_found() {
    let rs = [
        route("e", &["/exact"]),
        route("p", &["/prefix/*"]),
        route("q", &["/user/:id"]),
        with_hosts(route("h", &["/host"]), &["h.com"]),
        with_methods(route("m", &["/method"]), &["POST"]),
    ];
    let r = router(&rs);
    for (m, h, p) in [
        ("GET", "", "/"),
        ("GET", "", "/nothing"),
        ("GET", "", "/exac"),
        ("GET", "", "/exact/"),
        ("GET", "", "/prefix"),
        ("GET", "", "/user/"),
        ("GET", "", "/user/1/2"),
        ("GET", "g.com", "/host"),
        ("GET", "", "/method"),
        ("GET", "", ""),
    ] {
        assert_eq!(r.find(m, h, p), None, "{m} {h} {p}");
    }
}

#[test]
fn bad_patterns_are_errors() {
    for (uri, needle) in [
        ("", "empty"),
        ("hello", "start with '/'"),
        ("/user/:", "empty name"),
        ("/user/:/x", "empty name"),
        ("/a/*/b", "end of the uri"),
        ("/a*b", "start a path segment"),
    ] {
        let rs = [route("1", &["/ok"]), route("bad-route", &["/ok2", uri])];
        let err = Router::new(&rs).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("bad-route"), "{msg}");
        assert!(msg.contains(&format!("{uri:?}")), "{msg}");
        assert!(msg.contains(needle), "{msg}");
        assert!(matches!(err, RouterError::InvalidUri { .. }));
    }
    let err = Router::new(&[route("none", &[])]).unwrap_err();
    assert!(matches!(err, RouterError::NoUri { .. }));
    assert!(err.to_string().contains("none"));
}

#[test]
fn large_group_host_index_keeps_order() {
    // Many virtual hosts on "/*" plus wildcards and host-less routes: the
    // indexed lookup must agree with a plain scan in matching order.
    let mut rs = Vec::new();
    for i in 0..200 {
        rs.push(with_hosts(
            route(&format!("h{i:03}"), &["/*"]),
            &[&format!("site{i}.example.org")],
        ));
    }
    rs.push(with_hosts(route("wild", &["/*"]), &["*.example.org"]));
    rs.push(with_hosts(route("odd", &["/*"]), &["*site7.example.org"]));
    rs.push(route("any", &["/*"]));
    rs.push(with_priority(
        with_hosts(
            route("prio", &["/*"]),
            &["*.vip.example.org", "vip.example.org"],
        ),
        10,
    ));
    rs.push(with_methods(
        with_hosts(route("post-only", &["/*"]), &["site5.example.org"]),
        &["POST"],
    ));
    let r = router(&rs);
    assert!(r.indexed);
    assert_eq!(
        hit(&rs, &r, "GET", "site42.example.org", "/x"),
        Some("h042")
    );
    assert_eq!(
        hit(&rs, &r, "GET", "SITE42.Example.ORG", "/x"),
        Some("h042")
    );
    assert_eq!(hit(&rs, &r, "GET", "site5.example.org", "/x"), Some("h005"));
    // The h* routes sort before "odd" and "wild" by id (all constrain hosts),
    // so those two only win for hosts no h* route accepts.
    assert_eq!(hit(&rs, &r, "GET", "zzz.example.org", "/x"), Some("wild"));
    assert_eq!(hit(&rs, &r, "GET", "xsite7.example.org", "/x"), Some("odd"));
    assert_eq!(hit(&rs, &r, "GET", "a.vip.example.org", "/x"), Some("prio"));
    assert_eq!(hit(&rs, &r, "GET", "vip.example.org", "/x"), Some("prio"));
    assert_eq!(hit(&rs, &r, "GET", "example.com", "/x"), Some("any"));
    assert_eq!(hit(&rs, &r, "GET", "", "/x"), Some("any"));
    let long = format!("{}.example.org", "a.".repeat(200));
    assert_eq!(hit(&rs, &r, "GET", &long, "/x"), Some("wild"));
    let many_labels = format!("{}example.org", "a.".repeat(20));
    assert_eq!(hit(&rs, &r, "GET", &many_labels, "/x"), Some("wild"));

    // Compare with a scan for many hosts.
    let hosts: Vec<String> = (0..210)
        .map(|i| format!("site{i}.example.org"))
        .chain([
            "x.vip.example.org".into(),
            "nope".into(),
            "7.example.org".into(),
        ])
        .collect();
    for h in &hosts {
        let req = Request {
            method: "GET",
            method_bit: method_bit("GET"),
            host: h.as_bytes(),
            host_lower: None,
        };
        let g = &r.groups[0];
        let scan = g
            .cands
            .iter()
            .find(|c| r.accepts(c, &req, "x"))
            .map(|c| c.route as usize);
        assert_eq!(r.find("GET", h, "/x").map(|m| m.index), scan, "{h}");
    }
}

#[test]
fn large_exact_group_is_indexed() {
    let mut rs = Vec::new();
    for i in 0..50 {
        rs.push(with_hosts(
            route(&i.to_string(), &["/login"]),
            &[&format!("t{i}.io")],
        ));
    }
    rs.push(route("fallback", &["/login"]));
    let r = router(&rs);
    assert!(r.indexed);
    assert_eq!(hit(&rs, &r, "GET", "t33.io", "/login"), Some("33"));
    assert_eq!(hit(&rs, &r, "GET", "T33.IO", "/login"), Some("33"));
    assert_eq!(hit(&rs, &r, "GET", "t99.io", "/login"), Some("fallback"));
}

#[test]
fn many_mixed_routes() {
    let mut rs = Vec::new();
    for i in 0..2000 {
        rs.push(route(&format!("e{i}"), &[&format!("/svc{i}/items")]));
        rs.push(route(&format!("p{i}"), &[&format!("/svc{i}/static/*")]));
        rs.push(route(&format!("q{i}"), &[&format!("/svc{i}/users/:uid")]));
    }
    let r = router(&rs);
    for i in (0..2000).step_by(37) {
        assert_eq!(
            hit(&rs, &r, "GET", "", &format!("/svc{i}/items")),
            Some(&*format!("e{i}"))
        );
        let m = r.find("GET", "", &format!("/svc{i}/static/a.js")).unwrap();
        assert_eq!(rs[m.index].id, format!("p{i}"));
        assert_eq!(m.ext.as_deref(), Some("a.js"));
        let m = r.find("GET", "", &format!("/svc{i}/users/u{i}")).unwrap();
        assert_eq!(rs[m.index].id, format!("q{i}"));
        assert_eq!(m.params, vec![("uid".to_string(), format!("u{i}"))]);
        assert_eq!(r.find("GET", "", &format!("/svc{i}/other")), None);
    }
}

#[test]
fn host_index_fallbacks() {
    // 15 nested wildcard levels: a deep host hits more suffix lists than an
    // indexed lookup merges on the stack, so it falls back to a scan.
    let mut rs = Vec::new();
    let mut suffix = String::from("x");
    for i in 0..15 {
        suffix = format!("l{i}.{suffix}");
        rs.push(with_hosts(
            route(&format!("w{i:02}"), &["/*"]),
            &[&format!("*.{suffix}")],
        ));
    }
    rs.push(route("any", &["/*"]));
    let r = router(&rs);
    assert!(r.indexed);
    let deep = format!("a.{suffix}");
    // w00 (`*.l0.x`) sorts first by id and accepts every deeper host.
    assert_eq!(hit(&rs, &r, "GET", &deep, "/"), Some("w00"));
    assert_eq!(hit(&rs, &r, "GET", &deep.to_uppercase(), "/"), Some("w00"));
    assert_eq!(hit(&rs, &r, "GET", "a.l3.l2.l1.l0.x", "/"), Some("w00"));
    assert_eq!(hit(&rs, &r, "GET", "l0.x", "/"), Some("any"));

    // A mixed-case host too long for the lower-casing buffer is scanned.
    let long = format!("{}.L0.X", "A".repeat(300));
    assert_eq!(hit(&rs, &r, "GET", &long, "/"), Some("w00"));
    let long = format!("{}.Y", "A".repeat(300));
    assert_eq!(hit(&rs, &r, "GET", &long, "/"), Some("any"));
}
