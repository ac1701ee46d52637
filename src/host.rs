//! The request host: one validated, normalised value for routing, `$host`, `ctx.var.host`,
//! `pass_host: pass` and `X-Forwarded-Host`.
//!
//! A client can spell one host many ways (`Internal.Example`, `internal.example.`,
//! `internal.example.:80`); if routing saw one spelling and the upstream another, a route
//! restricted to a host could be bypassed through a catch-all route while the upstream still
//! served that host. So the host is normalised once, as the request head is read, and every
//! consumer reads the normalised value:
//!
//! - lower-cased, one trailing dot removed (nginx's `ngx_http_validate_host`);
//! - the port split off: digits only (at most 65535), after exactly one colon; an IPv6 literal
//!   in brackets (`[::1]:8080`);
//! - refused (400, connection closed): an empty host, `..`, and any byte a DNS name or an IP
//!   literal cannot hold (space, `/`, `,`, `@`, control bytes, non-ASCII, ...). nginx accepts
//!   more bytes than this; see `docs/compatibility.md`.
//!
//! For an absolute-form request target (`GET http://public.example/x`), the target's authority
//! replaces the Host header for everything, including what goes upstream (RFC 9112 §3.2.2).

use std::fmt;
use std::net::Ipv6Addr;

use http::header::{self, HeaderValue};
use http::{HeaderMap, Uri};

/// Why a request's host was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("empty host")]
    Empty,
    #[error("invalid character in host")]
    InvalidChar,
    #[error("empty label in host")]
    EmptyLabel,
    #[error("invalid IPv6 literal in host")]
    InvalidIpv6,
    #[error("invalid port in host")]
    InvalidPort,
    #[error("user information in the request target's authority")]
    UserInfo,
    #[error("a route host is matched without a port")]
    RoutePort,
}

/// A validated host and optional port, both borrowed from what the client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authority<'a> {
    /// The host, without the trailing dot; an IPv6 literal keeps its brackets. Not yet
    /// lower-cased (see [`Authority::is_normal`]).
    host: &'a str,
    /// The port digits, when a non-empty port was given.
    port: Option<&'a str>,
    /// Whether the text differs from its normal form (upper-case letters, a trailing dot, an
    /// empty port).
    changed: bool,
}

impl<'a> Authority<'a> {
    /// Validates `raw` (a Host header value or a target's authority, `host[:port]`).
    pub fn parse(raw: &'a [u8]) -> Result<Authority<'a>, HostError> {
        // Every byte accepted below is ASCII, so the cuts fall on character boundaries.
        let text = std::str::from_utf8(raw).map_err(|_| HostError::InvalidChar)?;
        if text.is_empty() {
            return Err(HostError::Empty);
        }
        let (host, rest) = if text.starts_with('[') {
            let end = text.find(']').ok_or(HostError::InvalidIpv6)?;
            let inner = &text[1..end];
            // A zone id (`%25eth0`) has no meaning in a Host header.
            if inner.parse::<Ipv6Addr>().is_err() {
                return Err(HostError::InvalidIpv6);
            }
            (&text[..=end], &text[end + 1..])
        } else {
            match text.find(':') {
                Some(i) => (&text[..i], &text[i..]),
                None => (text, ""),
            }
        };
        let mut changed = false;
        let port = match rest.strip_prefix(':') {
            None if rest.is_empty() => None,
            None => return Err(HostError::InvalidChar),
            // `host:` is an empty port (RFC 3986 §3.2.3): the same as none.
            Some("") => {
                changed = true;
                None
            }
            Some(p) => {
                let ok = p.len() <= 5
                    && p.bytes().all(|b| b.is_ascii_digit())
                    && p.parse::<u32>().is_ok_and(|n| n <= 65535);
                if !ok {
                    return Err(HostError::InvalidPort);
                }
                Some(p)
            }
        };
        let host = if host.starts_with('[') {
            changed |= host.bytes().any(|b| b.is_ascii_uppercase());
            host
        } else {
            let host = match host.strip_suffix('.') {
                Some(h) => {
                    changed = true;
                    h
                }
                None => host,
            };
            check_name(host)?;
            changed |= host.bytes().any(|b| b.is_ascii_uppercase());
            host
        };
        Ok(Authority {
            host,
            port,
            changed,
        })
    }

    /// Whether the text parsed is already in normal form (the usual case: nothing to copy).
    pub fn is_normal(&self) -> bool {
        !self.changed
    }

    /// The host in normal form (lower-case, no trailing dot, no port): nginx's `$host`.
    pub fn host(&self) -> String {
        self.host.to_ascii_lowercase()
    }

    /// The port digits, if any.
    pub fn port(&self) -> Option<&'a str> {
        self.port
    }
}

impl fmt::Display for Authority<'_> {
    /// `host[:port]` in normal form: what the Host header becomes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.host.chars() {
            fmt::Write::write_char(f, c.to_ascii_lowercase())?;
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

/// A DNS name or IPv4 address: labels of letters, digits, `-` and `_`, separated by single
/// dots. `_` is not in DNS host names but is common in internal names (and nginx takes it).
fn check_name(host: &str) -> Result<(), HostError> {
    if host.is_empty() {
        return Err(HostError::Empty);
    }
    let mut prev_dot = true;
    for b in host.bytes() {
        match b {
            b'.' if prev_dot => return Err(HostError::EmptyLabel),
            b'.' => prev_dot = true,
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' => prev_dot = false,
            _ => return Err(HostError::InvalidChar),
        }
    }
    if prev_dot {
        return Err(HostError::EmptyLabel);
    }
    Ok(())
}

/// Validates and normalises a parsed request's host in place: an absolute-form (or
/// authority-form) target's authority replaces the Host header; a Host header in other than
/// normal form is rewritten. A request with neither (HTTP/1.0 without Host) is left alone.
///
/// Every front end (HTTP/1.1 here, HTTP/2's `:authority`) calls this before the handler sees
/// the request, so the handler, plugins and the upstream see one host.
pub fn normalize_request(uri: &Uri, headers: &mut HeaderMap) -> Result<(), HostError> {
    if let Some(auth) = uri.authority() {
        let text = auth.as_str();
        if text.contains('@') {
            return Err(HostError::UserInfo);
        }
        let a = Authority::parse(text.as_bytes())?;
        let value = HeaderValue::try_from(a.to_string()).map_err(|_| HostError::InvalidChar)?;
        headers.insert(header::HOST, value);
        return Ok(());
    }
    let Some(value) = headers.get(header::HOST) else {
        return Ok(());
    };
    let a = Authority::parse(value.as_bytes())?;
    if !a.is_normal() {
        let normal = HeaderValue::try_from(a.to_string()).map_err(|_| HostError::InvalidChar)?;
        headers.insert(header::HOST, normal);
    }
    Ok(())
}

/// A route's (or service's) `hosts` entry in the form request hosts take, so it matches every
/// spelling a client may use: lower-cased, one trailing dot removed. A leading `*` (a wildcard:
/// `*.example.com`, `*example.com`, `*` alone) is kept. An entry no request host can equal is
/// refused: one with a port (routes match the host without it, as APISIX's `$host`), or
/// anything [`Authority::parse`] refuses.
pub fn normalize_route_host(raw: &str) -> Result<String, HostError> {
    let (wildcard, rest) = match raw.strip_prefix('*') {
        Some("") => return Ok("*".into()),
        Some(rest) => ("*", rest),
        None => ("", raw),
    };
    // `*.example.com`: the dot belongs to the pattern, the rest must be a host.
    let (dot, name) = match rest.strip_prefix('.') {
        Some(name) if !wildcard.is_empty() => (".", name),
        _ => ("", rest),
    };
    let a = Authority::parse(name.as_bytes())?;
    if a.port().is_some() || name.ends_with(':') {
        return Err(HostError::RoutePort);
    }
    Ok(format!("{wildcard}{dot}{}", a.host()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> Result<String, HostError> {
        Authority::parse(s.as_bytes()).map(|a| a.to_string())
    }

    #[test]
    fn normal_forms() {
        assert_eq!(norm("internal.example").unwrap(), "internal.example");
        assert_eq!(norm("Internal.Example").unwrap(), "internal.example");
        assert_eq!(norm("internal.example.").unwrap(), "internal.example");
        assert_eq!(norm("internal.example.:80").unwrap(), "internal.example:80");
        assert_eq!(norm("internal.example:").unwrap(), "internal.example");
        assert_eq!(norm("127.0.0.1:9080").unwrap(), "127.0.0.1:9080");
        assert_eq!(norm("[::1]:8080").unwrap(), "[::1]:8080");
        assert_eq!(norm("[FE80::1]").unwrap(), "[fe80::1]");
        assert_eq!(norm("my_host").unwrap(), "my_host");
        assert!(Authority::parse(b"a.example:80").unwrap().is_normal());
        assert!(!Authority::parse(b"a.example.").unwrap().is_normal());
        let a = Authority::parse(b"A.Example.:8080").unwrap();
        assert_eq!((a.host().as_str(), a.port()), ("a.example", Some("8080")));
    }

    #[test]
    fn refused() {
        use HostError::*;
        for (raw, why) in [
            ("", Empty),
            (".", Empty),
            (":80", Empty),
            ("internal.example:80:80", InvalidPort),
            ("internal.example:8o", InvalidPort),
            ("internal.example:65536", InvalidPort),
            ("internal.example:000080", InvalidPort),
            ("internal..example", EmptyLabel),
            (".internal.example", EmptyLabel),
            ("internal.example..", EmptyLabel),
            ("a b", InvalidChar),
            ("a/b", InvalidChar),
            ("a,b", InvalidChar),
            ("user@a", InvalidChar),
            ("a\u{1}b", InvalidChar),
            ("a\\b", InvalidChar),
            ("ex\u{e4}mple", InvalidChar),
            ("[::1", InvalidIpv6),
            ("[::g]", InvalidIpv6),
            ("[::1]x", InvalidChar),
            ("[::1]:x", InvalidPort),
            ("::1", InvalidPort),
        ] {
            assert_eq!(norm(raw), Err(why), "{raw:?}");
        }
    }

    #[test]
    fn route_hosts() {
        for (raw, normal) in [
            ("internal.example", "internal.example"),
            ("Internal.Example.", "internal.example"),
            ("*.Wild.Example.", "*.wild.example"),
            ("*wild.example", "*wild.example"),
            ("*", "*"),
            ("[::1]", "[::1]"),
            ("127.0.0.1", "127.0.0.1"),
        ] {
            assert_eq!(normalize_route_host(raw).as_deref(), Ok(normal), "{raw:?}");
        }
        for (raw, why) in [
            ("a.example:8080", HostError::RoutePort),
            ("a.example:", HostError::RoutePort),
            ("a b", HostError::InvalidChar),
            ("a\r\nb", HostError::InvalidChar),
            ("", HostError::Empty),
            ("*.", HostError::Empty),
            ("**.a", HostError::InvalidChar),
            ("a.*.b", HostError::InvalidChar),
            ("a..b", HostError::EmptyLabel),
        ] {
            assert_eq!(normalize_route_host(raw), Err(why), "{raw:?}");
        }
    }

    #[test]
    fn absolute_form_replaces_host() {
        let uri: Uri = "http://Public.Example./x".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("internal.example"));
        normalize_request(&uri, &mut h).unwrap();
        assert_eq!(h[header::HOST], "public.example");
        let uri: Uri = "http://u@public.example/x".parse().unwrap();
        assert_eq!(normalize_request(&uri, &mut h), Err(HostError::UserInfo));
    }

    #[test]
    fn host_header_rewritten_only_when_needed() {
        let uri: Uri = "/x".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            header::HOST,
            HeaderValue::from_static("INTERNAL.example.:80"),
        );
        normalize_request(&uri, &mut h).unwrap();
        assert_eq!(h[header::HOST], "internal.example:80");
        let mut empty = HeaderMap::new();
        assert_eq!(normalize_request(&uri, &mut empty), Ok(()));
        assert!(empty.is_empty());
    }
}
