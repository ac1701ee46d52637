//! HTTP/1.1 wire code of our own: the chunked transfer coding, the proxy listener's server
//! connection and the upstream client connection the proxy drives inline from the request future.

pub mod chunked;
pub mod client;
pub mod server;
