//! HTTP/2 on the proxy path, on the `h2` crate: the server side of a client connection
//! ([`server`], for h2c with prior knowledge on plain listeners and for ALPN `h2` over TLS) and
//! the upstream client for gRPC upstreams ([`client`]).
//!
//! Both hand the proxy the same types as HTTP/1.1 does: a request whose body is a
//! [`crate::body::ClientBody`], a response whose body may end in trailers. Everything runs on
//! the worker's current-thread runtime: a client connection is one task driving the `h2`
//! connection plus one task per stream.

pub mod client;
pub mod server;

mod body;

pub use body::RecvBody;

/// HTTP/2's connection preface (RFC 9113 §3.4), which a client with prior knowledge sends first.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
