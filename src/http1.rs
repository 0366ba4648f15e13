//! The gateway's own HTTP/1.1 server connection: request heads parsed with `httparse`, bodies fed
//! to the request as it reads them, responses written straight to the socket.
//!
//! Why not hyper's: a connection holding a request for a function at zero (or simply idle between
//! requests) should cost what it has to, and hyper's keeps an 8 KiB write buffer from the start
//! and a read buffer of 8 KiB or more per read, neither configurable: ~24 KB of each held
//! connection's ~31 KB (loadtests/held.py). Here a connection between requests holds no buffer at
//! all; a held request keeps its head (the bytes it arrived in, at least 1 KiB) and nothing else.
//!
//! One task per connection, one request at a time (pipelined requests wait in the read buffer).
//! While a request is in flight the task does two things at once on the same socket: it reads
//! the request's body when the body asks for more (see `incoming`), and it writes the response
//! once there is one. A request without a body (or whose body has been read) has its socket
//! watched for the client going away, which cancels the request (as hyper's default did).
//!
//! Framing rules (RFC 9112), strict where ambiguity could desynchronise the gateway and a replica
//! (tests/smuggling.rs): `Transfer-Encoding` must end in `chunked` and may not come with
//! `Content-Length` or on HTTP/1.0; every `Content-Length` must be the same plain number;
//! `httparse` refuses obs-fold, whitespace before a colon and control characters.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use tokio::net::TcpStream;
use tracing::debug;

use crate::body::ResponseBody;
use crate::conn::{ConnState, RequestGuard, GRACEFUL};
use crate::forwarding::{is_upgrade, Peer};
use crate::gateway::Gateway;
use crate::h1::Decoder;
use crate::incoming::{
    body_channel, on_upgrade, BodySender, Demand, Incoming, UpgradeSender, Upgraded,
};

/// Most headers in a request head.
const MAX_HEADERS: usize = 100;
/// The first read buffer: most request heads fit (curl's and load generators' are ~100 bytes,
/// browsers' up to ~2 KiB); it doubles up to `max_header_bytes`.
const FIRST_READ: usize = 1024;
/// Reads of a request body.
const BODY_READ: usize = 16 * 1024;
/// While a request is in flight, at most this much of what follows it (pipelined requests) is
/// read ahead; beyond it the socket is not read until the response is done.
const READ_AHEAD: usize = 16 * 1024;
/// Response bytes gathered before a write (small bodies go out with their head in one write).
const WRITE_GATHER: usize = 16 * 1024;
/// After a response to a request whose body was not read, at most this much more is read and
/// dropped (for at most [`LINGER_TIME`]) before closing, so that the client reads the response
/// rather than a reset.
const LINGER_BYTES: usize = 1024 * 1024;
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// The start of HTTP/2's client connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How an HTTP/1 connection ended.
pub enum Ended {
    /// Closed (by either side, or after an answer that closes it).
    Closed,
    /// The client sent HTTP/2's preface: serve the socket as h2c, starting with these bytes.
    Http2(TcpStream, Bytes),
}

/// Serves HTTP/1.1 on `stream` until it closes, or hands it back when it turns out to be h2c.
pub async fn serve(
    stream: TcpStream,
    state: &Arc<ConnState>,
    gateway: &Arc<Gateway>,
    peer: &Peer,
) -> Ended {
    let mut reader = HeadReader::new(gateway.config.max_header_bytes);
    let mut buf = BytesMut::new();
    loop {
        let head = poll_fn(|cx| poll_head(cx, &stream, &mut buf, state, &mut reader)).await;
        let head = match head {
            HeadRead::Head(head) => head,
            HeadRead::Closed => return Ended::Closed,
            HeadRead::Http2 => return Ended::Http2(stream, buf.freeze()),
            HeadRead::Bad(status, why) => {
                debug!(peer = %state.peer(), %status, why, "refused a malformed request head");
                let _ = write_all(&stream, &refusal(status, why)).await;
                linger(&stream, &mut buf).await;
                return Ended::Closed;
            }
        };
        match exchange(&stream, &mut buf, state, gateway, peer, head).await {
            Next::KeepAlive if state.signal() < GRACEFUL => {}
            Next::KeepAlive | Next::Close => return Ended::Closed,
            Next::Linger => {
                linger(&stream, &mut buf).await;
                return Ended::Closed;
            }
            Next::Upgrade(tx) => {
                // The socket moves to the tunnel, with what the client sent after its head.
                let _ = tx.send(Upgraded::new(stream, buf.split().freeze()));
                return Ended::Closed;
            }
        }
        // Nothing left over: hold no buffer while the connection is idle.
        if buf.is_empty() {
            buf = BytesMut::new();
        }
    }
}

/// A parsed request head and what the connection needs to know about it.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) request: Request<()>,
    pub(crate) body: Framing,
    pub(crate) keep_alive: bool,
    pub(crate) expect_continue: bool,
    pub(crate) http10: bool,
}

/// How a request's body is framed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Framing {
    Empty,
    Length(u64),
    Chunked,
}

impl Framing {
    /// The decoder that reads a body so framed out of the connection's buffer.
    pub(crate) fn decoder(self) -> Decoder {
        match self {
            Framing::Empty => Decoder::Done,
            Framing::Length(n) => Decoder::Length(n),
            Framing::Chunked => Decoder::Chunked(crate::h1::Chunk::Size),
        }
    }
}

enum HeadRead {
    Head(Box<Head>),
    Closed,
    Http2,
    Bad(StatusCode, &'static str),
}

/// What the bytes buffered so far come to.
#[derive(Debug)]
pub(crate) enum HeadStep {
    /// Not a complete head yet: read more.
    More,
    /// A request head (consumed from the buffer).
    Head(Box<Head>),
    /// The connection starts with HTTP/2's preface (nothing consumed).
    Http2,
    /// A head the gateway refuses: the status and a one-line reason.
    Bad(StatusCode, &'static str),
}

/// Reads request heads off a connection's buffer: HTTP/2's preface at the very start of the
/// connection, then one head at a time. No I/O: the connection reads, this decides, so the fuzz
/// target (`fuzzing::h1_request`) drives the same decisions with every split of its input.
#[derive(Debug)]
pub(crate) struct HeadReader {
    /// Still at the start of the connection, where HTTP/2's preface may come.
    first: bool,
    max_head: usize,
}

impl HeadReader {
    /// A reader for a new connection; heads longer than `max_head` bytes are refused (431).
    pub(crate) fn new(max_head: usize) -> HeadReader {
        HeadReader {
            first: true,
            max_head,
        }
    }

    /// Looks at what is buffered (not empty). The verdict does not depend on how the bytes
    /// were split into reads.
    pub(crate) fn step(&mut self, buf: &mut BytesMut) -> HeadStep {
        if self.first {
            let n = buf.len().min(H2_PREFACE.len());
            // At least "PRI": a first read of "P" could as well be "PUT" or "POST".
            if n >= 3 && buf[..n] == H2_PREFACE[..n] {
                if n == H2_PREFACE.len() {
                    return HeadStep::Http2;
                }
                return HeadStep::More;
            } else if n >= 3 || !H2_PREFACE.starts_with(&buf[..n]) {
                self.first = false;
            } else {
                return HeadStep::More;
            }
        }
        match parse_head(buf, self.max_head) {
            Ok(Some(head)) => HeadStep::Head(Box::new(head)),
            Ok(None) if buf.len() >= self.max_head => HeadStep::Bad(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request head larger than max_header_bytes",
            ),
            Ok(None) => HeadStep::More,
            Err((status, why)) => HeadStep::Bad(status, why),
        }
    }
}

/// Reads until a complete request head is in `buf` and parses it.
fn poll_head(
    cx: &mut Context<'_>,
    stream: &TcpStream,
    buf: &mut BytesMut,
    state: &ConnState,
    reader: &mut HeadReader,
) -> Poll<HeadRead> {
    loop {
        if !buf.is_empty() {
            match reader.step(buf) {
                HeadStep::More => {}
                HeadStep::Head(head) => return Poll::Ready(HeadRead::Head(head)),
                HeadStep::Http2 => {
                    state.set_multiplexed();
                    return Poll::Ready(HeadRead::Http2);
                }
                HeadStep::Bad(status, why) => return Poll::Ready(HeadRead::Bad(status, why)),
            }
        } else if state.signal() >= GRACEFUL {
            return Poll::Ready(HeadRead::Closed);
        }
        if ready!(stream.poll_read_ready(cx)).is_err() {
            return Poll::Ready(HeadRead::Closed);
        }
        if buf.capacity() == buf.len() {
            let grow = buf.capacity().clamp(FIRST_READ, reader.max_head);
            buf.reserve(grow);
        }
        match stream.try_read_buf(buf) {
            Ok(0) => return Poll::Ready(HeadRead::Closed),
            Ok(_) => state.on_read(),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Poll::Ready(HeadRead::Closed),
        }
    }
}

type Refused = (StatusCode, &'static str);

fn bad(why: &'static str) -> Refused {
    (StatusCode::BAD_REQUEST, why)
}

/// Parses the request head at the front of `buf`, consuming it. `Ok(None)`: more bytes needed.
fn parse_head(buf: &mut BytesMut, max_head: usize) -> Result<Option<Head>, Refused> {
    // Uninitialised slots: zeroing 100 of them would cost more than parsing a typical head.
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    // Only the first `max_head` bytes can hold a head: the verdict on a longer one (431) must not
    // depend on whether the bytes past the limit came in the same read (they could be malformed).
    let len = match parsed.parse_with_uninit_headers(&buf[..buf.len().min(max_head)], &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err((
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "more than 100 request headers",
            ))
        }
        Err(e) => return Err(bad(head_error(e))),
    };
    let base = buf.as_ptr() as usize;
    let offset = |s: &[u8]| s.as_ptr() as usize - base;
    let method = Method::from_bytes(parsed.method.unwrap_or("").as_bytes())
        .map_err(|_| bad("invalid request method"))?;
    let path = parsed.path.unwrap_or("");
    let path_at = (offset(path.as_bytes()), path.len());
    let http10 = parsed.version == Some(0);
    let count = parsed.headers.len();
    // Positions only: the head moves into a `Bytes` that the values are slices of.
    let spans: Vec<(usize, usize, usize, usize)> = parsed
        .headers
        .iter()
        .map(|h| {
            (
                offset(h.name.as_bytes()),
                h.name.len(),
                offset(h.value),
                h.value.len(),
            )
        })
        .collect();
    let head = buf.split_to(len).freeze();

    let uri = Uri::from_maybe_shared(head.slice(path_at.0..path_at.0 + path_at.1))
        .map_err(|_| bad("invalid request target"))?;
    let mut headers = HeaderMap::with_capacity(count);
    let mut te_chunked: Option<bool> = None;
    let mut length: Option<u64> = None;
    let mut close = false;
    let mut keep_alive = false;
    let mut expect_continue = false;
    for &(name_at, name_len, value_at, value_len) in &spans {
        let name = HeaderName::from_bytes(&head[name_at..name_at + name_len])
            .map_err(|_| bad("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(value_at..value_at + value_len))
            .map_err(|_| bad("invalid header value"))?;
        if name == header::TRANSFER_ENCODING {
            if http10 {
                return Err(bad("Transfer-Encoding in an HTTP/1.0 request"));
            }
            // Codings accumulate across headers; `chunked` must be the last one, once. A header
            // that names no coding is malformed (RFC 9112 §6.1: at least one).
            if value
                .as_bytes()
                .split(|&b| b == b',')
                .all(|c| c.trim_ascii().is_empty())
            {
                return Err(bad("Transfer-Encoding names no coding"));
            }
            for coding in value.as_bytes().split(|&b| b == b',') {
                let coding = coding.trim_ascii();
                if coding.is_empty() {
                    continue;
                }
                if te_chunked == Some(true) {
                    return Err(bad("Transfer-Encoding has a coding after chunked"));
                }
                te_chunked = Some(coding.eq_ignore_ascii_case(b"chunked"));
            }
        } else if name == header::CONTENT_LENGTH {
            let n = parse_length(value.as_bytes()).ok_or(bad("invalid Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(bad("conflicting Content-Length headers"));
            }
            length = Some(n);
        } else if name == header::CONNECTION {
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name == header::EXPECT {
            expect_continue = value.as_bytes().eq_ignore_ascii_case(b"100-continue");
        }
        headers.append(name, value);
    }
    let body = match (te_chunked, length) {
        (Some(_), Some(_)) => return Err(bad("both Transfer-Encoding and Content-Length")),
        (Some(true), None) => Framing::Chunked,
        (Some(false), None) => return Err(bad("Transfer-Encoding does not end with chunked")),
        (None, Some(0) | None) => Framing::Empty,
        (None, Some(n)) => Framing::Length(n),
    };
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = if http10 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    *request.headers_mut() = headers;
    Ok(Some(Head {
        request,
        body,
        keep_alive: if http10 { keep_alive && !close } else { !close },
        expect_continue: expect_continue && !http10 && body != Framing::Empty,
        http10,
    }))
}

fn head_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "malformed request head: invalid header name",
        httparse::Error::HeaderValue => "malformed request head: invalid header value",
        httparse::Error::NewLine => "malformed request head: invalid line ending",
        httparse::Error::Status | httparse::Error::Token => {
            "malformed request head: invalid request line"
        }
        httparse::Error::Version => "malformed request head: not HTTP/1.0 or HTTP/1.1",
        httparse::Error::TooManyHeaders => "more than 100 request headers",
    }
}

/// `Content-Length`: one plain decimal number (leading zeros allowed) that fits in 64 bits.
fn parse_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit()
            .then_some(())
            .and_then(|()| n.checked_mul(10)?.checked_add(u64::from(b - b'0')))
    })
}

/// What the connection does after an exchange.
enum Next {
    KeepAlive,
    Close,
    /// Close, after reading (and dropping) what the client may still be sending.
    Linger,
    Upgrade(UpgradeSender),
}

/// One request: handed to the gateway, its body fed as it is read, its response written.
async fn exchange(
    stream: &TcpStream,
    buf: &mut BytesMut,
    state: &Arc<ConnState>,
    gateway: &Arc<Gateway>,
    peer: &Peer,
    head: Box<Head>,
) -> Next {
    let Head {
        request,
        body: framing,
        keep_alive,
        expect_continue,
        http10,
    } = *head;
    let (parts, ()) = request.into_parts();
    let head_method = parts.method == Method::HEAD;
    let upgrade = !http10 && is_upgrade(&parts.headers);
    let (sender, body) = match framing {
        Framing::Empty => (None, Incoming::Empty),
        Framing::Length(n) => {
            let (tx, body) = body_channel(Some(n));
            (Some(tx), body)
        }
        Framing::Chunked => {
            let (tx, body) = body_channel(None);
            (Some(tx), body)
        }
    };
    let mut request = Request::from_parts(parts, body);
    let upgrade_tx = upgrade.then(|| {
        let (tx, rx) = on_upgrade();
        request.extensions_mut().insert(rx);
        tx
    });
    let decoder = framing.decoder();

    let guard = RequestGuard::new(state.clone());
    let serving = gateway.serve(request, peer, guard);
    // 1: a `100 Continue` is owed when the body is first read; 2: sent, or no longer owed.
    let continued = AtomicU8::new(if expect_continue { 1 } else { 2 });
    let body_done = AtomicBool::new(sender.is_none());
    let mut reading = pin!(read_side(
        stream, buf, sender, decoder, &continued, &body_done
    ));
    let mut answer = pin!(async {
        let Ok(resp) = serving.await;
        // The answer came first: the client is not owed a `100 Continue` any more.
        continued.store(2, Relaxed);
        // A response that starts before the request's body was read to its end says
        // `Connection: close`: the rest of the body cannot be told from a next request, so the
        // connection closes after it (and the client must not send another on it).
        let keep_alive = keep_alive && body_done.load(Relaxed);
        write_response(stream, resp, head_method, http10, keep_alive).await
    });
    let mut broken = false;
    let written = poll_fn(|cx| {
        if let Poll::Ready(written) = answer.as_mut().poll(cx) {
            return Poll::Ready(Some(written));
        }
        if !broken {
            match reading.as_mut().poll(cx) {
                // Nobody to answer: the request is cancelled (its future dropped).
                Poll::Ready(ReadEnd::ClientGone) => return Poll::Ready(None),
                Poll::Ready(ReadEnd::Broken | ReadEnd::Done) => broken = true,
                Poll::Pending => {}
            }
        }
        Poll::Pending
    })
    .await;
    match written {
        None | Some(Err(_)) => Next::Close,
        Some(Ok(Written::Upgraded)) => match upgrade_tx {
            Some(tx) => Next::Upgrade(tx),
            None => Next::Close,
        },
        // The body was read to its end (or there was none): the connection is reusable.
        Some(Ok(Written::Done { keep_alive })) if body_done.load(Relaxed) && !broken => {
            if keep_alive {
                Next::KeepAlive
            } else {
                Next::Close
            }
        }
        // Answered before the body was read (a refusal, say), or the body broke: its rest
        // cannot be told from a next request.
        Some(Ok(Written::Done { .. })) => Next::Linger,
    }
}

/// How the reading side of an exchange ended, when it ends before the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadEnd {
    /// The body has been read to its end (internal: the side goes on watching the socket).
    Done,
    /// The body's framing broke, reading failed, or nobody reads the body any more: the
    /// connection cannot be reused.
    Broken,
    /// The client closed the connection.
    ClientGone,
}

/// The reading side of an exchange: the body, piece by piece as it is asked for (`body_done`
/// set at its end); then the socket watched for the client going away, reading ahead at most
/// [`READ_AHEAD`] bytes of a pipelined next request. Resolves only when something broke.
async fn read_side(
    stream: &TcpStream,
    buf: &mut BytesMut,
    sender: Option<BodySender>,
    mut decoder: Decoder,
    continued: &AtomicU8,
    body_done: &AtomicBool,
) -> ReadEnd {
    if let Some(sender) = sender {
        let end = poll_fn(|cx| poll_body(cx, stream, buf, &sender, &mut decoder, continued)).await;
        if end != ReadEnd::Done {
            return end;
        }
        body_done.store(true, Relaxed);
    }
    poll_fn(|cx| poll_watch(cx, stream, buf)).await
}

/// Watches an in-flight request's socket for the client going away.
fn poll_watch(cx: &mut Context<'_>, stream: &TcpStream, buf: &mut BytesMut) -> Poll<ReadEnd> {
    loop {
        if buf.len() >= READ_AHEAD {
            // Enough of the next request; the answer's end wakes the task.
            return Poll::Pending;
        }
        if ready!(stream.poll_read_ready(cx)).is_err() {
            return Poll::Ready(ReadEnd::ClientGone);
        }
        if buf.capacity() == buf.len() {
            buf.reserve(FIRST_READ);
        }
        match stream.try_read_buf(buf) {
            Ok(0) => return Poll::Ready(ReadEnd::ClientGone),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Poll::Ready(ReadEnd::ClientGone),
        }
    }
}

/// Feeds the body: reads only when the body asks for more.
fn poll_body(
    cx: &mut Context<'_>,
    stream: &TcpStream,
    buf: &mut BytesMut,
    sender: &BodySender,
    decoder: &mut Decoder,
    continued: &AtomicU8,
) -> Poll<ReadEnd> {
    loop {
        match sender.poll_demand(cx) {
            Demand::Gone => return Poll::Ready(ReadEnd::Broken),
            Demand::Nothing => return Poll::Pending,
            Demand::More => {}
        }
        if continued.load(Relaxed) == 1 {
            continued.store(2, Relaxed);
            // 25 bytes on a socket nothing has been written to yet: the send buffer takes them.
            const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
            if !matches!(stream.try_write(CONTINUE), Ok(n) if n == CONTINUE.len()) {
                sender.failed(io::ErrorKind::WriteZero);
                return Poll::Ready(ReadEnd::Broken);
            }
        }
        match decoder.decode(buf) {
            Ok(Some(data)) => {
                sender.send(data);
                if decoder.is_done() {
                    // The last piece: the body has ended now, not when (or if) its reader asks
                    // once more (a reader that knows the length never does).
                    sender.finish();
                    return Poll::Ready(ReadEnd::Done);
                }
                continue;
            }
            Ok(None) if decoder.is_done() => {
                sender.finish();
                return Poll::Ready(ReadEnd::Done);
            }
            Ok(None) => {}
            Err(_) => {
                sender.malformed();
                return Poll::Ready(ReadEnd::Broken);
            }
        }
        if let Err(e) = ready!(stream.poll_read_ready(cx)) {
            sender.failed(e.kind());
            return Poll::Ready(ReadEnd::Broken);
        }
        if buf.capacity() - buf.len() < BODY_READ / 4 {
            buf.reserve(BODY_READ);
        }
        match stream.try_read_buf(buf) {
            Ok(0) => {
                sender.closed();
                return Poll::Ready(ReadEnd::ClientGone);
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                sender.failed(e.kind());
                return Poll::Ready(ReadEnd::Broken);
            }
        }
    }
}

/// How writing a response ended.
enum Written {
    /// The whole response went out; whether the connection may carry another request.
    Done { keep_alive: bool },
    /// A `101` went out: the connection now belongs to the upgrade.
    Upgraded,
}

/// Writes `resp`: its head (framing chosen here), then its body as it comes.
async fn write_response(
    stream: &TcpStream,
    resp: Response<ResponseBody>,
    head_method: bool,
    http10: bool,
    mut keep_alive: bool,
) -> io::Result<Written> {
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    let informational = status.is_informational();
    let bodiless = head_method
        || informational
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let mut out: Vec<u8> = Vec::with_capacity(256);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let upgrading = status == StatusCode::SWITCHING_PROTOCOLS;
    let mut declared: Option<u64> = None;
    let mut has_date = false;
    for (name, value) in &parts.headers {
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        if name == header::CONTENT_LENGTH {
            match parse_length(value.as_bytes()) {
                Some(n) if declared.is_none() => declared = Some(n),
                _ => continue,
            }
        } else if name == header::CONNECTION {
            if value
                .as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
            {
                keep_alive = false;
            }
            // Written below, except an upgrade's (`Connection: upgrade`).
            if !upgrading {
                continue;
            }
        } else if name == header::DATE {
            has_date = true;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !has_date {
        out.extend_from_slice(b"date: ");
        date::append(&mut out);
        out.extend_from_slice(b"\r\n");
    }
    if upgrading {
        out.extend_from_slice(b"\r\n");
        write_all(stream, &out).await?;
        return Ok(Written::Upgraded);
    }
    // How the body is framed: its declared or exact length, else chunked (HTTP/1.1) or until
    // the connection closes (HTTP/1.0).
    let mut left: Option<u64> = None;
    let mut chunked = false;
    if !bodiless {
        if let Some(n) = declared {
            left = Some(n);
        } else if let Some(n) = body.size_hint().exact() {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa(n, &mut [0; 20]));
            out.extend_from_slice(b"\r\n");
            left = Some(n);
        } else if http10 {
            keep_alive = false;
        } else {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            chunked = true;
        }
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");

    if bodiless {
        write_all(stream, &out).await?;
        return Ok(Written::Done { keep_alive });
    }
    loop {
        // Gather what the body has ready; write when it has nothing more for now.
        let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                if !out.is_empty() {
                    write_all(stream, &out).await?;
                    out.clear();
                }
                poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
            }
        };
        let data = match frame {
            None => break,
            Some(Err(e)) => {
                // The replica's body failed: end the response early (the client sees it cut
                // short: a missing last chunk or fewer bytes than declared) and close.
                debug!(error = %e, "response body failed; closing the client connection");
                if !out.is_empty() {
                    write_all(stream, &out).await?;
                }
                return Ok(Written::Done { keep_alive: false });
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue, // trailers: not passed on
            },
        };
        if data.is_empty() {
            continue;
        }
        let data = match &mut left {
            Some(left) => {
                // Never more than declared: what follows would be read as another response.
                let n = (*left).min(data.len() as u64) as usize;
                *left -= n as u64;
                if n < data.len() {
                    keep_alive = false;
                }
                data.slice(..n)
            }
            None => data,
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            out.extend_from_slice(&crate::h1::chunk_prefix(data.len()));
        }
        if out.len() + data.len() <= WRITE_GATHER {
            out.extend_from_slice(&data);
        } else {
            write_all(stream, &out).await?;
            out.clear();
            write_all(stream, &data).await?;
        }
        if chunked {
            out.extend_from_slice(b"\r\n");
        }
        if out.len() >= WRITE_GATHER {
            write_all(stream, &out).await?;
            out.clear();
        }
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    if !out.is_empty() {
        write_all(stream, &out).await?;
    }
    if left.is_some_and(|l| l > 0) {
        // Fewer bytes than declared: the client will notice; the connection cannot go on.
        keep_alive = false;
    }
    Ok(Written::Done { keep_alive })
}

/// Writes all of `data`.
async fn write_all(stream: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        stream.writable().await?;
        match stream.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// After an answer that closes the connection while the client may still be sending: shut our
/// side, then read and drop what comes (bounded) so that the close is not a reset that could
/// destroy the answer before the client reads it.
async fn linger(stream: &TcpStream, buf: &mut BytesMut) {
    let _ = socket2_shutdown(stream);
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let mut drained = 0;
    buf.clear();
    let _ = tokio::time::timeout_at(deadline, async {
        while drained < LINGER_BYTES {
            if stream.readable().await.is_err() {
                return;
            }
            if buf.capacity() < 4096 {
                buf.reserve(4096);
            }
            match stream.try_read_buf(buf) {
                Ok(0) => return,
                Ok(n) => {
                    drained += n;
                    buf.clear();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    })
    .await;
}

/// Shuts the write side of the socket (FIN after what was written).
fn socket2_shutdown(stream: &TcpStream) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: shutdown(2) on a socket this task owns; no memory is passed.
    let rc = unsafe { libc::shutdown(stream.as_raw_fd(), libc::SHUT_WR) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The gateway's answer to a request head it could not read: the status, a one-line reason, and
/// the connection closed.
fn refusal(status: StatusCode, why: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(160 + why.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\nx-sluicegate-reason: ");
    out.extend_from_slice(if status == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE {
        b"request_head_too_large".as_slice()
    } else {
        b"malformed_request".as_slice()
    });
    out.extend_from_slice(b"\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: ");
    out.extend_from_slice(itoa(why.len() as u64 + 1, &mut [0; 20]));
    out.extend_from_slice(b"\r\nconnection: close\r\ndate: ");
    date::append(&mut out);
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(why.as_bytes());
    out.push(b'\n');
    out
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

/// The `Date` header, formatted once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHE: RefCell<(u64, [u8; 29])> = const { RefCell::new((0, [0; 29])) };
    }

    /// Appends the current time as an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
    pub fn append(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHE.with(|cache| {
            let mut cache = cache.borrow_mut();
            if cache.0 != secs {
                let text = httpdate::fmt_http_date(now);
                if text.len() == 29 {
                    cache.1.copy_from_slice(text.as_bytes());
                    cache.0 = secs;
                }
            }
            out.extend_from_slice(&cache.1);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<Head>, Refused> {
        let mut buf = BytesMut::from(raw);
        parse_head(&mut buf, 64 * 1024)
    }

    #[test]
    fn lengths_are_plain_decimal_numbers() {
        assert_eq!(parse_length(b"5"), Some(5));
        assert_eq!(parse_length(b" 0005 "), Some(5));
        assert_eq!(parse_length(b"+5"), None);
        assert_eq!(parse_length(b"-5"), None);
        assert_eq!(parse_length(b"0x5"), None);
        assert_eq!(parse_length(b"5, 5"), None);
        assert_eq!(parse_length(b""), None);
        assert_eq!(parse_length(b"99999999999999999999999"), None);
        assert_eq!(parse_length(b"18446744073709551615"), Some(u64::MAX));
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let head = parse(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
            .unwrap()
            .unwrap();
        assert_eq!(head.body, Framing::Length(5));
        assert!(head.keep_alive);
        let head = parse(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.body, Framing::Chunked);
        for refused in [
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"POST / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length : 5\r\n\r\n",
        ] {
            assert!(
                parse(refused).is_err(),
                "{}",
                String::from_utf8_lossy(refused)
            );
        }
        assert!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
    }

    #[test]
    fn keep_alive_follows_the_version() {
        let h = |raw: &[u8]| parse(raw).unwrap().unwrap().keep_alive;
        assert!(h(b"GET / HTTP/1.1\r\n\r\n"));
        assert!(!h(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!h(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(h(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
    }

    #[test]
    fn a_parsed_head_leaves_what_follows_it() {
        let mut buf = BytesMut::from(&b"GET /a HTTP/1.1\r\nX-A: 1\r\n\r\nGET /b"[..]);
        let head = parse_head(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(head.request.uri().path(), "/a");
        assert_eq!(head.request.headers()["x-a"], "1");
        assert_eq!(&buf[..], b"GET /b");
    }
}
