//! The `openfunction` plugin end to end: the real `moongate` binary on loopback, answering routes
//! with function servers this file starts (hyper on 127.0.0.1, port 0). The cases of APISIX's
//! `t/plugin/openfunction.t` come first, then what the reference adds (path join, query,
//! headers, body limit, errors, HEAD, keep-alive, TLS, later phases).

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Function servers
// ---------------------------------------------------------------------------------------------

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("test runtime")
    })
}

/// One request as a function server received it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    /// The request target exactly as sent (path and query).
    target: String,
    headers: HeaderMap,
    body: Bytes,
    /// Which accepted connection it came on (1, 2, ...).
    conn: usize,
}

/// What a function answers.
#[derive(Clone, Default)]
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    /// Wait before sending the response head.
    delay: Duration,
    /// Send the body in chunked encoding, this long after the head.
    chunk_delay: Option<Duration>,
}

impl Reply {
    fn ok(body: impl Into<String>) -> Reply {
        Reply {
            status: 200,
            body: body.into(),
            ..Reply::default()
        }
    }
}

type Handler = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

/// A function server: every request is recorded, every accepted connection counted.
struct FnServer {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    /// Connections the gateway has closed (or that failed).
    closed: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

type RespBody = BoxBody<Bytes, Infallible>;

async fn answer(
    req: Request<Incoming>,
    conn: usize,
    handler: Handler,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Response<RespBody> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let s = Seen {
        method: parts.method.to_string(),
        target: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default(),
        headers: parts.headers,
        body,
        conn,
    };
    let reply = handler(&s);
    seen.lock().expect("seen lock").push(s);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let body: RespBody = match reply.chunk_delay {
        None => Full::new(Bytes::from(reply.body)).boxed(),
        Some(wait) => {
            let data = Bytes::from(reply.body);
            let stream = futures_util::stream::unfold(Some(data), move |state| async move {
                let data = state?;
                tokio::time::sleep(wait).await;
                Some((Ok::<_, Infallible>(Frame::data(data)), None))
            });
            StreamBody::new(stream).boxed()
        }
    };
    let mut res = Response::new(body);
    *res.status_mut() = http::StatusCode::from_u16(reply.status).expect("status");
    for (k, v) in reply.headers {
        res.headers_mut()
            .append(k, v.parse().expect("header value"));
    }
    res
}

impl FnServer {
    fn start(handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> FnServer {
        FnServer::start_with(Arc::new(handler), None)
    }

    fn start_with(handler: Handler, tls: Option<tokio_rustls::TlsAcceptor>) -> FnServer {
        let listener = rt()
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind function server");
        let addr = listener.local_addr().expect("local addr");
        let conns = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(AtomicUsize::new(0));
        let (c, s, done) = (conns.clone(), seen.clone(), closed.clone());
        let task = rt().spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let conn = c.fetch_add(1, Ordering::SeqCst) + 1;
                let (handler, seen, tls, done) =
                    (handler.clone(), s.clone(), tls.clone(), done.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (handler, seen) = (handler.clone(), seen.clone());
                        async move { Ok::<_, Infallible>(answer(req, conn, handler, seen).await) }
                    });
                    let builder = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                        }
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                            }
                        }
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        FnServer {
            addr,
            conns,
            closed,
            seen,
            task,
        }
    }

    /// OpenFunction CI's `test-header`: answers the Authorization values as Go prints a slice.
    fn header_echo() -> FnServer {
        FnServer::start(|s| {
            let values: Vec<&str> = s
                .headers
                .get_all("authorization")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            Reply::ok(format!("[{}]", values.join(" ")))
        })
    }

    /// OpenFunction CI's `test-uri`: `Hello, <path>!` for a one-segment path, else Go's 404.
    fn uri_echo() -> FnServer {
        FnServer::start(|s| {
            let path = s.target.split('?').next().unwrap_or("");
            let greeting = path.strip_prefix('/').unwrap_or(path);
            if greeting.is_empty() || greeting.contains('/') {
                Reply {
                    status: 404,
                    headers: vec![
                        ("content-type", "text/plain; charset=utf-8".into()),
                        ("x-content-type-options", "nosniff".into()),
                    ],
                    body: "404 page not found\n".into(),
                    ..Reply::default()
                }
            } else {
                Reply::ok(format!("Hello, {greeting}!\n"))
            }
        })
    }

    /// OpenFunction CI's `test-body`: `Hello, <request body>!`.
    fn body_echo() -> FnServer {
        FnServer::start(|s| Reply::ok(format!("Hello, {}!\n", String::from_utf8_lossy(&s.body))))
    }

    /// Answers `ok` and records the request.
    fn recorder() -> FnServer {
        FnServer::start(|_| Reply::ok("ok"))
    }

    fn uri(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn connections(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen lock").clone()
    }

    fn last(&self) -> Seen {
        self.requests()
            .pop()
            .expect("the function received a request")
    }
}

impl Drop for FnServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A port on 127.0.0.1 that nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

// ---------------------------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------------------------

struct Gateway {
    child: Child,
    addr: SocketAddr,
    logs: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

/// A config serving `routes` (JSON, which is YAML) on a free loopback port with one worker, so
/// every request meets the same connection pool.
/// Routes without an `id` get their position (from 1).
fn config(routes: &Value) -> String {
    let mut routes = routes.clone();
    if let Some(list) = routes.as_array_mut() {
        for (i, r) in list.iter_mut().enumerate() {
            if r.get("id").is_none() {
                r["id"] = json!((i + 1).to_string());
            }
        }
    }
    format!("listen: 127.0.0.1:0\nworkers: 1\nroutes: {routes}\n")
}

impl Gateway {
    fn start(routes: Value) -> Gateway {
        Gateway::start_yaml(&config(&routes))
    }

    fn start_yaml(yaml: &str) -> Gateway {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, yaml).expect("write config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_moongate"))
            .args(["run", "-c"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start moongate");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let l = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    if let Some(addr) = rest
                        .split_whitespace()
                        .next()
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                    {
                        let _ = tx.send(addr);
                    }
                }
                let mut logs = l.lock().expect("log lock");
                logs.push_str(&line);
                logs.push('\n');
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => Gateway {
                child,
                addr,
                logs,
                _dir: dir,
            },
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "moongate did not start; log:\n{}",
                    logs.lock().expect("log lock")
                );
            }
        }
    }

    fn logs(&self) -> String {
        self.logs.lock().expect("log lock").clone()
    }

    /// Waits (bounded) for a log line containing `needle`.
    fn has_log(&self, needle: &str) -> bool {
        for _ in 0..100 {
            if self.logs().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn get(&self, path: &str) -> Resp {
        send(self.addr, "GET", path, &[], None)
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Resp {
        send(self.addr, method, path, headers, body)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `moongate check` on a config with `routes`: (exit code, stdout).
fn check(routes: Value) -> (i32, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, config(&routes)).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_moongate"))
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .expect("run moongate check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The check error for one openfunction conf on route 0.
fn check_error(conf: Value) -> String {
    let (code, out) = check(json!([{"uri": "/hello", "plugins": {"openfunction": conf}}]));
    assert_eq!(code, 1, "the config should be refused: {out}");
    out.trim().to_string()
}

fn schema_error(msg: &str) -> String {
    format!("routes[0].plugins.openfunction: failed to check the configuration of plugin openfunction err: {msg}")
}

// ---------------------------------------------------------------------------------------------
// A small HTTP/1.1 client that shows the response as it was on the wire
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Resp {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: gw.test\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    send_raw(addr, &bytes, method == "HEAD")
}

/// Sends `raw` on a new connection and reads one response, framed by its headers (so a response
/// without `Connection: close` is read exactly).
fn send_raw(addr: SocketAddr, raw: &[u8], head: bool) -> Resp {
    let mut stream = TcpStream::connect(addr).expect("connect to moongate");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    stream.write_all(raw).expect("send request");
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        r.read_line(&mut l).expect("header line");
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').expect("header");
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut resp = Resp {
        status,
        headers,
        body: Vec::new(),
    };
    if head || status == 204 || status == 304 {
        return resp;
    }
    if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).expect("chunk size");
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .expect("chunk size");
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).expect("chunk");
            if n == 0 {
                break;
            }
            resp.body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = resp
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        resp.body = vec![0; n];
        r.read_exact(&mut resp.body).expect("body");
    } else {
        let _ = r.read_to_end(&mut resp.body);
    }
    resp
}

fn openfunction(conf: Value) -> Value {
    json!({"openfunction": conf})
}

// ---------------------------------------------------------------------------------------------
// t/plugin/openfunction.t
// ---------------------------------------------------------------------------------------------

/// TEST 1-3: the schema.
#[test]
fn apisix_schema_cases() {
    let (code, out) = check(
        json!([{"uri": "/hello", "plugins": openfunction(json!({"function_uri": "http://127.0.0.1:30585/default/test-body"}))}]),
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        check_error(json!({"timeout": 60000})),
        schema_error("property \"function_uri\" is required")
    );
    assert_eq!(
        check_error(json!({"function_uri": 30858})),
        schema_error(
            "property \"function_uri\" validation failed: wrong type: expected string, got number"
        )
    );
}

/// TEST 4-15: the function servers of APISIX's CI, one route per case.
#[test]
fn apisix_request_cases() {
    let uri = FnServer::uri_echo();
    let body = FnServer::body_echo();
    let header = FnServer::header_echo();
    let empty_upstream = json!({"nodes": {}, "type": "roundrobin"});
    let gw = Gateway::start(json!([
        {"uri": "/t4", "upstream": empty_upstream, "plugins": openfunction(json!({"function_uri": uri.uri("/function-sample")}))},
        {"uri": "/t6", "plugins": openfunction(json!({"function_uri": body.uri("/default/test-body")}))},
        {"uri": "/t8", "plugins": openfunction(json!({"function_uri": header.uri("/"), "authorization": {"service_token": "test:test"}}))},
        {"uri": "/t10", "plugins": openfunction(json!({"function_uri": header.uri("/")}))},
        {"uri": "/t12", "plugins": openfunction(json!({"function_uri": uri.uri("/default/non-existent")}))},
        {"uri": "/hello/*", "plugins": openfunction(json!({"function_uri": format!("http://{}", uri.addr)}))},
    ]));

    // TEST 5
    let r = gw.get("/t4");
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "Hello, function-sample!\n")
    );
    let seen = uri.last();
    assert_eq!(
        (seen.method.as_str(), seen.target.as_str()),
        ("GET", "/function-sample")
    );

    // TEST 7
    let r = gw.send("POST", "/t6", &[], Some(b"test"));
    assert_eq!((r.status, r.text().as_str()), (200, "Hello, test!\n"));

    // TEST 9
    let r = gw.send("POST", "/t8", &[], None);
    assert_eq!((r.status, r.text().as_str()), (200, "[Basic dGVzdDp0ZXN0]"));

    // TEST 11
    let r = gw.send("POST", "/t10", &[("authorization", "user-token-xxx")], None);
    assert_eq!((r.status, r.text().as_str()), (200, "[user-token-xxx]"));

    // TEST 13: the function's 404 goes to the client as it is.
    let r = gw.send(
        "POST",
        "/t12",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        Some(b"test"),
    );
    assert_eq!(r.status, 404);
    assert!(r.text().contains("not found"), "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert!(gw.has_log("openfunction exits with http status code 404"));

    // TEST 15
    let r = gw.get("/hello/openfunction");
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "Hello, openfunction!\n")
    );
    assert_eq!(uri.last().target, "/openfunction");
}

// ---------------------------------------------------------------------------------------------
// Schema beyond openfunction.t
// ---------------------------------------------------------------------------------------------

#[test]
fn schema_limits_and_types() {
    let with = |extra: Value| {
        let mut conf = json!({"function_uri": "http://127.0.0.1:1/fn"});
        for (k, v) in extra.as_object().expect("object") {
            conf[k] = v.clone();
        }
        conf
    };
    let cases = [
        (json!({"timeout": 99}), "property \"timeout\" validation failed: expected 99 to be at least 100"),
        (json!({"keepalive_timeout": 999}), "property \"keepalive_timeout\" validation failed: expected 999 to be at least 1000"),
        (json!({"keepalive_pool": 0}), "property \"keepalive_pool\" validation failed: expected 0 to be at least 1"),
        (json!({"max_req_body_size": 0}), "property \"max_req_body_size\" validation failed: expected 0 to be at least 1"),
        (json!({"timeout": 1.5}), "property \"timeout\" validation failed: wrong type: expected integer, got number"),
        (json!({"ssl_verify": "yes"}), "property \"ssl_verify\" validation failed: wrong type: expected boolean, got string"),
        (json!({"keepalive": 1}), "property \"keepalive\" validation failed: wrong type: expected boolean, got number"),
        (json!({"authorization": "test:test"}), "property \"authorization\" validation failed: wrong type: expected object, got string"),
        (
            json!({"authorization": {"service_token": 1}}),
            "property \"authorization\" validation failed: property \"service_token\" validation failed: wrong type: expected string, got number",
        ),
    ];
    for (extra, msg) in cases {
        assert_eq!(check_error(with(extra)), schema_error(msg));
    }
    // Unknown keys and a token are accepted, as in APISIX.
    let (code, out) = check(
        json!([{"uri": "/hello", "plugins": openfunction(with(json!({"x-unknown": 1, "authorization": {"service_token": "a:b"}})))}]),
    );
    assert_eq!(code, 0, "{out}");
}

#[test]
fn bad_function_uris_are_refused_at_config_time() {
    for (uri, why) in [
        ("abc", "expected http://host[:port][/path] or https://..."),
        ("ftp://127.0.0.1/fn", "only http and https are supported"),
        (
            "http://user:pass@127.0.0.1/fn",
            "user info is not supported; use authorization.service_token",
        ),
        (
            "http://127.0.0.1:0/fn",
            "the port must be a number from 1 to 65535",
        ),
    ] {
        assert_eq!(
            check_error(json!({"function_uri": uri})),
            schema_error(&format!(
                "property \"function_uri\" validation failed: bad uri \"{uri}\": {why}"
            ))
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The request the function receives
// ---------------------------------------------------------------------------------------------

#[test]
fn path_join_follows_apisix() {
    let f = FnServer::recorder();
    let gw = Gateway::start(json!([
        {"uri": "/azure/*", "plugins": openfunction(json!({"function_uri": f.uri("/api")}))},
        {"uri": "/slash/*", "plugins": openfunction(json!({"function_uri": f.uri("/api/")}))},
        {"uri": "/exact", "plugins": openfunction(json!({"function_uri": f.uri("/fn")}))},
        {"uri": "/root", "plugins": openfunction(json!({"function_uri": format!("http://{}", f.addr)}))},
        {"uri": "/named/*rest", "plugins": openfunction(json!({"function_uri": f.uri("/named-fn")}))},
        {"uri": "/enc/*", "plugins": openfunction(json!({"function_uri": f.uri("/fn")}))},
    ]));
    for (request, forwarded) in [
        ("/azure/http/trigger", "/api/http/trigger"),
        ("/azure///http////trigger", "/api/http/trigger"),
        ("/azure/", "/api/"),
        ("/slash/x", "/api/x"),
        ("/exact", "/fn"),
        ("/root", "/"),
        ("/named/a/b", "/named-fn"),
        ("/enc/%41bc%2Fd", "/fn/Abc/d"),
        // The decoded tail is escaped again where a path needs it (APISIX answers 503 here).
        ("/enc/a%20b", "/fn/a%20b"),
    ] {
        let r = gw.get(request);
        assert_eq!(r.status, 200, "{request}");
        assert_eq!(f.last().target, forwarded, "{request}");
    }
}

#[test]
fn query_is_the_clients_own() {
    let f = FnServer::recorder();
    let gw = Gateway::start(json!([
        {"uri": "/q", "plugins": openfunction(json!({"function_uri": f.uri("/fn?fixed=1")}))},
    ]));
    gw.get("/q?b=2&a=1&a=3&flag&e=&s=x+y&t=%2F");
    assert_eq!(f.last().target, "/fn?b=2&a=1&a=3&flag&e=&s=x+y&t=%2F");
    gw.get("/q");
    assert_eq!(
        f.last().target,
        "/fn",
        "the function_uri's own query is dropped and no bare ? is sent"
    );
}

#[test]
fn headers_and_bodies_forwarded() {
    let f = FnServer::recorder();
    let gw = Gateway::start(json!([
        {"uri": "/h", "plugins": openfunction(json!({"function_uri": f.uri("/fn")}))},
        {"uri": "/LocalHost", "plugins": openfunction(json!({"function_uri": format!("http://LocalHost:{}/fn", f.addr.port())}))},
    ]));
    gw.send(
        "GET",
        "/h",
        &[
            ("X-Custom", "1"),
            ("X-Dup", "a"),
            ("X-Dup", "b"),
            ("User-Agent", "test-agent"),
            ("Connection", "keep-alive, X-Conn-Only"),
            ("X-Conn-Only", "1"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
        ],
        None,
    );
    let s = f.last();
    assert_eq!(
        s.headers["host"], "127.0.0.1",
        "Host is the function's host, without port"
    );
    assert_eq!(s.headers["x-custom"], "1");
    assert_eq!(
        s.headers.get_all("x-dup").iter().collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(s.headers["user-agent"], "test-agent");
    for hop in ["x-conn-only", "keep-alive", "te"] {
        assert!(
            !s.headers.contains_key(hop),
            "{hop} must not reach the function"
        );
    }
    assert!(
        !s.headers.contains_key("content-length"),
        "GET without a body has no Content-Length"
    );
    assert!(
        !s.headers.contains_key("x-forwarded-for"),
        "no X-Forwarded-* is added, as in APISIX"
    );

    gw.get("/LocalHost");
    assert_eq!(
        f.last().headers["host"],
        "localhost",
        "a host name is lower-cased"
    );

    gw.send("POST", "/h", &[], Some(b"abc"));
    let s = f.last();
    assert_eq!((s.method.as_str(), &s.body[..]), ("POST", &b"abc"[..]));
    assert_eq!(s.headers["content-length"], "3");

    gw.send("PUT", "/h", &[], None);
    assert_eq!(
        f.last().headers["content-length"],
        "0",
        "PUT without a body sends Content-Length: 0"
    );
    gw.send("DELETE", "/h", &[], None);
    let s = f.last();
    assert_eq!(s.method, "DELETE");
    assert!(!s.headers.contains_key("content-length"));

    // A chunked upload reaches the function de-chunked, with its length.
    let r = send_raw(
        gw.addr,
        b"POST /h HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n",
        false,
    );
    assert_eq!(r.status, 200);
    let s = f.last();
    assert_eq!(&s.body[..], b"hello world");
    assert_eq!(s.headers["content-length"], "11");
    assert!(!s.headers.contains_key("transfer-encoding"));
}

#[test]
fn service_token_replaces_the_clients_authorization() {
    let header = FnServer::header_echo();
    let gw = Gateway::start(json!([
        {"uri": "/token", "plugins": openfunction(json!({"function_uri": header.uri("/"), "authorization": {"service_token": "test:test"}}))},
        {"uri": "/plain", "plugins": openfunction(json!({"function_uri": header.uri("/")}))},
    ]));
    let r = gw.send(
        "GET",
        "/token",
        &[("Authorization", "x"), ("Authorization", "y")],
        None,
    );
    assert_eq!(r.text(), "[Basic dGVzdDp0ZXN0]");
    let r = gw.send(
        "GET",
        "/plain",
        &[("Authorization", "a"), ("Authorization", "b")],
        None,
    );
    assert_eq!(r.text(), "[a b]");
    assert_eq!(gw.get("/plain").text(), "[]");
}

#[test]
fn body_over_max_req_body_size_is_400() {
    let body = FnServer::body_echo();
    let gw = Gateway::start(json!([
        {"uri": "/small", "plugins": openfunction(json!({"function_uri": body.uri("/"), "max_req_body_size": 10}))},
    ]));
    let r = gw.send("POST", "/small", &[], Some(b"0123456789"));
    assert_eq!((r.status, r.text().as_str()), (200, "Hello, 0123456789!\n"));

    let r = gw.send("POST", "/small", &[], Some(b"0123456789x"));
    assert_eq!(r.status, 400);
    assert!(r.body.is_empty());
    assert!(gw.has_log("error while reading request body: request size 11 is greater than the maximum size 10 allowed"), "{}", gw.logs());

    // Without a Content-Length the limit is found while reading.
    let r = send_raw(
        gw.addr,
        b"POST /small HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n01234567\r\n8\r\n89abcdef\r\n0\r\n\r\n",
        false,
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        body.requests().len(),
        1,
        "a refused body never reaches the function"
    );
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[test]
fn unreachable_or_slow_function_is_503() {
    let slow = FnServer::start(|_| Reply {
        delay: Duration::from_secs(3),
        ..Reply::ok("late")
    });
    let stalls = FnServer::start(|_| Reply {
        chunk_delay: Some(Duration::from_secs(3)),
        ..Reply::ok("late body")
    });
    let gw = Gateway::start(json!([
        {"uri": "/refused", "plugins": openfunction(json!({"function_uri": format!("http://127.0.0.1:{}/fn", closed_port())}))},
        {"uri": "/slow", "plugins": openfunction(json!({"function_uri": slow.uri("/fn"), "timeout": 200}))},
        {"uri": "/stalls", "plugins": openfunction(json!({"function_uri": stalls.uri("/fn"), "timeout": 200}))},
    ]));
    let r = gw.get("/refused");
    assert_eq!(r.status, 503);
    assert!(r.body.is_empty());
    assert!(
        gw.has_log("failed to process openfunction, err: connection refused"),
        "{}",
        gw.logs()
    );
    assert!(gw.has_log("openfunction exits with http status code 503"));

    let r = gw.get("/slow");
    assert_eq!(r.status, 503);
    assert!(
        gw.has_log("failed to process openfunction, err: timeout"),
        "{}",
        gw.logs()
    );

    // The head came in time, the body did not: the response is cut short, not left hanging.
    let mut stream = TcpStream::connect(gw.addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    stream
        .write_all(b"GET /stalls HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        .expect("send");
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(!raw.contains("late body"), "{raw}");
    assert!(
        gw.has_log("failed to process openfunction, err: timeout while reading the response body"),
        "{}",
        gw.logs()
    );
}

#[test]
fn tls_function_verification() {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("self-signed certificate");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let f = FnServer::start_with(
        Arc::new(|s: &Seen| Reply::ok(format!("tls {}", s.target))),
        Some(acceptor),
    );
    let https = format!("https://127.0.0.1:{}/secure", f.addr.port());
    let gw = Gateway::start(json!([
        {"uri": "/verify", "plugins": openfunction(json!({"function_uri": https}))},
        {"uri": "/noverify", "plugins": openfunction(json!({"function_uri": https, "ssl_verify": false}))},
    ]));
    let r = gw.get("/verify");
    assert_eq!(
        r.status, 503,
        "a self-signed certificate fails verification"
    );
    assert!(
        gw.has_log("failed to process openfunction, err: TLS handshake failed"),
        "{}",
        gw.logs()
    );
    let r = gw.get("/noverify");
    assert_eq!((r.status, r.text().as_str()), (200, "tls /secure"));
}

// ---------------------------------------------------------------------------------------------
// The response the client receives
// ---------------------------------------------------------------------------------------------

/// A function that writes its response by hand, to send headers hyper would not.
fn raw_function(response: &'static [u8]) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = rt()
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = rt().spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                }
                let _ = s.write_all(response).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, task)
}

#[test]
fn response_connection_headers_are_dropped() {
    let (addr, task) = raw_function(
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nUpgrade: h2c\r\nProxy-Connection: x\r\nKeep-Alive: timeout=5\r\nConnection: keep-alive\r\nX-A: 1\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nServer: function\r\nTE: trailers\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    );
    let gw = Gateway::start(json!([
        {"uri": "/r", "plugins": openfunction(json!({"function_uri": format!("http://{addr}/fn")}))},
    ]));
    let r = gw.get("/r");
    assert_eq!((r.status, r.text().as_str()), (201, "hello"));
    assert_eq!(r.header("x-a"), Some("1"));
    assert_eq!(r.all("set-cookie"), ["a=1", "b=2"]);
    assert!(
        r.header("server")
            .is_some_and(|s| s.starts_with("moongate")),
        "{:?}",
        r.header("server")
    );
    for h in ["upgrade", "proxy-connection", "keep-alive", "connection"] {
        assert!(
            r.header(h).is_none(),
            "{h} must not reach the client: {:?}",
            r.headers
        );
    }
    assert_eq!(
        r.header("te"),
        Some("trailers"),
        "other headers pass, as in APISIX"
    );
    task.abort();
}

/// With no plugin that sees response headers, the function's header lines pass unparsed; with
/// one, they are parsed into headers. The client gets the same headers either way.
#[test]
fn response_headers_are_the_same_with_and_without_response_plugins() {
    let (addr, task) = raw_function(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: keep-alive, X-Conn\r\nX-Conn: 1\r\nX-A: 1\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nServer: function\r\nTE: trailers\r\nTrailer: x\r\nETag: \"v1\"\r\nContent-Length: 5\r\n\r\nhello",
    );
    let fn_conf = json!({"function_uri": format!("http://{addr}/fn")});
    let gw = Gateway::start(json!([
        {"uri": "/plain", "plugins": openfunction(fn_conf.clone())},
        {"uri": "/filtered", "plugins": {
            "openfunction": fn_conf,
            "response-headers": {"set": {"X-Mark": "1"}}
        }},
    ]));
    let names = |r: &Resp| {
        let mut h: Vec<(String, String)> = r
            .headers
            .iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case("date") && !k.eq_ignore_ascii_case("x-mark"))
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect();
        h.sort();
        h
    };
    let plain = gw.get("/plain");
    let filtered = gw.get("/filtered");
    assert_eq!((plain.status, plain.text().as_str()), (200, "hello"));
    assert_eq!(filtered.header("x-mark"), Some("1"));
    assert_eq!(names(&plain), names(&filtered));
    assert_eq!(plain.all("set-cookie"), ["a=1", "b=2"]);
    assert_eq!(plain.header("te"), Some("trailers"));
    assert_eq!(plain.header("trailer"), Some("x"));
    assert!(plain.header("x-conn").is_none(), "{:?}", plain.headers);
    task.abort();
}

/// `_meta.error_response` replaces an error answer's body whichever way its headers came.
#[test]
fn error_response_replaces_a_functions_error_body() {
    let (addr, task) = raw_function(
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nX-A: 1\r\nContent-Length: 4\r\n\r\noops",
    );
    let gw = Gateway::start(json!([
        {"uri": "/e", "plugins": {"openfunction": {
            "function_uri": format!("http://{addr}/fn"),
            "_meta": {"error_response": "custom error"}
        }}},
    ]));
    let r = gw.get("/e");
    assert_eq!((r.status, r.text().as_str()), (502, "custom error"));
    assert_eq!(r.header("x-a"), Some("1"));
    assert_ne!(r.header("content-type"), Some("text/html"));
    task.abort();
}

#[test]
fn head_keeps_the_functions_content_length() {
    let f = FnServer::start(|_| Reply {
        headers: vec![
            ("x-extra-header", "MUST".into()),
            ("content-type", "text/plain".into()),
        ],
        ..Reply::ok("faas invoked\n")
    });
    let gw = Gateway::start(json!([
        {"uri": "/azure", "plugins": openfunction(json!({"function_uri": f.uri("/httptrigger")}))},
    ]));
    let r = gw.send("HEAD", "/azure", &[], None);
    assert_eq!(r.status, 200);
    assert_eq!(f.last().method, "HEAD");
    assert_eq!(r.header("content-length"), Some("13"));
    assert_eq!(r.header("x-extra-header"), Some("MUST"));
    assert_eq!(r.header("content-type"), Some("text/plain"));
    // The next response on the same connection starts right after the head: no body was sent.
    let mut stream = TcpStream::connect(gw.addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    stream
        .write_all(b"HEAD /azure HTTP/1.1\r\nHost: gw.test\r\n\r\nGET /azure HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let raw = String::from_utf8_lossy(&raw);
    assert_eq!(raw.matches("faas invoked").count(), 1, "{raw}");
    assert_eq!(raw.matches("HTTP/1.1 200").count(), 2, "{raw}");
}

#[test]
fn later_phases_see_the_functions_response() {
    let f = FnServer::start(|_| Reply {
        status: 201,
        headers: vec![("x-fn", "secret".into())],
        ..Reply::ok("made")
    });
    let upstream = FnServer::recorder();
    let gw = Gateway::start(json!([
        {
            "uri": "/rh",
            "upstream": {"type": "roundrobin", "nodes": {upstream.addr.to_string(): 1}},
            "plugins": {
                "openfunction": {"function_uri": f.uri("/fn")},
                "response-headers": {"set": {"X-Status": "$status"}, "remove": ["X-Fn"]}
            }
        },
    ]));
    let r = gw.get("/rh");
    assert_eq!((r.status, r.text().as_str()), (201, "made"));
    assert_eq!(r.header("x-status"), Some("201"));
    assert!(r.header("x-fn").is_none());
    assert!(
        upstream.requests().is_empty(),
        "the route's own upstream is never contacted"
    );
}

// ---------------------------------------------------------------------------------------------
// Connections to the function
// ---------------------------------------------------------------------------------------------

#[test]
fn keepalive_reuses_connections_and_off_opens_one_per_call() {
    let reused = FnServer::recorder();
    let fresh = FnServer::recorder();
    let gw = Gateway::start(json!([
        {"uri": "/ka", "plugins": openfunction(json!({"function_uri": reused.uri("/fn")}))},
        {"uri": "/noka", "plugins": openfunction(json!({"function_uri": fresh.uri("/fn"), "keepalive": false}))},
    ]));
    const N: usize = 5;
    for _ in 0..N {
        assert_eq!(gw.get("/ka").status, 200);
        assert_eq!(gw.get("/noka").status, 200);
    }
    assert_eq!(
        fresh.connections(),
        N,
        "keepalive: false opens a connection per call"
    );
    let mut on: Vec<usize> = fresh.requests().iter().map(|s| s.conn).collect();
    on.dedup();
    assert_eq!(on.len(), N, "each call came on its own connection");
    eprintln!(
        "keepalive: {} connection(s) for {N} calls",
        reused.connections()
    );
    assert!(
        reused.connections() < N,
        "keepalive reuses connections: {} for {N} calls",
        reused.connections()
    );
    assert_eq!(reused.requests().len(), N);
}

// ---------------------------------------------------------------------------------------------
// The walkthrough in examples/
// ---------------------------------------------------------------------------------------------

/// `examples/openfunction.yaml` with a function that answers like `examples/function_sample.rs`
/// (the ports moved to free ones).
#[test]
fn walkthrough_example_config() {
    let f = FnServer::start(|s| {
        let path = s.target.split('?').next().unwrap_or("");
        Reply::ok(format!(
            "Hello, {}!\n",
            path.rsplit('/').find(|p| !p.is_empty()).unwrap_or("")
        ))
    });
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/openfunction.yaml"
    ))
    .expect("read examples/openfunction.yaml");
    assert!(yaml.contains("listen: 127.0.0.1:9080") && yaml.contains("127.0.0.1:3233"));
    let yaml = yaml
        .replace("listen: 127.0.0.1:9080", "listen: 127.0.0.1:0\nworkers: 1")
        .replace("127.0.0.1:3233", &f.addr.to_string());
    let gw = Gateway::start_yaml(&yaml);
    let r = gw.get("/hello");
    assert_eq!((r.status, r.text().as_str()), (200, "Hello, test!\n"));
    assert_eq!(f.last().headers["authorization"], "Basic dGVzdDp0ZXN0");
    let r = gw.get("/hello/123");
    assert_eq!((r.status, r.text().as_str()), (200, "Hello, 123!\n"));
    assert_eq!(f.last().target, "/default/function-sample/123");
}

/// An idle kept-alive connection is closed after `keepalive_timeout`; the next call opens a new one.
#[test]
fn keepalive_timeout_closes_idle_connections() {
    let f = FnServer::recorder();
    let gw = Gateway::start(json!([
        {"uri": "/ka", "plugins": openfunction(json!({"function_uri": f.uri("/fn"), "keepalive_timeout": 1000}))},
    ]));
    assert_eq!(gw.get("/ka").status, 200);
    // Bounded wait: the pool's sweeper closes it a little after the idle timeout.
    let mut closed = false;
    for _ in 0..100 {
        if f.closed.load(Ordering::SeqCst) == 1 {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(closed, "the idle connection was never closed");
    assert_eq!(gw.get("/ka").status, 200);
    assert_eq!(f.connections(), 2);
}
