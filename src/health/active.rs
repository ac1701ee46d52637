//! The active checker of one upstream: a task on the control runtime that probes each node,
//! a healthy one every `healthy.interval` seconds and an unhealthy one every
//! `unhealthy.interval`, at most `concurrency` probes at a time.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::config::{Active, CheckType};
use super::state::{NodeHealth, Observation, Source, UpstreamHealth};
use crate::proxy::client::{connect_stream, Alpn, ClientError, Target};
use crate::tls::ClientIdentity;

/// The longest status line a probe reads before calling the answer malformed.
const MAX_STATUS_LINE: usize = 1024;

/// Probes the upstream's nodes until the task is aborted (when a snapshot without this
/// upstream, or with its nodes or checks changed, is published). A node is due
/// `healthy.interval` seconds after its last probe while healthy, `unhealthy.interval` while
/// not; its state may change between probes (passive checks), so the task wakes at least
/// every shorter interval to look again.
pub async fn run(health: Arc<UpstreamHealth>) {
    let active = &health.checks.active;
    let n = health.nodes.len();
    if n == 0 {
        return;
    }
    let concurrency = active.concurrency.max(1) as usize;
    let healthy_every = Duration::from_secs(u64::from(active.healthy.interval.max(1)));
    let unhealthy_every = Duration::from_secs(u64::from(active.unhealthy.interval.max(1)));
    let interval = |i: usize| {
        if health.nodes[i].is_healthy() {
            healthy_every
        } else {
            unhealthy_every
        }
    };
    // None: never probed (due at once).
    let mut last: Vec<Option<Instant>> = vec![None; n];
    loop {
        let now = Instant::now();
        let ready: Vec<usize> = (0..n)
            .filter(|&i| last[i].is_none_or(|t| t + interval(i) <= now))
            .collect();
        let results: Vec<(usize, Option<Observation>)> = stream::iter(ready)
            .map(|i| {
                let node = &health.nodes[i];
                let client_cert = health.client_cert.as_ref();
                async move { (i, probe(active, node, client_cert).await) }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        for (i, obs) in results {
            if let Some(obs) = obs {
                health.report(i, Source::Active, obs);
            }
            last[i] = Some(now);
        }
        let next = (0..n)
            .filter_map(|i| last[i].map(|t| t + interval(i)))
            .min()
            .unwrap_or(now);
        let wake = next.min(Instant::now() + healthy_every.min(unhealthy_every));
        tokio::time::sleep_until(wake).await;
    }
}

/// One probe of one node. None: the node answered with a status neither list names, which
/// counts as neither (as in lua-resty-healthcheck).
///
/// An https probe presents the upstream's client certificate (`tls.client_cert`, or
/// `client_cert_id`'s) when the node asks for one, so a node that requires mTLS can be checked.
pub async fn probe(
    active: &Active,
    node: &NodeHealth,
    client_cert: Option<&Arc<ClientIdentity>>,
) -> Option<Observation> {
    let timeout = Duration::from_secs_f64(active.timeout.clamp(0.001, 3600.0));
    let tls = active.kind == CheckType::Https;
    let target = Target {
        tls,
        host: node.host.as_str().into(),
        port: active.port.unwrap_or(node.port),
        verify: active.https_verify_certificate,
        client_cert: client_cert.filter(|_| tls).cloned(),
    };
    let mut stream = match connect_stream(&target, timeout, Alpn::Http1).await {
        Ok(s) => s,
        Err(ClientError::ConnectTimeout) => return Some(Observation::Timeout),
        Err(e) => return Some(Observation::TcpFailure(e.to_string())),
    };
    if active.kind == CheckType::Tcp {
        return Some(Observation::Success);
    }
    let request = request_bytes(active, &node.host);
    let exchange = async {
        stream.write_all(&request).await?;
        read_status(&mut stream).await
    };
    Some(match tokio::time::timeout(timeout, exchange).await {
        Err(_) => Observation::Timeout,
        Ok(Err(e)) => Observation::TcpFailure(e.to_string()),
        Ok(Ok(None)) => Observation::TcpFailure("malformed status line".into()),
        Ok(Ok(Some(status))) => {
            if active.unhealthy.http_statuses.contains(&status) {
                Observation::HttpFailure(status)
            } else if active.healthy.http_statuses.contains(&status) {
                Observation::Success
            } else {
                return None;
            }
        }
    })
}

/// The probe request: `METHOD PATH HTTP/1.1`, `Host`, the configured header lines, and
/// `Connection: close` (a probe connection is never reused).
fn request_bytes(active: &Active, node_host: &str) -> Vec<u8> {
    let host = active.host.as_deref().unwrap_or(node_host);
    let mut out = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: moongate-healthcheck\r\nConnection: close\r\n",
        active.http_method, active.http_path, host
    );
    for h in active.req_headers.iter().flatten() {
        out.push_str(h);
        out.push_str("\r\n");
    }
    if !active.http_req_body.is_empty() {
        out.push_str(&format!(
            "Content-Length: {}\r\n",
            active.http_req_body.len()
        ));
    }
    out.push_str("\r\n");
    out.push_str(&active.http_req_body);
    out.into_bytes()
}

/// Reads the response's status line; None when it is not one.
async fn read_status<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Option<u16>> {
    let mut buf = Vec::with_capacity(128);
    let mut chunk = [0u8; 256];
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            return Ok(parse_status_line(&buf[..end]));
        }
        if buf.len() > MAX_STATUS_LINE {
            return Ok(None);
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before a status line",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn parse_status_line(line: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK"), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503"), Some(503));
        assert_eq!(parse_status_line(b"SSH-2.0-OpenSSH"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 2000 OK"), None);
    }

    #[test]
    fn request_has_host_headers_and_body() {
        let active: Active = serde_json::from_value(serde_json::json!({
            "http_path": "/status", "host": "svc.local", "req_headers": ["X-A: 1"],
            "http_method": "POST", "http_req_body": "ping"
        }))
        .expect("active");
        let r = String::from_utf8(request_bytes(&active, "10.0.0.1")).expect("utf8");
        assert!(
            r.starts_with("POST /status HTTP/1.1\r\nHost: svc.local\r\n"),
            "{r}"
        );
        assert!(r.contains("\r\nX-A: 1\r\n") && r.contains("Content-Length: 4\r\n"));
        assert!(r.ends_with("\r\n\r\nping"));
    }
}
