//! Listeners and workers.
//!
//! N worker threads (default: one per core), each a current-thread tokio runtime with a
//! `LocalSet`, its own `SO_REUSEPORT` listener on every address, its own upstream connection
//! pool and (lazily) its own Lua VM, like nginx workers. Nothing on the request path takes a
//! lock; the only shared state is the snapshot pointer.

mod chosen;
pub mod client;
mod consumer;
mod grpc;
pub mod handler;
pub mod headers;
mod park;
pub use park::set_release as set_allocator_release;
mod request_body;
mod tunnel;

use std::cell::Cell;
use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

use crate::body::ClientBody;
use crate::config::NodeConfig;
use crate::http1::server;
use crate::snapshot::Gateway;
use crate::supervisor::{BindError, ListenerSet, Sharing};
use handler::{handle, WorkerEnv};

/// The role of the proxy's plain-HTTP listeners in a [`ListenerSet`].
pub const HTTP_ROLE: &str = "http";

/// One proxy listener as the node config describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerSpec {
    /// [`HTTP_ROLE`] or [`crate::tls::HTTPS_ROLE`].
    pub role: &'static str,
    pub addr: SocketAddr,
    /// TLS termination (`ssl.listen`).
    pub tls: bool,
    /// HTTP/2 besides HTTP/1.1: h2c with prior knowledge, or ALPN `h2` over TLS.
    pub http2: bool,
}

/// Every proxy listener of `node`: `listen`, then `ssl.listen`.
pub fn listener_specs(node: &NodeConfig) -> Vec<ListenerSpec> {
    let plain = node.listen.0.iter().map(|l| ListenerSpec {
        role: HTTP_ROLE,
        addr: l.addr,
        tls: false,
        http2: l.enable_http2,
    });
    let tls = node
        .ssl
        .iter()
        .flat_map(|s| s.listeners())
        .map(|l| ListenerSpec {
            role: crate::tls::HTTPS_ROLE,
            addr: l.addr,
            tls: true,
            http2: l.enable_http2,
        });
    plain.chain(tls).collect()
}

/// A worker's listening socket and what it serves.
pub type WorkerListener = (StdListener, ListenerSpec);

/// [`bind_all`]'s result: the listeners by worker, and each spec with its bound address.
pub type Bound = (Vec<Vec<WorkerListener>>, Vec<(ListenerSpec, SocketAddr)>);

/// Takes one listener per worker per address from `set` (the supervisor's sockets), binding
/// what it does not hold. A port of 0 is chosen once, so all workers share it. Returns the
/// listeners by worker and the bound addresses. An inherited address keeps the socket count
/// the supervisor bound it with, and that count sets the number of workers.
pub fn bind_all(
    set: &mut ListenerSet,
    specs: &[ListenerSpec],
    workers: usize,
) -> Result<Bound, BindError> {
    let mut taken = Vec::with_capacity(specs.len());
    for spec in specs {
        taken.push((
            *spec,
            set.take_or_bind(spec.role, spec.addr, Sharing::PerWorker(workers))?,
        ));
    }
    let workers = taken
        .iter()
        .map(|(_, l)| l.sockets.len())
        .max()
        .unwrap_or(workers)
        .max(1);
    let mut per_worker: Vec<Vec<WorkerListener>> = (0..workers).map(|_| Vec::new()).collect();
    let mut bound = Vec::new();
    for (spec, listener) in taken {
        bound.push((spec, listener.local));
        for (i, sock) in listener.sockets.into_iter().enumerate() {
            per_worker[i % workers].push((sock, spec));
        }
    }
    crate::plugin::local_conf::note_listeners(
        bound
            .iter()
            .map(|(spec, addr)| crate::plugin::local_conf::BoundListener {
                addr: *addr,
                tls: spec.tls,
                http2: spec.http2,
            })
            .collect(),
    );
    Ok((per_worker, bound))
}

/// Starts the worker threads. They serve until `shutdown` turns true, then stop accepting,
/// let in-flight requests finish for up to `graceful_shutdown_timeout`, and end.
pub fn start_workers(
    node: Arc<NodeConfig>,
    gw: Arc<Gateway>,
    listeners: Vec<Vec<WorkerListener>>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<Vec<JoinHandle<()>>> {
    let mut handles = Vec::new();
    for (id, socks) in listeners.into_iter().enumerate() {
        let node = node.clone();
        let gw = gw.clone();
        let shutdown = shutdown.clone();
        let h = std::thread::Builder::new()
            .name(format!("moongate-worker-{id}"))
            .spawn(move || worker_main(id, node, gw, socks, shutdown))?;
        handles.push(h);
    }
    Ok(handles)
}

fn worker_main(
    id: usize,
    node: Arc<NodeConfig>,
    gw: Arc<Gateway>,
    socks: Vec<WorkerListener>,
    shutdown: watch::Receiver<bool>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(worker = id, "cannot start the worker runtime: {e}");
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        crate::plugin::lua::timer::enable();
        let proxy = &node.proxy;
        let park = match park::Park::new() {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(worker = id, "idle connections stay with their tasks: {e}");
                None
            }
        };
        let http1 = Rc::new(server::Config {
            header_timeout: Duration::from_secs_f64(proxy.client_header_timeout.max(0.001)),
            max_header_size: proxy.client_header_buffer_size.min(u32::MAX as usize),
            server: handler::SERVER.clone(),
            park_after: park.as_ref().map(|_| park::PARK_AFTER),
        });
        let env = Rc::new(WorkerEnv {
            gw,
            node: node.clone(),
            worker_id: id,
            http1,
            park,
        });
        if let Some(p) = &env.park {
            let (r_env, r_shutdown) = (env.clone(), shutdown.clone());
            let resume: park::Resume =
                Box::new(move |p| resume_http1(p, r_env.clone(), r_shutdown.clone()));
            tokio::task::spawn_local(p.clone().watch(shutdown.clone(), resume));
        }
        // Every plugin of each configuration is loaded on this worker as it arrives, as
        // APISIX's workers load theirs at start (Lua module bodies and `init()` run here).
        tokio::task::spawn_local(start_plugins(env.gw.clone()));
        // Readiness (`/status/ready`): this worker's loop takes up each generation.
        tokio::task::spawn_local(crate::status::follow(id, env.gw.clone()));
        // moongate_lua_memory_bytes, moongate_upstream_connections.
        tokio::task::spawn_local(crate::metrics::runtime::follow(id));
        let active = Rc::new(Cell::new(0usize));
        let idle = Rc::new(Notify::new());
        for (sock, spec) in socks {
            let listener = match TcpListener::from_std(sock) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(worker = id, "cannot use listener: {e}");
                    continue;
                }
            };
            tokio::task::spawn_local(accept_loop(
                listener,
                spec,
                env.clone(),
                shutdown.clone(),
                active.clone(),
                idle.clone(),
            ));
        }
        let mut sd = shutdown.clone();
        while !*sd.borrow_and_update() {
            if sd.changed().await.is_err() {
                break;
            }
        }
        crate::plugin::lua::timer::shutdown();
        let deadline =
            Instant::now() + Duration::from_secs_f64(node.proxy.graceful_shutdown_timeout.max(0.0));
        while active.get() > 0 {
            if tokio::time::timeout_at(deadline.into(), idle.notified())
                .await
                .is_err()
            {
                tracing::warn!(
                    worker = id,
                    connections = active.get(),
                    "graceful shutdown deadline passed; closing remaining connections"
                );
                break;
            }
        }
        crate::plugin::lua::timer::drain(deadline.into()).await;
    });
}

/// Runs on a worker's event loop for its whole life: each published configuration's plugins
/// get [`Plugin::worker_start`](crate::plugin::Plugin::worker_start) on this worker.
async fn start_plugins(gw: Arc<Gateway>) {
    let mut rx = gw.subscribe();
    loop {
        rx.borrow_and_update();
        let snap = gw.load_full();
        for p in snap.registry.iter() {
            p.worker_start();
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    spec: ListenerSpec,
    env: Rc<WorkerEnv>,
    mut shutdown: watch::Receiver<bool>,
    active: Rc<Cell<usize>>,
    idle: Rc<Notify>,
) {
    let local = listener.local_addr().ok();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => return,
        };
        let (stream, remote) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off briefly rather than spin.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let local_addr = stream.local_addr().ok().or(local).unwrap_or(remote);
        active.set(active.get() + 1);
        let guard = ActiveGuard {
            active: active.clone(),
            idle: idle.clone(),
        };
        tokio::task::spawn_local(serve_connection(
            stream,
            spec,
            remote,
            local_addr,
            env.clone(),
            shutdown.clone(),
            guard,
        ));
    }
}

/// Counts a connection as active until dropped.
pub struct ActiveGuard {
    active: Rc<Cell<usize>>,
    idle: Rc<Notify>,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.active.set(self.active.get().saturating_sub(1));
        if self.active.get() == 0 {
            self.idle.notify_waiters();
        }
    }
}

/// Serves one connection: on a TLS listener the handshake first, then HTTP/2 when ALPN chose
/// `h2`, else HTTP/1.1; on a plain one HTTP/1.1, or with `enable_http2` HTTP/2 when the client
/// starts with the HTTP/2 preface (prior knowledge).
async fn serve_connection(
    stream: tokio::net::TcpStream,
    spec: ListenerSpec,
    remote: SocketAddr,
    local: SocketAddr,
    env: Rc<WorkerEnv>,
    shutdown: watch::Receiver<bool>,
    guard: ActiveGuard,
) {
    let counted = crate::metrics::store::ConnectionGuard::new();
    // The task's future is as large as its largest state, for the connection's whole life:
    // the TLS handshake's and HTTP/2's states are many KiB, a plain HTTP/1.1 connection's
    // about one. Those two go on the heap (one allocation per connection that takes them,
    // the handshake's given back when it is done), so an HTTP/1.1 connection does not carry
    // their size.
    if spec.tls {
        if let Some((ended, info)) =
            serve_tls(stream, spec, remote, local, env.clone(), shutdown).await
        {
            park_idle(&env, ended, remote, local, Some(info), (guard, counted));
        }
        return;
    }
    // The client address and port as the forwarding headers carry them: formatted once per
    // connection.
    let conn_values = Rc::new(headers::ConnValues::new(remote.ip(), local.port(), "http"));
    if spec.http2 {
        let header_timeout =
            Duration::from_secs_f64(env.node.proxy.client_header_timeout.max(0.001));
        match sniff_preface(&stream, header_timeout).await {
            Some(true) => {
                Box::pin(serve_http2(
                    stream,
                    env,
                    remote,
                    local,
                    conn_values,
                    shutdown,
                ))
                .await;
                return;
            }
            Some(false) => {}
            None => return,
        }
    }
    let io = crate::http1::io::ConnIo::from(stream);
    let ended = serve_http1(io, env.clone(), remote, local, conn_values, shutdown, None).await;
    park_idle(&env, ended, remote, local, None, (guard, counted));
}

/// Parks a connection that ended idle ([`server::Ended::Idle`]).
fn park_idle(
    env: &WorkerEnv,
    ended: server::Ended,
    remote: SocketAddr,
    local: SocketAddr,
    tls_info: Option<Rc<crate::tls::TlsInfo>>,
    guards: (ActiveGuard, crate::metrics::store::ConnectionGuard),
) {
    if let (server::Ended::Idle(io, deadline), Some(park)) = (ended, &env.park) {
        park.put(
            io,
            park::ParkedInfo {
                remote,
                local,
                deadline,
                guards,
                tls_info,
            },
        );
    }
}

/// Serves a parked connection that turned readable again: a new task goes on with HTTP/1.1
/// where the one that parked it stopped (the same head deadline, the same counts).
fn resume_http1(p: park::Parked, env: Rc<WorkerEnv>, shutdown: watch::Receiver<bool>) {
    let Ok(tcp) = tokio::net::TcpStream::from_std(p.tcp) else {
        return;
    };
    let park::ParkedInfo {
        remote,
        local,
        deadline,
        guards,
        tls_info,
    } = p.info;
    let (io, conn_values) = match (p.tls, &tls_info) {
        (Some(tls), Some(info)) => (
            crate::http1::io::ConnIo::from(crate::tls::TlsStream::from_parts(tcp, *tls)),
            headers::ConnValues::new(remote.ip(), local.port(), "https").with_tls(info.clone()),
        ),
        (None, _) => (
            crate::http1::io::ConnIo::from(tcp),
            headers::ConnValues::new(remote.ip(), local.port(), "http"),
        ),
        (Some(_), None) => return,
    };
    let conn_values = Rc::new(conn_values);
    tokio::task::spawn_local(async move {
        let ended = serve_http1(
            io,
            env.clone(),
            remote,
            local,
            conn_values,
            shutdown,
            Some(deadline),
        )
        .await;
        park_idle(&env, ended, remote, local, tls_info, guards);
    });
}

/// Serves a connection of a TLS listener: the handshake, then HTTP/2 when ALPN chose `h2`,
/// else HTTP/1.1. Returns how an HTTP/1.1 connection ended, with its TLS parameters.
async fn serve_tls(
    stream: tokio::net::TcpStream,
    spec: ListenerSpec,
    remote: SocketAddr,
    local: SocketAddr,
    env: Rc<WorkerEnv>,
    shutdown: watch::Receiver<bool>,
) -> Option<(server::Ended, Rc<crate::tls::TlsInfo>)> {
    let header_timeout = Duration::from_secs_f64(env.node.proxy.client_header_timeout.max(0.001));
    let gw = env.gw.clone();
    // Boxed: the handshake's state (about 8 KiB) is freed when it is done instead of staying
    // in the connection's future.
    let (tls, info) = Box::pin(crate::tls::accept(
        stream,
        move || gw.load().tls.clone(),
        spec.http2,
        header_timeout,
        remote,
    ))
    .await?;
    let h2 = info.alpn.as_deref() == Some("h2");
    let conn_values = Rc::new(
        headers::ConnValues::new(remote.ip(), local.port(), "https").with_tls(info.clone()),
    );
    if h2 {
        Box::pin(serve_http2(tls, env, remote, local, conn_values, shutdown)).await;
        None
    } else {
        // Boxed first (`ConnIo`): a stream of its size held by value would widen the server's
        // future.
        let io = crate::http1::io::ConnIo::from(tls);
        let ended = serve_http1(io, env, remote, local, conn_values, shutdown, None).await;
        Some((ended, info))
    }
}

/// Serves an HTTP/1.1 connection over a plain or TLS transport.
///
/// Not an `async fn`: one would keep its arguments and the server's future side by side in the
/// connection's task for its whole life; this hands them to the server's future.
fn serve_http1(
    io: impl Into<crate::http1::io::ConnIo>,
    env: Rc<WorkerEnv>,
    remote: SocketAddr,
    local: SocketAddr,
    conn_values: Rc<headers::ConnValues>,
    shutdown: watch::Receiver<bool>,
    resumed: Option<tokio::time::Instant>,
) -> impl std::future::Future<Output = server::Ended> {
    let cfg = env.http1.clone();
    server::serve(io, cfg, shutdown, resumed, move |req| {
        handle(
            env.clone(),
            req.map(ClientBody::Http1),
            remote,
            local,
            conn_values.clone(),
        )
    })
}

/// Serves an HTTP/2 connection over `io` (h2c here; a TLS stream whose ALPN chose `h2` takes
/// the same path) with the same handler as HTTP/1.1.
pub async fn serve_http2<IO>(
    io: IO,
    env: Rc<WorkerEnv>,
    remote: SocketAddr,
    local: SocketAddr,
    conn_values: Rc<headers::ConnValues>,
    shutdown: watch::Receiver<bool>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    let proxy = &env.node.proxy;
    let cfg = crate::http2::server::Config {
        idle_timeout: Duration::from_secs_f64(proxy.client_header_timeout.max(0.001)),
        max_header_size: proxy.client_header_buffer_size.min(u32::MAX as usize) as u32,
        server: handler::SERVER.clone(),
    };
    let h_env = env.clone();
    crate::http2::server::serve(io, &cfg, shutdown, move |req| {
        handle(h_env.clone(), req, remote, local, conn_values.clone())
    })
    .await;
}

/// Whether the client starts with the HTTP/2 preface, looking without reading. None: the
/// client closed or sent nothing within `timeout`.
async fn sniff_preface(stream: &tokio::net::TcpStream, timeout: Duration) -> Option<bool> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; 24];
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        let pre = &crate::http2::PREFACE[..n.min(crate::http2::PREFACE.len())];
        if buf[..n] != *pre {
            return Some(false);
        }
        // "PRI" is no HTTP/1.1 method anyone sends: a matching start is enough.
        if n >= 3 {
            return Some(true);
        }
        // A start too short to tell (rare): look again shortly.
        tokio::time::sleep(Duration::from_millis(2)).await;
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
    }
}
