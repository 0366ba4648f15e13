//! The HTTP/1.1 client codec for the hop to replicas: request heads out, response heads and bodies
//! in. Pure functions over byte buffers; `upstream` does the I/O.
//!
//! Why our own and not hyper's client connection: hyper's `client::conn::http1` passes every
//! request through an internal dispatch channel, parses the response into its own buffers and
//! hands the body over through another channel. Measured with callgrind, the upstream exchange
//! cost ~14k instructions per proxied request, more than hyper's server side; this codec does
//! the same work in a fraction of that. The rules it follows (RFC 9112):
//!
//! * Requests: the client's `Content-Length` when it sent one, nothing for a body that has already
//!   ended (`content-length: 0` for methods that carry a body), a known exact size as
//!   `Content-Length`, chunked otherwise.
//! * Responses: `1xx` other than `101` are skipped; `HEAD`, `204` and `304` have no body;
//!   `Transfer-Encoding` wins over `Content-Length` (which is then dropped, so it is never passed
//!   on beside a body it does not describe, and the connection is not reused) and means chunked when chunked is the final coding,
//!   else the body runs to the end of the connection; several different `Content-Length` values,
//!   or one that is not a number, are an error; with neither header the body runs to the end of
//!   the connection.
//! * A connection is reused only after a complete exchange, when the response allowed it
//!   (HTTP/1.1 without `Connection: close`, HTTP/1.0 with `keep-alive`), the body was delimited
//!   and nothing followed it.

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};

/// Largest response head accepted (status line and headers). nginx's default is 4-8 KiB.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most response headers accepted.
pub const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (size and extensions).
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Most bytes of trailers accepted (they are read and dropped).
const MAX_TRAILER_BYTES: usize = 64 * 1024;

/// A replica's response that breaks HTTP/1.1.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// The status line or a header does not parse.
    #[error("malformed response head: {0}")]
    Head(httparse::Error),
    /// More than [`MAX_HEAD_BYTES`] without the end of the head.
    #[error("response head larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    /// A header name or value that HTTP does not allow.
    #[error("invalid response header {0:?}")]
    Header(String),
    /// `Content-Length` is not a number, or several disagree.
    #[error("invalid Content-Length in response")]
    ContentLength,
    /// Chunked framing broken (size line, CRLF after data, trailers).
    #[error("malformed chunked response body")]
    Chunked,
    /// The connection ended inside a delimited body.
    #[error("replica closed the connection before the end of the response body")]
    Truncated,
}

/// How the request body is framed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body.
    Empty,
    /// Exactly this many bytes follow the head.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Decides the request's framing. `declared` is the request's `Content-Length` (already
/// validated when it came from a client), `ended` whether the body has nothing more, `exact` the
/// body's exact size when known. The flag says, for an empty body, whether to send
/// `content-length: 0` (RFC 9110 §8.6: for methods whose requests normally carry content, and
/// when the client declared it).
pub fn request_framing(
    method: &Method,
    declared: Option<u64>,
    ended: bool,
    exact: Option<u64>,
) -> (RequestFraming, bool) {
    let carries_content =
        *method == Method::POST || *method == Method::PUT || *method == Method::PATCH;
    match declared {
        Some(0) => (RequestFraming::Empty, true),
        Some(n) => (RequestFraming::Length(n), true),
        None if ended => (RequestFraming::Empty, carries_content),
        None => match exact {
            Some(0) => (RequestFraming::Empty, carries_content),
            Some(n) => (RequestFraming::Length(n), true),
            None => (RequestFraming::Chunked, true),
        },
    }
}

/// Appends a request head to `out`: the request line with `path` and `query` (origin form),
/// `Host`, the framing header, then `headers` except `Host` and `Content-Length` (hop-by-hop
/// headers are already removed) and except those `skip` names, then `extra`.
#[allow(clippy::too_many_arguments)]
pub fn encode_request_head<'a>(
    out: &mut Vec<u8>,
    method: &Method,
    path: &str,
    query: Option<&str>,
    host: &HeaderValue,
    headers: &HeaderMap,
    skip: impl Fn(&HeaderName) -> bool,
    extra: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>,
    (framing, declare_empty): (RequestFraming, bool),
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    if let Some(query) = query {
        out.push(b'?');
        out.extend_from_slice(query.as_bytes());
    }
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    match framing {
        RequestFraming::Empty if declare_empty => out.extend_from_slice(b"content-length: 0\r\n"),
        RequestFraming::Empty => {}
        RequestFraming::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa(n, &mut [0; 20]));
            out.extend_from_slice(b"\r\n");
        }
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    let mut line = |name: &HeaderName, value: &HeaderValue| {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    };
    for (name, value) in headers {
        if name == header::HOST || name == header::CONTENT_LENGTH || skip(name) {
            continue;
        }
        line(name, value);
    }
    for (name, value) in extra {
        line(name, value);
    }
    out.extend_from_slice(b"\r\n");
}

/// The line that starts a chunk of `len` bytes: its size in hex and CRLF.
pub fn chunk_prefix(len: usize) -> Bytes {
    let mut digits = [0u8; 18];
    let mut i = 16;
    let mut n = len;
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    digits[16] = b'\r';
    digits[17] = b'\n';
    Bytes::copy_from_slice(&digits[i..])
}

fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// A parsed response head.
#[derive(Debug)]
pub enum Parsed {
    /// An interim `1xx` response other than `101` (skipped by the caller).
    Informational(StatusCode),
    /// The final response head, how its body is framed, and whether the connection may carry
    /// another request after it.
    Final {
        /// Status, version and headers (body to be attached).
        head: Response<()>,
        /// How to read the body.
        body: Decoder,
        /// The response allows reusing the connection.
        keep_alive: bool,
    },
}

/// Parses a response head from the front of `buf`, consuming it. `Ok(None)`: more bytes needed.
/// `head_request`: the request was `HEAD` (the response has no body whatever it declares).
pub fn parse_response(
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<Option<Parsed>, ProtocolError> {
    if buf.is_empty() {
        return Ok(None);
    }
    // Offsets of each header's name and value in the head, so the parser's borrow of `buf` can
    // end before the head is split off and shared (values point into it, no copy).
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let (len, code, minor, count) = {
        let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let status = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut resp,
            buf,
            &mut storage,
        );
        let len = match status {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
                return Err(ProtocolError::HeadTooLarge)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(ProtocolError::HeadTooLarge),
            Err(e) => return Err(ProtocolError::Head(e)),
        };
        if len > MAX_HEAD_BYTES {
            return Err(ProtocolError::HeadTooLarge);
        }
        let base = buf.as_ptr() as usize;
        for (span, h) in spans.iter_mut().zip(resp.headers.iter()) {
            let name = h.name.as_ptr() as usize - base;
            let value = h.value.as_ptr() as usize - base;
            *span = (
                name as u32,
                (name + h.name.len()) as u32,
                value as u32,
                (value + h.value.len()) as u32,
            );
        }
        (
            len,
            resp.code.unwrap_or(0),
            resp.version.unwrap_or(1),
            resp.headers.len(),
        )
    };
    let head = buf.split_to(len).freeze();
    let status =
        StatusCode::from_u16(code).map_err(|_| ProtocolError::Head(httparse::Error::Status))?;
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Some(Parsed::Informational(status)));
    }

    // Room for the headers the gateway adds to responses (`X-Call-Id`, a cold-start note).
    let mut headers = HeaderMap::with_capacity(count + 2);
    let mut chunked = None;
    let mut length: Option<Option<u64>> = None;
    let mut close = false;
    let mut keep_alive_token = false;
    for &(ns, ne, vs, ve) in &spans[..count] {
        let raw_name = &head[ns as usize..ne as usize];
        let name = HeaderName::from_bytes(raw_name)
            .map_err(|_| ProtocolError::Header(String::from_utf8_lossy(raw_name).into_owned()))?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs as usize..ve as usize))
            .map_err(|_| ProtocolError::Header(name.as_str().to_owned()))?;
        if name == header::TRANSFER_ENCODING {
            // The final coding decides; a later header overrides an earlier one's verdict.
            let last = value
                .as_bytes()
                .rsplit(|&b| b == b',')
                .next()
                .unwrap_or(b"");
            chunked = Some(trim(last).eq_ignore_ascii_case(b"chunked"));
        } else if name == header::CONTENT_LENGTH {
            for part in value.as_bytes().split(|&b| b == b',') {
                let n = parse_decimal(trim(part)).ok_or(ProtocolError::ContentLength)?;
                match length {
                    Some(Some(seen)) if seen != n => return Err(ProtocolError::ContentLength),
                    _ => length = Some(Some(n)),
                }
            }
        } else if name == header::CONNECTION {
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = trim(token);
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
        headers.append(name, value);
    }

    let version = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut keep_alive = !close && (version == Version::HTTP_11 || keep_alive_token);
    let body = if status == StatusCode::SWITCHING_PROTOCOLS {
        keep_alive = false;
        Decoder::Done
    } else if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED
    {
        Decoder::Done
    } else if let Some(chunked) = chunked {
        if headers.remove(header::CONTENT_LENGTH).is_some() {
            // Both framings: the replica and the gateway may disagree on where the body ends
            // (RFC 9112 §6.3), so nothing more is read from this connection.
            keep_alive = false;
        }
        if chunked {
            Decoder::Chunked(Chunk::Size)
        } else {
            keep_alive = false;
            Decoder::Eof
        }
    } else {
        match length {
            Some(Some(0)) => Decoder::Done,
            Some(Some(n)) => Decoder::Length(n),
            _ => {
                keep_alive = false;
                Decoder::Eof
            }
        }
    };
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = headers;
    Ok(Some(Parsed::Final {
        head: response,
        body,
        keep_alive,
    }))
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    s.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

/// Where a chunked body is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk, reading (and dropping) trailer lines; bytes seen so far.
    Trailers(usize),
}

/// Reads a response body out of the connection's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoder {
    /// This many bytes left.
    Length(u64),
    /// Chunked.
    Chunked(Chunk),
    /// Until the replica closes the connection.
    Eof,
    /// The body has ended.
    Done,
}

impl Decoder {
    /// The body has ended.
    pub fn is_done(&self) -> bool {
        matches!(self, Decoder::Done)
    }

    /// Bytes of body left, when known.
    pub fn remaining(&self) -> Option<u64> {
        match self {
            Decoder::Length(n) => Some(*n),
            Decoder::Done => Some(0),
            _ => None,
        }
    }

    /// The next piece of body at the front of `buf`, consumed. `Ok(None)`: more bytes are needed,
    /// or the body has ended ([`Decoder::is_done`]).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, ProtocolError> {
        loop {
            match self {
                Decoder::Done => return Ok(None),
                Decoder::Eof => {
                    return Ok((!buf.is_empty()).then(|| buf.split().freeze()));
                }
                Decoder::Length(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = (*left).min(buf.len() as u64);
                    let data = buf.split_to(n as usize).freeze();
                    *left -= n;
                    if *left == 0 {
                        *self = Decoder::Done;
                    }
                    return Ok(Some(data));
                }
                Decoder::Chunked(Chunk::Data(left)) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = (*left).min(buf.len() as u64);
                    let data = buf.split_to(n as usize).freeze();
                    *left -= n;
                    if *left == 0 {
                        *self = Decoder::Chunked(Chunk::DataEnd);
                        // Consume the framing that follows if it is here, so a body whose end
                        // is buffered reports its end with its last data.
                        self.settle(buf)?;
                    }
                    return Ok(Some(data));
                }
                Decoder::Chunked(_) => {
                    if !self.framing_step(buf)? {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Consumes one piece of chunked framing (a size line, the CRLF after data, a trailer line).
    /// `Ok(false)`: more bytes are needed.
    fn framing_step(&mut self, buf: &mut BytesMut) -> Result<bool, ProtocolError> {
        let Decoder::Chunked(state) = self else {
            return Ok(false);
        };
        match *state {
            Chunk::Data(_) => Ok(false),
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(false);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(ProtocolError::Chunked);
                }
                buf.advance(2);
                *state = Chunk::Size;
                Ok(true)
            }
            Chunk::Size => {
                let Some((used, size)) = chunk_size(buf)? else {
                    return Ok(false);
                };
                buf.advance(used);
                *state = if size == 0 {
                    Chunk::Trailers(0)
                } else {
                    Chunk::Data(size)
                };
                Ok(true)
            }
            Chunk::Trailers(seen) => {
                let Some(lf) = buf.iter().position(|&b| b == b'\n') else {
                    if seen + buf.len() > MAX_TRAILER_BYTES {
                        return Err(ProtocolError::Chunked);
                    }
                    return Ok(false);
                };
                // Every line ends in CRLF, and no line holds a CR or LF of its own: a peer that
                // took a bare LF for a line end would see the body end somewhere else.
                let end = lf.checked_sub(1).ok_or(ProtocolError::Chunked)?;
                if buf[end] != b'\r' || buf[..end].contains(&b'\r') {
                    return Err(ProtocolError::Chunked);
                }
                buf.advance(end + 2);
                if end == 0 {
                    *self = Decoder::Done;
                    return Ok(true);
                }
                if seen + end + 2 > MAX_TRAILER_BYTES {
                    return Err(ProtocolError::Chunked);
                }
                *state = Chunk::Trailers(seen + end + 2);
                Ok(true)
            }
        }
    }

    /// After a chunk's data: consumes whatever buffered framing carries no data (its CRLF, the
    /// last chunk, trailers), so that `is_done` is true as soon as the buffer holds the end.
    fn settle(&mut self, buf: &mut BytesMut) -> Result<(), ProtocolError> {
        loop {
            match *self {
                Decoder::Chunked(Chunk::DataEnd | Chunk::Trailers(_)) => {
                    if !self.framing_step(buf)? {
                        return Ok(());
                    }
                }
                Decoder::Chunked(Chunk::Size) => match chunk_size(buf)? {
                    Some((_, 0)) => {
                        self.framing_step(buf)?;
                    }
                    _ => return Ok(()),
                },
                _ => return Ok(()),
            }
        }
    }

    /// The replica closed the connection: fine for a body that runs to the end, else the body
    /// was cut short.
    pub fn eof(&mut self) -> Result<(), ProtocolError> {
        match self {
            Decoder::Eof | Decoder::Done => {
                *self = Decoder::Done;
                Ok(())
            }
            _ => Err(ProtocolError::Truncated),
        }
    }
}

/// Parses a chunk-size line at the front of `buf`: `Ok(Some((line length, size)))`, `Ok(None)`
/// when the line is not complete yet.
fn chunk_size(buf: &[u8]) -> Result<Option<(usize, u64)>, ProtocolError> {
    let Some(end) = buf.iter().take(MAX_CHUNK_LINE).position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_CHUNK_LINE {
            Err(ProtocolError::Chunked)
        } else {
            Ok(None)
        };
    };
    let line = buf[..end]
        .strip_suffix(b"\r")
        .ok_or(ProtocolError::Chunked)?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(ProtocolError::Chunked);
    }
    let size = line[..digits].iter().fold(0u64, |n, &b| {
        n << 4 | u64::from((b as char).to_digit(16).unwrap_or(0))
    });
    // After the size: optional whitespace, then nothing or `;` and extensions (ignored).
    let rest = trim(&line[digits..]);
    if !(rest.is_empty() || rest[0] == b';') || rest.contains(&b'\r') {
        return Err(ProtocolError::Chunked);
    }
    Ok(Some((end + 1, size)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8], head_request: bool) -> Result<Option<Parsed>, ProtocolError> {
        parse_response(&mut BytesMut::from(raw), head_request)
    }

    #[test]
    fn a_response_with_both_framings_is_read_chunked_and_its_connection_not_reused() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        let (head, decoder, keep_alive) = final_head(raw);
        assert_eq!(decoder, Decoder::Chunked(Chunk::Size));
        assert!(head.headers().get(header::CONTENT_LENGTH).is_none());
        assert!(!keep_alive);
    }

    fn final_head(raw: &[u8]) -> (Response<()>, Decoder, bool) {
        match parse(raw, false).unwrap().unwrap() {
            Parsed::Final {
                head,
                body,
                keep_alive,
            } => (head, body, keep_alive),
            other => panic!("{other:?}"),
        }
    }

    /// Decodes `wire` fed in pieces of `step` bytes; returns the body and whether it ended.
    fn decode_in_steps(mut decoder: Decoder, wire: &[u8], step: usize) -> (Vec<u8>, bool) {
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        for piece in wire.chunks(step) {
            buf.extend_from_slice(piece);
            while let Some(data) = decoder.decode(&mut buf).unwrap() {
                body.extend_from_slice(&data);
            }
        }
        (body, decoder.is_done())
    }

    #[test]
    fn request_heads_carry_host_framing_and_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("client.example"));
        headers.insert("content-length", HeaderValue::from_static("5, 5"));
        headers.insert("x-skipped", HeaderValue::from_static("no"));
        headers.insert("x-kept", HeaderValue::from_static("yes"));
        let mut out = Vec::new();
        let host = HeaderValue::from_static("127.0.0.1:9000");
        let call_id = (
            HeaderName::from_static("x-call-id"),
            HeaderValue::from_static("abc"),
        );
        encode_request_head(
            &mut out,
            &Method::POST,
            "/a",
            Some("b=1"),
            &host,
            &headers,
            |n| n == "x-skipped",
            [(&call_id.0, &call_id.1)].into_iter(),
            (RequestFraming::Length(5), true),
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /a?b=1 HTTP/1.1\r\nhost: 127.0.0.1:9000\r\ncontent-length: 5\r\nx-kept: yes\r\nx-call-id: abc\r\n\r\n"
        );
        let mut out = Vec::new();
        encode_request_head(
            &mut out,
            &Method::PUT,
            "/",
            None,
            &host,
            &HeaderMap::new(),
            |_| false,
            std::iter::empty(),
            request_framing(&Method::PUT, None, false, None),
        );
        assert_eq!(
            out,
            b"PUT / HTTP/1.1\r\nhost: 127.0.0.1:9000\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let cases = [
            (
                Method::POST,
                None,
                true,
                Some(0),
                (RequestFraming::Empty, true),
            ),
            (
                Method::GET,
                None,
                true,
                Some(0),
                (RequestFraming::Empty, false),
            ),
            (
                Method::GET,
                Some(0),
                true,
                Some(0),
                (RequestFraming::Empty, true),
            ),
            (
                Method::PUT,
                Some(5),
                false,
                Some(5),
                (RequestFraming::Length(5), true),
            ),
            (
                Method::PUT,
                None,
                false,
                Some(12345),
                (RequestFraming::Length(12345), true),
            ),
            (
                Method::POST,
                None,
                false,
                None,
                (RequestFraming::Chunked, true),
            ),
        ];
        for (method, declared, ended, exact, want) in cases {
            assert_eq!(
                request_framing(&method, declared, ended, exact),
                want,
                "{method} {declared:?}"
            );
        }
        assert_eq!(&chunk_prefix(0x1a2b)[..], b"1a2b\r\n");
        assert_eq!(&chunk_prefix(0)[..], b"0\r\n");
    }

    #[test]
    fn a_head_arriving_in_pieces_parses_once_complete_and_keeps_what_follows() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\nhello";
        for cut in 0..raw.len() - 5 {
            assert!(parse(&raw[..cut], false).unwrap().is_none(), "cut at {cut}");
        }
        let mut buf = BytesMut::from(&raw[..]);
        let Some(Parsed::Final {
            head,
            body,
            keep_alive,
        }) = parse_response(&mut buf, false).unwrap()
        else {
            panic!()
        };
        assert_eq!(head.status(), 200);
        assert_eq!(head.version(), Version::HTTP_11);
        assert_eq!(head.headers().get_all("x-a").iter().count(), 2);
        assert_eq!(body, Decoder::Length(5));
        assert!(keep_alive);
        assert_eq!(&buf[..], b"hello");
    }

    #[test]
    fn framing_follows_rfc_9112() {
        // Transfer-Encoding wins and Content-Length is dropped; with both, the connection is
        // not reused (RFC 9112 §6.3).
        let (head, body, keep) = final_head(
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
        );
        assert_eq!(body, Decoder::Chunked(Chunk::Size));
        assert!(!keep);
        assert!(head.headers().get("content-length").is_none());
        // A final coding other than chunked: to the end of the connection.
        let (_, body, keep) = final_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n");
        assert_eq!((body, keep), (Decoder::Eof, false));
        // Neither header: to the end of the connection.
        let (_, body, keep) = final_head(b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!((body, keep), (Decoder::Eof, false));
        // No body whatever is declared.
        for raw in [
            &b"HTTP/1.1 204 No Content\r\ncontent-length: 10\r\n\r\n"[..],
            b"HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(final_head(raw).1, Decoder::Done);
        }
        let Some(Parsed::Final { body, .. }) =
            parse(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n", true).unwrap()
        else {
            panic!()
        };
        assert_eq!(body, Decoder::Done);
        // Keep-alive rules.
        assert!(
            !final_head(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n").2
        );
        assert!(!final_head(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n").2);
        assert!(
            final_head(b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n").2
        );
        // Identical repeated lengths are one length; different ones are an error.
        assert_eq!(
            final_head(b"HTTP/1.1 200 OK\r\ncontent-length: 4, 4\r\ncontent-length: 4\r\n\r\n").1,
            Decoder::Length(4)
        );
        for bad in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\ncontent-length: 5\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0x10\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: \r\n\r\n",
        ] {
            assert_eq!(parse(bad, false).unwrap_err(), ProtocolError::ContentLength);
        }
    }

    #[test]
    fn interim_responses_are_reported_and_consumed() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..],
        );
        assert!(matches!(
            parse_response(&mut buf, false).unwrap(),
            Some(Parsed::Informational(s)) if s == 100
        ));
        assert!(matches!(
            parse_response(&mut buf, false).unwrap(),
            Some(Parsed::Final {
                body: Decoder::Done,
                ..
            })
        ));
        assert!(buf.is_empty());
        let (_, body, keep) =
            final_head(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n");
        assert_eq!((body, keep), (Decoder::Done, false));
    }

    #[test]
    fn malformed_and_oversize_heads_are_errors() {
        assert!(matches!(
            parse(b"HTTP/1.1 2000 OK\r\n\r\n", false),
            Err(ProtocolError::Head(_))
        ));
        assert!(matches!(
            parse(b"SMTP ready\r\n\r\n", false),
            Err(ProtocolError::Head(_))
        ));
        let mut big = b"HTTP/1.1 200 OK\r\n".to_vec();
        while big.len() < MAX_HEAD_BYTES {
            big.extend_from_slice(b"x-filler: 0123456789012345678901234567890123456789\r\n");
        }
        assert_eq!(parse(&big, false).unwrap_err(), ProtocolError::HeadTooLarge);
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(
            parse(&many, false).unwrap_err(),
            ProtocolError::HeadTooLarge
        );
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_boundaries() {
        let wire = b"5\r\nhello\r\n1;ext=1\r\n \r\nA \r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n";
        for step in 1..=wire.len() {
            let (body, done) = decode_in_steps(Decoder::Chunked(Chunk::Size), wire, step);
            assert_eq!(body, b"hello 0123456789", "step {step}");
            assert!(done, "step {step}");
        }
        // The end is seen together with the last data when it is buffered.
        let mut decoder = Decoder::Chunked(Chunk::Size);
        let mut buf = BytesMut::from(&b"2\r\nok\r\n0\r\n\r\n"[..]);
        assert_eq!(&decoder.decode(&mut buf).unwrap().unwrap()[..], b"ok");
        assert!(decoder.is_done());
        assert!(buf.is_empty());
    }

    #[test]
    fn broken_chunked_framing_is_an_error() {
        for bad in [
            &b"\r\n"[..],
            b"zz\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloXX",
            b"12345678901234567\r\n",
            b"5 x\r\n",
        ] {
            let mut decoder = Decoder::Chunked(Chunk::Size);
            let mut buf = BytesMut::from(bad);
            let result = (|| {
                while decoder.decode(&mut buf)?.is_some() {}
                Ok(())
            })();
            assert_eq!(result, Err(ProtocolError::Chunked), "{bad:?}");
        }
        let mut decoder = Decoder::Chunked(Chunk::Size);
        let mut endless = BytesMut::from(&b"1"[..]);
        endless.extend_from_slice(&[b';'; MAX_CHUNK_LINE]);
        assert_eq!(decoder.decode(&mut endless), Err(ProtocolError::Chunked));
    }

    #[test]
    fn length_and_eof_bodies_end_where_they_should() {
        let (body, done) = decode_in_steps(Decoder::Length(5), b"hello", 2);
        assert_eq!((body.as_slice(), done), (&b"hello"[..], true));
        // Bytes after a delimited body are left in the buffer.
        let mut decoder = Decoder::Length(2);
        let mut buf = BytesMut::from(&b"okEXTRA"[..]);
        assert_eq!(&decoder.decode(&mut buf).unwrap().unwrap()[..], b"ok");
        assert!(decoder.is_done());
        assert_eq!(&buf[..], b"EXTRA");
        // A delimited body cut short is an error; an EOF body ends at EOF.
        let mut cut = Decoder::Length(3);
        assert_eq!(cut.eof(), Err(ProtocolError::Truncated));
        let mut cut = Decoder::Chunked(Chunk::Data(1));
        assert_eq!(cut.eof(), Err(ProtocolError::Truncated));
        let mut eof = Decoder::Eof;
        assert!(eof.eof().is_ok() && eof.is_done());
    }
}
