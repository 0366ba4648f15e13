//! The listener: accept loop, per-connection timeouts, graceful drain.
//!
//! Each connection is served by hyper-util's auto builder (HTTP/1.1 and h2c, with upgrades) and
//! watched by its own task for two limits that hyper alone does not separate:
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
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::body::ResponseBody;
use crate::gateway::Gateway;
use crate::proxy::Peer;

/// What one connection is doing, shared by its reader, its requests and its watchdog.
#[derive(Debug)]
pub struct ConnState {
    origin: Instant,
    inflight: AtomicU32,
    /// Nanoseconds since `origin` + 1 when the current request head began; 0 when none is pending.
    head_started: AtomicU64,
    /// Nanoseconds since `origin` when the connection last became idle.
    idle_since: AtomicU64,
}

impl ConnState {
    fn new() -> ConnState {
        ConnState {
            origin: Instant::now(),
            inflight: AtomicU32::new(0),
            // A new connection must send its first head within header_read_timeout.
            head_started: AtomicU64::new(1),
            idle_since: AtomicU64::new(0),
        }
    }

    fn nanos(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_nanos() as u64
    }

    fn on_read(&self) {
        if self.inflight.load(Ordering::Relaxed) == 0
            && self.head_started.load(Ordering::Relaxed) == 0
        {
            let _ = self.head_started.compare_exchange(
                0,
                self.nanos(Instant::now()) + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// When the watchdog should look again, or what it must do now.
    fn check(&self, now: Instant, header_timeout: Duration, idle_timeout: Duration) -> Verdict {
        if self.inflight.load(Ordering::Relaxed) > 0 {
            return Verdict::Later(now + idle_timeout.max(header_timeout));
        }
        let head = self.head_started.load(Ordering::Relaxed);
        if head != 0 {
            let deadline = self.origin + Duration::from_nanos(head - 1) + header_timeout;
            return if now >= deadline {
                Verdict::HeaderTimeout
            } else {
                Verdict::Later(deadline)
            };
        }
        let deadline = self.origin
            + Duration::from_nanos(self.idle_since.load(Ordering::Relaxed))
            + idle_timeout;
        if now >= deadline {
            Verdict::Idle
        } else {
            Verdict::Later(deadline)
        }
    }
}

enum Verdict {
    Later(Instant),
    HeaderTimeout,
    Idle,
}

/// Marks one request in flight on its connection; dropped with the response body.
#[derive(Debug)]
pub struct RequestGuard(Arc<ConnState>);

impl RequestGuard {
    fn new(state: Arc<ConnState>) -> RequestGuard {
        state.inflight.fetch_add(1, Ordering::Relaxed);
        state.head_started.store(0, Ordering::Relaxed);
        RequestGuard(state)
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let s = &self.0;
        if s.inflight.fetch_sub(1, Ordering::Relaxed) == 1 {
            s.idle_since
                .store(s.nanos(Instant::now()), Ordering::Relaxed);
        }
    }
}

/// A socket that tells its connection's state when request bytes arrive.
struct TrackedIo {
    inner: TcpStream,
    state: Arc<ConnState>,
}

impl AsyncRead for TrackedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.on_read();
        }
        polled
    }
}

impl AsyncWrite for TrackedIo {
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

/// The per-connection hyper service: hands each request to the gateway.
#[derive(Clone)]
struct ConnService {
    gateway: Arc<Gateway>,
    state: Arc<ConnState>,
    peer: Arc<Peer>,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let guard = RequestGuard::new(self.state.clone());
        let gateway = self.gateway.clone();
        let peer = self.peer.clone();
        Box::pin(async move {
            let mut resp = gateway.handle(req, &peer).await;
            resp.body_mut().set_guard(guard);
            Ok(resp)
        })
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
    drain: watch::Sender<bool>,
    tracker: Arc<Tracker>,
    accept: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Starts accepting on `listener`.
    pub fn start(listener: TcpListener, gateway: Arc<Gateway>) -> io::Result<Server> {
        let local_addr = listener.local_addr()?;
        let (drain, drain_rx) = watch::channel(false);
        let tracker = Arc::new(Tracker::default());
        let accept = tokio::spawn(accept_loop(listener, gateway, drain_rx, tracker.clone()));
        Ok(Server {
            local_addr,
            drain,
            tracker,
            accept,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Asks every connection to finish gracefully and waits (at most `timeout`) until the
    /// connections open at that moment have closed. New connections keep getting `503`s.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let _ = self.drain.send(true);
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

    /// Stops accepting.
    pub fn close(&self) {
        self.accept.abort();
    }
}

fn http_builder(gateway: &Gateway) -> auto::Builder<TokioExecutor> {
    let cfg = &gateway.config;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Our watchdog enforces header_read_timeout separately from idle time; see the module doc.
        .header_read_timeout(None)
        .max_buf_size(cfg.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(cfg.max_header_bytes as u32)
        .max_concurrent_streams(1024)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    builder
}

async fn accept_loop(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    drain: watch::Receiver<bool>,
    tracker: Arc<Tracker>,
) {
    let builder = Arc::new(http_builder(&gateway));
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
        let tracked = (!*drain.borrow()).then(|| {
            tracker.open.fetch_add(1, Ordering::AcqRel);
            Tracked(tracker.clone())
        });
        tokio::spawn(serve_connection(
            stream,
            peer,
            gateway.clone(),
            builder.clone(),
            drain.clone(),
            tracked,
        ));
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    gateway: Arc<Gateway>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    mut drain: watch::Receiver<bool>,
    _tracked: Option<Tracked>,
) {
    let state = Arc::new(ConnState::new());
    let header_timeout = gateway.config.header_read_timeout;
    let idle_timeout = gateway.config.idle_timeout;
    let io = TokioIo::new(TrackedIo {
        inner: stream,
        state: state.clone(),
    });
    let service = ConnService {
        gateway: gateway.clone(),
        state: state.clone(),
        peer: Arc::new(Peer::new(peer)),
    };
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    // State changes (a request finishing, a head starting) do not wake the watchdog, so it never
    // sleeps longer than a quarter of the shorter timeout: limits are enforced within that slack.
    let period = header_timeout.min(idle_timeout) / 4;
    let watchdog = tokio::time::sleep(period);
    tokio::pin!(watchdog);
    let mut closing_idle = false;
    // Connections accepted during a drain are served (their requests get 503) but not asked to
    // close before their first request, or the client would see a reset instead of the 503.
    let mut draining = *drain.borrow();
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            changed = drain.changed(), if !draining => {
                draining = true;
                if changed.is_ok() {
                    conn.as_mut().graceful_shutdown();
                }
            }
            _ = &mut watchdog => {
                let now = Instant::now();
                match state.check(now, header_timeout, idle_timeout) {
                    Verdict::Later(at) => watchdog.as_mut().reset(at.min(now + period)),
                    Verdict::HeaderTimeout => {
                        info!(%peer, timeout = ?header_timeout, "closing connection: request head not received within header_read_timeout");
                        return;
                    }
                    Verdict::Idle if closing_idle => return,
                    Verdict::Idle => {
                        debug!(%peer, "closing idle keep-alive connection");
                        closing_idle = true;
                        conn.as_mut().graceful_shutdown();
                        watchdog.as_mut().reset(now + period);
                    }
                }
            }
        }
    }
}
