//! Small HTTP servers on the control runtime: the Prometheus export server (APISIX's
//! `plugin_attr.prometheus.export_addr`), and the same plumbing for the status API.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};

use super::expose::{self, Source};

/// What a handler sees of a request: method, path, the `Accept` header.
pub struct Asked<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub accept: Option<&'a str>,
}

/// A handler's answer: status, content type, body.
pub struct Answer {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Bytes,
}

impl Answer {
    pub fn json(status: StatusCode, body: &serde_json::Value) -> Answer {
        Answer {
            status,
            content_type: "application/json",
            body: Bytes::from(format!("{body}\n")),
        }
    }
}

/// A blocking request handler: it runs on the blocking pool, so a slow one (a big scrape)
/// holds no runtime thread.
pub type Handler = Arc<dyn Fn(&Asked) -> Answer + Send + Sync>;

/// Binds `addr` and serves `handler` on `rt`. Returns the bound address (a `:0` port
/// resolved); the caller logs it.
pub fn start(
    rt: &tokio::runtime::Handle,
    addr: SocketAddr,
    handler: Handler,
) -> std::io::Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let local = std_listener.local_addr()?;
    let listener = {
        let _enter = rt.enter();
        tokio::net::TcpListener::from_std(std_listener)?
    };
    rt.spawn(accept_loop(local, listener, handler));
    Ok(local)
}

async fn accept_loop(name: SocketAddr, listener: tokio::net::TcpListener, handler: Handler) {
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("{name}: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(answer(req, handler).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%remote, "{name}: connection ended with an error: {e}");
            }
        });
    }
}

async fn answer<B>(req: Request<B>, handler: Handler) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let done = tokio::task::spawn_blocking(move || {
        handler(&Asked {
            method: &method,
            path: &path,
            accept: accept.as_deref(),
        })
    })
    .await;
    let a = match done {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("a status/metrics handler failed: {e}");
            Answer {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                content_type: "text/plain",
                body: Bytes::new(),
            }
        }
    };
    let mut res = Response::new(Full::new(a.body));
    *res.status_mut() = a.status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(a.content_type),
    );
    res
}

/// The export server's handler: `GET export_uri` is a scrape, anything else 404.
pub fn exporter(uri: String, sources: Vec<Arc<dyn Source>>) -> Handler {
    Arc::new(move |asked: &Asked| {
        if asked.path != uri {
            return Answer::json(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"error_msg": "404 Route Not Found"}),
            );
        }
        if asked.method != Method::GET && asked.method != Method::HEAD {
            return Answer::json(
                StatusCode::METHOD_NOT_ALLOWED,
                &serde_json::json!({"error_msg": "405 Method Not Allowed"}),
            );
        }
        let om = expose::wants_openmetrics(asked.accept);
        let text = expose::encode(expose::gather(&sources), om);
        Answer {
            status: StatusCode::OK,
            content_type: if om {
                expose::OPENMETRICS
            } else {
                expose::TEXT
            },
            body: Bytes::from(text),
        }
    })
}
