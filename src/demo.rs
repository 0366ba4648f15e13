//! `sluicegate demo-function`: a small function server that ships with the gateway.
//!
//! It is what `config/demo.toml` runs, so the demo needs nothing but the build, and what the
//! process-provider tests run, so they exercise real child processes. It listens on `$PORT` and:
//!
//! * `GET /healthz` → `200 ok` (after `--startup-delay`, like a real runtime warming up);
//! * any other path → `200` with a short text echo of the request (method, path, query, the
//!   `X-Call-Id` and forwarded headers it received, body size, pid); query parameters change it:
//!   `sleep=250ms` waits first, `status=503` picks the status, `bytes=N` sends N bytes,
//!   `chunks=N&every=100ms` streams N chunks, `exit=1` exits the process before answering,
//!   `env=NAME` adds a line `env NAME=<value>` (the replica's environment variable), `headers=1`
//!   adds one line per request header (`header name: value`).
//!
//! The echo ends with `inflight=N max_inflight=M received_unix_ns=T`: the requests this process was
//! serving when it answered, the most it ever served at once (tests use it to check per-replica
//! caps), and when the request arrived (the cold-start scenario uses it with the `listening ... at
//! unix_ns=` line printed at startup).
//!
//! `--fail-start MESSAGE` prints the message to stderr and exits with status 1 at once;
//! `--never-ready` listens but answers `/healthz` with 503 forever.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::config::parse_duration;

/// Requests this process is serving now, and the most it ever served at once.
static INFLIGHT: AtomicU32 = AtomicU32::new(0);
static MAX_INFLIGHT: AtomicU32 = AtomicU32::new(0);

struct InFlight;

impl InFlight {
    fn enter() -> (InFlight, u32) {
        let now = INFLIGHT.fetch_add(1, Ordering::SeqCst) + 1;
        MAX_INFLIGHT.fetch_max(now, Ordering::SeqCst);
        (InFlight, now)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        INFLIGHT.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Options of `sluicegate demo-function`.
#[derive(Clone, Debug, Default)]
pub struct DemoOptions {
    /// Time before the server starts listening.
    pub startup_delay: Duration,
    /// Extra startup time, spread between 0 and this by process id (replicas become ready one by one).
    pub startup_jitter: Duration,
    /// Exit at once with this message on stderr.
    pub fail_start: Option<String>,
    /// Listen, but never answer `/healthz` with 2xx.
    pub never_ready: bool,
}

type DemoBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(text: impl Into<Bytes>) -> DemoBody {
    http_body_util::Full::new(text.into()).boxed()
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

async fn handle(
    req: Request<Incoming>,
    options: DemoOptions,
) -> Result<Response<DemoBody>, Infallible> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    if path == "/healthz" {
        let status = if options.never_ready {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        return Ok(Response::builder()
            .status(status)
            .body(full("ok\n"))
            .unwrap());
    }
    let received = unix_nanos();
    let (_inflight, inflight) = InFlight::enter();
    if let Some(d) = query_param(&query, "sleep").and_then(|v| parse_duration(v).ok()) {
        tokio::time::sleep(d).await;
    }
    if let Some(code) = query_param(&query, "exit").and_then(|v| v.parse::<i32>().ok()) {
        eprintln!("demo-function: exiting with status {code} as asked");
        std::process::exit(code);
    }
    let status = query_param(&query, "status")
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::OK);
    let method = req.method().clone();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    let call_id = header("x-call-id");
    let headers = req.headers().clone();
    let forwarded = format!(
        "for={} proto={} host={}",
        header("x-forwarded-for"),
        header("x-forwarded-proto"),
        header("x-forwarded-host")
    );
    let mut body_bytes: u64 = 0;
    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => body_bytes += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => break,
        }
    }
    if let Some(n) = query_param(&query, "bytes").and_then(|v| v.parse::<usize>().ok()) {
        return Ok(Response::builder()
            .status(status)
            .body(full(vec![b'x'; n]))
            .unwrap());
    }
    if let Some(n) = query_param(&query, "chunks").and_then(|v| v.parse::<u32>().ok()) {
        let every = query_param(&query, "every")
            .and_then(|v| parse_duration(v).ok())
            .unwrap_or(Duration::from_millis(100));
        return Ok(Response::builder()
            .status(status)
            .header("content-type", "text/event-stream")
            .body(Chunks::new(n, every).boxed())
            .unwrap());
    }
    let mut text = format!(
        "hello from sluicegate demo-function pid={} method={method} path={path} query={query} call_id={call_id} {forwarded} body_bytes={body_bytes} inflight={inflight} max_inflight={} received_unix_ns={received}\n",
        std::process::id(),
        MAX_INFLIGHT.load(Ordering::SeqCst)
    );
    if let Some(name) = query_param(&query, "env") {
        let value = std::env::var(name).unwrap_or_else(|_| "<unset>".into());
        text.push_str(&format!("env {name}={value}\n"));
    }
    if query_param(&query, "headers").is_some() {
        for (name, value) in &headers {
            text.push_str(&format!(
                "header {name}: {}\n",
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
    }
    Ok(Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(full(text))
        .unwrap())
}

/// `n` server-sent events, `data: chunk i`, one every `every`.
struct Chunks {
    left: u32,
    sent: u32,
    every: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Chunks {
    fn new(n: u32, every: Duration) -> Chunks {
        Chunks {
            left: n,
            sent: 0,
            every,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
        }
    }
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        if self.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let next = tokio::time::Instant::now() + self.every;
        self.sleep.as_mut().reset(next);
        self.left -= 1;
        self.sent += 1;
        let line = format!("data: chunk {}\n\n", self.sent);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(line)))))
    }
}

fn unix_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Serves the demo function on `addr` until the process is killed.
pub async fn serve(addr: SocketAddr, options: DemoOptions) -> std::io::Result<()> {
    if let Some(message) = &options.fail_start {
        eprintln!("demo-function: {message}");
        std::process::exit(1);
    }
    let jitter = if options.startup_jitter.is_zero() {
        Duration::ZERO
    } else {
        let spread = (std::process::id() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) % 1000;
        options.startup_jitter.mul_f64(spread as f64 / 1000.0)
    };
    let warm_up = options.startup_delay + jitter;
    if !warm_up.is_zero() {
        eprintln!("demo-function: warming up for {warm_up:?}");
        tokio::time::sleep(warm_up).await;
    }
    let listener = TcpListener::bind(addr).await?;
    eprintln!(
        "demo-function: listening on {} at unix_ns={}",
        listener.local_addr()?,
        unix_nanos()
    );
    loop {
        let (stream, _) = listener.accept().await?;
        let options = options.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, options.clone()));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
