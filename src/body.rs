//! Request and response body types that stream through the gateway.
//!
//! Bodies are never buffered unless a plugin asks for the whole body (`core.request.get_body`,
//! openfunction) or a `body_filter` needs it: a 1 GiB upload or download passes in chunks.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::http1::server::{RecvBody, RecvError};
use crate::proxy::client::UpstreamBody;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body was larger than the allowed size.
#[derive(Debug, thiserror::Error)]
#[error("request size {size} is greater than the maximum size {max} allowed")]
pub struct BodyTooLarge {
    pub size: u64,
    pub max: u64,
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyReadError {
    #[error(transparent)]
    TooLarge(#[from] BodyTooLarge),
    /// The client's fault: framing the body cannot have, or the client went away mid-body.
    #[error("failed to read the request body: {message}")]
    Client {
        fault: ClientBodyFault,
        message: String,
    },
    #[error("failed to read the request body: {0}")]
    Io(String),
}

impl BodyReadError {
    /// The client's fault this stands for, if it is one (a body over the limit is too).
    pub fn client_fault(&self) -> Option<ClientBodyFault> {
        match self {
            BodyReadError::TooLarge(_) => Some(ClientBodyFault::TooLarge),
            BodyReadError::Client { fault, .. } => Some(*fault),
            BodyReadError::Io(_) => None,
        }
    }
}

/// A request body still on the client connection, whatever HTTP version the client speaks.
/// An enum rather than a boxed body: the HTTP/1.1 path pays one branch per poll, no allocation.
#[derive(Debug)]
pub enum ClientBody {
    Http1(RecvBody),
    Http2(crate::http2::RecvBody),
}

/// Why a client's request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    #[error(transparent)]
    Http1(#[from] RecvError),
    #[error("reading the HTTP/2 request body failed: {0}")]
    Http2(#[from] h2::Error),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        match self.get_mut() {
            ClientBody::Http1(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(ClientBodyError::Http1))),
            ClientBody::Http2(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(ClientBodyError::Http2))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Http1(b) => b.is_end_stream(),
            ClientBody::Http2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Http1(b) => b.size_hint(),
            ClientBody::Http2(b) => b.size_hint(),
        }
    }
}

/// A request body as the proxy forwards it.
#[derive(Debug, Default)]
pub enum RequestBody {
    #[default]
    Empty,
    /// Read whole (a plugin asked for it, or a plugin replaced it).
    Full(Bytes),
    /// Still on the client connection.
    Stream(ClientBody),
}

impl RequestBody {
    /// Reads the whole body into memory (if it was not already), refusing more than `max` bytes.
    /// The body stays available for the upstream request.
    pub async fn read_all(&mut self, max: u64) -> Result<Option<Bytes>, BodyReadError> {
        match self {
            RequestBody::Empty => Ok(None),
            RequestBody::Full(b) => {
                if b.len() as u64 > max {
                    return Err(BodyTooLarge {
                        size: b.len() as u64,
                        max,
                    }
                    .into());
                }
                Ok(Some(b.clone()))
            }
            RequestBody::Stream(incoming) => {
                if let Some(len) = incoming.size_hint().exact() {
                    if len > max {
                        return Err(BodyTooLarge { size: len, max }.into());
                    }
                }
                let mut buf = BytesMut::new();
                while let Some(frame) = incoming.frame().await {
                    let frame = frame.map_err(|e| match ClientBodyFault::of(&e) {
                        Some(fault) => BodyReadError::Client {
                            fault,
                            message: e.to_string(),
                        },
                        None => BodyReadError::Io(e.to_string()),
                    })?;
                    if let Ok(data) = frame.into_data() {
                        if (buf.len() + data.len()) as u64 > max {
                            return Err(BodyTooLarge {
                                size: (buf.len() + data.len()) as u64,
                                max,
                            }
                            .into());
                        }
                        buf.extend_from_slice(&data);
                    }
                }
                let bytes = buf.freeze();
                *self = if bytes.is_empty() {
                    RequestBody::Empty
                } else {
                    RequestBody::Full(bytes.clone())
                };
                Ok(if bytes.is_empty() { None } else { Some(bytes) })
            }
        }
    }

    /// The exact length when known without reading.
    pub fn exact_len(&self) -> Option<u64> {
        match self {
            RequestBody::Empty => Some(0),
            RequestBody::Full(b) => Some(b.len() as u64),
            RequestBody::Stream(i) => i.size_hint().exact(),
        }
    }
}

/// Reads a refused request body to its end (up to 64 MiB and 5 seconds) and drops it, so the
/// client reads the refusal (413) instead of a connection reset mid-upload: nginx's lingering
/// close.
pub async fn drain<B: Body<Data = Bytes> + Unpin>(mut body: B) {
    const LIMIT: u64 = 64 * 1024 * 1024;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut seen = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(d) = frame.data_ref() {
                seen += d.len() as u64;
                if seen > LIMIT {
                    break;
                }
            }
        }
    })
    .await;
}

/// How a client's request body failed while it streamed upstream: the client's fault, so the
/// proxy answers for the client (413, 400) instead of blaming the upstream with a 502.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientBodyFault {
    /// Larger than `client_max_body_size`.
    TooLarge,
    /// Framing the body cannot have (a bad chunk size, a bare LF, ...).
    Malformed,
    /// The client closed (or reset) the connection before the end of the body.
    Incomplete,
}

impl ClientBodyFault {
    /// The fault a request body read error stands for; None when it was not the client's (the
    /// body was detached by the gateway itself).
    pub fn of(e: &ClientBodyError) -> Option<ClientBodyFault> {
        match e {
            ClientBodyError::Http1(RecvError::Chunked(_)) => Some(ClientBodyFault::Malformed),
            ClientBodyError::Http1(RecvError::Incomplete | RecvError::Io(_)) => {
                Some(ClientBodyFault::Incomplete)
            }
            ClientBodyError::Http1(RecvError::Detached) => None,
            // h2 resets a stream whose data breaks the protocol (more or less data than its
            // content-length): the client's framing; any other failure is the client going
            // away (RST_STREAM, the connection closing).
            ClientBodyError::Http2(e) if e.reason() == Some(h2::Reason::PROTOCOL_ERROR) => {
                Some(ClientBodyFault::Malformed)
            }
            ClientBodyError::Http2(_) => Some(ClientBodyFault::Incomplete),
        }
    }
}

impl ClientBodyFault {
    /// The status the client is answered with: 413 or 400, as nginx.
    pub fn status(self) -> http::StatusCode {
        match self {
            ClientBodyFault::TooLarge => http::StatusCode::PAYLOAD_TOO_LARGE,
            ClientBodyFault::Malformed | ClientBodyFault::Incomplete => {
                http::StatusCode::BAD_REQUEST
            }
        }
    }

    /// Logs the fault as the client's (nginx logs a client's bad body at `info`): `warn` for a
    /// malformed body, `info` for a client that went away, nothing for one over the limit
    /// (its 413 in the access log says it).
    pub fn log(self, route: &str, client: &std::net::SocketAddr, e: &dyn std::fmt::Display) {
        match self {
            ClientBodyFault::TooLarge => {}
            ClientBodyFault::Malformed => {
                tracing::warn!(route, client = %client, "bad request body from the client: {e}")
            }
            ClientBodyFault::Incomplete => tracing::info!(
                route,
                client = %client,
                "client closed the connection before sending the whole request body: {e}"
            ),
        }
    }
}

/// Where [`UpstreamRequestBody`] leaves the client's fault for the proxy to read once the
/// upstream call has failed.
pub type FaultCell = Rc<Cell<Option<ClientBodyFault>>>;

/// A copy of a streamed request body kept for the log phase (nginx keeps a body up to
/// `client_body_buffer_size` in memory, where `ngx.req.get_body_data()` in log finds it).
/// Filled as the body streams upstream; given up once it passes its limit.
#[derive(Debug, Clone)]
pub struct KeptBody(Rc<RefCell<Kept>>);

#[derive(Debug)]
struct Kept {
    buf: BytesMut,
    limit: usize,
    /// The client sent the whole body and all of it is in `buf`.
    complete: bool,
    /// The body passed `limit`: nothing is kept.
    overflow: bool,
}

impl KeptBody {
    /// Keeps up to `limit` bytes.
    pub fn new(limit: usize) -> KeptBody {
        KeptBody(Rc::new(RefCell::new(Kept {
            buf: BytesMut::new(),
            limit,
            complete: false,
            overflow: false,
        })))
    }

    fn push(&self, data: &Bytes) {
        let mut k = self.0.borrow_mut();
        if k.overflow {
            return;
        }
        if k.buf.len() + data.len() > k.limit {
            k.overflow = true;
            k.buf = BytesMut::new();
            return;
        }
        k.buf.extend_from_slice(data);
    }

    fn finish(&self) {
        let mut k = self.0.borrow_mut();
        k.complete = !k.overflow;
    }

    /// The whole body, when the client sent all of it and it fit.
    pub fn get(&self) -> Option<Bytes> {
        let k = self.0.borrow();
        k.complete.then(|| Bytes::copy_from_slice(&k.buf))
    }
}

/// A request body on its way upstream, enforcing the client body limit while it streams.
pub struct UpstreamRequestBody {
    inner: RequestBody,
    sent: u64,
    max: Option<u64>,
    /// Set when the body failed by the client's fault.
    fault: FaultCell,
    /// Where a streamed body is copied for the log phase, when one asked.
    keep: Option<KeptBody>,
}

impl UpstreamRequestBody {
    pub fn new(inner: RequestBody, max: Option<u64>, fault: FaultCell) -> Self {
        UpstreamRequestBody {
            inner,
            sent: 0,
            max,
            fault,
            keep: None,
        }
    }

    /// Copies a streamed body into `keep` as it goes upstream.
    pub fn keeping(mut self, keep: KeptBody) -> Self {
        self.keep = Some(keep);
        self
    }
}

impl UpstreamRequestBody {
    /// A second copy of a body that is in memory (empty or read whole), for sending the
    /// request again; None for a body still streaming from the client.
    pub fn replay(&self) -> Option<Self> {
        let inner = match &self.inner {
            RequestBody::Empty => RequestBody::Empty,
            RequestBody::Full(b) => RequestBody::Full(b.clone()),
            // A request without a body still arrives as a (finished) stream.
            RequestBody::Stream(i) if i.is_end_stream() => RequestBody::Empty,
            RequestBody::Stream(_) => return None,
        };
        Some(UpstreamRequestBody {
            inner,
            sent: 0,
            max: self.max,
            fault: self.fault.clone(),
            keep: None,
        })
    }
}

impl Body for UpstreamRequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match &mut this.inner {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Full(b) => {
                let data = std::mem::take(b);
                this.inner = RequestBody::Empty;
                if data.is_empty() {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
            }
            RequestBody::Stream(incoming) => match Pin::new(&mut *incoming).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        this.sent += data.len() as u64;
                        if let Some(max) = this.max {
                            if this.sent > max {
                                this.fault.set(Some(ClientBodyFault::TooLarge));
                                return Poll::Ready(Some(Err(Box::new(BodyTooLarge {
                                    size: this.sent,
                                    max,
                                }))));
                            }
                        }
                        if let Some(k) = &this.keep {
                            k.push(data);
                            // The sender may stop polling at the end of a sized body.
                            if incoming.is_end_stream() {
                                k.finish();
                            }
                        }
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => {
                    this.fault.set(ClientBodyFault::of(&e));
                    Poll::Ready(Some(Err(Box::new(e))))
                }
                Poll::Ready(None) => {
                    if let Some(k) = &this.keep {
                        k.finish();
                    }
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            RequestBody::Empty => true,
            RequestBody::Full(b) => b.is_empty(),
            RequestBody::Stream(i) => i.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Full(b) => SizeHint::with_exact(b.len() as u64),
            RequestBody::Stream(i) => i.size_hint(),
        }
    }
}

/// No response body data arrived from the peer within the read timeout.
#[derive(Debug, thiserror::Error)]
#[error("timeout while reading the response body")]
pub struct ReadTimeout;

/// A peer's response body that fails with [`ReadTimeout`] when no data arrives for `limit`:
/// the read timeout bounds each wait for data, as nginx's `proxy_read_timeout` does.
pub struct IdleTimeout<B = UpstreamBody> {
    inner: B,
    limit: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Called once when the timeout fires (a plugin's own log line).
    on_timeout: Option<fn()>,
}

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, limit: Duration) -> Self {
        IdleTimeout {
            inner,
            limit,
            sleep: None,
            on_timeout: None,
        }
    }

    /// Runs `f` when the timeout fires.
    pub fn on_timeout(mut self, f: fn()) -> Self {
        self.on_timeout = Some(f);
        self
    }
}

impl<B> Body for IdleTimeout<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.sleep = None;
                Poll::Ready(frame.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                let limit = this.limit;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                if sleep.as_mut().poll(cx).is_ready() {
                    if let Some(f) = this.on_timeout {
                        f();
                    }
                    return Poll::Ready(Some(Err(Box::new(ReadTimeout))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body: from the upstream (streaming) or made by the gateway.
// An upstream body owns its connection and buffers inline (a few hundred bytes): moving it a
// few times per request costs less than boxing it, a heap allocation per request.
#[allow(clippy::large_enum_variant)]
#[derive(Default)]
pub enum ResponseBody {
    #[default]
    Empty,
    Full(Bytes),
    /// A peer's body under a read timeout.
    Timed(IdleTimeout),
    /// Any other body (a filtered or time-limited stream).
    Boxed(http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>),
}

impl ResponseBody {
    pub fn boxed<B>(body: B) -> Self
    where
        B: Body<Data = Bytes> + 'static + Send,
        B::Error: Into<BoxError>,
    {
        ResponseBody::Boxed(body.map_err(Into::into).boxed_unsync())
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match this {
            ResponseBody::Empty => Poll::Ready(None),
            ResponseBody::Full(b) => {
                let data = std::mem::take(b);
                *this = ResponseBody::Empty;
                if data.is_empty() {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
            }
            ResponseBody::Timed(t) => Pin::new(t).poll_frame(cx),
            ResponseBody::Boxed(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Empty => true,
            ResponseBody::Full(b) => b.is_empty(),
            ResponseBody::Timed(t) => t.is_end_stream(),
            ResponseBody::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Empty => SizeHint::with_exact(0),
            ResponseBody::Full(b) => SizeHint::with_exact(b.len() as u64),
            ResponseBody::Timed(t) => t.size_hint(),
            ResponseBody::Boxed(b) => b.size_hint(),
        }
    }
}
