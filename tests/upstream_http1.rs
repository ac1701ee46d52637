//! The upstream HTTP/1.1 client against upstreams that answer with exact bytes: framing
//! (chunked with extensions and trailers, close-delimited, no body), interim responses, heads
//! split across many writes, malformed heads, and connections the upstream closes.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// What a raw upstream does with one request on a connection: write an answer (or not) and
/// say whether to keep the connection open for the next request.
type Answer = dyn Fn(&mut TcpStream, &str, u64) -> bool + Send + Sync;

/// A hand-written HTTP/1.1 server: reads each request head and lets the test answer with the
/// bytes it wants. Requests carry no body here.
struct RawUpstream {
    addr: SocketAddr,
    connections: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
}

impl RawUpstream {
    /// `answer(stream, request_head, nth_request_on_this_connection)`.
    fn start(answer: impl Fn(&mut TcpStream, &str, u64) -> bool + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let answer: Arc<Answer> = Arc::new(answer);
        {
            let connections = connections.clone();
            let requests = requests.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(mut stream) = stream else { continue };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let answer = answer.clone();
                    let requests = requests.clone();
                    std::thread::spawn(move || {
                        let _ = stream.set_nodelay(true);
                        let mut nth = 0;
                        while let Some(head) = read_head(&mut stream) {
                            requests.fetch_add(1, Ordering::SeqCst);
                            if !answer(&mut stream, &head, nth) {
                                break;
                            }
                            nth += 1;
                        }
                    });
                }
            });
        }
        RawUpstream {
            addr,
            connections,
            requests,
        }
    }

    /// Answers every request with `response`, keeping the connection open.
    fn fixed(response: &'static [u8]) -> Self {
        RawUpstream::start(move |s, _, _| s.write_all(response).is_ok())
    }

    fn node(&self) -> String {
        self.addr.to_string()
    }

    fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Reads one request head (through the blank line); None at the end of the stream.
fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// One worker, so every request uses the same pool.
fn gateway_for(up: &RawUpstream) -> Gateway {
    Gateway::start(&format!(
        "workers: 1\nroutes:\n  - id: \"1\"\n    uri: \"/*\"\n    upstream:\n      nodes:\n        \"{}\": 1\n",
        up.node()
    ))
}

#[test]
fn chunked_response_with_extensions_and_trailers() {
    let up = RawUpstream::fixed(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Up: 1\r\n\r\n\
          5;name=value\r\nhello\r\n6 ; x=\"y z\"\r\n world\r\n0;end\r\nX-Checksum: abc\r\nX-More: 2\r\n\r\n",
    );
    let gw = gateway_for(&up);
    for _ in 0..3 {
        let r = get(&gw.url("/c"));
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "hello world");
        assert_eq!(r.header("x-up").as_deref(), Some("1"));
        // Trailers are read and dropped, not turned into headers.
        assert_eq!(r.header("x-checksum"), None);
    }
    // The connection survived each chunked body.
    assert_eq!(up.connections(), 1);
}

#[test]
fn close_delimited_response() {
    let up = RawUpstream::start(|s, _, _| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ");
        std::thread::sleep(Duration::from_millis(50));
        let _ = s.write_all(b"the end");
        false
    });
    let gw = gateway_for(&up);
    for _ in 0..2 {
        let r = get(&gw.url("/close"));
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "until the end");
    }
    assert_eq!(up.connections(), 2);
}

#[test]
fn interim_responses_are_skipped() {
    let up = RawUpstream::fixed(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n\
          HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone",
    );
    let gw = gateway_for(&up);
    let r = Req::post(&gw.url("/c")).body("x").send();
    assert_eq!(r.status, 201);
    assert_eq!(r.text(), "done");
    assert_eq!(r.header("link"), None);
}

#[test]
fn head_split_across_many_small_writes() {
    let up = RawUpstream::start(|s, _, _| {
        let response = b"HTTP/1.1 200 OK\r\nX-Slow: yes\r\nContent-Length: 5\r\n\r\nhello";
        for b in response {
            if s.write_all(&[*b]).is_err() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    });
    let gw = gateway_for(&up);
    let r = get(&gw.url("/slow"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-slow").as_deref(), Some("yes"));
    assert_eq!(r.text(), "hello");
}

#[test]
fn malformed_heads_are_502() {
    for response in [
        &b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n"[..],
        b"HTTP/9 200 OK\r\n\r\n",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    ] {
        let up = RawUpstream::fixed(response);
        let gw = gateway_for(&up);
        let r = get(&gw.url("/bad"));
        assert_eq!(r.status, 502, "for {:?}", String::from_utf8_lossy(response));
        assert!(
            gw.wait_for_log("invalid response head", Duration::from_secs(5)),
            "{}",
            gw.logs()
        );
    }
}

#[test]
fn oversized_head_is_502() {
    let up = RawUpstream::start(|s, _, _| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\n");
        let line = format!("X-Big: {}\r\n", "a".repeat(1000));
        for _ in 0..70 {
            if s.write_all(line.as_bytes()).is_err() {
                return false;
            }
        }
        let _ = s.write_all(b"\r\n");
        false
    });
    let gw = gateway_for(&up);
    assert_eq!(get(&gw.url("/big")).status, 502);
    assert!(gw.wait_for_log("larger than 65536", Duration::from_secs(5)));
}

#[test]
fn idle_connection_closed_by_the_upstream_is_replaced() {
    // Serves one request per connection, then closes it shortly after, while it idles in the
    // gateway's pool.
    let up = RawUpstream::start(|s, _, _| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        std::thread::sleep(Duration::from_millis(50));
        false
    });
    let gw = gateway_for(&up);
    for _ in 0..3 {
        assert_eq!(get(&gw.url("/idle")).status, 200);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(up.connections(), 3);
    assert_eq!(up.requests(), 3);
}

#[test]
fn reused_connection_that_closes_instead_of_answering_is_retried() {
    // The keep-alive race: the upstream answers the first request, then closes the connection
    // on reading the second without answering it.
    let up = RawUpstream::start(|s, _, nth| {
        if nth > 0 {
            return false;
        }
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .is_ok()
    });
    let gw = gateway_for(&up);
    for _ in 0..3 {
        assert_eq!(get(&gw.url("/race")).status, 200);
    }
    // Each retry went to a new connection; no request failed.
    assert_eq!(up.connections(), 3);
    // A body still streaming from the client cannot be sent twice: no retry, a 502.
    let r = Req::post(&gw.url("/race")).body("payload").send();
    assert_eq!(r.status, 502);
    assert_eq!(up.connections(), 3);
}

#[test]
fn bodiless_responses_keep_the_connection() {
    let up = RawUpstream::start(|s, head, _| {
        let response: &[u8] = if head.starts_with("HEAD ") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n"
        } else if head.starts_with("GET /204") {
            b"HTTP/1.1 204 No Content\r\n\r\n"
        } else if head.starts_with("GET /304") {
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 11\r\n\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world"
        };
        s.write_all(response).is_ok()
    });
    let gw = gateway_for(&up);
    let head = Req::new("HEAD", &gw.url("/h")).send();
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length").as_deref(), Some("11"));
    assert!(head.body.is_empty());
    assert_eq!(get(&gw.url("/204")).status, 204);
    assert_eq!(get(&gw.url("/304")).status, 304);
    let r = get(&gw.url("/full"));
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello world");
    assert_eq!(up.requests(), 4);
    assert_eq!(up.connections(), 1);
}

/// Response heads longer than the first read buffer (4 KiB) and than a read step (16 KiB),
/// sent in pieces, on one kept-alive upstream connection that gives its buffers back between
/// exchanges: each head and body arrives whole, and the connection is reused.
#[test]
fn long_response_heads_on_a_reused_connection() {
    let up = RawUpstream::start(|s, head, _| {
        let len: usize = head
            .split(' ')
            .nth(1)
            .and_then(|p| p.trim_start_matches("/len/").parse().ok())
            .unwrap_or(10);
        let response = format!(
            "HTTP/1.1 200 OK\r\nX-Long: {}\r\nContent-Length: 5\r\n\r\nhello",
            "v".repeat(len)
        );
        for piece in response.as_bytes().chunks(1500) {
            if s.write_all(piece).is_err() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    });
    let gw = gateway_for(&up);
    for len in [10, 5000, 20_000, 10, 3000] {
        let r = get(&gw.url(&format!("/len/{len}")));
        assert_eq!(r.status, 200, "len {len}");
        assert_eq!(r.header("x-long").map(|v| v.len()), Some(len), "len {len}");
        assert_eq!(r.text(), "hello", "len {len}");
    }
    assert_eq!(up.requests(), 5);
    assert_eq!(up.connections(), 1);
}

#[test]
fn connection_close_and_both_framings_are_not_reused() {
    let up = RawUpstream::start(|s, head, _| {
        let response: &[u8] = if head.starts_with("GET /close") {
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
        };
        s.write_all(response).is_ok()
    });
    let gw = gateway_for(&up);
    assert_eq!(get(&gw.url("/close")).text(), "ok");
    let r = get(&gw.url("/both"));
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "ok");
    assert_eq!(get(&gw.url("/both")).text(), "ok");
    assert_eq!(up.connections(), 3);
}

#[test]
fn early_answer_to_an_upload_reaches_the_client() {
    // The upstream refuses the upload after the head, without reading the body, and closes.
    let up = RawUpstream::start(|s, _, _| {
        let _ = s.write_all(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big!",
        );
        let _ = s.shutdown(std::net::Shutdown::Write);
        std::thread::sleep(Duration::from_millis(300));
        false
    });
    let gw = gateway_for(&up);
    let r = Req::post(&gw.url("/upload"))
        .body_stream(generated(64 * 1024 * 1024))
        .send();
    assert_eq!(r.status, 413);
    assert_eq!(r.text(), "too big!");
}

#[test]
fn in_memory_body_is_sent_again_after_a_keep_alive_race() {
    // openfunction sends the request body read whole: a body that can be sent twice. The
    // function server answers the first request on each connection, then closes the
    // connection on reading the second.
    let up = RawUpstream::start(|s, head, nth| {
        let len = head
            .lines()
            .find_map(|l| {
                let l = l.to_ascii_lowercase();
                l.strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
            })
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        if s.read_exact(&mut body).is_err() || nth > 0 {
            return false;
        }
        let mut reply = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n").into_bytes();
        reply.extend_from_slice(&body);
        s.write_all(&reply).is_ok()
    });
    let gw = Gateway::start(&format!(
        "workers: 1\nroutes:\n  - id: \"fn\"\n    uri: \"/fn\"\n    plugins:\n      openfunction:\n        function_uri: \"http://{}/fn\"\n",
        up.node()
    ));
    for i in 0..3 {
        let r = Req::post(&gw.url("/fn"))
            .body(format!("payload {i}"))
            .send();
        assert_eq!(r.status, 200, "{}", gw.logs());
        assert_eq!(r.text(), format!("payload {i}"));
    }
    // Calls 2 and 3 each found their pooled connection closed and went again on a new one.
    assert_eq!(up.connections(), 3);
    assert_eq!(up.requests(), 5);
}
