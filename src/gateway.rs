//! The gateway's shared state and its request entry point.
//!
//! [`Gateway::handle`] routes each request: function invocations go through [`invoke`], which
//! finds the function once, counts the arrival, forwards (see `proxy`) and records the outcome;
//! everything else is answered here or in `system`.
//!
//! [`invoke`]: Gateway::invoke

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
use crate::metrics::Metrics;
use crate::proxy::{self, Peer, CALL_ID, START_TIME};
use crate::router::{route, Route, FUNCTION_PREFIX};
use crate::system;

/// State shared by every connection.
pub struct Gateway {
    /// Listener and connection settings.
    pub config: GatewayConfig,
    /// Every configured function, by name.
    pub functions: DashMap<String, Arc<Function>, NameHasher>,
    /// Every metric family.
    pub metrics: Metrics,
    draining: AtomicBool,
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
            draining: AtomicBool::new(false),
        }
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

    /// Answers one request.
    pub async fn handle(&self, req: Request<Incoming>, peer: &Peer) -> Response<ResponseBody> {
        // The hot path first: a sync invocation, with the function found once.
        if let Route::Invoke { name, .. } = route(req.method(), req.uri().path()) {
            let name_end = FUNCTION_PREFIX.len() + name.len();
            return match self.function(name) {
                Some(function) => self.invoke(req, function, name_end, peer).await,
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
                Some(_) => Err(GatewayError::NotImplemented(
                    "async invocation is not available in this build; use /function/",
                )),
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

    /// A sync invocation, from arrival to response head.
    async fn invoke(
        &self,
        req: Request<Incoming>,
        function: Arc<Function>,
        name_end: usize,
        peer: &Peer,
    ) -> Response<ResponseBody> {
        let arrived = Instant::now();
        function.arrived(arrived);
        let call_id = req
            .headers()
            .get(&CALL_ID)
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .cloned()
            .unwrap_or_else(new_call_id);

        let result = if self.is_draining() {
            Err(GatewayError::Draining)
        } else {
            proxy::forward(&function, req, name_end, peer, &call_id, arrived).await
        };
        let mut resp = match result {
            Ok(resp) => resp,
            Err(e) => {
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
