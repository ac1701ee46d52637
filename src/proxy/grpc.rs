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
    client_body_failed, respond, respond_local, secs, upstream_host, GatewayBody, WorkerEnv,
};
use super::headers::{ConnValues, Forwarding};
use crate::body::{FaultCell, IdleTimeout, ResponseBody, UpstreamRequestBody};
use crate::config::Timeout;
use crate::http1::client::{put_header, HeadEdit};
use crate::http1::RawHead;
use crate::http2::client::{self as h2c, Sender};
use crate::plugin::{Ctx, LocalResponse, ResponseHead};
use crate::proxy::client::ClientError;
use crate::snapshot::{RouteEntry, Snapshot, UpstreamEntry};

/// Connects to the first reachable of `nodes` (in the balancer's order), sends the request and
/// streams the answer back.
#[allow(clippy::too_many_arguments)]
pub(super) async fn proxy(
    env: Rc<WorkerEnv>,
    snap: Arc<Snapshot>,
    route: Arc<RouteEntry>,
    mut ctx: Box<Ctx>,
    conn_values: Rc<ConnValues>,
    upstream: &UpstreamEntry,
    nodes: Vec<usize>,
    timeout: Timeout,
) -> Response<GatewayBody> {
    let cfg = &upstream.config;
    let mut last_err: Option<ClientError> = None;
    let mut picked: Option<(Sender, usize, std::time::Instant)> = None;
    for idx in nodes {
        let nt = &upstream.targets[idx];
        let started = std::time::Instant::now();
        match h2c::connect(&nt.target, secs(timeout.connect)).await {
            Ok(s) => {
                ctx.upstream_addr = Some(nt.addr.clone());
                ctx.upstream_load = upstream.balancer.start_try(idx);
                picked = Some((s, idx, started));
                break;
            }
            Err(e) => {
                tracing::error!(route = %route.id, node = %nt.addr, "upstream connect failed: {e}");
                last_err = Some(e);
            }
        }
    }
    let Some((sender, idx, started)) = picked else {
        let status = match &last_err {
            Some(e) if e.is_timeout() => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        };
        return respond_local(ctx, snap, LocalResponse::text(status, ""), &env.node);
    };
    let node = &cfg.nodes.0[idx];
    let port = node.port.unwrap_or(cfg.scheme.default_port());
    let authority = upstream_host(&ctx, cfg, node, port)
        .and_then(|h| h.to_str().ok().map(str::to_string))
        .unwrap_or_else(|| upstream.targets[idx].addr.to_string());
    let path = ctx.upstream_uri.as_deref().unwrap_or(&ctx.request_uri);
    let scheme = if cfg.scheme.is_tls() { "https" } else { "http" };
    let uri = match format!("{scheme}://{authority}{path}").parse::<Uri>() {
        Ok(u) => u,
        Err(e) => {
            tracing::error!(route = %route.id, "bad upstream request: {e}");
            return respond_local(
                ctx,
                snap,
                LocalResponse::text(StatusCode::BAD_REQUEST, ""),
                &env.node,
            );
        }
    };

    let fault: FaultCell = Rc::new(Cell::new(None));
    let max_body = ctx.client.body_limit();
    let body = UpstreamRequestBody::new(std::mem::take(&mut ctx.body), max_body, fault.clone());
    let mut headers = forwarded_headers(&ctx, &conn_values);
    // gRPC requires it; it is hop-by-hop for HTTP/1.1, so the forwarding rules dropped it.
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    if let Some(n) = body.size_hint().exact() {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    let mut req = Request::new(());
    *req.method_mut() = ctx.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_2;
    *req.headers_mut() = headers;

    let wait = secs(timeout.send) + secs(timeout.read);
    let res = match sender.send(req, body, wait).await {
        Ok(r) => r,
        Err(e) => {
            let local = match fault.get() {
                Some(f) => client_body_failed(&ctx, f, &e),
                None => {
                    tracing::error!(route = %route.id, node = ctx.upstream_addr.as_deref().unwrap_or(""), "upstream request failed: {e}");
                    let status = if e.is_timeout() {
                        StatusCode::GATEWAY_TIMEOUT
                    } else {
                        StatusCode::BAD_GATEWAY
                    };
                    LocalResponse::text(status, "")
                }
            };
            return respond_local(ctx, snap, local, &env.node);
        }
    };
    ctx.upstream_status = Some(res.status.as_u16());
    upstream.balancer.observe(idx, started.elapsed());
    let mut head = ResponseHead {
        status: res.status,
        headers: res.headers,
    };
    crate::http2::server::strip_connection_headers(&mut head.headers);
    let body = ResponseBody::boxed(IdleTimeout::new(res.body, secs(timeout.read)));
    respond(ctx, snap, head, None, body, &env.node)
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
