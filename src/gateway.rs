//! The gateway's shared state and its request entry point.
//!
//! [`Gateway::handle`] routes each request: function invocations go through [`invoke`], which
//! finds the function once, counts the arrival, forwards (see `proxy`) and records the outcome;
//! async invocations through [`invoke_async`], which hands them to the [`AsyncQueue`] and answers
//! `202` once they are stored; everything else is answered here or in `system`.
//!
//! [`invoke`]: Gateway::invoke
//! [`invoke_async`]: Gateway::invoke_async

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use dashmap::DashMap;
use http::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::debug;

use crate::body::ResponseBody;
use crate::config::GatewayConfig;
use crate::error::GatewayError;
use crate::function::Function;
use crate::metrics::AsyncOutcome;
use crate::metrics::Metrics;
use crate::proxy::{self, Peer, UpstreamClient, CALL_ID, START_TIME};
use crate::queue::{self, AsyncQueue};
use crate::router::{route, Route, ASYNC_FUNCTION_PREFIX, FUNCTION_PREFIX};
use crate::server::RequestGuard;
use crate::system;

/// The answer to one request on its way: the one boxed future per request.
pub type Serving = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;

/// State shared by every connection.
pub struct Gateway {
    /// Listener and connection settings.
    pub config: GatewayConfig,
    /// Every configured function, by name.
    pub functions: DashMap<String, Arc<Function>, NameHasher>,
    /// Every metric family.
    pub metrics: Metrics,
    /// A pooled general-purpose HTTP client, for async callbacks (replicas are reached through
    /// `upstream`'s per-replica pools instead).
    client: UpstreamClient,
    draining: AtomicBool,
    queue: OnceLock<AsyncQueue>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("functions", &self.functions.len())
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway with no functions yet.
    pub fn new(config: GatewayConfig, metrics: Metrics) -> Gateway {
        Gateway {
            config,
            functions: DashMap::with_hasher(NameHasher::default()),
            metrics,
            client: proxy::upstream_client(),
            draining: AtomicBool::new(false),
            queue: OnceLock::new(),
        }
    }

    /// The client used for async callbacks.
    pub fn client(&self) -> &UpstreamClient {
        &self.client
    }

    /// Attaches the async queue (once, at start).
    pub fn set_queue(&self, queue: AsyncQueue) {
        let _ = self.queue.set(queue);
    }

    /// The async queue, once started.
    pub fn queue(&self) -> Option<&AsyncQueue> {
        self.queue.get()
    }

    /// Finds a function by name (one lookup; the map's shard lock is released at once).
    pub fn function(&self, name: &str) -> Option<Arc<Function>> {
        self.functions.get(name).map(|f| f.value().clone())
    }

    /// Whether the gateway is draining for shutdown.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Starts draining: `/readyz` turns 503, new requests get 503.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Answers one request from a connection; the response body carries `guard`.
    ///
    /// The hot path, a sync invocation of a known function, is routed before any future exists,
    /// so that the one boxed future per request is the invocation itself: every async layer
    /// between the connection and the replica costs a copy of everything below it (measured with
    /// callgrind: ~0.9k instructions per request for two layers).
    pub fn serve(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: &Peer,
        guard: RequestGuard,
    ) -> Serving {
        if let Route::Invoke { name, .. } = route(req.method(), req.uri().path()) {
            if let Some(function) = self.function(name) {
                let name_end = FUNCTION_PREFIX.len() + name.len();
                let draining = self.is_draining();
                return Box::pin(invoke(
                    function,
                    req,
                    name_end,
                    peer.clone(),
                    draining,
                    Some(guard),
                ));
            }
        }
        let gateway = self.clone();
        let peer = peer.clone();
        Box::pin(async move {
            let mut resp = gateway.handle(req, &peer).await;
            resp.body_mut().set_guard(guard);
            Ok(resp)
        })
    }

    /// Answers one request.
    pub async fn handle(&self, req: Request<Incoming>, peer: &Peer) -> Response<ResponseBody> {
        if let Route::Invoke { name, .. } = route(req.method(), req.uri().path()) {
            let name_end = FUNCTION_PREFIX.len() + name.len();
            return match self.function(name) {
                Some(function) => {
                    let draining = self.is_draining();
                    let invoked = invoke(function, req, name_end, peer.clone(), draining, None);
                    match invoked.await {
                        Ok(resp) => resp,
                        Err(never) => match never {},
                    }
                }
                None => {
                    let name = name.to_owned();
                    self.unknown(&name).into_response()
                }
            };
        }
        let uri = req.uri().clone();
        let route = route(req.method(), uri.path());
        let head = req.method() == Method::HEAD;
        let mut resp = match route {
            Route::Invoke { .. } => unreachable!("handled above"),
            Route::InvokeAsync { name, .. } => match self.function(name) {
                None => Err(self.unknown(name)),
                Some(function) => {
                    let name_end = ASYNC_FUNCTION_PREFIX.len() + name.len();
                    Ok(Box::pin(self.invoke_async(req, function, name_end, peer)).await)
                }
            },
            Route::Metrics => Ok(self.metrics_response()),
            Route::Healthz => Ok(text(StatusCode::OK, "ok\n")),
            Route::Readyz if self.is_draining() => Err(GatewayError::Draining),
            Route::Readyz => Ok(text(StatusCode::OK, "ready\n")),
            Route::ListFunctions => system::list(self, &req),
            Route::GetFunction(name) => system::get(self, &req, name),
            Route::ScaleFunction(name) => Box::pin(system::scale(self, req, name)).await,
            Route::MalformedName => Err(GatewayError::MalformedName),
            Route::MethodNotAllowed(allow) => Err(GatewayError::MethodNotAllowed(allow)),
            Route::NotFound => Err(GatewayError::NoRoute(uri.path().to_owned())),
        }
        .unwrap_or_else(GatewayError::into_response);
        if head {
            *resp.body_mut() = ResponseBody::empty();
        }
        resp
    }

    fn unknown(&self, name: &str) -> GatewayError {
        // No per-name series: a scan of random names must not grow the metrics.
        self.metrics.unknown_function();
        GatewayError::UnknownFunction(name.to_owned())
    }

    /// An async invocation: `202` once stored (see `queue`), or the reason it was not. Counted in
    /// `gateway_function_invocation_total` with that status; the window counts the dispatch, not
    /// this.
    async fn invoke_async(
        &self,
        req: Request<Incoming>,
        function: Arc<Function>,
        name_end: usize,
        peer: &Peer,
    ) -> Response<ResponseBody> {
        let arrived = Instant::now();
        function.metrics.started.inc();
        let call_id = call_id(&req);
        let result = match self.queue.get() {
            _ if self.is_draining() => Err(GatewayError::Draining),
            Some(queue) => queue.accept(&function, req, name_end, peer, &call_id).await,
            None => Err(GatewayError::AsyncStoreUnavailable(
                "the async queue is not running".into(),
            )),
        };
        let mut resp = match result {
            Ok(()) => {
                function.metrics.async_outcome(AsyncOutcome::Accepted);
                let mut resp = queue::accepted();
                resp.headers_mut().insert(&CALL_ID, call_id);
                resp
            }
            Err(e) => {
                function.metrics.async_outcome(AsyncOutcome::Rejected);
                error_response(&function, e, call_id)
            }
        };
        resp.headers_mut().insert(&START_TIME, start_time());
        function
            .metrics
            .observe(resp.status().as_u16(), arrived.elapsed().as_secs_f64());
        resp
    }

    fn metrics_response(&self) -> Response<ResponseBody> {
        let now = Instant::now();
        for f in self.functions.iter() {
            f.metrics.window_requests.set(f.window.sum(now) as i64);
        }
        let mut resp = Response::new(ResponseBody::full(Bytes::from(self.metrics.encode())));
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        resp
    }
}

/// FNV-1a for the function map: its keys come from the config, never from clients, so a keyed
/// (HashDoS-resistant) hash buys nothing on a lookup-only path and SipHash costs more.
pub type NameHasher = std::hash::BuildHasherDefault<Fnv>;

/// FNV-1a, 64 bits.
#[derive(Debug)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// A plain-text response.
pub fn text(status: StatusCode, body: &'static str) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// A sync invocation, from arrival to response head (the body carries `guard`).
async fn invoke(
    function: Arc<Function>,
    req: Request<Incoming>,
    name_end: usize,
    peer: Peer,
    draining: bool,
    guard: Option<RequestGuard>,
) -> Result<Response<ResponseBody>, Infallible> {
    let arrived = Instant::now();
    function.arrived(arrived);
    let call_id = call_id(&req);
    let result = if draining {
        Err(GatewayError::Draining)
    } else {
        proxy::forward(&function, req, name_end, &peer, &call_id, arrived).await
    };
    let mut resp = match result {
        Ok(resp) => resp,
        Err(e) => error_response(&function, e, call_id),
    };
    resp.headers_mut().insert(&START_TIME, start_time());
    function
        .metrics
        .observe(resp.status().as_u16(), arrived.elapsed().as_secs_f64());
    if let Some(guard) = guard {
        resp.body_mut().set_guard(guard);
    }
    Ok(resp)
}

/// The gateway's answer for a known function's request: counted by reason, with `X-Call-Id`, and
/// `Connection: close` while draining.
fn error_response(
    function: &Function,
    e: GatewayError,
    call_id: HeaderValue,
) -> Response<ResponseBody> {
    if let Some(reason) = e.reject_reason() {
        function.metrics.rejected(reason);
    }
    debug!(function = %function.name, status = e.status().as_u16(), reason = e.code(), error = %e, "gateway answered");
    let draining = matches!(e, GatewayError::Draining);
    let mut resp = e.into_response();
    resp.headers_mut().insert(&CALL_ID, call_id);
    if draining {
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// The client's `X-Call-Id` (non-empty, at most 128 bytes), else a new one.
fn call_id<B>(req: &Request<B>) -> HeaderValue {
    req.headers()
        .get(&CALL_ID)
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .cloned()
        .unwrap_or_else(new_call_id)
}

fn new_call_id() -> HeaderValue {
    let mut buf = uuid::Uuid::encode_buffer();
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(id).expect("a uuid is a valid header value")
}

fn start_time() -> HeaderValue {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    HeaderValue::from(nanos)
}
