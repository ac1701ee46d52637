//! Header rules of the proxy: hop-by-hop removal and the forwarding headers.

use std::net::IpAddr;

use bytes::Bytes;
use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus those hyper
/// sets itself from the body it sends.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::EXPECT,
];

/// Removes hop-by-hop headers, including any header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names notes which of them are present; most messages carry none (or
    // only `Connection`), so only those present are removed (a hashed lookup each).
    let mut present = 0u16;
    for k in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == k) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // HOP_BY_HOP[0] is `Connection`: the headers it names go too.
    if present & 1 != 0 {
        let mut values = headers.get_all(header::CONNECTION).iter();
        // Copies of the values (reference-counted), so the map can be changed while reading.
        let first = values.next().cloned();
        let rest: Vec<HeaderValue> = values.cloned().collect();
        for v in first.iter().chain(rest.iter()) {
            let Ok(v) = v.to_str() else { continue };
            for name in v.split(',').map(str::trim) {
                // The usual tokens (`keep-alive`, `close`) need no lookup of their own when
                // no such header is present: hop-by-hop names are removed below anyway.
                if name.is_empty()
                    || HOP_BY_HOP
                        .iter()
                        .any(|h| h.as_str().eq_ignore_ascii_case(name))
                {
                    continue;
                }
                // A `&str` key is looked up without building a HeaderName; an invalid name
                // matches nothing.
                headers.remove(name);
            }
        }
    }
    for (i, h) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(h);
        }
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// The forwarding header values that are the same for every request on a connection, made
/// once per connection.
pub struct ConnValues {
    /// The client address (`X-Real-IP`, and the tail of `X-Forwarded-For`).
    pub client_ip: HeaderValue,
    /// The port the client connected to (`X-Forwarded-Port`).
    pub local_port: HeaderValue,
}

impl ConnValues {
    pub fn new(remote: IpAddr, local_port: u16) -> Self {
        ConnValues {
            client_ip: ip_value(remote),
            local_port: HeaderValue::from(local_port),
        }
    }
}

/// The client address as a header value.
pub fn ip_value(ip: IpAddr) -> HeaderValue {
    // An address's text is ASCII digits, dots, colons and hex letters: always a valid value.
    HeaderValue::from_maybe_shared(Bytes::from(ip.to_string()))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Sets `X-Forwarded-For` (the client address appended to any list it sent, as nginx's
/// `$proxy_add_x_forwarded_for`), `X-Real-IP`, `X-Forwarded-Proto`, `X-Forwarded-Host` and
/// `X-Forwarded-Port`, from the connection's [`ConnValues`].
pub fn set_forwarded(
    headers: &mut HeaderMap,
    conn: &ConnValues,
    scheme: &str,
    host: Option<&HeaderValue>,
) {
    let client_ip = &conn.client_ip;
    // One lookup for the list: appended to in place, or inserted.
    match headers.entry(&X_FORWARDED_FOR) {
        Entry::Occupied(mut e) => {
            let joined = match e.get().to_str() {
                Ok(prev) if !prev.is_empty() => {
                    let mut v = Vec::with_capacity(prev.len() + 2 + client_ip.len());
                    v.extend_from_slice(prev.as_bytes());
                    v.extend_from_slice(b", ");
                    v.extend_from_slice(client_ip.as_bytes());
                    HeaderValue::from_maybe_shared(Bytes::from(v)).ok()
                }
                _ => Some(client_ip.clone()),
            };
            if let Some(v) = joined {
                e.insert(v);
            }
        }
        Entry::Vacant(e) => {
            // The usual case: no list yet, so the value is the address itself.
            e.insert(client_ip.clone());
        }
    }
    headers.insert(X_REAL_IP.clone(), client_ip.clone());
    let proto = match scheme {
        "http" => Some(HeaderValue::from_static("http")),
        "https" => Some(HeaderValue::from_static("https")),
        other => HeaderValue::from_str(other).ok(),
    };
    if let Some(v) = proto {
        headers.insert(X_FORWARDED_PROTO.clone(), v);
    }
    if let Some(h) = host {
        headers.insert(X_FORWARDED_HOST.clone(), h.clone());
    }
    headers.insert(X_FORWARDED_PORT.clone(), conn.local_port.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_named_and_standard() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn xff_appends() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        let conn = ConnValues::new([127, 0, 0, 1].into(), 9080);
        set_forwarded(&mut h, &conn, "http", None);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 127.0.0.1");
        assert_eq!(h["x-real-ip"], "127.0.0.1");
    }
}
