//! WebSocket through the gateway (route `enable_websocket`), against a real `websockets` echo
//! server: a raw client writing the handshake and frames by hand, the `websockets` client,
//! auth plugins on the upgrade request, routes that do not tunnel, half-close, idle timeout,
//! many tunnels at once, a reload and a graceful shutdown with tunnels open.

mod common;

use std::io::Write;
use std::net::{Shutdown, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::websocket::*;
use common::*;

/// A Lua plugin that marks the upstream request in access, shows the status header_filter
/// saw, and logs what the log phase sees.
const PROBE: &str = r#"
local core = require("apisix.core")
local _M = { version = 0.1, priority = 0, name = "ws-probe", schema = { type = "object" } }
function _M.check_schema(conf) return core.schema.check(_M.schema, conf) end
function _M.access(conf, ctx) ngx.req.set_header("X-Probe", "access") end
function _M.header_filter(conf, ctx) ngx.header["X-Probe-Status"] = ngx.status end
function _M.log(conf, ctx)
    core.log.warn("ws-probe log route=", ctx.var.route_id, " status=", ngx.status,
        " sent=", ctx.var.upstream_bytes_sent, " received=", ctx.var.upstream_bytes_received)
end
return _M
"#;

fn node_block(node: &str) -> String {
    format!("    upstream:\n      nodes:\n        \"{node}\": 1\n")
}

/// A TCP upstream that answers the upgrade with a `101` and `early` in one write, reads what
/// comes until the gateway half-closes, answers `got:` and what it read, and closes. Keeps the
/// request heads it read.
fn half_close_upstream() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    let heads: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = heads.clone();
    runtime().spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..end]).to_lowercase());
                let mut rest = buf.split_off(end);
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nearly")
                    .await;
                loop {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => rest.extend_from_slice(&chunk[..n]),
                    }
                }
                let mut answer = b"got:".to_vec();
                answer.extend_from_slice(&rest);
                let _ = s.write_all(&answer).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, heads)
}

/// The access log line of the tunnel to `path` (waits for it).
fn tunnel_log(gw: &Gateway, path: &str) -> String {
    let needle = format!(" GET {path} 101 ");
    assert!(
        gw.wait_for_log(&needle, Duration::from_secs(20)),
        "no access log line for {path}:\n{}",
        gw.logs()
    );
    gw.logs()
        .lines()
        .find(|l| l.contains(&needle))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn websocket_tunnels_on_enabled_routes_only() {
    let ws = WsServer::start();
    let echo = Upstream::echo();
    let fake = RawUpstream::start(vec![(
        Duration::ZERO,
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    )]);
    let (raw_addr, raw_heads) = half_close_upstream();
    let key_auth = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/plugins/example-key-auth.lua"
    ))
    .expect("example-key-auth.lua");
    let route = |id: &str, uri: &str, extra: &str, node: &str| {
        format!("  - id: {id}\n    uri: {uri}\n{extra}{}", node_block(node))
    };
    let on = "    enable_websocket: true\n";
    let wsn = ws.node();
    let routes = [
        "workers: 1\nroutes:\n".to_string(),
        route(
            "ws",
            "/ws/*",
            &format!("{on}    plugins:\n      ws-probe: {{}}\n"),
            &wsn,
        ),
        route(
            "auth",
            "/auth/*",
            &format!("{on}    plugins:\n      example-key-auth: {{key: k1}}\n"),
            &wsn,
        ),
        route("plain", "/plain/*", "", &wsn),
        route("plain-echo", "/plain-echo", "", &echo.node()),
        route("ws-echo", "/ws-echo", on, &echo.node()),
        "  - id: svc-on\n    uri: /svc/*\n    service_id: wss\n".to_string(),
        "  - id: svc-off\n    uri: /svc-off/*\n    service_id: wss\n    enable_websocket: false\n"
            .to_string(),
        route("fake101", "/fake101", "", &fake.node()),
        route("raw", "/raw", on, &raw_addr.to_string()),
        route(
            "idle",
            "/idle/*",
            &format!("{on}    timeout: {{connect: 5, send: 5, read: 1}}\n"),
            &wsn,
        ),
        format!("services:\n  - id: wss\n{on}{}", node_block(&wsn)),
    ]
    .concat();
    let gw = Gateway::start_with_plugins(
        &[("ws-probe", PROBE), ("example-key-auth", &key_auth)],
        &routes,
    );
    let addr = gw.addr();

    // The handshake passes through: the upstream saw the upgrade (its own handshake checks
    // passed) with the access phase's header and the forwarding headers; the client got the
    // upstream's accept value, and header_filter saw the 101.
    let (mut c, head) = WsClient::open(addr, &handshake_request(addr, "/ws/headers", ""));
    assert_eq!(head.status, 101, "{}", head.text);
    assert_eq!(head.header("upgrade"), Some("websocket"), "{}", head.text);
    assert_eq!(head.header("connection"), Some("upgrade"), "{}", head.text);
    assert_eq!(
        head.header("sec-websocket-accept"),
        Some(accept_for(KEY).to_lowercase().as_str())
    );
    assert_eq!(head.header("x-probe-status"), Some("101"), "{}", head.text);
    assert!(head.text.contains("server: moongate/"), "{}", head.text);
    let (op, seen) = c.recv();
    assert_eq!(op, TEXT);
    let seen: serde_json::Value = serde_json::from_slice(&seen).expect("headers JSON");
    assert_eq!(seen["upgrade"], "websocket", "{seen}");
    assert_eq!(seen["connection"], "upgrade", "{seen}");
    assert_eq!(seen["x-probe"], "access", "{seen}");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1", "{seen}");
    assert_eq!(seen["host"], addr.to_string(), "{seen}");

    // Text, binary, a large message (4 MiB, 64-bit length) and a ping, then the close
    // handshake; the tunnel's byte counts reach the log phase and the access log.
    c.send(TEXT, "héllo".as_bytes());
    assert_eq!(c.recv(), (TEXT, "héllo".as_bytes().to_vec()));
    let bin: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    c.send(BINARY, &bin);
    assert_eq!(c.recv(), (BINARY, bin));
    let large: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    c.send(BINARY, &large);
    let (op, got) = c.recv();
    assert_eq!(op, BINARY);
    assert!(
        got == large,
        "the 4 MiB message came back changed ({} bytes)",
        got.len()
    );
    c.send(PING, b"p");
    assert_eq!(c.recv(), (PONG, b"p".to_vec()));
    let (sent, received) = c.counts();
    c.close();
    assert_eq!(ws.closed("/ws/headers").as_deref(), Some("1000"));
    let line = tunnel_log(&gw, "/ws/headers");
    // The close frames: 2 + 4 (mask) + 2 from the client, 2 + 2 from the server.
    let expect = format!(
        "(websocket: {} bytes to upstream, {} bytes to client, closed)",
        sent + 8,
        received + 4
    );
    assert!(line.contains(&expect), "{line}\nexpected {expect}");
    assert!(line.contains("route=ws"), "{line}");
    assert!(
        gw.wait_for_log(
            &format!(
                "ws-probe log route=ws status=101 sent={} received={}",
                sent + 8,
                received + 4
            ),
            Duration::from_secs(20)
        ),
        "{}",
        gw.logs()
    );

    // The `websockets` client: text, binary and a 1 MiB message, closing cleanly.
    let out = python_client(
        &format!("ws://{addr}/ws/py"),
        "ws.send('text')\nprint(ws.recv())\nws.send(b'\\x00\\x01bin')\nprint(ws.recv() == b'\\x00\\x01bin')\nbig = bytes(range(256)) * 4096\nws.send(big)\nprint(ws.recv() == big)",
    );
    assert_eq!(out, "text\nTrue\nTrue\n");
    assert_eq!(ws.closed("/ws/py").as_deref(), Some("1000"));

    // The upstream closes: the client gets its message and close frame, then the end.
    let mut c = WsClient::connect(addr, "/ws/bye");
    assert_eq!(c.recv(), (TEXT, b"bye".to_vec()));
    let (op, payload) = c.recv();
    assert_eq!(op, CLOSE);
    assert_eq!(&payload[..2], &1000u16.to_be_bytes());
    c.send(CLOSE, &1000u16.to_be_bytes());
    assert!(
        c.closed(),
        "the tunnel stayed open after the upstream closed"
    );
    // The tunnel ends (and logs) once the client's side has ended too.
    drop(c);
    tunnel_log(&gw, "/ws/bye");

    // The client goes away without a close frame: the upstream's connection ends too.
    let mut c = WsClient::connect(addr, "/ws/gone");
    c.send(TEXT, b"x");
    assert_eq!(c.recv(), (TEXT, b"x".to_vec()));
    drop(c);
    let code = ws.closed("/ws/gone").expect("the upstream saw the end");
    assert_ne!(code, "1000", "a clean close nobody sent");
    assert!(tunnel_log(&gw, "/ws/gone").contains("bytes to client"));

    // An auth plugin refuses the upgrade: a plain 401, no tunnel, and the connection goes on
    // as HTTP/1.1. With the key the same route tunnels.
    let (mut c, head) = WsClient::open(addr, &handshake_request(addr, "/auth/x", ""));
    assert_eq!(head.status, 401, "{}", head.text);
    assert!(head.header("upgrade").is_none(), "{}", head.text);
    let len: usize = head
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .expect("length");
    assert!(String::from_utf8_lossy(&c.read_exact(len)).contains("Missing API key"));
    c.stream
        .write_all(format!("GET /plain-echo HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .expect("second request");
    assert_eq!(c.read_head().status, 200);
    let (mut c, head) = WsClient::open(addr, &handshake_request(addr, "/auth/x", "apikey: k1\r\n"));
    assert_eq!(head.status, 101, "{}", head.text);
    c.send(TEXT, b"authed");
    assert_eq!(c.recv(), (TEXT, b"authed".to_vec()));
    c.close();

    // Without `enable_websocket` the upgrade headers never reach the upstream (a WebSocket
    // server refuses the plain GET); with it, an upstream that does not switch answers as
    // HTTP and its answer passes on.
    let (_, head) = WsClient::open(addr, &handshake_request(addr, "/plain/x", ""));
    assert_ne!(head.status, 101, "{}", head.text);
    assert!(head.status >= 400, "{}", head.text);
    for (path, upgraded) in [("/plain-echo", false), ("/ws-echo", true)] {
        let (mut c, head) = WsClient::open(addr, &handshake_request(addr, path, ""));
        assert_eq!(head.status, 200, "{}", head.text);
        let len: usize = head
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .expect("length");
        let echo: serde_json::Value =
            serde_json::from_slice(&c.read_exact(len)).expect("echo JSON");
        let h = &echo["headers"];
        assert_eq!(h.get("upgrade").is_some(), upgraded, "{path}: {echo}");
        assert_eq!(
            h.get("connection").is_some_and(|v| v == "upgrade"),
            upgraded,
            "{path}: {echo}"
        );
        assert_eq!(h["sec-websocket-key"], KEY, "{path}: {echo}");
    }

    // A service's `enable_websocket` serves its routes, unless a route says false.
    let c = WsClient::connect(addr, "/svc/a");
    c.close();
    let (_, head) = WsClient::open(addr, &handshake_request(addr, "/svc-off/a", ""));
    assert!(head.status >= 400, "{}", head.text);

    // An upstream 101 on a route that does not tunnel is a 502, even to a client that asked.
    let (_, head) = WsClient::open(addr, &handshake_request(addr, "/fake101", ""));
    assert_eq!(head.status, 502, "{}", head.text);

    // Half-close both ways, and bytes that came with the upstream's 101 head: the client
    // ends its side, the upstream still answers, then closes.
    let (mut c, head) = WsClient::open(addr, &handshake_request(addr, "/raw", ""));
    assert_eq!(head.status, 101, "{}", head.text);
    assert_eq!(c.read_exact(5), b"early");
    c.stream.write_all(b"abc").expect("write");
    c.stream.shutdown(Shutdown::Write).expect("half-close");
    assert_eq!(c.read_exact(7), b"got:abc");
    assert!(c.closed());
    let up_head = raw_heads.lock().unwrap()[0].clone();
    assert!(up_head.contains("\r\nupgrade: websocket\r\n"), "{up_head}");
    assert!(up_head.contains("\r\nconnection: upgrade\r\n"), "{up_head}");
    assert!(tunnel_log(&gw, "/raw")
        .contains("(websocket: 3 bytes to upstream, 12 bytes to client, closed)"));

    // Nothing moves for the upstream's `timeout.read`: the gateway closes the tunnel.
    let mut c = WsClient::connect(addr, "/idle/x");
    c.send(TEXT, b"once");
    assert_eq!(c.recv(), (TEXT, b"once".to_vec()));
    assert!(c.closed(), "the idle tunnel stayed open");
    assert!(tunnel_log(&gw, "/idle/x").contains("idle timeout"));

    // Many tunnels at once, each echoing in turn.
    let clients: Vec<_> = (0..40)
        .map(|i| {
            std::thread::spawn(move || {
                let mut c = WsClient::connect(addr, &format!("/ws/many{i}"));
                for j in 0..10 {
                    let m = format!("{i}-{j}");
                    c.send(TEXT, m.as_bytes());
                    assert_eq!(c.recv(), (TEXT, m.into_bytes()));
                }
                c.close();
            })
        })
        .collect();
    for t in clients {
        t.join().expect("a concurrent tunnel failed");
    }
    for i in 0..40 {
        assert_eq!(ws.closed(&format!("/ws/many{i}")).as_deref(), Some("1000"));
    }
}

#[test]
fn tunnels_survive_a_reload_and_close_after_the_shutdown_drain() {
    let ws = WsServer::start();
    let config = |extra: &str| {
        format!(
            "workers: 1\nproxy:\n  graceful_shutdown_timeout: 2\nroutes:\n  - id: ws\n    uri: /ws/*\n    enable_websocket: true\n{}{extra}",
            node_block(&ws.node())
        )
    };
    let mut gw = Gateway::start(&config(""));
    let addr = gw.addr();
    let mut c = WsClient::connect(addr, "/ws/long");
    c.send(TEXT, b"before");
    assert_eq!(c.recv(), (TEXT, b"before".to_vec()));

    // A new generation (a route added) leaves the open tunnel as it was.
    let text = std::fs::read_to_string(gw.config_path()).expect("config");
    std::fs::write(
        gw.config_path(),
        text + "  - id: ws2\n    uri: /ws2/*\n    enable_websocket: true\n"
            + &node_block(&ws.node()),
    )
    .expect("rewrite config");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, head) = WsClient::open(addr, &handshake_request(addr, "/ws2/probe", ""));
        if head.status == 101 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new route never served"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.send(TEXT, b"after reload");
    assert_eq!(c.recv(), (TEXT, b"after reload".to_vec()));

    // Graceful shutdown: the tunnel keeps working through the drain period, then closes;
    // the log phase still runs for it.
    gw.terminate();
    c.send(TEXT, b"draining");
    assert_eq!(c.recv(), (TEXT, b"draining".to_vec()));
    assert!(c.closed(), "the tunnel outlived the shutdown");
    let status = gw
        .wait_exit(Duration::from_secs(30))
        .expect("the gateway exited");
    assert!(status.success(), "{status:?}\n{}", gw.logs());
    assert!(gw.logs().contains("GET /ws/long 101"), "{}", gw.logs());
    assert!(gw.logs().contains("shutdown)"), "{}", gw.logs());
}
