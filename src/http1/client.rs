//! An HTTP/1.1 client connection driven inline by the request's own future: no connection task,
//! no channel between the request and the connection. [`Connection::send_request`] writes the
//! request and reads the response head; the response body ([`ResponseBody`]) owns the
//! connection and hands it to a [`Recycle`] (the worker's pool) once the body has been read to
//! its end on a connection that may be reused.
//!
//! Framing follows RFC 9112 section 6: no body for HEAD, 1xx, 204 and 304; chunked when
//! `Transfer-Encoding` ends in `chunked` (and then `Content-Length` is ignored and the
//! connection not reused); else `Content-Length`; else the body runs to the connection's close.

use std::future::Future;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::chunked::{self, ChunkedDecoder, ChunkedError, Decoded};

/// The largest response head accepted (status line and headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// Headers parsed without a heap allocation; more fall back to a heap array.
const STACK_HEADERS: usize = 32;
/// Upper bound of headers in one head (`MAX_HEAD` could not hold many more real ones).
const MAX_HEADERS: usize = 4096;
/// Bytes made free in the read buffer before each read.
const READ_RESERVE: usize = 16 * 1024;
/// The buffer a response head is first read into (one page, nginx's `proxy_buffer_size`
/// default): taken when the response is awaited, grown by [`READ_RESERVE`] for a longer head
/// or for the body.
const HEAD_FIRST: usize = 4 * 1024;
/// Body data up to this size is copied next to the head (or chunk framing) so one write
/// carries both; larger data is written from its own buffer.
const COALESCE: usize = 16 * 1024;
/// A write buffer grown past this by a large body is not kept while the connection idles.
const KEEP_WRITE_BUF: usize = 16 * 1024;
/// The room a request head is first written into.
const WRITE_FIRST: usize = 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request/response exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing the request failed (reset, broken pipe).
    #[error("failed to send the request: {0}")]
    Write(io::Error),
    /// The request body failed while it was being sent.
    #[error("failed to read the request body: {0}")]
    RequestBody(BoxError),
    /// The request body did not match the length announced for it.
    #[error("request body length differs from its Content-Length")]
    RequestBodyLength,
    /// The connection failed or was closed before any byte of a response arrived.
    #[error("upstream closed the connection before responding: {0}")]
    NoResponse(io::Error),
    /// Reading the response failed after part of it arrived.
    #[error("failed to read the response: {0}")]
    Read(io::Error),
    #[error("invalid response head: {0}")]
    InvalidHead(&'static str),
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("upstream closed the connection inside the response")]
    UnexpectedEof,
    #[error("invalid chunked response body: {0}")]
    Chunked(#[from] ChunkedError),
}

impl Error {
    /// The upstream may not have seen the request at all (nothing of a response arrived): a
    /// request whose body can be sent again may be retried on a fresh connection. This is the
    /// race of a keep-alive connection closed by the upstream just as it was reused.
    pub fn before_response(&self) -> bool {
        matches!(self, Error::Write(_) | Error::NoResponse(_))
    }
}

/// Takes a connection whose response was read to its end and may carry another request.
pub trait Recycle<S> {
    fn recycle(self, conn: Connection<S>);
}

/// The request line and headers to send. `Content-Length` and `Transfer-Encoding` in `headers`
/// are ignored: the client frames the body itself.
pub struct RequestHead<'a> {
    pub method: &'a Method,
    /// Origin form: path and query.
    pub target: &'a str,
    pub headers: &'a HeaderMap,
    /// Changes to `headers` applied while the head is written, so the map is sent as it is
    /// without being copied and changed first ([`NoEdit`]: none).
    pub edit: &'a dyn HeadEdit,
    /// How the response's header lines are handed over.
    pub lines: ResponseLines,
}

/// How a response's header lines are handed over: parsed into [`ResponseHead::headers`], or kept
/// as received in [`ResponseHead::raw`] (never for HEAD: its `Content-Length` is a header to
/// pass, not framing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseLines {
    Parsed,
    /// Kept, without `TE` and `Trailer` (the proxy's way, as nginx's).
    Raw,
    /// Kept, `TE` and `Trailer` included (openfunction's way, as APISIX's).
    RawWithTe,
}

/// Changes to a request's headers made on the way out: some lines first, some of the map's
/// headers left out, some lines last.
pub trait HeadEdit {
    /// At most how many bytes `write_first` and `write_last` add (a reservation hint).
    fn extra_len(&self) -> usize {
        0
    }
    /// Lines written before the map's headers.
    fn write_first(&self, _dst: &mut BytesMut) {}
    /// Whether a header of the map is left out.
    fn skip(&self, _name: &HeaderName) -> bool {
        false
    }
    /// Lines written after the map's headers.
    fn write_last(&self, _dst: &mut BytesMut) {}
}

/// Sends the headers as they are.
pub struct NoEdit;

impl HeadEdit for NoEdit {}

/// Writes one `name: value` header line.
pub fn put_header(dst: &mut BytesMut, name: &[u8], value: &[u8]) {
    dst.put_slice(name);
    dst.put_slice(b": ");
    dst.put_slice(value);
    dst.put_slice(b"\r\n");
}

/// One HTTP/1.1 connection to an upstream.
pub struct Connection<S> {
    io: S,
    read_buf: BytesMut,
    write_buf: BytesMut,
}

/// The response head and how its body is framed.
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    /// Without the connection-management headers (`Connection` and those it names,
    /// `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`, `Upgrade`): they described the
    /// connection to the upstream.
    pub headers: HeaderMap,
    /// `headers` has `TE` or `Trailer` (hop-by-hop as well; a proxy drops them).
    pub te_or_trailer: bool,
    /// The header lines as received, when the request asked to keep them (`headers` is empty
    /// then).
    pub raw: Option<super::RawHead>,
    framing: Framing,
    keep_alive: bool,
}

#[derive(Debug)]
enum Framing {
    Empty,
    Length(u64),
    Chunked(ChunkedDecoder),
    Close,
}

/// How the request body is framed on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RequestFraming {
    None,
    Length(u64),
    Chunked,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub fn new(io: S) -> Self {
        Connection {
            io,
            read_buf: BytesMut::new(),
            write_buf: BytesMut::new(),
        }
    }

    pub fn io(&self) -> &S {
        &self.io
    }

    pub fn io_mut(&mut self) -> &mut S {
        &mut self.io
    }

    /// The stream and what was read from it past the last response head: after a `101`,
    /// the first bytes of the protocol switched to.
    pub fn into_parts(self) -> (S, Bytes) {
        (self.io, self.read_buf.freeze())
    }

    /// Sends one request and reads the head of its final response (interim 1xx responses are
    /// skipped). The body is written in the same write as the head when it is ready at once
    /// and small (a body already in memory); other bodies stream, framed by `Content-Length`
    /// when their exact size is known and chunked otherwise.
    pub async fn send_request<B>(
        &mut self,
        head: &RequestHead<'_>,
        body: B,
    ) -> Result<ResponseHead, Error>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let head_request = head.method == Method::HEAD;
        let lines = if head_request {
            ResponseLines::Parsed
        } else {
            head.lines
        };
        if let Err(e) = self.write_request(head, body).await {
            // An upstream may answer before it has read the whole body (a 413, a 401) and
            // close: that answer is what the client should get, not a send error.
            if matches!(e, Error::Write(_)) {
                if let Ok(mut early) = self.read_response_head(head_request, lines).await {
                    early.keep_alive = false;
                    return Ok(early);
                }
            }
            return Err(e);
        }
        self.read_response_head(head_request, lines).await
    }

    async fn write_request<B>(&mut self, head: &RequestHead<'_>, body: B) -> Result<(), Error>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let framing = match body.size_hint().exact() {
            Some(0) if body.is_end_stream() => {
                if matches!(*head.method, Method::POST | Method::PUT | Method::PATCH) {
                    RequestFraming::Length(0)
                } else {
                    RequestFraming::None
                }
            }
            Some(n) => RequestFraming::Length(n),
            None => RequestFraming::Chunked,
        };
        if self.write_buf.capacity() > KEEP_WRITE_BUF {
            self.write_buf = BytesMut::new();
        }
        self.write_buf.clear();
        // Room for a usual head at once, not grown line by line (an idle connection gave its
        // buffer back).
        self.write_buf.reserve(WRITE_FIRST);
        encode_head(head, framing, &mut self.write_buf);
        if framing == RequestFraming::None {
            return self.flush_write_buf().await;
        }

        let mut body = pin!(body);
        let mut sent: u64 = 0;
        loop {
            // Take what the body has ready; before waiting for more, send what is buffered.
            let next = std::future::poll_fn(|cx| match body.as_mut().poll_frame(cx) {
                Poll::Ready(frame) => Poll::Ready(Some(frame)),
                Poll::Pending if !self.write_buf.is_empty() => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            })
            .await;
            let frame = match next {
                None => {
                    self.write_all_buffered().await?;
                    continue;
                }
                Some(None) => break,
                Some(Some(Err(e))) => return Err(Error::RequestBody(e.into())),
                Some(Some(Ok(frame))) => frame,
            };
            // Trailers are not forwarded.
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if data.is_empty() {
                continue;
            }
            sent += data.len() as u64;
            if let RequestFraming::Length(n) = framing {
                if sent > n {
                    return Err(Error::RequestBodyLength);
                }
            }
            if framing == RequestFraming::Chunked {
                chunked::encode_chunk_head(data.len(), &mut self.write_buf);
            }
            if data.len() <= COALESCE {
                self.write_buf.extend_from_slice(&data);
            } else {
                write_two(&mut self.io, &self.write_buf, &data)
                    .await
                    .map_err(Error::Write)?;
                self.write_buf.clear();
            }
            if framing == RequestFraming::Chunked {
                self.write_buf.extend_from_slice(chunked::CHUNK_TAIL);
            }
            if self.write_buf.len() >= COALESCE {
                self.write_all_buffered().await?;
            }
        }
        match framing {
            RequestFraming::Chunked => chunked::encode_last_chunk(&mut self.write_buf),
            RequestFraming::Length(n) if sent != n => return Err(Error::RequestBodyLength),
            _ => {}
        }
        self.flush_write_buf().await
    }

    async fn write_all_buffered(&mut self) -> Result<(), Error> {
        self.io
            .write_all(&self.write_buf)
            .await
            .map_err(Error::Write)?;
        self.write_buf.clear();
        Ok(())
    }

    /// Writes what is buffered and flushes the stream (TLS keeps records until flushed).
    async fn flush_write_buf(&mut self) -> Result<(), Error> {
        if !self.write_buf.is_empty() {
            self.write_all_buffered().await?;
        }
        self.io.flush().await.map_err(Error::Write)
    }

    async fn read_response_head(
        &mut self,
        head_request: bool,
        lines: ResponseLines,
    ) -> Result<ResponseHead, Error> {
        let mut received = !self.read_buf.is_empty();
        loop {
            if !self.read_buf.is_empty() {
                if let Some(head) = parse_head(&mut self.read_buf, head_request, lines)? {
                    return Ok(head);
                }
                if self.read_buf.len() > MAX_HEAD {
                    return Err(Error::HeadTooLarge);
                }
            }
            let want = if self.read_buf.capacity() == 0 {
                HEAD_FIRST
            } else {
                READ_RESERVE
            };
            self.read_buf.reserve(want);
            match self.io.read_buf(&mut self.read_buf).await {
                Ok(0) if received => return Err(Error::UnexpectedEof),
                Ok(0) => {
                    return Err(Error::NoResponse(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed",
                    )))
                }
                Ok(_) => received = true,
                Err(e) if received => return Err(Error::Read(e)),
                Err(e) => return Err(Error::NoResponse(e)),
            }
        }
    }

    /// Reads into the read buffer; `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.read_buf.reserve(READ_RESERVE);
        // `read_buf`'s future holds nothing but the two borrows: polling a fresh one each time
        // loses no state.
        pin!(self.io.read_buf(&mut self.read_buf)).poll(cx)
    }

    /// Gives the buffers back while the connection idles (a kept-alive connection in a pool),
    /// as nginx frees a request's buffers: the next exchange takes new ones. A buffer still
    /// holding bytes is kept.
    pub fn release_buffers(&mut self) {
        if self.read_buf.is_empty() {
            self.read_buf = BytesMut::new();
        }
        if self.write_buf.is_empty() {
            self.write_buf = BytesMut::new();
        }
    }

    /// Whether an idle connection can still carry a request: nothing arrived on it (no close,
    /// no stray bytes). Never waits.
    pub fn idle_alive(&mut self) -> bool {
        if !self.read_buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut buf)
            .is_pending()
    }
}

/// Writes `a` then `b`, in one vectored write when the stream takes it.
async fn write_two<S: AsyncWrite + Unpin>(io: &mut S, mut a: &[u8], b: &[u8]) -> io::Result<()> {
    let mut b = b;
    while !a.is_empty() {
        let n = io
            .write_vectored(&[IoSlice::new(a), IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if n >= a.len() {
            b = &b[n - a.len()..];
            a = &[];
        } else {
            a = &a[n..];
        }
    }
    io.write_all(b).await
}

/// Writes the request line and headers. Sized up front so the buffer grows at most once.
fn encode_head(head: &RequestHead<'_>, framing: RequestFraming, dst: &mut BytesMut) {
    let mut len = head.method.as_str().len() + head.target.len() + 64 + head.edit.extra_len();
    for (name, value) in head.headers {
        len += name.as_str().len() + value.len() + 4;
    }
    dst.reserve(len);
    dst.put_slice(head.method.as_str().as_bytes());
    dst.put_u8(b' ');
    dst.put_slice(head.target.as_bytes());
    dst.put_slice(b" HTTP/1.1\r\n");
    head.edit.write_first(dst);
    for (name, value) in head.headers {
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || head.edit.skip(name)
        {
            continue;
        }
        put_header(dst, name.as_str().as_bytes(), value.as_bytes());
    }
    head.edit.write_last(dst);
    match framing {
        RequestFraming::None => {}
        RequestFraming::Length(n) => {
            dst.put_slice(b"content-length: ");
            put_decimal(n, dst);
            dst.put_slice(b"\r\n");
        }
        RequestFraming::Chunked => dst.put_slice(b"transfer-encoding: chunked\r\n"),
    }
    dst.put_slice(b"\r\n");
}

fn put_decimal(n: u64, dst: &mut BytesMut) {
    dst.put_slice(super::decimal(n, &mut [0u8; 20]));
}

/// Offsets of one header's name and value in the head buffer.
#[derive(Clone, Copy, Default)]
struct HeaderIndex {
    name: (usize, usize),
    value: (usize, usize),
}

impl HeaderIndex {
    fn name_in<'a>(&self, head: &'a [u8]) -> &'a [u8] {
        &head[self.name.0..self.name.0 + self.name.1]
    }

    fn value_in<'a>(&self, head: &'a [u8]) -> &'a [u8] {
        &head[self.value.0..self.value.0 + self.value.1]
    }
}

/// Whether the header name `name` (a token, as httparse accepts it) is `lower` (lowercase
/// letters and `-`), ignoring ASCII case. Setting bit 0x20 lowercases a letter and leaves `-`
/// as it is; no other token byte becomes a lowercase letter or `-` that way, so the comparison
/// is exact, eight bytes at a time.
fn is_name(name: &[u8], lower: &[u8]) -> bool {
    if name.len() != lower.len() {
        return false;
    }
    let mut a = name.chunks_exact(8);
    let mut b = lower.chunks_exact(8);
    for (x, y) in a.by_ref().zip(b.by_ref()) {
        let x = u64::from_ne_bytes(x.try_into().expect("8 bytes"));
        let y = u64::from_ne_bytes(y.try_into().expect("8 bytes"));
        if x | 0x2020_2020_2020_2020 != y {
            return false;
        }
    }
    a.remainder()
        .iter()
        .zip(b.remainder())
        .all(|(x, y)| x | 0x20 == *y)
}

/// The header lines to pass on as they are (see [`super::RawHead`]): all but the
/// connection-management ones (and those `Connection` names), the framing ones (a 304 keeps its
/// `Content-Length`, as the parsed path does), `Server`, and unless `keep_te`, `TE` and
/// `Trailer`.
fn raw_lines(
    head: &Bytes,
    index: &[HeaderIndex],
    seen: &FramingHeaders,
    status: StatusCode,
    keep_te: bool,
) -> super::RawHead {
    let mut lines = BytesMut::with_capacity(head.len());
    let mut has_date = false;
    for i in index {
        let name = i.name_in(head);
        let skip = is_connection_header(name)
            || match name.len() {
                2 => !keep_te && is_name(name, b"te"),
                4 => {
                    has_date |= is_name(name, b"date");
                    false
                }
                6 => is_name(name, b"server"),
                7 => !keep_te && is_name(name, b"trailer"),
                14 => is_name(name, b"content-length") && status != StatusCode::NOT_MODIFIED,
                _ => false,
            };
        if skip
            || seen
                .named
                .iter()
                .any(|n| n.as_bytes().eq_ignore_ascii_case(name))
        {
            continue;
        }
        let start = lines.len();
        lines.put_slice(name);
        lines[start..].make_ascii_lowercase();
        lines.put_slice(b": ");
        lines.put_slice(i.value_in(head));
        lines.put_slice(b"\r\n");
    }
    super::RawHead {
        lines: lines.freeze(),
        has_date,
    }
}

/// Parses a response head at the front of `buf`. `Ok(None)`: incomplete. An interim (1xx)
/// response other than 101 is consumed and parsing goes on with what follows it.
fn parse_head(
    buf: &mut BytesMut,
    head_request: bool,
    lines: ResponseLines,
) -> Result<Option<ResponseHead>, Error> {
    loop {
        // Uninitialised header slots: httparse writes only the ones it fills.
        let mut stack = [MaybeUninit::<httparse::Header<'_>>::uninit(); STACK_HEADERS];
        let mut heap;
        let config = httparse::ParserConfig::default();
        let mut res = httparse::Response::new(&mut []);
        let mut parsed = config.parse_response_with_uninit_headers(&mut res, buf, &mut stack);
        if matches!(parsed, Err(httparse::Error::TooManyHeaders)) {
            heap = vec![MaybeUninit::uninit(); MAX_HEADERS];
            res = httparse::Response::new(&mut []);
            parsed = config.parse_response_with_uninit_headers(&mut res, buf, &mut heap);
        }
        let len = match parsed {
            Ok(httparse::Status::Complete(n)) if n > MAX_HEAD => return Err(Error::HeadTooLarge),
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(Error::InvalidHead(parse_error_text(e))),
        };
        let status = StatusCode::from_u16(res.code.unwrap_or(0))
            .map_err(|_| Error::InvalidHead("invalid status code"))?;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            buf.advance(len);
            continue;
        }
        let version = if res.version == Some(1) {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        // Record where each header sits, then split the head off: header values become
        // slices of it, without a copy each.
        let count = res.headers.len();
        let mut indices = [HeaderIndex::default(); STACK_HEADERS];
        let mut heap_indices;
        let index: &mut [HeaderIndex] = if count <= STACK_HEADERS {
            &mut indices[..count]
        } else {
            heap_indices = vec![HeaderIndex::default(); count];
            &mut heap_indices[..]
        };
        let base = buf.as_ptr() as usize;
        for (h, i) in res.headers.iter().zip(index.iter_mut()) {
            i.name = (h.name.as_ptr() as usize - base, h.name.len());
            i.value = (h.value.as_ptr() as usize - base, h.value.len());
        }
        let head = buf.split_to(len).freeze();
        // The framing headers are noted first (a name comparison each, no lookups after).
        let mut seen = FramingHeaders::default();
        for i in index.iter() {
            seen.note(i.name_in(&head), i.value_in(&head), version)?;
        }
        let mut te_or_trailer = false;
        let mut raw = None;
        let mut headers;
        if lines != ResponseLines::Parsed {
            headers = HeaderMap::new();
            let keep_te = lines == ResponseLines::RawWithTe;
            raw = Some(raw_lines(&head, index, &seen, status, keep_te));
        } else {
            // One slot more: the gateway adds `Server` to the response, which would otherwise
            // grow a map made exactly full.
            headers = HeaderMap::with_capacity(count + 1);
            for i in index.iter() {
                // Connection-level headers are the client's business, not the message's.
                if is_connection_header(i.name_in(&head)) {
                    continue;
                }
                let name = HeaderName::from_bytes(i.name_in(&head))
                    .map_err(|_| Error::InvalidHead("invalid header name"))?;
                // SAFETY (an API contract, not memory safety): httparse accepted this value,
                // and the bytes it accepts in a value (HTAB, SP..=0x7E, 0x80..=0xFF; obs-fold
                // refused by the default config) are exactly those `HeaderValue` allows, so the
                // check `from_maybe_shared` would repeat cannot fail. Debug builds still repeat
                // it.
                let value = unsafe {
                    HeaderValue::from_maybe_shared_unchecked(
                        head.slice(i.value.0..i.value.0 + i.value.1),
                    )
                };
                te_or_trailer |= name == header::TE || name == header::TRAILER;
                headers.append(name, value);
            }
            for name in &seen.named {
                headers.remove(name.as_str());
            }
        }
        let (framing, keep_alive) = framing(status, version, &seen, &mut headers, head_request);
        return Ok(Some(ResponseHead {
            status,
            version,
            headers,
            framing,
            keep_alive,
            te_or_trailer,
            raw,
        }));
    }
}

fn parse_error_text(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::Status => "invalid status line",
        httparse::Error::Version => "invalid HTTP version",
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::TooManyHeaders => "too many headers",
        _ => "malformed",
    }
}

/// What the headers say about framing and keep-alive, noted while they are parsed.
#[derive(Default)]
struct FramingHeaders {
    /// `Connection: close` (or, for HTTP/1.0, the absence of `keep-alive`) seen.
    close: bool,
    keep_alive_token: bool,
    /// Some: `Transfer-Encoding` present; true when its last coding is `chunked`.
    chunked_last: Option<bool>,
    length: Option<u64>,
    /// Other headers `Connection` names (hop-by-hop too; rare).
    named: Vec<String>,
}

/// The connection-management headers the client consumes (`Connection` and what it names,
/// `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`, `Upgrade`): left out of a parsed
/// response. `TE` and `Trailer`, hop-by-hop too, stay; [`ResponseHead::te_or_trailer`] tells.
/// Both the parsed and the kept-as-lines response use it.
fn is_connection_header(name: &[u8]) -> bool {
    match name.len() {
        7 => is_name(name, b"upgrade"),
        10 => is_name(name, b"connection") || is_name(name, b"keep-alive"),
        16 => is_name(name, b"proxy-connection"),
        17 => is_name(name, b"transfer-encoding"),
        _ => false,
    }
}

impl FramingHeaders {
    fn note(&mut self, name: &[u8], value: &[u8], version: Version) -> Result<(), Error> {
        if is_name(name, b"content-length") {
            for part in value.split(|&b| b == b',') {
                let part = part.trim_ascii();
                if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                    return Err(Error::InvalidHead("invalid Content-Length"));
                }
                let n = part.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
                if self.length.is_some_and(|l| l != n) {
                    return Err(Error::InvalidHead("conflicting Content-Length values"));
                }
                self.length = Some(n);
            }
        } else if is_name(name, b"transfer-encoding") {
            let last = value.rsplit(|&b| b == b',').next().unwrap_or(b"");
            self.chunked_last = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if is_name(name, b"connection") {
            for token in value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    self.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    self.keep_alive_token |= version == Version::HTTP_10;
                } else if !token.is_empty() {
                    if let Ok(t) = std::str::from_utf8(token) {
                        self.named.push(t.to_ascii_lowercase());
                    }
                }
            }
        }
        Ok(())
    }
}

/// The response body's framing and whether the connection may carry another request.
fn framing(
    status: StatusCode,
    version: Version,
    seen: &FramingHeaders,
    headers: &mut HeaderMap,
    head_request: bool,
) -> (Framing, bool) {
    let mut keep_alive = !seen.close && (version == Version::HTTP_11 || seen.keep_alive_token);
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return (Framing::Empty, false);
    }
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return (Framing::Empty, keep_alive);
    }
    if let Some(chunked_last) = seen.chunked_last {
        // A Content-Length next to Transfer-Encoding is void (and must not reach the client).
        // Its presence is what a smuggling attempt sends: the connection is not reused.
        if seen.length.is_some() {
            headers.remove(header::CONTENT_LENGTH);
            keep_alive = false;
        }
        if !chunked_last {
            // Not chunked last: the body ends with the connection.
            return (Framing::Close, false);
        }
        return (Framing::Chunked(ChunkedDecoder::new()), keep_alive);
    }
    match seen.length {
        Some(0) => (Framing::Empty, keep_alive),
        Some(n) => (Framing::Length(n), keep_alive),
        None => (Framing::Close, false),
    }
}

/// A response body read from the connection it owns. Read to its end on a reusable
/// connection, it hands the connection to its [`Recycle`] within `poll_frame`; dropped early,
/// it closes the connection.
pub struct ResponseBody<S, R: Recycle<S>> {
    conn: Option<Connection<S>>,
    framing: Framing,
    keep_alive: bool,
    recycle: Option<R>,
}

impl<S: AsyncRead + AsyncWrite + Unpin, R: Recycle<S>> ResponseBody<S, R> {
    /// A body with nothing in it and no connection (a `101`'s, whose connection was taken
    /// for what follows it).
    pub fn none() -> Self {
        ResponseBody {
            conn: None,
            framing: Framing::Empty,
            keep_alive: false,
            recycle: None,
        }
    }

    /// The body of the response `head` read on `conn`. `recycle` (None: the connection is not
    /// to be reused) gets the connection back when the body has been read. A body without
    /// bytes returns the connection at once.
    pub fn new(conn: Connection<S>, head: &mut ResponseHead, recycle: Option<R>) -> Self {
        let framing = std::mem::replace(&mut head.framing, Framing::Empty);
        let mut body = ResponseBody {
            conn: Some(conn),
            framing,
            keep_alive: head.keep_alive,
            recycle,
        };
        if matches!(body.framing, Framing::Empty) {
            body.finish();
        }
        body
    }

    /// The body is read: the connection goes back to the pool or is closed.
    fn finish(&mut self) {
        self.framing = Framing::Empty;
        let Some(conn) = self.conn.take() else { return };
        if self.keep_alive && conn.read_buf.is_empty() {
            if let Some(r) = self.recycle.take() {
                r.recycle(conn);
            }
        }
    }

    fn fail(&mut self, e: Error) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.conn = None;
        self.framing = Framing::Empty;
        Poll::Ready(Some(Err(e)))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin, R: Recycle<S> + Unpin> Body for ResponseBody<S, R> {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.framing {
                Framing::Empty => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(left) => {
                    if !conn.read_buf.is_empty() {
                        let take = usize::try_from(*left)
                            .map_or(conn.read_buf.len(), |l| l.min(conn.read_buf.len()));
                        *left -= take as u64;
                        let data = conn.read_buf.split_to(take).freeze();
                        if *left == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Framing::Chunked(decoder) => match decoder.decode(&mut conn.read_buf) {
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Decoded::End) => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::NeedMore) => {}
                    Err(e) => return this.fail(e.into()),
                },
                Framing::Close => {
                    if !conn.read_buf.is_empty() {
                        let data = conn.read_buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
            }
            match conn.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    if matches!(this.framing, Framing::Close) {
                        this.conn = None;
                        this.framing = Framing::Empty;
                        return Poll::Ready(None);
                    }
                    return this.fail(Error::UnexpectedEof);
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return this.fail(Error::Read(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || matches!(self.framing, Framing::Empty)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8], head_request: bool) -> Result<Option<ResponseHead>, Error> {
        let mut buf = BytesMut::from(bytes);
        parse_head(&mut buf, head_request, ResponseLines::Parsed)
    }

    /// The lines a head keeps when they pass unparsed.
    fn raw(bytes: &[u8]) -> (String, bool, ResponseHead) {
        let mut buf = BytesMut::from(bytes);
        let h = parse_head(&mut buf, false, ResponseLines::Raw)
            .unwrap()
            .unwrap();
        assert!(h.headers.is_empty());
        let r = h.raw.clone().unwrap();
        (String::from_utf8(r.lines.to_vec()).unwrap(), r.has_date, h)
    }

    #[test]
    fn header_names_compare_ignoring_case() {
        for (name, lower, same) in [
            (&b"Content-Length"[..], &b"content-length"[..], true),
            (b"CONTENT-LENGTH", b"content-length", true),
            (b"content-lengtH", b"content-length", true),
            (b"content_length", b"content-length", false),
            (b"content-lengt", b"content-length", false),
            (b"Transfer-Encoding", b"transfer-encoding", true),
            (b"Transfer-Encodinf", b"transfer-encoding", false),
            (b"TE", b"te", true),
            (b"T~", b"te", false),
            (b"Date", b"date", true),
        ] {
            assert_eq!(is_name(name, lower), same, "{name:?}");
        }
    }

    #[test]
    fn raw_lines_leave_out_what_the_server_writes() {
        let (lines, has_date, h) = raw(b"HTTP/1.1 200 OK\r\nServer: up\r\nDate: Mon, 30 Nov 2026 06:00:00 GMT\r\n\
              Content-Type: text/plain\r\nContent-Length: 5\r\nConnection: keep-alive, X-Conn\r\n\
              X-Conn: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: x\r\nUpgrade: h2c\r\n\
              Proxy-Connection: x\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nX-Mixed-CASE:  v  \r\n\r\nhello");
        assert_eq!(
            lines,
            "date: Mon, 30 Nov 2026 06:00:00 GMT\r\ncontent-type: text/plain\r\n\
             set-cookie: a=1\r\nset-cookie: b=2\r\nx-mixed-case: v\r\n"
        );
        assert!(has_date);
        assert!(matches!(h.framing, Framing::Length(5)));
        assert!(h.keep_alive);
    }

    #[test]
    fn raw_lines_keep_te_and_trailer_when_asked_and_turn_back_into_the_parsed_headers() {
        let bytes = b"HTTP/1.1 200 OK\r\nServer: up\r\nDate: Mon, 30 Nov 2026 06:00:00 GMT\r\n\
              Content-Length: 5\r\nConnection: keep-alive, X-Conn\r\nX-Conn: 1\r\nTE: trailers\r\n\
              Trailer: x\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nX-Value:  a: b  \r\n\r\nhello";
        let mut buf = BytesMut::from(&bytes[..]);
        let h = parse_head(&mut buf, false, ResponseLines::RawWithTe)
            .unwrap()
            .unwrap();
        let raw = h.raw.unwrap();
        assert_eq!(
            raw.lines,
            "date: Mon, 30 Nov 2026 06:00:00 GMT\r\nte: trailers\r\ntrailer: x\r\n\
             set-cookie: a=1\r\nset-cookie: b=2\r\nx-value: a: b\r\n"
        );
        // Back into a map: what the parsed path has, but for the lines the server writes itself.
        let mut from_raw = HeaderMap::new();
        raw.into_headers(&mut from_raw);
        let mut parsed = parse(bytes, false).unwrap().unwrap().headers;
        parsed.remove(header::SERVER);
        parsed.remove(header::CONTENT_LENGTH);
        assert_eq!(from_raw, parsed);
    }

    #[test]
    fn raw_lines_keep_a_304s_length_and_note_no_date() {
        let (lines, has_date, h) =
            raw(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 12\r\nETag: \"x\"\r\n\r\n");
        assert_eq!(lines, "content-length: 12\r\netag: \"x\"\r\n");
        assert!(!has_date);
        assert!(matches!(h.framing, Framing::Empty));
    }

    #[test]
    fn raw_lines_frame_as_parsed_heads_do() {
        let (lines, _, h) = raw(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\nX-A: 1\r\n\r\n",
        );
        assert_eq!(lines, "x-a: 1\r\n");
        assert!(matches!(h.framing, Framing::Chunked(_)));
        // A Content-Length next to Transfer-Encoding: the connection is not reused.
        assert!(!h.keep_alive);
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
        );
        assert!(matches!(
            parse_head(&mut buf, false, ResponseLines::Raw),
            Err(Error::InvalidHead("conflicting Content-Length values"))
        ));
    }

    #[test]
    fn encodes_request_heads() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("example.com"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        let head = RequestHead {
            method: &Method::POST,
            target: "/p?q=1",
            headers: &headers,
            edit: &NoEdit,
            lines: ResponseLines::Parsed,
        };
        let mut out = BytesMut::new();
        encode_head(&head, RequestFraming::Length(12345), &mut out);
        assert_eq!(
            &out[..],
            b"POST /p?q=1 HTTP/1.1\r\nhost: example.com\r\nx-a: 1\r\nx-a: 2\r\ncontent-length: 12345\r\n\r\n"
        );
        out.clear();
        encode_head(&head, RequestFraming::Chunked, &mut out);
        assert!(out.ends_with(b"x-a: 2\r\ntransfer-encoding: chunked\r\n\r\n"));
    }

    #[test]
    fn parses_heads_and_framing() {
        let h = parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.status, 200);
        assert_eq!(h.headers["x-a"], "b");
        assert!(matches!(h.framing, Framing::Length(5)));
        assert!(h.keep_alive);

        let h = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(matches!(h.framing, Framing::Chunked(_)));
        assert!(h.keep_alive);

        // Both framings: chunked wins, the connection is not reused.
        let h = parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(matches!(h.framing, Framing::Chunked(_)));
        assert!(!h.keep_alive);
        assert!(!h.headers.contains_key(header::CONTENT_LENGTH));

        let h = parse(b"HTTP/1.1 200 OK\r\n\r\n", false).unwrap().unwrap();
        assert!(matches!(h.framing, Framing::Close));
        assert!(!h.keep_alive);

        let h = parse(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(!h.keep_alive);

        let h = parse(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let h = parse(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(h.keep_alive);

        for head in [
            &b"HTTP/1.1 204 No Content\r\n\r\n"[..],
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
        ] {
            let h = parse(head, false).unwrap().unwrap();
            assert!(matches!(h.framing, Framing::Empty));
            assert!(h.keep_alive);
        }
        let h = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert!(matches!(h.framing, Framing::Empty));
        assert_eq!(h.headers[header::CONTENT_LENGTH], "10");
    }

    #[test]
    fn skips_interim_responses() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"[..],
        );
        let h = parse_head(&mut buf, false, ResponseLines::Parsed)
            .unwrap()
            .unwrap();
        assert_eq!(h.status, 201);
        assert!(buf.is_empty());
        // An interim response alone leaves the parser waiting for the final one.
        let mut buf = BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 2"[..]);
        assert!(parse_head(&mut buf, false, ResponseLines::Parsed)
            .unwrap()
            .is_none());
        assert_eq!(&buf[..], b"HTTP/1.1 2");
    }

    #[test]
    fn refuses_bad_heads() {
        assert!(parse(b"HTTP/1.1 2x0 OK\r\n\r\n", false).is_err());
        assert!(parse(b"HTTX/1.1 200 OK\r\n\r\n", false).is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", false).is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n", false).is_err());
        assert!(parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            false
        )
        .is_err());
        assert!(parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            false
        )
        .is_err());
        // Repeated equal lengths are one length.
        let h = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert!(matches!(h.framing, Framing::Length(2)));
    }

    #[test]
    fn many_headers_fall_back_to_the_heap() {
        let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..300 {
            head.extend_from_slice(format!("x-h{i}: v{i}\r\n").as_bytes());
        }
        head.extend_from_slice(b"content-length: 0\r\n\r\n");
        let h = parse(&head, false).unwrap().unwrap();
        assert_eq!(h.headers.len(), 301);
        assert_eq!(h.headers["x-h299"], "v299");
        // The same head kept as lines.
        let (lines, _, h) = raw(&head);
        assert_eq!(lines.lines().count(), 300);
        assert!(lines.ends_with("x-h299: v299\r\n"));
        assert!(matches!(h.framing, Framing::Empty));
    }

    struct Pool(std::rc::Rc<std::cell::RefCell<Vec<Connection<tokio::io::DuplexStream>>>>);

    impl Recycle<tokio::io::DuplexStream> for Pool {
        fn recycle(self, conn: Connection<tokio::io::DuplexStream>) {
            self.0.borrow_mut().push(conn);
        }
    }

    async fn exchange(
        response: &'static [u8],
        method: Method,
    ) -> (Vec<u8>, Result<Vec<u8>, Error>, usize) {
        use http_body_util::BodyExt;
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let mut conn = Connection::new(client);
        let headers = HeaderMap::new();
        let head = RequestHead {
            method: &method,
            target: "/x",
            headers: &headers,
            edit: &NoEdit,
            lines: ResponseLines::Parsed,
        };
        let server_task = tokio::spawn(async move {
            let mut seen = vec![0u8; 4096];
            let n = server.read(&mut seen).await.unwrap();
            seen.truncate(n);
            for piece in response.chunks(3) {
                server.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            (seen, server)
        });
        let pooled = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let mut head = conn
            .send_request(&head, http_body_util::Empty::<Bytes>::new())
            .await
            .unwrap();
        let (seen, server) = server_task.await.unwrap();
        drop(server);
        let body = ResponseBody::new(conn, &mut head, Some(Pool(pooled.clone())));
        let body = body.collect().await.map(|c| c.to_bytes().to_vec());
        let n = pooled.borrow().len();
        (seen, body, n)
    }

    #[tokio::test]
    async fn bodies_by_framing_and_reuse() {
        let (seen, body, pooled) = exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            Method::GET,
        )
        .await;
        assert_eq!(seen, b"GET /x HTTP/1.1\r\n\r\n");
        assert_eq!(body.unwrap(), b"hello");
        assert_eq!(pooled, 1);

        let (_, body, pooled) = exchange(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n",
            Method::GET,
        )
        .await;
        assert_eq!(body.unwrap(), b"abc");
        assert_eq!(pooled, 1);

        let (_, body, pooled) = exchange(b"HTTP/1.1 200 OK\r\n\r\nuntil close", Method::GET).await;
        assert_eq!(body.unwrap(), b"until close");
        assert_eq!(pooled, 0);

        let (seen, body, pooled) = exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            Method::HEAD,
        )
        .await;
        assert!(seen.starts_with(b"HEAD /x HTTP/1.1\r\n"));
        assert!(body.unwrap().is_empty());
        assert_eq!(pooled, 1);

        // Cut short: an error, and the connection is not kept.
        let (_, body, pooled) = exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
            Method::GET,
        )
        .await;
        assert!(body.is_err());
        assert_eq!(pooled, 0);

        // Bytes after the body: the connection is not reused.
        let (_, body, pooled) = exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiXX",
            Method::GET,
        )
        .await;
        assert_eq!(body.unwrap(), b"hi");
        assert_eq!(pooled, 0);
    }

    #[tokio::test]
    async fn sends_bodies_framed() {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let mut conn = Connection::new(client);
        let headers = HeaderMap::new();
        let head = RequestHead {
            method: &Method::POST,
            target: "/u",
            headers: &headers,
            edit: &NoEdit,
            lines: ResponseLines::Parsed,
        };
        let server_task = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut buf = [0u8; 1024];
            while !seen.ends_with(b"0\r\n\r\n") {
                let n = server.read(&mut buf).await.unwrap();
                seen.extend_from_slice(&buf[..n]);
            }
            server
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
            seen
        });
        // A stream of unknown length goes chunked.
        let stream = futures_util::stream::iter(vec![
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::data(Bytes::from_static(b"cde"))),
        ]);
        let body = http_body_util::StreamBody::new(stream);
        let h = conn.send_request(&head, body).await.unwrap();
        assert_eq!(h.status, 200);
        let seen = server_task.await.unwrap();
        assert_eq!(
            seen,
            b"POST /u HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"
        );
    }
}
