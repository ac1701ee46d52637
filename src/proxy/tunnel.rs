//! WebSocket over HTTP/1.1 (RFC 6455 §4, RFC 9110 §7.8): which requests are tunnelled, the
//! `101` the client gets, and the byte tunnel that joins the client's connection to the
//! upstream's once both switched.
//!
//! The request phases (rewrite, access: auth plugins) run on the upgrade request as on any
//! other; the handler forwards `Upgrade: websocket` and `Connection: upgrade` only when
//! [`requested`] says so, and only an upstream `101` to such a request becomes a tunnel (any
//! other `101` is a 502). header_filter sees the `101`; the log phase runs when the tunnel
//! closes, with the bytes moved each way.

use std::cell::Cell;
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::client::{Upgraded, UpstreamResponse};
use super::handler::GatewayBody;
use crate::body::ResponseBody;
use crate::config::NodeConfig;
use crate::http1::server;
use crate::plugin::{Ctx, ResponseHead};
use crate::snapshot::{RouteEntry, Snapshot};

static WEBSOCKET: HeaderValue = HeaderValue::from_static("websocket");

/// Size of each direction's copy buffer.
const BUF: usize = 16 * 1024;

/// The protocol to ask the upstream for when the request is a WebSocket opening handshake the
/// route tunnels: `enable_websocket` in effect, HTTP/1.1, `GET` without a body, `Connection`
/// naming `upgrade` and `Upgrade` naming `websocket`. Only WebSocket is tunnelled: passing
/// other upgrades on (`h2c` above all) would let a client speak to the upstream past the
/// gateway's routing and plugins.
pub(super) fn requested(ctx: &Ctx, route: &RouteEntry) -> Option<&'static HeaderValue> {
    if !route.enable_websocket
        || ctx.version != Version::HTTP_11
        || ctx.method != Method::GET
        || ctx.body.exact_len() != Some(0)
    {
        return None;
    }
    let names = |name: header::HeaderName, token: &str| {
        ctx.headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    (names(header::CONNECTION, "upgrade") && names(header::UPGRADE, "websocket"))
        .then_some(&WEBSOCKET)
}

/// The client's `101` for an upstream `101` to a tunnelled upgrade: the upstream's headers
/// (`Sec-WebSocket-Accept`, `-Protocol`, `-Extensions`) with `Upgrade: websocket`, through
/// header_filter; when the status is still `101` after it, the response carries the upstream
/// connection for the HTTP/1.1 server to join to the client's ([`GatewayBody`]'s
/// `take_upgrade`).
pub(super) fn respond(
    ctx: Box<Ctx>,
    snap: Arc<Snapshot>,
    res: UpstreamResponse,
    upstream: Upgraded,
    idle: Duration,
    node: &NodeConfig,
) -> Response<GatewayBody> {
    let mut headers = res.headers;
    if res.te_or_trailer {
        headers.remove(header::TE);
        headers.remove(header::TRAILER);
    }
    headers.insert(header::UPGRADE, WEBSOCKET.clone());
    let head = ResponseHead {
        status: StatusCode::SWITCHING_PROTOCOLS,
        headers,
    };
    let mut response = super::handler::respond(ctx, snap, head, res.raw, ResponseBody::Empty, node);
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        response.body_mut().set_tunnel(Peer { upstream, idle });
    }
    // Otherwise a header_filter changed the answer: the upstream connection closes with
    // `upstream` dropped, and the client gets that answer as HTTP.
    response
}

/// The upstream side of a tunnel, waiting for the client's `101` to be written.
pub struct Peer {
    upstream: Upgraded,
    /// The tunnel closes after this long without a byte either way (the upstream's
    /// `timeout.read`).
    idle: Duration,
}

/// How a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Both sides closed (or one closed and the other followed).
    Normally,
    /// Nothing moved either way for the idle timeout.
    IdleTimeout,
    /// A read or write failed (reset, broken pipe).
    Failed,
    /// The worker stopped (graceful shutdown's deadline) with the tunnel open.
    Shutdown,
}

/// What a tunnel moved, for the log phase and the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelEnd {
    /// Bytes written to the upstream (what the client sent).
    pub to_upstream: u64,
    /// Bytes written to the client (what the upstream sent).
    pub to_client: u64,
    pub closed: Closed,
}

impl TunnelEnd {
    /// The counts as the log phase sees them: nginx's `$upstream_bytes_sent` and
    /// `$upstream_bytes_received` (here: the tunnel's bytes, without the handshake's).
    pub fn record(&self, ctx: &mut Ctx) {
        ctx.vars
            .insert("upstream_bytes_sent".into(), self.to_upstream.to_string());
        ctx.vars
            .insert("upstream_bytes_received".into(), self.to_client.to_string());
    }
}

impl fmt::Display for TunnelEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = match self.closed {
            Closed::Normally => "closed",
            Closed::IdleTimeout => "idle timeout",
            Closed::Failed => "failed",
            Closed::Shutdown => "shutdown",
        };
        write!(
            f,
            " (websocket: {} bytes to upstream, {} bytes to client, {how})",
            self.to_upstream, self.to_client
        )
    }
}

/// Counts a tunnel's bytes as they are written, and when something last moved.
pub struct Meter {
    to_upstream: Cell<u64>,
    to_client: Cell<u64>,
    last: Cell<Instant>,
}

impl Default for Meter {
    fn default() -> Self {
        Meter {
            to_upstream: Cell::new(0),
            to_client: Cell::new(0),
            last: Cell::new(Instant::now()),
        }
    }
}

impl Meter {
    /// What moved so far, and how the tunnel ended.
    pub fn end(&self, closed: Closed) -> TunnelEnd {
        TunnelEnd {
            to_upstream: self.to_upstream.get(),
            to_client: self.to_client.get(),
            closed,
        }
    }
}

/// Joins the client's connection (`pending`: what the client sent after the request head) to
/// the upstream's, byte for byte both ways, until both have closed (a side's close is passed
/// on as a half-close, and the other direction goes on), a read or write fails, or nothing
/// moves for the idle timeout. The worker stopping drops it (after graceful shutdown's
/// deadline), which closes both connections.
pub async fn run(
    client: server::Upgraded,
    pending: Bytes,
    peer: Peer,
    meter: &Meter,
    route: &str,
) -> Closed {
    let mut client = Side {
        io: client,
        pending,
        written: &meter.to_client,
        last: &meter.last,
    };
    let mut upstream = Side {
        io: peer.upstream.io,
        pending: peer.upstream.rest,
        written: &meter.to_upstream,
        last: &meter.last,
    };
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, BUF, BUF);
    tokio::pin!(copy);
    loop {
        let deadline = meter.last.get() + peer.idle;
        tokio::select! {
            r = &mut copy => {
                return match r {
                    Ok(_) => Closed::Normally,
                    Err(e) => {
                        tracing::info!(route, "websocket tunnel failed: {e}");
                        Closed::Failed
                    }
                };
            }
            () = tokio::time::sleep_until(deadline) => {
                if meter.last.get() + peer.idle <= Instant::now() {
                    tracing::info!(route, "websocket tunnel closed: idle for {:?}", peer.idle);
                    return Closed::IdleTimeout;
                }
            }
        }
    }
}

/// One side of a tunnel: reads give `pending` first (what arrived behind the handshake),
/// writes are counted, and any byte moving either way is noted as activity.
struct Side<'a, S> {
    io: S,
    pending: Bytes,
    written: &'a Cell<u64>,
    last: &'a Cell<Instant>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Side<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.pending.is_empty() {
            let n = this.pending.len().min(buf.remaining());
            buf.put_slice(&this.pending.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.last.set(Instant::now());
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Side<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.written.set(this.written.get() + n as u64);
            this.last.set(Instant::now());
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
