//! The upstream HTTP/1.1 client: connect (TCP, optional TLS), a per-worker keep-alive pool, and
//! one request per checked-out connection.
//!
//! Connecting and sending are separate steps so the proxy can retry the next node after a
//! connect failure without having consumed the request body. Each worker thread owns its pool
//! (no lock on the hot path); connections are tasks on that worker's `LocalSet`.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::body::UpstreamRequestBody;

/// Why an upstream call failed; the caller picks the status code and whether to retry.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("failed to resolve {host}: {reason}")]
    Dns { host: String, reason: String },
    #[error("{0}")]
    Connect(String),
    #[error("timeout")]
    ConnectTimeout,
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// No response head within the send + read timeout.
    #[error("timeout")]
    Timeout,
    #[error("{0}")]
    Protocol(String),
}

impl ClientError {
    /// A failure before any byte of the request was sent: safe to retry on another node.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            ClientError::Dns { .. }
                | ClientError::Connect(_)
                | ClientError::ConnectTimeout
                | ClientError::Tls(_)
        )
    }

    pub fn is_timeout(&self) -> bool {
        matches!(self, ClientError::ConnectTimeout | ClientError::Timeout)
    }
}

/// Where to connect.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Verify the server certificate (TLS only).
    pub verify: bool,
}

impl Target {
    /// `host:port` for logs and `ctx.var.upstream_addr`.
    pub fn addr(&self) -> String {
        host_port(&self.host, self.port)
    }
}

/// `host:port`, with an IPv6 literal in brackets. Built by hand: this runs on every proxied
/// request, and `format!` costs several times more than the pushes.
pub fn host_port(host: &str, port: u16) -> String {
    let v6 = host.contains(':');
    let mut s = String::with_capacity(host.len() + 8);
    if v6 {
        s.push('[');
    }
    s.push_str(host);
    if v6 {
        s.push(']');
    }
    s.push(':');
    let mut digits = [0u8; 5];
    let mut n = port;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        s.push(d as char);
    }
    s
}

/// Keep-alive settings for one target.
#[derive(Debug, Clone, Copy)]
pub struct PoolOptions {
    /// Idle connections kept for the target; 0 disables keep-alive.
    pub max_idle: usize,
    pub idle_timeout: Duration,
    /// Requests served by one connection before it is closed; 0 = unlimited.
    pub max_requests: u64,
}

impl PoolOptions {
    pub const NONE: PoolOptions = PoolOptions {
        max_idle: 0,
        idle_timeout: Duration::ZERO,
        max_requests: 0,
    };
}

struct Idle {
    sender: SendRequest<UpstreamRequestBody>,
    /// When the idle timeout closes it.
    deadline: Instant,
    requests: u64,
}

impl Idle {
    fn usable(&self, now: Instant) -> bool {
        now < self.deadline && !self.sender.is_closed()
    }
}

#[derive(Default)]
struct PoolState {
    idle: HashMap<Target, VecDeque<Idle>>,
    sweeper_running: bool,
}

/// A worker's client: its pool of idle upstream connections.
#[derive(Clone, Default)]
pub struct Client {
    state: Rc<RefCell<PoolState>>,
}

thread_local! {
    static WORKER_CLIENT: Client = Client::default();
}

/// This worker thread's client.
pub fn worker_client() -> Client {
    WORKER_CLIENT.with(Client::clone)
}

/// A connection ready for one request.
pub struct Conn {
    sender: SendRequest<UpstreamRequestBody>,
    target: Target,
    requests: u64,
    /// True when it came from the pool.
    pub reused: bool,
}

impl Client {
    /// A pooled connection to `target` if one is idle and alive, else a new one.
    pub async fn checkout(
        &self,
        target: &Target,
        connect_timeout: Duration,
        pool: PoolOptions,
    ) -> Result<Conn, ClientError> {
        if pool.max_idle > 0 {
            if let Some(conn) = self.take_idle(target) {
                return Ok(conn);
            }
        }
        let sender = connect(target, connect_timeout).await?;
        Ok(Conn {
            sender,
            target: target.clone(),
            requests: 0,
            reused: false,
        })
    }

    fn take_idle(&self, target: &Target) -> Option<Conn> {
        let mut state = self.state.borrow_mut();
        let list = state.idle.get_mut(target)?;
        let now = Instant::now();
        while let Some(idle) = list.pop_back() {
            if !idle.usable(now) || !idle.sender.is_ready() {
                continue;
            }
            return Some(Conn {
                sender: idle.sender,
                target: target.clone(),
                requests: idle.requests,
                reused: true,
            });
        }
        None
    }

    /// Number of idle connections kept for `target` (for tests and status).
    pub fn idle_count(&self, target: &Target) -> usize {
        self.state
            .borrow()
            .idle
            .get(target)
            .map(|l| l.len())
            .unwrap_or(0)
    }

    fn put_idle(&self, target: Target, idle: Idle, pool: PoolOptions) {
        let mut state = self.state.borrow_mut();
        let list = state.idle.entry(target).or_default();
        list.push_back(idle);
        while list.len() > pool.max_idle {
            list.pop_front();
        }
        if !state.sweeper_running {
            state.sweeper_running = true;
            let weak = Rc::downgrade(&self.state);
            tokio::task::spawn_local(async move {
                // Closes idle connections past their idle timeout, so an upstream sees the
                // close at about `idle_timeout` rather than at the next checkout.
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let Some(state) = weak.upgrade() else { return };
                    let now = Instant::now();
                    state.borrow_mut().idle.retain(|_, list| {
                        list.retain(|i| i.usable(now));
                        !list.is_empty()
                    });
                }
            });
        }
    }
}

impl Conn {
    /// Sends one request and waits for the response head for at most `timeout`. When the
    /// response body has been read to the end, the connection goes back to the pool (if
    /// keep-alive is on and the server did not close it).
    pub async fn send(
        mut self,
        client: &Client,
        req: Request<UpstreamRequestBody>,
        timeout: Duration,
        pool: PoolOptions,
    ) -> Result<Response<Incoming>, ClientError> {
        let fut = self.sender.send_request(req);
        let res = match tokio::time::timeout(timeout, fut).await {
            Err(_) => return Err(ClientError::Timeout),
            Ok(Err(e)) => return Err(ClientError::Protocol(describe_hyper_error(&e))),
            Ok(Ok(res)) => res,
        };
        self.requests += 1;
        let limit_reached = pool.max_requests > 0 && self.requests >= pool.max_requests;
        if pool.max_idle > 0 && !limit_reached {
            let client = client.clone();
            let Conn {
                mut sender,
                target,
                requests,
                ..
            } = self;
            tokio::task::spawn_local(async move {
                // Ready again once the response body has been read to its end.
                if sender.ready().await.is_ok() {
                    client.put_idle(
                        target,
                        Idle {
                            sender,
                            deadline: Instant::now() + pool.idle_timeout,
                            requests,
                        },
                        pool,
                    );
                }
            });
        }
        Ok(res)
    }
}

/// Walks a hyper error's sources for the most specific message.
pub fn describe_hyper_error(e: &hyper::Error) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg = s.to_string();
        src = s.source();
    }
    msg
}

async fn connect(
    target: &Target,
    timeout: Duration,
) -> Result<SendRequest<UpstreamRequestBody>, ClientError> {
    let deadline = Instant::now() + timeout;
    let attempt = async {
        let addrs: Vec<std::net::SocketAddr> = match target.host.parse::<std::net::IpAddr>() {
            Ok(ip) => vec![std::net::SocketAddr::new(ip, target.port)],
            Err(_) => tokio::net::lookup_host((target.host.as_str(), target.port))
                .await
                .map_err(|e| ClientError::Dns {
                    host: target.host.clone(),
                    reason: e.to_string(),
                })?
                .collect(),
        };
        let mut last = None;
        let mut stream = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let stream = match stream {
            Some(s) => s,
            None => {
                return Err(ClientError::Connect(
                    last.map(|e| connect_error_text(&e))
                        .unwrap_or_else(|| format!("no address for {}", target.host)),
                ))
            }
        };
        let _ = stream.set_nodelay(true);
        let io = if target.tls {
            let config = if target.verify {
                verifying_config()
            } else {
                insecure_config()
            };
            let name = ServerName::try_from(target.host.clone())
                .map_err(|e| ClientError::Tls(e.to_string()))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await
                .map_err(|e| ClientError::Tls(e.to_string()))?;
            Stream::Tls(Box::new(tls))
        } else {
            Stream::Plain(stream)
        };
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| ClientError::Connect(describe_hyper_error(&e)))?;
        tokio::task::spawn_local(async move {
            let _ = conn.await;
        });
        Ok(sender)
    };
    match tokio::time::timeout_at(deadline.into(), attempt).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::ConnectTimeout),
    }
}

fn connect_error_text(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
        _ => e.to_string(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS with certificate verification against the Mozilla roots (webpki-roots).
fn verifying_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(cfg)
        })
        .clone()
}

/// TLS without certificate verification (`ssl_verify: false`).
fn insecure_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
                .with_no_client_auth();
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(cfg)
        })
        .clone()
}

#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A plain or TLS upstream stream.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}
