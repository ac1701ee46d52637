//! TLS test helpers: certificates made at test time (rcgen; RSA keys from the `openssl` CLI,
//! which rcgen's ring backend cannot generate), a blocking rustls client, and the gateway's
//! TLS listener address.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::Gateway;

/// A test CA that issues server and client certificates.
pub struct Pki {
    pub ca_pem: String,
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate and its key, in PEM.
#[derive(Clone)]
pub struct Pair {
    pub cert: String,
    pub key: String,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("CA cert");
        Pki {
            ca_pem: cert.pem(),
            cert,
            key,
        }
    }

    fn issue(&self, names: &[&str], cn: &str, key: KeyPair, client: bool, expired: bool) -> Pair {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "moongate tests");
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign leaf");
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// An ECDSA P-256 server certificate for `names`, with common name `cn`.
    pub fn server(&self, names: &[&str], cn: &str) -> Pair {
        self.issue(names, cn, KeyPair::generate().expect("key"), false, false)
    }

    /// A server certificate for `names` on the given PEM key (e.g. [`rsa_key`]).
    pub fn server_with_key(&self, names: &[&str], cn: &str, key_pem: &str) -> Pair {
        let key = KeyPair::from_pem(key_pem).expect("parse key");
        self.issue(names, cn, key, false, false)
    }

    /// A server certificate that expired in 2021.
    pub fn expired(&self, names: &[&str], cn: &str) -> Pair {
        self.issue(names, cn, KeyPair::generate().expect("key"), false, true)
    }

    /// A client certificate with common name `cn`.
    pub fn client(&self, cn: &str) -> Pair {
        self.issue(&[], cn, KeyPair::generate().expect("key"), true, false)
    }
}

/// A fresh 2048-bit RSA key in PKCS#8 PEM, from `openssl genpkey`.
pub fn rsa_key() -> String {
    let out = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ])
        .stderr(Stdio::null())
        .output()
        .expect("run openssl genpkey");
    assert!(out.status.success(), "openssl genpkey failed");
    String::from_utf8(out.stdout).expect("PEM is text")
}

/// A PEM block indented for a YAML block scalar (`cert: |` then this).
pub fn yaml_block(pem: &str, indent: usize) -> String {
    let pad = " ".repeat(indent);
    pem.lines()
        .map(|l| format!("{pad}{l}\n"))
        .collect::<String>()
}

/// The gateway's TLS listeners in `ssl.listen` order, from its `listening on https://` lines.
pub fn https_addrs(gw: &Gateway) -> Vec<SocketAddr> {
    assert!(
        gw.wait_for_log("listening on https://", Duration::from_secs(20)),
        "no TLS listener line; log:\n{}",
        gw.logs()
    );
    // The serving line (`moongate VERSION serving FILE ... generation=N`) comes after every
    // listener line.
    assert!(gw.wait_for_log("generation=", Duration::from_secs(20)));
    gw.logs()
        .lines()
        .filter_map(|l| {
            let rest = l.split("listening on https://").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// How a test client connects.
pub struct ClientOpts<'a> {
    /// The CA certificate(s) trusted.
    pub ca: &'a str,
    /// The name the certificate is checked against.
    pub name: &'a str,
    /// Whether the name goes out as SNI.
    pub send_sni: bool,
    /// A client certificate (mTLS).
    pub client_cert: Option<&'a Pair>,
    /// ALPN protocols offered.
    pub alpn: &'a [&'a [u8]],
}

impl<'a> ClientOpts<'a> {
    pub fn new(ca: &'a str, name: &'a str) -> ClientOpts<'a> {
        ClientOpts {
            ca,
            name,
            send_sni: true,
            client_cert: None,
            alpn: &[],
        }
    }
}

/// A client config for `opts` (keep it to resume sessions on the next connection).
pub fn client_config(opts: &ClientOpts<'_>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(opts.ca.as_bytes()) {
        roots.add(c.expect("CA PEM")).expect("add root");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots);
    let mut cfg = match opts.client_cert {
        Some(p) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(p.cert.as_bytes())
                    .map(|c| c.expect("cert PEM"))
                    .collect(),
                PrivateKeyDer::from_pem_slice(p.key.as_bytes()).expect("key PEM"),
            )
            .expect("client auth"),
        None => builder.with_no_client_auth(),
    };
    cfg.enable_sni = opts.send_sni;
    cfg.alpn_protocols = opts.alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// An established TLS connection (blocking).
pub type TlsConn = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connects and completes the handshake; Err with rustls's error text when it fails.
pub fn tls_connect_with(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    name: &str,
) -> Result<TlsConn, String> {
    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(20))).ok();
    let server_name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(cfg, server_name).map_err(|e| e.to_string())?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).map_err(|e| e.to_string())?;
    }
    Ok(s)
}

/// [`tls_connect_with`] with a config made from `opts`.
pub fn tls_connect(addr: SocketAddr, opts: &ClientOpts<'_>) -> Result<TlsConn, String> {
    tls_connect_with(addr, client_config(opts), opts.name)
}

/// The common name of the certificate the server presented.
pub fn peer_cn(conn: &TlsConn) -> String {
    let der = &conn.conn.peer_certificates().expect("server certificate")[0];
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse server certificate");
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or("")
        .to_string();
    cn
}

/// The serial number (hex) of the certificate the server presented.
pub fn peer_serial(conn: &TlsConn) -> String {
    let der = &conn.conn.peer_certificates().expect("server certificate")[0];
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse server certificate");
    cert.raw_serial_as_string()
}

/// A response read off a TLS connection.
pub struct TlsResp {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl TlsResp {
    /// A response header's value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// Sends `GET path` with `Host: host` (keep-alive) and reads one `Content-Length` response.
pub fn tls_get(conn: &mut TlsConn, host: &str, path: &str) -> Result<TlsResp, String> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    conn.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    conn.flush().map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!(
                "closed before a response head: {:?}",
                String::from_utf8_lossy(&buf)
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = conn.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed inside the body".to_string());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(TlsResp {
        status,
        head,
        body: String::from_utf8_lossy(&buf[head_end..head_end + len]).into_owned(),
    })
}

/// `openssl s_client` against `addr` with `args` (e.g. `-servername x`); returns its stdout
/// and stderr together.
pub fn s_client(addr: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl s_client");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
