//! What `openfunction` adds over calling the function directly: latency per request (criterion)
//! and the gateway's CPU time per request (from /proc), with the plugin's keep-alive on and off.
//!
//! Everything runs on loopback: a hyper function server in this process (answering
//! `Hello, <last segment>!` like `examples/function_sample.rs`), the release `moongate` binary with
//! one worker, and a blocking HTTP/1.1 client that keeps its connection to the gateway open.
//!
//! Run: `cargo bench --bench openfunction -- --warm-up-time 1 --measurement-time 5`
//!
//! Cases:
//! - `direct/keepalive`: the client calls the function on one kept-open connection.
//! - `direct/new-connection`: the client opens a connection to the function per call.
//! - `openfunction/keepalive`: through moongate, plugin `keepalive: true` (the default).
//! - `openfunction/no-keepalive`: through moongate, plugin `keepalive: false`.

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http_body_util::Full;
use hyper_util::rt::TokioIo;

/// The function: a hyper server on a 1-thread runtime of its own.
fn start_function() -> (SocketAddr, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("function runtime");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind function");
    let addr = listener.local_addr().expect("function addr");
    rt.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let name = req
                            .uri()
                            .path()
                            .rsplit('/')
                            .find(|s| !s.is_empty())
                            .unwrap_or("");
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(format!(
                            "Hello, {name}!\n"
                        )))))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, rt)
}

struct Gateway {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_gateway(function: SocketAddr) -> Gateway {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config.yaml");
    let yaml = format!(
        "listen: 127.0.0.1:0\nworkers: 1\naccess_log: false\nlog_level: warn\nroutes:\n\
         \x20 - id: ka\n    uri: /ka/*\n    plugins:\n      openfunction:\n        function_uri: http://{function}/default/function-sample\n\
         \x20 - id: noka\n    uri: /noka/*\n    plugins:\n      openfunction:\n        function_uri: http://{function}/default/function-sample\n        keepalive: false\n"
    );
    std::fs::write(&path, yaml).expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_moongate"))
        .args(["run", "-c"])
        .arg(&path)
        // The listening line is an INFO line; everything after it is quiet (warn).
        .env("RUST_LOG", "moongate=info,moongate::access=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start moongate");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line
                .split("listening on http://")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|a| a.parse::<SocketAddr>().ok())
            {
                let _ = tx.send(addr);
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("moongate prints its listening address");
    Gateway {
        child,
        addr,
        _dir: dir,
    }
}

/// A kept-open HTTP/1.1 connection reading Content-Length framed responses.
struct Client {
    addr: SocketAddr,
    reader: Option<BufReader<TcpStream>>,
    line: String,
    body: Vec<u8>,
}

impl Client {
    fn new(addr: SocketAddr) -> Client {
        Client {
            addr,
            reader: None,
            line: String::new(),
            body: Vec::new(),
        }
    }

    /// One GET; `reuse: false` opens a new connection for it.
    fn get(&mut self, path: &str, reuse: bool) {
        if !reuse || self.reader.is_none() {
            let s = TcpStream::connect(self.addr).expect("connect");
            let _ = s.set_nodelay(true);
            self.reader = Some(BufReader::new(s));
        }
        let r = self.reader.as_mut().expect("connected");
        let req = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n");
        r.get_mut().write_all(req.as_bytes()).expect("write");
        let mut len = 0usize;
        let mut status_ok = false;
        loop {
            self.line.clear();
            r.read_line(&mut self.line).expect("read head");
            let l = self.line.trim_end();
            if l.is_empty() {
                break;
            }
            if l.starts_with("HTTP/1.1 ") {
                status_ok = l.starts_with("HTTP/1.1 200");
            } else if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().expect("content-length");
                }
            }
        }
        assert!(status_ok, "the call must succeed");
        self.body.resize(len, 0);
        r.read_exact(&mut self.body).expect("read body");
    }
}

/// user + system CPU time of a process, from /proc (clock ticks of 10 ms).
fn cpu_time(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the `(comm)`, which may contain spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the comm.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

fn bench(c: &mut Criterion) {
    let (function, _rt) = start_function();
    let gw = start_gateway(function);
    let pid = gw.child.id();
    let mut g = c.benchmark_group("openfunction");

    let mut direct = Client::new(function);
    g.bench_function("direct/keepalive", |b| {
        b.iter(|| direct.get("/default/function-sample/bench", true))
    });
    let mut direct_new = Client::new(function);
    g.bench_function("direct/new-connection", |b| {
        b.iter(|| direct_new.get("/default/function-sample/bench", false))
    });

    let mut cpu_report = Vec::new();
    for (name, path) in [
        ("openfunction/keepalive", "/ka/bench"),
        ("openfunction/no-keepalive", "/noka/bench"),
    ] {
        let mut client = Client::new(gw.addr);
        let (mut cpu, mut calls) = (Duration::ZERO, 0u64);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let before = cpu_time(pid);
                let start = Instant::now();
                for _ in 0..iters {
                    client.get(path, true);
                }
                let took = start.elapsed();
                cpu += cpu_time(pid).saturating_sub(before);
                calls += iters;
                took
            })
        });
        cpu_report.push((name, cpu, calls));
    }
    g.finish();
    for (name, cpu, calls) in cpu_report {
        if calls > 0 {
            println!(
                "{name}: moongate CPU {:.1} µs per request ({calls} requests, {} ms CPU)",
                cpu.as_secs_f64() * 1e6 / calls as f64,
                cpu.as_millis()
            );
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
