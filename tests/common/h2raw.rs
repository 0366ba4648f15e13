//! HTTP/2 by hand: frames, a little HPACK, and a task that reads what a server sends back.
//! For tests that must send what a well-behaved client library refuses to (floods, resets,
//! connection-specific headers, lengths that disagree with DATA frames).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const CONTINUATION: u8 = 0x9;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;

pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK string literal, not Huffman-coded (7-bit prefix length).
pub fn hpack_string(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0x00, 7, s.len());
    out.extend_from_slice(s);
}

pub fn hpack_int(out: &mut Vec<u8>, first: u8, prefix: u32, mut n: usize) {
    let max = (1usize << prefix) - 1;
    if n < max {
        out.push(first | n as u8);
        return;
    }
    out.push(first | max as u8);
    n -= max;
    while n >= 128 {
        out.push((n % 128 + 128) as u8);
        n /= 128;
    }
    out.push(n as u8);
}

/// The header block of `GET path` (static table: `:method GET`, `:scheme http`; `:path` and
/// `:authority` literal with an indexed name, not indexed).
pub fn get_block(path: &str) -> Vec<u8> {
    let mut out = vec![0x82, 0x86];
    out.push(0x04);
    hpack_string(&mut out, path.as_bytes());
    out.push(0x01);
    hpack_string(&mut out, b"localhost");
    out
}

/// A request's header block: the pseudo-headers, then `fields` as literals (not indexed, not
/// Huffman-coded: sent exactly as given, whatever they hold).
pub fn request_block(method: &str, path: &str, fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    literal(&mut out, b":method", method.as_bytes());
    out.push(0x86);
    literal(&mut out, b":path", path.as_bytes());
    literal(&mut out, b":authority", b"localhost");
    for (name, value) in fields {
        literal(&mut out, name.as_bytes(), value.as_bytes());
    }
    out
}

/// The `:status` at the start of a response header block (the first field, as servers send
/// it): an indexed static entry, or a literal with the `:status` name whose value is plain or
/// Huffman-coded digits. 0 when it is neither.
pub fn status(payload: &[u8], flags: u8) -> u16 {
    const PADDED: u8 = 0x8;
    const PRIORITY: u8 = 0x20;
    let mut p = payload;
    if flags & PADDED != 0 {
        let Some((&pad, rest)) = p.split_first() else {
            return 0;
        };
        p = &rest[..rest.len().saturating_sub(pad as usize)];
    }
    if flags & PRIORITY != 0 {
        p = p.get(5..).unwrap_or(&[]);
    }
    let Some((&first, rest)) = p.split_first() else {
        return 0;
    };
    const STATIC: [u16; 7] = [200, 204, 206, 304, 400, 404, 500];
    if first & 0x80 != 0 {
        let i = usize::from(first & 0x7f);
        return if (8..=14).contains(&i) {
            STATIC[i - 8]
        } else {
            0
        };
    }
    let name = if first & 0xc0 == 0x40 {
        first & 0x3f
    } else {
        first & 0x0f
    };
    if !(8..=14).contains(&name) {
        return 0;
    }
    let Some((&len, value)) = rest.split_first() else {
        return 0;
    };
    let n = usize::from(len & 0x7f);
    let Some(value) = value.get(..n) else {
        return 0;
    };
    let digits = if len & 0x80 != 0 {
        huffman_digits(value)
    } else {
        std::str::from_utf8(value).ok().map(str::to_owned)
    };
    digits.and_then(|d| d.parse().ok()).unwrap_or(0)
}

/// Decodes a Huffman-coded string of decimal digits (RFC 7541 Appendix B), `None` if it holds
/// anything else.
fn huffman_digits(bytes: &[u8]) -> Option<String> {
    // Codes of '0'..='9': five bits for 0-2, six for 3-9.
    const CODES: [(u32, u32); 10] = [
        (0b00000, 5),
        (0b00001, 5),
        (0b00010, 5),
        (0b011001, 6),
        (0b011010, 6),
        (0b011011, 6),
        (0b011100, 6),
        (0b011101, 6),
        (0b011110, 6),
        (0b011111, 6),
    ];
    let bits: Vec<u32> = bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| u32::from(b >> i & 1)))
        .collect();
    let mut out = String::new();
    let mut at = 0;
    'next: while at < bits.len() {
        for (digit, (code, len)) in CODES.iter().enumerate() {
            let len = *len as usize;
            if at + len <= bits.len()
                && bits[at..at + len].iter().fold(0, |n, b| n << 1 | b) == *code
            {
                out.push(char::from(b'0' + digit as u8));
                at += len;
                continue 'next;
            }
        }
        // The rest must be padding: fewer than eight bits, all ones.
        return (bits.len() - at < 8 && bits[at..].iter().all(|b| *b == 1)).then_some(out);
    }
    Some(out)
}

/// A literal header field `name: value`, new name, not indexed.
pub fn literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    hpack_string(out, name);
    hpack_string(out, value);
}

/// What the gateway sent on an abusive connection, as read by a task that reads it to the end.
#[derive(Default)]
pub struct Seen {
    pub goaway: Mutex<Option<u32>>,
    /// RST_STREAM frames received, by error code.
    pub resets: Mutex<Vec<(u32, u32)>>,
    /// Response heads: stream and `:status` (0 when it could not be read).
    pub heads: Mutex<Vec<(u32, u16)>>,
    /// Streams the server ended (END_STREAM).
    pub ended_streams: Mutex<Vec<u32>>,
    /// DATA received, by stream.
    pub data: Mutex<Vec<(u32, Vec<u8>)>>,
    pub closed: AtomicBool,
    pub bytes: AtomicU64,
}

impl Seen {
    pub fn ended(&self) -> bool {
        self.closed.load(Ordering::SeqCst) || self.goaway.lock().unwrap().is_some()
    }
    pub fn resets_with(&self, code: u32) -> usize {
        let resets = self.resets.lock().unwrap();
        resets.iter().filter(|(_, c)| *c == code).count()
    }
}

pub async fn read_frames(mut read: OwnedReadHalf, seen: Arc<Seen>) {
    let mut head = [0u8; 9];
    loop {
        if read.read_exact(&mut head).await.is_err() {
            break;
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        if read.read_exact(&mut payload).await.is_err() {
            break;
        }
        seen.bytes.fetch_add(9 + len as u64, Ordering::SeqCst);
        match head[3] {
            GOAWAY if len >= 8 => {
                let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                *seen.goaway.lock().unwrap() = Some(code);
            }
            RST_STREAM if len == 4 => {
                let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
                seen.resets.lock().unwrap().push((stream, code));
            }
            HEADERS => seen
                .heads
                .lock()
                .unwrap()
                .push((stream, status(&payload, head[4]))),
            DATA => seen.data.lock().unwrap().push((stream, payload)),
            _ => {}
        }
        if matches!(head[3], HEADERS | DATA) && head[4] & END_STREAM != 0 {
            seen.ended_streams.lock().unwrap().push(stream);
        }
    }
    seen.closed.store(true, Ordering::SeqCst);
}

/// An h2c connection past its preface and SETTINGS (the gateway's SETTINGS acknowledged), with
/// a task reading what comes back.
pub async fn connect(gw: SocketAddr) -> (OwnedWriteHalf, Arc<Seen>) {
    let sock = TcpStream::connect(gw).await.unwrap();
    sock.set_nodelay(true).unwrap();
    let (read, mut write) = sock.into_split();
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    hello.extend(frame(SETTINGS, 0x1, 0, &[]));
    write.write_all(&hello).await.unwrap();
    let seen = Arc::new(Seen::default());
    tokio::spawn(read_frames(read, seen.clone()));
    (write, seen)
}
