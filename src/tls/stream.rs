//! A server-side TLS connection over a tokio `TcpStream`, driven with rustls's synchronous API.
//!
//! The HTTP/1.1 server does its I/O as non-blocking calls on a shared connection (`try_read`,
//! `try_write`, readiness), not through `AsyncRead`, so the TLS stream offers the same calls:
//! [`TlsStream::try_read`] decrypts what has arrived, [`TlsStream::try_write_vectored`]
//! encrypts into rustls's buffer (bounded, so a client that does not read pushes back) and
//! sends what the socket takes, and [`TlsStream::poll_flush`] waits until nothing is left
//! buffered. The same methods implement `AsyncRead`/`AsyncWrite` for the HTTP/2 server. The
//! connection sits in a `RefCell`: everything runs on the worker's thread and no borrow is
//! held across an await.

use std::cell::RefCell;
use std::io::{self, IoSlice, Read, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::{Accepted, Acceptor};
use rustls::{ServerConfig, ServerConnection};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// TLS bytes rustls may hold unsent before a write is refused with `WouldBlock`.
const SEND_BUFFER: usize = 64 * 1024;

/// The fatal `unrecognized_name` alert (RFC 6066 §3) as a plaintext record: what a client
/// gets when no certificate serves the name it asked for.
const UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];

/// Reads from a tokio socket without blocking (`WouldBlock` clears its readiness).
struct SyncRead<'a>(&'a TcpStream);

impl Read for SyncRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

/// Writes to a tokio socket without blocking.
struct SyncWrite<'a>(&'a TcpStream);

impl Write for SyncWrite<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Why a handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the client closed the connection during the handshake")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Tls(#[from] rustls::Error),
    /// No certificate serves the name: the client got `unrecognized_name`.
    #[error("no certificate for server name {0}")]
    UnknownName(String),
}

/// An established server-side TLS connection.
pub struct TlsStream {
    tcp: TcpStream,
    tls: RefCell<ServerConnection>,
}

/// Writes all of `data` (an alert) to `tcp`, waiting for room.
async fn send_all(tcp: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match tcp.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => tcp.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads the ClientHello from `tcp`. A malformed one is answered with rustls's alert.
pub async fn read_client_hello(tcp: &TcpStream) -> Result<Accepted, HandshakeError> {
    let mut acceptor = Acceptor::default();
    loop {
        match acceptor.read_tls(&mut SyncRead(tcp)) {
            Ok(0) => return Err(HandshakeError::Closed),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tcp.readable().await?;
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => return Ok(accepted),
            Ok(None) => {}
            Err((e, mut alert)) => {
                let mut buf = Vec::new();
                let _ = alert.write(&mut buf);
                let _ = send_all(tcp, &buf).await;
                return Err(e.into());
            }
        }
    }
}

/// Refuses the handshake with the `unrecognized_name` alert.
pub async fn refuse_unrecognized_name(tcp: &TcpStream) {
    let _ = send_all(tcp, &UNRECOGNIZED_NAME).await;
    let _ = socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Write);
}

impl TlsStream {
    /// Completes the handshake the ClientHello `accepted` began, with `config`.
    pub async fn handshake(
        tcp: TcpStream,
        accepted: Accepted,
        config: Arc<ServerConfig>,
    ) -> Result<TlsStream, HandshakeError> {
        let mut conn = match accepted.into_connection(config) {
            Ok(c) => c,
            Err((e, mut alert)) => {
                let mut buf = Vec::new();
                let _ = alert.write(&mut buf);
                let _ = send_all(&tcp, &buf).await;
                return Err(e.into());
            }
        };
        conn.set_buffer_limit(Some(SEND_BUFFER));
        loop {
            while conn.wants_write() {
                match conn.write_tls(&mut SyncWrite(&tcp)) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => tcp.writable().await?,
                    Err(e) => return Err(e.into()),
                }
            }
            if !conn.is_handshaking() {
                break;
            }
            match conn.read_tls(&mut SyncRead(&tcp)) {
                Ok(0) => return Err(HandshakeError::Closed),
                Ok(_) => {
                    if let Err(e) = conn.process_new_packets() {
                        // The alert rustls queued for the error.
                        while conn.wants_write() {
                            if conn.write_tls(&mut SyncWrite(&tcp)).is_err() {
                                break;
                            }
                        }
                        return Err(e.into());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => tcp.readable().await?,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(TlsStream {
            tcp,
            tls: RefCell::new(conn),
        })
    }

    /// The TCP socket under the TLS layer.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Whether the TLS layer has nothing of its own to do before the peer sends more: no
    /// decrypted bytes or end waiting to be read, nothing to send, no handshake under way.
    pub fn is_quiet(&self) -> bool {
        let tls = self.tls.borrow();
        tls.wants_read() && !tls.wants_write() && !tls.is_handshaking()
    }

    /// The socket and the TLS state, taken apart (to be put together again with
    /// [`TlsStream::from_parts`]).
    pub fn into_parts(self) -> (TcpStream, ServerConnection) {
        (self.tcp, self.tls.into_inner())
    }

    /// A stream from [`TlsStream::into_parts`]' pieces.
    pub fn from_parts(tcp: TcpStream, tls: ServerConnection) -> TlsStream {
        TlsStream {
            tcp,
            tls: RefCell::new(tls),
        }
    }

    /// Calls `f` with the rustls connection (for its negotiated parameters).
    pub fn with_conn<T>(&self, f: impl FnOnce(&ServerConnection) -> T) -> T {
        f(&self.tls.borrow())
    }

    /// Sends what rustls holds without waiting: `WouldBlock` when the socket is full.
    fn send_pending(&self, tls: &mut ServerConnection) -> io::Result<()> {
        while tls.wants_write() {
            match tls.write_tls(&mut SyncWrite(&self.tcp)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads decrypted bytes into `buf`: `Ok(0)` at the end of the stream (close_notify or
    /// the TCP end), `WouldBlock` when nothing has arrived.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut tls = self.tls.borrow_mut();
        loop {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The TCP end without close_notify: an end all the same for HTTP's framing.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if tls.read_tls(&mut SyncRead(&self.tcp))? == 0 {
                return Ok(0);
            }
            let processed = tls.process_new_packets();
            // Alerts and key-update answers go out with what is pending.
            match self.send_pending(&mut tls) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if let Err(e) = processed {
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }

    /// Whether a read may make progress without waiting for the socket (decrypted bytes or
    /// the end are already there).
    fn has_buffered_input(&self) -> bool {
        !self.tls.borrow().wants_read()
    }

    /// Ready when [`TlsStream::try_read`] may return something.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.has_buffered_input() {
            return Poll::Ready(Ok(()));
        }
        self.tcp.poll_read_ready(cx)
    }

    /// Encrypts as much of `bufs` as the send buffer takes and sends what the socket takes;
    /// `WouldBlock` when the send buffer is full and the socket takes nothing.
    pub fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut tls = self.tls.borrow_mut();
        match self.send_pending(&mut tls) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        let n = tls.writer().write_vectored(bufs)?;
        if n == 0 && bufs.iter().any(|b| !b.is_empty()) {
            // The buffer is full and the socket said WouldBlock above (its readiness is
            // cleared, so waiting for it is sound).
            return Err(io::ErrorKind::WouldBlock.into());
        }
        match self.send_pending(&mut tls) {
            Ok(()) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
            Err(e) => Err(e),
        }
    }

    /// Ready when the socket may take more.
    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tcp.poll_write_ready(cx)
    }

    /// Sends everything rustls holds.
    pub fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let sent = {
                let mut tls = self.tls.borrow_mut();
                self.send_pending(&mut tls)
            };
            match sent {
                Ok(()) => return Poll::Ready(Ok(())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.tcp.poll_write_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Sends close_notify (best effort, without waiting) and shuts the TCP write side.
    pub fn shutdown_write(&self) {
        let mut tls = self.tls.borrow_mut();
        tls.send_close_notify();
        let _ = self.send_pending(&mut tls);
        let _ = socket2::SockRef::from(&self.tcp).shutdown(std::net::Shutdown::Write);
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            match self.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.poll_read_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.try_write_vectored(bufs) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.poll_write_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TlsStream::poll_flush(&self, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tls.borrow_mut().send_close_notify();
        ready!(TlsStream::poll_flush(&self, cx))?;
        let _ = socket2::SockRef::from(&self.tcp).shutdown(std::net::Shutdown::Write);
        Poll::Ready(Ok(()))
    }
}
