//! The snapshot's certificates: `ssls` entries parsed, checked and ready to serve, indexed by
//! server name.
//!
//! Built with the rest of the snapshot, so a changed `ssls` entry serves the next handshake
//! and a bad one fails the build (with its field path) while the old certificates keep
//! serving. Each server entry gets its rustls `ServerConfig`s here (one with ALPN `h2` and
//! `http/1.1`, one with `http/1.1` only), so a handshake only looks up a name and clones an
//! `Arc`. The session cache and the ticket keys are process-wide, not per snapshot: a client
//! resumes its session across certificate changes.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    ClientHello, ProducesTickets, ResolvesServerCert, ServerSessionMemoryCache,
    WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureAlgorithm, SignatureScheme,
};

use super::config::{Protocol, Protocols, SslNodeConfig};
use super::keyring::Keyring;
use super::resource::{Ssl, SslType};
use crate::config::ConfigError;

/// Sessions the process-wide cache keeps for resumption (nginx's `ssl_session_cache` holds
/// about 4000 per MiB).
const SESSION_CACHE_SIZE: usize = 20_000;

/// The process's crypto provider (ring), for servers and clients alike.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

fn session_cache() -> Arc<ServerSessionMemoryCache> {
    static C: OnceLock<Arc<ServerSessionMemoryCache>> = OnceLock::new();
    C.get_or_init(|| ServerSessionMemoryCache::new(SESSION_CACHE_SIZE))
        .clone()
}

/// The process's ticket keys (rotated by rustls every 6 hours), made on first use.
fn ticketer() -> Option<Arc<dyn ProducesTickets>> {
    static T: OnceLock<Option<Arc<dyn ProducesTickets>>> = OnceLock::new();
    T.get_or_init(|| match rustls::crypto::ring::Ticketer::new() {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!("session tickets are off: {e}");
            None
        }
    })
    .clone()
}

/// One server entry, ready for handshakes.
pub struct Served {
    /// The `ssls` id.
    pub id: String,
    http1: Arc<ServerConfig>,
    http2: Arc<ServerConfig>,
}

impl Served {
    /// The config for a listener with (`h2`, `http/1.1`) or without (`http/1.1`) HTTP/2.
    pub fn config(&self, http2: bool) -> Arc<ServerConfig> {
        if http2 {
            self.http2.clone()
        } else {
            self.http1.clone()
        }
    }
}

/// Every certificate of a snapshot.
#[derive(Default)]
pub struct CertTable {
    exact: HashMap<String, Arc<Served>>,
    /// `*.example.com` entries by `example.com`.
    wildcard: HashMap<String, Arc<Served>>,
    /// The entry `ssl.fallback_sni` names.
    fallback: Option<Arc<Served>>,
    /// `type: client` entries by id (certificates presented to upstreams, `tls.client_cert_id`).
    pub clients: HashMap<String, Arc<super::client::ClientIdentity>>,
    /// The type of every entry by id (also of those that failed to build), so an upstream's
    /// `tls.client_cert_id` can be told "no such ssl" from "not a client certificate".
    kinds: HashMap<String, SslType>,
    /// Warnings of the build (a certificate outside its validity period), by entry index:
    /// logged, and shown in the answer to the Admin API write that caused them.
    pub warnings: Vec<(usize, String)>,
}

impl fmt::Debug for CertTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertTable")
            .field("exact", &self.exact.keys().collect::<Vec<_>>())
            .field("wildcard", &self.wildcard.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A server name as matched: lower case, without a trailing dot.
pub fn normalize_name(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

impl CertTable {
    /// The type of the entry with this id, if there is one.
    pub fn kind_of(&self, id: &str) -> Option<SslType> {
        self.kinds.get(id).copied()
    }

    /// Whether no server certificate is configured.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }

    /// The entry serving `name`: an exact name first, then a wildcard one label deep (as
    /// APISIX: `*.example.com` serves `a.example.com`, not `a.b.example.com`). `name` is
    /// already normalised.
    pub fn find(&self, name: &str) -> Option<&Arc<Served>> {
        if let Some(s) = self.exact.get(name) {
            return Some(s);
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent)
    }

    /// The entry for a handshake: by the client's SNI, else `fallback_sni`'s.
    pub fn lookup(&self, sni: Option<&str>) -> Option<&Arc<Served>> {
        sni.and_then(|n| self.find(&normalize_name(n)))
            .or(self.fallback.as_ref())
    }

    /// Builds the table from a document's `ssls`, adding one error per bad field.
    pub fn build(
        ssls: &[Ssl],
        node: Option<&SslNodeConfig>,
        keyring: &Keyring,
        errors: &mut Vec<ConfigError>,
    ) -> CertTable {
        let default_node = SslNodeConfig::default();
        let node = node.unwrap_or(&default_node);
        let mut table = CertTable::default();
        let mut ids: HashMap<&str, usize> = HashMap::new();
        for (i, ssl) in ssls.iter().enumerate() {
            let path = format!("ssls[{i}]");
            let Some(id) = &ssl.id else {
                errors.push(ConfigError::new(format!("{path}.id"), "an id is required"));
                continue;
            };
            if ids.insert(id.0.as_str(), i).is_some() {
                errors.push(ConfigError::new(
                    format!("{path}.id"),
                    format!("duplicate id \"{id}\""),
                ));
                continue;
            }
            table.kinds.insert(id.0.clone(), ssl.kind);
            let before = errors.len();
            let pairs = parse_pairs(ssl, &path, keyring, errors);
            for w in pairs.iter().filter_map(|p| validity_warning(&p.cert[0])) {
                tracing::warn!("{path}.cert: {w}");
                table.warnings.push((i, w));
            }
            if ssl.status > 1 {
                errors.push(ConfigError::new(
                    format!("{path}.status"),
                    "expected 0 or 1",
                ));
            }
            if ssl.kind == SslType::Client {
                if let (Some(first), true) = (pairs.first(), errors.len() == before) {
                    table.clients.insert(
                        id.0.clone(),
                        Arc::new(super::client::ClientIdentity::new(first.clone())),
                    );
                }
                continue;
            }
            let names = check_names(ssl, &path, errors);
            let verifier = ssl
                .client
                .as_ref()
                .and_then(|c| client_verifier(c, &format!("{path}.client"), errors));
            if errors.len() > before || ssl.status == 0 {
                continue;
            }
            let protocols = ssl.ssl_protocols.as_ref().unwrap_or(&node.ssl_protocols);
            let resolver = Arc::new(Pairs(pairs));
            let make = |alpn: &[&[u8]]| {
                server_config(
                    resolver.clone(),
                    verifier.clone(),
                    protocols,
                    node.ssl_session_tickets,
                    alpn,
                )
            };
            let served = match (make(&[b"h2", b"http/1.1"]), make(&[b"http/1.1"])) {
                (Ok(http2), Ok(http1)) => Arc::new(Served {
                    id: id.0.clone(),
                    http1,
                    http2,
                }),
                (Err(e), _) | (_, Err(e)) => {
                    errors.push(ConfigError::new(path, e));
                    continue;
                }
            };
            for (j, name) in names {
                let (map, key) = match name.strip_prefix("*.") {
                    Some(parent) => (&mut table.wildcard, parent.to_string()),
                    None => (&mut table.exact, name.clone()),
                };
                if let Some(other) = map.get(&key) {
                    errors.push(ConfigError::new(
                        format!("{path}.{}{j}", names_index_prefix(ssl)),
                        format!(
                            "server name \"{name}\" is already served by ssl \"{}\"",
                            other.id
                        ),
                    ));
                    continue;
                }
                map.insert(key, served.clone());
            }
        }
        if let Some(name) = &node.fallback_sni {
            let name = normalize_name(name);
            table.fallback = table.find(&name).cloned();
            if table.fallback.is_none() && !table.is_empty() {
                tracing::warn!(
                    fallback_sni = %name,
                    "ssl.fallback_sni names no ssls entry: clients without a known SNI are refused"
                );
            }
        }
        table
    }
}

/// `snis[` or `sni` for error paths (`snis[2]`, `sni`).
fn names_index_prefix(ssl: &Ssl) -> &'static str {
    if ssl.snis.is_some() {
        "snis["
    } else {
        "sni"
    }
}

/// The entry's server names, normalised and checked, with the index suffix of their field
/// (`2]` for `snis[2]`, empty for `sni`).
fn check_names(ssl: &Ssl, path: &str, errors: &mut Vec<ConfigError>) -> Vec<(String, String)> {
    let field = ssl.names_field();
    let names = ssl.names();
    if names.is_empty() {
        errors.push(ConfigError::new(
            path,
            "a server certificate needs \"sni\" or \"snis\"",
        ));
        return Vec::new();
    }
    if ssl.sni.is_some() && ssl.snis.is_some() {
        errors.push(ConfigError::new(
            path,
            "set either \"sni\" or \"snis\", not both",
        ));
        return Vec::new();
    }
    let mut out = Vec::new();
    for (j, raw) in names.into_iter().enumerate() {
        let (at, suffix) = if ssl.snis.is_some() {
            (format!("{path}.{field}[{j}]"), format!("{j}]"))
        } else {
            (format!("{path}.{field}"), String::new())
        };
        let name = normalize_name(raw);
        if let Err(why) = check_name(&name) {
            errors.push(ConfigError::new(
                at,
                format!("bad server name {raw:?}: {why}"),
            ));
            continue;
        }
        out.push((suffix, name));
    }
    out
}

/// A host name, or `*.` followed by one.
fn check_name(name: &str) -> Result<(), &'static str> {
    let host = name.strip_prefix("*.").unwrap_or(name);
    if host.is_empty() {
        return Err("empty");
    }
    for label in host.split('.') {
        if label.is_empty() {
            return Err("empty label");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("a name has letters, digits, '-' and '_', and a wildcard only as its first label (\"*.example.com\")");
        }
    }
    Ok(())
}

/// Parses `cert`/`key` and the `certs`/`keys` pairs; ECDSA and EdDSA pairs go first (they are
/// chosen when the client supports them).
fn parse_pairs(
    ssl: &Ssl,
    path: &str,
    keyring: &Keyring,
    errors: &mut Vec<ConfigError>,
) -> Vec<Arc<CertifiedKey>> {
    let mut pairs = Vec::new();
    match parse_pair(&ssl.cert, &ssl.key, keyring) {
        Ok(p) => pairs.push(p),
        Err((field, msg)) => errors.push(ConfigError::new(format!("{path}.{field}"), msg)),
    }
    let certs = ssl.certs.as_deref().unwrap_or(&[]);
    let keys = ssl.keys.as_deref().unwrap_or(&[]);
    if ssl.kind == SslType::Server && certs.len() != keys.len() {
        errors.push(ConfigError::new(
            format!("{path}.keys"),
            "mismatched number of certs and keys",
        ));
        return pairs;
    }
    for (j, (c, k)) in certs.iter().zip(keys).enumerate() {
        match parse_pair(c, k, keyring) {
            Ok(p) => pairs.push(p),
            Err((field, msg)) => {
                errors.push(ConfigError::new(format!("{path}.{field}s[{j}]"), msg))
            }
        }
    }
    pairs.sort_by_key(|p| match p.key.algorithm() {
        SignatureAlgorithm::ECDSA | SignatureAlgorithm::ED25519 | SignatureAlgorithm::ED448 => 0,
        _ => 1,
    });
    pairs
}

/// PEM certificates (at least one, each a valid X.509 certificate).
pub fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("failed to parse cert: {e}"))?;
    if certs.is_empty() {
        return Err("failed to parse cert: no certificate found in the PEM text".to_string());
    }
    for c in &certs {
        x509_parser::parse_x509_certificate(c).map_err(|e| format!("failed to parse cert: {e}"))?;
    }
    Ok(certs)
}

/// A certificate chain and its key (PEM, or encrypted with `keyring`); the error names the
/// field (`cert` or `key`).
pub fn parse_pair(
    cert: &str,
    key: &str,
    keyring: &Keyring,
) -> Result<Arc<CertifiedKey>, (&'static str, String)> {
    let chain = parse_certs(cert).map_err(|m| ("cert", m))?;
    let key = keyring.decrypt(key).map_err(|m| ("key", m))?;
    let der = PrivateKeyDer::from_pem_slice(key.as_bytes())
        .map_err(|e| ("key", format!("failed to parse key: {e}")))?;
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| ("key", format!("failed to parse key: {e}")))?;
    let ck = CertifiedKey::new(chain, signing);
    match ck.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err((
                "key",
                "the key does not match the certificate's public key".to_string(),
            ))
        }
    }
    Ok(Arc::new(ck))
}

/// What to say about a certificate outside its validity period (it is still served, as
/// APISIX serves it; clients will refuse it).
fn validity_warning(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let v = parsed.validity();
    let now = x509_parser::time::ASN1Time::now();
    if v.not_after < now {
        Some(format!(
            "the certificate for {} expired on {}",
            parsed.subject(),
            v.not_after
        ))
    } else if v.not_before > now {
        Some(format!(
            "the certificate for {} is not valid before {}",
            parsed.subject(),
            v.not_before
        ))
    } else {
        None
    }
}

/// Chooses among an entry's pairs by what the client supports.
#[derive(Debug)]
struct Pairs(Vec<Arc<CertifiedKey>>);

impl ResolvesServerCert for Pairs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let schemes = hello.signature_schemes();
        self.0
            .iter()
            .find(|p| p.key.choose_scheme(schemes).is_some())
            .or(self.0.first())
            .cloned()
    }
}

/// The client verifier of `client.ca` / `client.depth`.
fn client_verifier(
    client: &super::resource::SslClient,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<Arc<dyn ClientCertVerifier>> {
    let cas = match parse_certs(&client.ca) {
        Ok(c) => c,
        Err(e) => {
            errors.push(ConfigError::new(
                format!("{path}.ca"),
                format!("failed to validate client_cert: {e}"),
            ));
            return None;
        }
    };
    let mut roots = RootCertStore::empty();
    for ca in &cas {
        if let Err(e) = roots.add(ca.clone()) {
            errors.push(ConfigError::new(
                format!("{path}.ca"),
                format!("failed to validate client_cert: {e}"),
            ));
            return None;
        }
    }
    match WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).build() {
        Ok(inner) => Some(Arc::new(DepthLimited {
            inner,
            max_intermediates: client.depth.saturating_sub(1) as usize,
            anchors: cas,
        })),
        Err(e) => {
            errors.push(ConfigError::new(format!("{path}.ca"), e.to_string()));
            None
        }
    }
}

/// webpki's verifier with nginx's `ssl_verify_depth`: at most `depth - 1` CA certificates
/// between the client's and the trusted one (copies of the trusted CA a client sends along
/// do not count).
#[derive(Debug)]
struct DepthLimited {
    inner: Arc<dyn ClientCertVerifier>,
    max_intermediates: usize,
    anchors: Vec<CertificateDer<'static>>,
}

impl ClientCertVerifier for DepthLimited {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let between = intermediates
            .iter()
            .filter(|c| !self.anchors.iter().any(|a| a.as_ref() == c.as_ref()))
            .count();
        if between > self.max_intermediates {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
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

fn server_config(
    resolver: Arc<Pairs>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    protocols: &Protocols,
    tickets: bool,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, String> {
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = protocols
        .0
        .iter()
        .map(|p| match p {
            Protocol::Tls12 => &rustls::version::TLS12,
            Protocol::Tls13 => &rustls::version::TLS13,
        })
        .collect();
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&versions)
        .map_err(|e| e.to_string())?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_cert_resolver(resolver);
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg.session_storage = session_cache();
    if tickets {
        if let Some(t) = ticketer() {
            cfg.ticketer = t;
        }
    }
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("a.example.com").is_ok());
        assert!(check_name("*.example.com").is_ok());
        assert!(check_name("a.*.com").is_err());
        assert!(check_name("*").is_err());
        assert!(check_name("a..b").is_err());
        assert_eq!(normalize_name("A.Example.COM."), "a.example.com");
    }
}
