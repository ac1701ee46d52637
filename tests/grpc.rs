//! gRPC through moongate's HTTP/2 listener to a real gRPC server (PyPI `grpcio`, with stubs
//! generated from `tests/grpc/echo.proto` by `grpcio-tools` in the test): unary, server,
//! client and bidirectional streaming, status and trailing metadata, upstream timeouts; and
//! the upstream's balancer, health checks and retries over gRPC nodes (a killed node, a node
//! that refuses streams).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::health::poll_until;
use common::*;

/// The test's gRPC server process; killed when dropped.
struct GrpcServer {
    child: Child,
    port: u16,
}

impl GrpcServer {
    /// SIGKILL, as a crash would: the process's connections are closed by the kernel, with
    /// no GOAWAY.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn grpc_dir() -> String {
    format!("{}/tests/grpc", env!("CARGO_MANIFEST_DIR"))
}

/// Generates the Python stubs into `out`.
fn generate_stubs(out: &Path) {
    let status = tool("python3")
        .args(["-m", "grpc_tools.protoc", "-I", &grpc_dir()])
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("--grpc_python_out={}", out.display()))
        .arg("echo.proto")
        .status()
        .expect("run grpc_tools.protoc");
    assert!(
        status.success(),
        "protoc failed (is grpcio-tools installed?)"
    );
}

fn start_server(stubs: &Path) -> GrpcServer {
    start_server_on(stubs, 0)
}

/// A server on `port` (0: a free one).
fn start_server_on(stubs: &Path, port: u16) -> GrpcServer {
    let mut child = tool("python3")
        .arg(format!("{}/server.py", grpc_dir()))
        .arg(stubs)
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the gRPC server");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(p) = line.strip_prefix("PORT ") {
                let _ = tx.send(p.trim().parse::<u16>().ok());
            }
        }
    });
    let port = rx
        .recv_timeout(Duration::from_secs(30))
        .ok()
        .flatten()
        .expect("the gRPC server printed its port");
    GrpcServer { child, port }
}

#[test]
fn grpc_calls_pass_through_with_status_and_trailers() {
    let stubs = tempfile::tempdir().expect("temp dir");
    generate_stubs(stubs.path());
    let server = start_server(stubs.path());
    let gw = Gateway::start(&format!(
        "listen:\n  - {{ip: 127.0.0.1, port: 0, enable_http2: true}}\nroutes:\n  - id: grpc\n    uri: /moongate.test.Echo/*\n    upstream:\n      scheme: grpc\n      timeout: {{connect: 2, send: 1, read: 1}}\n      nodes:\n        \"127.0.0.1:{}\": 1\n",
        server.port
    ));
    let out = tool("python3")
        .arg(format!("{}/client.py", grpc_dir()))
        .arg(stubs.path())
        .arg(gw.addr().to_string())
        .output()
        .expect("run the gRPC client");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed: {text}\n{}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.logs()
    );
    let r: serde_json::Value = serde_json::from_str(&text).expect("client JSON");

    // Unary: the message both ways, the client's metadata and the forwarding headers at the
    // server, its trailing metadata back in the trailers with grpc-status OK.
    assert_eq!(
        r["unary"]["text"],
        "HELLO|x-forwarded-for=127.0.0.1|x-client=c1"
    );
    assert_eq!(r["unary"]["n"], 42);
    assert_eq!(r["unary"]["trailers"]["x-trailer"], "t-hello");
    assert_eq!(r["unary"]["code"], "OK");
    // An error status and message (grpc-status, grpc-message) reach the client.
    assert_eq!(r["fail"]["code"], "NOT_FOUND");
    assert_eq!(r["fail"]["details"], "no such thing: x");
    // Server streaming: every message in order, then the trailers.
    let texts = r["server_stream"]["texts"].as_array().expect("texts");
    assert_eq!(texts.len(), 50);
    assert_eq!(texts[49], "s-49");
    assert_eq!(r["server_stream"]["trailers"]["x-count"], "50");
    assert_eq!(r["server_stream"]["code"], "OK");
    // Client streaming and bidirectional streaming (200 messages of 100 kB each way).
    assert_eq!(r["client_stream"]["n"], 20);
    assert!(r["client_stream"]["text"]
        .as_str()
        .is_some_and(|t| t.starts_with("c0,c1,") && t.ends_with(",c19")));
    assert_eq!(r["bidi"]["count"], 200);
    assert_eq!(r["bidi"]["ok"], true);
    // A call slower than the upstream's send + read timeout: 504 from the gateway, which gRPC
    // clients see as UNAVAILABLE.
    assert_eq!(r["slow"]["code"], "UNAVAILABLE", "{}", r["slow"]);
    assert!(
        gw.wait_for_log("upstream request failed: timeout", Duration::from_secs(5)),
        "{}",
        gw.logs()
    );
    assert!(
        gw.wait_for_log(
            "POST /moongate.test.Echo/Unary 200 route=grpc",
            Duration::from_secs(5)
        ),
        "{}",
        gw.logs()
    );
}

#[test]
fn grpc_upstream_down_is_502() {
    let gw = Gateway::start(&format!(
        "listen:\n  - {{ip: 127.0.0.1, port: 0, enable_http2: true}}\nroutes:\n  - id: grpc\n    uri: /moongate.test.Echo/*\n    upstream:\n      scheme: grpc\n      nodes:\n        \"127.0.0.1:{}\": 1\n",
        closed_port()
    ));
    // curl speaks for the gRPC client here: the answer is a plain 502.
    let out = tool("curl")
        .args([
            "-s",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "content-type: application/grpc",
            "--data-binary",
            "",
            &gw.url("/moongate.test.Echo/Unary"),
        ])
        .output()
        .expect("run curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "502");
}

/// `tests/grpc/calls.py`: a gRPC client process that makes unary calls when asked, on one
/// channel to the gateway.
struct Calls {
    child: Child,
    stdin: ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Calls {
    fn start(stubs: &Path, gw: &Gateway) -> Calls {
        let mut child = tool("python3")
            .arg(format!("{}/calls.py", grpc_dir()))
            .arg(stubs)
            .arg(gw.addr().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the gRPC client");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let ready = lines.recv_timeout(Duration::from_secs(30));
        assert_eq!(ready.as_deref(), Ok("READY"), "the gRPC client started");
        Calls {
            child,
            stdin,
            lines,
        }
    }

    /// Makes `n` calls one after the other: per call the port that served it, or the status
    /// code it failed with.
    fn run(&mut self, n: usize) -> Vec<String> {
        self.start_run(n, 1);
        self.results()
    }

    /// Starts `n` calls from `threads` threads at once; [`Calls::results`] waits for them.
    fn start_run(&mut self, n: usize, threads: usize) {
        writeln!(self.stdin, "{n} {threads}").expect("ask for calls");
    }

    fn results(&mut self) -> Vec<String> {
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(60))
            .expect("the calls' results");
        serde_json::from_str(&line).expect("a JSON list")
    }
}

impl Drop for Calls {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn grpc_gateway(nodes: &str, extra: &str) -> Gateway {
    Gateway::start(&format!(
        "workers: 2\nlisten:\n  - {{ip: 127.0.0.1, port: 0, enable_http2: true}}\nroutes:\n  - id: grpc\n    uri: /moongate.test.Echo/*\n    upstream_id: g1\nupstreams:\n  - id: g1\n    scheme: grpc\n    timeout: {{connect: 2, send: 5, read: 5}}\n    nodes:\n{nodes}{extra}"
    ))
}

#[test]
fn grpc_passive_checks_take_a_killed_node_out_and_active_checks_bring_it_back() {
    let stubs = tempfile::tempdir().expect("temp dir");
    generate_stubs(stubs.path());
    let mut a = start_server(stubs.path());
    let b = start_server(stubs.path());
    let (pa, pb) = (a.port.to_string(), b.port.to_string());
    // Healthy nodes are probed once a minute, so passive checks are what notices the kill;
    // an unhealthy one every second (TCP connects), 2 successes bring it back.
    let gw = grpc_gateway(
        &format!("      - {{host: 127.0.0.1, port: {pa}, weight: 1}}\n      - {{host: 127.0.0.1, port: {pb}, weight: 1}}\n"),
        "    checks:\n      active: {type: tcp, healthy: {interval: 60}, unhealthy: {interval: 1}}\n      passive: {unhealthy: {tcp_failures: 2}}\n",
    );
    let mut calls = Calls::start(stubs.path(), &gw);
    let served = calls.run(20);
    assert!(
        served.contains(&pa) && served.contains(&pb),
        "{served:?}\n{}",
        gw.logs()
    );

    a.kill();
    let down = || {
        gw.log_count(&[
            "upstream node marked unhealthy",
            &format!("node=127.0.0.1:{pa}"),
        ])
    };
    let mut failed = 0;
    for _ in 0..50 {
        failed += calls.run(4).iter().filter(|r| **r != pb).count();
        if down() == 1 {
            break;
        }
    }
    assert_eq!(down(), 1, "{}", gw.logs());
    let line = gw
        .logs()
        .lines()
        .find(|l| l.contains("upstream node marked unhealthy"))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(
        line.contains("upstream=/apisix/upstreams/g1")
            && line.contains("2 TCP failures in a row (passive check; last: "),
        "{line}"
    );
    // Connect failures are retried on the other node. No call was in flight when the node
    // died; the one a worker could have started on its old connection before reading the
    // kernel's close of it is the most that may fail (one per worker).
    assert!(failed <= 2, "{failed} calls failed\n{}", gw.logs());

    // Marked down: not tried any more, every call served by the other node.
    let tried = || gw.log_count(&["upstream connect failed", &format!("node=127.0.0.1:{pa}")]);
    let tried_at_mark = tried();
    let served = calls.run(40);
    assert!(served.iter().all(|r| *r == pb), "{served:?}");
    assert_eq!(tried(), tried_at_mark);

    // Back on the same port: the active checker's probes bring it back and it serves again.
    let _a = start_server_on(stubs.path(), a.port);
    assert!(
        poll_until(Duration::from_secs(20), || gw.log_count(&[
            "upstream node is healthy again",
            &format!("node=127.0.0.1:{pa}")
        ]) == 1),
        "{}",
        gw.logs()
    );
    let served = calls.run(20);
    assert!(
        served.contains(&pa) && served.iter().all(|r| *r == pa || *r == pb),
        "{served:?}"
    );
}

#[test]
fn grpc_calls_in_flight_on_a_killed_node_are_the_most_that_fail() {
    let stubs = tempfile::tempdir().expect("temp dir");
    generate_stubs(stubs.path());
    let mut a = start_server(stubs.path());
    let b = start_server(stubs.path());
    let (pa, pb) = (a.port.to_string(), b.port.to_string());
    let gw = grpc_gateway(
        &format!("      - {{host: 127.0.0.1, port: {pa}, weight: 1}}\n      - {{host: 127.0.0.1, port: {pb}, weight: 1}}\n"),
        "    checks:\n      active: {type: tcp, healthy: {interval: 60}, unhealthy: {interval: 60}}\n      passive: {unhealthy: {tcp_failures: 2}}\n",
    );
    let mut calls = Calls::start(stubs.path(), &gw);
    // Four calls at a time; the node dies once some have been served.
    const THREADS: usize = 4;
    calls.start_run(1500, THREADS);
    let served = || {
        gw.logs()
            .matches("POST /moongate.test.Echo/Unary 200")
            .count()
    };
    assert!(
        poll_until(Duration::from_secs(20), || served() >= 100),
        "{}",
        gw.logs()
    );
    a.kill();
    let results = calls.results();
    let failed = results.iter().filter(|r| **r != pa && **r != pb).count();
    let down = || {
        gw.log_count(&[
            "upstream node marked unhealthy",
            &format!("node=127.0.0.1:{pa}"),
        ])
    };
    // The load went on past the kill: the dead node was tried and taken out.
    assert!(
        poll_until(Duration::from_secs(5), || down() == 1),
        "{}",
        gw.logs()
    );
    println!(
        "gRPC node killed under {THREADS} concurrent callers: {failed} of {} calls failed",
        results.len()
    );
    // At most the calls in flight on it when it died, and one per worker started on its
    // connection before the worker read the close.
    assert!(failed <= THREADS + 2, "{failed} failed: {results:?}");
    let after = calls.run(40);
    assert!(after.iter().all(|r| *r == pb), "{after:?}");
}

/// An HTTP/2 server that answers every stream with `RST_STREAM(reason)`: at once for
/// `REFUSED_STREAM` (a server that does not take the call), after reading the whole request
/// for any other reason (a server that took the call and failed). Counts the streams.
struct ResettingNode {
    port: u16,
    streams: Arc<AtomicU64>,
    _rt: tokio::runtime::Runtime,
}

impl ResettingNode {
    fn start(reason: h2::Reason) -> ResettingNode {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let streams = Arc::new(AtomicU64::new(0));
        let count = streams.clone();
        rt.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(tcp).await else {
                        return;
                    };
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        count.fetch_add(1, Ordering::SeqCst);
                        if reason == h2::Reason::REFUSED_STREAM {
                            respond.send_reset(reason);
                            continue;
                        }
                        tokio::spawn(async move {
                            let mut body = req.into_body();
                            while let Some(Ok(d)) = body.data().await {
                                let _ = body.flow_control().release_capacity(d.len());
                            }
                            respond.send_reset(reason);
                        });
                    }
                });
            }
        });
        ResettingNode {
            port,
            streams,
            _rt: rt,
        }
    }

    fn streams(&self) -> u64 {
        self.streams.load(Ordering::SeqCst)
    }
}

#[test]
fn a_refused_grpc_stream_goes_to_the_next_node_and_a_failed_call_does_not() {
    let stubs = tempfile::tempdir().expect("temp dir");
    generate_stubs(stubs.path());
    let good = start_server(stubs.path());
    let pg = good.port.to_string();
    // The resetting node has the higher priority: every call tries it first.
    let nodes = |bad: u16| {
        format!("      - {{host: 127.0.0.1, port: {bad}, weight: 1, priority: 1}}\n      - {{host: 127.0.0.1, port: {pg}, weight: 1}}\n")
    };

    // With passive checks that take a node out at its first TCP failure: a refusal is not
    // one (the node is busy or restarting), so the refusing node keeps being tried first.
    let refusing = ResettingNode::start(h2::Reason::REFUSED_STREAM);
    let gw = grpc_gateway(
        &nodes(refusing.port),
        "    checks:\n      active: {type: tcp, healthy: {interval: 60}, unhealthy: {interval: 60}}\n      passive: {unhealthy: {tcp_failures: 1}}\n",
    );
    let mut calls = Calls::start(stubs.path(), &gw);
    let served = calls.run(10);
    // The refusing node saw each call, refused it, and the call was answered by the other.
    assert!(served.iter().all(|r| *r == pg), "{served:?}\n{}", gw.logs());
    assert_eq!(refusing.streams(), 10, "{}", gw.logs());
    assert!(gw
        .logs()
        .contains("upstream request failed: HTTP/2 stream refused"));
    assert!(!gw.logs().contains("marked unhealthy"), "{}", gw.logs());
    drop(calls);
    drop(gw);

    // A node that read the call and then failed it: the call may have been processed, so it
    // is not sent again.
    let failing = ResettingNode::start(h2::Reason::INTERNAL_ERROR);
    let gw = grpc_gateway(&nodes(failing.port), "");
    let mut calls = Calls::start(stubs.path(), &gw);
    let served = calls.run(5);
    assert!(
        served.iter().all(|r| r == "UNAVAILABLE"),
        "{served:?}\n{}",
        gw.logs()
    );
    assert_eq!(failing.streams(), 5);
}
