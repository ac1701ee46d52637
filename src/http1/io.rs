//! The client connection under the HTTP/1.1 server: a plain TCP socket or a TLS stream, with
//! the non-blocking calls the server makes (one match per call; the plain path is the tokio
//! socket's own calls).

use std::io::{self, IoSlice};
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::tls::TlsStream;

/// A client connection's transport.
pub enum ConnIo {
    Tcp(TcpStream),
    Tls(Box<TlsStream>),
}

impl From<TcpStream> for ConnIo {
    fn from(s: TcpStream) -> Self {
        ConnIo::Tcp(s)
    }
}

impl From<TlsStream> for ConnIo {
    fn from(s: TlsStream) -> Self {
        ConnIo::Tls(Box::new(s))
    }
}

impl ConnIo {
    /// The TCP socket (for socket options).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            ConnIo::Tcp(s) => s,
            ConnIo::Tls(t) => t.tcp(),
        }
    }

    /// Reads what is available into `buf`'s spare room; `WouldBlock` when nothing is.
    pub fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            ConnIo::Tcp(s) => s.try_read_buf(buf),
            ConnIo::Tls(t) => {
                if buf.capacity() == buf.len() {
                    buf.reserve(4096);
                }
                let len = buf.len();
                // Decrypted bytes are copied out of rustls: into initialised room.
                buf.resize(buf.capacity(), 0);
                let r = t.try_read(&mut buf[len..]);
                buf.truncate(len + *r.as_ref().unwrap_or(&0));
                r
            }
        }
    }

    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ConnIo::Tcp(s) => s.try_read(buf),
            ConnIo::Tls(t) => t.try_read(buf),
        }
    }

    /// Drops the socket's read readiness after a short read (see `Conn::read_into`); TLS
    /// keeps it (rustls may hold decrypted bytes the socket no longer signals).
    pub fn drop_read_readiness(&self) {
        if let ConnIo::Tcp(s) = self {
            let _ = s.try_io(Interest::READABLE, || {
                Err::<(), _>(io::ErrorKind::WouldBlock.into())
            });
        }
    }

    /// Whether `drop_read_readiness` does anything.
    pub fn is_plain(&self) -> bool {
        matches!(self, ConnIo::Tcp(_))
    }

    /// Whether the transport holds nothing of its own (see [`TlsStream::is_quiet`]): then the
    /// socket waiting to turn readable is all there is to wait for.
    pub fn is_quiet(&self) -> bool {
        match self {
            ConnIo::Tcp(_) => true,
            ConnIo::Tls(t) => t.is_quiet(),
        }
    }

    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            ConnIo::Tcp(s) => s.poll_read_ready(cx),
            ConnIo::Tls(t) => t.poll_read_ready(cx),
        }
    }

    pub async fn readable(&self) -> io::Result<()> {
        match self {
            ConnIo::Tcp(s) => s.readable().await,
            ConnIo::Tls(t) => std::future::poll_fn(|cx| t.poll_read_ready(cx)).await,
        }
    }

    pub fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            ConnIo::Tcp(s) => s.try_write_vectored(bufs),
            ConnIo::Tls(t) => t.try_write_vectored(bufs),
        }
    }

    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ConnIo::Tcp(s) => s.try_write(buf),
            ConnIo::Tls(t) => t.try_write_vectored(&[IoSlice::new(buf)]),
        }
    }

    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            ConnIo::Tcp(s) => s.poll_write_ready(cx),
            ConnIo::Tls(t) => t.poll_write_ready(cx),
        }
    }

    pub async fn writable(&self) -> io::Result<()> {
        match self {
            ConnIo::Tcp(s) => s.writable().await,
            ConnIo::Tls(t) => std::future::poll_fn(|cx| t.poll_write_ready(cx)).await,
        }
    }

    /// Sends what the transport holds back (TLS records rustls buffered); plain TCP holds
    /// nothing.
    pub fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            ConnIo::Tcp(_) => Poll::Ready(Ok(())),
            ConnIo::Tls(t) => t.poll_flush(cx),
        }
    }

    pub async fn flush(&self) -> io::Result<()> {
        match self {
            ConnIo::Tcp(_) => Ok(()),
            ConnIo::Tls(t) => std::future::poll_fn(|cx| t.poll_flush(cx)).await,
        }
    }

    /// Stops sending (TLS: close_notify first).
    pub fn shutdown_write(&self) {
        match self {
            ConnIo::Tcp(s) => {
                let _ = socket2::SockRef::from(s).shutdown(std::net::Shutdown::Write);
            }
            ConnIo::Tls(t) => t.shutdown_write(),
        }
    }
}
