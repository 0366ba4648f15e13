//! Connections to replicas: HTTP/1.1, pooled per replica, driven inside the request's own task.
//!
//! hyper-util's pooled client drives every connection from a task of its own, so each request
//! crosses tasks twice (a channel to the connection task, a oneshot back). Here the connection's
//! driver is polled by the request that uses it: while sending, by [`send`]; while the response
//! body streams, by the response body (see `body::ResponseBody`), which puts the connection back
//! into its replica's pool when the body ends. A connection idle in the pool is not polled; one
//! that the replica closed meanwhile is noticed at checkout, and a request that was never written
//! to it is sent again on a fresh connection.
//!
//! Requests that ask for a protocol upgrade get a connection of their own, driven by a spawned
//! task, so the upgraded stream can outlive the exchange.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::UpstreamBody;
use crate::config::Upstream;
use crate::provider::Replica;

/// Idle connections kept per replica.
const MAX_IDLE: usize = 1024;
/// An idle connection older than this is closed rather than reused: replicas commonly close idle
/// keep-alive connections after 5 s (Node.js), and reusing one at that moment fails the request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Time allowed to establish a connection (the function's `timeout` bounds the whole exchange).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One HTTP/1.1 connection to a replica: the request handle and its driver.
pub struct Conn {
    sender: SendRequest<UpstreamBody>,
    driver: Connection<TokioIo<TcpStream>, UpstreamBody>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("closed", &self.sender.is_closed())
            .finish()
    }
}

impl Conn {
    /// Drives the connection (reads and writes on the socket). Returns `true` while it is usable.
    pub fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        match Pin::new(&mut self.driver).poll_without_shutdown(cx) {
            Poll::Pending => !self.sender.is_closed(),
            Poll::Ready(_) => false,
        }
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
    pub fn put(&self, conn: Box<Conn>) {
        if conn.sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap();
        if idle.len() < MAX_IDLE {
            idle.push((conn, Instant::now()));
        }
    }

    fn take(&self) -> Option<Box<Conn>> {
        let now = Instant::now();
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

/// Why a request got no response from the replica.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be established.
    #[error("{0}")]
    Connect(String),
    /// The connection failed before a response head arrived.
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

async fn connect(
    upstream: &Upstream,
) -> Result<
    (
        SendRequest<UpstreamBody>,
        Connection<TokioIo<TcpStream>, UpstreamBody>,
    ),
    UpstreamError,
> {
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
    let (sender, driver) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await?;
    Ok((sender, driver))
}

/// A pooled connection whose driver has processed everything pending and that can take a request.
async fn checkout(pool: &Pool) -> Option<Box<Conn>> {
    while let Some(mut conn) = pool.take() {
        let ready = poll_fn(|cx| {
            if !conn.drive(cx) {
                return Poll::Ready(false);
            }
            Poll::Ready(matches!(conn.sender.poll_ready(cx), Poll::Ready(Ok(()))))
        })
        .await;
        if ready {
            return Some(conn);
        }
    }
    None
}

/// A replica's response body together with the connection it arrives on. Polling it drives the
/// connection; when the body has ended (seen by polling, or on drop) the connection goes back to
/// the replica's pool; dropped before the end, the connection is closed.
pub struct PooledBody {
    inner: Incoming,
    conn: Option<Box<Conn>>,
    replica: Arc<Replica>,
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody")
            .field("replica", &self.replica.id)
            .finish_non_exhaustive()
    }
}

impl PooledBody {
    /// Returns the connection to the pool if the body has ended (else closes it). Idempotent.
    pub fn release(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.inner.is_end_stream() {
                self.replica.pool.put(conn);
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
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(conn) = &mut this.conn {
            if !conn.drive(cx) {
                this.conn = None;
            }
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            this.release();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Sends `req` to `replica` on a pooled (or new) connection and waits for the response head,
/// driving the connection meanwhile. The response body carries the connection (see [`PooledBody`]).
pub async fn send(
    replica: &Arc<Replica>,
    req: Request<UpstreamBody>,
) -> Result<Response<PooledBody>, UpstreamError> {
    let (resp, conn) = exchange(&replica.pool, &replica.upstream, req).await?;
    Ok(resp.map(|inner| PooledBody {
        inner,
        conn: Some(conn),
        replica: replica.clone(),
    }))
}

async fn exchange(
    pool: &Pool,
    upstream: &Upstream,
    mut req: Request<UpstreamBody>,
) -> Result<(Response<Incoming>, Box<Conn>), UpstreamError> {
    // A stale pooled connection may fail the request before it is written; then it is retried
    // once on a fresh connection. A request that was written is never sent twice.
    for attempt in 0..2 {
        let mut conn = match if attempt == 0 {
            checkout(pool).await
        } else {
            None
        } {
            Some(conn) => conn,
            None => {
                let (sender, driver) = connect(upstream).await?;
                // Boxed once per connection: it moves between pool, request and body each time.
                Box::new(Conn { sender, driver })
            }
        };
        let sending = conn.sender.try_send_request(req);
        tokio::pin!(sending);
        let result = poll_fn(|cx| {
            if let Poll::Ready(r) = sending.as_mut().poll(cx) {
                return Poll::Ready(r);
            }
            conn.drive(cx);
            sending.as_mut().poll(cx)
        })
        .await;
        match result {
            Ok(resp) => return Ok((resp, conn)),
            Err(mut e) => match e.take_message() {
                Some(unsent) if attempt == 0 => req = unsent,
                _ => return Err(e.into_error().into()),
            },
        }
    }
    unreachable!("the second attempt returns")
}

/// Sends an upgrade request on a connection of its own, driven by a spawned task that keeps
/// running for the upgraded stream (`hyper::upgrade::on` works on the response; its body, if the
/// replica did not switch, is not pooled).
pub async fn send_upgrade(
    replica: &Arc<Replica>,
    req: Request<UpstreamBody>,
) -> Result<Response<PooledBody>, UpstreamError> {
    let (mut sender, driver) = connect(&replica.upstream).await?;
    tokio::spawn(async move {
        let _ = driver.with_upgrades().await;
    });
    let resp = sender.send_request(req).await?;
    Ok(resp.map(|inner| PooledBody {
        inner,
        conn: None,
        replica: replica.clone(),
    }))
}
