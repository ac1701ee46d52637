//! Listeners and workers.
//!
//! N worker threads (default: one per core), each a current-thread tokio runtime with a
//! `LocalSet`, its own `SO_REUSEPORT` listener on every address, its own upstream connection
//! pool and (lazily) its own Lua VM, like nginx workers. Nothing on the request path takes a
//! lock; the only shared state is the snapshot pointer.

pub mod client;
mod consumer;
mod grpc;
pub mod handler;
pub mod headers;
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

/// Takes one listener per worker per address from `set` (the supervisor's sockets), binding
/// what it does not hold. A port of 0 is chosen once, so all workers share it. Returns the
/// listeners by worker and the bound addresses. An inherited address keeps the socket count
/// the supervisor bound it with, and that count sets the number of workers.
pub fn bind_all(
    set: &mut ListenerSet,
    addrs: &[SocketAddr],
    workers: usize,
) -> Result<(Vec<Vec<StdListener>>, Vec<SocketAddr>), BindError> {
    let mut taken = Vec::with_capacity(addrs.len());
    for addr in addrs {
        taken.push(set.take_or_bind(HTTP_ROLE, *addr, Sharing::PerWorker(workers))?);
    }
    let workers = taken
        .iter()
        .map(|l| l.sockets.len())
        .max()
        .unwrap_or(workers)
        .max(1);
    let mut per_worker: Vec<Vec<StdListener>> = (0..workers).map(|_| Vec::new()).collect();
    let mut bound = Vec::new();
    for listener in taken {
        bound.push(listener.local);
        for (i, sock) in listener.sockets.into_iter().enumerate() {
            per_worker[i % workers].push(sock);
        }
    }
    Ok((per_worker, bound))
}

/// Starts the worker threads. They serve until `shutdown` turns true, then stop accepting,
/// let in-flight requests finish for up to `graceful_shutdown_timeout`, and end.
pub fn start_workers(
    node: Arc<NodeConfig>,
    gw: Arc<Gateway>,
    listeners: Vec<Vec<StdListener>>,
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
    socks: Vec<StdListener>,
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
        let env = Rc::new(WorkerEnv {
            gw,
            node: node.clone(),
            worker_id: id,
        });
        let active = Rc::new(Cell::new(0usize));
        let idle = Rc::new(Notify::new());
        // The listeners are in the order of `listen`'s addresses.
        for (i, sock) in socks.into_iter().enumerate() {
            let http2 = node.listen.0.get(i).is_some_and(|l| l.enable_http2);
            let listener = match TcpListener::from_std(sock) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(worker = id, "cannot use listener: {e}");
                    continue;
                }
            };
            tokio::task::spawn_local(accept_loop(
                listener,
                http2,
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

async fn accept_loop(
    listener: TcpListener,
    http2: bool,
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
            http2,
            remote,
            local_addr,
            env.clone(),
            shutdown.clone(),
            guard,
        ));
    }
}

/// Counts a connection as active until dropped.
struct ActiveGuard {
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

/// Serves one plain connection: HTTP/1.1, or on a listener with `enable_http2` HTTP/2 when
/// the client starts with the HTTP/2 preface (prior knowledge).
async fn serve_connection(
    stream: tokio::net::TcpStream,
    http2: bool,
    remote: SocketAddr,
    local: SocketAddr,
    env: Rc<WorkerEnv>,
    shutdown: watch::Receiver<bool>,
    _guard: ActiveGuard,
) {
    let _counted = crate::metrics::store::ConnectionGuard::new();
    let proxy = &env.node.proxy;
    let header_timeout = Duration::from_secs_f64(proxy.client_header_timeout.max(0.001));
    // The client address and port as the forwarding headers carry them: formatted once per
    // connection.
    let conn_values = Rc::new(headers::ConnValues::new(remote.ip(), local.port(), "http"));
    if http2 {
        match sniff_preface(&stream, header_timeout).await {
            Some(true) => {
                serve_http2(stream, env, remote, local, conn_values, shutdown).await;
                return;
            }
            Some(false) => {}
            None => return,
        }
    }
    let cfg = server::Config {
        header_timeout,
        max_header_size: proxy.client_header_buffer_size.min(u32::MAX as usize),
        server: handler::SERVER.clone(),
    };
    let h_env = env.clone();
    server::serve(stream, &cfg, shutdown, move |req| {
        handle(
            h_env.clone(),
            req.map(ClientBody::Http1),
            remote,
            local,
            conn_values.clone(),
        )
    })
    .await;
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
