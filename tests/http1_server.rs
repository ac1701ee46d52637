//! The proxy listener's HTTP/1.1 server, byte for byte: raw TCP clients against the real
//! gateway and real upstreams.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

fn route(id: &str, uri: &str, node: &str) -> String {
    format!(
        "  - id: \"{id}\"\n    uri: {uri}\n    upstream:\n      nodes:\n        \"{node}\": 1\n"
    )
}

/// An upstream answering with the request body it received, as is.
fn body_echo() -> Upstream {
    Upstream::start(|req| async move {
        let body = req
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        Response::new(full(body))
    })
}

/// A body of three frames with no size known up front.
struct Unsized(u8);

impl HttpBody for Unsized {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.0 == 3 {
            return Poll::Ready(None);
        }
        self.0 += 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(format!(
            "part{};",
            self.0
        ))))))
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

fn unsized_upstream() -> Upstream {
    Upstream::start(|_req| async move { Response::new(Unsized(0).map_err(Into::into).boxed()) })
}

/// One response as read off the wire.
#[derive(Debug)]
struct RawResp {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl RawResp {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw client connection that reads responses with their exact framing.
struct Wire {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    fn open(addr: SocketAddr) -> Wire {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Wire { s, buf: Vec::new() }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("write");
    }

    /// Reads more; false on EOF, reset or timeout.
    fn fill(&mut self) -> bool {
        let mut b = [0u8; 16 * 1024];
        match self.s.read(&mut b) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&b[..n]);
                true
            }
        }
    }

    fn take_until(&mut self, pat: &[u8]) -> Option<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.windows(pat.len()).position(|w| w == pat) {
                let out: Vec<u8> = self.buf.drain(..i + pat.len()).collect();
                return Some(out);
            }
            if !self.fill() {
                return None;
            }
        }
    }

    fn take(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill() {
                return None;
            }
        }
        Some(self.buf.drain(..n).collect())
    }

    /// The next interim or final response head, as text.
    fn head(&mut self) -> Option<String> {
        let head = self.take_until(b"\r\n\r\n")?;
        Some(String::from_utf8_lossy(&head).into_owned())
    }

    /// The next response; `no_body` for the answer to HEAD.
    fn response(&mut self, no_body: bool) -> Option<RawResp> {
        let head = self.head()?;
        let status = raw_status(&head);
        let mut r = RawResp {
            status,
            head,
            body: Vec::new(),
        };
        if no_body || status == 204 || status == 304 {
            return Some(r);
        }
        if let Some(len) = r.header("content-length") {
            r.body = self.take(len.parse().expect("content-length"))?;
        } else if r.header("transfer-encoding").as_deref() == Some("chunked") {
            loop {
                let line = self.take_until(b"\r\n")?;
                let size = std::str::from_utf8(&line).expect("size line").trim();
                let size = usize::from_str_radix(size, 16).expect("hex size");
                if size == 0 {
                    assert_eq!(self.take(2)?, b"\r\n", "no trailers expected");
                    break;
                }
                r.body.extend(self.take(size)?);
                assert_eq!(self.take(2)?, b"\r\n");
            }
        } else {
            while self.fill() {}
            r.body = std::mem::take(&mut self.buf);
        }
        Some(r)
    }

    /// Whether the gateway closed the connection (EOF or reset) within `wait`.
    fn closed_within(&mut self, wait: Duration) -> bool {
        self.s.set_read_timeout(Some(wait)).expect("timeout");
        let mut b = [0u8; 1024];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(n) => self.buf.extend_from_slice(&b[..n]),
                Err(e) => {
                    return !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    )
                }
            }
        }
    }
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let up = Upstream::echo();
    let gw = Gateway::start(&format!("routes:\n{}", route("1", "/p", &up.node())));
    let mut w = Wire::open(gw.addr());
    let mut all = Vec::new();
    for n in 1..=3 {
        all.extend_from_slice(format!("GET /p?n={n} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
    }
    // A POST with a body in the same write, then one more GET.
    all.extend_from_slice(b"POST /p?n=4 HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello");
    all.extend_from_slice(b"GET /p?n=5 HTTP/1.1\r\nHost: t\r\n\r\n");
    w.send(&all);
    for n in 1..=5 {
        let r = w.response(false).expect("response");
        assert_eq!(r.status, 200, "{}", r.head);
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
        assert_eq!(v["uri"], format!("/p?n={n}"));
        if n == 4 {
            assert_eq!(v["body_len"], 5);
        }
    }
    assert_eq!(up.requests(), 5);
}

/// Heads longer than the first read buffer (1 KiB) and than a read chunk (8 KiB), on a
/// connection that waited idle between requests (its buffer is given back while it waits):
/// sent whole, in pieces across the buffer sizes, and pipelined behind one another.
#[test]
fn long_heads_after_keep_alive_waits_are_read_whole() {
    let up = Upstream::echo();
    let gw = Gateway::start(&format!("routes:\n{}", route("1", "/l", &up.node())));
    let mut w = Wire::open(gw.addr());
    let head = |n: usize, len: usize| {
        format!(
            "GET /l?n={n} HTTP/1.1\r\nHost: t\r\nX-Long: {}\r\nX-After: {n}\r\n\r\n",
            "v".repeat(len)
        )
    };
    let check = |w: &mut Wire, n: usize, len: usize| {
        let r = w.response(false).expect("response");
        assert_eq!(r.status, 200, "request {n}: {}", r.head);
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
        assert_eq!(v["uri"], format!("/l?n={n}"));
        assert_eq!(
            v["headers"]["x-long"].as_str().map(str::len),
            Some(len),
            "request {n}"
        );
        assert_eq!(v["headers"]["x-after"], n.to_string());
    };
    // Whole, then idle.
    w.send(head(1, 3000).as_bytes());
    check(&mut w, 1, 3000);
    // In pieces that cross 1 KiB and 8 KiB, with pauses (each piece may find the buffer
    // empty or partly filled).
    let req = head(2, 12_000);
    for piece in req.as_bytes().chunks(900) {
        w.send(piece);
        std::thread::sleep(Duration::from_millis(5));
    }
    check(&mut w, 2, 12_000);
    // Pipelined: a short head, a long one and a short one in one write.
    let mut all = head(3, 10);
    all.push_str(&head(4, 20_000));
    all.push_str(&head(5, 10));
    w.send(all.as_bytes());
    for (n, len) in [(3, 10), (4, 20_000), (5, 10)] {
        check(&mut w, n, len);
    }
    assert_eq!(up.requests(), 5);
}

#[test]
fn chunked_request_body_with_extensions_and_trailers() {
    let up = body_echo();
    let gw = Gateway::start(&format!("routes:\n{}", route("1", "/c", &up.node())));
    let mut w = Wire::open(gw.addr());
    w.send(
        b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n\
          5;name=value\r\nhello\r\n6;a;b=\"q\"\r\n world\r\n0\r\nX-Trailer: t\r\nX-Other: u\r\n\r\n",
    );
    let r = w.response(false).expect("response");
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.text(), "hello world");
    // The trailers were consumed: the connection serves the next request.
    w.send(b"POST /c HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc");
    let r = w.response(false).expect("second response");
    assert_eq!(r.text(), "abc");

    // A broken chunked body fails that request only.
    let mut w = Wire::open(gw.addr());
    w.send(b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n");
    if let Some(r) = w.response(false) {
        assert_ne!(r.status, 200, "{}", r.head);
    }
    assert!(w.closed_within(Duration::from_secs(5)));
    let r = Wire::open(gw.addr());
    drop(r);
    assert_eq!(get(&gw.url("/c")).status, 200);
}

#[test]
fn expect_100_continue() {
    let up = body_echo();
    let gw = Gateway::start(&format!("routes:\n{}", route("1", "/e", &up.node())));
    let mut w = Wire::open(gw.addr());
    w.send(b"POST /e HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n");
    // The client waits for the interim response before it sends the body.
    let interim = w.head().expect("100 Continue");
    assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
    w.send(b"hello");
    let r = w.response(false).expect("response");
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.text(), "hello");
    assert_eq!(r.header("connection"), None);

    // Refused before the body is needed: no 100, and the connection closes after the answer
    // (the client may never send the body).
    let mut w = Wire::open(gw.addr());
    w.send(b"POST /nope HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n");
    let r = w.response(false).expect("response");
    assert_eq!(r.status, 404, "{}", r.head);
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    assert!(w.closed_within(Duration::from_secs(5)));
}

#[test]
fn http_1_0_clients() {
    let up = Upstream::text("hello");
    let unsized_up = unsized_upstream();
    let gw = Gateway::start(&format!(
        "routes:\n{}{}",
        route("1", "/t", &up.node()),
        route("2", "/u", &unsized_up.node())
    ));
    // No keep-alive: answered, then closed.
    let mut w = Wire::open(gw.addr());
    w.send(b"GET /t HTTP/1.0\r\nHost: t\r\n\r\n");
    let r = w.response(false).expect("response");
    assert!(r.head.starts_with("HTTP/1.1 200 OK\r\n"), "{}", r.head);
    assert_eq!(r.header("content-length").as_deref(), Some("5"));
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    assert_eq!(r.text(), "hello");
    assert!(w.closed_within(Duration::from_secs(5)));

    // Keep-alive asked for: kept, and said so.
    let mut w = Wire::open(gw.addr());
    for _ in 0..2 {
        w.send(b"GET /t HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n");
        let r = w.response(false).expect("response");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection").as_deref(), Some("keep-alive"));
        assert_eq!(r.text(), "hello");
    }
    // A body of unknown length: no chunked coding for HTTP/1.0, it ends with the connection.
    w.send(b"GET /u HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n");
    let r = w.response(false).expect("response");
    assert_eq!(r.header("transfer-encoding"), None, "{}", r.head);
    assert_eq!(r.header("content-length"), None, "{}", r.head);
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    assert_eq!(r.text(), "part1;part2;part3;");

    // The same for HTTP/1.1 goes out chunked, and the connection stays.
    let mut w = Wire::open(gw.addr());
    for _ in 0..2 {
        w.send(b"GET /u HTTP/1.1\r\nHost: t\r\n\r\n");
        let r = w.response(false).expect("response");
        assert_eq!(r.header("transfer-encoding").as_deref(), Some("chunked"));
        assert_eq!(r.text(), "part1;part2;part3;");
    }
}

#[test]
fn request_smuggling_is_refused() {
    let up = Upstream::echo();
    let gw = Gateway::start(&format!("routes:\n{}", route("1", "/s", &up.node())));
    let cases: &[&[u8]] = &[
        // Both framings.
        b"POST /s HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
        // Two different lengths, in two lines or one.
        b"POST /s HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"POST /s HTTP/1.1\r\nHost: t\r\nContent-Length: 3, 4\r\n\r\nabcd",
        // Not a number.
        b"POST /s HTTP/1.1\r\nHost: t\r\nContent-Length: +3\r\n\r\nabc",
        b"POST /s HTTP/1.1\r\nHost: t\r\nContent-Length: 0x3\r\n\r\nabc",
        // A transfer coding other than chunked, or chunked twice.
        b"POST /s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"POST /s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        // Chunked from an HTTP/1.0 client.
        b"POST /s HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        // Malformed heads.
        b"GET /s HTTP/1.1\r\nHost: t\r\nBad Header: x\r\n\r\n",
        b"GET /s HTTP/1.1\r\nHost: t\r\n: novalue\r\n\r\n",
        b"GET /s HTTX/1.1\r\nHost: t\r\n\r\n",
        b"GET  HTTP/1.1\r\nHost: t\r\n\r\n",
        // No Host in HTTP/1.1; two Hosts (also in HTTP/1.0).
        b"GET /s HTTP/1.1\r\nX-A: 1\r\n\r\n",
        b"GET /s HTTP/1.1\r\nHost: t\r\nHost: u\r\n\r\n",
        b"GET /s HTTP/1.0\r\nHost: t\r\nHost: t\r\n\r\n",
    ];
    for case in cases {
        let mut w = Wire::open(gw.addr());
        w.send(case);
        let r = w.response(false).expect("an answer");
        assert_eq!(
            r.status,
            400,
            "{}\n{}",
            String::from_utf8_lossy(case),
            r.head
        );
        assert_eq!(r.header("connection").as_deref(), Some("close"));
        assert!(w.closed_within(Duration::from_secs(5)));
    }
    assert_eq!(up.requests(), 0);
    // HTTP/1.0 needs no Host.
    let mut w = Wire::open(gw.addr());
    w.send(b"GET /s HTTP/1.0\r\n\r\n");
    let r = w.response(false).expect("response");
    assert_eq!(r.status, 200, "{}", r.head);
    // The same length twice is one length.
    let mut w = Wire::open(gw.addr());
    w.send(b"POST /s HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc");
    let r = w.response(false).expect("response");
    assert_eq!(r.status, 200, "{}", r.head);
}

#[test]
fn too_many_header_lines_is_431() {
    let up = Upstream::echo();
    let gw = Gateway::start(&format!("routes:\n{}", route("1", "/h", &up.node())));
    let mut req = String::from("GET /h HTTP/1.1\r\nHost: t\r\n");
    for i in 0..200 {
        req.push_str(&format!("X-H{i}: v\r\n"));
    }
    req.push_str("\r\n");
    let mut w = Wire::open(gw.addr());
    w.send(req.as_bytes());
    let r = w.response(false).expect("answer");
    assert_eq!(r.status, 431, "{}", r.head);
    assert_eq!(up.requests(), 0);
}

#[test]
fn idle_keep_alive_connection_closes_after_the_header_timeout() {
    let up = Upstream::text("hello");
    let gw = Gateway::start(&format!(
        "proxy:\n  client_header_timeout: 1\nroutes:\n{}",
        route("1", "/t", &up.node())
    ));
    let mut w = Wire::open(gw.addr());
    // Pauses shorter than the timeout each, longer than it together: each wait has its own
    // deadline.
    for _ in 0..3 {
        w.send(b"GET /t HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(w.response(false).expect("response").status, 200);
        std::thread::sleep(Duration::from_millis(600));
    }
    w.send(b"GET /t HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(w.response(false).expect("response").status, 200);
    let start = Instant::now();
    assert!(w.closed_within(Duration::from_secs(10)), "still open");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(800),
        "closed after {waited:?}"
    );
}

#[test]
fn head_and_bodiless_responses_are_framed_without_a_body() {
    let up = Upstream::text("hello");
    let no_content = Upstream::start(|_req| async move {
        let mut r = Response::new(empty());
        *r.status_mut() = StatusCode::NO_CONTENT;
        r
    });
    let gw = Gateway::start(&format!(
        "routes:\n{}{}",
        route("1", "/t", &up.node()),
        route("2", "/n", &no_content.node())
    ));
    let mut w = Wire::open(gw.addr());
    w.send(b"HEAD /t HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = w.response(true).expect("response");
    assert_eq!(r.status, 200, "{}", r.head);
    // The length the body would have, and no body: the next response follows at once.
    assert_eq!(
        r.header("content-length").as_deref(),
        Some("5"),
        "{}",
        r.head
    );
    assert!(r.header("date").is_some());
    w.send(b"HEAD /nope HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = w.response(true).expect("response");
    assert_eq!(r.status, 404, "{}", r.head);
    w.send(b"GET /n HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = w.response(false).expect("response");
    assert_eq!(r.status, 204, "{}", r.head);
    assert_eq!(r.header("content-length"), None, "{}", r.head);
    assert_eq!(r.header("transfer-encoding"), None, "{}", r.head);
    w.send(b"GET /t HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = w.response(false).expect("response");
    assert_eq!(r.text(), "hello");
    assert!(w.buf.is_empty(), "stray bytes: {:?}", w.buf);
}

#[test]
fn client_closing_mid_body_costs_only_its_request() {
    let up = body_echo();
    let gw = Gateway::start(&format!("routes:\n{}", route("1", "/b", &up.node())));
    for _ in 0..5 {
        let mut w = Wire::open(gw.addr());
        w.send(b"POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\nonly a few bytes");
        std::thread::sleep(Duration::from_millis(50));
        drop(w);
        let mut w = Wire::open(gw.addr());
        w.send(b"POST /b HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nshort");
        drop(w);
    }
    let r = Req::post(&gw.url("/b")).body("whole").send();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "whole");
}

#[test]
fn unread_request_body_is_drained_and_the_connection_reused() {
    let up = Upstream::text("hello");
    let gw = Gateway::start(&format!("routes:\n{}", route("1", "/t", &up.node())));
    let mut w = Wire::open(gw.addr());
    // A 404 never reads the body; it is drained, and the next request on the connection works.
    let body = "x".repeat(100_000);
    w.send(
        format!(
            "POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let r = w.response(false).expect("response");
    assert_eq!(r.status, 404);
    assert_eq!(r.header("connection"), None, "{}", r.head);
    w.send(b"POST /nope HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
    assert_eq!(w.response(false).expect("response").status, 404);
    w.send(b"GET /t HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = w.response(false).expect("response");
    assert_eq!(r.text(), "hello");
}

/// Each piece below is read short of the read buffer, after which the server waits for the
/// socket's next readiness event rather than asking the kernel again: every later piece, and
/// the end of the stream arriving with the last request, must still wake it.
#[test]
fn requests_arriving_in_pieces_and_with_the_close_are_all_answered() {
    let up = body_echo();
    let gw = Gateway::start(&format!("routes:\n{}", route("1", "/b", &up.node())));
    let mut w = Wire::open(gw.addr());
    for round in 0..3 {
        for piece in [
            &b"POST /b HTTP/1.1\r\nHo"[..],
            b"st: t\r\nContent-Len",
            b"gth: 10\r\n\r\n",
            b"01234",
            b"56789",
        ] {
            w.send(piece);
            std::thread::sleep(Duration::from_millis(30));
        }
        let r = w.response(false).expect("response");
        assert_eq!(
            (r.status, r.text()),
            (200, "0123456789".into()),
            "round {round}"
        );
    }
    // The last request and the end of the stream in one segment: answered, then closed.
    w.send(b"POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nlast");
    w.s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let r = w.response(false).expect("response");
    assert_eq!((r.status, r.text()), (200, "last".into()));
    assert!(w.closed_within(Duration::from_secs(5)));
}

#[test]
fn connection_close_from_the_client_is_honoured() {
    let up = Upstream::text("hello");
    let gw = Gateway::start(&format!("routes:\n{}", route("1", "/t", &up.node())));
    let mut w = Wire::open(gw.addr());
    w.send(b"GET /t HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let r = w.response(false).expect("response");
    assert_eq!(r.text(), "hello");
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    assert!(w.closed_within(Duration::from_secs(5)));
}

#[test]
fn absolute_form_request_target_is_routed_by_its_path() {
    let up = Upstream::echo();
    let gw = Gateway::start(&format!("routes:\n{}", route("1", "/abs", &up.node())));
    let mut w = Wire::open(gw.addr());
    w.send(b"GET http://example.com/abs?x=1 HTTP/1.1\r\nHost: example.com\r\n\r\n");
    let r = w.response(false).expect("response");
    assert_eq!(r.status, 200, "{}", r.head);
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    // The upstream gets the origin form.
    assert_eq!(v["uri"], "/abs?x=1");
    assert_eq!(v["headers"]["host"], "example.com");
}

#[test]
fn absolute_form_request_target_names_the_host() {
    let up = Upstream::echo();
    let gw = Gateway::start(&format!(
        "routes:\n{}    hosts: [target.test]\n",
        route("1", "/abs", &up.node())
    ));
    // Routed by the target's host, not by Host (as nginx's $host), and the target's authority
    // replaces Host for the upstream too (RFC 9112 §3.2.2), normalised.
    let mut w = Wire::open(gw.addr());
    w.send(b"GET http://Target.test:8080/abs HTTP/1.1\r\nHost: other.test\r\n\r\n");
    let r = w.response(false).expect("response");
    assert_eq!(r.status, 200, "{}", r.head);
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(v["headers"]["host"], "target.test:8080");
    assert_eq!(v["headers"]["x-forwarded-host"], "target.test");
    let mut w = Wire::open(gw.addr());
    w.send(b"GET /abs HTTP/1.1\r\nHost: other.test\r\n\r\n");
    assert_eq!(w.response(false).expect("response").status, 404);
}

/// How long the gateway lets a connection wait for its next request before it parks it
/// (`proxy::park::PARK_AFTER`, 1 s), with some margin: a test idles a connection this long to
/// have it parked.
const PARKED: Duration = Duration::from_millis(1600);

/// A keep-alive connection idle long enough to be parked is served again as before: the next
/// request whole, one in pieces, two pipelined; the reads that wake it are not lost, and the
/// header timeout still runs from when the wait began.
#[test]
fn connections_idle_long_enough_to_be_parked_are_served_again() {
    let up = Upstream::echo();
    let gw = Gateway::start(&format!(
        "proxy:\n  client_header_timeout: 4\nroutes:\n{}",
        route("1", "/k", &up.node())
    ));
    let mut w = Wire::open(gw.addr());
    let get = |n: usize| format!("GET /k?n={n} HTTP/1.1\r\nHost: t\r\n\r\n");
    let check = |w: &mut Wire, n: usize| {
        let r = w.response(false).expect("response");
        assert_eq!(r.status, 200, "request {n}: {}", r.head);
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
        assert_eq!(v["uri"], format!("/k?n={n}"));
    };
    w.send(get(1).as_bytes());
    check(&mut w, 1);
    std::thread::sleep(PARKED);
    w.send(get(2).as_bytes());
    check(&mut w, 2);
    std::thread::sleep(PARKED);
    // In pieces: the first wakes the parked connection, the rest reach the new task.
    for piece in get(3).as_bytes().chunks(7) {
        w.send(piece);
        std::thread::sleep(Duration::from_millis(20));
    }
    check(&mut w, 3);
    std::thread::sleep(PARKED);
    let mut two = get(4);
    two.push_str(&get(5));
    w.send(two.as_bytes());
    check(&mut w, 4);
    check(&mut w, 5);
    // Idle again: parked, then closed at the header timeout, not at the park.
    let start = Instant::now();
    assert!(w.closed_within(Duration::from_secs(15)), "still open");
    let waited = start.elapsed();
    assert!(waited >= Duration::from_secs(3), "closed after {waited:?}");
    assert_eq!(up.requests(), 5);
}

/// Many parked connections at once, some closed by their clients while parked: every one
/// still open is served again, and the ones that closed cost nothing.
#[test]
fn many_parked_connections_are_each_served_again() {
    let up = Upstream::echo();
    let gw = Gateway::start(&format!("routes:\n{}", route("1", "/m", &up.node())));
    let mut conns: Vec<Wire> = (0..40).map(|_| Wire::open(gw.addr())).collect();
    for (i, w) in conns.iter_mut().enumerate() {
        w.send(format!("GET /m?c={i} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        assert_eq!(w.response(false).expect("response").status, 200);
    }
    std::thread::sleep(PARKED);
    // Every third client leaves while parked.
    let mut kept = Vec::new();
    for (i, w) in conns.into_iter().enumerate() {
        if i % 3 == 0 {
            drop(w);
        } else {
            kept.push((i, w));
        }
    }
    std::thread::sleep(PARKED);
    for round in 0..2 {
        for (i, w) in kept.iter_mut() {
            w.send(format!("GET /m?c={i}&r={round} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        }
        for (i, w) in kept.iter_mut() {
            let r = w.response(false).expect("response");
            assert_eq!(r.status, 200, "connection {i}: {}", r.head);
            let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
            assert_eq!(v["uri"], format!("/m?c={i}&r={round}"));
        }
        std::thread::sleep(PARKED);
    }
    assert_eq!(up.requests(), 40 + 2 * kept.len() as u64);
}

/// A graceful shutdown closes parked connections as it closes idle ones, at once: the
/// gateway does not wait its `graceful_shutdown_timeout` for them.
#[test]
fn graceful_shutdown_closes_parked_connections() {
    let up = Upstream::text("hello");
    let mut gw = Gateway::start(&format!(
        "proxy:\n  graceful_shutdown_timeout: 60\nroutes:\n{}",
        route("1", "/s", &up.node())
    ));
    let mut w = Wire::open(gw.addr());
    w.send(b"GET /s HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(w.response(false).expect("response").status, 200);
    std::thread::sleep(PARKED);
    gw.terminate();
    assert!(
        w.closed_within(Duration::from_secs(20)),
        "parked connection still open"
    );
    assert!(
        gw.wait_exit(Duration::from_secs(20)).is_some(),
        "gateway still running with a parked connection"
    );
}
