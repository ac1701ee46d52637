//! The HTTP/2 upstream client, for gRPC upstreams (`scheme: grpc` with prior knowledge,
//! `grpcs` with ALPN `h2`).
//!
//! Each worker keeps one connection per target and multiplexes every request to that target
//! on it, as HTTP/2 intends (a connection's stream limit is the upstream's
//! `SETTINGS_MAX_CONCURRENT_STREAMS`; a request waits for a free stream). A connection is
//! driven by a task of its own; when it fails or the upstream sends GOAWAY, the next request
//! makes a new one. The request body streams to the upstream from a task of its own too, so
//! both directions flow at once (gRPC bidirectional streaming), each with HTTP/2 flow control.

use std::cell::RefCell;
use std::collections::HashMap;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body::{Body, Frame, SizeHint};

use crate::body::{BoxError, UpstreamRequestBody};
use crate::dns;
use crate::proxy::client::{connect_pinned, Alpn, ClientError, Target};

use super::RecvBody;

/// A worker's connection to one target, with the DNS answer it was made with.
type Pooled = (h2::client::SendRequest<Bytes>, Option<dns::Pin>);

thread_local! {
    /// This worker's connections, one per target.
    static CONNECTIONS: RefCell<HashMap<Target, Pooled>> = RefCell::new(HashMap::new());
}

/// An upstream's answer over HTTP/2.
pub struct Http2Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: ResponseBody,
}

/// A response body from an HTTP/2 upstream: data frames, then the trailers (`grpc-status`,
/// `grpc-message`). Dropping it stops the request body's task too.
pub struct ResponseBody {
    inner: RecvBody,
    _upload: AbortOnDrop,
}

struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().inner)
            .poll_frame(cx)
            .map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection to an HTTP/2 upstream with a stream free for one request.
pub struct Sender(h2::client::SendRequest<Bytes>);

/// A connection to `target` that can take a request now: this worker's, or a new one made
/// within `connect_timeout`.
pub async fn connect(target: &Target, connect_timeout: Duration) -> Result<Sender, ClientError> {
    let cached = CONNECTIONS.with(|c| c.borrow().get(target).cloned());
    // A connection made with a DNS answer that has changed since takes no new request: the
    // streams it carries finish on it, new ones go to the new addresses.
    let cached = cached.and_then(|(sender, pin)| match pin {
        Some(pin) if !pin.current() => {
            CONNECTIONS.with(|c| c.borrow_mut().remove(target));
            None
        }
        _ => Some(sender),
    });
    if let Some(sender) = cached {
        match sender.ready().await {
            Ok(s) => return Ok(Sender(s)),
            Err(e) => {
                // Closed meanwhile (GOAWAY, failure): forget it and connect again.
                tracing::debug!(node = %target.addr(), "HTTP/2 upstream connection gone ({e}); connecting again");
                CONNECTIONS.with(|c| c.borrow_mut().remove(target));
            }
        }
    }
    let (io, pin) = connect_pinned(target, connect_timeout, Alpn::Http2).await?;
    let handshake = h2::client::Builder::new()
        .initial_window_size(256 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .handshake::<_, Bytes>(io);
    // A failed handshake sent no request: it counts as a connect failure (retried elsewhere).
    let (sender, conn) = match tokio::time::timeout(connect_timeout, handshake).await {
        Ok(r) => r.map_err(|e| ClientError::Connect(format!("HTTP/2 handshake: {e}")))?,
        Err(_) => return Err(ClientError::ConnectTimeout),
    };
    let addr = target.addr();
    tokio::task::spawn_local(async move {
        if let Err(e) = conn.await {
            tracing::debug!(node = %addr, "HTTP/2 upstream connection ended: {e}");
        }
    });
    CONNECTIONS.with(|c| c.borrow_mut().insert(target.clone(), (sender.clone(), pin)));
    match sender.ready().await {
        Ok(s) => Ok(Sender(s)),
        Err(e) => Err(ClientError::Connect(format!(
            "HTTP/2 connection closed before the request: {e}"
        ))),
    }
}

/// Whether the upstream said it did not process the stream: `RST_STREAM` with
/// `REFUSED_STREAM`, or a graceful `GOAWAY` (`NO_ERROR`) whose last stream id is below it (h2
/// fails only those streams with the GOAWAY; the ones below it go on). A GOAWAY with an error
/// code may fail streams the upstream did process, so it does not count.
fn refused(e: &h2::Error) -> bool {
    e.is_remote()
        && ((e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM))
            || (e.is_go_away() && e.reason() == Some(h2::Reason::NO_ERROR)))
}

/// The most of a call's request body kept for sending it again after a refusal.
pub const RESEND_LIMIT: usize = 64 * 1024;

/// A call's request body, shared by the call and the task that uploads it, so a call the
/// upstream refused (see [`ClientError::Http2Refused`]) can go to another node: what was
/// taken from the client is kept, up to [`RESEND_LIMIT`] bytes, until the response head
/// arrives ([`CallBody::settle`]), and [`CallBody::rewind`] makes the next upload send it
/// again before the rest.
#[derive(Clone)]
pub struct CallBody(Rc<RefCell<CallState>>);

struct CallState {
    body: UpstreamRequestBody,
    /// The frames taken from `body`, in order (while `keeping`).
    kept: Vec<Kept>,
    kept_bytes: usize,
    /// False once more than the limit was taken or the head arrived: nothing is kept.
    keeping: bool,
    /// The next kept frame a rewound body yields before polling `body` again.
    replay_at: usize,
    /// `body` returned its end.
    ended: bool,
}

enum Kept {
    Data(Bytes),
    Trailers(HeaderMap),
}

impl CallBody {
    pub fn new(body: UpstreamRequestBody) -> CallBody {
        CallBody(Rc::new(RefCell::new(CallState {
            body,
            kept: Vec::new(),
            kept_bytes: 0,
            keeping: true,
            replay_at: 0,
            ended: false,
        })))
    }

    /// The response head arrived: the call will not be sent again, so nothing more is kept.
    pub fn settle(&self) {
        let mut s = self.0.borrow_mut();
        s.keeping = false;
        s.kept = Vec::new();
    }

    /// Makes the body start again from its first frame; false when it cannot (more than
    /// [`RESEND_LIMIT`] was taken from the client). Call only once the upload of the failed
    /// try is stopped.
    pub fn rewind(&self) -> bool {
        let mut s = self.0.borrow_mut();
        if !s.keeping {
            return false;
        }
        s.replay_at = 0;
        true
    }
}

impl Body for CallBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut s = self.0.borrow_mut();
        let s = &mut *s;
        if s.replay_at < s.kept.len() {
            let frame = match &s.kept[s.replay_at] {
                Kept::Data(d) => Frame::data(d.clone()),
                Kept::Trailers(t) => Frame::trailers(t.clone()),
            };
            s.replay_at += 1;
            return Poll::Ready(Some(Ok(frame)));
        }
        if s.ended {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut s.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => s.ended = true,
            Poll::Ready(Some(Ok(frame))) if s.keeping => {
                let kept = if let Some(d) = frame.data_ref() {
                    s.kept_bytes += d.len();
                    Kept::Data(d.clone())
                } else if let Some(t) = frame.trailers_ref() {
                    Kept::Trailers(t.clone())
                } else {
                    return polled;
                };
                if s.kept_bytes > RESEND_LIMIT {
                    s.keeping = false;
                    s.kept = Vec::new();
                } else {
                    s.kept.push(kept);
                    s.replay_at = s.kept.len();
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let s = self.0.borrow();
        s.replay_at >= s.kept.len() && (s.ended || s.body.is_end_stream())
    }
}

impl Sender {
    /// Sends `req` with `body` and waits for the response head for at most `head_timeout`.
    /// The body keeps streaming while the response does.
    pub async fn send(
        self,
        req: Request<()>,
        body: CallBody,
        head_timeout: Duration,
    ) -> Result<Http2Response, ClientError> {
        let mut sender = self.0;
        let end = body.is_end_stream();
        // Nothing went out: the connection closed (or was told to go away) meanwhile.
        let (response, stream) = sender.send_request(req, end).map_err(|e| {
            ClientError::Connect(format!("HTTP/2 connection closed before the request: {e}"))
        })?;
        let upload = if end {
            None
        } else {
            Some(tokio::task::spawn_local(upload(stream, body)))
        };
        let upload = AbortOnDrop(upload);
        let res = match tokio::time::timeout(head_timeout, response).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) if refused(&e) => return Err(ClientError::Http2Refused(e)),
            Ok(Err(e)) => return Err(ClientError::Http2(e)),
            Err(_) => return Err(ClientError::Timeout),
        };
        let (parts, stream) = res.into_parts();
        let inner = RecvBody::new(stream, &parts.headers);
        Ok(Http2Response {
            status: parts.status,
            headers: parts.headers,
            body: ResponseBody {
                inner,
                _upload: upload,
            },
        })
    }
}

/// Streams the request body (and its trailers) to the upstream, each frame as the stream's
/// window has room for it. A body that fails (the client went away) resets the stream.
async fn upload(mut stream: h2::SendStream<Bytes>, body: CallBody) {
    let mut body = std::pin::pin!(body);
    loop {
        let frame = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
        let sent = match frame {
            None => stream.send_data(Bytes::new(), true),
            Some(Err(e)) => {
                tracing::debug!("request body to the HTTP/2 upstream failed: {e}");
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    let last = body.is_end_stream();
                    if data.is_empty() {
                        if !last {
                            continue;
                        }
                        data = Bytes::new();
                        if let Err(e) = stream.send_data(data, true) {
                            tracing::debug!(
                                "sending the request body to the HTTP/2 upstream failed: {e}"
                            );
                        }
                        return;
                    }
                    let mut result = Ok(());
                    while !data.is_empty() {
                        stream.reserve_capacity(data.len());
                        match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                            Some(Ok(0)) => continue,
                            Some(Ok(n)) => {
                                let piece = data.split_to(n.min(data.len()));
                                if let Err(e) = stream.send_data(piece, last && data.is_empty()) {
                                    result = Err(e);
                                    break;
                                }
                            }
                            Some(Err(e)) => {
                                result = Err(e);
                                break;
                            }
                            None => return,
                        }
                    }
                    if result.is_ok() && !last {
                        continue;
                    }
                    result
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(mut trailers) => {
                        super::server::strip_connection_headers(&mut trailers);
                        let r = stream.send_trailers(trailers);
                        if r.is_ok() {
                            return;
                        }
                        r
                    }
                    Err(_) => continue,
                },
            },
        };
        if let Err(e) = sent {
            tracing::debug!("sending the request body to the HTTP/2 upstream failed: {e}");
        }
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::RequestBody;
    use std::cell::Cell;

    fn next(b: &mut CallBody) -> Option<Bytes> {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        match Pin::new(b).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(f))) => f.into_data().ok(),
            _ => None,
        }
    }

    fn body(data: &'static [u8]) -> CallBody {
        let inner = RequestBody::Full(Bytes::from_static(data));
        CallBody::new(UpstreamRequestBody::new(
            inner,
            None,
            Rc::new(Cell::new(None)),
        ))
    }

    #[test]
    fn a_rewound_body_sends_what_was_taken_again() {
        let mut b = body(b"message");
        assert_eq!(next(&mut b).as_deref(), Some(&b"message"[..]));
        assert!(b.is_end_stream());
        assert!(b.rewind());
        assert!(!b.is_end_stream());
        assert_eq!(next(&mut b).as_deref(), Some(&b"message"[..]));
        assert_eq!(next(&mut b), None);
        // Settled (the head arrived): nothing kept, no rewind.
        b.settle();
        assert!(!b.rewind());
    }

    #[test]
    fn a_body_over_the_limit_cannot_be_rewound() {
        static BIG: [u8; RESEND_LIMIT + 1] = [b'x'; RESEND_LIMIT + 1];
        let mut b = body(&BIG);
        assert_eq!(next(&mut b).map(|d| d.len()), Some(RESEND_LIMIT + 1));
        assert!(!b.rewind());
        assert_eq!(next(&mut b), None);
    }
}
