//! The accept loop the gateway's small side APIs share (the control API, the status API):
//! HTTP/1.1 on the control runtime, a synchronous handler per request, and a header timeout
//! so a client that never finishes its header does not hold a connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::supervisor::BoundListener;

/// Answers one request.
pub type Handler = Arc<dyn Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync>;

/// Serves `handler` on every socket of `listener` (on `rt`) and logs `NAME listening at
/// http://ADDR`.
pub fn serve(
    name: &'static str,
    listener: BoundListener,
    rt: &tokio::runtime::Handle,
    handler: Handler,
) -> std::io::Result<SocketAddr> {
    let addr = listener.local;
    for std_listener in listener.sockets {
        let l = {
            let _enter = rt.enter();
            tokio::net::TcpListener::from_std(std_listener)?
        };
        rt.spawn(accept_loop(name, l, handler.clone()));
    }
    tracing::info!("{name} listening at http://{addr}");
    Ok(addr)
}

async fn accept_loop(name: &'static str, listener: tokio::net::TcpListener, handler: Handler) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!("{name} accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let r = handler(&req);
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
