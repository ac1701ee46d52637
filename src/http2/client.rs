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
    let (sender, conn) = match tokio::time::timeout(connect_timeout, handshake).await {
        Ok(r) => r?,
        Err(_) => return Err(ClientError::ConnectTimeout),
    };
    let addr = target.addr();
    tokio::task::spawn_local(async move {
        if let Err(e) = conn.await {
            tracing::debug!(node = %addr, "HTTP/2 upstream connection ended: {e}");
        }
    });
    CONNECTIONS.with(|c| c.borrow_mut().insert(target.clone(), (sender.clone(), pin)));
    Ok(Sender(sender.ready().await?))
}

impl Sender {
    /// Sends `req` with `body` and waits for the response head for at most `head_timeout`.
    /// The body keeps streaming while the response does.
    pub async fn send(
        self,
        req: Request<()>,
        body: UpstreamRequestBody,
        head_timeout: Duration,
    ) -> Result<Http2Response, ClientError> {
        let mut sender = self.0;
        let end = body.is_end_stream();
        let (response, stream) = sender.send_request(req, end)?;
        let upload = if end {
            None
        } else {
            Some(tokio::task::spawn_local(upload(stream, body)))
        };
        let upload = AbortOnDrop(upload);
        let res = match tokio::time::timeout(head_timeout, response).await {
            Ok(r) => r?,
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
async fn upload(mut stream: h2::SendStream<Bytes>, body: UpstreamRequestBody) {
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
