//! Connections to replicas: HTTP/1.1 over our own codec (`h1`), pooled per replica, driven
//! inside the request's own task.
//!
//! A request takes an idle connection from its replica's pool (or opens one), writes its head and
//! body, and reads the response head; the response body then owns the connection and reads the
//! rest of the response from it as the client takes it. When the body has ended cleanly the
//! connection goes back to the pool; dropped early or broken, it is closed. No task, channel or
//! lock is involved beyond the pool's short critical section.
//!
//! A connection idle in the pool is not polled. One that the replica closed meanwhile is noticed
//! at checkout (its socket is readable), and a request that failed on a reused connection before
//! any response byte arrived is sent again on a fresh one when that is safe: nothing of it was
//! written, or it is idempotent and its body was not touched.
//!
//! The request body keeps streaming after the response head arrives (full duplex), so a replica
//! that answers while still reading the upload works; the connection is reused only if the request
//! was sent completely.
//!
//! Requests that ask for a protocol upgrade use hyper's client connection, driven by a spawned
//! task, so the upgraded stream can outlive the exchange.

use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::HeaderMap;
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::sync::SemaphorePermit;
use tokio::time::{Instant, Sleep};

use crate::config::Upstream;
use crate::forwarding::Forwarded;
use crate::h1::{self, Decoder, Parsed, ProtocolError, RequestFraming};

mod body;
mod callback;
pub use body::{BodyLimitExceeded, ClientBodyError, UpstreamBody};
pub use callback::{
    parse_callback_url, refusal, CallbackClient, CallbackConnector, CallbackGuard, Refused,
    CALLBACK_CONNECT_TIMEOUT,
};

/// Idle connections kept per replica.
const MAX_IDLE: usize = 1024;
/// An idle connection older than this is closed rather than reused: replicas commonly close idle
/// keep-alive connections after 5 s (Node.js), and reusing one at that moment fails the request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Time allowed to establish a connection (the function's `timeout` bounds the whole exchange).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Read buffer growth step, and the least free space a read is attempted with.
const READ_CHUNK: usize = 16 * 1024;
const MIN_READ_SPACE: usize = 2 * 1024;

/// A final response head, how its body is framed, and whether it allows reusing the connection.
type Head = (Response<()>, Decoder, bool);

/// Errors from a body, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One HTTP/1.1 connection to a replica.
#[derive(Debug)]
pub struct Conn {
    io: TcpStream,
    /// Bytes read and not consumed yet.
    buf: BytesMut,
    /// The buffer request heads are encoded into, kept between requests.
    scratch: Vec<u8>,
    /// The timer bounding the wait for a response head, kept between requests: moving a
    /// registered timer's deadline later is an atomic update, where a fresh timer per request
    /// costs a registration and a cancellation in tokio's timer wheel (measured: ~0.65k
    /// instructions per request). After an exchange it may fire once, harmlessly.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl Conn {
    fn new(io: TcpStream) -> Box<Conn> {
        // Boxed once per connection: it moves between pool, request and body each time.
        Box::new(Conn {
            io,
            buf: BytesMut::new(),
            scratch: Vec::new(),
            deadline: None,
        })
    }

    /// Ready once `deadline` has passed.
    fn poll_deadline(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        let timer = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut().poll(cx)
    }

    /// An idle connection can take a request: nothing arrived on it and the replica has not
    /// closed it. Costs no system call while the socket has not become readable.
    fn is_open(&mut self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < MIN_READ_SPACE {
            self.buf.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    /// Sends what `sending` has left and reads until a final response head has arrived.
    fn poll_response(
        &mut self,
        cx: &mut Context<'_>,
        sending: &mut Sending,
        head_request: bool,
    ) -> Poll<Result<Head, UpstreamError>> {
        loop {
            if !sending.done {
                if let Poll::Ready(Err(e)) = sending.poll_send(&mut self.io, cx) {
                    match e {
                        // The replica may have answered before it stopped reading (a 413, say):
                        // look for its response before reporting the failed write.
                        UpstreamError::Io(e) => sending.fail(e),
                        e => return Poll::Ready(Err(e)),
                    }
                }
            }
            while let Some(parsed) = h1::parse_response(&mut self.buf, head_request)? {
                if let Parsed::Final {
                    head,
                    body,
                    keep_alive,
                } = parsed
                {
                    return Poll::Ready(Ok((head, body, keep_alive)));
                }
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) => {
                    return Poll::Ready(Err(match sending.write_error.take() {
                        Some(e) => UpstreamError::Io(e),
                        None => UpstreamError::Closed,
                    }))
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(UpstreamError::Io(e))),
            }
        }
    }
}

/// A request on its way out: the encoded head, then the body, framed.
struct Sending {
    head: Vec<u8>,
    /// Bytes of `head` written.
    written: usize,
    /// Body bytes staged for writing: chunk-size line, data, CRLF (empty when unused).
    staged: [Bytes; 3],
    body: UpstreamBody,
    /// For `Length`, the bytes still to come.
    framing: RequestFraming,
    body_ended: bool,
    /// The body was polled (it cannot be replayed on another connection).
    body_polled: bool,
    /// Everything has been written (or writing failed: `write_error`).
    done: bool,
    write_error: Option<io::Error>,
}

impl Sending {
    fn new(head: Vec<u8>, body: UpstreamBody, framing: RequestFraming) -> Sending {
        Sending {
            head,
            written: 0,
            staged: Default::default(),
            body,
            framing,
            body_ended: framing == RequestFraming::Empty,
            body_polled: false,
            done: false,
            write_error: None,
        }
    }

    /// Starts over on another connection (nothing was written yet, or the body was not polled).
    fn rewind(&mut self) {
        self.written = 0;
        self.done = false;
        self.write_error = None;
    }

    fn fail(&mut self, e: io::Error) {
        self.done = true;
        self.write_error = Some(e);
    }

    /// Sent completely: the connection can carry another request.
    fn complete(&self) -> bool {
        self.done && self.write_error.is_none()
    }

    fn has_staged(&self) -> bool {
        self.written < self.head.len() || self.staged.iter().any(|b| !b.is_empty())
    }

    fn advance(&mut self, mut n: usize) {
        let head_left = self.head.len() - self.written;
        let from_head = n.min(head_left);
        self.written += from_head;
        n -= from_head;
        for part in &mut self.staged {
            let k = n.min(part.len());
            part.advance(k);
            n -= k;
        }
    }

    /// Polls the body once and stages what it yields.
    fn poll_stage(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        self.body_polled = true;
        loop {
            let frame = match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                None => {
                    self.body_ended = true;
                    return Poll::Ready(match self.framing {
                        RequestFraming::Chunked => {
                            self.staged[0] = Bytes::from_static(b"0\r\n\r\n");
                            Ok(())
                        }
                        RequestFraming::Length(n) if n > 0 => Err(UpstreamError::RequestBody(
                            format!("request body ended {n} bytes before its Content-Length")
                                .into(),
                        )),
                        _ => Ok(()),
                    });
                }
                Some(Err(e)) => return Poll::Ready(Err(UpstreamError::RequestBody(e))),
                Some(Ok(frame)) => frame,
            };
            // Trailers are not forwarded (neither does nginx); data is.
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if data.is_empty() {
                continue;
            }
            match &mut self.framing {
                RequestFraming::Length(left) => {
                    if data.len() as u64 > *left {
                        return Poll::Ready(Err(UpstreamError::RequestBody(
                            "request body longer than its Content-Length".into(),
                        )));
                    }
                    *left -= data.len() as u64;
                    self.staged[1] = data;
                    if *left == 0 && self.body.is_end_stream() {
                        self.body_ended = true;
                    }
                }
                RequestFraming::Chunked => {
                    self.staged = [
                        h1::chunk_prefix(data.len()),
                        data,
                        Bytes::from_static(b"\r\n"),
                    ];
                }
                RequestFraming::Empty => {
                    return Poll::Ready(Err(UpstreamError::RequestBody(
                        "request body where none was declared".into(),
                    )))
                }
            }
            return Poll::Ready(Ok(()));
        }
    }

    /// Writes the head and the body until everything is sent (`Ready(Ok)`), the socket or the
    /// body has nothing more for now (`Pending`), or something fails.
    fn poll_send(
        &mut self,
        io: &mut TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), UpstreamError>> {
        // The head goes out together with the body's first bytes when they are already here.
        if self.written == 0 && !self.body_polled && !self.body_ended {
            if let Poll::Ready(Err(e)) = self.poll_stage(cx) {
                return Poll::Ready(Err(e));
            }
        }
        loop {
            while self.has_staged() {
                let mut slices = [IoSlice::new(&[]); 4];
                let mut n = 0;
                if self.written < self.head.len() {
                    slices[0] = IoSlice::new(&self.head[self.written..]);
                    n = 1;
                }
                for part in self.staged.iter().filter(|b| !b.is_empty()) {
                    slices[n] = IoSlice::new(part);
                    n += 1;
                }
                let wrote = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n]))?;
                if wrote == 0 {
                    return Poll::Ready(Err(UpstreamError::Io(io::ErrorKind::WriteZero.into())));
                }
                self.advance(wrote);
            }
            if self.body_ended {
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            ready!(self.poll_stage(cx))?;
        }
    }
}

static NEXT_ENDPOINT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Where one replica is reached: its address and `Host`, and its pool of idle connections.
#[derive(Debug)]
pub struct Endpoint {
    /// Unique within the gateway process (log fields).
    pub id: u64,
    /// The replica's address and `Host` header.
    pub upstream: Upstream,
    /// Idle keep-alive connections to it.
    pub pool: Pool,
    /// Connections being opened to it at once, at most [`MAX_CONNECTING`]: a small server's listen
    /// backlog (5 for Python's `http.server`) drops the handshakes of a burst beyond it.
    connecting: tokio::sync::Semaphore,
    /// While set (a replica in slow start), a new connection counts as being opened until its
    /// first response head arrives, not only until its handshake: the handshake completes in the
    /// kernel before the server has accepted the connection, so only a response shows that it
    /// did, and a server that accepts slowly overflows its backlog.
    careful: AtomicBool,
}

/// Connections opened to one endpoint at once; more requests needing one wait for a handshake.
pub const MAX_CONNECTING: usize = 4;

impl Endpoint {
    /// An endpoint at `upstream` with an empty pool and a fresh id.
    pub fn new(upstream: Upstream) -> Endpoint {
        Endpoint {
            id: NEXT_ENDPOINT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            upstream,
            pool: Pool::default(),
            connecting: tokio::sync::Semaphore::new(MAX_CONNECTING),
            careful: AtomicBool::new(false),
        }
    }

    /// Sets or clears careful opening (see the field); the replica's slow start sets it.
    pub fn set_careful(&self, careful: bool) {
        self.careful
            .store(careful, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A replica's idle connections.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<Vec<(Box<Conn>, Instant)>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

impl Pool {
    /// Returns a connection whose last exchange ended cleanly.
    fn put(&self, conn: Box<Conn>) {
        let mut idle = self.idle.lock().unwrap();
        if idle.len() < MAX_IDLE {
            idle.push((conn, Instant::now()));
        }
    }

    fn take(&self, now: Instant) -> Option<Box<Conn>> {
        let mut idle = self.idle.lock().unwrap();
        while let Some((conn, since)) = idle.pop() {
            if now.saturating_duration_since(since) < IDLE_TIMEOUT {
                return Some(conn);
            }
            // The most recent is too old, so all older ones are too.
            idle.clear();
        }
        None
    }

    /// Idle connections now (for tests).
    pub fn idle(&self) -> usize {
        self.idle.lock().unwrap().len()
    }
}

/// Why a request got no (complete) response from the replica.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be established.
    #[error("{0}")]
    Connect(String),
    /// The replica closed the connection before a response head.
    #[error("replica closed the connection before sending a response")]
    Closed,
    /// No response head before the deadline.
    #[error("no response before the deadline")]
    Timeout,
    /// Reading or writing the connection failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The replica's response breaks HTTP/1.1.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The client's request body failed or broke its limit or framing.
    #[error("{0}")]
    RequestBody(BoxError),
    /// hyper's client connection failed (upgrade requests).
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

impl UpstreamError {
    /// The connection failed (as a stale pooled connection does), rather than the request or the
    /// response being wrong.
    fn is_connection_failure(&self) -> bool {
        matches!(self, UpstreamError::Closed | UpstreamError::Io(_))
    }
}

async fn connect_tcp(upstream: &Upstream) -> Result<TcpStream, UpstreamError> {
    let addr = upstream.authority.as_str();
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(UpstreamError::Connect(format!("{addr}: {e}"))),
        Err(_) => {
            return Err(UpstreamError::Connect(format!(
                "{addr}: connect timed out after {CONNECT_TIMEOUT:?}"
            )))
        }
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A new connection, bounded by `deadline` as well as the connect timeout. The connect future
/// is boxed: it is the rare case, and inline it would double the exchange's size.
/// With it, the turn among [`MAX_CONNECTING`] that the caller keeps until the response head
/// arrives when the endpoint is careful.
async fn connect(
    endpoint: &Endpoint,
    deadline: Instant,
) -> Result<(Box<Conn>, Option<SemaphorePermit<'_>>), UpstreamError> {
    let opening = async {
        let turn = endpoint.connecting.acquire().await.ok();
        let stream = connect_tcp(&endpoint.upstream).await?;
        let careful = endpoint.careful.load(std::sync::atomic::Ordering::Relaxed);
        Ok((stream, turn.filter(|_| careful)))
    };
    match tokio::time::timeout_at(deadline, Box::pin(opening)).await {
        Ok(Ok((stream, turn))) => Ok((Conn::new(stream), turn)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(UpstreamError::Timeout),
    }
}

/// An open idle connection from the pool.
fn checkout(pool: &Pool, now: Instant) -> Option<Box<Conn>> {
    while let Some(mut conn) = pool.take(now) {
        if conn.is_open() {
            return Some(conn);
        }
    }
    None
}

/// What goes on the wire before the body.
#[derive(Debug)]
pub struct Outgoing<'a> {
    /// The method.
    pub method: &'a Method,
    /// The request target's path (origin form).
    pub path: &'a str,
    /// The request target's query, if any.
    pub query: Option<&'a str>,
    /// Headers, hop-by-hop ones already removed; `Host` and `Content-Length` are ignored (the
    /// replica's host and the body's framing are written instead).
    pub headers: &'a HeaderMap,
    /// Headers the gateway sets, replacing the client's of the same names.
    pub forwarded: Option<&'a Forwarded>,
    /// The request's declared `Content-Length`, validated.
    pub content_length: Option<u64>,
    /// A recent reading of the clock (when the request got its slot), to age pooled connections
    /// without reading it again.
    pub now: Instant,
    /// When to give up waiting for the response head ([`UpstreamError::Timeout`]).
    pub deadline: Instant,
    /// Longest silence allowed inside the response body (then the body fails).
    pub body_idle: Option<Duration>,
}

/// Sends a request to `endpoint` on a pooled (or new) connection and waits for the response head.
/// The response body carries the connection (see [`PooledBody`]).
pub async fn send(
    endpoint: &Arc<Endpoint>,
    outgoing: Outgoing<'_>,
    body: UpstreamBody,
) -> Result<Response<PooledBody>, UpstreamError> {
    let method = outgoing.method;
    let head_request = *method == Method::HEAD;
    let framing = h1::request_framing(
        method,
        outgoing.content_length,
        body.is_end_stream(),
        body.size_hint().exact(),
    );
    let deadline = outgoing.deadline;
    let body_idle = outgoing.body_idle;
    // Held until the response head when the endpoint is careful (see `Endpoint::careful`).
    let mut _opening = None;
    let (mut conn, mut reused) = match checkout(&endpoint.pool, outgoing.now) {
        Some(conn) => (conn, true),
        None => {
            let (conn, turn) = connect(endpoint, deadline).await?;
            _opening = turn;
            (conn, false)
        }
    };
    let mut head = std::mem::take(&mut conn.scratch);
    head.clear();
    let forwarded = outgoing.forwarded;
    h1::encode_request_head(
        &mut head,
        method,
        outgoing.path,
        outgoing.query,
        &endpoint.upstream.host_header,
        outgoing.headers,
        |name| forwarded.is_some() && Forwarded::replaces(name),
        forwarded.into_iter().flat_map(Forwarded::iter),
        framing,
    );
    let mut sending = Sending::new(head, body, framing.0);
    loop {
        let exchanged = poll_fn(|cx| {
            // The timer is looked at only while waiting: a response that is here wins.
            let polled = conn.poll_response(cx, &mut sending, head_request);
            if polled.is_pending() && conn.poll_deadline(cx, deadline).is_ready() {
                return Poll::Ready(Err(UpstreamError::Timeout));
            }
            polled
        });
        match exchanged.await {
            Ok((head, decoder, keep_alive)) => {
                // A request still being sent (or whose sending failed after the replica
                // answered) stays with the body; the connection is reused only if it completes.
                let sending = if sending.complete() {
                    conn.scratch = std::mem::take(&mut sending.head);
                    None
                } else {
                    Some(Box::new(sending))
                };
                let body = PooledBody {
                    kind: Kind::Native {
                        conn: Some(conn),
                        decoder,
                        keep_alive,
                        sending,
                        endpoint: endpoint.clone(),
                        idle: body_idle.map(|limit| Idle {
                            limit,
                            deadline: None,
                        }),
                    },
                };
                let (parts, ()) = head.into_parts();
                return Ok(Response::from_parts(parts, body));
            }
            Err(e)
                if reused
                    && e.is_connection_failure()
                    && conn.buf.is_empty()
                    && (sending.written == 0
                        || (is_idempotent(method) && !sending.body_polled)) =>
            {
                // A stale pooled connection: send the request again on a fresh one.
                sending.rewind();
                let (fresh, turn) = connect(endpoint, deadline).await?;
                (conn, _opening) = (fresh, turn);
                reused = false;
            }
            Err(e) => return Err(e),
        }
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// A replica's response body together with the connection it arrives on. Polling it reads the
/// connection (and keeps sending a request body that is still streaming); when the body has ended
/// (seen by polling, or on drop) the connection goes back to the replica's pool; dropped before
/// the end, the connection is closed.
pub struct PooledBody {
    kind: Kind,
}

enum Kind {
    Native {
        conn: Option<Box<Conn>>,
        decoder: Decoder,
        keep_alive: bool,
        /// The request, while it is still being sent.
        sending: Option<Box<Sending>>,
        endpoint: Arc<Endpoint>,
        /// The limit on silence inside the body, if any.
        idle: Option<Idle>,
    },
    /// The response to an upgrade request, over hyper's connection.
    Hyper(Incoming),
}

/// A limit on silence inside a response body. The deadline is set when a read first finds
/// nothing (no clock read while data keeps coming) and cleared when data arrives.
struct Idle {
    limit: Duration,
    deadline: Option<Instant>,
}

/// A replica sent nothing inside a response body for longer than its limit.
#[derive(Debug, thiserror::Error)]
#[error("replica sent nothing for {0:?} in the middle of a response body (response_idle_timeout)")]
pub struct BodyIdle(pub Duration);

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Native {
                decoder, endpoint, ..
            } => f
                .debug_struct("PooledBody")
                .field("endpoint", &endpoint.id)
                .field("decoder", decoder)
                .finish_non_exhaustive(),
            Kind::Hyper(_) => f.debug_struct("PooledBody").finish_non_exhaustive(),
        }
    }
}

impl PooledBody {
    /// Hands the connection back to the pool if the exchange ended cleanly, else closes it.
    fn release(&mut self) {
        if let Kind::Native {
            conn,
            decoder,
            keep_alive,
            sending,
            endpoint,
            ..
        } = &mut self.kind
        {
            if let Some(conn) = conn.take() {
                if decoder.is_done() && *keep_alive && sending.is_none() && conn.buf.is_empty() {
                    endpoint.pool.put(conn);
                }
            }
        }
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // hyper stops polling a body whose `is_end_stream` is true, so the end is often seen here.
        self.release();
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let (conn_slot, decoder, sending, idle) = match &mut this.kind {
            Kind::Hyper(inner) => {
                return Pin::new(inner)
                    .poll_frame(cx)
                    .map_err(|e| Box::new(e) as BoxError)
            }
            Kind::Native {
                conn,
                decoder,
                sending,
                idle,
                ..
            } => (conn, decoder, sending, idle),
        };
        let Some(conn) = conn_slot.as_mut() else {
            return Poll::Ready(None);
        };
        // Keep sending a request body the replica reads while it answers.
        if let Some(s) = sending.as_mut().filter(|s| !s.done) {
            match s.poll_send(&mut conn.io, cx) {
                Poll::Ready(Ok(())) => {
                    conn.scratch = std::mem::take(&mut s.head);
                    *sending = None;
                }
                Poll::Ready(Err(UpstreamError::Io(e))) => s.fail(e),
                Poll::Ready(Err(e)) => {
                    *conn_slot = None;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                Poll::Pending => {}
            }
        }
        loop {
            match decoder.decode(&mut conn.buf) {
                Err(e) => {
                    *conn_slot = None;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                Ok(Some(data)) => {
                    if decoder.is_done() {
                        this.release();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(None) if decoder.is_done() => {
                    this.release();
                    return Poll::Ready(None);
                }
                Ok(None) => {}
            }
            let filled = match conn.poll_fill(cx) {
                Poll::Ready(filled) => filled,
                Poll::Pending => {
                    if let Some(idle) = idle {
                        let deadline = *idle
                            .deadline
                            .get_or_insert_with(|| Instant::now() + idle.limit);
                        if conn.poll_deadline(cx, deadline).is_ready() {
                            *conn_slot = None;
                            return Poll::Ready(Some(Err(Box::new(BodyIdle(idle.limit)))));
                        }
                    }
                    return Poll::Pending;
                }
            };
            if let (Some(idle), Ok(1..)) = (idle.as_mut(), &filled) {
                idle.deadline = None;
            }
            match filled {
                Ok(0) => {
                    let ended = decoder.eof();
                    *conn_slot = None;
                    return Poll::Ready(match ended {
                        Ok(()) => None,
                        Err(e) => Some(Err(Box::new(e))),
                    });
                }
                Ok(_) => {}
                Err(e) => {
                    *conn_slot = None;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Native { decoder, .. } => decoder.is_done(),
            Kind::Hyper(inner) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Native { decoder, .. } => match decoder.remaining() {
                Some(n) => SizeHint::with_exact(n),
                None => SizeHint::default(),
            },
            Kind::Hyper(inner) => inner.size_hint(),
        }
    }
}

/// Sends an upgrade request on a connection of its own over hyper's client, driven by a spawned
/// task that keeps running for the upgraded stream (`hyper::upgrade::on` works on the response;
/// its body, if the replica did not switch, is not pooled).
pub async fn send_upgrade(
    endpoint: &Arc<Endpoint>,
    req: Request<UpstreamBody>,
) -> Result<Response<PooledBody>, UpstreamError> {
    let stream = connect_tcp(&endpoint.upstream).await?;
    let (mut sender, driver) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await?;
    tokio::spawn(async move {
        let _ = driver.with_upgrades().await;
    });
    let resp = sender.send_request(req).await?;
    Ok(resp.map(|inner| PooledBody {
        kind: Kind::Hyper(inner),
    }))
}
