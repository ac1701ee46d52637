//! HTTP/1.1 wire code of our own: the chunked transfer coding, the proxy listener's server
//! connection and the upstream client connection the proxy drives inline from the request future.

pub mod chunked;
pub mod client;
pub mod io;
pub mod server;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use tokio::time::{Instant, Sleep};

/// A timer kept with a connection to bound its waits (a client's request head, an upstream's
/// answer) without a timer-wheel update per wait: it stays armed for some earlier wait's
/// deadline, never later than the current one, and is moved on only when it fires before the
/// current deadline.
pub type ConnTimer = Pin<Box<Sleep>>;

/// The connection's timer, armed no later than `deadline` (made on first use).
pub fn arm_timer(timer: &mut Option<ConnTimer>, deadline: Instant) -> &mut ConnTimer {
    let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
    if timer.deadline() > deadline {
        timer.as_mut().reset(deadline);
    }
    timer
}

/// Ready once `deadline` has passed. When the timer fires for an earlier wait's deadline, it is
/// moved on to this one.
pub fn poll_deadline(timer: &mut ConnTimer, deadline: Instant, cx: &mut Context<'_>) -> Poll<()> {
    loop {
        match timer.as_mut().poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(()) if Instant::now() >= deadline => return Poll::Ready(()),
            Poll::Ready(()) => timer.as_mut().reset(deadline),
        }
    }
}

/// Response header lines passed through as the upstream sent them (names lowercased), each
/// ending in CRLF, without those the server writes itself: the connection-management and
/// framing headers, `Server`, and (for the proxy) `TE` and `Trailer`. Parsing them into a
/// header map is skipped when nothing on the way (no plugin) looks at response headers.
#[derive(Debug, Clone, Default)]
pub struct RawHead {
    pub lines: Bytes,
    /// A `Date` line is among them.
    pub has_date: bool,
}

impl RawHead {
    /// Appends the lines to `map` as headers, for when something needs to see them after all.
    /// The lines were valid headers when received; one that is not (never expected) is left
    /// out.
    pub fn into_headers(self, map: &mut HeaderMap) {
        let lines = self.lines;
        let mut at = 0;
        while let Some(len) = lines[at..].windows(2).position(|w| w == b"\r\n") {
            let line = &lines[at..at + len];
            if let Some(colon) = line.iter().position(|&b| b == b':') {
                let start = at + colon + 1;
                let value = lines.slice(start..at + len);
                let value = value.slice(value.len() - value.trim_ascii_start().len()..);
                if let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(&line[..colon]),
                    HeaderValue::from_maybe_shared(value),
                ) {
                    map.append(name, value);
                }
            }
            at += len + 2;
        }
    }
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
