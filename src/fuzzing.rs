//! Entry points for the fuzz targets in `fuzz/` and for `tests/fuzz_regressions.rs`, which
//! replays every input a target ever crashed on: each function takes arbitrary bytes, runs one
//! parser on them, and panics only when a property of that parser breaks. Not used by the
//! gateway itself.

use bytes::BytesMut;
use http::{header, Method};

use crate::config::{is_valid_function_name, parse_duration, CallbackRules, Config};
use crate::forwarding::{content_length, is_upgrade};
use crate::h1::{self, Decoder, Parsed, ProtocolError};
use crate::http1::{Framing, HeadReader, HeadStep};
use crate::router::{route, Route};
use crate::upstream::{parse_callback_url, CallbackGuard};

/// What one response exchange came to, as a pooled connection would see it.
#[derive(Debug, PartialEq, Eq)]
struct Exchange {
    informational: usize,
    status: Option<u16>,
    body: Vec<u8>,
    error: Option<ProtocolError>,
    keep_alive: bool,
    /// Bytes left after the body ended (a connection with any is never reused).
    leftover: usize,
    done: bool,
}

/// Reads one response from `input` arriving in `pieces` (sizes; the rest in one piece).
fn exchange(input: &[u8], head_request: bool, pieces: &[usize]) -> Exchange {
    let mut out = Exchange {
        informational: 0,
        status: None,
        body: Vec::new(),
        error: None,
        keep_alive: false,
        leftover: 0,
        done: false,
    };
    let mut buf = BytesMut::new();
    let mut decoder: Option<Decoder> = None;
    let mut fed = 0;
    let mut piece = 0;
    loop {
        // Everything the buffer allows, before the next read.
        let step: Result<(), ProtocolError> = (|| {
            for _ in 0..=input.len() + 1 {
                match &mut decoder {
                    None => match h1::parse_response(&mut buf, head_request)? {
                        None => return Ok(()),
                        Some(Parsed::Informational(_)) => out.informational += 1,
                        Some(Parsed::Final {
                            head,
                            body,
                            keep_alive,
                        }) => {
                            out.status = Some(head.status().as_u16());
                            out.keep_alive = keep_alive;
                            decoder = Some(body);
                        }
                    },
                    Some(d) => match d.decode(&mut buf)? {
                        Some(data) => {
                            assert!(!data.is_empty(), "a decoder returned an empty piece");
                            out.body.extend_from_slice(&data);
                        }
                        None => return Ok(()),
                    },
                }
            }
            panic!("no progress on a bounded input");
        })();
        if let Err(e) = step {
            out.error = Some(e);
            return out;
        }
        if fed == input.len() {
            break;
        }
        let n = pieces
            .get(piece)
            .copied()
            .unwrap_or(input.len())
            .clamp(1, input.len() - fed);
        piece += 1;
        buf.extend_from_slice(&input[fed..fed + n]);
        fed += n;
    }
    match &mut decoder {
        Some(d) if d.is_done() => {
            out.done = true;
            out.leftover = buf.len();
        }
        Some(d) => match d.eof() {
            Ok(()) => out.done = true,
            Err(e) => out.error = Some(e),
        },
        None => {}
    }
    out
}

/// The HTTP/1.1 response codec: reading `data[2..]` in one piece and in pieces of
/// `data[1]`-derived sizes gives the same response, body and reuse verdict; a connection is
/// reusable only when the body ended, the response allowed it and nothing followed; a reused
/// connection reads the next response whole. `data[0] & 1`: the request was `HEAD`.
pub fn h1_response(data: &[u8]) {
    let [flags, seed, input @ ..] = data else {
        return;
    };
    let head_request = flags & 1 == 1;
    let whole = exchange(input, head_request, &[]);
    let sizes: Vec<usize> = (0..input.len())
        .map(|i| 1 + (usize::from(*seed) * (i + 7)) % (usize::from(*seed) + 1))
        .collect();
    let split = exchange(input, head_request, &sizes);
    let bytewise = exchange(input, head_request, &vec![1; input.len().min(4096)]);
    assert_eq!(whole, split, "the same bytes read in other pieces");
    if input.len() <= 4096 {
        assert_eq!(whole, bytewise, "the same bytes read one at a time");
    }
    if whole.error.is_none() && whole.done && whole.keep_alive && whole.leftover == 0 {
        let next = exchange(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            false,
            &[],
        );
        assert_eq!((next.status, next.body.as_slice()), (Some(200), &b"ok"[..]));
    }
}

/// One request as the gateway's HTTP/1 connection read it.
#[derive(Debug, PartialEq, Eq)]
struct ReadRequest {
    method: String,
    target: String,
    headers: Vec<(String, Vec<u8>)>,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
    body: Vec<u8>,
}

/// How reading a connection's bytes ended.
#[derive(Debug, PartialEq, Eq)]
enum ConnEnd {
    /// The input ran out (between requests, or inside a head or body).
    MoreNeeded,
    /// The connection starts with HTTP/2's preface: handed to HTTP/2.
    Http2,
    /// A head refused with this status and reason.
    Refused(u16, &'static str),
    /// A body's chunked framing broke.
    BadBody(ProtocolError),
    /// The last request closes the connection (or upgrades it): nothing more is read.
    Closed,
}

/// Reads requests off `input` arriving in `pieces` (sizes; the rest in one piece), the way
/// `http1::serve` does: a head, then its whole body, then the next head while the connection
/// is kept alive.
fn conversation(input: &[u8], max_head: usize, pieces: &[usize]) -> (Vec<ReadRequest>, ConnEnd) {
    let mut reader = HeadReader::new(max_head);
    let mut requests = Vec::new();
    let mut buf = BytesMut::new();
    // The request whose body is being read, and its decoder.
    let mut reading: Option<(ReadRequest, Decoder, bool)> = None;
    let mut fed = 0;
    let mut piece = 0;
    loop {
        // Everything the buffer allows, before the next read.
        for _ in 0..=input.len() + 1 {
            if let Some((request, decoder, goes_on)) = &mut reading {
                match decoder.decode(&mut buf) {
                    Ok(Some(data)) => {
                        assert!(!data.is_empty(), "a decoder returned an empty piece");
                        request.body.extend_from_slice(&data);
                        continue;
                    }
                    Ok(None) if decoder.is_done() => {
                        let goes_on = *goes_on;
                        let (request, _, _) = reading.take().unwrap();
                        if let Framing::Length(n) = request.framing {
                            assert_eq!(request.body.len() as u64, n, "a body of its length");
                        }
                        requests.push(request);
                        if !goes_on {
                            return (requests, ConnEnd::Closed);
                        }
                        continue;
                    }
                    Ok(None) => break,
                    Err(e) => return (requests, ConnEnd::BadBody(e)),
                }
            }
            if buf.is_empty() {
                break;
            }
            match reader.step(&mut buf) {
                HeadStep::More => break,
                HeadStep::Http2 => {
                    assert!(requests.is_empty(), "HTTP/2's preface after a request");
                    return (requests, ConnEnd::Http2);
                }
                HeadStep::Bad(status, why) => {
                    return (requests, ConnEnd::Refused(status.as_u16(), why))
                }
                HeadStep::Head(head) => {
                    let request = &head.request;
                    check_framing(request.headers(), head.body, head.http10);
                    // An upgrade hands the socket over: nothing more is read as HTTP/1.
                    let goes_on =
                        head.keep_alive && (head.http10 || !is_upgrade(request.headers()));
                    let read = ReadRequest {
                        method: request.method().to_string(),
                        target: request.uri().to_string(),
                        headers: request
                            .headers()
                            .iter()
                            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                            .collect(),
                        framing: head.body,
                        keep_alive: head.keep_alive,
                        expect_continue: head.expect_continue,
                        body: Vec::new(),
                    };
                    reading = Some((read, head.body.decoder(), goes_on));
                }
            }
        }
        if fed == input.len() {
            return (requests, ConnEnd::MoreNeeded);
        }
        let n = pieces
            .get(piece)
            .copied()
            .unwrap_or(input.len())
            .clamp(1, input.len() - fed);
        piece += 1;
        buf.extend_from_slice(&input[fed..fed + n]);
        fed += n;
    }
}

/// A head the connection accepted is framed one way only, and the way the rest of the gateway
/// reads its headers (`forwarding::content_length`, which sets the replica's framing) agrees.
fn check_framing(headers: &http::HeaderMap, framing: Framing, http10: bool) {
    let te = headers.contains_key(header::TRANSFER_ENCODING);
    let declared = content_length(headers);
    match framing {
        Framing::Chunked => {
            assert!(
                te && !http10,
                "chunked without Transfer-Encoding, or on HTTP/1.0"
            );
            assert!(
                !headers.contains_key(header::CONTENT_LENGTH),
                "chunked with Content-Length"
            );
        }
        Framing::Length(n) => {
            assert!(!te, "a length with Transfer-Encoding");
            assert_eq!(
                declared,
                Some(n),
                "the length the rest of the gateway reads"
            );
        }
        Framing::Empty => {
            assert!(!te, "no body with Transfer-Encoding");
            let expected = headers.contains_key(header::CONTENT_LENGTH).then_some(0);
            assert_eq!(
                declared, expected,
                "the length the rest of the gateway reads"
            );
        }
    }
}

/// The gateway's HTTP/1 server side: request heads (and the HTTP/2 preface check at the start
/// of a connection), their framing, chunked and delimited bodies, pipelined requests. Reading
/// `data[2..]` in one piece, in pieces of `data[1]`-derived sizes and byte by byte gives the
/// same requests, bodies and end; every accepted head has one framing, the one the rest of the
/// gateway reads from its headers. `data[0]` picks `max_header_bytes` (64 B to 8 KiB).
pub fn h1_request(data: &[u8]) {
    let [flags, seed, input @ ..] = data else {
        return;
    };
    let max_head = 64usize << (flags % 8);
    let whole = conversation(input, max_head, &[]);
    let sizes: Vec<usize> = (0..input.len())
        .map(|i| 1 + (usize::from(*seed) * (i + 7)) % (usize::from(*seed) + 1))
        .collect();
    let split = conversation(input, max_head, &sizes);
    assert_eq!(whole, split, "the same bytes read in other pieces");
    if input.len() <= 4096 {
        let bytewise = conversation(input, max_head, &vec![1; input.len()]);
        assert_eq!(whole, bytewise, "the same bytes read one at a time");
    }
}

/// The router and function-name validation: a routed name is a valid name, the replica's path
/// starts with `/` and is a suffix of the request's path.
pub fn router(data: &[u8]) {
    let [m, rest @ ..] = data else { return };
    let Ok(path) = std::str::from_utf8(rest) else {
        return;
    };
    let method =
        [Method::GET, Method::POST, Method::HEAD, Method::DELETE][usize::from(m & 3)].clone();
    let valid = is_valid_function_name(path);
    assert_eq!(valid, name_rule(path), "{path:?}");
    match route(&method, path) {
        Route::Invoke { name, path: rest } | Route::InvokeAsync { name, path: rest } => {
            assert!(is_valid_function_name(name), "{name:?}");
            assert!(rest.starts_with('/') && path.ends_with(rest) || rest == "/");
        }
        Route::GetFunction(name) | Route::ScaleFunction(name) => {
            assert!(path.ends_with(name));
        }
        _ => {}
    }
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters, written out once more.
fn name_rule(s: &str) -> bool {
    let b = s.as_bytes();
    let inner = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= 63
        && inner(&b[0])
        && inner(&b[b.len() - 1])
        && b.iter().all(|c| inner(c) || *c == b'-')
}

/// Config text → validated config or an error, never a panic; a valid config describes itself.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::parse(std::path::Path::new("fuzz.toml"), text, None) {
        let _ = config.describe();
    }
}

/// The async store's record decoding: any bytes decode or fail cleanly; what decodes encodes
/// back to a record that decodes to the same encoding.
pub fn store_record(data: &[u8]) {
    crate::queue::check_record_round_trip(data);
}

/// `X-Callback-Url` and duration parsing, and the callback checks that need no resolution.
pub fn callback_url_and_duration(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_duration(text);
    if let Ok(uri) = parse_callback_url(text) {
        let guard = CallbackGuard::new(CallbackRules::default(), None);
        if let Ok((host, port, _)) = guard.check_uri(&uri) {
            assert!(!host.is_empty());
            if let Ok(ip) = host.parse() {
                let _ = guard.check_addr(std::net::SocketAddr::new(ip, port), false);
            }
        }
    }
}
