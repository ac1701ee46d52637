//! Shared helpers for the integration tests: the real `moongate` binary ([`Gateway`]), upstream
//! HTTP servers on loopback ([`Upstream`]) and a small blocking HTTP client ([`get`],
//! [`request`], [`raw`]).
//!
//! Everything here talks to 127.0.0.1 only. Helpers are blocking so tests stay plain `#[test]`
//! functions; the async work runs on a shared runtime ([`block_on`]).
//!
//! ```ignore
//! mod common;
//! use common::*;
//!
//! let up = Upstream::echo();
//! let gw = Gateway::start(&format!(
//!     "routes:\n  - uri: /hello\n    upstream:\n      nodes:\n        \"{}\": 1\n",
//!     up.node()
//! ));
//! let r = get(&gw.url("/hello?x=1"));
//! assert_eq!(r.status, 200);
//! assert_eq!(r.json()["uri"], "/hello?x=1");
//! ```

#![allow(dead_code)]

pub mod dns;
pub mod ext_runner;
pub mod health;
pub mod lua_libs;
pub mod lua_plugins;
pub mod observability;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener as StdTcpListener, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

/// How long a gateway gets to print its `listening on` line.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound for one client request made by the helpers (tests must never hang).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Runtime
// ---------------------------------------------------------------------------------------------

/// The runtime the client helpers run on, shared by all tests of a binary.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("test-client")
            .enable_all()
            .build()
            .expect("test client runtime")
    })
}

/// Runs a future to completion on the shared test runtime.
pub fn block_on<F: Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

// ---------------------------------------------------------------------------------------------
// The gateway process
// ---------------------------------------------------------------------------------------------

/// Log lines collected from a gateway's stderr, with a condvar so waiters wake on new lines.
#[derive(Default)]
pub struct LogBuf {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
    /// Set when stderr reached EOF (the process ended).
    closed: Mutex<bool>,
}

impl LogBuf {
    /// Collects the lines of `r` (a child's stderr) as they come, on a thread of its own.
    pub fn capture(r: impl Read + Send + 'static) -> Arc<LogBuf> {
        let logs = Arc::new(LogBuf::default());
        let buf = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                match line {
                    Ok(l) => buf.push(l),
                    Err(_) => break,
                }
            }
            buf.close();
        });
        logs
    }

    fn push(&self, line: String) {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line);
        self.changed.notify_all();
    }

    fn close(&self) {
        *self.closed.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.changed.notify_all();
    }

    pub fn text(&self) -> String {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    /// Waits until some line satisfies `f`; returns its result, or None on timeout or EOF.
    pub fn wait_for<T>(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&str) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            while seen < lines.len() {
                if let Some(v) = f(&lines[seen]) {
                    return Some(v);
                }
                seen += 1;
            }
            if *self.closed.lock().unwrap_or_else(|e| e.into_inner()) {
                return None;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            // Bounded wait: re-check EOF and the deadline at least every 100 ms.
            let wait = (deadline - now).min(Duration::from_millis(100));
            lines = self
                .changed
                .wait_timeout(lines, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// A running `moongate run` process on loopback. Dropping it kills the process.
pub struct Gateway {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
    config: PathBuf,
    logs: Arc<LogBuf>,
    /// Kept so the temp dir lives as long as the gateway (None for [`Gateway::start_in`]).
    _tmp: Option<tempfile::TempDir>,
    exit: Option<ExitStatus>,
}

/// Prepends `listen: 127.0.0.1:0` when the config sets no `listen` of its own, and
/// `enable_control: false` when it says nothing about the control API (APISIX's default
/// address, 127.0.0.1:9090, is one port for every gateway), so tests never collide on ports.
fn with_loopback_listen(yaml: &str) -> String {
    let mut out = String::new();
    if !yaml.lines().any(|l| l.starts_with("listen:")) {
        out.push_str("listen: 127.0.0.1:0\n");
    }
    if !yaml
        .lines()
        .any(|l| l.starts_with("control:") || l.starts_with("enable_control:"))
    {
        out.push_str("enable_control: false\n");
    }
    out + yaml
}

impl Gateway {
    /// Writes `yaml` as `config.yaml` in a fresh temp dir and starts the gateway on it.
    /// Without a top-level `listen:` the gateway listens on `127.0.0.1:0` (a free port).
    pub fn start(yaml: &str) -> Gateway {
        let tmp = tempfile::tempdir().expect("temp dir");
        let mut gw = Gateway::start_in(tmp.path(), yaml);
        gw._tmp = Some(tmp);
        gw
    }

    /// Writes `yaml` as `DIR/config.yaml` (a directory the test prepared, e.g. with a
    /// `plugins/` folder) and starts the gateway on it.
    pub fn start_in(dir: &Path, yaml: &str) -> Gateway {
        let config = dir.join("config.yaml");
        std::fs::write(&config, with_loopback_listen(yaml)).expect("write config");
        Gateway::spawn(dir, &config)
    }

    /// Writes each `(name, source)` as `DIR/plugins/NAME.lua`, then `yaml` (with
    /// `plugin_dirs: [plugins]` put first) as `DIR/config.yaml` in a fresh temp dir, and starts
    /// the gateway on it.
    pub fn start_with_plugins(plugins: &[(&str, &str)], yaml: &str) -> Gateway {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("plugins");
        std::fs::create_dir_all(&dir).expect("plugins dir");
        for (name, src) in plugins {
            std::fs::write(dir.join(format!("{name}.lua")), src).expect("write plugin");
        }
        let yaml = format!("plugin_dirs:\n  - plugins\n{yaml}");
        let mut gw = Gateway::start_in(tmp.path(), &yaml);
        gw._tmp = Some(tmp);
        gw
    }

    /// Starts the gateway on an existing config file, as is.
    pub fn start_file(config: &Path) -> Gateway {
        let dir = config.parent().unwrap_or(Path::new(".")).to_path_buf();
        Gateway::spawn(&dir, config)
    }

    fn spawn(dir: &Path, config: &Path) -> Gateway {
        let mut child = Command::new(env!("CARGO_BIN_EXE_moongate"))
            .arg("run")
            .arg("-c")
            .arg(config)
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start moongate");
        let logs = LogBuf::capture(child.stderr.take().expect("piped stderr"));
        let addr = logs.wait_for(START_TIMEOUT, |l| {
            if l.contains("admin") {
                return None;
            }
            let rest = l.split("listening on http://").nth(1)?;
            rest.split_whitespace().next()?.parse::<SocketAddr>().ok()
        });
        let Some(addr) = addr else {
            let _ = child.kill();
            let _ = child.wait();
            // Let the reader thread drain what the process wrote last.
            logs.wait_for(Duration::from_secs(2), |_| None::<()>);
            panic!(
                "moongate did not print `listening on http://` within {START_TIMEOUT:?}; its log:\n{}",
                logs.text()
            );
        };
        Gateway {
            child,
            addr,
            dir: dir.to_path_buf(),
            config: config.to_path_buf(),
            logs,
            _tmp: None,
            exit: None,
        }
    }

    /// The proxy listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The folder holding `config.yaml` (add plugin files or rewrite the config there).
    pub fn config_dir(&self) -> &Path {
        &self.dir
    }

    /// The config file the gateway was started with.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The process id of `moongate run`: the supervisor (signals sent to it reach the
    /// serving process).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process id of the serving process the supervisor runs now (waits up to 10 s for
    /// one, e.g. while it restarts one).
    pub fn serving_pid(&self) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(pid) = child_of(self.pid()) {
                return pid;
            }
            assert!(
                Instant::now() < deadline,
                "no serving process under supervisor {}; log:\n{}",
                self.pid(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Everything the gateway wrote to stderr so far.
    pub fn logs(&self) -> String {
        self.logs.text()
    }

    /// How many of the log's lines contain every one of `needles`.
    pub fn log_count(&self, needles: &[&str]) -> usize {
        self.logs()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }

    /// Waits until a log line contains `needle`; false on timeout or when the process ended
    /// without writing it.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        self.logs
            .wait_for(timeout, |l| l.contains(needle).then_some(()))
            .is_some()
    }

    /// The Admin API listener's address, from the gateway's `admin API listening on` line
    /// (waits up to 20 s for it).
    pub fn admin_addr(&self) -> SocketAddr {
        assert!(
            self.wait_for_log("admin API listening on http://", Duration::from_secs(20)),
            "no admin listener line; log:\n{}",
            self.logs()
        );
        self.logs()
            .lines()
            .find_map(|l| {
                let rest = l.split("admin API listening on http://").nth(1)?;
                rest.split_whitespace().next()?.parse().ok()
            })
            .expect("admin address parses")
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed");
    }

    /// Waits for the process to exit; None if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.exit {
            return Some(s);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exit = Some(status);
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Peak resident memory of the serving process in KiB (`VmHWM` in /proc/PID/status).
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.serving_pid(), "VmHWM:")
    }

    /// Current resident memory of the serving process in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.serving_pid(), "VmRSS:")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A live (not zombie) child process of `parent`, from /proc/*/stat.
fn child_of(parent: u32) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`: comm may hold spaces, so split after its `)`.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let ppid = fields.next().and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) && state != Some("Z") {
            return Some(pid);
        }
    }
    None
}

fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// Runs `moongate check -c FILE` on `yaml` (written to a temp dir); returns the exit code and
/// stdout.
pub fn check(yaml: &str) -> (i32, String) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let file = tmp.path().join("config.yaml");
    std::fs::write(&file, yaml).expect("write config");
    check_file(&file)
}

/// Runs `moongate check -c FILE`; returns the exit code and stdout.
pub fn check_file(file: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_moongate"))
        .arg("check")
        .arg("-c")
        .arg(file)
        .current_dir(file.parent().unwrap_or(Path::new(".")))
        .stdin(Stdio::null())
        .output()
        .expect("run moongate check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

// ---------------------------------------------------------------------------------------------
// Upstream test servers
// ---------------------------------------------------------------------------------------------

/// The body type upstream handlers answer with.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|e| match e {}).boxed()
}

/// A body of `len` bytes of `x`, generated chunk by chunk (never held in memory).
pub fn generated(len: u64) -> Body {
    Generated { remaining: len }.boxed()
}

/// A generated body: `remaining` bytes of `x` in 64 KiB chunks from one static buffer.
struct Generated {
    remaining: u64,
}

static CHUNK: [u8; 64 * 1024] = [b'x'; 64 * 1024];

impl HttpBody for Generated {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(CHUNK.len() as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&CHUNK[..n])))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> + Send + Sync,
>;

/// An HTTP/1.1 server on 127.0.0.1 (a free port), answering with a handler closure. It counts
/// accepted connections (and those still open) and requests; dropping it stops it.
pub struct Upstream {
    addr: SocketAddr,
    connections: Arc<AtomicU64>,
    open: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Upstream {
    /// Serves every request with `handler`.
    pub fn start<F, Fut>(handler: F) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let listener = StdTcpListener::bind("127.0.0.1:0").expect("bind upstream");
        Upstream::start_on(listener, handler)
    }

    /// Serves every request with `handler` on a listener the test bound (another loopback
    /// address, a given port).
    pub fn start_on<F, Fut>(std_listener: StdTcpListener, handler: F) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |req| Box::pin(handler(req)));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("test-upstream")
            .enable_all()
            .build()
            .expect("upstream runtime");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("local addr");
        let connections = Arc::new(AtomicU64::new(0));
        let open = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        {
            let connections = connections.clone();
            let open = open.clone();
            let requests = requests.clone();
            rt.spawn(async move {
                let listener =
                    tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    connections.fetch_add(1, Ordering::SeqCst);
                    open.fetch_add(1, Ordering::SeqCst);
                    let handler = handler.clone();
                    let requests = requests.clone();
                    let open = open.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            requests.fetch_add(1, Ordering::SeqCst);
                            let fut = handler(req);
                            async move { Ok::<_, Infallible>(fut.await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                        open.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            });
        }
        Upstream {
            addr,
            connections,
            open,
            requests,
            rt: Some(rt),
        }
    }

    /// Answers with JSON describing what it received: `method`, `uri` (path and query),
    /// `headers` (lower-case name → value; repeated headers joined with ", "), `body_len`.
    /// The request body is counted, not kept.
    pub fn echo() -> Upstream {
        Upstream::start(|req| async move { echo_response(req).await })
    }

    /// Sleeps `delay`, then answers 200 with the body `slow`.
    pub fn slow(delay: Duration) -> Upstream {
        Upstream::start(move |_req| async move {
            tokio::time::sleep(delay).await;
            Response::new(full("slow"))
        })
    }

    /// Answers every request with a generated body of `len` bytes.
    pub fn streaming(len: u64) -> Upstream {
        Upstream::start(move |_req| async move { Response::new(generated(len)) })
    }

    /// Answers 200 with a fixed text body.
    pub fn text(body: &'static str) -> Upstream {
        Upstream::start(move |_req| async move { Response::new(full(body)) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, as a node key in a config.
    pub fn node(&self) -> String {
        self.addr.to_string()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// Connections open now (accepted and not yet closed by either side).
    pub fn open_connections(&self) -> u64 {
        self.open.load(Ordering::SeqCst)
    }

    /// Requests received so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            // Does not block, so it is safe even if a test drops this inside async code.
            rt.shutdown_background();
        }
    }
}

/// A TCP server on 127.0.0.1 (a free port) that reads each connection's request head and then
/// plays a script: each `(delay, bytes)` is written after sleeping `delay`; then it closes. For
/// upstreams that misbehave in ways an HTTP library will not (a 101 nobody asked for, a body
/// cut off mid-way). Dropping it stops it.
pub struct RawUpstream {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RawUpstream {
    pub fn start(script: Vec<(Duration, &'static [u8])>) -> RawUpstream {
        let std_listener = StdTcpListener::bind("127.0.0.1:0").expect("bind raw upstream");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("local addr");
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        let script = Arc::new(script);
        let task = runtime().spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let script = script.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") && seen.len() < 65536 {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    for (delay, bytes) in script.iter() {
                        tokio::time::sleep(*delay).await;
                        if stream.write_all(bytes).await.is_err() {
                            return;
                        }
                    }
                    let _ = stream.shutdown().await;
                });
            }
        });
        RawUpstream {
            addr,
            requests,
            task,
        }
    }

    /// `127.0.0.1:PORT`, as a node key in a config.
    pub fn node(&self) -> String {
        self.addr.to_string()
    }

    /// Request heads read so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The echo handler's response: a JSON description of `req`.
pub async fn echo_response(req: Request<Incoming>) -> Response<Body> {
    let (parts, mut body) = req.into_parts();
    let mut body_len: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    body_len += d.len() as u64;
                }
            }
            Err(_) => break,
        }
    }
    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        let joined = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(", ");
        headers.insert(name.as_str().to_string(), Value::String(joined));
    }
    let uri = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let out = json!({
        "method": parts.method.as_str(),
        "uri": uri,
        "headers": headers,
        "body_len": body_len,
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(full(out.to_string()))
        .expect("echo response")
}

/// A loopback port with nothing listening on it (bound once, then released).
pub fn closed_port() -> u16 {
    let l = StdTcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("local addr").port();
    drop(l);
    port
}

// ---------------------------------------------------------------------------------------------
// The test client
// ---------------------------------------------------------------------------------------------

/// A response read in full.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics with the body when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    /// A header's value as text, if present.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }
}

/// One Admin API call, as `curl -H 'X-API-KEY: KEY' -X METHOD -d BODY
/// http://ADDR/apisix/admin/PATH` sends it (a body goes out as `application/json`).
pub fn admin_request(
    addr: impl std::fmt::Display,
    key: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Resp {
    let mut req =
        Req::new(method, &format!("http://{addr}/apisix/admin{path}")).header("X-API-KEY", key);
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    req.send()
}

/// A request to send with [`Req::send`]: `Req::get(url).header("host", "a.com").send()`.
pub struct Req {
    method: Method,
    url: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Option<Body>,
}

impl Req {
    pub fn new(method: &str, url: &str) -> Req {
        Req {
            method: Method::from_bytes(method.as_bytes()).expect("method"),
            url: url.to_string(),
            headers: Vec::new(),
            body: None,
        }
    }

    pub fn get(url: &str) -> Req {
        Req::new("GET", url)
    }

    pub fn post(url: &str) -> Req {
        Req::new("POST", url)
    }

    pub fn header(mut self, name: &str, value: &str) -> Req {
        self.headers.push((
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(value).expect("header value"),
        ));
        self
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Req {
        self.body = Some(full(body));
        self
    }

    /// A streamed body (e.g. [`generated`]).
    pub fn body_stream(mut self, body: Body) -> Req {
        self.body = Some(body);
        self
    }

    /// Sends on a fresh connection and reads the whole response.
    pub fn send(self) -> Resp {
        let (status, headers, mut body) = self.send_head();
        let body = block_on(async {
            tokio::time::timeout(REQUEST_TIMEOUT, async {
                let mut buf = Vec::new();
                while let Some(f) = body.frame().await {
                    if let Some(d) = f.expect("response body").data_ref() {
                        buf.extend_from_slice(d);
                    }
                }
                buf
            })
            .await
            .expect("response body timed out")
        });
        Resp {
            status,
            headers,
            body: Bytes::from(body),
        }
    }

    /// Sends and counts the response body's bytes without keeping them (for huge bodies).
    pub fn send_counting(self) -> (u16, u64) {
        let (status, _headers, mut body) = self.send_head();
        let n = block_on(async {
            tokio::time::timeout(REQUEST_TIMEOUT, async {
                let mut n = 0u64;
                while let Some(f) = body.frame().await {
                    if let Some(d) = f.expect("response body").data_ref() {
                        n += d.len() as u64;
                    }
                }
                n
            })
            .await
            .expect("response body timed out")
        });
        (status, n)
    }

    fn send_head(self) -> (u16, HeaderMap, Incoming) {
        let uri: http::Uri = self.url.parse().expect("url");
        let authority = uri.authority().expect("url has host:port").clone();
        let path = uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let mut builder = Request::builder().method(self.method).uri(path);
        let has_host = self.headers.iter().any(|(n, _)| n == http::header::HOST);
        if !has_host {
            builder = builder.header(http::header::HOST, authority.as_str());
        }
        for (n, v) in self.headers {
            builder = builder.header(n, v);
        }
        let req = builder
            .body(self.body.unwrap_or_else(empty))
            .expect("request");
        block_on(async move {
            tokio::time::timeout(REQUEST_TIMEOUT, async move {
                let stream = tokio::net::TcpStream::connect(authority.as_str())
                    .await
                    .expect("connect to gateway");
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .expect("handshake");
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                let resp = sender.send_request(req).await.expect("send request");
                let (parts, body) = resp.into_parts();
                (parts.status.as_u16(), parts.headers, body)
            })
            .await
            .expect("request timed out")
        })
    }
}

/// `GET url`.
pub fn get(url: &str) -> Resp {
    Req::get(url).send()
}

/// `GET url` with a `Host` header.
pub fn get_host(url: &str, host: &str) -> Resp {
    Req::get(url).header("host", host).send()
}

/// Sends `method url`.
pub fn request(method: &str, url: &str) -> Resp {
    Req::new(method, url).send()
}

/// Writes `bytes` on a new connection to `addr` and returns everything read until the peer
/// closes or nothing arrives for 5 s. For requests a normal client cannot make.
pub fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = StdTcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    // The peer may answer and close before the whole request is written (431, 413).
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of a raw HTTP/1.1 response text (0 when there is none).
pub fn raw_status(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A raw HTTP/1.1 response text split into status, head and body (the body as sent: a
/// chunked one keeps its framing).
pub struct RawResp {
    pub status: u16,
    /// The status line and header lines.
    pub head: String,
    pub body: String,
}

impl RawResp {
    pub fn parse(text: &str) -> RawResp {
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
        RawResp {
            status: raw_status(head),
            head: head.to_string(),
            body: body.to_string(),
        }
    }

    /// A header's value (the first of that name, case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// The body parsed as JSON; panics with the response when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}\n\n{}", self.head, self.body))
    }
}

/// [`raw`], parsed.
pub fn raw_resp(addr: SocketAddr, bytes: &[u8]) -> RawResp {
    RawResp::parse(&raw(addr, bytes))
}

/// A keep-alive connection for tests that send several requests on one socket.
pub struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Body>,
    host: String,
}

impl Conn {
    /// Opens a connection to `addr`.
    pub fn open(addr: SocketAddr) -> Conn {
        let sender = block_on(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake");
            tokio::spawn(async move {
                let _ = conn.await;
            });
            sender
        });
        Conn {
            sender,
            host: addr.to_string(),
        }
    }

    /// Sends `GET path` on this connection; None when the connection was closed.
    pub fn get(&mut self, path: &str) -> Option<Resp> {
        let req = Request::get(path)
            .header(http::header::HOST, self.host.as_str())
            .body(empty())
            .expect("request");
        let sender = &mut self.sender;
        block_on(async move {
            tokio::time::timeout(REQUEST_TIMEOUT, async move {
                sender.ready().await.ok()?;
                let resp = sender.send_request(req).await.ok()?;
                let (parts, body) = resp.into_parts();
                let body = body.collect().await.ok()?.to_bytes();
                Some(Resp {
                    status: parts.status.as_u16(),
                    headers: parts.headers,
                    body,
                })
            })
            .await
            .ok()
            .flatten()
        })
    }
}

/// Whether a TCP connection to `addr` is accepted now.
pub fn accepts_connections(addr: SocketAddr) -> bool {
    StdTcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
}

/// A status code's number, for readable asserts: `assert_eq!(r.status, code(StatusCode::OK))`.
pub fn code(s: StatusCode) -> u16 {
    s.as_u16()
}

/// A command for an external tool a test needs (curl, nghttp, h2load, python3, ...). Panics,
/// failing the test, when the tool is not installed: `.ci/run` installs them.
pub fn tool(name: &str) -> Command {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(found, "`{name}` is not installed (.ci/run installs it)");
    Command::new(name)
}
pub mod websocket;
