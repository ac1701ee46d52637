//! A minimal Pingora proxy for bench/run.py: every request goes to one upstream over
//! kept-alive HTTP/1.1, on one worker thread. Not part of moongate's build.
//!
//!     bench-pingora --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT [--threads N]

use std::net::SocketAddr;

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

struct Peer {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Peer {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() {
    let mut listen = None;
    let mut upstream = None;
    let mut threads = 1;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--listen" => listen = Some(value),
            "--upstream" => upstream = Some(value.parse().expect("--upstream HOST:PORT")),
            "--threads" => threads = value.parse().expect("--threads N"),
            _ => panic!("unknown argument {arg}"),
        }
    }
    let listen = listen.expect("--listen HOST:PORT");
    let upstream = upstream.expect("--upstream HOST:PORT");

    let run = std::env::temp_dir();
    let conf = ServerConf {
        threads,
        work_stealing: false,
        upstream_keepalive_pool_size: 128,
        pid_file: run
            .join(format!("bench-pingora-{}.pid", std::process::id()))
            .display()
            .to_string(),
        upgrade_sock: run
            .join(format!("bench-pingora-{}.sock", std::process::id()))
            .display()
            .to_string(),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, Peer { upstream });
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    server.run_forever();
}
