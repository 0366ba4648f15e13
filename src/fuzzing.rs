//! Entry points for the fuzz targets in `fuzz/` and for `tests/fuzz_regressions.rs`, which
//! replays every input a target ever crashed on: each function takes arbitrary bytes, runs one
//! parser on them, and panics only when a property of that parser breaks. Not used by the
//! gateway itself.

use bytes::BytesMut;
use http::Method;

use crate::config::{is_valid_function_name, parse_duration, CallbackRules, Config};
use crate::h1::{self, Decoder, Parsed, ProtocolError};
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
