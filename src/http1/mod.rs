//! HTTP/1.1 wire code of our own: the chunked transfer coding, the proxy listener's server
//! connection and the upstream client connection the proxy drives inline from the request future.

pub mod chunked;
pub mod client;
pub mod server;

use bytes::Bytes;

/// Response header lines passed through as the upstream sent them (names lowercased), each
/// ending in CRLF, without those the server writes itself: the connection-management and
/// framing headers, `TE`, `Trailer` and `Server`. Parsing them into a header map is skipped
/// when nothing on the way (no plugin) looks at response headers.
#[derive(Debug, Clone, Default)]
pub struct RawHead {
    pub lines: Bytes,
    /// A `Date` line is among them.
    pub has_date: bool,
}

/// `n` in decimal ASCII, written into `buf` without `format!`; returns the digits.
pub(crate) fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}
