//! A stand-in for OpenFunction's `function-sample`: answers every request with
//! `Hello, <last path segment>!` (`/default/function-sample/test` → `Hello, test!`).
//!
//! ```text
//! cargo run --release --example function_sample -- --listen 127.0.0.1:3233
//! curl http://127.0.0.1:3233/default/function-sample/world   # Hello, world!
//! ```
//!
//! Used by `examples/openfunction.yaml` (the APISIX openfunction walkthrough) and by
//! `docs/openfunction.md`.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// `Hello, <last non-empty path segment>!\n`, as the sample function prints it.
fn greet(req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let name = req
        .uri()
        .path()
        .rsplit('/')
        .find(|s| !s.is_empty())
        .unwrap_or("");
    let mut res = Response::new(Full::new(Bytes::from(format!("Hello, {name}!\n"))));
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

fn listen_addr() -> Result<SocketAddr, String> {
    let mut args = std::env::args().skip(1);
    let mut addr = "127.0.0.1:3233".to_string();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" | "-l" => addr = args.next().ok_or("--listen needs an address")?,
            "--help" | "-h" => {
                return Err("usage: function_sample [--listen 127.0.0.1:3233]".to_string())
            }
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: function_sample [--listen ADDR]"
                ))
            }
        }
    }
    addr.parse()
        .map_err(|e| format!("bad --listen address {addr:?}: {e}"))
}

#[tokio::main]
async fn main() {
    let addr = match listen_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("function-sample listening on http://{addr}");
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("accept failed: {e}");
                continue;
            }
        };
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(|req| async move { Ok::<_, Infallible>(greet(&req)) });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
