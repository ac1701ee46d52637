//! What a request sees of its TLS connection: nginx's `$ssl_*` variables (`ctx.var.ssl_*` in
//! APISIX), made once per connection.

use std::borrow::Cow;
use std::fmt::Write as _;

use base64::Engine as _;
use rustls::{HandshakeKind, ProtocolVersion, ServerConnection};
use sha1::Digest as _;
use x509_parser::prelude::*;

/// The negotiated parameters of one TLS connection.
#[derive(Debug, Clone)]
pub struct TlsInfo {
    /// The SNI the client sent, as sent (`ssl_server_name`).
    pub server_name: Option<String>,
    /// `TLSv1.2` or `TLSv1.3` (`ssl_protocol`).
    pub protocol: &'static str,
    /// The cipher suite's IANA name (`ssl_cipher`).
    pub cipher: String,
    /// Whether the session was resumed (`ssl_session_reused`: `r` or `.`).
    pub resumed: bool,
    /// The ALPN protocol chosen, if any.
    pub alpn: Option<String>,
    /// The verified client certificate (mTLS), if the client sent one.
    pub client: Option<ClientCert>,
}

/// A verified client certificate, as nginx's `$ssl_client_*` show it.
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// Subject DN, RFC 2253 (`ssl_client_s_dn`: `CN=client,O=Example`).
    pub subject: String,
    /// Issuer DN, RFC 2253 (`ssl_client_i_dn`).
    pub issuer: String,
    /// Serial number, upper-case hex (`ssl_client_serial`).
    pub serial: String,
    /// SHA-1 of the DER, lower-case hex (`ssl_client_fingerprint`).
    pub fingerprint: String,
    /// `notBefore`, `notAfter` as OpenSSL prints them (`Dec  3 14:00:00 2026 GMT`).
    pub not_before: String,
    pub not_after: String,
    /// Days until `notAfter` (`ssl_client_v_remain`).
    pub days_left: i64,
    /// The certificate in PEM (`ssl_client_raw_cert`).
    pub pem: String,
}

impl TlsInfo {
    /// Reads the parameters of an established connection.
    pub fn from_connection(conn: &ServerConnection, server_name: Option<String>) -> TlsInfo {
        let protocol = match conn.protocol_version() {
            Some(ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "",
        };
        let cipher = conn
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .map(|s| s.replacen("TLS13_", "TLS_", 1))
            .unwrap_or_default();
        let client = conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|der| ClientCert::parse(der.as_ref()));
        TlsInfo {
            server_name,
            protocol,
            cipher,
            resumed: conn.handshake_kind() == Some(HandshakeKind::Resumed),
            alpn: conn
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            client,
        }
    }

    /// The value of nginx variable `name` (`ssl_server_name`, `ssl_client_s_dn`, `https`, ...),
    /// None for a name that is not a TLS variable or has no value.
    pub fn var(&self, name: &str) -> Option<Cow<'_, str>> {
        let c = self.client.as_ref();
        let v: Cow<str> = match name {
            "https" => Cow::Borrowed("on"),
            "ssl_server_name" => Cow::Borrowed(self.server_name.as_deref()?),
            "ssl_protocol" => Cow::Borrowed(self.protocol),
            "ssl_cipher" => Cow::Borrowed(&self.cipher),
            "ssl_session_reused" => Cow::Borrowed(if self.resumed { "r" } else { "." }),
            "ssl_alpn_protocol" => Cow::Borrowed(self.alpn.as_deref()?),
            // A connection with a client CA refuses unverified clients in the handshake, so a
            // certificate here is a verified one.
            "ssl_client_verify" => Cow::Borrowed(if c.is_some() { "SUCCESS" } else { "NONE" }),
            "ssl_client_s_dn" => Cow::Borrowed(&c?.subject),
            "ssl_client_i_dn" => Cow::Borrowed(&c?.issuer),
            "ssl_client_serial" => Cow::Borrowed(&c?.serial),
            "ssl_client_fingerprint" => Cow::Borrowed(&c?.fingerprint),
            "ssl_client_v_start" => Cow::Borrowed(&c?.not_before),
            "ssl_client_v_end" => Cow::Borrowed(&c?.not_after),
            "ssl_client_v_remain" => Cow::Owned(c?.days_left.max(0).to_string()),
            "ssl_client_raw_cert" => Cow::Borrowed(&c?.pem),
            "ssl_client_escaped_cert" => Cow::Owned(
                percent_encoding::utf8_percent_encode(&c?.pem, percent_encoding::NON_ALPHANUMERIC)
                    .to_string(),
            ),
            _ => return None,
        };
        Some(v)
    }
}

/// `https` with no TLS: nginx's `$https` is empty on a plain connection; the `ssl_` variables
/// are unset.
pub fn plain_var(name: &str) -> Option<Cow<'static, str>> {
    (name == "https").then_some(Cow::Borrowed(""))
}

impl ClientCert {
    fn parse(der: &[u8]) -> Option<ClientCert> {
        let (_, cert) = parse_x509_certificate(der).ok()?;
        let validity = cert.validity();
        let now = ASN1Time::now().timestamp();
        let mut serial = String::new();
        for b in cert.tbs_certificate.raw_serial() {
            let _ = write!(serial, "{b:02X}");
        }
        let digest = sha1::Sha1::digest(der);
        let mut fingerprint = String::with_capacity(40);
        for b in digest {
            let _ = write!(fingerprint, "{b:02x}");
        }
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).unwrap_or(""));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
        Some(ClientCert {
            subject: rfc2253(cert.subject()),
            issuer: rfc2253(cert.issuer()),
            serial,
            fingerprint,
            not_before: openssl_time(&validity.not_before),
            not_after: openssl_time(&validity.not_after),
            days_left: (validity.not_after.timestamp() - now) / 86_400,
            pem,
        })
    }
}

/// A name in RFC 2253 form, as nginx's `$ssl_client_s_dn`: the last RDN first, `,` between
/// them, `+` inside a multi-valued one, special characters escaped.
fn rfc2253(name: &X509Name<'_>) -> String {
    let registry = oid_registry();
    let mut out = String::new();
    let rdns: Vec<_> = name.iter_rdn().collect();
    for (i, rdn) in rdns.into_iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, attr) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            let oid = attr.attr_type();
            match oid2abbrev(oid, registry) {
                Ok(sn) => out.push_str(sn),
                Err(_) => out.push_str(&oid.to_id_string()),
            }
            out.push('=');
            match attr.as_str() {
                Ok(v) => escape_dn_value(v, &mut out),
                Err(_) => {
                    out.push('#');
                    for b in attr.as_slice() {
                        let _ = write!(out, "{b:02x}");
                    }
                }
            }
        }
    }
    out
}

fn escape_dn_value(v: &str, out: &mut String) {
    for (i, ch) in v.chars().enumerate() {
        let special = matches!(ch, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (ch == '#' || ch == ' '))
            || (i + 1 == v.chars().count() && ch == ' ');
        if special {
            out.push('\\');
        }
        out.push(ch);
    }
}

/// OpenSSL's `ASN1_TIME_print` form: `Dec  3 14:00:00 2026 GMT`.
fn openssl_time(t: &ASN1Time) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let d = t.to_datetime();
    format!(
        "{} {:>2} {:02}:{:02}:{:02} {} GMT",
        MONTHS[usize::from(u8::from(d.month())) - 1],
        d.day(),
        d.hour(),
        d.minute(),
        d.second(),
        d.year()
    )
}
