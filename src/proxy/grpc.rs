//! Proxying to an HTTP/2 upstream (`scheme: grpc` / `grpcs`): the request goes out as an
//! HTTP/2 request, its body and trailers streaming, and the response's data and trailers
//! (`grpc-status`, `grpc-message`) come back through the same response phases as any other.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

use bytes::BytesMut;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use http_body::Body;

use super::handler::{
    client_body_failed, next_try, passive_failure, respond, respond_local, retry_deadline, secs,
    upstream_host, GatewayBody, WorkerEnv,
};
use super::headers::{ConnValues, Forwarding};
use crate::balancer::Selection;
use crate::body::{FaultCell, IdleTimeout, ResponseBody, UpstreamRequestBody};
use crate::config::{Timeout, Upstream};
use crate::health::Source;
use crate::http1::client::{put_header, HeadEdit};
use crate::http1::RawHead;
use crate::http2::client::{self as h2c, CallBody};
use crate::plugin::{Ctx, LocalResponse, ResponseHead};
use crate::proxy::client::ClientError;
use crate::snapshot::{RouteEntry, Snapshot, UpstreamEntry};

/// Sends the request to the balancer's node, and on a failure the node may not have seen
/// (a connect or handshake failure, a refused stream, see [`ClientError::Http2Refused`]) to
/// the next one, within `retries` and `retry_timeout` as over HTTP/1.1; then streams the
/// answer back. A call that reached a node and failed there is never sent again: its
/// messages may have been processed. Passive health checks hear of every try.
#[allow(clippy::too_many_arguments)]
pub(super) async fn proxy(
    env: Rc<WorkerEnv>,
    snap: Arc<Snapshot>,
    route: Arc<RouteEntry>,
    mut ctx: Box<Ctx>,
    conn_values: Rc<ConnValues>,
    upstream: &UpstreamEntry,
    mut sel: Selection,
    first: usize,
    timeout: Timeout,
) -> Response<GatewayBody> {
    let cfg = &upstream.config;
    let health = upstream.health.as_deref();
    let path = ctx
        .upstream_uri
        .clone()
        .unwrap_or_else(|| ctx.request_uri.clone());
    let scheme = if cfg.scheme.is_tls() { "https" } else { "http" };

    let fault: FaultCell = Rc::new(Cell::new(None));
    let max_body = ctx.client.body_limit();
    let upstream_body =
        UpstreamRequestBody::new(std::mem::take(&mut ctx.body), max_body, fault.clone());
    let mut headers = forwarded_headers(&ctx, &conn_values);
    // gRPC requires it; it is hop-by-hop for HTTP/1.1, so the forwarding rules dropped it.
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    if let Some(n) = upstream_body.size_hint().exact() {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    let body = CallBody::new(upstream_body);
    let retry_deadline = retry_deadline(cfg);
    let wait = secs(timeout.send) + secs(timeout.read);
    let mut idx = first;
    let mut tries = 1;
    let (res, load) = loop {
        let nt = &upstream.targets[idx];
        ctx.upstream_addr = Some(nt.addr.clone());
        let load = upstream.balancer.start_try(idx);
        let started = std::time::Instant::now();
        let err = match h2c::connect(&nt.target, secs(timeout.connect)).await {
            Err(e) => {
                tracing::error!(route = %route.id, node = %nt.addr, "upstream connect failed: {e}");
                e
            }
            Ok(sender) => {
                let req = match request(&ctx, cfg, idx, scheme, &path, &headers) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(route = %route.id, "bad upstream request: {e}");
                        let r = LocalResponse::text(StatusCode::BAD_REQUEST, "");
                        return respond_local(ctx, snap, r, &env.node);
                    }
                };
                match sender.send(req, body.clone(), wait).await {
                    Ok(r) => {
                        body.settle();
                        upstream.balancer.observe(idx, started.elapsed());
                        break (r, load);
                    }
                    Err(e) => {
                        if let Some(f) = fault.get() {
                            let local = client_body_failed(&ctx, f, &e);
                            return respond_local(ctx, snap, local, &env.node);
                        }
                        tracing::error!(route = %route.id, node = %nt.addr, "upstream request failed: {e}");
                        e
                    }
                }
            }
        };
        // A refused stream (over the node's stream limit, or a graceful GOAWAY before a
        // restart) says the node is busy or leaving, not that it failed the call.
        if !matches!(err, ClientError::Http2Refused(_)) {
            passive_failure(upstream, idx, &err);
        }
        let status = if err.is_timeout() {
            StatusCode::GATEWAY_TIMEOUT
        } else {
            StatusCode::BAD_GATEWAY
        };
        // Before the stream existed nothing of the body was taken; a refused stream's body
        // is sent again from what was kept of it.
        let again = match &err {
            e if e.is_connect() => true,
            ClientError::Http2Refused(_) => body.rewind(),
            _ => false,
        };
        let next = match again {
            true => next_try(
                upstream,
                &mut sel,
                health,
                idx,
                tries,
                retry_deadline,
                &route,
            ),
            false => Err(None),
        };
        match next {
            Ok(n) => {
                idx = n;
                tries += 1;
            }
            Err(over) => {
                let r = LocalResponse::text(over.unwrap_or(status), "");
                return respond_local(ctx, snap, r, &env.node);
            }
        }
    };
    ctx.upstream_load = load;
    ctx.upstream_status = Some(res.status.as_u16());
    if let Some(h) = health.filter(|h| h.passive()) {
        h.report_status(idx, Source::Passive, res.status.as_u16());
    }
    let mut head = ResponseHead {
        status: res.status,
        headers: res.headers,
    };
    crate::http2::server::strip_connection_headers(&mut head.headers);
    let body = ResponseBody::boxed(IdleTimeout::new(res.body, secs(timeout.read)));
    respond(ctx, snap, head, None, body, &env.node)
}

/// The request for a try on node `idx`: its `:authority` follows `pass_host` for that node.
fn request(
    ctx: &Ctx,
    cfg: &Upstream,
    idx: usize,
    scheme: &str,
    path: &str,
    headers: &HeaderMap,
) -> Result<Request<()>, http::uri::InvalidUri> {
    let node = &cfg.nodes.0[idx];
    let port = node.port.unwrap_or(cfg.scheme.default_port());
    let authority = upstream_host(ctx, cfg, node, port)
        .and_then(|h| h.to_str().ok().map(str::to_string))
        .unwrap_or_else(|| crate::proxy::client::host_port(&node.host, port));
    let uri = format!("{scheme}://{authority}{path}").parse::<Uri>()?;
    let mut req = Request::new(());
    *req.method_mut() = ctx.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_2;
    *req.headers_mut() = headers.clone();
    Ok(req)
}

/// The client's headers as the upstream gets them: the same forwarding rules as over
/// HTTP/1.1 (hop-by-hop headers left out, `X-Forwarded-*` and `X-Real-IP` set), without
/// `Host` (it becomes `:authority`) and the body framing headers.
fn forwarded_headers(ctx: &Ctx, conn_values: &ConnValues) -> HeaderMap {
    // `X-Forwarded-Host` is `$host`, as over HTTP/1.1.
    let forwarded_host = ctx
        .headers
        .contains_key(header::HOST)
        .then_some(ctx.host.as_bytes());
    let forwarding = Forwarding::new(&ctx.headers, conn_values, ctx.scheme, None, forwarded_host)
        .with_client(ctx.client.realip_from.map(|_| ctx.remote_addr.ip()));
    let mut lines = BytesMut::with_capacity(forwarding.extra_len() + 256);
    forwarding.write_first(&mut lines);
    for (name, value) in &ctx.headers {
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || forwarding.skip(name)
        {
            continue;
        }
        put_header(&mut lines, name.as_str().as_bytes(), value.as_bytes());
    }
    forwarding.write_last(&mut lines);
    let mut headers = HeaderMap::with_capacity(ctx.headers.len() + 6);
    RawHead {
        lines: lines.freeze(),
        has_date: false,
    }
    .into_headers(&mut headers);
    headers
}
