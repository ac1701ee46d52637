//! Response compression a plugin asks for: APISIX-Runtime's `resty.apisix.response.set_gzip`
//! (what APISIX's `gzip` plugin calls in header_filter) turns on nginx's gzip filter for one
//! response. The decision and the header changes follow nginx's `ngx_http_gzip_filter_module`;
//! the plugin has already checked `types`, `min_length` and `http_version` itself.
//!
//! * [`applies`]: whether a response is compressed at all: status 200, 403 or 404; not a HEAD
//!   (no body); no `Content-Encoding` already; a request that takes gzip (`Accept-Encoding`
//!   with `gzip` at a q above 0); and, as nginx's `gzip_proxied off` default, not a request that
//!   came through another proxy (`Via`).
//! * [`prepare_headers`]: `Content-Encoding: gzip`; the length and `Accept-Ranges` go (the body
//!   goes out chunked, and ranges of the uncompressed body mean nothing); a strong `ETag`
//!   becomes weak, as the compressed bytes differ from the ones it named.
//! * [`Gzip`]: the encoder. Each chunk handed on is flushed (a sync flush), so a streamed
//!   response (server-sent events, a long poll) reaches the client as it comes instead of
//!   waiting for the encoder's buffers to fill; the cost is a few bytes per chunk.

use bytes::Bytes;
use flate2::{Compress, Compression, FlushCompress, Status};
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};

/// What `set_gzip` asked for; nginx's `gzip_comp_level`. The `buffer_num`/`buffer_size`
/// arguments size nginx's output buffers; the encoder here sizes its own output, so they are
/// accepted and only checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GzipRequest {
    pub level: u32,
}

/// Whether a response with `status` and `headers`, answering a request with `method` and
/// `req_headers`, gets compressed.
pub fn applies(
    method: &Method,
    req_headers: &HeaderMap,
    status: StatusCode,
    headers: &HeaderMap,
) -> bool {
    if !matches!(status.as_u16(), 200 | 403 | 404) || method == Method::HEAD {
        return false;
    }
    if headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.is_empty())
    {
        return false;
    }
    if req_headers.contains_key(header::VIA) {
        return false;
    }
    req_headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .any(|v| accepts_gzip(v.as_bytes()))
}

/// Whether one `Accept-Encoding` value lists `gzip` (or `x-gzip`) with a q above 0. A `*`
/// alone is not taken as gzip, as nginx does not.
fn accepts_gzip(value: &[u8]) -> bool {
    let Ok(value) = std::str::from_utf8(value) else {
        return false;
    };
    value.split(',').any(|item| {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim();
        if !coding.eq_ignore_ascii_case("gzip") && !coding.eq_ignore_ascii_case("x-gzip") {
            return false;
        }
        for p in parts {
            let p = p.trim();
            if let Some(q) = p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")) {
                return q.trim().parse::<f32>().is_ok_and(|q| q > 0.0);
            }
        }
        true
    })
}

/// The header changes of a compressed response.
pub fn prepare_headers(headers: &mut HeaderMap) {
    headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::ACCEPT_RANGES);
    if let Some(etag) = headers.get(header::ETAG) {
        let b = etag.as_bytes();
        if b.first() == Some(&b'"') {
            let mut weak = Vec::with_capacity(b.len() + 2);
            weak.extend_from_slice(b"W/");
            weak.extend_from_slice(b);
            match HeaderValue::from_bytes(&weak) {
                Ok(v) => {
                    headers.insert(header::ETAG, v);
                }
                Err(_) => {
                    headers.remove(header::ETAG);
                }
            }
        } else if !b.starts_with(b"W/") {
            // Neither strong nor weak: nginx drops it.
            headers.remove(header::ETAG);
        }
    }
}

/// A gzip stream: the RFC 1952 header, deflate data chunk by chunk, the CRC-32 and length
/// trailer at the end.
pub struct Gzip {
    deflate: Compress,
    crc: flate2::Crc,
    header_sent: bool,
    finished: bool,
    level: u32,
}

impl Gzip {
    pub fn new(req: GzipRequest) -> Gzip {
        let level = req.level.clamp(1, 9);
        Gzip {
            deflate: Compress::new(Compression::new(level), false),
            crc: flate2::Crc::new(),
            header_sent: false,
            finished: false,
            level,
        }
    }

    /// Compresses one chunk of the body and flushes it.
    pub fn push(&mut self, data: &[u8]) -> Bytes {
        let mut out = Vec::with_capacity(data.len() / 2 + 64);
        self.header(&mut out);
        self.crc.update(data);
        self.run(data, FlushCompress::Sync, &mut out);
        Bytes::from(out)
    }

    /// The end of the stream: `last` (possibly empty), then the trailer.
    pub fn finish_with(&mut self, last: &[u8]) -> Bytes {
        let mut out = Vec::with_capacity(last.len() / 2 + 64);
        if self.finished {
            return Bytes::new();
        }
        self.header(&mut out);
        self.crc.update(last);
        self.run(last, FlushCompress::Finish, &mut out);
        out.extend_from_slice(&self.crc.sum().to_le_bytes());
        out.extend_from_slice(&self.crc.amount().to_le_bytes());
        self.finished = true;
        Bytes::from(out)
    }

    fn header(&mut self, out: &mut Vec<u8>) {
        if self.header_sent {
            return;
        }
        self.header_sent = true;
        // ID1 ID2 CM=deflate FLG=0 MTIME=0 XFL OS=unix (3), as nginx writes it.
        let xfl = match self.level {
            1 => 4,
            9 => 2,
            _ => 0,
        };
        out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, xfl, 3]);
    }

    fn run(&mut self, mut input: &[u8], flush: FlushCompress, out: &mut Vec<u8>) {
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity().max(256));
            }
            let before_in = self.deflate.total_in();
            let status = self
                .deflate
                .compress_vec(input, out, flush)
                .unwrap_or(Status::StreamEnd);
            let used = (self.deflate.total_in() - before_in) as usize;
            input = &input[used..];
            match status {
                Status::StreamEnd => return,
                // Output filled the buffer: make room and go on.
                _ if out.len() == out.capacity() => continue,
                // All input taken and the flush done (room was left over).
                _ if input.is_empty() && !matches!(flush, FlushCompress::Finish) => return,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn req(accept: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_str(accept).unwrap(),
        );
        h
    }

    #[test]
    fn applies_as_nginx_gzip_filter() {
        let none = HeaderMap::new();
        let ok = StatusCode::OK;
        assert!(applies(&Method::GET, &req("gzip"), ok, &none));
        assert!(applies(&Method::GET, &req("br, gzip;q=0.5"), ok, &none));
        assert!(applies(&Method::GET, &req("x-gzip"), ok, &none));
        assert!(!applies(&Method::GET, &req("gzip;q=0"), ok, &none));
        assert!(!applies(&Method::GET, &req("br, *"), ok, &none));
        assert!(!applies(&Method::GET, &HeaderMap::new(), ok, &none));
        assert!(!applies(&Method::HEAD, &req("gzip"), ok, &none));
        assert!(applies(
            &Method::GET,
            &req("gzip"),
            StatusCode::NOT_FOUND,
            &none
        ));
        assert!(!applies(
            &Method::GET,
            &req("gzip"),
            StatusCode::PARTIAL_CONTENT,
            &none
        ));
        assert!(!applies(
            &Method::GET,
            &req("gzip"),
            StatusCode::FOUND,
            &none
        ));
        let mut encoded = HeaderMap::new();
        encoded.insert(header::CONTENT_ENCODING, HeaderValue::from_static("br"));
        assert!(!applies(&Method::GET, &req("gzip"), ok, &encoded));
        let mut via = req("gzip");
        via.insert(header::VIA, HeaderValue::from_static("1.1 cache"));
        assert!(!applies(&Method::GET, &via, ok, &none));
    }

    #[test]
    fn headers_lose_length_and_ranges_and_etag_turns_weak() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("100"));
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        h.insert(header::ETAG, HeaderValue::from_static("\"abc\""));
        prepare_headers(&mut h);
        assert_eq!(h[header::CONTENT_ENCODING], "gzip");
        assert!(!h.contains_key(header::CONTENT_LENGTH));
        assert!(!h.contains_key(header::ACCEPT_RANGES));
        assert_eq!(h[header::ETAG], "W/\"abc\"");
        let mut weak = HeaderMap::new();
        weak.insert(header::ETAG, HeaderValue::from_static("W/\"x\""));
        prepare_headers(&mut weak);
        assert_eq!(weak[header::ETAG], "W/\"x\"");
    }

    #[test]
    fn chunks_make_one_gzip_stream() {
        let text: Vec<u8> = (0..200_000u32)
            .map(|i| b"moongate gzip "[(i % 14) as usize])
            .collect();
        for level in [1, 6, 9] {
            let mut gz = Gzip::new(GzipRequest { level });
            let mut out = Vec::new();
            for chunk in text.chunks(7000) {
                out.extend_from_slice(&gz.push(chunk));
            }
            out.extend_from_slice(&gz.finish_with(b"tail"));
            assert!(out.len() < text.len() / 10, "level {level}: {}", out.len());
            let mut back = Vec::new();
            flate2::read::GzDecoder::new(&out[..])
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(&back[..text.len()], &text[..]);
            assert_eq!(&back[text.len()..], b"tail");
        }
    }

    #[test]
    fn each_pushed_chunk_decodes_on_its_own() {
        // A sync flush per chunk: what went out so far decodes to what came in so far.
        let mut gz = Gzip::new(GzipRequest { level: 1 });
        let first = gz.push(b"data: one\n\n");
        let mut dec = flate2::Decompress::new(false);
        let mut out = Vec::with_capacity(1024);
        dec.decompress_vec(&first[10..], &mut out, flate2::FlushDecompress::Sync)
            .unwrap();
        assert_eq!(out, b"data: one\n\n");
        let empty = Gzip::new(GzipRequest { level: 1 }).finish_with(b"");
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&empty[..])
            .read_to_end(&mut back)
            .unwrap();
        assert!(back.is_empty());
    }
}
