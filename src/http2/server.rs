//! The HTTP/2 server side of a client connection, over any byte stream (h2c with prior
//! knowledge on a plain listener, or a TLS stream whose ALPN chose `h2`).
//!
//! One task drives the `h2` connection (frames in and out, flow control, SETTINGS and PING)
//! and accepts streams; each stream is a task of its own that runs the handler, the same one
//! HTTP/1.1 requests go through, and sends the response with backpressure: a body frame is
//! asked for only once the client's flow-control window has room for the last one.
//!
//! Limits, and what a misbehaving client costs (only its own connection):
//! - at most [`MAX_CONCURRENT_STREAMS`] streams at once; a stream past that is refused with
//!   `RST_STREAM(REFUSED_STREAM)` by `h2`;
//! - the request header list is bounded by `client_header_buffer_size` (`h2` answers 431
//!   and bounds the decoding work of an HPACK or CONTINUATION bomb, closing the connection
//!   with `ENHANCE_YOUR_CALM` past its abuse limit) and by [`MAX_HEADERS`] fields (431);
//! - rapid reset: streams the client resets before they are answered are counted; more than
//!   [`MAX_CLIENT_RESETS`] within [`RESET_WINDOW`] closes the connection with
//!   `GOAWAY(ENHANCE_YOUR_CALM)` (and `h2` itself does the same when reset streams pile up
//!   before they are accepted). A reset stream's handler is dropped, and with it its upstream
//!   request;
//! - SETTINGS and PING floods: `h2` acknowledges one frame at a time and reads no further
//!   until the acknowledgement is written, so a client that does not read stalls only its own
//!   connection, with bounded memory, until the idle timeout closes it;
//! - the connection preface must arrive within `client_header_timeout`, and a connection
//!   with no open stream is closed (GOAWAY) after `client_header_timeout` too.
//!
//! Graceful shutdown sends GOAWAY: streams already open are answered, new ones are refused,
//! and the connection closes when the last one ends.

use std::cell::Cell;
use std::fmt;
use std::future::{poll_fn, Future};
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::body::ClientBody;
use crate::http1::server::HeadLines;

use super::RecvBody;

/// Streams a client may have open at once (nginx's `http2_max_concurrent_streams`).
pub const MAX_CONCURRENT_STREAMS: u32 = 128;
/// Most header fields a request may have; more gets 431 (as over HTTP/1.1).
pub const MAX_HEADERS: usize = crate::http1::server::MAX_HEADERS;
/// Streams a client may reset before their answer within [`RESET_WINDOW`].
pub const MAX_CLIENT_RESETS: u32 = 2 * MAX_CONCURRENT_STREAMS;
pub const RESET_WINDOW: Duration = Duration::from_secs(10);
/// Flow-control windows: what one stream, and the whole connection, may have in flight.
const STREAM_WINDOW: u32 = 256 * 1024;
const CONNECTION_WINDOW: u32 = 1024 * 1024;
/// Response data buffered per stream before `h2` stops granting send capacity.
const SEND_BUFFER: usize = 256 * 1024;

/// Settings of a connection.
#[derive(Debug, Clone)]
pub struct Config {
    /// Time for the connection preface, and how long a connection with no open stream is kept.
    pub idle_timeout: Duration,
    /// Largest request header list (HPACK-decoded size, as RFC 9113 counts it).
    pub max_header_size: u32,
    /// The `Server` header of responses that have none.
    pub server: HeaderValue,
}

/// What the stream tasks and the connection task share.
struct Shared {
    /// Streams being served.
    open: Cell<usize>,
    /// Wakes the connection task when a stream ends (for the idle timer) or when the client
    /// reset too many streams.
    changed: Notify,
    /// Client resets in the current window, and when the window started.
    resets: Cell<u32>,
    reset_window: Cell<Instant>,
    /// Set when the client reset too many streams.
    abusive: Cell<bool>,
}

impl Shared {
    fn note_reset(&self) {
        let now = Instant::now();
        if now.duration_since(self.reset_window.get()) > RESET_WINDOW {
            self.reset_window.set(now);
            self.resets.set(0);
        }
        self.resets.set(self.resets.get() + 1);
        if self.resets.get() > MAX_CLIENT_RESETS && !self.abusive.get() {
            self.abusive.set(true);
            self.changed.notify_one();
        }
    }
}

/// Counts a stream as open until dropped.
struct StreamGuard(Rc<Shared>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.open.set(self.0.open.get() - 1);
        self.0.changed.notify_one();
    }
}

/// Serves one HTTP/2 client connection until it closes, fails, is idle for the idle timeout,
/// or (after `shutdown` turns true) its open streams are answered.
pub async fn serve<IO, H, F, B>(
    io: IO,
    cfg: &Config,
    mut shutdown: watch::Receiver<bool>,
    handler: H,
) where
    IO: AsyncRead + AsyncWrite + Unpin + 'static,
    H: Fn(Request<ClientBody>) -> F + 'static,
    F: Future<Output = Response<B>> + 'static,
    B: Body<Data = Bytes> + HeadLines + 'static,
    B::Error: fmt::Display,
{
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(cfg.max_header_size)
        .max_send_buffer_size(SEND_BUFFER);
    let mut conn =
        match tokio::time::timeout(cfg.idle_timeout, builder.handshake::<_, Bytes>(io)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!("HTTP/2 handshake failed: {e}");
                return;
            }
            Err(_) => return,
        };
    let shared = Rc::new(Shared {
        open: Cell::new(0),
        changed: Notify::new(),
        resets: Cell::new(0),
        reset_window: Cell::new(Instant::now()),
        abusive: Cell::new(false),
    });
    let handler = Rc::new(handler);
    let server = cfg.server.clone();
    let mut stopping = *shutdown.borrow();
    if stopping {
        conn.graceful_shutdown();
    }
    let mut idle_since = Instant::now();
    // After an idle GOAWAY, the client gets one more idle timeout to let the connection close
    // (h2 waits for the client's PING acknowledgement, which a flooding client never sends).
    let mut close_by: Option<Instant> = None;
    loop {
        let idle = shared.open.get() == 0 && !stopping;
        let idle_at = idle_since + cfg.idle_timeout;
        let hard_close = close_by.unwrap_or(idle_at);
        tokio::select! {
            accepted = conn.accept() => match accepted {
                Some(Ok((req, respond))) => {
                    shared.open.set(shared.open.get() + 1);
                    let guard = StreamGuard(shared.clone());
                    tokio::task::spawn_local(serve_stream(
                        req,
                        respond,
                        handler.clone(),
                        server.clone(),
                        guard,
                    ));
                }
                Some(Err(e)) => {
                    tracing::debug!("HTTP/2 connection failed: {e}");
                    return;
                }
                None => return,
            },
            _ = shared.changed.notified() => {
                if shared.abusive.get() {
                    tracing::warn!("HTTP/2 client reset more than {MAX_CLIENT_RESETS} streams in {}s; closing its connection", RESET_WINDOW.as_secs());
                    conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                    // Let h2 write the GOAWAY, then close.
                    let _ = tokio::time::timeout(Duration::from_secs(1), poll_fn(|cx| conn.poll_closed(cx))).await;
                    return;
                }
                if shared.open.get() == 0 {
                    idle_since = Instant::now();
                }
            }
            _ = tokio::time::sleep_until(idle_at), if idle => {
                stopping = true;
                close_by = Some(Instant::now() + cfg.idle_timeout);
                conn.graceful_shutdown();
            }
            _ = tokio::time::sleep_until(hard_close), if close_by.is_some() => {
                tracing::debug!("HTTP/2 client did not close after GOAWAY; closing");
                return;
            }
            r = shutdown.changed(), if !stopping => {
                if r.is_err() || *shutdown.borrow() {
                    stopping = true;
                    conn.graceful_shutdown();
                }
            }
        }
    }
}

/// Serves one stream: the request through the handler, the response back with backpressure.
async fn serve_stream<H, F, B>(
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    handler: Rc<H>,
    server: HeaderValue,
    guard: StreamGuard,
) where
    H: Fn(Request<ClientBody>) -> F,
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + HeadLines,
    B::Error: fmt::Display,
{
    let shared = guard.0.clone();
    let req = match into_request(req) {
        Ok(r) => r,
        Err(status) => {
            let mut res = Response::new(());
            *res.status_mut() = status;
            res.headers_mut().insert(header::SERVER, server);
            let _ = respond.send_response(res, true);
            return;
        }
    };
    let head_request = req.method() == Method::HEAD;
    // For the log line of a reset (refcount bumps, no copy of the text).
    let (method, uri) = (req.method().clone(), req.uri().clone());
    // The client may reset the stream while the handler works: the handler (and its upstream
    // request) is dropped then.
    let res = tokio::select! {
        res = handler(req) => res,
        r = poll_fn(|cx| respond.poll_reset(cx)) => {
            shared.note_reset();
            // nginx logs such a request with status 499; this is its line here (the handler,
            // dropped, writes no access log).
            tracing::info!(%method, path = %uri.path(), reason = %reset_reason(r), "HTTP/2 client reset the stream before its response");
            return;
        }
    };
    let (parts, body) = res.into_parts();
    let mut head = Response::new(());
    *head.status_mut() = parts.status;
    *head.headers_mut() = response_headers(parts.headers, body.head_lines(), &server);
    let no_body = head_request
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED;
    if !no_body && !head.headers().contains_key(header::CONTENT_LENGTH) {
        if let Some(n) = body.size_hint().exact() {
            head.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
    if parts.status == StatusCode::NO_CONTENT {
        head.headers_mut().remove(header::CONTENT_LENGTH);
    }
    let end = no_body || body.is_end_stream();
    let mut send = match respond.send_response(head, end) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!("sending an HTTP/2 response failed: {e}");
            return;
        }
    };
    if end {
        return;
    }
    if let Err(e) = send_body(&mut send, body).await {
        match e {
            SendError::Reset => {
                shared.note_reset();
                tracing::info!(%method, path = %uri.path(), "HTTP/2 client reset the stream during its response body");
            }
            SendError::Body(e) => {
                tracing::debug!("HTTP/2 response body failed: {e}");
                send.send_reset(h2::Reason::INTERNAL_ERROR);
            }
            SendError::H2(e) => tracing::debug!("sending an HTTP/2 response body failed: {e}"),
        }
    }
    drop(guard);
}

/// What a client's RST_STREAM said (its error code's name).
fn reset_reason(r: Result<h2::Reason, h2::Error>) -> String {
    match r {
        Ok(reason) => format!("{reason:?}"),
        Err(e) => e.to_string(),
    }
}

enum SendError {
    /// The client reset the stream.
    Reset,
    /// The body failed (the upstream went away mid-body): the client sees a reset stream.
    Body(String),
    H2(h2::Error),
}

/// Sends the body frame by frame, each one only as the client's window lets it, then the
/// trailers if the body ends in some.
async fn send_body<B>(send: &mut h2::SendStream<Bytes>, body: B) -> Result<(), SendError>
where
    B: Body<Data = Bytes>,
    B::Error: fmt::Display,
{
    let mut body = std::pin::pin!(body);
    loop {
        let frame = tokio::select! {
            f = poll_fn(|cx| body.as_mut().poll_frame(cx)) => f,
            _ = poll_fn(|cx| send.poll_reset(cx)) => return Err(SendError::Reset),
        };
        match frame {
            None => return send.send_data(Bytes::new(), true).map_err(SendError::H2),
            Some(Err(e)) => return Err(SendError::Body(e.to_string())),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let last = body.is_end_stream();
                    send_data(send, data, last).await?;
                    if last {
                        return Ok(());
                    }
                }
                Err(frame) => {
                    if let Ok(mut trailers) = frame.into_trailers() {
                        strip_connection_headers(&mut trailers);
                        return send.send_trailers(trailers).map_err(SendError::H2);
                    }
                }
            },
        }
    }
}

/// Sends `data` in pieces the flow-control window has room for.
async fn send_data(
    send: &mut h2::SendStream<Bytes>,
    mut data: Bytes,
    last: bool,
) -> Result<(), SendError> {
    if data.is_empty() {
        return if last {
            send.send_data(data, true).map_err(SendError::H2)
        } else {
            Ok(())
        };
    }
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(n)) => n,
            Some(Err(e)) => {
                return Err(if e.is_reset() {
                    SendError::Reset
                } else {
                    SendError::H2(e)
                })
            }
            // The stream is gone (the client reset it).
            None => return Err(SendError::Reset),
        };
        if granted == 0 {
            continue;
        }
        let piece = data.split_to(granted.min(data.len()));
        send.send_data(piece, last && data.is_empty())
            .map_err(SendError::H2)?;
    }
    Ok(())
}

/// The request as the handler takes it: the `:authority` also as `Host` (as nginx does, so
/// plugins and an HTTP/1.1 upstream see it), split `Cookie` fields joined again (RFC 9113
/// §8.2.3), the body as a [`ClientBody`].
fn into_request(req: Request<h2::RecvStream>) -> Result<Request<ClientBody>, StatusCode> {
    let (mut parts, stream) = req.into_parts();
    if parts.headers.len() > MAX_HEADERS {
        return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }
    if parts.method == Method::CONNECT {
        return Err(StatusCode::METHOD_NOT_ALLOWED);
    }
    if !parts.headers.contains_key(header::HOST) {
        if let Some(a) = parts.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                parts.headers.insert(header::HOST, v);
            }
        }
    }
    join_cookies(&mut parts.headers);
    let body = RecvBody::new(stream, &parts.headers);
    Ok(Request::from_parts(parts, ClientBody::Http2(body)))
}

/// Joins several `Cookie` fields into one, separated by "; ".
fn join_cookies(headers: &mut HeaderMap) {
    let mut all = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (all.next(), all.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for v in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(joined)) {
        headers.insert(header::COOKIE, v);
    }
}

/// Headers HTTP/2 forbids (RFC 9113 §8.2.2): they describe an HTTP/1.1 connection.
static CONNECTION_HEADERS: [HeaderName; 5] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Leaves out the headers HTTP/2 forbids, and `TE` unless it is `trailers`.
pub fn strip_connection_headers(headers: &mut HeaderMap) {
    for name in &CONNECTION_HEADERS {
        headers.remove(name);
    }
    if headers
        .get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
}

/// The response's headers for HTTP/2: the handler's, then the upstream's lines when they
/// passed unparsed, without the connection-specific ones, with `Server` and `Date`.
fn response_headers(
    mut headers: HeaderMap,
    raw: Option<&crate::http1::RawHead>,
    server: &HeaderValue,
) -> HeaderMap {
    if let Some(raw) = raw {
        raw.clone().into_headers(&mut headers);
    }
    strip_connection_headers(&mut headers);
    if !headers.contains_key(header::SERVER) {
        headers.insert(header::SERVER, server.clone());
    }
    if !headers.contains_key(header::DATE) {
        if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(std::time::SystemTime::now()))
        {
            headers.insert(header::DATE, v);
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_joined() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        h.append(header::COOKIE, HeaderValue::from_static("c=3"));
        join_cookies(&mut h);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(h[header::COOKIE], "a=1; b=2; c=3");
        // One cookie field stays as it is.
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        join_cookies(&mut h);
        assert_eq!(h[header::COOKIE], "a=1");
    }

    #[test]
    fn connection_headers_are_left_out() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_connection_headers(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_connection_headers(&mut h);
        assert_eq!(h[header::TE], "trailers");
    }

    #[test]
    fn raw_lines_join_the_response_headers() {
        let raw = crate::http1::RawHead {
            lines: Bytes::from_static(b"x-up: 1\r\ndate: Mon, 30 Nov 2026 06:00:00 GMT\r\n"),
            has_date: true,
        };
        let h = response_headers(
            HeaderMap::new(),
            Some(&raw),
            &HeaderValue::from_static("moongate"),
        );
        assert_eq!(h["x-up"], "1");
        assert_eq!(h[header::DATE], "Mon, 30 Nov 2026 06:00:00 GMT");
        assert_eq!(h[header::SERVER], "moongate");
    }
}
