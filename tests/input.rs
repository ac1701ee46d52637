//! Input the gateway must refuse or bound, over raw sockets: config values that can never be
//! sent (CR, LF or NUL in a header, a request target, a host), Admin API bodies that stop
//! arriving, route hosts spelled as clients spell them, and malformed bodies a Lua plugin reads.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

const KEY: &str = "test-admin-key-0123456789";

/// A Lua plugin that copies `conf.headers` onto the upstream request.
const ADD_HEADERS: &str = r#"local core = require("apisix.core")
local _M = { version = 0.1, priority = 100, name = "add-headers",
    schema = { type = "object", properties = { headers = { type = "object" } } } }
function _M.check_schema(conf) return core.schema.check(_M.schema, conf) end
function _M.rewrite(conf, ctx)
    for k, v in pairs(conf.headers or {}) do core.request.set_header(ctx, k, v) end
end
return _M
"#;

/// Sends `METHOD PATH` with `body` to the Admin API as raw bytes (what curl would send, with
/// nothing checked on the way) and reads the answer.
fn raw_admin(addr: SocketAddr, method: &str, path: &str, body: &str) -> RawResp {
    raw_resp(
        addr,
        format!(
            "{method} /apisix/admin{path} HTTP/1.1\r\nHost: {addr}\r\nX-API-KEY: {KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

#[test]
fn admin_api_refuses_values_that_can_never_be_sent() {
    let up = Upstream::echo();
    let node = up.node();
    let gw = Gateway::start_with_plugins(
        &[("add-headers", ADD_HEADERS)],
        &format!("workers: 1\nadmin:\n  listen: 127.0.0.1:0\n  key: {KEY}\nplugins: [add-headers, response-headers]\n"),
    );
    let admin = gw.admin_addr();
    let upstream = format!(r#"{{"nodes":{{"{node}":1}}}}"#);
    // JSON escapes: the strings hold real CR, LF and NUL bytes once parsed.
    let cases = [
        (
            format!(r#"{{"uri":"/a\r\nX-Injected: 1","upstream":{upstream}}}"#),
            r#"invalid configuration: uri: must not hold CR, LF or NUL: "/a\r\nX-Injected: 1""#,
        ),
        (
            format!(r#"{{"uris":["/ok","/b\u0000"],"upstream":{upstream}}}"#),
            "invalid configuration: uris[1]: must not hold CR, LF or NUL",
        ),
        (
            format!(r#"{{"uri":"/a","hosts":["a.example\r\nX: y"],"upstream":{upstream}}}"#),
            "invalid configuration: hosts[0]: ",
        ),
        (
            format!(r#"{{"uri":"/a","host":"a.example\n","upstream":{upstream}}}"#),
            "invalid configuration: host: ",
        ),
        (
            format!(
                r#"{{"uri":"/a","upstream":{{"pass_host":"rewrite","upstream_host":"up\r\nX-Evil: 1","nodes":{{"{node}":1}}}}}}"#
            ),
            "invalid configuration: upstream.upstream_host: must not hold CR, LF or NUL",
        ),
        (
            format!(
                r#"{{"uri":"/a","plugins":{{"response-headers":{{"set":{{"X-A":"v\r\nSet-Cookie: s=1"}}}}}},"upstream":{upstream}}}"#
            ),
            r#"failed to check the configuration of plugin response-headers err: property "set.X-A" must not hold CR, LF or NUL"#,
        ),
        (
            format!(
                r#"{{"uri":"/a","plugins":{{"add-headers":{{"headers":{{"X-B\nX-C":"1"}}}}}},"upstream":{upstream}}}"#
            ),
            r#"failed to check the configuration of plugin add-headers err: property "headers" has a key that must not hold CR, LF or NUL"#,
        ),
        (
            r#"{"uri":"/a","upstream_id":"u\r\n1"}"#.to_string(),
            "upstream_id",
        ),
    ];
    for (body, expected) in &cases {
        let r = raw_admin(admin, "PUT", "/routes/r1", body);
        assert_eq!(r.status, 400, "{body}\n{}\n{}", r.head, r.body);
        let msg = r.json()["error_msg"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            msg.contains(expected),
            "{body}\ngot: {msg}\nwanted: {expected}"
        );
        assert_eq!(
            raw_admin(admin, "GET", "/routes/r1", "").status,
            404,
            "{body} was stored"
        );
    }
    // An id in the path is held to APISIX's id rule.
    let r = raw_admin(
        admin,
        "PUT",
        "/routes/r%0D%0A1",
        &format!(r#"{{"uri":"/a","upstream":{upstream}}}"#),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    // The same route without the bad byte is taken, and serves.
    let r = raw_admin(
        admin,
        "PUT",
        "/routes/r1",
        &format!(
            r#"{{"uri":"/a","hosts":["a.example"],"plugins":{{"response-headers":{{"set":{{"X-A":"v"}}}},"add-headers":{{"headers":{{"X-B":"1"}}}}}},"upstream":{upstream}}}"#
        ),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let resp = get_host(&gw.url("/a"), "a.example");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-a").as_deref(), Some("v"));
}

#[test]
fn check_refuses_a_config_file_with_values_that_can_never_be_sent() {
    let (code, out) = check(
        "routes:
  - id: r1
    uri: \"/a\\r\\nX-Injected: 1\"
    upstream: {nodes: {\"127.0.0.1:1\": 1}}
  - id: r2
    uri: /b
    plugins:
      response-headers: {set: {X-A: \"v\\nw\"}}
    upstream:
      pass_host: rewrite
      upstream_host: \"up\\u0000\"
      nodes: {\"127.0.0.1:1\": 1}
",
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(r#"routes[0].uri: must not hold CR, LF or NUL: "/a\r\nX-Injected: 1""#),
        "{out}"
    );
    assert!(
        out.contains("routes[1].upstream.upstream_host: must not hold CR, LF or NUL"),
        "{out}"
    );
    assert!(
        out.contains(r#"routes[1].plugins.response-headers: failed to check the configuration of plugin response-headers err: property "set.X-A" must not hold CR, LF or NUL"#),
        "{out}"
    );
}

#[test]
fn admin_api_body_that_stops_arriving_gets_408() {
    let gw = Gateway::start(&format!(
        "workers: 1\nadmin:\n  listen: 127.0.0.1:0\n  key: {KEY}\n  client_body_timeout: 1\n"
    ));
    let admin = gw.admin_addr();
    let body = r#"{"uri":"/slow","plugins":{"response-headers":{"set":{"X-A":"v"}}}}"#;
    let mut s = TcpStream::connect(admin).expect("connect");
    // Half the body, then nothing: the answer must come without the client closing.
    s.write_all(
        format!(
            "PUT /apisix/admin/routes/slow HTTP/1.1\r\nHost: {admin}\r\nX-API-KEY: {KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
            body.len(),
            &body[..body.len() / 2]
        )
        .as_bytes(),
    )
    .expect("write");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the gateway closes (bounded by the read timeout).
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    let r = RawResp::parse(&String::from_utf8_lossy(&out));
    assert_eq!(
        r.status,
        408,
        "after {:?}: {}\n{}",
        started.elapsed(),
        r.head,
        r.body
    );
    assert_eq!(r.header("connection"), Some("close"), "{}", r.head);
    assert!(
        r.json()["error_msg"]
            .as_str()
            .is_some_and(|m| m.contains("client_body_timeout")),
        "{}",
        r.body
    );
    // Nothing was stored, and the Admin API still answers.
    assert_eq!(raw_admin(admin, "GET", "/routes/slow", "").status, 404);
    let r = raw_admin(admin, "PUT", "/routes/slow", body);
    assert_eq!(r.status, 201, "{}", r.body);
}

/// Answers 403 in access: the guard of a host-restricted route.
const DENY: &str = r#"local _M = { version = 0.1, priority = 3000, name = "deny", schema = { type = "object" } }
function _M.access(conf, ctx)
    return 403, { message = "denied by the internal route" }
end
return _M
"#;

#[test]
fn route_hosts_are_normalised_as_request_hosts_are() {
    let up = Upstream::echo();
    let node = up.node();
    let gw = Gateway::start_with_plugins(
        &[("deny", DENY)],
        &format!(
            "workers: 1
services:
  - id: wild
    hosts: [\"*.Wild.Example.\"]
routes:
  - id: internal
    uri: /*
    hosts: [Internal.Example.]
    plugins:
      deny: {{}}
    upstream:
      nodes:
        \"{node}\": 1
  - id: wild
    uri: /*
    service_id: wild
    plugins:
      deny: {{}}
    upstream:
      nodes:
        \"{node}\": 1
  - id: catch-all
    uri: /*
    upstream:
      nodes:
        \"{node}\": 1
"
        ),
    );
    for host in [
        "internal.example",
        "Internal.Example.",
        "internal.example:80",
        "a.wild.example",
        "A.WILD.example.",
    ] {
        let r = raw_resp(
            gw.addr(),
            format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert_eq!(
            r.status, 403,
            "Host: {host} reached the catch-all:\n{}",
            r.head
        );
    }
    let r = raw_resp(
        gw.addr(),
        b"GET /x HTTP/1.1\r\nHost: public.example\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200, "{}", r.head);
}

#[test]
fn route_hosts_that_can_never_match_are_refused() {
    let (code, out) = check(
        "routes:
  - id: r1
    uri: /a
    hosts: [ok.example, \"a b.example\", \"a.example:8080\", \"a..example\", \"\"]
    upstream: {nodes: {\"127.0.0.1:1\": 1}}
services:
  - id: s1
    hosts: [\"a/b\"]
",
    );
    assert_eq!(code, 1, "{out}");
    for line in [
        "routes[0].hosts[1]: invalid host \"a b.example\": invalid character in host",
        "routes[0].hosts[2]: invalid host \"a.example:8080\": a route host is matched without a port",
        "routes[0].hosts[3]: invalid host \"a..example\": empty label in host",
        "routes[0].hosts[4]: invalid host \"\": empty host",
        "services[0].hosts[0]: invalid host \"a/b\": invalid character in host",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    assert!(!out.contains("routes[0].hosts[0]"), "{out}");
}

/// Reads the request body the two ways plugins do; the pcall one shows a bad body cannot be
/// swallowed by the plugin (nginx finalizes the request on it).
const READ_BODY: &str = r#"local core = require("apisix.core")
local _M = { version = 0.1, priority = 100, name = "read-body", schema = { type = "object" } }
function _M.access(conf, ctx)
    if ctx.var.uri == "/pcall" then
        local ok, err = pcall(ngx.req.read_body)
        return 200, "read_body swallowed: " .. tostring(err)
    end
    local body, err = core.request.get_body()
    return 200, "got " .. tostring(body and #body) .. " bytes, err " .. tostring(err)
end
return _M
"#;

/// Sends `head` and `body`, then closes the writing side, and reads the answer to its end.
fn send_then_close(addr: SocketAddr, head: &str, body: &[u8]) -> RawResp {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(head.as_bytes()).expect("write head");
    s.write_all(body).expect("write body");
    s.shutdown(std::net::Shutdown::Write).expect("half close");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    RawResp::parse(&String::from_utf8_lossy(&out))
}

#[test]
fn lua_reading_a_bad_client_body_is_the_clients_error() {
    let gw = Gateway::start_with_plugins(
        &[("read-body", READ_BODY)],
        "workers: 1
routes:
  - id: body
    uris: [/body, /pcall]
    plugins:
      read-body: {}
",
    );
    let addr = gw.addr();
    // A whole body reads (the plugin works at all).
    let r = raw_resp(
        addr,
        b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    );
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "got 5 bytes, err nil"),
        "{}",
        r.head
    );

    for (what, path, head, body) in [
        (
            "a bad chunk size",
            "/body",
            "Transfer-Encoding: chunked",
            &b"5\r\nhello\r\nzz\r\n"[..],
        ),
        (
            "a bare LF in chunk framing",
            "/pcall",
            "Transfer-Encoding: chunked",
            &b"5\nhello\r\n0\r\n\r\n"[..],
        ),
        (
            "a body cut short",
            "/body",
            "Content-Length: 100",
            &b"only 16 of them."[..],
        ),
        (
            "a body cut short",
            "/pcall",
            "Content-Length: 100",
            &b"only 16 of them."[..],
        ),
    ] {
        let r = send_then_close(
            addr,
            &format!("POST {path} HTTP/1.1\r\nHost: x\r\n{head}\r\n\r\n"),
            body,
        );
        assert_eq!(r.status, 400, "{what} on {path}:\n{}\n{}", r.head, r.body);
        assert_eq!(
            r.header("connection"),
            Some("close"),
            "{what} on {path}: {}",
            r.head
        );
    }
    assert!(
        gw.wait_for_log("bad request body from the client", Duration::from_secs(5)),
        "{}",
        gw.logs()
    );
    let logs = gw.logs();
    assert!(
        logs.contains("client closed the connection before sending the whole request body"),
        "{logs}"
    );
    assert!(
        !logs.contains("ERROR"),
        "a client's bad body logged as an error:\n{logs}"
    );
}
