//! The chunked transfer coding of HTTP/1.1 (RFC 9112 section 7.1): an incremental decoder over a
//! read buffer and the few bytes an encoder writes around each chunk.
//!
//! The decoder is strict where leniency lets two parsers disagree about where a message ends
//! (request smuggling): every line must end in CRLF (a bare LF is refused everywhere), a size is
//! hex digits only and must fit in a `u64`, and the size line and the trailer section have length
//! limits. Chunk extensions are skipped; trailer fields are read and dropped.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The longest size line accepted, extensions included, CRLF excluded.
pub const MAX_SIZE_LINE: usize = 4096;
/// The most trailer-section bytes accepted (all trailer lines, CRLFs included).
pub const MAX_TRAILERS: usize = 16 * 1024;

/// The terminator of a chunked body: the last (empty) chunk and an empty trailer section.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";
/// What follows each chunk's data.
pub const CHUNK_TAIL: &[u8] = b"\r\n";

/// A chunked body the decoder refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkedError {
    #[error("invalid chunk size line")]
    InvalidSize,
    #[error("chunk size overflows")]
    SizeOverflow,
    #[error("chunk size line longer than {MAX_SIZE_LINE} bytes")]
    SizeLineTooLong,
    #[error("chunk data not followed by CRLF")]
    MissingCrlf,
    #[error("invalid trailer line")]
    InvalidTrailer,
    #[error("trailer section longer than {MAX_TRAILERS} bytes")]
    TrailersTooLong,
}

/// What one [`ChunkedDecoder::decode`] call produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Body data, split off the front of the read buffer without copying.
    Data(Bytes),
    /// The buffer holds no complete next piece: read more into it and call again.
    NeedMore,
    /// The last chunk and the trailers were consumed; the bytes after them (if any) stay in the
    /// buffer. Every later call returns `End` again.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before a size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataCrlf,
    /// In the trailer section, this many bytes of it consumed so far.
    Trailers(usize),
    End,
}

/// An incremental decoder of one chunked body. Feed it the connection's read buffer: it consumes
/// what it understands from the front and leaves the rest.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    /// A decoder at the start of a chunked body.
    pub fn new() -> Self {
        ChunkedDecoder { state: State::Size }
    }

    /// Whether the whole body (last chunk and trailers) has been consumed.
    pub fn is_done(&self) -> bool {
        self.state == State::End
    }

    /// Consumes the next piece of the body from the front of `buf`. Returns data as soon as any
    /// is buffered (possibly less than the whole chunk), so a large chunk streams through a small
    /// buffer. An error leaves the decoder and the buffer in an unspecified state: the connection
    /// must be dropped.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ChunkedError> {
        loop {
            match self.state {
                State::Size => {
                    let Some(line_end) = find_line(buf, MAX_SIZE_LINE).map_err(|e| match e {
                        LineError::TooLong => ChunkedError::SizeLineTooLong,
                        LineError::BareLf => ChunkedError::InvalidSize,
                    })?
                    else {
                        return Ok(Decoded::NeedMore);
                    };
                    let size = parse_size_line(&buf[..line_end])?;
                    buf.advance(line_end + 2);
                    self.state = if size == 0 {
                        State::Trailers(0)
                    } else {
                        State::Data(size)
                    };
                }
                State::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::DataCrlf
                    } else {
                        State::Data(left)
                    };
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                State::DataCrlf => {
                    if buf.len() < 2 {
                        // A wrong first byte can be refused without waiting for the second.
                        if buf.first().is_some_and(|&b| b != b'\r') {
                            return Err(ChunkedError::MissingCrlf);
                        }
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(ChunkedError::MissingCrlf);
                    }
                    buf.advance(2);
                    self.state = State::Size;
                }
                State::Trailers(used) => {
                    let room = MAX_TRAILERS.saturating_sub(used + 2);
                    let Some(line_end) = find_line(buf, room).map_err(|e| match e {
                        LineError::TooLong => ChunkedError::TrailersTooLong,
                        LineError::BareLf => ChunkedError::InvalidTrailer,
                    })?
                    else {
                        return Ok(Decoded::NeedMore);
                    };
                    let line = &buf[..line_end];
                    if line.is_empty() {
                        buf.advance(2);
                        self.state = State::End;
                        return Ok(Decoded::End);
                    }
                    check_trailer_line(line)?;
                    buf.advance(line_end + 2);
                    self.state = State::Trailers(used + line_end + 2);
                }
                State::End => return Ok(Decoded::End),
            }
        }
    }
}

/// Why [`find_line`] refused a line.
enum LineError {
    TooLong,
    BareLf,
}

/// Finds the CRLF ending the first line of `buf`: `Ok(Some(i))` with `buf[i..i + 2] == "\r\n"`,
/// `Ok(None)` when no line end is buffered yet and the line is still within `limit` bytes.
fn find_line(buf: &[u8], limit: usize) -> Result<Option<usize>, LineError> {
    let window = &buf[..buf.len().min(limit + 2)];
    match window.iter().position(|&b| b == b'\n') {
        Some(lf) if lf > 0 && window[lf - 1] == b'\r' => Ok(Some(lf - 1)),
        Some(_) => Err(LineError::BareLf),
        None if buf.len() >= limit + 2 => Err(LineError::TooLong),
        None => Ok(None),
    }
}

/// Parses `hex-digits [ws] [; extensions]` (without the CRLF) into the chunk size.
fn parse_size_line(line: &[u8]) -> Result<u64, ChunkedError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(ChunkedError::InvalidSize);
    }
    let mut size: u64 = 0;
    for &b in &line[..digits] {
        let d = (b as char).to_digit(16).unwrap_or(0) as u64;
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(d))
            .ok_or(ChunkedError::SizeOverflow)?;
    }
    let rest = &line[digits..];
    let rest = &rest[rest
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count()..];
    match rest.first() {
        None => Ok(size),
        // Extensions are ignored, but they may not smuggle a CR or other control bytes.
        Some(b';') if rest.iter().all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f)) => Ok(size),
        Some(_) => Err(ChunkedError::InvalidSize),
    }
}

/// A trailer line must look like a header field: a token name, a colon, no control bytes.
fn check_trailer_line(line: &[u8]) -> Result<(), ChunkedError> {
    let name_len = line.iter().take_while(|&&b| is_token(b)).count();
    if name_len == 0 || line.get(name_len) != Some(&b':') {
        return Err(ChunkedError::InvalidTrailer);
    }
    if line[name_len + 1..]
        .iter()
        .any(|&b| b != b'\t' && (b < 0x20 || b == 0x7f))
    {
        return Err(ChunkedError::InvalidTrailer);
    }
    Ok(())
}

fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Writes the head of a chunk of `len` bytes (`len` in hex, CRLF). The data and then
/// [`CHUNK_TAIL`] follow; `len` must not be 0 (that is [`LAST_CHUNK`]).
pub fn encode_chunk_head(len: usize, dst: &mut BytesMut) {
    debug_assert!(len > 0, "a zero-length chunk ends the body");
    let mut digits = [0u8; 16];
    let mut n = len;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    dst.reserve(digits.len() - i + 2);
    dst.put_slice(&digits[i..]);
    dst.put_slice(b"\r\n");
}

/// Writes the terminator of a chunked body (last chunk, no trailers).
pub fn encode_last_chunk(dst: &mut BytesMut) {
    dst.put_slice(LAST_CHUNK);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces of `step` bytes; returns the body and what is left after it.
    fn decode_in_steps(input: &[u8], step: usize) -> Result<(Vec<u8>, Vec<u8>), ChunkedError> {
        let mut dec = ChunkedDecoder::new();
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut fed = 0;
        loop {
            match dec.decode(&mut buf)? {
                Decoded::Data(d) => body.extend_from_slice(&d),
                Decoded::End => {
                    let mut rest = buf.to_vec();
                    rest.extend_from_slice(&input[fed..]);
                    return Ok((body, rest));
                }
                Decoded::NeedMore => {
                    assert!(fed < input.len(), "decoder wants more after all input");
                    let end = (fed + step).min(input.len());
                    buf.extend_from_slice(&input[fed..end]);
                    fed = end;
                }
            }
        }
    }

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, Vec<u8>), ChunkedError> {
        decode_in_steps(input, input.len().max(1))
    }

    #[test]
    fn decodes_chunks_whole_and_byte_by_byte() {
        let input = b"5\r\nhello\r\nA\r\n0123456789\r\n0\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, input.len()] {
            let (body, rest) = decode_in_steps(input, step).unwrap();
            assert_eq!(body, b"hello0123456789", "step {step}");
            assert_eq!(rest, b"NEXT", "step {step}");
        }
    }

    #[test]
    fn ignores_extensions_and_drops_trailers() {
        let input = b"3;name=value;x\r\nabc\r\n2 ; q=\"a b\"\r\nde\r\n0;last\r\nX-Sum: 1\r\nX-Other:two\r\n\r\n";
        for step in [1, 5, input.len()] {
            let (body, rest) = decode_in_steps(input, step).unwrap();
            assert_eq!(body, b"abcde");
            assert!(rest.is_empty());
        }
    }

    #[test]
    fn data_is_returned_without_copying() {
        let mut buf = BytesMut::from(&b"4\r\nwxyz\r\n0\r\n\r\n"[..]);
        let start = buf[3..].as_ptr();
        let mut dec = ChunkedDecoder::new();
        match dec.decode(&mut buf).unwrap() {
            Decoded::Data(d) => {
                assert_eq!(&d[..], b"wxyz");
                assert_eq!(d.as_ptr(), start);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(dec.decode(&mut buf).unwrap(), Decoded::End);
        assert!(dec.is_done());
        assert_eq!(dec.decode(&mut buf).unwrap(), Decoded::End);
    }

    #[test]
    fn large_chunk_streams_in_pieces() {
        let mut dec = ChunkedDecoder::new();
        let mut buf = BytesMut::from(&b"10\r\n01234"[..]);
        assert_eq!(
            dec.decode(&mut buf).unwrap(),
            Decoded::Data(Bytes::from_static(b"01234"))
        );
        assert_eq!(dec.decode(&mut buf).unwrap(), Decoded::NeedMore);
        buf.extend_from_slice(b"56789abcdef\r\n0\r\n\r\n");
        assert_eq!(
            dec.decode(&mut buf).unwrap(),
            Decoded::Data(Bytes::from_static(b"56789abcdef"))
        );
        assert_eq!(dec.decode(&mut buf).unwrap(), Decoded::End);
    }

    #[test]
    fn upper_and_lower_hex_and_leading_zeros() {
        let (body, _) = decode_all(b"000F\r\n0123456789abcde\r\n0\r\n\r\n").unwrap();
        assert_eq!(body.len(), 15);
    }

    #[test]
    fn refuses_bad_sizes() {
        assert_eq!(decode_all(b"\r\n").unwrap_err(), ChunkedError::InvalidSize);
        assert_eq!(
            decode_all(b"-1\r\n").unwrap_err(),
            ChunkedError::InvalidSize
        );
        assert_eq!(
            decode_all(b"0x5\r\n").unwrap_err(),
            ChunkedError::InvalidSize
        );
        assert_eq!(
            decode_all(b"5 5\r\n").unwrap_err(),
            ChunkedError::InvalidSize
        );
        assert_eq!(
            decode_all(b"+5\r\n").unwrap_err(),
            ChunkedError::InvalidSize
        );
        assert_eq!(
            decode_all(b"5;a\x00b\r\n").unwrap_err(),
            ChunkedError::InvalidSize
        );
        assert_eq!(
            decode_all(b"10000000000000000\r\n").unwrap_err(),
            ChunkedError::SizeOverflow
        );
        // The largest u64 parses (and then waits for data).
        let mut dec = ChunkedDecoder::new();
        let mut buf = BytesMut::from(&b"ffffffffffffffff\r\n"[..]);
        assert_eq!(dec.decode(&mut buf).unwrap(), Decoded::NeedMore);
    }

    #[test]
    fn refuses_bare_lf_everywhere() {
        assert!(decode_all(b"5\nhello\r\n0\r\n\r\n").is_err());
        assert_eq!(
            decode_all(b"5\r\nhello\n0\r\n\r\n").unwrap_err(),
            ChunkedError::MissingCrlf
        );
        assert!(decode_all(b"5\r\nhello\r\n0\n\r\n").is_err());
        assert!(decode_all(b"5\r\nhello\r\n0\r\n\n").is_err());
        assert!(decode_all(b"5\r\nhello\r\n0\r\nX: y\n\r\n").is_err());
        // Byte by byte gives the same answers.
        assert!(decode_in_steps(b"5\nhello\r\n0\r\n\r\n", 1).is_err());
        assert!(decode_in_steps(b"5\r\nhello\r\n0\r\n\n", 1).is_err());
    }

    #[test]
    fn refuses_missing_crlf_after_data() {
        assert_eq!(
            decode_all(b"3\r\nabcd\r\n0\r\n\r\n").unwrap_err(),
            ChunkedError::MissingCrlf
        );
        assert_eq!(
            decode_in_steps(b"3\r\nabc\rx0\r\n\r\n", 1).unwrap_err(),
            ChunkedError::MissingCrlf
        );
    }

    #[test]
    fn refuses_bad_trailers() {
        assert_eq!(
            decode_all(b"0\r\nno colon\r\n\r\n").unwrap_err(),
            ChunkedError::InvalidTrailer
        );
        assert_eq!(
            decode_all(b"0\r\n: empty name\r\n\r\n").unwrap_err(),
            ChunkedError::InvalidTrailer
        );
        assert_eq!(
            decode_all(b"0\r\nX: a\rb\r\n\r\n").unwrap_err(),
            ChunkedError::InvalidTrailer
        );
    }

    #[test]
    fn limits_size_line_and_trailers() {
        let mut long = b"5;".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_SIZE_LINE));
        long.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
        assert_eq!(
            decode_all(&long).unwrap_err(),
            ChunkedError::SizeLineTooLong
        );
        // Without a line end in sight the limit still applies, fed whole or in pieces.
        let endless = vec![b'1'; MAX_SIZE_LINE + 10];
        let mut dec = ChunkedDecoder::new();
        let mut buf = BytesMut::from(&endless[..]);
        assert_eq!(
            dec.decode(&mut buf).unwrap_err(),
            ChunkedError::SizeLineTooLong
        );
        // A line exactly at the limit is fine.
        let mut at_limit = b"5;".to_vec();
        at_limit.extend(std::iter::repeat_n(b'a', MAX_SIZE_LINE - 2));
        at_limit.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
        assert_eq!(decode_in_steps(&at_limit, 100).unwrap().0, b"hello");

        let mut trailers = b"0\r\n".to_vec();
        for i in 0..MAX_TRAILERS / 10 {
            trailers.extend_from_slice(format!("X-T{i:05}: 0123456\r\n").as_bytes());
        }
        trailers.extend_from_slice(b"\r\n");
        assert_eq!(
            decode_in_steps(&trailers, 64).unwrap_err(),
            ChunkedError::TrailersTooLong
        );
    }

    #[test]
    fn encodes_heads_and_terminator() {
        let mut out = BytesMut::new();
        for len in [1usize, 15, 16, 255, 4096, 0x1234_5678] {
            out.clear();
            encode_chunk_head(len, &mut out);
            assert_eq!(out, format!("{len:x}\r\n").as_bytes());
        }
        // A body built with the encoder decodes back.
        out.clear();
        for piece in [&b"hello"[..], &[b'x'; 300][..]] {
            encode_chunk_head(piece.len(), &mut out);
            out.extend_from_slice(piece);
            out.extend_from_slice(CHUNK_TAIL);
        }
        encode_last_chunk(&mut out);
        let (body, rest) = decode_all(&out).unwrap();
        assert_eq!(body.len(), 305);
        assert!(rest.is_empty());
    }
}
