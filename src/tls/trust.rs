//! The CA certificates outgoing TLS connections trust when they verify the peer: APISIX's
//! `apisix.ssl.ssl_trusted_certificate`, here the node config's `ssl.ssl_trusted_certificate`.
//!
//! The value is a comma-separated list; each item is `system` (the operating system's CA
//! bundle) or the path of a PEM file of CA certificates, and the trust set is their union, as
//! APISIX combines them. Unset is `system`, APISIX's default. Where no system bundle is found
//! (a minimal container), `system` is Mozilla's root set built into moongate (webpki-roots)
//! rather than a refusal to start.
//!
//! The set is read once at start-up ([`init`]) and used by every verifying client: https and
//! grpcs upstreams, https health checks, openfunction, the Lua cosockets' `sslhandshake`,
//! the opentelemetry exporter and etcd.

use std::sync::{Arc, OnceLock};

use rustls::RootCertStore;

use super::certs::parse_certs;
use crate::config::{ConfigError, NodeConfig};

const AT: &str = "ssl.ssl_trusted_certificate";

/// Where distributions keep their CA bundle, in the order they are tried (Debian/Ubuntu,
/// Fedora/RHEL, openSUSE, OpenELEC, CentOS/RHEL 7, Alpine).
const SYSTEM_BUNDLES: [&str; 6] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The trust set and where it came from, for the start-up log.
#[derive(Debug)]
pub struct Trust {
    pub roots: Arc<RootCertStore>,
    /// What each item of the setting was read from (`/etc/ssl/certs/ca-certificates.crt
    /// (146 certificates)`).
    pub sources: Vec<String>,
}

/// The operating system's bundle: the first that exists, its certificates that rustls can
/// use as trust anchors (a system bundle may hold a few it cannot; they are skipped).
fn system(roots: &mut RootCertStore) -> String {
    for path in SYSTEM_BUNDLES {
        let Ok(pem) = std::fs::read_to_string(path) else {
            continue;
        };
        let Ok(certs) = parse_certs(&pem) else {
            continue;
        };
        let (added, _skipped) = roots.add_parsable_certificates(certs);
        if added > 0 {
            return format!("{path} ({added} certificates)");
        }
    }
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    format!(
        "Mozilla's root set built in ({} certificates; no system CA bundle found)",
        webpki_roots::TLS_SERVER_ROOTS.len()
    )
}

/// Reads the setting (None: `system`). A file that cannot be read, holds no certificate or a
/// certificate that is not a usable CA is an error naming the file.
pub fn load(setting: Option<&str>) -> Result<Trust, ConfigError> {
    let setting = setting.unwrap_or("system");
    let mut roots = RootCertStore::empty();
    let mut sources = Vec::new();
    for item in setting.split(',').map(str::trim) {
        if item.is_empty() {
            return Err(ConfigError::new(
                AT,
                format!("{setting:?}: an empty item; expected `system` or the path of a PEM file"),
            ));
        }
        if item == "system" {
            sources.push(system(&mut roots));
            continue;
        }
        let pem = std::fs::read_to_string(item).map_err(|e| {
            let why = if e.kind() == std::io::ErrorKind::NotFound {
                format!("certificate path {item} doesn't exist")
            } else {
                format!("cannot read {item}: {e}")
            };
            ConfigError::new(AT, why)
        })?;
        let certs = parse_certs(&pem).map_err(|e| ConfigError::new(AT, format!("{item}: {e}")))?;
        let n = certs.len();
        for (i, c) in certs.into_iter().enumerate() {
            roots
                .add(c)
                .map_err(|e| ConfigError::new(AT, format!("{item}: certificate {}: {e}", i + 1)))?;
        }
        sources.push(format!("{item} ({n} certificates)"));
    }
    Ok(Trust {
        roots: Arc::new(roots),
        sources,
    })
}

/// The node's setting.
fn setting(node: &NodeConfig) -> Option<&str> {
    node.ssl
        .as_ref()
        .and_then(|s| s.ssl_trusted_certificate.as_deref())
}

/// Checks the node's setting (for `check` and the start-up's list of problems).
pub fn check(node: &NodeConfig) -> Result<(), ConfigError> {
    load(setting(node)).map(|_| ())
}

static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();

/// Sets the process's trust set from the node config (once, at start-up, before any client
/// connects). Logs where it came from.
pub fn init(node: &NodeConfig) -> Result<(), ConfigError> {
    if ROOTS.get().is_some() {
        return Ok(());
    }
    let trust = load(setting(node))?;
    tracing::debug!("trusted CA certificates: {}", trust.sources.join(", "));
    let _ = ROOTS.set(trust.roots);
    Ok(())
}

/// The trust set in force (`system` when [`init`] was not called).
pub fn roots() -> Arc<RootCertStore> {
    ROOTS
        .get_or_init(|| {
            let mut r = RootCertStore::empty();
            system(&mut r);
            Arc::new(r)
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem() -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn items_are_unioned_and_bad_ones_named() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.pem");
        std::fs::write(&a, ca_pem() + &ca_pem()).unwrap();
        let t = load(Some(a.to_str().unwrap())).unwrap();
        assert_eq!(t.roots.len(), 2);
        let both = format!("system, {}", a.display());
        let t = load(Some(&both)).unwrap();
        assert!(t.roots.len() > 2, "{}", t.sources.join(", "));
        assert_eq!(t.sources.len(), 2);

        let e = load(Some("/nonexistent/ca.pem")).unwrap_err();
        assert_eq!(e.path, AT);
        assert_eq!(
            e.message,
            "certificate path /nonexistent/ca.pem doesn't exist"
        );
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a pem").unwrap();
        let e = load(Some(junk.to_str().unwrap())).unwrap_err();
        assert!(
            e.message.contains("junk.pem: failed to parse cert"),
            "{}",
            e.message
        );
        assert!(load(Some("system,")).is_err());
    }
}
