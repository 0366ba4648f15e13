//! The listener: accept loop, per-connection timeouts, graceful drain.
//!
//! Each connection is served by hyper-util's auto builder (HTTP/1.1 and h2c, with upgrades). One
//! sweeper task enforces, for all connections, two limits that hyper alone does not separate:
//!
//! * `header_read_timeout`: from a connection's first byte of a request head (or from accept, for
//!   a new connection) to the complete head. A client that trickles headers is cut off (slow loris).
//! * `idle_timeout`: a keep-alive connection with nothing in flight and no new request is closed.
//!
//! On drain, every connection is asked to shut down gracefully (in-flight requests finish, idle
//! connections close), new requests get `503` with `Connection: close`, and [`Server::drain`]
//! returns once the connections that were open are gone or the drain timeout passes.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use bytes::{Buf, Bytes};

use crate::body::ResponseBody;
use crate::conn::{ConnState, RequestGuard, Verdict, ABORT, GRACEFUL, RUN};
use crate::forwarding::Peer;
use crate::gateway::Gateway;
use crate::incoming::Incoming;

/// A socket whose first bytes were already read (by the HTTP/1 side, which found HTTP/2's
/// preface in them): they are read again first. Everything read passes through its
/// [`FrameMeter`], which ends the connection when the client's frames that earn nothing outgrow
/// what its requests earned.
struct Prefixed {
    read: Bytes,
    inner: TcpStream,
    meter: FrameMeter,
}

/// What one HTTP/2 connection may send that reaches no request: header blocks the codec refused
/// (oversized or malformed, answered `431`/reset without the gateway ever seeing a request),
/// PINGs, SETTINGS, PRIORITY, RST_STREAM, unknown frame types. The h2 codec bounds rapid
/// resets, CONTINUATION floods and refused streams itself, but not these: a client could make
/// the gateway parse refused header blocks, or answer PINGs, for as long as it likes.
///
/// Every request that reaches the gateway earns `max_header_bytes` + 1 KiB; on top of that the
/// connection has [`H2_FREE_CONTROL_BYTES`]. DATA (bounded by flow control) and WINDOW_UPDATE
/// (a large download's) are not counted. Past the allowance the read fails and the connection
/// ends (the client sees the socket close).
struct FrameMeter {
    /// The client preface's bytes still to pass (not frames).
    preface_left: u8,
    /// A frame header being read, and how much of it has arrived.
    header: [u8; 9],
    header_len: u8,
    /// Payload bytes of the current frame still to pass, and whether they count.
    payload_left: u32,
    counting: bool,
    /// Bytes counted so far.
    spent: u64,
    /// Incremented by every request the connection hands to the gateway.
    requests: Arc<AtomicU64>,
    /// What one request earns.
    per_request: u64,
}

/// Bytes of frames that reach no request an HTTP/2 connection may send before any request
/// earned more (about twelve refused 80 KiB header blocks, or 60,000 PINGs).
pub const H2_FREE_CONTROL_BYTES: u64 = 1024 * 1024;

impl FrameMeter {
    fn new(requests: Arc<AtomicU64>, max_header_bytes: usize) -> FrameMeter {
        FrameMeter {
            preface_left: 24,
            header: [0; 9],
            header_len: 0,
            payload_left: 0,
            counting: false,
            spent: 0,
            requests,
            per_request: max_header_bytes as u64 + 1024,
        }
    }

    /// Accounts for `data`, the next bytes read; `false` once the allowance is spent.
    fn feed(&mut self, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            if self.preface_left > 0 {
                let n = data.len().min(self.preface_left as usize);
                self.preface_left -= n as u8;
                data = &data[n..];
            } else if self.payload_left > 0 {
                let n = data.len().min(self.payload_left as usize);
                self.payload_left -= n as u32;
                if self.counting {
                    self.spent += n as u64;
                }
                data = &data[n..];
            } else {
                let have = self.header_len as usize;
                let n = data.len().min(9 - have);
                self.header[have..have + n].copy_from_slice(&data[..n]);
                self.header_len += n as u8;
                data = &data[n..];
                if self.header_len == 9 {
                    self.header_len = 0;
                    let h = &self.header;
                    self.payload_left = u32::from_be_bytes([0, h[0], h[1], h[2]]);
                    // DATA (0) and WINDOW_UPDATE (8) are free.
                    self.counting = !matches!(h[3], 0 | 8);
                    if self.counting {
                        self.spent += 9;
                    }
                }
            }
        }
        self.spent <= self.allowance()
    }

    fn allowance(&self) -> u64 {
        let earned = self.requests.load(Ordering::Relaxed);
        H2_FREE_CONTROL_BYTES.saturating_add(earned.saturating_mul(self.per_request))
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        if !this.read.is_empty() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read[..n]);
            this.read.advance(n);
        } else if Pin::new(&mut this.inner).poll_read(cx, buf)?.is_pending() {
            return Poll::Pending;
        }
        if this.meter.feed(&buf.filled()[before..]) {
            Poll::Ready(Ok(()))
        } else {
            Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "HTTP/2 client sent more frames that reach no request than its requests earned",
            )))
        }
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The per-connection hyper service for HTTP/2: hands each stream's request to the gateway.
#[derive(Clone)]
struct ConnService {
    gateway: Arc<Gateway>,
    state: Arc<ConnState>,
    peer: Arc<Peer>,
    /// Requests handed to the gateway (the connection's [`FrameMeter`] reads it).
    requests: Arc<AtomicU64>,
}

impl hyper::service::Service<Request<hyper::body::Incoming>> for ConnService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = crate::gateway::Serving;

    fn call(&self, req: Request<hyper::body::Incoming>) -> Self::Future {
        let guard = RequestGuard::new(self.state.clone());
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.gateway
            .serve(req.map(Incoming::Hyper), &self.peer, guard)
    }
}

/// Every open connection, for the sweeper and for a drain. Touched on accept and close only.
#[derive(Debug, Default)]
struct Registry {
    next: AtomicU64,
    conns: std::sync::Mutex<std::collections::HashMap<u64, Arc<ConnState>>>,
}

impl Registry {
    fn insert(self: &Arc<Self>, state: Arc<ConnState>) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.conns.lock().unwrap().insert(id, state);
        Registered(self.clone(), id)
    }

    fn snapshot(&self) -> Vec<Arc<ConnState>> {
        self.conns.lock().unwrap().values().cloned().collect()
    }
}

/// Removes a connection from the registry when its task ends.
struct Registered(Arc<Registry>, u64);

impl Drop for Registered {
    fn drop(&mut self) {
        self.0.conns.lock().unwrap().remove(&self.1);
    }
}

/// Enforces `header_read_timeout` and `idle_timeout` for every connection from one task, every
/// eighth of the shorter of the two (the limits hold within a quarter of it). Connections are told
/// through their [`ConnState`], so their own tasks poll no timer.
async fn sweep(registry: Arc<Registry>, header_timeout: Duration, idle_timeout: Duration) {
    // Events are stamped up to one period late and checked up to one period late: the limits
    // hold within a quarter of the shorter one.
    let period = header_timeout.min(idle_timeout) / 8;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        for conn in registry.snapshot() {
            match conn.check(now, header_timeout, idle_timeout) {
                Verdict::Fine => {}
                Verdict::HeaderTimeout => {
                    info!(peer = %conn.peer(), timeout = ?header_timeout, "closing connection: request head not received within header_read_timeout");
                    conn.raise(ABORT);
                }
                Verdict::Idle => {
                    // Asked once to close gracefully; still idle a period later: close now.
                    let signal = if conn.signal() >= GRACEFUL {
                        ABORT
                    } else {
                        debug!(peer = %conn.peer(), "closing idle keep-alive connection");
                        GRACEFUL
                    };
                    conn.raise(signal);
                }
            }
        }
    }
}

/// Counts the connections that must finish before a drain completes.
#[derive(Debug, Default)]
struct Tracker {
    open: AtomicUsize,
    closed: Notify,
}

struct Tracked(Arc<Tracker>);

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.closed.notify_waiters();
        }
    }
}

/// The accept loop and its connections.
pub struct Server {
    local_addr: SocketAddr,
    draining: Arc<AtomicBool>,
    registry: Arc<Registry>,
    tracker: Arc<Tracker>,
    accept: tokio::task::JoinHandle<()>,
    sweeper: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Starts accepting on `listener`.
    pub fn start(listener: TcpListener, gateway: Arc<Gateway>) -> io::Result<Server> {
        let local_addr = listener.local_addr()?;
        let draining = Arc::new(AtomicBool::new(false));
        let registry = Arc::new(Registry::default());
        let tracker = Arc::new(Tracker::default());
        let sweeper = tokio::spawn(sweep(
            registry.clone(),
            gateway.config.header_read_timeout,
            gateway.config.idle_timeout,
        ));
        let accept = tokio::spawn(accept_loop(
            listener,
            gateway,
            draining.clone(),
            registry.clone(),
            tracker.clone(),
        ));
        Ok(Server {
            local_addr,
            draining,
            registry,
            tracker,
            accept,
            sweeper,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Asks every connection to finish gracefully and waits (at most `timeout`) until the
    /// connections open at that moment have closed. New connections keep getting `503`s.
    pub async fn drain(&self, timeout: Duration) -> bool {
        // Connections accepted from now on are served (their requests get 503) but not asked to
        // close before their first request, or the client would see a reset instead of the 503.
        self.draining.store(true, Ordering::Release);
        for conn in self.registry.snapshot() {
            conn.raise(GRACEFUL);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let closed = self.tracker.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.tracker.open.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, closed).await.is_err() {
                let open = self.tracker.open.load(Ordering::Acquire);
                warn!(
                    open,
                    "drain timeout: closing connections with requests in flight"
                );
                return false;
            }
        }
    }

    /// Stops accepting and sweeping.
    pub fn close(&self) {
        self.accept.abort();
        self.sweeper.abort();
    }
}

/// Streams one HTTP/2 connection may have open at once; a client that opens more gets
/// `REFUSED_STREAM` for each stream past it.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 1024;

fn http2_builder(gateway: &Gateway) -> http2::Builder<TokioExecutor> {
    let cfg = &gateway.config;
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(cfg.max_header_bytes as u32)
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        // Rapid reset (CVE-2023-44487): streams a client opens and resets before they are
        // served; past 20 at once the connection gets GOAWAY (ENHANCE_YOUR_CALM). Written out
        // (hyper's defaults today) because tests/h2abuse.rs and SECURITY.md rely on them.
        .max_pending_accept_reset_streams(20)
        // Streams the gateway had to reset for the client's errors (REFUSED_STREAM past
        // max_concurrent_streams, malformed headers) before the connection is closed.
        .max_local_error_reset_streams(Some(1024))
        .keep_alive_interval(Some(Duration::from_secs(30)));
    builder
}

async fn accept_loop(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    draining: Arc<AtomicBool>,
    registry: Arc<Registry>,
    tracker: Arc<Tracker>,
) {
    let builder = Arc::new(http2_builder(&gateway));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: back off rather than spin.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let tracked = (!draining.load(Ordering::Acquire)).then(|| {
            tracker.open.fetch_add(1, Ordering::AcqRel);
            Tracked(tracker.clone())
        });
        let state = Arc::new(ConnState::new(peer));
        let registered = registry.insert(state.clone());
        tokio::spawn(serve_connection(
            stream,
            state,
            gateway.clone(),
            builder.clone(),
            (registered, tracked),
        ));
    }
}

async fn serve_connection(
    stream: TcpStream,
    state: Arc<ConnState>,
    gateway: Arc<Gateway>,
    builder: Arc<http2::Builder<TokioExecutor>>,
    _guards: (Registered, Option<Tracked>),
) {
    let peer = Arc::new(Peer::new(state.peer()));
    // HTTP/1.1 (the gateway's own connection), unless the first bytes are HTTP/2's preface.
    let http1 = crate::http1::serve(stream, &state, &gateway, &peer);
    let (stream, read) = match with_signals(&state, std::pin::pin!(http1), |_| {}).await {
        Some(crate::http1::Ended::Http2(stream, read)) => (stream, read),
        Some(crate::http1::Ended::Closed) | None => return,
    };
    let requests = Arc::new(AtomicU64::new(0));
    let io = TokioIo::new(Prefixed {
        read,
        inner: stream,
        meter: FrameMeter::new(requests.clone(), gateway.config.max_header_bytes),
    });
    let service = ConnService {
        gateway,
        state: state.clone(),
        peer,
        requests,
    };
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let ended = with_signals(&state, conn.as_mut(), |conn| {
        conn.as_mut().graceful_shutdown()
    })
    .await;
    if let Some(Err(e)) = ended {
        debug!(peer = %state.peer(), error = %e, "HTTP/2 connection ended with an error");
    }
}

/// Polls `fut` until it ends or the connection is told to close now (`None`). On a graceful
/// request, calls `graceful` once (the HTTP/1 side sees it itself, between requests).
///
/// The hot path: one atomic load per poll to see whether the sweeper or a drain asked
/// something of this connection; no timer or channel is polled here.
async fn with_signals<F: Future + Unpin>(
    state: &ConnState,
    fut: F,
    mut graceful: impl FnMut(&mut F),
) -> Option<F::Output> {
    let mut fut = fut;
    let mut shutting_down = false;
    std::future::poll_fn(|cx| {
        state.register(cx.waker());
        match state.signal() {
            RUN => {}
            GRACEFUL => {
                if !shutting_down {
                    shutting_down = true;
                    graceful(&mut fut);
                }
            }
            _ => return Poll::Ready(None),
        }
        Pin::new(&mut fut).poll(cx).map(Some)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, len: usize) -> Vec<u8> {
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            0,
            0,
            0,
            0,
            1,
        ];
        f.resize(9 + len, 0xab);
        f
    }

    fn meter() -> (FrameMeter, Arc<AtomicU64>) {
        let requests = Arc::new(AtomicU64::new(0));
        (FrameMeter::new(requests.clone(), 64 * 1024), requests)
    }

    #[test]
    fn data_and_window_updates_are_free_and_the_preface_is_not_a_frame() {
        let (mut m, _) = meter();
        assert!(m.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        for _ in 0..1000 {
            assert!(m.feed(&frame(0, 16 * 1024)));
            assert!(m.feed(&frame(8, 4)));
        }
        assert_eq!(m.spent, 0);
        assert!(m.feed(&frame(4, 0))); // SETTINGS
        assert_eq!(m.spent, 9);
    }

    #[test]
    fn frames_split_anywhere_count_the_same() {
        let mut stream = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        for kind in [1u8, 9, 0, 6, 8, 3] {
            stream.extend(frame(kind, 100));
        }
        let (mut whole, _) = meter();
        whole.feed(&stream);
        let (mut bytewise, _) = meter();
        for b in &stream {
            bytewise.feed(std::slice::from_ref(b));
        }
        assert_eq!(whole.spent, 4 * 109);
        assert_eq!(bytewise.spent, whole.spent);
    }

    #[test]
    fn refused_header_blocks_run_out_and_requests_earn_more() {
        let (mut m, requests) = meter();
        m.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let block = frame(1, 16 * 1024);
        let mut fed = 0;
        while m.feed(&block) {
            fed += 1;
            assert!(fed < 1000, "never ran out");
        }
        assert_eq!(fed, (H2_FREE_CONTROL_BYTES / (16 * 1024 + 9)) as usize);
        // A request reaching the gateway pays for its own header block (and then some).
        requests.fetch_add(1, Ordering::Relaxed);
        assert!(m.feed(&[]));
        for _ in 0..3 {
            assert!(m.feed(&block));
        }
    }
}
