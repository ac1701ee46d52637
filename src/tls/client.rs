//! TLS toward upstreams: the rustls client settings every outgoing TLS connection uses
//! (https/grpcs upstreams, https health checks, openfunction), and the client certificates an
//! upstream presents (APISIX's upstream `tls.client_cert`/`tls.client_key`, or
//! `tls.client_cert_id` naming an `ssls` entry of `type: client`).
//!
//! A [`ClientIdentity`] is made when the snapshot is built (an `ssls` entry's once, shared by
//! every upstream naming it; an inline pair's once per upstream), and holds its own
//! `ClientConfig`s, so a connection only clones an `Arc`. Its fingerprint (a digest of the
//! certificate chain) is part of the connection pools' key ([`crate::proxy::client::Target`]):
//! a connection made with one certificate never serves an upstream that presents another, and
//! a changed certificate after a reload makes new connections, while an unchanged one keeps
//! using the pooled ones. Each identity's configs have their own session store, so a TLS
//! session (which carries the client authentication it was made with) is never resumed under
//! another certificate.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use super::certs::{parse_pair, provider, CertTable};
use super::keyring::Keyring;
use super::resource::SslType;
use crate::config::{ConfigError, UpstreamTls};

/// The protocol a TLS connection offers by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    Http1,
    /// `h2` only: a gRPC upstream must speak HTTP/2.
    Http2,
}

/// The slot of a (verify, ALPN) combination in a config table.
fn slot(verify: bool, alpn: Alpn) -> usize {
    usize::from(verify) * 2 + usize::from(alpn == Alpn::Http2)
}

/// A client certificate and key presented to upstreams that ask for one, with the rustls
/// configs that present it (made on first use per verify/ALPN combination, at most four).
pub struct ClientIdentity {
    key: Arc<CertifiedKey>,
    /// SHA-256 over the certificate chain: equal digests present the same certificate.
    digest: [u8; 32],
    /// The certificate's subject, for logs.
    subject: String,
    configs: [OnceLock<Arc<ClientConfig>>; 4],
}

impl ClientIdentity {
    /// An identity for a checked certificate and key.
    pub fn new(key: Arc<CertifiedKey>) -> ClientIdentity {
        let mut h = Sha256::new();
        for c in &key.cert {
            h.update((c.len() as u64).to_be_bytes());
            h.update(c.as_ref());
        }
        let subject = key
            .cert
            .first()
            .and_then(|c| x509_parser::parse_x509_certificate(c).ok())
            .map(|(_, p)| p.subject().to_string())
            .unwrap_or_default();
        ClientIdentity {
            key,
            digest: h.finalize().into(),
            subject,
            configs: [const { OnceLock::new() }; 4],
        }
    }

    /// The digest in hex: what tells one certificate from another across snapshots.
    pub fn fingerprint(&self) -> String {
        self.digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The certificate's subject (`CN=client,O=example`).
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The rustls config for a connection that verifies the server or not and offers `alpn`,
    /// presenting this certificate when the server asks for one.
    pub fn config(&self, verify: bool, alpn: Alpn) -> Arc<ClientConfig> {
        self.configs[slot(verify, alpn)]
            .get_or_init(|| {
                make_config(
                    verify,
                    alpn,
                    Some(Arc::new(Present(self.key.clone())) as Arc<dyn ResolvesClientCert>),
                )
            })
            .clone()
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("subject", &self.subject)
            .finish()
    }
}

impl PartialEq for ClientIdentity {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

impl Eq for ClientIdentity {}

impl Hash for ClientIdentity {
    /// Eight bytes of the digest are plenty to spread the pool's keys (`eq` compares all 32).
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(&self.digest[..8]);
    }
}

/// Presents one certificate whatever the server's hints say (as nginx's
/// `proxy_ssl_certificate` does): a server that refuses it says so in the handshake.
#[derive(Debug)]
struct Present(Arc<CertifiedKey>);

impl ResolvesClientCert for Present {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The TLS client settings for a connection that verifies the server or not (`ssl_verify:
/// false`, upstream `tls.verify: false`), offers `alpn` and presents `identity` if given.
/// Without an identity, made once per process per combination; with one, once per identity.
pub fn client_config(
    verify: bool,
    alpn: Alpn,
    identity: Option<&ClientIdentity>,
) -> Arc<ClientConfig> {
    if let Some(id) = identity {
        return id.config(verify, alpn);
    }
    static CONFIGS: [OnceLock<Arc<ClientConfig>>; 4] = [const { OnceLock::new() }; 4];
    CONFIGS[slot(verify, alpn)]
        .get_or_init(|| make_config(verify, alpn, None))
        .clone()
}

/// Certificates are verified against the node's trusted CAs ([`super::trust`]).
fn make_config(
    verify: bool,
    alpn: Alpn,
    client: Option<Arc<dyn ResolvesClientCert>>,
) -> Arc<ClientConfig> {
    let mut cfg = base_config(verify, client);
    cfg.alpn_protocols = match alpn {
        Alpn::Http1 => vec![b"http/1.1".to_vec()],
        Alpn::Http2 => vec![b"h2".to_vec()],
    };
    Arc::new(cfg)
}

fn base_config(verify: bool, client: Option<Arc<dyn ResolvesClientCert>>) -> ClientConfig {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    let builder = if verify {
        builder.with_root_certificates(super::trust::roots())
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
    };
    match client {
        Some(resolver) => builder.with_client_cert_resolver(resolver),
        None => builder.with_no_client_auth(),
    }
}

/// How a Lua cosocket's `sslhandshake` checks the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CosocketVerify {
    /// `ssl_verify` false or nil (OpenResty's default): no check.
    Off,
    /// The chain against the trusted CAs and the name against `server_name`.
    Full,
    /// `ssl_verify` without a `server_name`: the chain only, as nginx checks no host then.
    ChainOnly,
}

/// What the cosocket verifier says of a self-signed server certificate (OpenSSL's verify
/// result 18, which OpenResty hands to Lua); other failures keep rustls's error.
pub const SELF_SIGNED: &str = "18: self-signed certificate";

/// The TLS client settings of a Lua cosocket's `sslhandshake` (no ALPN, as OpenResty's), made
/// once per process per kind of check; each has its own session cache, so a second handshake
/// to the same server name resumes.
pub fn cosocket_config(verify: CosocketVerify) -> Arc<ClientConfig> {
    static CONFIGS: [OnceLock<Arc<ClientConfig>>; 3] = [const { OnceLock::new() }; 3];
    let slot = match verify {
        CosocketVerify::Off => 0,
        CosocketVerify::Full => 1,
        CosocketVerify::ChainOnly => 2,
    };
    CONFIGS[slot]
        .get_or_init(|| {
            if verify == CosocketVerify::Off {
                return Arc::new(base_config(false, None));
            }
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                super::trust::roots(),
                provider(),
            )
            .build()
            .expect("a root set with the built-in or configured CAs");
            let checker = CosocketVerifier {
                inner,
                check_name: verify == CosocketVerify::Full,
            };
            let cfg = ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(checker))
                .with_no_client_auth();
            Arc::new(cfg)
        })
        .clone()
}

/// The web PKI check against the trusted CAs, the name only when `check_name`, and a
/// self-signed certificate told apart from one of an unknown issuer ([`SELF_SIGNED`]).
#[derive(Debug)]
struct CosocketVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for CosocketVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::CertificateError as C;
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                C::NotValidForName | C::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            Err(rustls::Error::InvalidCertificate(C::UnknownIssuer))
                if intermediates.is_empty() && self_signed(end_entity) =>
            {
                Err(rustls::Error::General(SELF_SIGNED.to_string()))
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Whether a certificate names itself as its issuer.
fn self_signed(cert: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(cert)
        .map(|(_, c)| c.subject().as_raw() == c.issuer().as_raw())
        .unwrap_or(false)
}

/// The client certificate an upstream's `tls` names, checked: the inline pair parsed (its key
/// decrypted with `keyring` when stored encrypted), or the `type: client` entry of `table`
/// that `client_cert_id` names. `path` is the upstream's (`upstreams[2]`). None when the
/// upstream presents none, or names an `ssls` entry whose own error fails the build already.
pub fn upstream_identity(
    path: &str,
    tls: Option<&UpstreamTls>,
    table: &CertTable,
    keyring: &Keyring,
) -> Result<Option<Arc<ClientIdentity>>, ConfigError> {
    let Some(tls) = tls else { return Ok(None) };
    if let Some(id) = &tls.client_cert_id {
        let at = field(path, "tls.client_cert_id");
        return match table.kind_of(&id.0) {
            None => Err(ConfigError::new(
                at,
                format!("failed to fetch ssl info by ssl id [{id}], response code: 404"),
            )),
            Some(SslType::Server) => Err(ConfigError::new(
                at,
                format!("failed to fetch ssl info by ssl id [{id}], wrong ssl type"),
            )),
            Some(SslType::Client) => Ok(table.clients.get(&id.0).cloned()),
        };
    }
    let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) else {
        return Ok(None);
    };
    match parse_pair(cert, key, keyring) {
        Ok(pair) => Ok(Some(Arc::new(ClientIdentity::new(pair)))),
        Err((name, msg)) => Err(ConfigError::new(
            field(path, &format!("tls.client_{name}")),
            msg,
        )),
    }
}

/// Checks `tls`'s fields that go together (APISIX's schema `dependencies`): `client_cert` and
/// `client_key` both or neither, and `client_cert_id` instead of them, not beside them.
pub fn check_upstream_tls(path: &str, tls: &UpstreamTls) -> Result<(), ConfigError> {
    let at = field(path, "tls");
    match (&tls.client_cert, &tls.client_key) {
        (Some(_), None) => {
            return Err(ConfigError::new(
                at,
                "failed to validate dependent schema for \"client_cert\": property \"client_key\" is required",
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                at,
                "failed to validate dependent schema for \"client_key\": property \"client_cert\" is required",
            ))
        }
        (Some(_), Some(_)) if tls.client_cert_id.is_some() => {
            return Err(ConfigError::new(
                at,
                "failed to validate dependent schema for \"client_cert_id\": value wasn't supposed to match schema (set client_cert_id or client_cert and client_key, not both)",
            ))
        }
        _ => {}
    }
    Ok(())
}

/// `path.rest`, or `rest` for the upstream itself (a Lua plugin's, path empty).
fn field(path: &str, rest: &str) -> String {
    if path.is_empty() {
        rest.to_string()
    } else {
        format!("{path}.{rest}")
    }
}

/// Accepts any server certificate (`tls.verify: false`, `ssl_verify: false`); the handshake's
/// signatures are still checked.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).expect("cert");
        (c.cert.pem(), c.key_pair.serialize_pem())
    }

    fn tls(cert: Option<&str>, key: Option<&str>, id: Option<&str>) -> UpstreamTls {
        UpstreamTls {
            verify: false,
            client_cert: cert.map(String::from),
            client_key: key.map(String::from),
            client_cert_id: id.map(|i| crate::config::Id(i.to_string())),
        }
    }

    #[test]
    fn identities_are_equal_by_certificate() {
        let (cert, key) = pair("a.test");
        let (other, other_key) = pair("b.test");
        let table = CertTable::default();
        let keyring = Keyring::default();
        let id = |c: &str, k: &str| {
            upstream_identity("u", Some(&tls(Some(c), Some(k), None)), &table, &keyring)
                .expect("resolves")
                .expect("an identity")
        };
        let (a1, a2, b) = (id(&cert, &key), id(&cert, &key), id(&other, &other_key));
        assert_eq!(a1, a2, "the same certificate parsed twice");
        assert_ne!(a1, b);
        assert_eq!(a1.fingerprint().len(), 64);
        assert!(a1.subject().contains("rcgen"), "{}", a1.subject());
        let e = upstream_identity(
            "u",
            Some(&tls(Some(&cert), Some(&other_key), None)),
            &table,
            &keyring,
        )
        .unwrap_err();
        assert_eq!(e.path, "u.tls.client_key");
        let e = upstream_identity("u", Some(&tls(None, None, Some("x"))), &table, &keyring)
            .unwrap_err();
        assert_eq!(
            (e.path.as_str(), e.message.as_str()),
            (
                "u.tls.client_cert_id",
                "failed to fetch ssl info by ssl id [x], response code: 404"
            )
        );
    }

    #[test]
    fn fields_that_go_together() {
        assert!(check_upstream_tls("u", &tls(Some("c"), Some("k"), None)).is_ok());
        assert!(check_upstream_tls("u", &tls(None, None, Some("1"))).is_ok());
        assert!(check_upstream_tls("u", &tls(None, None, None)).is_ok());
        for bad in [
            tls(Some("c"), None, None),
            tls(None, Some("k"), None),
            tls(Some("c"), Some("k"), Some("1")),
        ] {
            let e = check_upstream_tls("", &bad).unwrap_err();
            assert_eq!(e.path, "tls");
            assert!(
                e.message.starts_with("failed to validate dependent schema"),
                "{}",
                e.message
            );
        }
    }
}
