//! The upstream HTTP/1.1 client: connect (TCP, optional TLS), a per-worker keep-alive pool, and
//! one request per checked-out connection.
//!
//! Connecting and sending are separate steps so the proxy can retry the next node after a
//! connect failure without having consumed the request body. Each worker thread owns its pool
//! (no lock on the hot path). A connection is driven by the request's own future
//! ([`crate::http1::client`]): no task per connection; the response body puts it back into the
//! pool when it has been read to its end.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{HeaderMap, Request, StatusCode};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::body::UpstreamRequestBody;
use crate::dns;
use crate::http1::client::{self as h1, Connection, NoEdit, Recycle, RequestHead, ResponseLines};
use crate::http1::{arm_timer, poll_deadline, ConnTimer, RawHead};
pub use crate::tls::Alpn;
use crate::tls::ClientIdentity;

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
    /// The exchange failed: send error, reset, malformed response.
    #[error(transparent)]
    Http(#[from] h1::Error),
    /// An HTTP/2 (gRPC) exchange failed.
    #[error("HTTP/2: {0}")]
    Http2(#[from] h2::Error),
    /// The HTTP/2 upstream did not process the stream (`REFUSED_STREAM`, or above a graceful
    /// GOAWAY's last stream): the call may go to another node.
    #[error("HTTP/2 stream refused: {0}")]
    Http2Refused(h2::Error),
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

    /// A failure after the request went out but before any byte of the response: the node
    /// may have seen the request, so only a request that may be sent twice goes to another
    /// node (nginx's `proxy_next_upstream error timeout`).
    pub fn resendable(&self) -> bool {
        match self {
            ClientError::Timeout => true,
            ClientError::Http(e) => e.before_response(),
            _ => false,
        }
    }

    pub fn is_timeout(&self) -> bool {
        matches!(self, ClientError::ConnectTimeout | ClientError::Timeout)
    }
}

/// Where to connect.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub tls: bool,
    pub host: Arc<str>,
    pub port: u16,
    /// Verify the server certificate (TLS only).
    pub verify: bool,
    /// The client certificate presented when the server asks (upstream mTLS; TLS only). Part
    /// of the pool key: a connection made with one certificate never serves a target that
    /// presents another (or none).
    pub client_cert: Option<Arc<ClientIdentity>>,
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
    for &d in crate::http1::decimal(u64::from(port), &mut [0u8; 20]) {
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
    conn: Connection<Stream>,
    /// Its pool key, handed to the next request that takes it (no copy of the host per request).
    target: Target,
    /// When it came back to the pool.
    returned: Instant,
    /// When the idle timeout closes it.
    deadline: Instant,
    requests: u64,
    timer: Option<ConnTimer>,
    /// The DNS answer it was made with (a target by name).
    dns: Option<dns::Pin>,
}

impl Idle {
    /// Within its idle timeout, made with the name's current answer (a changed answer moves
    /// traffic to the new addresses) and not closed (or written to) by the upstream meanwhile.
    fn usable(&mut self, now: Instant) -> bool {
        // Only a socket that became readable needs the read that tells close from quiet.
        now < self.deadline
            && self.dns.as_ref().is_none_or(dns::Pin::current)
            && (self.conn.io().quiet() || self.conn.idle_alive())
    }
}

#[derive(Default)]
struct PoolState {
    idle: HashMap<Target, IdleList, BuildHasherDefault<PoolHasher>>,
    sweeper_running: bool,
}

/// How long a connection beyond the pool's `size` may wait unused before it is closed.
///
/// Under many concurrent clients the number of idle connections swings within one turn of
/// the event loop: a batch of responses puts hundreds back, the clients' next requests take
/// them out a moment later. Closing every connection over `size` the moment it comes back
/// (nginx's `keepalive N`) closes connections the very next requests need, and they connect
/// again: at 1,000 clients with 128 kept that was 0.4 upstream connects per request. A
/// connection over `size` is closed only once it has waited this long unused, so `size` is
/// what stays once the load that needed more has passed (HAProxy also purges its idle
/// connections after a delay instead of at release).
const SURPLUS_GRACE: Duration = Duration::from_secs(1);

/// The idle connections to one target, in the order they came back (checkout takes the
/// newest, so the oldest are the ones the load did not need).
struct IdleList {
    conns: VecDeque<Idle>,
    /// `keepalive_pool.size` of the last connection put back.
    size: usize,
}

impl IdleList {
    /// Closes the connections over `size` that have waited [`SURPLUS_GRACE`] unused.
    fn trim(&mut self, now: Instant) {
        while self.conns.len() > self.size
            && self
                .conns
                .front()
                .is_some_and(|i| now.duration_since(i.returned) >= SURPLUS_GRACE)
        {
            self.conns.pop_front();
        }
    }
}

/// FNV-1a for the pool's keys: a target is a short host name and a few scalars, looked up twice
/// per proxied request, where SipHash's setup dominates. The keys come from the configuration
/// (upstream nodes), not from clients, so a flooding-resistant hash buys nothing here.
struct PoolHasher(u64);

impl Default for PoolHasher {
    fn default() -> Self {
        PoolHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for PoolHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
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

thread_local! {
    /// This worker's HTTP/1.1 upstream connections carrying a request (checked out of the pool
    /// or new, until back in the pool or closed): `moongate_upstream_connections`.
    static ACTIVE: Cell<u64> = const { Cell::new(0) };
}

/// Counts one connection in [`ACTIVE`] while it lives.
struct Active(());

impl Active {
    fn new() -> Active {
        ACTIVE.with(|a| a.set(a.get() + 1));
        Active(())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.set(a.get().saturating_sub(1)));
    }
}

/// A connection ready for one request.
pub struct Conn {
    active: Active,
    conn: Connection<Stream>,
    target: Target,
    requests: u64,
    /// For a fresh connection when a reused one turns out closed.
    connect_timeout: Duration,
    /// True when it came from the pool.
    pub reused: bool,
    timer: Option<ConnTimer>,
    dns: Option<dns::Pin>,
}

/// An upstream response body: streams from the connection and returns it to the pool at its end.
pub type UpstreamBody = h1::ResponseBody<Stream, PoolReturn>;

/// An upstream's answer.
pub struct UpstreamResponse {
    pub status: StatusCode,
    /// Without the connection-management headers the client consumed (see
    /// [`h1::ResponseHead::headers`]).
    pub headers: HeaderMap,
    /// `headers` has `TE` or `Trailer`.
    pub te_or_trailer: bool,
    /// The header lines as received, when the request asked for them (`headers` is empty).
    pub raw: Option<RawHead>,
    pub body: UpstreamBody,
    /// After a `101 Switching Protocols`: the connection, for the tunnel (`body` is empty).
    pub upgraded: Option<Upgraded>,
}

/// An upstream connection that switched protocols: the stream, and what the upstream sent
/// after the `101` head (the new protocol's first bytes), to be passed on first.
pub struct Upgraded {
    pub io: Stream,
    pub rest: bytes::Bytes,
}

/// Where a connection goes when its response has been read: back to its worker's pool.
pub struct PoolReturn {
    active: Active,
    /// False: the connection closes when its body is read (the pool is off for the upstream,
    /// or the connection has served `max_requests`).
    reuse: bool,
    client: Client,
    target: Target,
    pool: PoolOptions,
    requests: u64,
    timer: Option<ConnTimer>,
    dns: Option<dns::Pin>,
}

impl Recycle<Stream> for PoolReturn {
    fn recycle(self, mut conn: Connection<Stream>) {
        drop(self.active);
        if !self.reuse {
            return;
        }
        // Waiting in the pool, the connection holds no buffers.
        conn.release_buffers();
        let now = Instant::now();
        self.client.put_idle(
            Idle {
                conn,
                target: self.target,
                returned: now,
                deadline: now + self.pool.idle_timeout,
                requests: self.requests,
                timer: self.timer,
                dns: self.dns,
            },
            self.pool,
        );
    }
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
            if let Some(conn) = self.take_idle(target, connect_timeout) {
                return Ok(conn);
            }
        }
        let (conn, dns) = Box::pin(connect(target, connect_timeout)).await?;
        Ok(Conn {
            active: Active::new(),
            conn,
            target: target.clone(),
            requests: 0,
            connect_timeout,
            reused: false,
            timer: None,
            dns,
        })
    }

    fn take_idle(&self, target: &Target, connect_timeout: Duration) -> Option<Conn> {
        let mut state = self.state.borrow_mut();
        let list = state.idle.get_mut(target)?;
        let now = Instant::now();
        while let Some(mut idle) = list.conns.pop_back() {
            if !idle.usable(now) {
                continue;
            }
            return Some(Conn {
                active: Active::new(),
                conn: idle.conn,
                target: idle.target,
                requests: idle.requests,
                connect_timeout,
                reused: true,
                timer: idle.timer,
                dns: idle.dns,
            });
        }
        None
    }

    /// This worker's connections: idle in the pool, and carrying a request.
    pub fn connection_counts(&self) -> (u64, u64) {
        let idle = self
            .state
            .borrow()
            .idle
            .values()
            .map(|l| l.conns.len() as u64)
            .sum();
        (idle, ACTIVE.with(Cell::get))
    }

    /// Number of idle connections kept for `target` (for tests and status).
    pub fn idle_count(&self, target: &Target) -> usize {
        self.state
            .borrow()
            .idle
            .get(target)
            .map(|l| l.conns.len())
            .unwrap_or(0)
    }

    fn put_idle(&self, idle: Idle, pool: PoolOptions) {
        let mut state = self.state.borrow_mut();
        // The idle connection keeps its target; the map gets a copy only for a new key.
        if let Some(list) = state.idle.get_mut(&idle.target) {
            let now = idle.returned;
            list.size = pool.max_idle;
            list.conns.push_back(idle);
            list.trim(now);
        } else if pool.max_idle > 0 {
            let key = idle.target.clone();
            let list = IdleList {
                conns: VecDeque::from([idle]),
                size: pool.max_idle,
            };
            state.idle.insert(key, list);
        }
        if !state.sweeper_running {
            state.sweeper_running = true;
            let weak = Rc::downgrade(&self.state);
            tokio::task::spawn_local(async move {
                // Closes idle connections past their idle timeout, so an upstream sees the
                // close at about `idle_timeout` rather than at the next checkout, and those
                // over `size` that the load no longer needs.
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let Some(state) = weak.upgrade() else { return };
                    let now = Instant::now();
                    state.borrow_mut().idle.retain(|_, list| {
                        list.conns.retain_mut(|i| i.usable(now));
                        list.trim(now);
                        !list.conns.is_empty()
                    });
                }
            });
        }
    }
}

impl Conn {
    /// Sends one request and waits for the response head for at most `timeout`. When the
    /// response body has been read to the end, the connection goes back to the pool (if
    /// keep-alive is on, the upstream allows it and `max_requests` is not reached).
    ///
    /// A reused connection can have been closed by the upstream just before this request was
    /// written: when it fails before any response byte arrived and the body is in memory, the
    /// request is sent once more on a fresh connection (nginx's `proxy_next_upstream error`
    /// does the same for keep-alive connections).
    pub async fn send(
        self,
        client: &Client,
        req: Request<UpstreamRequestBody>,
        timeout: Duration,
        pool: PoolOptions,
    ) -> Result<UpstreamResponse, ClientError> {
        let (parts, body) = req.into_parts();
        let head = RequestHead {
            method: &parts.method,
            target: parts.uri.path_and_query().map_or("/", |p| p.as_str()),
            headers: &parts.headers,
            edit: &NoEdit,
            lines: ResponseLines::Parsed,
        };
        self.send_head(client, &head, body, timeout, pool).await
    }

    /// [`Conn::send`] with the head given as parts (the proxy's own requests: the headers are
    /// the client's, with the forwarding changes applied while they are written).
    pub async fn send_head(
        self,
        client: &Client,
        head: &RequestHead<'_>,
        body: UpstreamRequestBody,
        timeout: Duration,
        pool: PoolOptions,
    ) -> Result<UpstreamResponse, ClientError> {
        let Conn {
            active,
            mut conn,
            target,
            mut requests,
            connect_timeout,
            reused,
            mut timer,
            mut dns,
        } = self;
        let deadline = tokio::time::Instant::now() + timeout;
        let done = {
            // Made in place (pinned where it is built): moving this future costs a copy of it.
            let mut exchange = std::pin::pin!(async {
                let replay = if reused { body.replay() } else { None };
                match conn.send_request(head, body).await {
                    Ok(res) => Ok(res),
                    Err(e) if e.before_response() && replay.is_some() => {
                        tracing::debug!(node = %target.addr(), "reused upstream connection failed ({e}); retrying on a new one");
                        (conn, dns) = Box::pin(connect(&target, connect_timeout)).await?;
                        requests = 0;
                        let body = replay.expect("checked above");
                        Ok(conn.send_request(head, body).await?)
                    }
                    Err(e) => Err(ClientError::from(e)),
                }
            });
            let armed = arm_timer(&mut timer, deadline);
            std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = exchange.as_mut().poll(cx) {
                    return Poll::Ready(Some(r));
                }
                poll_deadline(armed, deadline, cx).map(|()| None)
            })
            .await
        };
        let mut head = match done {
            None => return Err(ClientError::Timeout),
            Some(r) => r?,
        };
        if head.status == StatusCode::SWITCHING_PROTOCOLS {
            // The connection now speaks another protocol: never pooled, handed over whole.
            let (io, rest) = conn.into_parts();
            return Ok(UpstreamResponse {
                status: head.status,
                headers: head.headers,
                te_or_trailer: head.te_or_trailer,
                raw: head.raw,
                body: h1::ResponseBody::none(),
                upgraded: Some(Upgraded { io, rest }),
            });
        }
        requests += 1;
        let limit_reached = pool.max_requests > 0 && requests >= pool.max_requests;
        let recycle = Some(PoolReturn {
            active,
            reuse: pool.max_idle > 0 && !limit_reached,
            client: client.clone(),
            target,
            pool,
            requests,
            timer,
            dns,
        });
        let body = h1::ResponseBody::new(conn, &mut head, recycle);
        Ok(UpstreamResponse {
            status: head.status,
            headers: head.headers,
            te_or_trailer: head.te_or_trailer,
            raw: head.raw,
            body,
            upgraded: None,
        })
    }
}

/// Called boxed: its future (DNS, TCP, TLS handshake) is large, and inline it would make every
/// request's future that large, to be moved on each request while connections are reused.
async fn connect(
    target: &Target,
    timeout: Duration,
) -> Result<(Connection<Stream>, Option<dns::Pin>), ClientError> {
    let (stream, pin) = connect_pinned(target, timeout, Alpn::Http1).await?;
    crate::metrics::runtime::UPSTREAM_CREATED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok((Connection::new(stream), pin))
}

/// A TCP (and when the target says so, TLS) connection to `target`, within `timeout`.
pub async fn connect_stream(
    target: &Target,
    timeout: Duration,
    alpn: Alpn,
) -> Result<Stream, ClientError> {
    Ok(connect_pinned(target, timeout, alpn).await?.0)
}

/// [`connect_stream`], also giving what tells whether the name's answer the connection was
/// made with is still current (None for an IP literal), for the pools.
pub async fn connect_pinned(
    target: &Target,
    timeout: Duration,
    alpn: Alpn,
) -> Result<(Stream, Option<dns::Pin>), ClientError> {
    let deadline = Instant::now() + timeout;
    let attempt = async {
        let resolved = dns::resolve(&target.host)
            .await
            .map_err(|reason| ClientError::Dns {
                host: target.host.to_string(),
                reason,
            })?;
        let mut last = None;
        let mut stream = None;
        for addr in resolved.socket_addrs(target.port) {
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
        let pin = resolved.pin;
        if !target.tls {
            return Ok((Stream::Plain(stream), pin));
        }
        let config = crate::tls::client_config(target.verify, alpn, target.client_cert.as_deref());
        let name = ServerName::try_from(target.host.to_string())
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, stream)
            .await
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        if alpn == Alpn::Http2 && tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(ClientError::Tls(
                "the upstream did not agree to HTTP/2 (ALPN h2)".to_string(),
            ));
        }
        Ok((Stream::Tls(Box::new(tls)), pin))
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

/// A plain or TLS upstream stream.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// True when nothing arrived on the socket since the last read drained it, as the reactor
    /// knows without a system call. False means "maybe": the upstream may have closed it.
    fn quiet(&self) -> bool {
        let tcp = match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        tcp.poll_read_ready(&mut cx).is_pending()
    }
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
