//! An upstream node a test can kill, bring back on the same port, and make answer 500: for
//! health checks and balancers. It answers `200` with its port as the body (so a client sees
//! which node served it), and counts health probes (`User-Agent: moongate-healthcheck`) apart
//! from proxied traffic.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::{full, Body};

/// A killable node on 127.0.0.1.
pub struct Node {
    addr: SocketAddr,
    rt: tokio::runtime::Runtime,
    state: Arc<NodeState>,
    accept: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

#[derive(Default)]
struct NodeState {
    failing: AtomicBool,
    traffic: AtomicU64,
    probes: AtomicU64,
    /// The last probe's path and headers.
    last_probe: Mutex<Option<(String, http::HeaderMap)>>,
    /// Connection tasks, aborted by `kill`.
    conns: Mutex<Vec<tokio::task::AbortHandle>>,
}

fn bind(addr: SocketAddr) -> std::net::TcpListener {
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.set_reuse_address(true).expect("SO_REUSEADDR");
    sock.bind(&addr.into()).expect("bind node");
    sock.listen(128).expect("listen");
    sock.set_nonblocking(true).expect("nonblocking");
    sock.into()
}

impl Node {
    /// A node on a free port, answering 200.
    pub fn start() -> Node {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("test-node")
            .enable_all()
            .build()
            .expect("node runtime");
        let listener = bind("127.0.0.1:0".parse().expect("addr"));
        let addr = listener.local_addr().expect("local addr");
        let node = Node {
            addr,
            rt,
            state: Arc::default(),
            accept: Mutex::new(None),
        };
        node.serve(listener);
        node
    }

    fn serve(&self, listener: std::net::TcpListener) {
        let state = self.state.clone();
        let port = self.addr.port();
        let task = self.rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st = state.clone();
                let conn = tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                        let probe = req
                            .headers()
                            .get(http::header::USER_AGENT)
                            .is_some_and(|v| v.as_bytes() == b"moongate-healthcheck");
                        if probe {
                            *st.last_probe.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some((req.uri().path().to_string(), req.headers().clone()));
                        }
                        let counter = if probe { &st.probes } else { &st.traffic };
                        counter.fetch_add(1, Ordering::SeqCst);
                        let status = if st.failing.load(Ordering::SeqCst) {
                            StatusCode::INTERNAL_SERVER_ERROR
                        } else {
                            StatusCode::OK
                        };
                        let mut res = Response::new(full(port.to_string()));
                        *res.status_mut() = status;
                        async move { Ok::<Response<Body>, Infallible>(res) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                let mut conns = state.conns.lock().unwrap_or_else(|e| e.into_inner());
                conns.retain(|c| !c.is_finished());
                conns.push(conn.abort_handle());
            }
        });
        *self.accept.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
    }

    /// Stops listening and drops every open connection: the port refuses connections.
    pub fn kill(&self) {
        if let Some(t) = self.accept.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
        for c in self
            .state
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            c.abort();
        }
        // The listener closes when the aborted task is dropped: wait until connecting fails.
        let end = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok()
            && Instant::now() < end
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Listens again on the same port.
    pub fn revive(&self) {
        let listener = bind(self.addr);
        self.serve(listener);
    }

    /// Answer 500 (true) or 200 (false) from now on.
    pub fn set_failing(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::SeqCst);
    }

    pub fn node(&self) -> String {
        self.addr.to_string()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Proxied requests received (not health probes).
    pub fn traffic(&self) -> u64 {
        self.state.traffic.load(Ordering::SeqCst)
    }

    /// Health probes received.
    pub fn probes(&self) -> u64 {
        self.state.probes.load(Ordering::SeqCst)
    }

    /// The last health probe's path and headers.
    pub fn last_probe(&self) -> Option<(String, http::HeaderMap)> {
        self.state
            .last_probe
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(t) = self.accept.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
    }
}

/// Polls `f` every 20 ms until it holds or `timeout` passes; whether it held.
pub fn poll_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A blocking keep-alive HTTP/1.1 client for load loops: a failed request is an `Err` (counted
/// by the caller), never a panic, and the next request reconnects.
pub struct LoadClient {
    addr: SocketAddr,
    conn: Option<std::io::BufReader<std::net::TcpStream>>,
}

impl LoadClient {
    pub fn new(addr: SocketAddr) -> LoadClient {
        LoadClient { addr, conn: None }
    }

    /// `GET path`: the status and body, or what went wrong.
    pub fn get(&mut self, path: &str) -> Result<(u16, String), String> {
        self.get_with(path, &[])
    }

    /// `GET path` with more header lines (`("X-User", "u1")`).
    pub fn get_with(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(u16, String), String> {
        let r = self.try_get(path, headers);
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    fn try_get(&mut self, path: &str, headers: &[(&str, &str)]) -> Result<(u16, String), String> {
        use std::io::{BufRead, Read, Write};
        if self.conn.is_none() {
            let s = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
                .map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .map_err(|e| e.to_string())?;
            self.conn = Some(std::io::BufReader::new(s));
        }
        let conn = self.conn.as_mut().ok_or("no connection")?;
        let mut head = format!("GET {path} HTTP/1.1\r\nHost: test\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        conn.get_mut()
            .write_all(head.as_bytes())
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        conn.read_line(&mut line).map_err(|e| e.to_string())?;
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {line:?}"))?;
        let mut len = 0usize;
        let mut close = false;
        loop {
            let mut h = String::new();
            conn.read_line(&mut h).map_err(|e| e.to_string())?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse().map_err(|_| format!("bad length {h:?}"))?;
            }
            if lower == "connection: close" {
                close = true;
            }
        }
        let mut body = vec![0u8; len];
        conn.read_exact(&mut body).map_err(|e| e.to_string())?;
        if close {
            self.conn = None;
        }
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

impl super::Gateway {
    /// The control API's address, from the gateway's `control API listening at http://ADDR`
    /// line (waits up to 20 s for it).
    pub fn control_addr(&self) -> SocketAddr {
        assert!(
            self.wait_for_log("control API listening at http://", Duration::from_secs(20)),
            "no control API line; log:\n{}",
            self.logs()
        );
        self.logs()
            .lines()
            .find_map(|l| {
                let rest = l.split("control API listening at http://").nth(1)?;
                rest.split_whitespace().next()?.parse().ok()
            })
            .expect("control address parses")
    }
}
