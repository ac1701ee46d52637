//! Cosockets: `ngx.socket.tcp()` (and `ngx.socket.stream`, `ngx.socket.connect`), OpenResty's
//! non-blocking TCP and unix-socket client API.
//!
//! A socket is a userdata holding its state behind an `Rc`; the methods that wait (connect,
//! send, the receives, the `receiveuntil` iterator) are waiting functions
//! ([`runtime::create_io_function`]): their Rust half takes the connection out of the
//! socket into a future, polled once at the call (an operation that needs no wait returns at
//! once, as in lua-nginx-module) and otherwise awaited by the request (or timer) outside the
//! CPU budget, and puts it back when the operation ends (unless the error closed it, as OpenResty's do). Reads go through a
//! per-connection buffer, so what one `receive` did not consume is there for the next.
//!
//! `setkeepalive` puts the connection into this worker's pool, keyed as OpenResty keys it
//! (`host:port`, `unix:path`, or the `pool` option); `connect` takes from it first. An idle
//! connection is dropped when its idle time passed or when the peer closed it or sent data
//! meanwhile (both checked when it is taken).
//!
//! Sockets belong to the request (or timer run) that made them: when it ends, what is still
//! connected is closed, as nginx closes a finished request's cosockets.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mlua::{AnyUserData, Function, IntoLuaMulti, Lua, MultiValue, Table, UserData, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::runtime;
use crate::plugin::Phase;

/// nginx's `lua_socket_connect_timeout`, `_send_timeout` and `_read_timeout` defaults.
pub(super) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// `lua_socket_pool_size`.
const DEFAULT_POOL_SIZE: usize = 30;
/// `lua_socket_keepalive_timeout`.
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(60);
/// How much one read asks the kernel for at least (`lua_socket_buffer_size` is 4k/8k).
const READ_CHUNK: usize = 8192;
/// Registry name of the socket methods table (the userdata's `__index`).
const METHODS: &str = "moongate.tcp_methods";

/// A connected stream: TCP, unix, or TLS over either.
trait Stream: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> Stream for T {}

/// One connection and what was read from it but not yet handed to Lua.
struct Conn {
    io: Box<dyn Stream>,
    buf: BytesMut,
    /// How many times it came out of the pool.
    reused: u32,
    /// Its pool key.
    key: Rc<str>,
    /// The peer's address (None for unix sockets).
    peer: Option<SocketAddr>,
    /// The unix socket's path.
    path: Option<String>,
    /// TLS runs over it (`sslhandshake` succeeded).
    tls: bool,
    /// Its place among its pool's open connections, when the pool limits them (`backlog`).
    _slot: Option<Slot>,
}

/// A socket object's state.
struct SockState {
    conn: Option<Conn>,
    /// An operation holds the connection (another coroutine's call gets "socket busy").
    busy: bool,
    connect_timeout: Duration,
    send_timeout: Duration,
    read_timeout: Duration,
}

impl Default for SockState {
    fn default() -> Self {
        SockState {
            conn: None,
            busy: false,
            connect_timeout: DEFAULT_TIMEOUT,
            send_timeout: DEFAULT_TIMEOUT,
            read_timeout: DEFAULT_TIMEOUT,
        }
    }
}

type Sock = Rc<RefCell<SockState>>;

/// The Lua socket object.
struct TcpSock(Sock);

impl UserData for TcpSock {
    fn add_fields<F: mlua::UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field_with("__index", |lua| lua.named_registry_value::<Table>(METHODS));
    }

    fn add_methods<M: mlua::UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method("__tostring", |_, s, ()| {
            Ok(format!("tcp socket: {:p}", Rc::as_ptr(&s.0)))
        });
    }
}

/// A `receiveuntil` iterator's state.
struct Until {
    sock: Sock,
    pattern: Vec<u8>,
    inclusive: bool,
    /// Size mode: the pattern was reached; the next call returns `nil, nil` and resets.
    done: Cell<bool>,
}

struct UntilIter(Rc<Until>);
impl UserData for UntilIter {}

/// What `sslhandshake` returns for `reused_session`. rustls keeps and resumes sessions by
/// server name itself (per process), so the object only stands for the session.
struct SslSession;

impl UserData for SslSession {
    fn add_methods<M: mlua::UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method("__tostring", |_, s, ()| {
            Ok(format!("ssl session: {:p}", s as *const SslSession))
        });
    }
}

/// A socket a request or timer run owns: closed when it ends.
pub(super) trait OwnedSocket {
    fn close_owned(&self);
}

impl OwnedSocket for RefCell<SockState> {
    fn close_owned(&self) {
        if let Ok(mut s) = self.try_borrow_mut() {
            s.conn = None;
        }
    }
}

/// Sockets a request or timer run made (TCP and UDP), closed when it ends.
#[derive(Default)]
pub(crate) struct Owned(Vec<Weak<dyn OwnedSocket>>);

impl Owned {
    fn push(&mut self, s: Weak<dyn OwnedSocket>) {
        // Drop entries of sockets already collected, so a long timer loop does not grow this.
        if self.0.len() >= 16 {
            self.0.retain(|w| w.strong_count() > 0);
        }
        self.0.push(s);
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        for w in self.0.drain(..) {
            if let Some(s) = w.upgrade() {
                s.close_owned();
            }
        }
    }
}

thread_local! {
    /// This worker's keep-alive pools, by key.
    static POOLS: RefCell<HashMap<Rc<str>, Pool>> = RefCell::new(HashMap::new());
    /// The sockets of the timer run being resumed (null outside one).
    static TIMER_OWNED: Cell<*mut Owned> = const { Cell::new(std::ptr::null_mut()) };
}

/// Sets the timer run whose sockets the code resumed now makes; the previous comes back on
/// drop.
pub(crate) struct TimerOwnedGuard(*mut Owned);

impl TimerOwnedGuard {
    pub(crate) fn set(owned: &mut Owned) -> TimerOwnedGuard {
        TimerOwnedGuard(TIMER_OWNED.with(|c| c.replace(owned as *mut Owned)))
    }
}

impl Drop for TimerOwnedGuard {
    fn drop(&mut self) {
        TIMER_OWNED.with(|c| c.set(self.0));
    }
}

struct Idle {
    conn: Conn,
    expires: Option<Instant>,
}

struct Pool {
    size: usize,
    /// Most recently parked first.
    idle: VecDeque<Idle>,
    /// Made by a `connect` with `backlog`: the pool then limits its open connections.
    limit: Option<Rc<Limit>>,
}

/// OpenResty's `backlog`: at most `size` connections of a pool are open (in use or idle in
/// it); a `connect` beyond waits in a queue of at most `backlog`, for a connection to close
/// or to be parked, at most its connect timeout.
struct Limit {
    size: usize,
    backlog: usize,
    open: Cell<usize>,
    waiting: Cell<usize>,
    /// Wakes the longest waiting `connect` (tokio's `notify_one` is first come, first served).
    freed: tokio::sync::Notify,
}

/// One open connection of a limited pool; dropping it (the connection closed) lets a waiting
/// `connect` go on.
struct Slot(Rc<Limit>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.set(self.0.open.get().saturating_sub(1));
        self.0.freed.notify_one();
    }
}

/// A `connect` waiting in a pool's backlog (counted until it stops waiting, also when its
/// request ends or its thread is killed meanwhile).
struct Waiting(Rc<Limit>);

impl Waiting {
    fn new(l: &Rc<Limit>) -> Waiting {
        l.waiting.set(l.waiting.get() + 1);
        Waiting(l.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.set(self.0.waiting.get().saturating_sub(1));
    }
}

/// The limit of pool `key`, made (with the pool, if need be) by the first `connect` that asks
/// for one; later connects keep the sizes it was made with, as OpenResty's pools do.
fn pool_limit(key: &Rc<str>, size: usize, backlog: usize) -> Rc<Limit> {
    POOLS.with(|p| {
        let mut pools = p.borrow_mut();
        let pool = pools.entry(key.clone()).or_insert_with(|| Pool {
            size,
            idle: VecDeque::new(),
            limit: None,
        });
        pool.limit
            .get_or_insert_with(|| {
                Rc::new(Limit {
                    size: size.max(1),
                    backlog,
                    open: Cell::new(0),
                    waiting: Cell::new(0),
                    freed: tokio::sync::Notify::new(),
                })
            })
            .clone()
    })
}

/// Whether an idle connection can still be used: no EOF, no error and no unexpected data
/// (one non-blocking read attempt).
fn still_open(io: &mut Box<dyn Stream>) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    let mut byte = [0u8; 1];
    let mut rb = ReadBuf::new(&mut byte);
    matches!(Pin::new(io).poll_read(&mut cx, &mut rb), Poll::Pending)
}

fn pool_take(key: &str) -> Option<Conn> {
    POOLS.with(|p| {
        let mut pools = p.borrow_mut();
        let pool = pools.get_mut(key)?;
        let now = Instant::now();
        while let Some(mut idle) = pool.idle.pop_front() {
            if idle.expires.is_some_and(|e| e <= now) || !still_open(&mut idle.conn.io) {
                continue;
            }
            idle.conn.reused += 1;
            return Some(idle.conn);
        }
        None
    })
}

fn pool_put(conn: Conn, max_idle: Option<Duration>, size: usize) {
    POOLS.with(|p| {
        let mut pools = p.borrow_mut();
        let pool = pools.entry(conn.key.clone()).or_insert_with(|| Pool {
            size,
            idle: VecDeque::new(),
            limit: None,
        });
        let now = Instant::now();
        pool.idle.retain(|i| i.expires.is_none_or(|e| e > now));
        while pool.idle.len() >= pool.size.max(1) {
            pool.idle.pop_back();
        }
        pool.idle.push_front(Idle {
            conn,
            expires: max_idle.map(|d| now + d),
        });
        // A connect waiting in the backlog can take it now.
        if let Some(l) = &pool.limit {
            l.freed.notify_one();
        }
    });
}

/// Why an operation failed, as OpenResty words it.
enum SockErr {
    Timeout,
    Closed,
    Other(String),
}

impl SockErr {
    fn from_io(e: &io::Error) -> SockErr {
        match e.kind() {
            io::ErrorKind::TimedOut => SockErr::Timeout,
            io::ErrorKind::UnexpectedEof => SockErr::Closed,
            _ => SockErr::Other(io_text(e)),
        }
    }

    fn text(&self) -> String {
        match self {
            SockErr::Timeout => "timeout".into(),
            SockErr::Closed => "closed".into(),
            SockErr::Other(s) => s.clone(),
        }
    }
}

/// nginx's wording: the system's error text, lower case, without Rust's "(os error N)".
pub(super) fn io_text(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => return "connection refused".into(),
        io::ErrorKind::ConnectionReset => return "connection reset by peer".into(),
        io::ErrorKind::BrokenPipe => return "broken pipe".into(),
        _ => {}
    }
    let s = e.to_string();
    let s = match s.find(" (os error") {
        Some(i) => &s[..i],
        None => &s,
    };
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    if let Some(c) = chars.next() {
        out.extend(c.to_lowercase());
    }
    out.push_str(chars.as_str());
    out
}

/// What a socket method returns to Lua.
enum Reply {
    /// `1`
    One,
    Data(BytesMut),
    Int(i64),
    /// `nil, err` (and the partial data for receives).
    Fail(String, Option<BytesMut>),
    /// `nil, nil`: a sized `receiveuntil` iterator reached the pattern.
    End,
    /// `true` (`sslhandshake` asked not to return a session).
    True,
    /// An `sslhandshake` session object.
    Session,
}

impl Reply {
    fn fail(msg: impl Into<String>) -> Reply {
        Reply::Fail(msg.into(), None)
    }
}

impl IntoLuaMulti for Reply {
    fn into_lua_multi(self, lua: &Lua) -> mlua::Result<MultiValue> {
        Ok(match self {
            Reply::One => MultiValue::from_iter([Value::Integer(1)]),
            Reply::Data(b) => MultiValue::from_iter([Value::String(lua.create_string(&b)?)]),
            Reply::Int(n) => MultiValue::from_iter([Value::Integer(n)]),
            Reply::Fail(msg, partial) => {
                let mut v =
                    MultiValue::from_iter([Value::Nil, Value::String(lua.create_string(msg)?)]);
                if let Some(p) = partial {
                    v.push_back(Value::String(lua.create_string(&p)?));
                }
                v
            }
            Reply::End => MultiValue::from_iter([Value::Nil, Value::Nil]),
            Reply::True => MultiValue::from_iter([Value::Boolean(true)]),
            Reply::Session => {
                MultiValue::from_iter([Value::UserData(lua.create_userdata(SslSession)?)])
            }
        })
    }
}

/// A connection taken out of its socket for one operation; the socket is busy until this is
/// dropped. [`Lease::give_back`] returns the connection; dropped without it, it is closed.
struct Lease {
    sock: Sock,
    conn: Option<Conn>,
}

impl Lease {
    fn take(sock: &Sock) -> Result<Lease, Reply> {
        let mut s = sock.borrow_mut();
        if s.busy {
            return Err(Reply::fail("socket busy"));
        }
        let conn = s.conn.take().ok_or_else(|| Reply::fail("closed"))?;
        s.busy = true;
        Ok(Lease {
            sock: sock.clone(),
            conn: Some(conn),
        })
    }

    fn conn(&mut self) -> &mut Conn {
        self.conn
            .as_mut()
            .expect("a lease holds its connection until given back")
    }

    fn give_back(mut self) {
        let conn = self.conn.take();
        self.sock.borrow_mut().conn = conn;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Ok(mut s) = self.sock.try_borrow_mut() {
            s.busy = false;
        }
    }
}

/// Reads more into the connection's buffer: one wait of at most `timeout`.
async fn fill(conn: &mut Conn, timeout: Duration) -> Result<(), SockErr> {
    conn.buf.reserve(READ_CHUNK);
    match tokio::time::timeout(timeout, conn.io.read_buf(&mut conn.buf)).await {
        Err(_) => Err(SockErr::Timeout),
        Ok(Ok(0)) => Err(SockErr::Closed),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(SockErr::from_io(&e)),
    }
}

/// `receive`'s patterns.
enum Pattern {
    Line,
    All,
    Size(usize),
}

type ReadResult = Result<BytesMut, (SockErr, BytesMut)>;

fn without_cr(b: &[u8]) -> BytesMut {
    b.iter()
        .copied()
        .filter(|&c| c != b'\r')
        .collect::<Vec<u8>>()[..]
        .into()
}

async fn read_pattern(conn: &mut Conn, pat: &Pattern, timeout: Duration) -> ReadResult {
    let mut scanned = 0;
    loop {
        match *pat {
            Pattern::Line => {
                if let Some(i) = memchr::memchr(b'\n', &conn.buf[scanned..]) {
                    let line = conn.buf.split_to(scanned + i + 1);
                    return Ok(without_cr(&line[..line.len() - 1]));
                }
                scanned = conn.buf.len();
            }
            Pattern::Size(n) if conn.buf.len() >= n => return Ok(conn.buf.split_to(n)),
            Pattern::Size(_) | Pattern::All => {}
        }
        match fill(conn, timeout).await {
            Ok(()) => {}
            Err(SockErr::Closed) if matches!(pat, Pattern::All) => return Ok(conn.buf.split()),
            Err(e) => {
                let rest = conn.buf.split();
                let rest = match pat {
                    Pattern::Line => without_cr(&rest),
                    _ => rest,
                };
                return Err((e, rest));
            }
        }
    }
}

async fn read_any(conn: &mut Conn, max: usize, timeout: Duration) -> ReadResult {
    if conn.buf.is_empty() {
        fill(conn, timeout)
            .await
            .map_err(|e| (e, BytesMut::new()))?;
    }
    let n = max.min(conn.buf.len());
    Ok(conn.buf.split_to(n))
}

/// `receiveuntil`'s iterator: the data before the pattern (with it when inclusive); with
/// `size`, at most that much per call until the pattern is reached.
async fn read_until(
    conn: &mut Conn,
    it: &Until,
    size: Option<usize>,
    timeout: Duration,
) -> ReadResult {
    let finder = memchr::memmem::Finder::new(&it.pattern);
    let plen = it.pattern.len();
    let mut from = 0;
    loop {
        if let Some(i) = finder.find(&conn.buf[from..]) {
            let i = from + i;
            if let Some(size) = size {
                if i > size {
                    return Ok(conn.buf.split_to(size));
                }
                it.done.set(true);
            }
            let mut data = conn.buf.split_to(i + plen);
            if !it.inclusive {
                data.truncate(i);
            }
            return Ok(data);
        }
        // A match may still start in the last plen-1 bytes.
        let safe = conn.buf.len().saturating_sub(plen - 1);
        if let Some(size) = size {
            if safe >= size {
                return Ok(conn.buf.split_to(size));
            }
        }
        from = safe;
        if let Err(e) = fill(conn, timeout).await {
            return Err((e, conn.buf.split()));
        }
    }
}

/// Runs a read on the socket's connection: the connection goes back unless the error closed
/// it (every error but a timeout does, as in OpenResty).
async fn with_read<F>(sock: Sock, op: F) -> Reply
where
    F: AsyncFnOnce(&mut Conn, Duration) -> ReadResult,
{
    let mut lease = match Lease::take(&sock) {
        Ok(l) => l,
        Err(r) => return r,
    };
    let timeout = sock.borrow().read_timeout;
    match op(lease.conn(), timeout).await {
        Ok(data) => {
            lease.give_back();
            Reply::Data(data)
        }
        Err((e, partial)) => {
            if matches!(e, SockErr::Timeout) {
                lease.give_back();
            }
            Reply::Fail(e.text(), Some(partial))
        }
    }
}

fn sock_of(ud: &AnyUserData) -> mlua::Result<Sock> {
    ud.borrow::<TcpSock>().map(|s| s.0.clone())
}

/// Lua's `tostring` of a number, for `send`.
fn number_text(n: f64) -> String {
    super::convert::fmt_g14(n)
}

/// `send`'s data: a string, a number or an array table of them (nested), concatenated.
pub(super) fn flatten(v: &Value, out: &mut Vec<u8>, depth: usize) -> mlua::Result<()> {
    match v {
        Value::String(s) => out.extend_from_slice(&s.as_bytes()),
        Value::Integer(i) => out.extend_from_slice(i.to_string().as_bytes()),
        Value::Number(n) => out.extend_from_slice(number_text(*n).as_bytes()),
        Value::Table(t) if depth < 100 => {
            for i in 1..=t.raw_len() {
                let item: Value = t.raw_get(i)?;
                flatten(&item, out, depth + 1)?;
            }
        }
        other => {
            return Err(mlua::Error::runtime(format!(
                "bad argument #1 to 'send' (bad data type {} found)",
                other.type_name()
            )))
        }
    }
    Ok(())
}

pub(super) fn timeout_arg(v: &Value) -> Duration {
    let ms = match v {
        Value::Integer(i) => *i as f64,
        Value::Number(n) => *n,
        _ => 0.0,
    };
    // 0 (or nil) means the default, as in nginx.
    if ms.is_finite() && ms > 0.0 {
        Duration::from_secs_f64(ms / 1000.0)
    } else {
        DEFAULT_TIMEOUT
    }
}

/// OpenResty's name for where an API may not be used ("log_by_lua*").
pub(crate) fn context_name(phase: Option<Phase>) -> &'static str {
    match phase {
        Some(Phase::Rewrite) => "rewrite_by_lua*",
        Some(Phase::Access) => "access_by_lua*",
        Some(Phase::BeforeProxy) => "balancer_by_lua*",
        Some(Phase::HeaderFilter) => "header_filter_by_lua*",
        Some(Phase::BodyFilter | Phase::DelayedBodyFilter) => "body_filter_by_lua*",
        Some(Phase::Log) => "log_by_lua*",
        None => "init_by_lua*",
    }
}

/// Where the connection goes.
enum Addr {
    Tcp(Rc<str>, u16),
    Unix(String),
}

/// How many `host:port` pool keys [`TCP_KEYS`] keeps.
const KEPT_TCP_KEYS: usize = 8;

/// A kept key: the host, the port, and `host:port`.
type TcpKey = (Rc<str>, u16, Rc<str>);

thread_local! {
    /// The pool keys of the last TCP connects, with their host: a plugin connects to the same
    /// few servers on every request, and making the key (`format!`, two copies of the host)
    /// was about a tenth of a pooled `connect`'s instructions.
    static TCP_KEYS: RefCell<VecDeque<TcpKey>> =
        const { RefCell::new(VecDeque::new()) };
}

/// `host` as an `Rc<str>` and its default pool key `host:port`, kept for the next connect.
fn tcp_key(host: &str, port: u16) -> (Rc<str>, Rc<str>) {
    TCP_KEYS.with_borrow_mut(|keys| {
        if let Some((h, _, k)) = keys.iter().find(|(h, p, _)| *p == port && &**h == host) {
            return (h.clone(), k.clone());
        }
        let h: Rc<str> = host.into();
        let k: Rc<str> = format!("{host}:{port}").into();
        if keys.len() == KEPT_TCP_KEYS {
            keys.pop_back();
        }
        keys.push_front((h.clone(), port, k.clone()));
        (h, k)
    })
}

/// What `connect` was asked.
struct ConnectArgs {
    addr: Addr,
    key: Rc<str>,
    pool_size: Option<usize>,
    backlog: Option<usize>,
}

fn connect_args(host: mlua::String, rest: &MultiValue) -> mlua::Result<ConnectArgs> {
    let host = host.to_str()?;
    let bad = |m: &str| mlua::Error::runtime(m.to_string());
    let mut default_key = None;
    let (addr, opts) = if let Some(path) = host.strip_prefix("unix:") {
        let opts = rest.iter().find(|v| v.is_table()).cloned();
        (Addr::Unix(path.to_string()), opts)
    } else {
        let port = match rest.front() {
            Some(Value::Integer(p)) => *p,
            Some(Value::Number(p)) => *p as i64,
            Some(Value::String(s)) => s
                .to_str()
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
                .ok_or_else(|| bad("bad argument #2 to 'connect' (number expected, got string)"))?,
            _ => {
                return Err(bad(
                    "bad argument #2 to 'connect' (number expected, got no value)",
                ))
            }
        };
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad(&format!("bad port number: {port}")))?;
        let (host, key) = tcp_key(&host, port);
        default_key = Some(key);
        (Addr::Tcp(host, port), rest.get(1).cloned())
    };
    let mut key: Option<Rc<str>> = None;
    let (mut pool_size, mut backlog) = (None, None);
    if let Some(Value::Table(t)) = opts {
        match t.get::<Value>("pool")? {
            Value::Nil => {}
            Value::String(s) => key = Some(s.to_str()?.as_ref().into()),
            other => {
                return Err(bad(&format!(
                    "bad \"pool\" option type: {}",
                    other.type_name()
                )))
            }
        }
        pool_size = match t.get::<Value>("pool_size")? {
            Value::Nil => None,
            Value::Integer(n) if n > 0 => Some(n as usize),
            Value::Number(n) if n >= 1.0 => Some(n as usize),
            other => {
                return Err(bad(&format!(
                    "bad \"pool_size\" option value: {}",
                    other.to_string().unwrap_or_default()
                )))
            }
        };
        backlog = match t.get::<Value>("backlog")? {
            Value::Nil => None,
            Value::Integer(n) if n >= 0 => Some(n as usize),
            Value::Number(n) if n >= 0.0 => Some(n as usize),
            Value::Integer(n) => return Err(bad(&format!("bad \"backlog\" option value: {n}"))),
            Value::Number(n) => {
                return Err(bad(&format!("bad \"backlog\" option value: {}", n as i64)))
            }
            other => {
                return Err(bad(&format!(
                    "bad \"backlog\" option type: {}",
                    other.type_name()
                )))
            }
        };
    }
    let key = key.or(default_key).unwrap_or_else(|| match &addr {
        Addr::Tcp(h, p) => format!("{h}:{p}").into(),
        Addr::Unix(path) => format!("unix:{path}").into(),
    });
    Ok(ConnectArgs {
        addr,
        key,
        pool_size,
        backlog,
    })
}

/// Resolves (without blocking the worker) and connects, trying each address in turn.
async fn open(addr: &Addr) -> Result<(Box<dyn Stream>, Option<SocketAddr>), String> {
    match addr {
        Addr::Unix(path) => tokio::net::UnixStream::connect(path)
            .await
            .map(|s| (Box::new(s) as Box<dyn Stream>, None))
            .map_err(|e| io_text(&e)),
        Addr::Tcp(host, port) => {
            // The gateway's resolver and cache (hosts file, dns_resolver), shared with the
            // upstream nodes.
            let addrs: Vec<SocketAddr> = match crate::dns::resolve(host).await {
                Ok(r) => r.socket_addrs(*port).collect(),
                Err(e) => {
                    tracing::debug!("cosocket: failed to resolve {host}: {e}");
                    Vec::new()
                }
            };
            if addrs.is_empty() {
                return Err(format!("{host} could not be resolved (3: Host not found)"));
            }
            let mut last = String::new();
            for a in addrs {
                match tokio::net::TcpStream::connect(a).await {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        return Ok((Box::new(s), Some(a)));
                    }
                    Err(e) => last = io_text(&e),
                }
            }
            Err(last)
        }
    }
}

/// How a `connect` goes on after its call: decided when it is called (as OpenResty decides),
/// so connects made one after another in light threads queue in the order they were made.
enum ConnectStart {
    /// Answered already (a pooled connection, "socket busy", a full backlog).
    Done(Reply),
    /// Connect now, into this place of a limited pool (or none).
    Open(Lease, Option<Slot>),
    /// Wait in the pool's backlog first.
    Queue(Lease, Waiting),
}

/// `connect`'s part that runs at the call: closes what the socket was connected to (as
/// OpenResty does), takes a pooled connection or a place in a limited pool, or joins its queue.
fn connect_start(sock: &Sock, args: &ConnectArgs) -> ConnectStart {
    {
        let mut s = sock.borrow_mut();
        if s.busy {
            return ConnectStart::Done(Reply::fail("socket busy"));
        }
        s.conn = None;
        s.busy = true;
    }
    // Busy until the connect ends (another coroutine's call on it says "socket busy").
    let lease = Lease {
        sock: sock.clone(),
        conn: None,
    };
    if let Some(conn) = pool_take(&args.key) {
        sock.borrow_mut().conn = Some(conn);
        return ConnectStart::Done(Reply::One);
    }
    let Some(backlog) = args.backlog else {
        return ConnectStart::Open(lease, None);
    };
    let l = pool_limit(
        &args.key,
        args.pool_size.unwrap_or(DEFAULT_POOL_SIZE),
        backlog,
    );
    if l.open.get() < l.size {
        l.open.set(l.open.get() + 1);
        return ConnectStart::Open(lease, Some(Slot(l)));
    }
    if l.waiting.get() >= l.backlog {
        return ConnectStart::Done(Reply::fail("too many waiting connect operations"));
    }
    ConnectStart::Queue(lease, Waiting::new(&l))
}

async fn connect(sock: Sock, args: ConnectArgs, start: ConnectStart) -> Reply {
    let timeout = sock.borrow().connect_timeout;
    let (lease, slot) = match start {
        ConnectStart::Done(r) => return r,
        ConnectStart::Open(lease, slot) => (lease, slot),
        ConnectStart::Queue(lease, waiting) => {
            // Woken when a connection of the pool is parked or closed; a connect made
            // meanwhile may have taken it, so look again each time.
            let until = tokio::time::Instant::now() + timeout;
            let l = waiting.0.clone();
            loop {
                if tokio::time::timeout_at(until, l.freed.notified())
                    .await
                    .is_err()
                {
                    return Reply::fail("timeout");
                }
                if let Some(conn) = pool_take(&args.key) {
                    sock.borrow_mut().conn = Some(conn);
                    return Reply::One;
                }
                if l.open.get() < l.size {
                    l.open.set(l.open.get() + 1);
                    drop(waiting);
                    break (lease, Some(Slot(l)));
                }
            }
        }
    };
    let r = match tokio::time::timeout(timeout, open(&args.addr)).await {
        Err(_) => Reply::fail("timeout"),
        Ok(Err(e)) => Reply::fail(e),
        Ok(Ok((io, peer))) => {
            let path = match &args.addr {
                Addr::Unix(p) => Some(p.clone()),
                Addr::Tcp(..) => None,
            };
            sock.borrow_mut().conn = Some(Conn {
                io,
                buf: BytesMut::new(),
                reused: 0,
                key: args.key,
                peer,
                path,
                tls: false,
                _slot: slot,
            });
            Reply::One
        }
    };
    drop(lease);
    r
}

async fn send(sock: Sock, data: Vec<u8>) -> Reply {
    let mut lease = match Lease::take(&sock) {
        Ok(l) => l,
        Err(r) => return r,
    };
    let timeout = sock.borrow().send_timeout;
    let io = &mut lease.conn().io;
    let r = tokio::time::timeout(timeout, async {
        io.write_all(&data).await?;
        io.flush().await
    })
    .await;
    match r {
        Ok(Ok(())) => {
            lease.give_back();
            Reply::Int(data.len() as i64)
        }
        // Any send error closes the connection (the lease drops it).
        Err(_) => Reply::fail("timeout"),
        Ok(Err(e)) => Reply::fail(SockErr::from_io(&e).text()),
    }
}

/// What `sslhandshake` was asked.
struct HandshakeArgs {
    /// False when `reused_session` is `false`: the call returns `true`, not a session.
    want_session: bool,
    server_name: Option<String>,
    verify: bool,
}

fn handshake_args(
    reused: &Value,
    server_name: &Value,
    verify: &Value,
) -> mlua::Result<HandshakeArgs> {
    let server_name = match server_name {
        Value::Nil => None,
        Value::String(s) => Some(s.to_str()?.to_string()),
        other => {
            // Lua's `type()` words: integers are numbers.
            let got = match other {
                Value::Integer(_) => "number",
                v => v.type_name(),
            };
            return Err(mlua::Error::runtime(format!(
                "bad server_name arg: string expected, got {got}"
            )));
        }
    };
    Ok(HandshakeArgs {
        want_session: !matches!(reused, Value::Boolean(false)),
        server_name,
        verify: !matches!(verify, Value::Nil | Value::Boolean(false)),
    })
}

/// OpenResty's words for a failed handshake: OpenSSL's verify result (`"20: unable to get
/// local issuer certificate"`), `"certificate host mismatch"`, or `"handshake failed"`.
fn handshake_error(e: &io::Error) -> String {
    use rustls::CertificateError as C;
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return "handshake failed".into();
    };
    let rustls::Error::InvalidCertificate(c) = tls else {
        if let rustls::Error::General(msg) = tls {
            if msg == crate::tls::SELF_SIGNED {
                return msg.clone();
            }
        }
        return "handshake failed".into();
    };
    match c {
        C::NotValidForName | C::NotValidForNameContext { .. } => "certificate host mismatch",
        C::UnknownIssuer => "20: unable to get local issuer certificate",
        C::Expired | C::ExpiredContext { .. } => "10: certificate has expired",
        C::NotValidYet | C::NotValidYetContext { .. } => "9: certificate is not yet valid",
        C::Revoked => "23: certificate revoked",
        C::BadSignature => "7: certificate signature failure",
        _ => "handshake failed",
    }
    .into()
}

async fn sslhandshake(sock: Sock, args: HandshakeArgs) -> Reply {
    let done = if args.want_session {
        Reply::Session
    } else {
        Reply::True
    };
    let mut lease = match Lease::take(&sock) {
        Ok(l) => l,
        Err(r) => return r,
    };
    if lease.conn().tls {
        // A kept-alive connection made secure before: nothing to do again.
        lease.give_back();
        return done;
    }
    use rustls::pki_types::ServerName;
    let (name, verify) = match &args.server_name {
        Some(n) => match ServerName::try_from(n.clone()) {
            Ok(name) => (name, crate::tls::CosocketVerify::Full),
            Err(_) => {
                lease.give_back();
                return Reply::fail(format!("bad server name: {n}"));
            }
        },
        // No SNI: an address as the name (rustls sends none for it); the chain is still
        // checked when asked, the name not, as nginx does without a name.
        None => {
            let ip = lease
                .conn()
                .peer
                .map(|a| a.ip())
                .unwrap_or(std::net::Ipv4Addr::LOCALHOST.into());
            (
                ServerName::IpAddress(ip.into()),
                crate::tls::CosocketVerify::ChainOnly,
            )
        }
    };
    let timeout = sock.borrow().connect_timeout;
    let Some(mut conn) = lease.conn.take() else {
        return Reply::fail("closed");
    };
    let verify = if args.verify {
        verify
    } else {
        crate::tls::CosocketVerify::Off
    };
    let connector = tokio_rustls::TlsConnector::from(crate::tls::cosocket_config(verify));
    let io = std::mem::replace(&mut conn.io, Box::new(Closed));
    match tokio::time::timeout(timeout, connector.connect(name, io)).await {
        Err(_) => Reply::fail("timeout"),
        Ok(Err(e)) => {
            let msg = handshake_error(&e);
            if msg == "handshake failed" {
                tracing::debug!(target: "moongate::lua", "cosocket: TLS handshake failed: {e}");
            } else {
                // OpenResty logs a failed verification at error level too.
                tracing::error!(target: "moongate::lua", "lua ssl certificate verify error: ({msg})");
            }
            Reply::fail(msg)
        }
        Ok(Ok(tls)) => {
            conn.io = Box::new(tls);
            conn.tls = true;
            lease.conn = Some(conn);
            lease.give_back();
            done
        }
    }
}

/// Stands in for a stream moved out for a moment; never read or written.
struct Closed;

impl AsyncRead for Closed {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Closed {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::ErrorKind::NotConnected.into()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Whether sockets may be made here (a timer, or rewrite / access / before_proxy); OpenResty's
/// error otherwise.
pub(super) fn check_context() -> mlua::Result<()> {
    let fr = runtime::frame();
    let in_timer = TIMER_OWNED.with(|c| !c.get().is_null());
    let usable = in_timer
        || matches!(
            fr.phase,
            Some(Phase::Rewrite | Phase::Access | Phase::BeforeProxy)
        );
    if usable {
        Ok(())
    } else {
        Err(mlua::Error::runtime(format!(
            "API disabled in the context of {}",
            context_name(fr.phase)
        )))
    }
}

/// Records a socket with the request or timer run making it (after [`check_context`]).
pub(super) fn own(sock: Weak<dyn OwnedSocket>) -> mlua::Result<()> {
    let timer = TIMER_OWNED.with(|c| c.get());
    if !timer.is_null() {
        // SAFETY: set by the timer run that is being resumed, which outlives the resume.
        unsafe { (*timer).push(sock) };
        Ok(())
    } else {
        runtime::with_ctx(|ctx| runtime::lua_request(ctx).sockets.push(sock))
    }
}

/// Makes a socket object and records it with the request or timer run making it.
fn new_socket(lua: &Lua) -> mlua::Result<AnyUserData> {
    check_context()?;
    let sock: Sock = Rc::new(RefCell::new(SockState::default()));
    let weak: Weak<RefCell<SockState>> = Rc::downgrade(&sock);
    own(weak)?;
    lua.create_userdata(TcpSock(sock))
}

/// `sock:receive`'s argument.
fn pattern_arg(v: Option<Value>) -> mlua::Result<Pattern> {
    let bad = |m: String| mlua::Error::runtime(format!("bad argument #1 to 'receive' ({m})"));
    Ok(match v {
        None | Some(Value::Nil) => Pattern::Line,
        Some(Value::Integer(n)) => {
            Pattern::Size(usize::try_from(n).map_err(|_| bad("bad pattern argument".into()))?)
        }
        Some(Value::Number(n)) if n >= 0.0 => Pattern::Size(n as usize),
        Some(Value::String(s)) => {
            let b = s.as_bytes();
            match &*b {
                b"*l" | b"*L" => Pattern::Line,
                b"*a" => Pattern::All,
                other => match std::str::from_utf8(other)
                    .ok()
                    .and_then(|t| t.trim().parse::<usize>().ok())
                {
                    Some(n) => Pattern::Size(n),
                    None => return Err(bad("bad pattern argument".into())),
                },
            }
        }
        Some(_) => return Err(bad("bad pattern argument".into())),
    })
}

/// Installs `ngx.socket`.
/// `send` of a flat array of strings and numbers (what lua-resty-redis and most libraries
/// send) joins it with `table.concat` in Lua, which formats numbers as `tostring` does: one
/// string crosses into Rust instead of one table read per item, about 10k instructions per
/// Redis command. Nested tables and bad items go to [`flatten`] as before (and its errors).
/// Tail calls, so an error's position is still the caller's.
const SEND_SRC: &str = r#"
local send, concat, pcall = ...
local type = type
return function(sock, data)
    if type(data) == "table" then
        local ok, s = pcall(concat, data)
        if ok then return send(sock, s) end
    end
    return send(sock, data)
end
"#;

pub(crate) fn install(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let m = lua.create_table()?;
    m.set(
        "connect",
        runtime::create_io_function(
            lua,
            |_, (ud, host, rest): (AnyUserData, mlua::String, MultiValue)| {
                let args = sock_of(&ud).and_then(|s| {
                    let args = connect_args(host, &rest)?;
                    let start = connect_start(&s, &args);
                    Ok((s, args, start))
                });
                async move {
                    let (sock, args, start) = args?;
                    Ok(connect(sock, args, start).await)
                }
            },
        )?,
    )?;
    let send_fn = runtime::create_io_function(lua, |_, (ud, data): (AnyUserData, Value)| {
        let args = sock_of(&ud).and_then(|s| {
            let mut out = Vec::new();
            flatten(&data, &mut out, 0)?;
            Ok((s, out))
        });
        async move {
            let (sock, data) = args?;
            Ok(send(sock, data).await)
        }
    })?;
    let table: Table = lua.globals().get("table")?;
    let send_fn: Function = lua.load(SEND_SRC).set_name("=moongate.send").call((
        send_fn,
        table.get::<Function>("concat")?,
        lua.named_registry_value::<Function>(super::errors::RAW_PCALL)?,
    ))?;
    m.set("send", send_fn)?;
    m.set(
        "receive",
        runtime::create_io_function(lua, |_, (ud, pat): (AnyUserData, Option<Value>)| {
            let args = sock_of(&ud).and_then(|s| Ok((s, pattern_arg(pat)?)));
            async move {
                let (sock, pat) = args?;
                Ok(with_read(sock, async move |c: &mut Conn, t| {
                    read_pattern(c, &pat, t).await
                })
                .await)
            }
        })?,
    )?;
    m.set(
        "sslhandshake",
        runtime::create_io_function(
            lua,
            |_, (ud, reused, name, verify, _status_req): (AnyUserData, Value, Value, Value, Value)| {
                let args =
                    sock_of(&ud).and_then(|s| Ok((s, handshake_args(&reused, &name, &verify)?)));
                async move {
                    let (sock, args) = args?;
                    Ok(sslhandshake(sock, args).await)
                }
            },
        )?,
    )?;
    m.set(
        "receiveany",
        runtime::create_io_function(lua, |_, (ud, max): (AnyUserData, Value)| {
            let max = match max {
                Value::Integer(n) if n > 0 => Ok(n as usize),
                Value::Number(n) if n >= 1.0 => Ok(n as usize),
                _ => Err(mlua::Error::runtime(
                    "bad argument #2 to 'receiveany' (bad max argument)",
                )),
            };
            let args = sock_of(&ud).and_then(|s| Ok((s, max?)));
            async move {
                let (sock, max) = args?;
                Ok(with_read(sock, async move |c: &mut Conn, t| read_any(c, max, t).await).await)
            }
        })?,
    )?;
    let read_iter = runtime::create_io_function(lua, |_, (it, size): (AnyUserData, Value)| {
        let args = it
            .borrow::<UntilIter>()
            .map(|i| i.0.clone())
            .and_then(|it| {
                let size = match size {
                    Value::Nil => None,
                    Value::Integer(n) if n > 0 => Some(n as usize),
                    Value::Number(n) if n >= 1.0 => Some(n as usize),
                    _ => {
                        return Err(mlua::Error::runtime(
                            "bad argument #1 to iterator (bad size argument)",
                        ))
                    }
                };
                Ok((it, size))
            });
        async move {
            let (it, size) = args?;
            if size.is_some() && it.done.replace(false) {
                return Ok(Reply::End);
            }
            let sock = it.sock.clone();
            Ok(with_read(sock, async move |c: &mut Conn, t| {
                read_until(c, &it, size, t).await
            })
            .await)
        }
    })?;
    let make_iter: Function = lua
        .load("local read = ... return function(it) return function(size) return read(it, size) end end")
        .set_name("=moongate.receiveuntil")
        .call(read_iter)?;
    m.set(
        "receiveuntil",
        lua.create_function(
            move |lua, (ud, pat, opts): (AnyUserData, mlua::String, Option<Table>)| {
                let sock = sock_of(&ud)?;
                let pattern = pat.as_bytes().to_vec();
                if pattern.is_empty() {
                    return Ok((Value::Nil, Some("pattern is empty".to_string())));
                }
                let inclusive = match opts {
                    Some(t) => t.get::<Option<bool>>("inclusive")?.unwrap_or(false),
                    None => false,
                };
                let it = lua.create_userdata(UntilIter(Rc::new(Until {
                    sock,
                    pattern,
                    inclusive,
                    done: Cell::new(false),
                })))?;
                Ok((make_iter.call::<Value>(it)?, None))
            },
        )?,
    )?;
    m.set(
        "settimeout",
        lua.create_function(|_, (ud, ms): (AnyUserData, Value)| {
            let sock = sock_of(&ud)?;
            let t = timeout_arg(&ms);
            let mut s = sock.borrow_mut();
            s.connect_timeout = t;
            s.send_timeout = t;
            s.read_timeout = t;
            Ok(())
        })?,
    )?;
    m.set(
        "settimeouts",
        lua.create_function(|_, (ud, c, s, r): (AnyUserData, Value, Value, Value)| {
            let sock = sock_of(&ud)?;
            let mut st = sock.borrow_mut();
            st.connect_timeout = timeout_arg(&c);
            st.send_timeout = timeout_arg(&s);
            st.read_timeout = timeout_arg(&r);
            Ok(())
        })?,
    )?;
    m.set(
        "setkeepalive",
        lua.create_function(|lua, (ud, max_idle, size): (AnyUserData, Value, Value)| {
            let sock = sock_of(&ud)?;
            let max_idle = match max_idle {
                Value::Nil => Some(DEFAULT_KEEPALIVE),
                v => {
                    let ms = match v {
                        Value::Integer(i) => i as f64,
                        Value::Number(n) => n,
                        _ => {
                            return Err(mlua::Error::runtime(
                                "bad argument #2 to 'setkeepalive' (number expected)",
                            ))
                        }
                    };
                    (ms > 0.0 && ms.is_finite()).then(|| Duration::from_secs_f64(ms / 1000.0))
                }
            };
            let size = match size {
                Value::Nil => DEFAULT_POOL_SIZE,
                Value::Integer(n) if n > 0 => n as usize,
                Value::Number(n) if n >= 1.0 => n as usize,
                other => {
                    return Err(mlua::Error::runtime(format!(
                        "bad \"pool_size\" option value: {}",
                        other.to_string().unwrap_or_default()
                    )))
                }
            };
            let mut s = sock.borrow_mut();
            if s.busy {
                return Reply::fail("socket busy").into_lua_multi(lua);
            }
            let Some(conn) = s.conn.take() else {
                return Reply::fail("closed").into_lua_multi(lua);
            };
            if !conn.buf.is_empty() {
                return Reply::fail("unread data in buffer").into_lua_multi(lua);
            }
            pool_put(conn, max_idle, size);
            Reply::One.into_lua_multi(lua)
        })?,
    )?;
    m.set(
        "getreusedtimes",
        lua.create_function(|lua, ud: AnyUserData| {
            let sock = sock_of(&ud)?;
            let s = sock.borrow();
            match &s.conn {
                Some(c) => Reply::Int(i64::from(c.reused)),
                None if s.busy => Reply::fail("socket busy"),
                None => Reply::fail("closed"),
            }
            .into_lua_multi(lua)
        })?,
    )?;
    m.set(
        "close",
        lua.create_function(|lua, ud: AnyUserData| {
            let sock = sock_of(&ud)?;
            let mut s = sock.borrow_mut();
            if s.busy {
                return Reply::fail("socket busy").into_lua_multi(lua);
            }
            match s.conn.take() {
                Some(_) => Reply::One,
                None => Reply::fail("closed"),
            }
            .into_lua_multi(lua)
        })?,
    )?;
    m.set(
        "setoption",
        // keepalive, reuseaddr, tcp-nodelay (always on here), sndbuf, rcvbuf: accepted.
        lua.create_function(|_, (_ud, _opt, _v): (AnyUserData, Value, Value)| Ok(true))?,
    )?;
    m.set(
        "getpeername",
        lua.create_function(|lua, ud: AnyUserData| {
            let sock = sock_of(&ud)?;
            let s = sock.borrow();
            let mut v = MultiValue::new();
            match &s.conn {
                Some(Conn { peer: Some(a), .. }) => {
                    v.push_back(Value::String(lua.create_string(a.ip().to_string())?));
                    v.push_back(Value::Integer(i64::from(a.port())));
                }
                Some(Conn { path: Some(p), .. }) => {
                    v.push_back(Value::String(lua.create_string(p)?));
                }
                _ => return Reply::fail("closed").into_lua_multi(lua),
            }
            Ok(v)
        })?,
    )?;
    lua.set_named_registry_value(METHODS, &m)?;

    let socket = lua.create_table()?;
    let tcp = lua.create_function(|lua, ()| new_socket(lua))?;
    socket.set("tcp", tcp.clone())?;
    socket.set("stream", tcp.clone())?;
    let connect: Function = lua
        .load(
            r#"local tcp = ...
            return function(...)
                local sock = tcp()
                local ok, err = sock:connect(...)
                if not ok then return nil, err end
                return sock
            end"#,
        )
        .set_name("=moongate.socket_connect")
        .call(tcp)?;
    socket.set("connect", connect)?;
    super::udp::install(lua, &socket)?;
    ngx.set("socket", socket)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_read_as_nginx_words_them() {
        let e = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(io_text(&e), "connection refused");
        let e = io::Error::from_raw_os_error(libc::EHOSTUNREACH);
        assert_eq!(io_text(&e), "no route to host");
    }

    #[test]
    fn cr_is_dropped_from_lines() {
        assert_eq!(&without_cr(b"a\rb\r")[..], b"ab");
    }
}
