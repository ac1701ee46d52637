//! The HTTP/1.1 server side of the proxy listener: one loop per client connection.
//!
//! A connection reads into one reused buffer, parses each request head with `httparse`
//! (header values point into the buffer, no copy), hands the request to the handler with a
//! [`RecvBody`] that reads the request body from the same buffer and socket, and writes the
//! response: head and a body that is already complete in one write, a longer body frame by
//! frame as the handler's body yields it (the next frame is asked for only once the last one is
//! written: backpressure). Pipelined requests are served in order from what is left in the
//! buffer.
//!
//! Everything runs on the worker's current-thread runtime: the connection loop and the request
//! body share their state through `Rc<RefCell<..>>`.
//!
//! Refusals follow nginx: a malformed head, a request both chunked and with a Content-Length,
//! several different Content-Length values, a bad Content-Length or a transfer coding other than
//! chunked, an HTTP/1.1 request without a Host (or any request with two), and a host that
//! [`crate::host`] refuses get 400 and the connection closes (request smuggling defence); a
//! head larger than
//! `client_header_buffer_size` (or with more than [`MAX_HEADERS`] lines) gets 431.

use std::cell::RefCell;
use std::fmt;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::io::ConnIo;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::watch;
use tokio::time::Instant;

use super::chunked::{encode_chunk_head, ChunkedDecoder, Decoded, CHUNK_TAIL, LAST_CHUNK};
use super::{arm_timer, poll_deadline, ConnTimer, RawHead};

/// Most header lines a request head may have; more gets 431.
pub const MAX_HEADERS: usize = 100;

/// A request body that is not read by the handler is read and dropped after the response, up to
/// this many bytes and [`DRAIN_TIME`], so the connection can serve the next request.
const DRAIN_LIMIT: u64 = 64 * 1024 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// The buffer a request head is first read into (nginx's `client_header_buffer_size` default):
/// taken when the head's first bytes arrive, grown by [`READ_CHUNK`] only for a longer head.
const HEAD_FIRST: usize = 1024;
/// How much a read asks for at least once the first buffer is full.
const READ_CHUNK: usize = 8 * 1024;
/// A response head's buffer, taken per response (a connection waiting for its next request
/// holds none).
const WBUF_FIRST: usize = 1024;
/// How much a body read asks for at most.
const BODY_CHUNK: usize = 64 * 1024;
/// Data frames up to this size are copied next to their chunk head; larger ones are written
/// from where they are (vectored write).
const COPY_MAX: usize = 4 * 1024;

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
/// A chunk's tail and the terminator, when the last data frame ends the body.
const TAIL_AND_LAST: &[u8] = b"\r\n0\r\n\r\n";

/// A response body that may bring header lines of its own, written after the response's
/// header map: a proxied response passes the upstream's lines through this way, unparsed (the
/// server adds its `Server` line then, unless the map has one).
pub trait HeadLines {
    fn head_lines(&self) -> Option<&RawHead> {
        None
    }

    /// Asked when the body fails before any of the response was written: the status to answer
    /// with instead (the connection then closes). None: close without an answer.
    fn early_failure_status(&self) -> Option<StatusCode> {
        None
    }

    /// Asked when the response is a `101 Switching Protocols`: what takes the connection over
    /// once the head is written (the server then writes `Connection: upgrade` and is done with
    /// the connection). None: no switch (the connection goes on as HTTP/1.1).
    fn take_upgrade(&mut self) -> Option<OnUpgrade> {
        None
    }
}

/// What serves a connection after a `101`: gets the client's connection and what the client
/// sent after the request head (the new protocol's first bytes), and runs until it is done
/// with them.
pub type OnUpgrade = Box<dyn FnOnce(Upgraded, Bytes) -> Pin<Box<dyn Future<Output = ()>>>>;

/// A client connection handed over after a `101`; shutdown closes the sending side.
pub struct Upgraded {
    conn: Rc<Conn>,
}

impl tokio::io::AsyncRead for Upgraded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            // Free when the caller's buffer is initialised already (tokio's copy loops' are).
            match self.conn.io.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.conn.io.poll_read_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl tokio::io::AsyncWrite for Upgraded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.conn.io.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.conn.io.poll_write_ready(cx))?;
                }
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // TLS records rustls still holds; nothing on plain TCP.
        self.conn.io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.conn.io.poll_flush(cx))?;
        self.conn.io.shutdown_write();
        Poll::Ready(Ok(()))
    }
}

/// How writing a response ended.
enum Written {
    /// Sent whole.
    Done,
    /// The body failed before anything was written: answer with this status, then close.
    Replace(StatusCode),
    /// A `101` head was written: the connection is this one's now.
    Upgrade(OnUpgrade),
}

/// Limits of a connection.
#[derive(Debug, Clone)]
pub struct Config {
    /// Time a client has to send each request head (from when the server starts waiting for
    /// it, so it also closes an idle keep-alive connection).
    pub header_timeout: Duration,
    /// Largest request head in bytes.
    pub max_header_size: usize,
    /// The `Server` header of refusals.
    pub server: HeaderValue,
    /// How long a connection waits for its next request with nothing buffered before
    /// [`serve`] hands its transport back as [`Ended::Idle`]. None: never.
    pub park_after: Option<Duration>,
}

/// How serving a connection ended.
pub enum Ended {
    /// The connection is closed (or handed over after a `101`).
    Closed,
    /// Idle for [`Config::park_after`] between requests, with nothing buffered and nothing
    /// else holding the connection: the transport (a TLS one with nothing pending in it), and
    /// the deadline of the wait for the next request head (the header timeout from when that
    /// wait began). Serving it again with [`serve`] and that deadline goes on as if it had
    /// never stopped.
    Idle(ConnIo, Instant),
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("the client closed the connection before the end of the request body")]
    Incomplete,
    #[error("bad chunked request body: {0}")]
    Chunked(String),
    #[error("reading the request body failed: {0}")]
    Io(#[from] io::Error),
    #[error("the request body is no longer readable: the response was sent")]
    Detached,
}

/// How the rest of the request body is framed.
enum BodyState {
    /// Read to its end (or there was none).
    Done,
    /// This many bytes are still to come.
    Length(u64),
    Chunked(ChunkedDecoder),
    /// Reading failed; the connection cannot be reused.
    Failed,
}

/// The `100 Continue` interim response.
#[derive(Clone, Copy, PartialEq)]
enum Continue {
    /// Not asked for, or no longer appropriate.
    No,
    /// Asked for; this many bytes of it written so far (0 = not yet started).
    Pending(usize),
}

struct State {
    rbuf: BytesMut,
    body: BodyState,
    /// Counts requests; a body of an earlier request reads nothing more.
    gen: u64,
    cont: Continue,
    eof: bool,
}

struct Conn {
    io: ConnIo,
    st: RefCell<State>,
    /// Whether a short read may drop the socket's read readiness (see [`Conn::read_into`]).
    drop_readiness: bool,
}

impl Conn {
    /// Reads what is available into `buf`'s spare room.
    ///
    /// A read that leaves room unfilled has emptied the socket's receive queue (TCP's recv
    /// copies until the queue or the buffer runs out), so the read readiness is dropped here and
    /// the next read waits for epoll's next event. Without this, `try_read_buf` leaves the
    /// readiness set, and the read for the next request on a keep-alive connection goes to the
    /// kernel only to get `EAGAIN` (most requests did, under load). tokio's `poll_read` does the
    /// same after a short read. Dropping readiness without the tick of the event that set it is
    /// safe only where no other thread can set it in between: on a current-thread runtime, which
    /// runs the I/O driver on this thread (`drop_readiness` says whether that is the case).
    fn read_into(&self, buf: &mut BytesMut) -> io::Result<usize> {
        let room = buf.capacity() - buf.len();
        let n = self.io.try_read_buf(buf)?;
        if self.drop_readiness && n > 0 && n < room {
            self.io.drop_read_readiness();
        }
        Ok(n)
    }

    /// Reads what is available into the buffer (asking for at least `want` bytes of room).
    fn poll_fill(
        &self,
        st: &mut State,
        cx: &mut Context<'_>,
        want: usize,
    ) -> Poll<io::Result<usize>> {
        loop {
            if st.rbuf.capacity() - st.rbuf.len() < want {
                st.rbuf.reserve(want);
            }
            match self.read_into(&mut st.rbuf) {
                Ok(n) => {
                    if n == 0 {
                        st.eof = true;
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.io.poll_read_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Writes what is left of `100 Continue`.
    fn poll_continue(&self, st: &mut State, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Continue::Pending(done) = st.cont {
            match self.io.try_write(&CONTINUE[done..]) {
                Ok(n) => {
                    let done = done + n;
                    st.cont = if done == CONTINUE.len() {
                        Continue::No
                    } else {
                        Continue::Pending(done)
                    };
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.io.poll_write_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.io.poll_flush(cx)
    }

    /// The next piece of the request body.
    fn poll_data(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, RecvError>>> {
        let mut guard = self.st.borrow_mut();
        let st = &mut *guard;
        loop {
            let want = match &mut st.body {
                BodyState::Done => return Poll::Ready(None),
                BodyState::Failed => return Poll::Ready(Some(Err(RecvError::Incomplete))),
                BodyState::Length(rem) => {
                    if !st.rbuf.is_empty() {
                        let n = (*rem).min(st.rbuf.len() as u64);
                        let data = st.rbuf.split_to(n as usize).freeze();
                        *rem -= n;
                        if *rem == 0 {
                            st.body = BodyState::Done;
                        }
                        return Poll::Ready(Some(Ok(data)));
                    }
                    (*rem).clamp(READ_CHUNK as u64, BODY_CHUNK as u64) as usize
                }
                BodyState::Chunked(dec) => match dec.decode(&mut st.rbuf) {
                    Ok(Decoded::Data(data)) => {
                        if data.is_empty() {
                            continue;
                        }
                        return Poll::Ready(Some(Ok(data)));
                    }
                    Ok(Decoded::End) => {
                        st.body = BodyState::Done;
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::NeedMore) => BODY_CHUNK / 4,
                    Err(e) => {
                        st.body = BodyState::Failed;
                        return Poll::Ready(Some(Err(RecvError::Chunked(e.to_string()))));
                    }
                },
            };
            if st.eof {
                st.body = BodyState::Failed;
                return Poll::Ready(Some(Err(RecvError::Incomplete)));
            }
            if let Err(e) = ready!(self.poll_continue(st, cx)) {
                st.body = BodyState::Failed;
                return Poll::Ready(Some(Err(e.into())));
            }
            match ready!(self.poll_fill(st, cx, want)) {
                Ok(_) => {}
                Err(e) => {
                    st.body = BodyState::Failed;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn body_done(&self) -> bool {
        matches!(self.st.borrow().body, BodyState::Done)
    }
}

/// A request body, read from the client connection as it is polled.
pub struct RecvBody {
    conn: Rc<Conn>,
    gen: u64,
    /// Known to be over (no body, or read to its end); saves a look at the shared state.
    done: bool,
}

impl fmt::Debug for RecvBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecvBody")
            .field("done", &self.done)
            .finish()
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = RecvError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RecvError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if this.conn.st.borrow().gen != this.gen {
            this.done = true;
            return Poll::Ready(Some(Err(RecvError::Detached)));
        }
        match ready!(this.conn.poll_data(cx)) {
            Some(Ok(data)) => {
                if this.conn.body_done() {
                    this.done = true;
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Some(Err(e)) => {
                this.done = true;
                Poll::Ready(Some(Err(e)))
            }
            None => {
                this.done = true;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.conn.st.borrow().gen == self.gen && self.conn.body_done())
    }

    fn size_hint(&self) -> SizeHint {
        if self.done {
            return SizeHint::with_exact(0);
        }
        let st = self.conn.st.borrow();
        if st.gen != self.gen {
            return SizeHint::with_exact(0);
        }
        match &st.body {
            BodyState::Done => SizeHint::with_exact(0),
            BodyState::Length(n) => SizeHint::with_exact(*n),
            BodyState::Chunked(_) | BodyState::Failed => SizeHint::default(),
        }
    }
}

/// A parsed request head.
struct Head {
    req: Request<RecvBody>,
    keep_alive: bool,
}

/// Where one header line lies in the head.
#[derive(Clone, Copy, Default)]
struct HeaderIdx {
    name: (u32, u32),
    value: (u32, u32),
}

/// Where `s` (a slice of the buffer starting at `base`) lies in it.
fn span(base: *const u8, s: &[u8]) -> (u32, u32) {
    let start = s.as_ptr() as usize - base as usize;
    (start as u32, (start + s.len()) as u32)
}

fn at(head: &Bytes, (a, b): (u32, u32)) -> &[u8] {
    &head[a as usize..b as usize]
}

/// Parses a request head at the start of `st.rbuf`. `Ok(None)`: not complete yet.
fn parse_head(conn: &Rc<Conn>, st: &mut State, max: usize) -> Result<Option<Head>, StatusCode> {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut idx = [HeaderIdx::default(); MAX_HEADERS];
    let (len, method, target, version, count) = {
        let buf: &[u8] = &st.rbuf;
        let base = buf.as_ptr();
        let mut req = httparse::Request::new(&mut []);
        let len = match req.parse_with_uninit_headers(buf, &mut headers) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
            }
            Err(_) => return Err(StatusCode::BAD_REQUEST),
        };
        if len > max {
            return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        }
        let method = span(base, req.method.unwrap_or("").as_bytes());
        let target = span(base, req.path.unwrap_or("").as_bytes());
        let version = if req.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        for (slot, h) in idx.iter_mut().zip(req.headers.iter()) {
            *slot = HeaderIdx {
                name: span(base, h.name.as_bytes()),
                value: span(base, h.value),
            };
        }
        (len, method, target, version, req.headers.len())
    };
    let head = st.rbuf.split_to(len).freeze();
    let method = match at(&head, method) {
        b"GET" => Method::GET,
        b"POST" => Method::POST,
        m => Method::from_bytes(m).map_err(|_| StatusCode::BAD_REQUEST)?,
    };
    let uri = Uri::from_maybe_shared(head.slice(target.0 as usize..target.1 as usize))
        .map_err(|_| StatusCode::BAD_REQUEST)?;

    // Room for a few headers plugins add (a full map would grow and rehash on the first).
    let mut map = HeaderMap::with_capacity(count + 4);
    let mut hosts = 0u32;
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut te_seen = false;
    let mut close = false;
    let mut keep_alive_token = false;
    let mut expect_continue = false;
    for h in &idx[..count] {
        let name =
            HeaderName::from_bytes(at(&head, h.name)).map_err(|_| StatusCode::BAD_REQUEST)?;
        let raw = at(&head, h.value);
        if name == header::CONTENT_LENGTH {
            for part in raw.split(|&c| c == b',') {
                let n = parse_length(part.trim_ascii()).ok_or(StatusCode::BAD_REQUEST)?;
                if content_length.is_some_and(|old| old != n) {
                    return Err(StatusCode::BAD_REQUEST);
                }
                content_length = Some(n);
            }
        } else if name == header::TRANSFER_ENCODING {
            // Only `chunked`, once: anything else could be read differently by the upstream.
            if te_seen || !raw.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(StatusCode::BAD_REQUEST);
            }
            te_seen = true;
            chunked = true;
        } else if name == header::CONNECTION {
            for token in raw.split(|&c| c == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive_token = true;
                }
            }
        } else if name == header::EXPECT {
            expect_continue = raw.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        } else if name == header::HOST {
            hosts += 1;
        }
        // SAFETY (an API contract, not memory safety): httparse accepted this value, and the
        // bytes it accepts in a request header value (HTAB, SP..=0x7E, 0x80..=0xFF; obs-fold is
        // refused in requests) are exactly those `HeaderValue` allows, so the check
        // `from_maybe_shared` would repeat cannot fail. Debug builds still repeat it.
        let value = unsafe {
            HeaderValue::from_maybe_shared_unchecked(
                head.slice(h.value.0 as usize..h.value.1 as usize),
            )
        };
        map.append(name, value);
    }
    if chunked && (content_length.is_some() || version == Version::HTTP_10) {
        return Err(StatusCode::BAD_REQUEST);
    }
    // RFC 9112 §3.2 (and nginx): an HTTP/1.1 request has exactly one Host; HTTP/1.0 at most one.
    if hosts > 1 || (hosts == 0 && version == Version::HTTP_11) {
        return Err(StatusCode::BAD_REQUEST);
    }
    // One host for routing, plugins and the upstream (an absolute-form target's authority
    // replaces the Host header); a host that cannot be one is refused like a bad head.
    crate::host::normalize_request(&uri, &mut map).map_err(|_| StatusCode::BAD_REQUEST)?;
    st.body = if chunked {
        BodyState::Chunked(ChunkedDecoder::new())
    } else {
        match content_length {
            Some(n) if n > 0 => BodyState::Length(n),
            _ => BodyState::Done,
        }
    };
    let has_body = !matches!(st.body, BodyState::Done);
    st.cont = if expect_continue && has_body && version == Version::HTTP_11 {
        Continue::Pending(0)
    } else {
        Continue::No
    };
    st.gen += 1;
    let keep_alive = if version == Version::HTTP_11 {
        !close
    } else {
        keep_alive_token && !close
    };
    let mut req = Request::new(RecvBody {
        conn: conn.clone(),
        gen: st.gen,
        done: !has_body,
    });
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = map;
    Ok(Some(Head { req, keep_alive }))
}

/// A Content-Length value: digits only.
fn parse_length(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 18 {
        return None;
    }
    let mut n = 0u64;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u64::from(c - b'0');
    }
    Some(n)
}

/// How the next request head ended up.
// Made once per request and moved once: boxing the head would cost an allocation instead.
#[allow(clippy::large_enum_variant)]
enum HeadRead {
    Head(Head),
    /// Close quietly: end of stream, timeout, idle at shutdown, a read error.
    Close,
    /// Idle for `park_after`: hand the socket back (see [`Ended::Idle`]).
    Park(Instant),
    /// Refuse with this status, then close.
    Refuse(StatusCode),
}

/// Connection-level state the loop keeps between requests: all a connection waiting on
/// keep-alive holds, with the socket, the (then empty) read buffer and the timer.
struct Loop {
    conn: Rc<Conn>,
    cfg: Rc<Config>,
    shutdown: watch::Receiver<bool>,
    stopping: bool,
    timer: Option<ConnTimer>,
    /// The deadline of the first head's wait, for a connection served again after
    /// [`Ended::Idle`].
    resumed: Option<Instant>,
}

impl Loop {
    /// Whether the connection may be handed back while it waits: parking configured, nothing
    /// pending in the transport, and nothing else (a request body of an earlier request)
    /// holding the connection.
    fn parkable(&self) -> Option<Duration> {
        let after = self.cfg.park_after?;
        (Rc::strong_count(&self.conn) == 1 && self.conn.io.is_quiet()).then_some(after)
    }

    async fn read_head(&mut self) -> HeadRead {
        let mut deadline: Option<Instant> = self.resumed.take();
        // When this call first waited: parking counts from there (so a resumed connection
        // reads the bytes that woke it first).
        let mut began: Option<Instant> = None;
        loop {
            {
                let mut st = self.conn.st.borrow_mut();
                if !st.rbuf.is_empty() {
                    match parse_head(&self.conn, &mut st, self.cfg.max_header_size) {
                        Ok(Some(head)) => return HeadRead::Head(head),
                        Ok(None) => {}
                        Err(status) => return HeadRead::Refuse(status),
                    }
                    if st.rbuf.len() >= self.cfg.max_header_size {
                        return HeadRead::Refuse(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
                    }
                } else if self.stopping {
                    return HeadRead::Close;
                }
                if st.eof {
                    return HeadRead::Close;
                }
                let st = &mut *st;
                // Small first, as nginx does: most heads fit in HEAD_FIRST.
                if st.rbuf.capacity() == st.rbuf.len() {
                    let want = if st.rbuf.capacity() == 0 {
                        HEAD_FIRST
                    } else {
                        READ_CHUNK
                    };
                    st.rbuf.reserve(want);
                }
                match self.conn.read_into(&mut st.rbuf) {
                    Ok(0) => {
                        st.eof = true;
                        return HeadRead::Close;
                    }
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Waiting with nothing read (keep-alive): the buffer goes back to the
                        // allocator, and the next bytes get a new one (nginx frees its header
                        // buffer the same way). Under load this is one small allocation per
                        // request; idle, it is the connection's largest piece.
                        if st.rbuf.is_empty() && st.rbuf.capacity() > 0 {
                            st.rbuf = BytesMut::new();
                        }
                    }
                    Err(_) => return HeadRead::Close,
                }
            }
            // Nothing to read now: wait, for at most the header timeout.
            let began = *began.get_or_insert_with(Instant::now);
            let at = *deadline.get_or_insert(began + self.cfg.header_timeout);
            // With nothing buffered, for at most `park_after` before handing the socket back.
            let park = match self.parkable() {
                Some(after) if !self.stopping && self.conn.st.borrow().rbuf.is_empty() => {
                    Some(began + after)
                }
                _ => None,
            }
            .filter(|&p| p < at);
            let until = park.unwrap_or(at);
            let timer = arm_timer(&mut self.timer, until);
            let stopping = self.stopping;
            tokio::select! {
                biased;
                r = self.conn.io.readable() => {
                    if r.is_err() {
                        return HeadRead::Close;
                    }
                }
                _ = poll_fn(|cx| poll_deadline(timer, until, cx)) => {
                    return if park.is_some() { HeadRead::Park(at) } else { HeadRead::Close };
                }
                _ = self.shutdown.changed(), if !stopping => {
                    self.stopping = true;
                }
            }
        }
    }
}

/// Serves one client connection until it closes, a request cannot be framed, the header
/// timeout passes, (after `shutdown` turns true) the request in flight is answered, or it has
/// been idle for `cfg.park_after` ([`Ended::Idle`]). `resumed`: the deadline of the first
/// head's wait, for a connection that ended as [`Ended::Idle`] before.
pub async fn serve<H, F, B>(
    io: impl Into<ConnIo>,
    cfg: Rc<Config>,
    shutdown: watch::Receiver<bool>,
    resumed: Option<Instant>,
    mut handler: H,
) -> Ended
where
    H: FnMut(Request<RecvBody>) -> F,
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + HeadLines,
    B::Error: fmt::Display,
{
    let stopping = *shutdown.borrow();
    let io = io.into();
    let plain = io.is_plain();
    let mut lp = Loop {
        conn: Rc::new(Conn {
            io,
            st: RefCell::new(State {
                // Taken when the first bytes arrive (see `read_head`).
                rbuf: BytesMut::new(),
                body: BodyState::Done,
                gen: 0,
                cont: Continue::No,
                eof: false,
            }),
            drop_readiness: plain
                && tokio::runtime::Handle::current().runtime_flavor()
                    == tokio::runtime::RuntimeFlavor::CurrentThread,
        }),
        cfg,
        shutdown,
        stopping,
        timer: None,
        resumed,
    };
    loop {
        let head = match lp.read_head().await {
            HeadRead::Head(h) => h,
            HeadRead::Close => return Ended::Closed,
            HeadRead::Park(deadline) => {
                let Loop { conn, .. } = lp;
                // `parkable` saw no other holder; a failure here would only mean closing.
                return match Rc::try_unwrap(conn) {
                    Ok(conn) => Ended::Idle(conn.io, deadline),
                    Err(_) => Ended::Closed,
                };
            }
            HeadRead::Refuse(status) => {
                Box::pin(refuse(&lp.conn, &lp.cfg, status)).await;
                return Ended::Closed;
            }
        };
        // Boxed: the handler's future is by far the largest state of a connection (a proxied
        // request's is KiBs), and held inline it would be part of the connection's task for its
        // whole life, keep-alive waits included. One allocation per request instead.
        let (written, keep_alive) = Box::pin(request_turn(&mut lp, &mut handler, head)).await;
        match written {
            Ok(Written::Done) => {}
            Ok(Written::Upgrade(on_upgrade)) => {
                // What the client sent past the request head belongs to the new protocol.
                let pending = {
                    let mut st = lp.conn.st.borrow_mut();
                    st.gen += 1;
                    st.rbuf.split().freeze()
                };
                on_upgrade(
                    Upgraded {
                        conn: lp.conn.clone(),
                    },
                    pending,
                )
                .await;
                return Ended::Closed;
            }
            Ok(Written::Replace(status)) => {
                // The response's body (and its log) is done with; the client gets this
                // instead, and the connection closes.
                lp.conn.st.borrow_mut().gen += 1;
                Box::pin(refuse(&lp.conn, &lp.cfg, status)).await;
                return Ended::Closed;
            }
            Err(e) => {
                tracing::debug!("writing a response failed: {e}");
                lp.conn.st.borrow_mut().gen += 1;
                return Ended::Closed;
            }
        }
        // The request is over: its body (wherever it is) reads nothing more.
        let unread = {
            let mut st = lp.conn.st.borrow_mut();
            st.gen += 1;
            st.cont = Continue::No;
            !matches!(st.body, BodyState::Done)
        };
        if !keep_alive {
            if unread {
                Box::pin(linger(&lp.conn)).await;
            }
            return Ended::Closed;
        }
        if unread && !Box::pin(drain(&lp.conn)).await {
            return Ended::Closed;
        }
    }
}

/// One request: the handler's response, written. Returns how the writing ended and whether
/// the connection stays open.
async fn request_turn<H, F, B>(
    lp: &mut Loop,
    handler: &mut H,
    head: Head,
) -> (io::Result<Written>, bool)
where
    H: FnMut(Request<RecvBody>) -> F,
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + HeadLines,
    B::Error: fmt::Display,
{
    let Head { req, keep_alive } = head;
    let head_request = req.method() == Method::HEAD;
    let version = req.version();
    let res = handler(req).await;
    if !lp.stopping && lp.shutdown.has_changed().unwrap_or(true) {
        lp.stopping = true;
    }
    let mut keep_alive = keep_alive && !lp.stopping;
    let written = write_response(lp, res, head_request, version, &mut keep_alive).await;
    (written, keep_alive)
}

/// Reads and drops the rest of the request body. True when it ended in bounds.
async fn drain(conn: &Rc<Conn>) -> bool {
    let mut seen = 0u64;
    let read = async {
        loop {
            match poll_fn(|cx| conn.poll_data(cx)).await {
                None => return true,
                Some(Ok(d)) => {
                    seen += d.len() as u64;
                    if seen > DRAIN_LIMIT {
                        return false;
                    }
                }
                Some(Err(_)) => return false,
            }
        }
    };
    tokio::time::timeout(DRAIN_TIME, read)
        .await
        .unwrap_or(false)
}

/// Before closing with data unread: stop sending, and read (and drop) what the client still
/// sends for a moment, so the close does not reset the connection under the response.
async fn linger(conn: &Rc<Conn>) {
    conn.io.shutdown_write();
    let read = async {
        // On the heap: inline, it would make every connection's future 16 KiB larger.
        let mut buf = vec![0u8; 16 * 1024];
        let mut seen = 0usize;
        loop {
            match conn.io.try_read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    seen += n;
                    if seen as u64 > DRAIN_LIMIT {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if conn.io.readable().await.is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), read).await;
}

/// Answers a request that could not be framed, and closes.
async fn refuse(conn: &Rc<Conn>, cfg: &Config, status: StatusCode) {
    let reason = status.canonical_reason().unwrap_or("");
    let body = format!(
        "<html>\r\n<head><title>{code} {reason}</title></head>\r\n<body>\r\n<center><h1>{code} {reason}</h1></center>\r\n<hr><center>moongate</center>\r\n</body>\r\n</html>\r\n",
        code = status.as_u16()
    );
    let wbuf = &mut Vec::with_capacity(WBUF_FIRST + body.len());
    push_status(wbuf, status);
    wbuf.extend_from_slice(b"server: ");
    wbuf.extend_from_slice(cfg.server.as_bytes());
    wbuf.extend_from_slice(b"\r\n");
    push_date(wbuf);
    wbuf.extend_from_slice(b"content-type: text/html\r\ncontent-length: ");
    push_u64(wbuf, body.len() as u64);
    wbuf.extend_from_slice(b"\r\nconnection: close\r\n\r\n");
    wbuf.extend_from_slice(body.as_bytes());
    if write_all(&conn.io, &mut [IoSlice::new(wbuf)]).await.is_ok() {
        linger(conn).await;
    }
}

/// How the response body is delimited.
#[derive(Clone, Copy, PartialEq)]
enum Framing {
    /// No body on the wire (HEAD, 1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (HTTP/1.0 client, length unknown).
    Close,
}

async fn write_response<B>(
    lp: &mut Loop,
    res: Response<B>,
    head_request: bool,
    version: Version,
    keep_alive: &mut bool,
) -> io::Result<Written>
where
    B: Body<Data = Bytes> + HeadLines,
    B::Error: fmt::Display,
{
    let (parts, mut body) = res.into_parts();
    let upgrade = if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        body.take_upgrade()
    } else {
        None
    };
    let mut body = pin!(body);
    let status = parts.status;
    let headers = &parts.headers;

    // A body that is already complete goes out with the head.
    let no_body = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let mut first: Option<Bytes> = None;
    let mut ended = no_body || body.is_end_stream();
    if !ended {
        match poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await {
            Poll::Ready(None) => ended = true,
            Poll::Ready(Some(Ok(frame))) => {
                if let Ok(d) = frame.into_data() {
                    first = Some(d);
                }
                ended = body.is_end_stream();
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::debug!("response body failed before its head was written: {e}");
                return match body.as_ref().get_ref().early_failure_status() {
                    Some(status) => Ok(Written::Replace(status)),
                    None => Err(io::Error::other(format!("response body failed: {e}"))),
                };
            }
            Poll::Pending => {}
        }
    }
    let first_len = first.as_ref().map_or(0, |d| d.len() as u64);
    // The handler's framing headers are replaced by ours (skipped while writing the head).
    let mut head_length: Option<u64> = None;
    let framing = if no_body {
        if head_request && !headers.contains_key(header::CONTENT_LENGTH) {
            head_length = body.size_hint().exact();
        }
        Framing::None
    } else if ended {
        Framing::Length(first_len)
    } else if let Some(n) = body.size_hint().exact() {
        Framing::Length(first_len + n)
    } else if let Some(n) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| parse_length(v.as_bytes()))
    {
        Framing::Length(n)
    } else if version == Version::HTTP_11 {
        Framing::Chunked
    } else {
        *keep_alive = false;
        Framing::Close
    };
    let skip_length = matches!(framing, Framing::Length(_))
        || status == StatusCode::NO_CONTENT
        || status.is_informational();
    // A client that asked for 100-continue and was not sent it may still be waiting to send
    // the body: it cannot be drained, so the connection closes after the response.
    let cont = {
        let mut st = lp.conn.st.borrow_mut();
        let c = st.cont;
        st.cont = Continue::No;
        if c == Continue::Pending(0) && !matches!(st.body, BodyState::Done) {
            *keep_alive = false;
        }
        // A body whose framing failed cannot be read past: the client is told the connection
        // closes.
        if matches!(st.body, BodyState::Failed) {
            *keep_alive = false;
        }
        c
    };

    let wbuf = &mut Vec::with_capacity(WBUF_FIRST);
    if let Continue::Pending(done) = cont {
        if done > 0 {
            wbuf.extend_from_slice(&CONTINUE[done..]);
        }
    }
    push_status(wbuf, status);
    let mut has_date = false;
    for (name, value) in headers.iter() {
        if name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
            || (skip_length && name == header::CONTENT_LENGTH)
        {
            continue;
        }
        has_date |= name == header::DATE;
        wbuf.extend_from_slice(name.as_str().as_bytes());
        wbuf.extend_from_slice(b": ");
        wbuf.extend_from_slice(value.as_bytes());
        wbuf.extend_from_slice(b"\r\n");
    }
    if let Some(raw) = body.as_ref().get_ref().head_lines() {
        if headers.is_empty() || !headers.contains_key(header::SERVER) {
            wbuf.extend_from_slice(b"server: ");
            wbuf.extend_from_slice(lp.cfg.server.as_bytes());
            wbuf.extend_from_slice(b"\r\n");
        }
        wbuf.extend_from_slice(&raw.lines);
        has_date |= raw.has_date;
    }
    if !has_date {
        push_date(wbuf);
    }
    if let Some(n) = head_length {
        wbuf.extend_from_slice(b"content-length: ");
        push_u64(wbuf, n);
        wbuf.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length(n) => {
            wbuf.extend_from_slice(b"content-length: ");
            push_u64(wbuf, n);
            wbuf.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => wbuf.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::None | Framing::Close => {}
    }
    if upgrade.is_some() {
        wbuf.extend_from_slice(b"connection: upgrade\r\n");
    } else if !*keep_alive {
        wbuf.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        wbuf.extend_from_slice(b"connection: keep-alive\r\n");
    }
    wbuf.extend_from_slice(b"\r\n");

    if framing == Framing::None {
        write_all(&lp.conn.io, &mut [IoSlice::new(wbuf)]).await?;
        return Ok(match upgrade {
            Some(u) => Written::Upgrade(u),
            None => Written::Done,
        });
    }
    let mut out = BodyWriter {
        io: &lp.conn.io,
        framing,
        left: match framing {
            Framing::Length(n) => n,
            _ => u64::MAX,
        },
        chunk_head: BytesMut::new(),
    };
    if ended {
        let data = first.take().unwrap_or_default();
        if data.len() <= COPY_MAX {
            wbuf.extend_from_slice(&data);
            write_all(&lp.conn.io, &mut [IoSlice::new(wbuf)]).await?;
        } else {
            write_all(&lp.conn.io, &mut [IoSlice::new(wbuf), IoSlice::new(&data)]).await?;
        }
        return Ok(Written::Done);
    }
    // Streamed: the head now (with the first frame if there is one), then frame by frame.
    match first.take() {
        Some(d) => out.write(wbuf, d, false).await?,
        None => write_all(&lp.conn.io, &mut [IoSlice::new(wbuf)]).await?,
    }
    loop {
        let frame = poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
        match frame {
            None => break,
            Some(Err(e)) => {
                // The response cannot be completed: the client must see it cut short.
                *keep_alive = false;
                return Err(io::Error::other(format!("response body failed: {e}")));
            }
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                let last = body.is_end_stream();
                wbuf.clear();
                out.write(wbuf, data, last).await?;
                if last {
                    return out.finish_checked(keep_alive).map(|()| Written::Done);
                }
            }
        }
    }
    wbuf.clear();
    out.finish(wbuf).await?;
    out.finish_checked(keep_alive).map(|()| Written::Done)
}

/// Writes body frames in the response's framing.
struct BodyWriter<'a> {
    io: &'a ConnIo,
    framing: Framing,
    /// Bytes still allowed (Content-Length).
    left: u64,
    chunk_head: BytesMut,
}

impl BodyWriter<'_> {
    /// Writes `prefix` (head bytes, may be empty) and `data`; with `last`, the end of the body
    /// too.
    async fn write(&mut self, prefix: &mut Vec<u8>, mut data: Bytes, last: bool) -> io::Result<()> {
        match self.framing {
            Framing::Chunked => {
                if !data.is_empty() {
                    self.chunk_head.clear();
                    encode_chunk_head(data.len(), &mut self.chunk_head);
                    prefix.extend_from_slice(&self.chunk_head);
                }
                let tail: &[u8] = match (data.is_empty(), last) {
                    (true, true) => LAST_CHUNK,
                    (true, false) => b"",
                    (false, true) => TAIL_AND_LAST,
                    (false, false) => CHUNK_TAIL,
                };
                if data.len() <= COPY_MAX {
                    prefix.extend_from_slice(&data);
                    prefix.extend_from_slice(tail);
                    return write_all(self.io, &mut [IoSlice::new(prefix)]).await;
                }
                write_all(
                    self.io,
                    &mut [
                        IoSlice::new(prefix),
                        IoSlice::new(&data),
                        IoSlice::new(tail),
                    ],
                )
                .await
            }
            Framing::Length(_) | Framing::Close => {
                if data.len() as u64 > self.left {
                    data.truncate(self.left as usize);
                }
                self.left -= data.len() as u64;
                if data.len() <= COPY_MAX {
                    prefix.extend_from_slice(&data);
                    return write_all(self.io, &mut [IoSlice::new(prefix)]).await;
                }
                write_all(self.io, &mut [IoSlice::new(prefix), IoSlice::new(&data)]).await
            }
            Framing::None => Ok(()),
        }
    }

    /// The body ended without a last frame flagged: closes the chunked body.
    async fn finish(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        if self.framing == Framing::Chunked {
            buf.extend_from_slice(LAST_CHUNK);
            return write_all(self.io, &mut [IoSlice::new(buf)]).await;
        }
        Ok(())
    }

    /// A body shorter or longer than its Content-Length leaves the connection unusable.
    fn finish_checked(&self, keep_alive: &mut bool) -> io::Result<()> {
        if let Framing::Length(_) = self.framing {
            if self.left != 0 {
                *keep_alive = false;
                return Err(io::Error::other(
                    "response body shorter than its Content-Length",
                ));
            }
        }
        Ok(())
    }
}

/// Writes all of `bufs`.
async fn write_all(io: &ConnIo, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match io.try_write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => io.writable().await?,
            Err(e) => return Err(e),
        }
    }
    io.flush().await
}

fn push_status(buf: &mut Vec<u8>, status: StatusCode) {
    buf.extend_from_slice(b"HTTP/1.1 ");
    buf.extend_from_slice(status.as_str().as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    buf.extend_from_slice(b"\r\n");
}

fn push_u64(buf: &mut Vec<u8>, n: u64) {
    buf.extend_from_slice(super::decimal(n, &mut [0u8; 20]));
}

/// `date: ...\r\n`, formatted at most once a second per worker.
fn push_date(buf: &mut Vec<u8>) {
    thread_local! {
        static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            let s = httpdate::fmt_http_date(now);
            if s.len() == 29 {
                d.1.copy_from_slice(s.as_bytes());
                d.0 = secs;
            }
        }
        buf.extend_from_slice(b"date: ");
        buf.extend_from_slice(&d.1);
        buf.extend_from_slice(b"\r\n");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_values() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b"123"), Some(123));
        assert_eq!(parse_length(b""), None);
        assert_eq!(parse_length(b"+1"), None);
        assert_eq!(parse_length(b"1 2"), None);
        assert_eq!(parse_length(b"0x10"), None);
        assert_eq!(parse_length(b"9999999999999999999"), None);
    }

    #[test]
    fn numbers_and_dates() {
        let mut b = Vec::new();
        push_u64(&mut b, 0);
        push_u64(&mut b, 1234567890);
        assert_eq!(b, b"01234567890");
        let mut d = Vec::new();
        push_date(&mut d);
        assert!(
            d.starts_with(b"date: ") && d.ends_with(b" GMT\r\n"),
            "{d:?}"
        );
        assert_eq!(d.len(), 6 + 29 + 2);
    }
}
