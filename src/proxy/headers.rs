//! Header rules of the proxy: hop-by-hop headers left out and the forwarding headers.

use std::net::IpAddr;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::http1::client::{put_header, HeadEdit};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus those hyper
/// sets itself from the body it sends. A static: a `const` array of `HeaderName`s would be made
/// and dropped again at every use.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::EXPECT,
];

/// Which of the standard hop-by-hop headers a request's map holds, so they are left out when
/// the request is written (the map itself is not changed: plugins still read them, and the
/// gateway writes its own connection management).
///
/// The other headers a client's `Connection` names are hop-by-hop too, but they are removed
/// from the request as it arrives ([`remove_connection_named`]), not when it is written: a
/// header a plugin sets later under such a name (`X-Consumer-Username`, an injected
/// `Authorization`) must reach the upstream, or a client could strip it by naming it.
#[derive(Default)]
pub struct HopByHop {
    /// Which [`HOP_BY_HOP`] headers are present (bit i: `HOP_BY_HOP[i]`).
    present: u16,
}

impl HopByHop {
    /// Looks through the map's names (one pass).
    pub fn of(headers: &HeaderMap) -> Self {
        let mut hop = HopByHop::default();
        for k in headers.keys() {
            hop.note(k);
        }
        hop
    }

    /// Notes one of the map's names.
    fn note(&mut self, name: &HeaderName) {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            self.present |= 1 << i;
        }
    }

    /// Whether the header `name` is left out.
    pub fn skip(&self, name: &HeaderName) -> bool {
        if self.present == 0 {
            return false;
        }
        HOP_BY_HOP
            .iter()
            .position(|h| h == name)
            .is_some_and(|i| self.present & (1 << i) != 0)
    }
}

/// Removes from a request as it arrived the headers its `Connection` header names (RFC 9110
/// §7.6.1: they describe the client's connection, not the message), before any plugin runs.
/// `Connection` itself and the standard hop-by-hop headers stay in the map for plugins to read
/// and are left out when the request is written ([`HopByHop`]).
pub fn remove_connection_named(headers: &mut HeaderMap) {
    // The usual request has no `Connection`, or one naming only `close` / `keep-alive`.
    let mut named: Vec<HeaderName> = Vec::new();
    for v in headers.get_all(header::CONNECTION) {
        let Ok(v) = v.to_str() else { continue };
        for token in v.split(',').map(str::trim) {
            if token.is_empty()
                || token.eq_ignore_ascii_case("close")
                || HOP_BY_HOP
                    .iter()
                    .any(|h| h.as_str().eq_ignore_ascii_case(token))
            {
                continue;
            }
            // `Host` is what the request is for; it is never a hop-by-hop header.
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                if name != header::HOST {
                    named.push(name);
                }
            }
        }
    }
    for name in named {
        headers.remove(name);
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The forwarding header values that are the same for every request on a connection, made
/// once per connection.
pub struct ConnValues {
    /// The client address (`X-Real-IP`, and the tail of `X-Forwarded-For`).
    pub client_ip: HeaderValue,
    /// The port the client connected to (`X-Forwarded-Port`).
    pub local_port: HeaderValue,
    /// The scheme the client spoke (`X-Forwarded-Proto`).
    pub scheme: &'static str,
    /// The forwarding lines that are the same for every request on the connection, ready to
    /// write: `x-forwarded-for` (for a client that sent no list), `x-real-ip`,
    /// `x-forwarded-proto`, `x-forwarded-port`.
    lines: Bytes,
    /// Length of the `x-forwarded-for` line at the front of `lines`.
    xff_line: usize,
    /// The connection's TLS parameters (`ctx.var.ssl_*`), on a TLS listener.
    pub tls: Option<std::rc::Rc<crate::tls::TlsInfo>>,
}

impl ConnValues {
    pub fn new(remote: IpAddr, local_port: u16, scheme: &'static str) -> Self {
        let client_ip = ip_value(remote);
        let local_port = HeaderValue::from(local_port);
        let mut lines = BytesMut::new();
        put_header(&mut lines, b"x-forwarded-for", client_ip.as_bytes());
        let xff_line = lines.len();
        put_header(&mut lines, b"x-real-ip", client_ip.as_bytes());
        put_header(&mut lines, b"x-forwarded-proto", scheme.as_bytes());
        put_header(&mut lines, b"x-forwarded-port", local_port.as_bytes());
        ConnValues {
            client_ip,
            local_port,
            scheme,
            lines: lines.freeze(),
            xff_line,
            tls: None,
        }
    }

    /// The same, for a connection with TLS parameters `info`.
    pub fn with_tls(mut self, info: std::rc::Rc<crate::tls::TlsInfo>) -> Self {
        self.tls = Some(info);
        self
    }
}

/// The client address as a header value.
pub fn ip_value(ip: IpAddr) -> HeaderValue {
    // An address's text is ASCII digits, dots, colons and hex letters: always a valid value.
    HeaderValue::from_maybe_shared(Bytes::from(ip.to_string()))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The upstream request's header changes, applied while its head is written (the client's
/// header map is sent without a copy): `Host` first (or none), then the client's headers without
/// the hop-by-hop ones (and those `Connection` names) and without those replaced here, then
/// `X-Forwarded-For` (the client address appended to any list it sent, as nginx's
/// `$proxy_add_x_forwarded_for`), `X-Real-IP`, `X-Forwarded-Proto`, `X-Forwarded-Host` (when
/// the client sent a Host; the client's own never passes) and `X-Forwarded-Port`, from the connection's [`ConnValues`].
pub struct Forwarding<'a> {
    headers: &'a HeaderMap,
    conn: &'a ConnValues,
    proto: &'a str,
    host: Option<HeaderValue>,
    client_host: Option<&'a [u8]>,
    hop: HopByHop,
    /// The client sent an `X-Forwarded-For` list.
    xff: bool,
    /// The protocol a tunnelled upgrade asks for: `Upgrade` and `Connection: upgrade` are
    /// written (the client's own are hop-by-hop and left out like the rest).
    upgrade: Option<&'a HeaderValue>,
    /// The client address a plugin set for the request (real-ip), instead of the connection's.
    client_ip: Option<HeaderValue>,
}

impl<'a> Forwarding<'a> {
    /// `host`: the `Host` the upstream gets (None: no Host line); `client_host`: the
    /// request's normalised host (`X-Forwarded-Host`; None: no such line).
    pub fn new(
        headers: &'a HeaderMap,
        conn: &'a ConnValues,
        scheme: &'a str,
        host: Option<HeaderValue>,
        client_host: Option<&'a [u8]>,
    ) -> Self {
        let mut hop = HopByHop::default();
        let mut xff = false;
        for k in headers.keys() {
            hop.note(k);
            xff |= k.as_str() == "x-forwarded-for";
        }
        // A scheme is a token ("http", "https" in practice): never a line break.
        let proto = if scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        {
            scheme
        } else {
            ""
        };
        Forwarding {
            headers,
            conn,
            proto,
            host,
            client_host,
            hop,
            xff,
            upgrade: None,
            client_ip: None,
        }
    }

    /// The client address the request goes with when a plugin replaced the connection's
    /// (None: the connection's).
    pub fn with_client(mut self, ip: Option<IpAddr>) -> Self {
        self.client_ip = ip.map(ip_value);
        self
    }

    /// Asks the upstream to switch to `protocol` (a WebSocket upgrade on a route that allows
    /// it; None: no upgrade, as for every other request).
    pub fn with_upgrade(mut self, protocol: Option<&'a HeaderValue>) -> Self {
        self.upgrade = protocol;
        self
    }
}

impl HeadEdit for Forwarding<'_> {
    fn extra_len(&self) -> usize {
        let xff: usize = if self.xff {
            self.headers
                .get_all(&X_FORWARDED_FOR)
                .iter()
                .map(|v| v.len() + 2)
                .sum()
        } else {
            0
        };
        64 + xff
            + self.upgrade.map_or(0, |u| u.len() + 32)
            + self.conn.lines.len()
            + self.client_ip.as_ref().map_or(0, |ip| 2 * ip.len() + 40)
            + self.proto.len()
            + self.host.as_ref().map_or(0, |h| h.len())
            + self.client_host.map_or(0, |h| h.len())
    }

    fn write_first(&self, dst: &mut BytesMut) {
        if let Some(h) = &self.host {
            put_header(dst, b"host", h.as_bytes());
        }
    }

    fn skip(&self, name: &HeaderName) -> bool {
        if name == header::HOST {
            return true;
        }
        let s = name.as_str();
        if s.starts_with("x-") {
            match s {
                "x-forwarded-for" | "x-real-ip" | "x-forwarded-proto" | "x-forwarded-host"
                | "x-forwarded-port" => return true,
                _ => {}
            }
        }
        self.hop.skip(name)
    }

    fn write_last(&self, dst: &mut BytesMut) {
        let conn = self.conn;
        let ip = self
            .client_ip
            .as_ref()
            .unwrap_or(&conn.client_ip)
            .as_bytes();
        // The connection's lines serve as they are unless the client sent a list, or the
        // scheme or the client address is not the connection's.
        let mut fixed = &conn.lines[..];
        if self.xff {
            dst.put_slice(b"x-forwarded-for: ");
            for v in self.headers.get_all(&X_FORWARDED_FOR) {
                if !v.is_empty() {
                    dst.put_slice(v.as_bytes());
                    dst.put_slice(b", ");
                }
            }
            dst.put_slice(ip);
            dst.put_slice(b"\r\n");
            fixed = &fixed[conn.xff_line..];
        }
        if self.proto == conn.scheme && self.client_ip.is_none() {
            dst.put_slice(fixed);
        } else {
            if !self.xff {
                put_header(dst, b"x-forwarded-for", ip);
            }
            put_header(dst, b"x-real-ip", ip);
            if !self.proto.is_empty() {
                put_header(dst, b"x-forwarded-proto", self.proto.as_bytes());
            }
            put_header(dst, b"x-forwarded-port", conn.local_port.as_bytes());
        }
        if let Some(h) = self.client_host {
            put_header(dst, b"x-forwarded-host", h);
        }
        if let Some(protocol) = self.upgrade {
            put_header(dst, b"upgrade", protocol.as_bytes());
            put_header(dst, b"connection", b"upgrade");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map with `Connection` naming `X-Secret`, `X-Secret`, `Keep-Alive`, the hop-by-hop
    /// header `other` and `X-Kept: 1`.
    fn hop_map(other: HeaderName, value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(other, HeaderValue::from_static(value));
        h.insert("x-kept", HeaderValue::from_static("1"));
        h
    }

    #[test]
    fn hop_by_hop_skips_standard_only() {
        let mut h = hop_map(header::EXPECT, "100-continue");
        let hop = HopByHop::of(&h);
        let kept: Vec<&str> = h
            .keys()
            .filter(|k| !hop.skip(k))
            .map(|k| k.as_str())
            .collect();
        // A name `Connection` lists is removed on arrival, not skipped when written.
        assert_eq!(kept, ["x-secret", "x-kept"]);
        h.remove(header::CONNECTION);
        let hop = HopByHop::of(&h);
        assert!(hop.skip(&HeaderName::from_static("keep-alive")));
        assert!(!hop.skip(&header::TE));
    }

    #[test]
    fn connection_named_removed_on_arrival() {
        let mut h = hop_map(header::TE, "trailers");
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("close, Host, X-Other"),
        );
        h.insert(header::HOST, HeaderValue::from_static("a.test"));
        h.insert("x-other", HeaderValue::from_static("1"));
        remove_connection_named(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["connection", "host", "keep-alive", "te", "x-kept"]);
        // What a plugin sets afterwards under a named header stays.
        h.insert("x-secret", HeaderValue::from_static("plugin"));
        let hop = HopByHop::of(&h);
        assert!(!hop.skip(&HeaderName::from_static("x-secret")));
    }

    /// The head lines a [`Forwarding`] makes of `h`.
    fn forwarded(h: &HeaderMap, host: Option<&str>) -> String {
        forwarded_as(h, host, "http")
    }

    /// The same for a request whose scheme is `scheme` on an `http` connection.
    fn forwarded_as(h: &HeaderMap, host: Option<&str>, scheme: &'static str) -> String {
        let conn = ConnValues::new([127, 0, 0, 1].into(), 9080, "http");
        let client_host = h.get(header::HOST).map(HeaderValue::as_bytes);
        let f = Forwarding::new(
            h,
            &conn,
            scheme,
            host.map(|v| HeaderValue::from_str(v).unwrap()),
            client_host,
        );
        let mut out = BytesMut::new();
        f.write_first(&mut out);
        for (k, v) in h {
            if !f.skip(k) {
                put_header(&mut out, k.as_str().as_bytes(), v.as_bytes());
            }
        }
        f.write_last(&mut out);
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn forwarding_replaces_and_appends() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("client.test"));
        h.append("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        h.append("x-forwarded-for", HeaderValue::from_static("2.2.2.2"));
        h.insert("x-real-ip", HeaderValue::from_static("6.6.6.6"));
        h.insert("x-forwarded-port", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        assert_eq!(
            forwarded(&h, Some("up.test")),
            "host: up.test\r\nx-kept: 1\r\n\
             x-forwarded-for: 1.1.1.1, 2.2.2.2, 127.0.0.1\r\nx-real-ip: 127.0.0.1\r\n\
             x-forwarded-proto: http\r\nx-forwarded-port: 9080\r\n\
             x-forwarded-host: client.test\r\n"
        );
        // Another scheme than the connection's: the lines are made for the request.
        assert_eq!(
            forwarded_as(&h, Some("up.test"), "https"),
            "host: up.test\r\nx-kept: 1\r\n\
             x-forwarded-for: 1.1.1.1, 2.2.2.2, 127.0.0.1\r\nx-real-ip: 127.0.0.1\r\n\
             x-forwarded-proto: https\r\nx-forwarded-port: 9080\r\n\
             x-forwarded-host: client.test\r\n"
        );
        h.remove("x-forwarded-for");
        assert_eq!(
            forwarded_as(&h, None, "https"),
            "x-kept: 1\r\nx-forwarded-for: 127.0.0.1\r\nx-real-ip: 127.0.0.1\r\n\
             x-forwarded-proto: https\r\nx-forwarded-port: 9080\r\n\
             x-forwarded-host: client.test\r\n"
        );
    }

    #[test]
    fn forwarding_never_passes_clients_forwarded_host() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-host", HeaderValue::from_static("orig.test"));
        assert_eq!(
            forwarded(&h, None),
            "x-forwarded-for: 127.0.0.1\r\n\
             x-real-ip: 127.0.0.1\r\nx-forwarded-proto: http\r\nx-forwarded-port: 9080\r\n"
        );
    }

    #[test]
    fn forwarding_drops_hop_by_hop_and_connection_named() {
        let mut h = hop_map(header::TE, "trailers");
        remove_connection_named(&mut h);
        let out = forwarded(&h, None);
        assert!(out.starts_with("x-kept: 1\r\nx-forwarded-for: "), "{out}");
    }
}
