//! HTTP/2 on the proxy listener, against real peers: curl (`--http2-prior-knowledge`),
//! nghttp2's `nghttp` and `h2load`, and raw frames for the abuse cases.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// A config with one plain listener serving HTTP/1.1 and h2c, one without HTTP/2, and
/// `routes`.
fn h2_config(extra: &str, routes: &str) -> String {
    format!(
        "listen:\n  - {{ip: 127.0.0.1, port: 0, enable_http2: true}}\nworkers: 1\n{extra}routes:\n{routes}"
    )
}

fn proxy_route(id: &str, uri: &str, node: &str, plugins: &str) -> String {
    format!(
        "  - id: {id}\n    uri: {uri}\n{plugins}    upstream:\n      nodes:\n        \"{node}\": 1\n"
    )
}

/// `curl --http2-prior-knowledge` with `args`; returns (status line + headers, body).
fn curl_h2(url: &str, args: &[&str]) -> (String, String) {
    let out = tool("curl")
        .args([
            "-s",
            "--http2-prior-knowledge",
            "-D",
            "-",
            "--max-time",
            "60",
        ])
        .args(args)
        .arg(url)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    match text.split_once("\r\n\r\n") {
        Some((h, b)) => (h.to_string(), b.to_string()),
        None => (text, String::new()),
    }
}

#[test]
fn h2c_requests_go_through_the_same_router_and_plugins() {
    let up = Upstream::echo();
    let plugins_dir = format!("{}/plugins", env!("CARGO_MANIFEST_DIR"));
    let auth = "    plugins:\n      example-key-auth: {key: k1}\n      response-headers: {set: {X-Route: \"$route_id\", X-Proto: \"$server_protocol\"}}\n";
    let gw = Gateway::start(&h2_config(
        &format!("plugin_dirs: [\"{plugins_dir}\"]\nproxy:\n  client_max_body_size: 1024\n  client_header_buffer_size: 8192\n"),
        &(proxy_route("echo", "/echo", &up.node(), "")
            + &proxy_route("auth", "/auth", &up.node(), auth)),
    ));

    // HTTP/2 with prior knowledge: the :authority is the Host the upstream gets, split
    // cookies arrive joined, the forwarding headers are there.
    let (head, body) = curl_h2(
        &gw.url("/echo?a=1"),
        &[
            "-H",
            "cookie: a=1",
            "-H",
            "cookie: b=2",
            "-H",
            "x-custom: v",
        ],
    );
    assert!(head.starts_with("HTTP/2 200"), "{head}\n{body}");
    assert!(head.contains("server: moongate/"), "{head}");
    let echo: serde_json::Value = serde_json::from_str(&body).expect("echo JSON");
    assert_eq!(echo["uri"], "/echo?a=1");
    assert_eq!(echo["headers"]["host"], gw.addr().to_string());
    assert_eq!(echo["headers"]["cookie"], "a=1; b=2");
    assert_eq!(echo["headers"]["x-custom"], "v");
    assert_eq!(echo["headers"]["x-forwarded-for"], "127.0.0.1");
    assert!(echo["headers"].get("te").is_none(), "{echo}");

    // HTTP/1.1 on the same listener.
    let r = get(&gw.url("/echo"));
    assert_eq!(r.status, 200);

    // A Lua auth plugin's access phase and a native header_filter run for HTTP/2 too.
    let (head, body) = curl_h2(&gw.url("/auth"), &[]);
    assert!(head.starts_with("HTTP/2 401"), "{head}");
    assert!(body.contains("Missing API key"), "{body}");
    let (head, _) = curl_h2(&gw.url("/auth"), &["-H", "apikey: k1"]);
    assert!(head.starts_with("HTTP/2 200"), "{head}");
    assert!(head.contains("x-route: auth"), "{head}");
    assert!(head.contains("x-proto: HTTP/2.0"), "{head}");

    // The same limits: body size (413 on the Content-Length, and while streaming without
    // one) and header size (431).
    let big = "x".repeat(2048);
    let (head, _) = curl_h2(&gw.url("/echo"), &["--data-binary", &big]);
    assert!(head.starts_with("HTTP/2 413"), "{head}");
    let (head, _) = curl_h2(
        &gw.url("/echo"),
        &[
            "--data-binary",
            &big,
            "-H",
            "content-length:",
            "-H",
            "x-a: 1",
        ],
    );
    assert!(head.starts_with("HTTP/2 413"), "{head}");
    let huge = format!("x-big: {}", "y".repeat(10_000));
    let (head, _) = curl_h2(&gw.url("/echo"), &["-H", &huge]);
    assert!(head.starts_with("HTTP/2 431"), "{head}");
    // The connection-level 431 leaves the listener serving.
    let (head, _) = curl_h2(&gw.url("/echo"), &[]);
    assert!(head.starts_with("HTTP/2 200"), "{head}");

    // One access log line per HTTP/2 request, as for HTTP/1.1.
    assert!(
        gw.wait_for_log("GET /echo?a=1 200 route=echo", Duration::from_secs(5)),
        "{}",
        gw.logs()
    );
}

#[test]
fn a_listener_without_enable_http2_stays_http1() {
    let up = Upstream::echo();
    let gw = Gateway::start(&format!(
        "listen:\n  - {{ip: 127.0.0.1, port: 0}}\nroutes:\n{}",
        proxy_route("echo", "/echo", &up.node(), "")
    ));
    assert_eq!(get(&gw.url("/echo")).status, 200);
    // The HTTP/2 preface is not an HTTP/1.1 request there.
    let answer = raw(gw.addr(), http2_preface_and_settings().as_slice());
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}

/// An upstream that holds each request until `want` requests are in flight together (or 20 s
/// pass), then answers with how many it saw at once.
fn gathering_upstream(want: u64) -> (Upstream, Arc<AtomicU64>) {
    let inflight = Arc::new(AtomicU64::new(0));
    let peak = Arc::new(AtomicU64::new(0));
    let (i2, p2) = (inflight.clone(), peak.clone());
    let up = Upstream::start(move |_req| {
        let inflight = i2.clone();
        let peak = p2.clone();
        async move {
            let now = inflight.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            let deadline = Instant::now() + Duration::from_secs(20);
            while peak.load(Ordering::SeqCst) < want && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            inflight.fetch_sub(1, Ordering::SeqCst);
            hyper::Response::new(full("ok"))
        }
    });
    (up, peak)
}

#[test]
fn hundred_streams_are_multiplexed_on_one_connection() {
    let (up, peak) = gathering_upstream(100);
    let gw = Gateway::start(&h2_config("", &proxy_route("m", "/m", &up.node(), "")));
    // h2load: 1 connection, 100 streams at once.
    let out = tool("h2load")
        .args(["-n", "100", "-c", "1", "-m", "100", &gw.url("/m")])
        .output()
        .expect("run h2load");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("100 succeeded") && text.contains("100 2xx"),
        "{text}"
    );
    assert!(text.contains("Application protocol: h2c"), "{text}");
    // All 100 were at the upstream at the same time: none waited for another to finish.
    assert_eq!(peak.load(Ordering::SeqCst), 100);
}

#[test]
fn large_bodies_stream_both_ways_with_bounded_memory() {
    const SIZE: u64 = 128 * 1024 * 1024;
    let down = Upstream::streaming(SIZE);
    let echo = Upstream::echo();
    let gw = Gateway::start(&h2_config(
        "",
        &(proxy_route("down", "/down", &down.node(), "")
            + &proxy_route("up", "/up", &echo.node(), "")),
    ));
    let (head, _) = curl_h2(&gw.url("/up"), &[]);
    assert!(head.starts_with("HTTP/2 200"), "{head}");
    let before = gw.rss_kib();

    // Download: curl counts the bytes it wrote.
    let out = tool("curl")
        .args([
            "-s",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{size_download}",
            "--max-time",
            "120",
            &gw.url("/down"),
        ])
        .output()
        .expect("run curl");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("2 {SIZE}"),
        "download"
    );

    // Upload from a pipe (no Content-Length: the body streams in DATA frames).
    let mut child = tool("curl")
        .args([
            "-s",
            "--http2-prior-knowledge",
            "-T",
            "-",
            "-X",
            "POST",
            "--max-time",
            "120",
            &gw.url("/up"),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run curl");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'u'; 1024 * 1024];
        for _ in 0..SIZE / chunk.len() as u64 {
            if stdin.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let out = child.wait_with_output().expect("curl output");
    writer.join().expect("writer");
    let echo_json: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("echo JSON after upload");
    assert_eq!(echo_json["body_len"], SIZE);
    assert_eq!(echo_json["headers"].get("content-length"), None);

    // Flow control held both bodies to a window's worth in the gateway: its peak memory grew
    // by far less than either body.
    let grown = gw.peak_rss_kib().saturating_sub(before);
    assert!(grown < 32 * 1024, "peak RSS grew by {grown} KiB");
}

#[test]
fn graceful_shutdown_sends_goaway_and_answers_open_streams() {
    let up = Upstream::slow(Duration::from_millis(1500));
    let mut gw = Gateway::start(&h2_config("", &proxy_route("s", "/s", &up.node(), "")));
    let child = tool("nghttp")
        .args(["-v", &gw.url("/s")])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run nghttp");
    let deadline = Instant::now() + Duration::from_secs(20);
    while up.requests() == 0 {
        assert!(
            Instant::now() < deadline,
            "the request never reached the upstream"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    gw.terminate();
    let out = child.wait_with_output().expect("nghttp output");
    let text = String::from_utf8_lossy(&out.stdout);
    // GOAWAY first, then the open stream's answer in full.
    let goaway = text.find("recv GOAWAY").unwrap_or_else(|| panic!("{text}"));
    let status = text
        .find(":status: 200")
        .unwrap_or_else(|| panic!("{text}"));
    assert!(goaway < status, "{text}");
    assert!(text.contains("error_code=NO_ERROR"), "{text}");
    assert!(text.contains("slow"), "{text}");
    assert!(out.status.success(), "{text}");
    let status = gw
        .wait_exit(Duration::from_secs(20))
        .expect("gateway exits");
    assert!(status.success(), "{status:?}");
}

// ---------------------------------------------------------------------------------------------
// Raw frames
// ---------------------------------------------------------------------------------------------

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;
const ENHANCE_YOUR_CALM: u32 = 11;

fn http2_preface_and_settings() -> Vec<u8> {
    let mut b = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    b.extend(frame(SETTINGS, 0, 0, &[]));
    b
}

/// `GET /m` in HPACK: indexed :method GET, :scheme http, :path /, then :authority as a
/// literal without indexing.
fn get_headers_block() -> Vec<u8> {
    let mut b = vec![0x82, 0x86, 0x84, 0x01, 9];
    b.extend_from_slice(b"localhost");
    b
}

/// Reads frames until a GOAWAY (its error code) or the end of the connection (None).
fn read_goaway(s: &mut TcpStream, within: Duration) -> Option<u32> {
    s.set_read_timeout(Some(within)).expect("timeout");
    let mut buf = Vec::new();
    let mut tmp = [0u8; 65536];
    loop {
        while buf.len() >= 9 {
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            if buf[3] == GOAWAY && len >= 8 {
                let p = &buf[9..];
                return Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
            }
            buf.drain(..9 + len);
        }
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

/// Sends what is left of `bytes`, stopping when the peer stops reading (the write times out)
/// or closes.
fn write_until_stalled(s: &mut TcpStream, bytes: &[u8]) -> usize {
    s.set_write_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut sent = 0;
    while sent < bytes.len() {
        match s.write(&bytes[sent..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => sent += n,
        }
    }
    sent
}

#[test]
fn floods_cost_only_the_offending_connection() {
    let up = Upstream::echo();
    let gw = Gateway::start(&h2_config(
        "proxy:\n  client_header_timeout: 3\n",
        &proxy_route("m", "/*", &up.node(), ""),
    ));
    let serves = || {
        let (head, _) = curl_h2(&gw.url("/ok"), &[]);
        head.starts_with("HTTP/2 200")
    };

    // Rapid reset: open streams and reset them at once, over and over.
    let mut s = TcpStream::connect(gw.addr()).expect("connect");
    let mut flood = http2_preface_and_settings();
    let block = get_headers_block();
    for i in 0..2000u32 {
        let id = 2 * i + 1;
        flood.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &block));
        flood.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    write_until_stalled(&mut s, &flood);
    assert_eq!(
        read_goaway(&mut s, Duration::from_secs(20)),
        Some(ENHANCE_YOUR_CALM),
        "rapid reset is answered with GOAWAY(ENHANCE_YOUR_CALM)"
    );
    assert!(serves(), "other connections are served");

    // Header-list bomb: a header block that never ends, in CONTINUATION frames.
    let mut s = TcpStream::connect(gw.addr()).expect("connect");
    let mut bomb = http2_preface_and_settings();
    let mut first = get_headers_block();
    first.extend_from_slice(&[0x00, 0x01, b'x', 0x7f, 0x81, 0x7f]); // literal, long value...
    bomb.extend(frame(HEADERS, END_STREAM, 1, &first));
    let filler = vec![b'a'; 16 * 1024];
    for _ in 0..256 {
        bomb.extend(frame(CONTINUATION, 0, 1, &filler));
    }
    write_until_stalled(&mut s, &bomb);
    let code = read_goaway(&mut s, Duration::from_secs(20));
    assert!(
        code.is_some(),
        "the bomb's connection is closed with a GOAWAY"
    );
    assert!(serves(), "other connections are served");

    // PING and SETTINGS floods from a client that reads nothing: the gateway stops reading
    // it once its answers back up, serves everyone else, and drops it at the idle timeout.
    // A small receive buffer, so the answers back up soon.
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.set_recv_buffer_size(16 * 1024).expect("SO_RCVBUF");
    sock.connect(&gw.addr().into()).expect("connect");
    let mut s: TcpStream = sock.into();
    let mut pings = http2_preface_and_settings();
    for i in 0..600_000u64 {
        if i % 2 == 0 {
            pings.extend(frame(PING, 0, 0, &i.to_be_bytes()));
        } else {
            pings.extend(frame(SETTINGS, 0, 0, &[0, 4, 0, 1, 0, 0]));
        }
    }
    let sent = write_until_stalled(&mut s, &pings);
    assert!(
        sent < pings.len(),
        "the gateway stops reading a flood nobody reads the answers of"
    );
    assert!(serves(), "other connections are served during the flood");
    let rss = gw.rss_kib();
    assert!(rss < 200 * 1024, "RSS {rss} KiB");
    // Once stalled, the connection is closed by the idle timeout.
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut sink = vec![0u8; 1 << 20];
    let closed_at = Instant::now();
    loop {
        match s.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => assert!(
                closed_at.elapsed() < Duration::from_secs(30),
                "the flooding connection stays open"
            ),
        }
    }
    assert!(serves(), "still serving");
}

#[test]
fn a_stream_the_client_resets_mid_request_is_logged() {
    let up = Upstream::slow(Duration::from_secs(20));
    let gw = Gateway::start(&h2_config("", &proxy_route("slow", "/*", &up.node(), "")));
    let mut s = TcpStream::connect(gw.addr()).expect("connect");
    let mut open = http2_preface_and_settings();
    open.extend(frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &get_headers_block(),
    ));
    s.write_all(&open).expect("send the request");
    let deadline = Instant::now() + Duration::from_secs(20);
    while up.requests() == 0 {
        assert!(
            Instant::now() < deadline,
            "the request never reached the upstream"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // CANCEL while the upstream is still working on it.
    s.write_all(&frame(RST_STREAM, 0, 1, &8u32.to_be_bytes()))
        .expect("send RST_STREAM");
    assert!(
        gw.wait_for_log(
            "HTTP/2 client reset the stream before its response",
            Duration::from_secs(20)
        ),
        "{}",
        gw.logs()
    );
    let logs = gw.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("client reset the stream"))
        .unwrap_or_default();
    assert!(line.contains("INFO"), "{line}");
    assert!(
        line.contains("method=GET") && line.contains("path=/"),
        "{line}"
    );
    assert!(line.contains("reason=CANCEL"), "{line}");
}
