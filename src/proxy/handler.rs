//! One request, start to end: route, run the plugin phases, call the upstream, filter the
//! response, log.

use std::cell::Cell;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};

use crate::balancer::Selection;
use crate::body::{
    BoxError, ClientBody, ClientBodyFault, FaultCell, IdleTimeout, KeptBody, RequestBody,
    ResponseBody, UpstreamRequestBody,
};
use crate::compress;
use crate::config::{Node, NodeConfig, PassHost, Timeout, Upstream};
use crate::health::{Observation, Source, UpstreamHealth};
use crate::http1::client::{RequestHead, ResponseLines};
use crate::http1::server::{HeadLines, OnUpgrade};
use crate::http1::RawHead;
use crate::plugin::chain::{self, Chain};
use crate::plugin::ctx::normalize_path;
use crate::plugin::{BodyChunk, Ctx, Flow, LocalResponse, Phase, PluginError, ResponseHead};
use crate::proxy::client::{worker_client, ClientError, PoolOptions};
use crate::proxy::headers::{ConnValues, Forwarding};
use crate::proxy::tunnel::{self, TunnelEnd};
use crate::snapshot::{Gateway, RouteEntry, Snapshot, UpstreamEntry};

/// The `Server` header moongate sends.
pub static SERVER: HeaderValue =
    HeaderValue::from_static(concat!("moongate/", env!("CARGO_PKG_VERSION")));

/// What a worker's request handler needs.
pub struct WorkerEnv {
    pub gw: Arc<Gateway>,
    pub node: Arc<NodeConfig>,
    pub worker_id: usize,
    /// The limits of this worker's HTTP/1.1 connections (from `node`), shared by them.
    pub http1: Rc<crate::http1::server::Config>,
    /// This worker's parked idle connections (None: parking is off, its epoll set could not
    /// be made).
    pub park: Option<Rc<super::park::Park>>,
}

/// Serves one request, whatever HTTP version it came in. Never fails: every problem becomes a
/// response.
pub async fn handle(
    env: Rc<WorkerEnv>,
    req: Request<ClientBody>,
    remote: SocketAddr,
    local: SocketAddr,
    conn_values: Rc<ConnValues>,
) -> Response<GatewayBody> {
    let snap = env.gw.load_full();
    let (parts, body) = req.into_parts();
    let request_uri = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    let raw_path = parts.uri.path();
    let args = parts.uri.query().map(str::to_string);
    // The normalised path moves into ctx (no second copy); a bad path keeps the raw one for
    // the log and gets its 400 below.
    let (uri, bad_path) = match normalize_path(raw_path) {
        Ok(u) => (u, None),
        Err(why) => (raw_path.to_string(), Some(why)),
    };
    // Boxed: the ctx travels by value through handle -> proxy -> respond -> Finish; moving a
    // pointer instead of the whole struct took memcpy off the request path.
    let mut ctx = Box::new(Ctx::new(
        parts.method,
        uri,
        args,
        request_uri,
        parts.version,
        parts.headers,
        RequestBody::Stream(body),
        remote,
        local,
        conn_values.scheme,
    ));
    ctx.tls = conn_values.tls.clone();
    // What the client's `Connection` names is hop-by-hop: gone before any phase, so a header
    // a plugin sets under such a name still reaches the upstream.
    crate::proxy::headers::remove_connection_named(&mut ctx.headers);
    if let Some(why) = bad_path {
        return respond_local(
            ctx,
            snap,
            LocalResponse::error(StatusCode::BAD_REQUEST, why),
            &env.node,
        );
    }
    // nginx's client_max_body_size, checked where the body is read (a plugin's read, or the
    // upstream request), as APISIX's `apisix_delay_client_max_body_check` does: a plugin
    // (client-control) may change it for the request first.
    ctx.client.max_body_size = env.node.proxy.client_max_body_size;

    let matched = snap.router.find(ctx.method.as_str(), &ctx.host, &ctx.uri);
    let Some(m) = matched else {
        // No route: global rules still run, as in APISIX.
        let chains = [&snap.global];
        let local = match run_request_phases(&chains, &mut ctx).await {
            Ok(Some(r)) => *r,
            Ok(None) => LocalResponse::error(StatusCode::NOT_FOUND, "404 Route Not Found"),
            Err(e) => plugin_failure(&e),
        };
        return respond_local(ctx, snap, local, &env.node);
    };
    let route = snap.routes[m.index].clone();
    ctx.conf_type = route.conf_type;
    ctx.conf_id = route.conf_id.clone();
    ctx.conf_version = route.conf_version.clone();
    ctx.route = Some(route.clone());
    ctx.matched = Some(m);
    ctx.response_phases = chain::any_has(&[&snap.global, &route.chain], chain::RESPONSE_PHASES);

    // A route without rewrite or access plugins (and so without an auth plugin to bring a
    // consumer's) skips the phases without making their futures.
    if chain::any_has(
        &[&snap.global, &route.chain],
        &[Phase::Rewrite, Phase::Access],
    ) {
        match run_route_phases(&snap.global, &route, &mut ctx).await {
            Ok(None) => {}
            Ok(Some(local)) => return respond_local(ctx, snap, *local, &env.node),
            Err(e) => return respond_local(ctx, snap, plugin_failure(&e), &env.node),
        }
    }
    proxy(env, snap, route, ctx, conn_values).await
}

/// A matched route's rewrite then access, each over the global rules then the route. Between
/// them, a consumer an auth plugin attached brings its plugins (APISIX's `http_access_phase`):
/// the ones only it brings run their rewrite, then access runs over the merged set.
async fn run_route_phases(
    global: &Chain,
    route: &RouteEntry,
    ctx: &mut Ctx,
) -> Result<Option<Box<LocalResponse>>, PluginError> {
    let chains = [global, &route.chain];
    // A phase no chain has is skipped without making its future.
    if chain::any_has(&chains, &[Phase::Rewrite]) {
        if let Flow::Respond(r) = chain::run_request_phase(Phase::Rewrite, &chains, ctx).await? {
            return Ok(Some(r));
        }
    }
    if ctx.consumer.is_some() {
        if let Some(added) = super::consumer::merge(ctx, route) {
            if let Flow::Respond(r) =
                chain::run_request_phase(Phase::Rewrite, &[&added], ctx).await?
            {
                return Ok(Some(r));
            }
        }
    }
    let merged = ctx.plugins.clone();
    let chains = [global, merged.as_deref().unwrap_or(&route.chain)];
    // The consumer's plugins may bring response phases.
    if merged.is_some() {
        ctx.response_phases = chain::any_has(&chains, chain::RESPONSE_PHASES);
    }
    if chain::any_has(&chains, &[Phase::Access]) {
        if let Flow::Respond(r) = chain::run_request_phase(Phase::Access, &chains, ctx).await? {
            return Ok(Some(r));
        }
    }
    Ok(None)
}

/// rewrite then access, each over the global rules then the route.
async fn run_request_phases(
    chains: &[&Chain],
    ctx: &mut Ctx,
) -> Result<Option<Box<LocalResponse>>, PluginError> {
    ctx.response_phases = chain::any_has(chains, chain::RESPONSE_PHASES);
    for phase in [Phase::Rewrite, Phase::Access] {
        if let Flow::Respond(r) = chain::run_request_phase(phase, chains, ctx).await? {
            return Ok(Some(r));
        }
    }
    Ok(None)
}

fn plugin_failure(e: &PluginError) -> LocalResponse {
    tracing::error!(plugin = %e.plugin, phase = e.phase, "{}", e.message);
    LocalResponse::text(StatusCode::INTERNAL_SERVER_ERROR, "")
}

/// A timeout in seconds (at least 1 ms) as a Duration. Nanosecond rounding is plenty here, and
/// much cheaper than `Duration::from_secs_f64`'s exact conversion (four of these per request).
pub(super) fn secs(v: f64) -> Duration {
    Duration::from_nanos((v.max(0.001) * 1e9) as u64)
}

/// Picks a node, runs before_proxy, calls the upstream (retrying the next node on a connect
/// failure) and streams the answer back through the response phases.
async fn proxy(
    env: Rc<WorkerEnv>,
    snap: Arc<Snapshot>,
    route: Arc<RouteEntry>,
    mut ctx: Box<Ctx>,
    conn_values: Rc<ConnValues>,
) -> Response<GatewayBody> {
    // A plugin's choice (traffic-split) replaces the route's upstream for this request.
    let chosen = match ctx.upstream_choice.take() {
        None => route.upstream.clone(),
        Some(choice) => match super::chosen::resolve(&snap, &route.id, &choice) {
            Ok(u) => Some(u),
            Err(msg) => {
                tracing::error!(route = %route.id, "{msg}");
                let r = LocalResponse::error(StatusCode::SERVICE_UNAVAILABLE, &msg);
                return respond_local(ctx, snap, r, &env.node);
            }
        },
    };
    let Some(upstream) = chosen else {
        tracing::error!(route = %route.id, "missing upstream configuration in Route or Service");
        let r = LocalResponse::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "missing upstream configuration in Route or Service",
        );
        return respond_local(ctx, snap, r, &env.node);
    };
    let health = upstream.health.as_deref();
    let mut sel = upstream.balancer.begin(&ctx);
    let Some(first) = upstream.balancer.next(&mut sel, health) else {
        tracing::error!(route = %route.id, "no valid upstream node");
        let r = LocalResponse::error(StatusCode::SERVICE_UNAVAILABLE, "no valid upstream node");
        return respond_local(ctx, snap, r, &env.node);
    };
    let cfg = &upstream.config;
    ctx.upstream_addr = Some(upstream.targets[first].addr.clone());

    let merged = ctx.plugins.clone();
    let chains = [&snap.global, merged.as_deref().unwrap_or(&route.chain)];
    if chain::any_has(&chains, &[Phase::BeforeProxy]) {
        match chain::run_request_phase(Phase::BeforeProxy, &chains, &mut ctx).await {
            Ok(Flow::Continue) => {}
            Ok(Flow::Respond(r)) => return respond_local(ctx, snap, *r, &env.node),
            Err(e) => return respond_local(ctx, snap, plugin_failure(&e), &env.node),
        }
    }

    if let Err(r) = super::request_body::prepare(&mut ctx).await {
        return respond_local(ctx, snap, *r, &env.node);
    }

    let timeout: Timeout = route.timeout.or(cfg.timeout).unwrap_or_default();
    let pool = match &cfg.keepalive_pool {
        Some(p) => PoolOptions {
            max_idle: p.size,
            idle_timeout: secs(p.idle_timeout),
            max_requests: p.requests,
        },
        None => PoolOptions {
            max_idle: 320,
            idle_timeout: Duration::from_secs(60),
            max_requests: 1000,
        },
    };
    ctx.upstream_start = Some(Instant::now());
    if cfg.scheme.is_http2() {
        return super::grpc::proxy(
            env,
            snap,
            route,
            ctx,
            conn_values,
            &upstream,
            sel,
            first,
            timeout,
        )
        .await;
    }
    let attempts = upstream.attempts();
    let client = worker_client();

    // A path a plugin set is checked as a request target (it goes into the request line); the
    // client's own was checked by the parser.
    let rewritten;
    let target = match &ctx.upstream_uri {
        None => ctx.request_uri.as_str(),
        Some(u) => match u.parse::<http::Uri>() {
            Ok(uri) => {
                rewritten = uri;
                rewritten.path_and_query().map_or("/", |p| p.as_str())
            }
            Err(e) => {
                tracing::error!(route = %route.id, "bad upstream request: {e}");
                return respond_local(
                    ctx,
                    snap,
                    LocalResponse::text(StatusCode::BAD_REQUEST, ""),
                    &env.node,
                );
            }
        },
    };
    // The upstream request: the request as plugins left it, sent from ctx without a copy (the
    // forwarding changes are applied while the head is written; header_filter, body_filter and
    // log still read `$http_*` as the client sent them).
    let fault: FaultCell = Rc::new(Cell::new(None));
    let max_body = ctx.client.body_limit();
    // The body for the next try: taken by a send; put back only when it can be sent again.
    // A Lua plugin's log phase may read the body (nginx keeps it in memory up to
    // client_body_buffer_size): one read whole stays in ctx, a small streamed one is copied
    // as it goes.
    let keep_limit = env.node.proxy.client_body_buffer_size;
    let lua_logs = chain::lua_logs(&chains);
    let streaming = matches!(&ctx.body, RequestBody::Stream(b) if !b.is_end_stream());
    let upstream_body = match &ctx.body {
        RequestBody::Full(b) if lua_logs => RequestBody::Full(b.clone()),
        _ => std::mem::take(&mut ctx.body),
    };
    let mut first_body = UpstreamRequestBody::new(upstream_body, max_body, fault.clone());
    if keep_limit > 0 && streaming && lua_logs {
        let kept = KeptBody::new(keep_limit);
        ctx.kept_body = Some(kept.clone());
        first_body = first_body.keeping(kept);
    }
    let mut body = Some(first_body);
    // nginx's `proxy_next_upstream error timeout` (APISIX's): a request a node may have seen
    // goes to the next one only if its method is idempotent and its body can be sent again.
    let resendable = !matches!(ctx.method.as_str(), "POST" | "LOCK" | "PATCH");
    let retry_deadline = retry_deadline(cfg);
    let client_host = ctx.headers.contains_key(header::HOST);
    // The client address a plugin set (real-ip) goes upstream instead of the connection's.
    let realip = ctx.client.realip_from.map(|_| ctx.remote_addr.ip());
    // A WebSocket handshake on a route that allows it asks the upstream to switch too.
    let upgrade = super::tunnel::requested(&ctx, &route);
    // Nothing looks at or changes the response headers: the upstream's lines pass through
    // unparsed.
    let lines = if ctx.response_untouched() {
        ResponseLines::Raw
    } else {
        ResponseLines::Parsed
    };
    let wait = secs(timeout.send) + secs(timeout.read);
    let mut node_idx = first;
    let mut tries = 1;
    let outcome = loop {
        let nt = &upstream.targets[node_idx];
        let load = upstream.balancer.start_try(node_idx);
        let started = Instant::now();
        let err = match client
            .checkout(&nt.target, secs(timeout.connect), pool)
            .await
        {
            Err(e) => {
                tracing::error!(route = %route.id, node = %nt.addr, "upstream connect failed: {e}");
                e
            }
            Ok(conn) => {
                let Some(this_body) = body.take() else {
                    break Err(StatusCode::BAD_GATEWAY);
                };
                let replay = if tries < attempts && resendable {
                    this_body.replay()
                } else {
                    None
                };
                let node = &cfg.nodes.0[node_idx];
                let host_value = upstream_host(&ctx, cfg, node, nt.target.port);
                // `X-Forwarded-Host` is `$host` (APISIX's `$var_x_forwarded_host`): the
                // normalised host, without the port, when the client named one.
                let forwarded_host = client_host.then_some(ctx.host.as_bytes());
                let forwarding = Forwarding::new(
                    &ctx.headers,
                    &conn_values,
                    ctx.scheme,
                    host_value,
                    forwarded_host,
                )
                .with_upgrade(upgrade)
                .with_client(realip);
                let head = RequestHead {
                    method: &ctx.method,
                    target,
                    headers: &ctx.headers,
                    edit: &forwarding,
                    lines,
                };
                let res = conn.send_head(&client, &head, this_body, wait, pool).await;
                drop(forwarding);
                match res {
                    Ok(r) => {
                        upstream.balancer.observe(node_idx, started.elapsed());
                        break Ok((r, load));
                    }
                    Err(e) => {
                        if let Some(f) = fault.get() {
                            let local = client_body_failed(&ctx, f, &e);
                            return respond_local(ctx, snap, local, &env.node);
                        }
                        tracing::error!(route = %route.id, node = %nt.addr, "upstream request failed: {e}");
                        if e.resendable() {
                            body = replay;
                        }
                        e
                    }
                }
            }
        };
        passive_failure(&upstream, node_idx, &err);
        let status = if err.is_timeout() {
            StatusCode::GATEWAY_TIMEOUT
        } else {
            StatusCode::BAD_GATEWAY
        };
        if body.is_none() {
            break Err(status);
        }
        let next = match next_try(
            &upstream,
            &mut sel,
            health,
            node_idx,
            tries,
            retry_deadline,
            &route,
        ) {
            Ok(n) => n,
            Err(over) => break Err(over.unwrap_or(status)),
        };
        node_idx = next;
        tries += 1;
        ctx.upstream_addr = Some(upstream.targets[next].addr.clone());
    };
    let mut res = match outcome {
        Ok((res, load)) => {
            ctx.upstream_load = load;
            res
        }
        Err(status) => {
            return respond_local(ctx, snap, LocalResponse::text(status, ""), &env.node);
        }
    };
    ctx.upstream_status = Some(res.status.as_u16());
    if let Some(h) = upstream.health.as_ref().filter(|h| h.passive()) {
        h.report_status(node_idx, Source::Passive, res.status.as_u16());
    }
    if res.status == StatusCode::SWITCHING_PROTOCOLS {
        if let (Some(_), Some(up)) = (upgrade, res.upgraded.take()) {
            let idle = secs(timeout.read);
            return super::tunnel::respond(ctx, snap, res, up, idle, &env.node);
        }
        // A switch of protocols the gateway did not ask for: what follows is not HTTP the
        // client expects, and passing the 101 on would hand the client's connection to the
        // upstream.
        tracing::error!(route = %route.id, node = ctx.upstream_addr.as_deref().unwrap_or(""), "upstream answered 101 Switching Protocols to a request that asked for no upgrade");
        return respond_local(
            ctx,
            snap,
            LocalResponse::text(StatusCode::BAD_GATEWAY, ""),
            &env.node,
        );
    }
    let mut head = ResponseHead {
        status: res.status,
        headers: res.headers,
    };
    // The client left the connection-management headers out; the other hop-by-hop ones are
    // rare.
    if res.te_or_trailer {
        head.headers.remove(header::TE);
        head.headers.remove(header::TRAILER);
    }
    let body = ResponseBody::Timed(IdleTimeout::new(res.body, secs(timeout.read)));
    respond(ctx, snap, head, res.raw, body, &env.node)
}

/// The answer when the upstream call failed because the client's body did: the client's
/// error (413, 400), logged as one (nginx logs a client's bad body at `info`), not a 502
/// naming the node. The server closes the connection (the body's framing is lost).
pub(super) fn client_body_failed(
    ctx: &Ctx,
    fault: ClientBodyFault,
    e: &ClientError,
) -> LocalResponse {
    fault.log(ctx.route_id(), &ctx.remote_addr, e);
    match fault {
        ClientBodyFault::TooLarge => LocalResponse::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "413 Request Entity Too Large",
        ),
        ClientBodyFault::Malformed | ClientBodyFault::Incomplete => {
            LocalResponse::error(StatusCode::BAD_REQUEST, "400 Bad Request")
        }
    }
}

/// The `Host` the upstream request carries (`:authority` for HTTP/2): a plugin's choice, else
/// as the upstream's `pass_host` says.
pub(super) fn upstream_host(
    ctx: &Ctx,
    cfg: &Upstream,
    node: &Node,
    port: u16,
) -> Option<HeaderValue> {
    match (&ctx.upstream_host, cfg.pass_host) {
        (Some(h), _) => HeaderValue::from_str(h).ok(),
        (None, PassHost::Pass) => ctx.headers.get(header::HOST).cloned(),
        (None, PassHost::Node) => {
            if port == cfg.scheme.default_port() {
                HeaderValue::from_str(&node.host).ok()
            } else {
                HeaderValue::from_str(&crate::proxy::client::host_port(&node.host, port)).ok()
            }
        }
        (None, PassHost::Rewrite) => cfg
            .upstream_host
            .as_deref()
            .and_then(|h| HeaderValue::from_str(h).ok()),
    }
}

/// When retries must stop: `retry_timeout` after now (APISIX's `proxy_retry_deadline`).
pub(super) fn retry_deadline(cfg: &Upstream) -> Option<Instant> {
    cfg.retry_timeout
        .filter(|t| *t > 0.0)
        .map(|t| Instant::now() + secs(t))
}

/// The node for the next try after try number `tries` on node `idx` failed in a way that may
/// be retried. `Err(None)`: no try is left (the failure's own status answers);
/// `Err(Some(502))`: `retry_timeout` has passed.
pub(super) fn next_try(
    upstream: &UpstreamEntry,
    sel: &mut Selection,
    health: Option<&UpstreamHealth>,
    idx: usize,
    tries: usize,
    deadline: Option<Instant>,
    route: &RouteEntry,
) -> Result<usize, Option<StatusCode>> {
    if tries >= upstream.attempts() {
        return Err(None);
    }
    if deadline.is_some_and(|d| Instant::now() >= d) {
        tracing::error!(route = %route.id, "proxy retry timeout, retry count: {}", tries - 1);
        return Err(Some(StatusCode::BAD_GATEWAY));
    }
    // The only node is retried itself (APISIX: "with a single node the retry has to land on
    // it again").
    match upstream.balancer.next(sel, health) {
        Some(n) => Ok(n),
        None if upstream.balancer.live() == 1 => Ok(idx),
        None => Err(None),
    }
}

/// Counts a failed connect or exchange against the node, when the upstream has passive checks.
pub(super) fn passive_failure(upstream: &UpstreamEntry, idx: usize, e: &ClientError) {
    if let Some(h) = upstream.health.as_ref().filter(|h| h.passive()) {
        let obs = if e.is_timeout() {
            Observation::Timeout
        } else {
            Observation::TcpFailure(e.to_string())
        };
        h.report(idx, Source::Passive, obs);
    }
}

/// Sends a response the gateway made itself, through the response phases.
pub fn respond_local(
    ctx: Box<Ctx>,
    snap: Arc<Snapshot>,
    local: LocalResponse,
    node: &NodeConfig,
) -> Response<GatewayBody> {
    let head = ResponseHead {
        status: local.status,
        headers: local.headers,
    };
    respond(ctx, snap, head, local.raw, local.body, node)
}

/// header_filter now; body_filter per chunk and log at the end, inside [`GatewayBody`].
/// `raw`: the upstream's header lines, passed on after `head.headers` (only when no plugin
/// looks at response headers).
pub(super) fn respond(
    mut ctx: Box<Ctx>,
    snap: Arc<Snapshot>,
    mut head: ResponseHead,
    mut raw: Option<RawHead>,
    mut body: ResponseBody,
    node: &NodeConfig,
) -> Response<GatewayBody> {
    let route = ctx.route.clone();
    let merged = ctx.plugins.clone();
    let filter_body;
    {
        let empty = Chain::default();
        let chains = [
            &snap.global,
            route_chain(merged.as_deref(), route.as_deref(), &empty),
        ];
        ctx.status = head.status.as_u16();
        // Lines kept unparsed become headers when something is to see or change them after all
        // (whoever kept them expected nothing would; this keeps that a matter of speed only).
        if raw.is_some()
            && (!ctx.staged_headers.is_empty()
                || ctx.gzip.is_some()
                || chain::any_has(&chains, chain::RESPONSE_PHASES))
        {
            if let Some(raw) = raw.take() {
                raw.into_headers(&mut head.headers);
            }
        }
        apply_staged(&mut ctx.staged_headers, &mut head.headers);
        if let Err(e) = chain::run_header_filter(&chains, &mut ctx, &mut head) {
            tracing::error!(plugin = %e.plugin, phase = e.phase, "{}", e.message);
            head = ResponseHead {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                headers: HeaderMap::new(),
            };
            body = ResponseBody::Empty;
            raw = None;
        }
        filter_body = chain::any_has(&chains, chain::BODY_PHASES);
    }
    ctx.status = head.status.as_u16();
    // A plugin asked for gzip (APISIX's `gzip`, in header_filter): where nginx would compress.
    let gzip = ctx
        .gzip
        .filter(|_| compress::applies(&ctx.method, &ctx.headers, head.status, &head.headers))
        .map(|req| {
            compress::prepare_headers(&mut head.headers);
            compress::Gzip::new(req)
        });
    ctx.bytes_sent += head_size(&head.headers, raw.as_ref());
    if filter_body {
        // The body may change size: let it go out chunked.
        head.headers.remove(header::CONTENT_LENGTH);
    }
    // With the upstream's lines passing unparsed, the server writes its own Server line (no map
    // made for one header).
    if raw.is_none() {
        head.headers.insert(header::SERVER, SERVER.clone());
    }
    let mut res = Response::new(GatewayBody {
        inner: body,
        raw,
        finish: Some(Finish {
            ctx,
            snap,
            route,
            merged,
            filter_body,
            access_log: node.access_log,
        }),
        ended: false,
        failed: None,
        replaced: Cell::new(None),
        tunnel: None,
        gzip,
    });
    *res.status_mut() = head.status;
    *res.headers_mut() = head.headers;
    res
}

/// The response head's size on the wire, estimated: status line, header lines, the blank
/// line (nginx's `$bytes_sent` counts the head too). The `Server`, `Date` and framing lines
/// the server adds come to about this much.
fn head_size(headers: &HeaderMap, raw: Option<&RawHead>) -> u64 {
    let mut n = 17 + 2 + 60;
    for (k, v) in headers {
        n += k.as_str().len() + v.len() + 4;
    }
    n += raw.map_or(0, |r| r.lines.len());
    n as u64
}

/// Response headers a plugin set before the response existed replace the response's own of
/// the same name (each name with all the values set for it).
fn apply_staged(staged: &mut HeaderMap, headers: &mut HeaderMap) {
    if staged.is_empty() {
        return;
    }
    let mut last = None;
    for (k, v) in std::mem::take(staged) {
        match k {
            Some(k) => {
                headers.insert(k.clone(), v);
                last = Some(k);
            }
            None => {
                if let Some(k) = &last {
                    headers.append(k.clone(), v);
                }
            }
        }
    }
}

/// The plugins in effect after rewrite: the consumer-merged set, else the route's.
fn route_chain<'a>(
    merged: Option<&'a Chain>,
    route: Option<&'a RouteEntry>,
    empty: &'a Chain,
) -> &'a Chain {
    merged.or(route.map(|r| &r.chain)).unwrap_or(empty)
}

struct Finish {
    ctx: Box<Ctx>,
    snap: Arc<Snapshot>,
    route: Option<Arc<RouteEntry>>,
    /// `ctx.plugins`, held here so the body and log phases need not borrow the ctx for it.
    merged: Option<Arc<Chain>>,
    filter_body: bool,
    access_log: bool,
}

impl Finish {
    fn chains_run<R>(&mut self, f: impl FnOnce(&[&Chain], &mut Ctx) -> R) -> R {
        let empty = Chain::default();
        let chains = [
            &self.snap.global,
            route_chain(self.merged.as_deref(), self.route.as_deref(), &empty),
        ];
        f(&chains, &mut self.ctx)
    }

    /// The log phase and the access-log line. Runs once, when the body has been sent (or the
    /// client went away, or the response failed).
    fn log(mut self, outcome: Outcome) {
        self.chains_run(chain::run_log);
        if let Some(log) = crate::accesslog::get() {
            log.record(&mut self.ctx);
        } else if self.access_log {
            let c = &self.ctx;
            tracing::info!(
                target: "moongate::access",
                "{} {} {} {} route={} upstream={} {:.3}ms{}",
                c.remote_addr.ip(),
                c.method,
                c.request_uri,
                c.status,
                c.route_id(),
                c.upstream_addr.as_deref().unwrap_or("-"),
                c.start.elapsed().as_secs_f64() * 1000.0,
                outcome
            );
        }
    }
}

/// How a response ended, for the log phase and the access-log line.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The whole body was handed to the server.
    Completed,
    /// The client went away (or the body was dropped) before the end.
    Incomplete,
    /// The body failed after part of the response was sent: the connection was closed.
    Failed(Failure),
    /// The `101` was followed by a tunnel, now closed.
    Tunnel(TunnelEnd),
}

/// The access log's suffix.
impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Completed => "",
            Outcome::Incomplete => " (incomplete)",
            Outcome::Failed(Failure::BodyFilter) => {
                " (incomplete: body_filter failed, connection closed)"
            }
            Outcome::Failed(Failure::Upstream) => {
                " (incomplete: upstream response failed, connection closed)"
            }
            Outcome::Tunnel(end) => return end.fmt(f),
        })
    }
}

/// What made a response body fail.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// A plugin's body_filter raised an error.
    BodyFilter,
    /// Reading the upstream's body failed (reset, timeout, bad framing).
    Upstream,
}

/// The response body on its way to the client: runs body_filter per chunk, enforces the
/// upstream read timeout between chunks, and runs log when the body ends.
pub struct GatewayBody {
    inner: ResponseBody,
    /// The upstream's header lines, when they pass unparsed.
    raw: Option<RawHead>,
    finish: Option<Finish>,
    ended: bool,
    /// Why the body failed, once it has.
    failed: Option<Failure>,
    /// Set when the server answered with this status instead, the body having failed before
    /// any of the response was written ([`HeadLines::early_failure_status`]).
    replaced: Cell<Option<StatusCode>>,
    /// A `101`'s upstream connection, for the server to join to the client's.
    tunnel: Option<tunnel::Peer>,
    /// The encoder when the response goes out gzip-compressed (after body_filter, as nginx's
    /// gzip filter runs after the Lua body filter).
    gzip: Option<compress::Gzip>,
}

impl GatewayBody {
    /// Counts body bytes handed to the server (`$body_bytes_sent`, `$bytes_sent`).
    fn count_sent(&mut self, n: usize) {
        if let Some(f) = self.finish.as_mut() {
            f.ctx.body_bytes_sent += n as u64;
            f.ctx.bytes_sent += n as u64;
        }
    }

    /// Makes the response (a `101`) one that switches the client's connection to a tunnel to
    /// `peer`.
    pub(super) fn set_tunnel(&mut self, peer: tunnel::Peer) {
        self.tunnel = Some(peer);
    }

    fn end(&mut self, outcome: Outcome) {
        self.ended = true;
        if let Some(f) = self.finish.take() {
            f.log(outcome);
        }
    }

    /// The body failed: the log runs when the server is done with it (on drop), once it is
    /// known whether the client got a replacement answer or a cut-off response.
    fn fail(&mut self, why: Failure, e: BoxError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.failed = Some(why);
        self.inner = ResponseBody::Empty;
        Poll::Ready(Some(Err(e)))
    }

    /// What goes out for `data`: compressed when gzip is on (`last`: the stream's end, with
    /// the trailer).
    fn encode(&mut self, data: Bytes, last: bool) -> Bytes {
        match self.gzip.as_mut() {
            Some(gz) if last => gz.finish_with(&data),
            Some(gz) if !data.is_empty() => gz.push(&data),
            Some(_) => Bytes::new(),
            None => data,
        }
    }

    /// Whether body frames pass as they come (no body_filter, no compression).
    fn passes_through(&self) -> bool {
        self.gzip.is_none() && !self.finish.as_ref().is_some_and(|f| f.filter_body)
    }

    fn filter(&mut self, data: Bytes, eof: bool) -> Result<BodyChunk, PluginError> {
        let mut chunk = BodyChunk { data, eof };
        if let Some(f) = self.finish.as_mut() {
            if f.filter_body {
                f.chains_run(|chains, ctx| chain::run_body_filter(chains, ctx, &mut chunk))?;
            }
        }
        Ok(chunk)
    }
}

impl HeadLines for GatewayBody {
    fn head_lines(&self) -> Option<&RawHead> {
        self.raw.as_ref()
    }

    /// A body_filter that fails before any byte went out gets the client a 500, as a failing
    /// header_filter does; an upstream body that fails that early, a 502 (504 on its read
    /// timeout).
    fn early_failure_status(&self) -> Option<StatusCode> {
        let status = match self.failed? {
            Failure::BodyFilter => StatusCode::INTERNAL_SERVER_ERROR,
            Failure::Upstream => StatusCode::BAD_GATEWAY,
        };
        self.replaced.set(Some(status));
        Some(status)
    }

    /// The tunnel, with the log phase moved to its end.
    fn take_upgrade(&mut self) -> Option<OnUpgrade> {
        let peer = self.tunnel.take()?;
        let finish = self.finish.take()?;
        self.ended = true;
        Some(Box::new(move |client, pending| {
            Box::pin(async move {
                let meter = tunnel::Meter::default();
                // Logs the tunnel's end however it comes: also when the worker stops with it
                // open and drops this future.
                let mut log = TunnelLog {
                    finish: Some(finish),
                    meter: &meter,
                };
                let route = log
                    .finish
                    .as_ref()
                    .map_or("", |f| f.ctx.route_id())
                    .to_string();
                let closed = tunnel::run(client, pending, peer, &meter, &route).await;
                log.end(closed);
            })
        }))
    }
}

/// Runs the log phase when a tunnel ends.
struct TunnelLog<'a> {
    finish: Option<Finish>,
    meter: &'a tunnel::Meter,
}

impl TunnelLog<'_> {
    fn end(&mut self, closed: tunnel::Closed) {
        if let Some(mut f) = self.finish.take() {
            let end = self.meter.end(closed);
            end.record(&mut f.ctx);
            f.log(Outcome::Tunnel(end));
        }
    }
}

impl Drop for TunnelLog<'_> {
    fn drop(&mut self) {
        self.end(tunnel::Closed::Shutdown);
    }
}

impl Drop for GatewayBody {
    fn drop(&mut self) {
        let outcome = if let Some(status) = self.replaced.get() {
            // The client got this status instead, complete.
            if let Some(f) = self.finish.as_mut() {
                f.ctx.status = status.as_u16();
            }
            Outcome::Completed
        } else if let Some(why) = self.failed {
            Outcome::Failed(why)
        } else if self.passes_through() && self.inner.is_end_stream() {
            // The body ended without being polled to its end (an empty body).
            Outcome::Completed
        } else {
            // The client went away (or the connection failed) before the end of the body.
            Outcome::Incomplete
        };
        self.end(outcome);
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.ended || this.failed.is_some() {
            return Poll::Ready(None);
        }
        loop {
            let polled = Pin::new(&mut this.inner).poll_frame(cx);
            match polled {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => {
                    let data = match frame.into_data() {
                        Ok(d) => d,
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    };
                    if this.passes_through() {
                        this.count_sent(data.len());
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    let filtered = if this.finish.as_ref().is_some_and(|f| f.filter_body) {
                        this.filter(data, false)
                    } else {
                        Ok(BodyChunk { data, eof: false })
                    };
                    match filtered {
                        Ok(chunk) => {
                            let out = this.encode(chunk.data, chunk.eof);
                            this.count_sent(out.len());
                            if chunk.eof {
                                // A plugin ended the body early: drop the rest.
                                this.inner = ResponseBody::Empty;
                                this.end(Outcome::Completed);
                            }
                            if out.is_empty() {
                                if this.ended {
                                    return Poll::Ready(None);
                                }
                                continue;
                            }
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                        Err(e) => {
                            tracing::error!(plugin = %e.plugin, phase = e.phase, "{}", e.message);
                            return this.fail(Failure::BodyFilter, e.into());
                        }
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    if let Some(f) = &this.finish {
                        tracing::error!(
                            route = f.ctx.route_id(),
                            node = f.ctx.upstream_addr.as_deref().unwrap_or(""),
                            "reading the upstream response failed: {e}"
                        );
                    }
                    return this.fail(Failure::Upstream, e);
                }
                Poll::Ready(None) => {
                    let last = if this.finish.as_ref().is_some_and(|f| f.filter_body) {
                        match this.filter(Bytes::new(), true) {
                            Ok(c) => c.data,
                            Err(e) => {
                                tracing::error!(plugin = %e.plugin, phase = e.phase, "{}", e.message);
                                return this.fail(Failure::BodyFilter, e.into());
                            }
                        }
                    } else {
                        Bytes::new()
                    };
                    let last = this.encode(last, true);
                    this.count_sent(last.len());
                    this.end(Outcome::Completed);
                    if last.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(last))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // With body filters a last chunk may still come at the end; never claim the end early.
        self.ended || (self.passes_through() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if !self.passes_through() {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}
