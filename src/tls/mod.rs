//! TLS termination: listeners from the node's `ssl` block, certificates from the snapshot's
//! `ssls`, chosen per handshake by SNI.
//!
//! A TLS connection is accepted in two steps. The ClientHello is read first
//! ([`stream::read_client_hello`]); its SNI picks an entry of the *current* snapshot's
//! [`CertTable`] (exact name, then a one-label wildcard, then `ssl.fallback_sni`), or the
//! client gets the `unrecognized_name` alert. The handshake then completes with that entry's
//! prebuilt rustls config (its certificates, protocol versions, client CA, and ALPN `h2` when
//! the listener has `enable_http2`). The whole exchange is bounded by
//! `proxy.client_header_timeout`, as nginx bounds it.
//!
//! Toward upstreams, [`client`] holds the rustls client configs and the client certificates
//! upstreams are shown (upstream mTLS: `tls.client_cert`/`client_key`, `tls.client_cert_id`),
//! and [`trust`] the CA certificates they verify peers with (`ssl.ssl_trusted_certificate`).

mod certs;
mod client;
mod config;
mod info;
mod keyring;
mod resource;
pub mod stream;
pub mod trust;

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use tokio::net::TcpStream;

pub use certs::{normalize_name, parse_certs, CertTable, Served};
pub use client::{
    check_upstream_tls, client_config, cosocket_config, upstream_identity, Alpn, ClientIdentity,
    CosocketVerify, SELF_SIGNED,
};
pub use config::{Protocol, Protocols, SslListen, SslNodeConfig};
pub use info::{plain_var, ClientCert, TlsInfo};
pub use keyring::{DataEncryption, Keyring};
pub use resource::{Ssl, SslClient, SslType};
pub use stream::{HandshakeError, TlsStream};

/// The role of the proxy's TLS listeners in a `ListenerSet`.
pub const HTTPS_ROLE: &str = "https";

/// Accepts a TLS connection on `tcp` with the certificates `table` holds (the snapshot's, read
/// at this handshake). Returns the established stream and what plugins see of it; None when
/// the handshake failed (logged at debug level, except an unknown name: one warning).
pub async fn accept(
    tcp: TcpStream,
    table: impl FnOnce() -> std::sync::Arc<CertTable>,
    http2: bool,
    timeout: Duration,
    remote: SocketAddr,
) -> Option<(TlsStream, Rc<TlsInfo>)> {
    let hs = async {
        let accepted = stream::read_client_hello(&tcp).await?;
        let sni = accepted.client_hello().server_name().map(str::to_string);
        let table = table();
        let Some(served) = table.lookup(sni.as_deref()) else {
            stream::refuse_unrecognized_name(&tcp).await;
            return Err(HandshakeError::UnknownName(
                sni.map(|s| format!("{s:?}"))
                    .unwrap_or_else(|| "(none sent)".to_string()),
            ));
        };
        let config = served.config(http2);
        drop(table);
        let tls = TlsStream::handshake(tcp, accepted, config).await?;
        Ok::<_, HandshakeError>((tls, sni))
    };
    match tokio::time::timeout(timeout, hs).await {
        Ok(Ok((tls, sni))) => {
            let info = tls.with_conn(|c| TlsInfo::from_connection(c, sni));
            Some((tls, Rc::new(info)))
        }
        Ok(Err(HandshakeError::UnknownName(name))) => {
            tracing::warn!(
                client = %remote,
                "TLS handshake refused with unrecognized_name: no ssls entry serves server name {name} and no fallback_sni does"
            );
            None
        }
        Ok(Err(e)) => {
            tracing::debug!(client = %remote, "TLS handshake failed: {e}");
            None
        }
        Err(_) => {
            tracing::debug!(client = %remote, "TLS handshake timed out");
            None
        }
    }
}
