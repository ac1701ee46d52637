//! The gateway's edge under attack, over raw sockets: host spellings that must not bypass a
//! host-restricted route, hop-by-hop headers that must not strip what plugins add, and errors
//! blamed on the side that caused them.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

/// Answers 403 in access: the restricted route's guard.
const DENY: &str = r#"local _M = { version = 0.1, priority = 3000, name = "deny", schema = { type = "object" } }
function _M.access(conf, ctx)
    return 403, { message = "denied by the internal route" }
end
return _M
"#;

/// Tells the upstream what `ngx.var.host` and the Host header were as plugins saw them.
const PROBE_HOST: &str = r#"local _M = { version = 0.1, priority = 10, name = "probe-host", schema = { type = "object" } }
function _M.rewrite(conf, ctx)
    ngx.req.set_header("X-Var-Host", ctx.var.host)
    ngx.req.set_header("X-Http-Host", ngx.var.http_host or "")
end
return _M
"#;

/// The issue's setup: `internal.example` behind a deny plugin, and a catch-all `/*` next to
/// it, both proxying to the same upstream (which would serve the internal site).
fn host_gateway(up: &Upstream) -> Gateway {
    let node = up.node();
    Gateway::start_with_plugins(
        &[("deny", DENY), ("probe-host", PROBE_HOST)],
        &format!(
            "workers: 1
routes:
  - id: internal
    uri: /*
    hosts: [internal.example]
    plugins:
      deny: {{}}
    upstream:
      nodes:
        \"{node}\": 1
  - id: catch-all
    uri: /*
    plugins:
      probe-host: {{}}
    upstream:
      pass_host: pass
      nodes:
        \"{node}\": 1
"
        ),
    )
}

fn get_with_host(gw: &Gateway, target: &str, host: &str) -> RawResp {
    raw_resp(
        gw.addr(),
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

#[test]
fn host_spellings_reach_the_restricted_route_or_are_refused() {
    let up = Upstream::echo();
    let gw = host_gateway(&up);

    // Every spelling of the internal host is the internal route: its deny plugin answers.
    for host in [
        "internal.example",
        "INTERNAL.Example",
        "internal.example.",
        "internal.example.:80",
        "internal.example:80",
        "internal.example:9080",
        "internal.example:",
        "Internal.Example.:8080",
    ] {
        let r = get_with_host(&gw, "/x", host);
        assert_eq!(r.status, 403, "Host: {host:?}\n{}\n\n{}", r.head, r.body);
        assert!(
            r.body.contains("denied by the internal route"),
            "{host:?}: {}",
            r.body
        );
    }
    // An absolute-form target's authority is the host, whatever the Host header says.
    for (target, host) in [
        ("http://internal.example/x", "public.example"),
        ("http://Internal.Example.:80/x", "public.example"),
        ("http://internal.example./x", "internal.example"),
    ] {
        let r = get_with_host(&gw, target, host);
        assert_eq!(r.status, 403, "{target} with Host {host}\n{}", r.head);
    }

    // What is no host at all is refused, and the connection closes.
    for host in [
        "internal.example:80:80",
        "internal.example:8o",
        "internal.example:99999",
        "internal..example",
        "internal.example..",
        ".internal.example",
        "internal.example/admin",
        "internal.example,public.example",
        "user@internal.example",
        "internal example",
        "internal.example\\",
        "",
        "[::1",
        "[::1]x",
    ] {
        let r = get_with_host(&gw, "/x", host);
        assert_eq!(r.status, 400, "Host: {host:?}\n{}\n\n{}", r.head, r.body);
        assert_eq!(r.header("connection"), Some("close"), "Host: {host:?}");
    }
    let r = get_with_host(&gw, "http://u@internal.example/x", "internal.example");
    assert_eq!(r.status, 400, "userinfo in the target\n{}", r.head);
    let r = raw_resp(gw.addr(), b"GET /x HTTP/1.0\r\nHost:\r\n\r\n");
    assert_eq!(r.status, 400, "empty Host from HTTP/1.0\n{}", r.head);
    assert_eq!(up.requests(), 0, "nothing reached the upstream");
}

#[test]
fn one_host_for_routing_plugins_and_upstream() {
    let up = Upstream::echo();
    let gw = host_gateway(&up);

    // RFC 9112 §3.2.2: the target's authority replaces the Host header, for the upstream too.
    let r = get_with_host(&gw, "http://public.example/x", "internal.example");
    assert_eq!(r.status, 200, "{}\n\n{}", r.head, r.body);
    let seen = r.json();
    let h = &seen["headers"];
    assert_eq!(seen["uri"], "/x");
    assert_eq!(h["host"], "public.example");
    assert_eq!(h["x-forwarded-host"], "public.example");
    assert_eq!(h["x-var-host"], "public.example");
    assert_eq!(h["x-http-host"], "public.example");

    // The normalised host (port kept for `pass_host: pass`, dropped for `$host` and
    // X-Forwarded-Host, as APISIX sends `$host` there).
    let r = get_with_host(&gw, "/y", "Public.Example.:8080");
    assert_eq!(r.status, 200, "{}\n\n{}", r.head, r.body);
    let seen = r.json();
    let h = &seen["headers"];
    assert_eq!(h["host"], "public.example:8080");
    assert_eq!(h["x-forwarded-host"], "public.example");
    assert_eq!(h["x-var-host"], "public.example");
    assert_eq!(h["x-http-host"], "public.example:8080");

    // IPv6 literals keep their brackets.
    let r = get_with_host(&gw, "/z", "[::1]:9080");
    assert_eq!(r.status, 200, "{}\n\n{}", r.head, r.body);
    let seen = r.json();
    assert_eq!(seen["headers"]["host"], "[::1]:9080");
    assert_eq!(seen["headers"]["x-var-host"], "[::1]");
}

/// Adds headers for the upstream in rewrite and one for the client in header_filter.
const INJECT: &str = r#"local _M = { version = 0.1, priority = 10, name = "inject", schema = { type = "object" } }
function _M.rewrite(conf, ctx)
    ngx.req.set_header("X-Consumer-Username", "alice")
    ngx.req.set_header("Authorization", "Bearer from-the-gateway")
    ngx.req.set_header("X-Saw-Dropped", ngx.var.http_x_dropped or "nil")
end
function _M.header_filter(conf, ctx)
    ngx.header["X-Resp-Added"] = "by-plugin"
end
return _M
"#;

#[test]
fn client_connection_header_cannot_strip_what_plugins_add() {
    // The upstream names the header the plugin adds to the response as hop-by-hop.
    let up = Upstream::start(|req| async move {
        let mut resp = echo_response(req).await;
        let h = resp.headers_mut();
        h.insert(
            "connection",
            "X-Resp-Added, X-Up-Hop".parse().expect("value"),
        );
        h.insert("x-resp-added", "by-upstream".parse().expect("value"));
        h.insert("x-up-hop", "1".parse().expect("value"));
        resp
    });
    let gw = Gateway::start_with_plugins(
        &[("inject", INJECT)],
        &format!(
            "workers: 1
routes:
  - id: all
    uri: /*
    plugins:
      inject: {{}}
    upstream:
      nodes:
        \"{}\": 1
",
            up.node()
        ),
    );
    let r = raw_resp(
        gw.addr(),
        b"GET /h HTTP/1.1\r\nHost: a.example\r\n\
          Connection: close, X-Consumer-Username, Authorization, X-Dropped\r\n\
          X-Consumer-Username: mallory\r\nAuthorization: Basic bWFsbG9yeQ==\r\n\
          X-Dropped: 1\r\n\r\n",
    );
    assert_eq!(r.status, 200, "{}\n\n{}", r.head, r.body);
    let seen = r.json();
    let h = &seen["headers"];
    assert_eq!(h["x-consumer-username"], "alice", "{h}");
    assert_eq!(h["authorization"], "Bearer from-the-gateway", "{h}");
    // What only the client's hop named is gone, for plugins and the upstream alike.
    assert!(h.get("x-dropped").is_none(), "{h}");
    assert_eq!(h["x-saw-dropped"], "nil", "{h}");
    assert!(h
        .get("connection")
        .is_none_or(|c| !c.as_str().unwrap_or("").contains("X-")));
    // Response side: the plugin's header passes, the upstream's hop-by-hop one does not.
    assert_eq!(r.header("x-resp-added"), Some("by-plugin"), "{}", r.head);
    assert!(r.header("x-up-hop").is_none(), "{}", r.head);
}

// ---------------------------------------------------------------------------------------------
// Errors blamed on the right side
// ---------------------------------------------------------------------------------------------

/// Sends `head` then `body` on one connection and returns what came back until the
/// gateway closed (or 5 s of quiet).
fn exchange(gw: &Gateway, bytes: &[u8], half_close: bool) -> RawResp {
    let mut s = TcpStream::connect(gw.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = s.write_all(bytes);
    if half_close {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    RawResp::parse(&String::from_utf8_lossy(&out))
}

#[test]
fn malformed_client_bodies_are_client_errors() {
    let up = Upstream::echo();
    let gw = Gateway::start(&format!(
        "workers: 1
routes:
  - id: all
    uri: /*
    upstream:
      nodes:
        \"{}\": 1
",
        up.node()
    ));
    let head = "POST /up HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n";
    for (what, body) in [
        ("bad chunk size", "5\r\nhello\r\nzz\r\n"),
        ("overflowing chunk size", "fffffffffffffffffffff\r\n"),
        ("bare LF in chunk framing", "5\nhello\r\n0\r\n\r\n"),
        ("no CRLF after chunk data", "5\r\nhelloXX0\r\n\r\n"),
    ] {
        let r = exchange(&gw, format!("{head}{body}").as_bytes(), false);
        assert_eq!(r.status, 400, "{what}\n{}\n\n{}", r.head, r.body);
        assert_eq!(r.header("connection"), Some("close"), "{what}");
    }
    // A client that stops mid-body (half close): a 400 it may still read, not a 502.
    let r = exchange(
        &gw,
        b"POST /up HTTP/1.1\r\nHost: a.example\r\nContent-Length: 100\r\n\r\nonly part",
        true,
    );
    assert_eq!(r.status, 400, "client closed mid-body\n{}", r.head);

    let logs = gw.logs();
    assert!(
        !logs.contains("ERROR"),
        "a client's bad body is not an error of the gateway or the upstream:\n{logs}"
    );
    assert!(
        !logs.contains("upstream request failed"),
        "the upstream is not blamed:\n{logs}"
    );
    assert!(
        gw.wait_for_log("bad request body from the client", Duration::from_secs(5)),
        "logged as a client error:\n{}",
        gw.logs()
    );
}

#[test]
fn upstream_101_without_an_upgrade_is_a_bad_gateway() {
    let up = RawUpstream::start(vec![(
        Duration::ZERO,
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: smuggled\r\n\r\n\
          HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nupstream",
    )]);
    let gw = Gateway::start(&format!(
        "workers: 1
routes:
  - id: all
    uri: /*
    upstream:
      nodes:
        \"{}\": 1
",
        up.node()
    ));
    let r = get_with_host(&gw, "/switch", "a.example");
    assert_eq!(r.status, 502, "{}\n\n{}", r.head, r.body);
    assert!(
        !r.body.contains("upstream"),
        "nothing after the 101 passes: {}",
        r.body
    );
    assert_eq!(up.requests(), 1);
    assert!(
        gw.wait_for_log("asked for no upgrade", Duration::from_secs(5)),
        "{}",
        gw.logs()
    );
}

/// Fails in body_filter: on the first chunk with `?when=first`, else on a chunk holding
/// `second`.
const FILTER_FAIL: &str = r#"local _M = { version = 0.1, priority = 10, name = "filter-fail", schema = { type = "object" } }
function _M.body_filter(conf, ctx)
    local chunk = ngx.arg[1] or ""
    if ngx.var.arg_when == "first" or chunk:find("second", 1, true) then
        error("body_filter failed on purpose")
    end
end
return _M
"#;

/// Answers 200 `local answer` from access.
const SAY: &str = r#"local _M = { version = 0.1, priority = 20, name = "say", schema = { type = "object" } }
function _M.access(conf, ctx)
    return 200, "local answer"
end
return _M
"#;

#[test]
fn body_filter_errors_before_and_after_the_first_byte() {
    // An upstream that sends a first chunk, waits, then a second.
    let up = RawUpstream::start(vec![
        (
            Duration::ZERO,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst\n\r\n",
        ),
        (Duration::from_millis(300), b"7\r\nsecond\n\r\n0\r\n\r\n"),
    ]);
    let gw = Gateway::start_with_plugins(
        &[("filter-fail", FILTER_FAIL), ("say", SAY)],
        &format!(
            "workers: 1
routes:
  - id: local
    uri: /local
    plugins:
      say: {{}}
      filter-fail: {{}}
  - id: streamed
    uri: /streamed
    plugins:
      filter-fail: {{}}
    upstream:
      nodes:
        \"{}\": 1
",
            up.node()
        ),
    );

    // Before the first byte: a 500, and the access log says 500.
    let r = get_with_host(&gw, "/local?when=first", "a.example");
    assert_eq!(r.status, 500, "{}\n\n{}", r.head, r.body);
    assert!(!r.body.contains("local answer"), "{}", r.body);
    assert!(
        gw.wait_for_log(
            "GET /local?when=first 500 route=local",
            Duration::from_secs(5)
        ),
        "{}",
        gw.logs()
    );

    // After the first byte: the head and the first chunk went out; the response is cut off
    // (no last chunk) and the log says the connection was closed.
    let r = get_with_host(&gw, "/streamed", "a.example");
    assert_eq!(r.status, 200, "{}\n\n{}", r.head, r.body);
    assert_eq!(r.header("transfer-encoding"), Some("chunked"), "{}", r.head);
    assert!(r.body.contains("first"), "{}", r.body);
    assert!(!r.body.contains("second"), "{}", r.body);
    assert!(
        !r.body.ends_with("0\r\n\r\n"),
        "the body must not look complete: {:?}",
        r.body
    );
    assert!(
        gw.wait_for_log("GET /streamed 200 route=streamed", Duration::from_secs(5)),
        "{}",
        gw.logs()
    );
    let logs = gw.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("GET /streamed 200"))
        .unwrap_or_default();
    assert!(
        line.contains("body_filter failed, connection closed"),
        "{line}"
    );
}

/// client_max_body_size also holds for a body a Lua plugin reads into memory: a chunked body
/// has no length to refuse up front, and reading it whole used to ignore the limit (a client
/// could make the worker hold any amount). A plugin that raises the limit for its route
/// (APISIX's client-control) lets the bigger body through there only.
#[test]
fn a_lua_plugin_reading_the_body_keeps_client_max_body_size() {
    let up = Upstream::echo();
    let node = up.node();
    let gw = Gateway::start_with_plugins(
        &[("client-ctl", common::lua_plugins::CLIENT_CTL)],
        &format!(
            "workers: 1
proxy:
  client_max_body_size: 1024
routes:
  - id: read
    uri: /read
    plugins:
      client-ctl: {{read_body: true}}
    upstream:
      nodes:
        \"{node}\": 1
  - id: raised
    uri: /raised
    plugins:
      client-ctl: {{read_body: true, max_body_size: 8192}}
    upstream:
      nodes:
        \"{node}\": 1
"
        ),
    );
    let chunked = |path: &str, len: usize| {
        let data = "z".repeat(len);
        format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{len:x}\r\n{data}\r\n0\r\n\r\n"
        )
    };
    let r = exchange(&gw, chunked("/read", 1000).as_bytes(), false);
    assert_eq!(r.status, 200, "{}\n{}", r.head, r.body);
    assert_eq!(r.json()["body_len"], 1000);
    let r = exchange(&gw, chunked("/read", 4000).as_bytes(), false);
    assert_eq!(r.status, 413, "{}\n{}", r.head, r.body);
    assert_eq!(
        up.requests(),
        1,
        "the refused body never reached the upstream"
    );
    let r = exchange(&gw, chunked("/raised", 4000).as_bytes(), false);
    assert_eq!(r.status, 200, "{}\n{}", r.head, r.body);
    assert_eq!(r.json()["body_len"], 4000);
    let r = exchange(&gw, chunked("/raised", 9000).as_bytes(), false);
    assert_eq!(r.status, 413, "{}\n{}", r.head, r.body);
}
