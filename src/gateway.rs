//! The gateway's shared state and a request's phases, in one place.
//!
//! [`Gateway::serve`] routes each request once. A sync invocation of a known function (the hot
//! path) is routed before any future exists, so that the one boxed future per request is
//! `invoke` itself; everything else is answered by `Gateway::answer`.
//!
//! A request's phases, in order, for both kinds of invocation:
//!
//! | phase | sync (`invoke`) | async (`Gateway::invoke_async`, then the queue's dispatcher) |
//! |---|---|---|
//! | route | `router::route`, once, in `serve` | the same |
//! | token | `auth = "token"` only: `Controls::authenticate` in `serve` (`401`, nothing counted but the status) | the same, in `invoke_async` |
//! | count | `Function::arrived` (window, started) | `started` now; the window counts the dispatch |
//! | limits | `limits`: draining, declared body size | the same at accept; then `AsyncQueue::accept` (backlog, body, store) |
//! | admit | `Function::admit` | the dispatcher's `Function::admit` |
//! | forward with the permit | `proxy::forward` | `proxy::send_stored` |
//! | respond | `respond`: status counted, `X-Start-Time`, `X-Call-Id` | `202` via `respond`; the function's answer goes to the callback |
//!

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::incoming::Incoming;
use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use tokio::time::Instant;
use tracing::debug;

use crate::body::ResponseBody;
use crate::config::{Auth, GatewayConfig};
use crate::conn::RequestGuard;
use crate::error::GatewayError;
use crate::forwarding::{self, content_length, Peer, CALL_ID, START_TIME};
use crate::function::{Function, Functions};
use crate::metrics::{AsyncOutcome, Metrics};
use crate::proxy;
use crate::queue::{self, AsyncQueue};
use crate::router::{route, Route, ASYNC_FUNCTION_PREFIX, FUNCTION_PREFIX};
use crate::system::{self, Admin};

/// The answer to one request on its way: the one boxed future per request.
pub type Serving = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;

/// State shared by every connection, built once at start.
pub struct Gateway {
    /// Listener and connection settings.
    pub config: GatewayConfig,
    /// Every function, by name.
    pub functions: Functions,
    /// Every metric family.
    pub metrics: Metrics,
    draining: AtomicBool,
    queue: Option<AsyncQueue>,
    /// What `POST /system/reload` calls (set once at start, when there is a file to reload).
    reloader: std::sync::OnceLock<Arc<dyn system::Reload>>,
    /// Pauses and service tokens, kept in the state store.
    controls: system::Controls,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("functions", &self.functions.len())
            .finish_non_exhaustive()
    }
}

/// A request's route, owned, for the answers that are not the hot path (the request moves into
/// the answer's future, so the borrowed [`Route`] cannot).
enum Target {
    InvokeAsync(Arc<Function>, usize),
    Unknown(String),
    Metrics,
    Healthz,
    Readyz,
    ListFunctions,
    GetFunction(String),
    ScaleFunction(String),
    PauseFunction(String),
    ResumeFunction(String),
    ListTokens(String),
    CreateToken(String),
    RevokeToken(String, String),
    Reload,
    AsyncRecord(String),
    DeadLetters,
    DeadLetter(String, u64, queue::DeadLetterAction),
    MalformedName,
    MethodNotAllowed(&'static str),
    NotFound,
}

impl Gateway {
    /// A gateway serving `functions`, with the async `queue` if one is running.
    pub fn new(
        config: GatewayConfig,
        metrics: Metrics,
        functions: Functions,
        queue: Option<AsyncQueue>,
    ) -> Gateway {
        let state = match &queue {
            Some(queue) => queue.state(),
            None => Err("this gateway runs without an async store".into()),
        };
        Gateway {
            config,
            functions,
            metrics,
            draining: AtomicBool::new(false),
            queue,
            reloader: std::sync::OnceLock::new(),
            controls: system::Controls::new(state),
        }
    }

    /// Pauses and service tokens (kept in the state store; see [`system::Controls`]).
    pub fn controls(&self) -> &system::Controls {
        &self.controls
    }

    /// Sets what `POST /system/reload` calls (once; later calls are ignored).
    pub fn set_reloader(&self, reloader: Arc<dyn system::Reload>) {
        let _ = self.reloader.set(reloader);
    }

    /// The async queue, if it is running.
    pub fn queue(&self) -> Option<&AsyncQueue> {
        self.queue.as_ref()
    }

    /// The gateway's durable state (paused functions, tokens, idle histories), kept in the async
    /// store; or why there is none.
    pub fn state(&self) -> Result<Arc<dyn crate::state::StateStore>, String> {
        match &self.queue {
            Some(queue) => queue.state(),
            None => Err("this gateway runs without an async store".into()),
        }
    }

    /// Finds a function by name (one lookup; the map's shard lock is released at once).
    pub fn function(&self, name: &str) -> Option<Arc<Function>> {
        self.functions.get(name)
    }

    /// Whether the gateway is draining for shutdown.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Starts draining: `/readyz` turns 503, new requests get 503.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    fn admin(&self) -> Admin<'_> {
        Admin {
            functions: &self.functions,
            token: self.config.admin_token.as_ref().map(|t| t.expose()),
            refusal: self.config.admin_refusal(),
            controls: &self.controls,
        }
    }

    /// Answers one request from a connection; the response body carries `guard`. The request is
    /// routed here, once.
    ///
    /// The hot path, a sync invocation of a known function, is routed before any future exists,
    /// so that the one boxed future per request is the invocation itself: every async layer
    /// between the connection and the replica costs a copy of everything below it (measured with
    /// callgrind: ~0.9k instructions per request for two layers).
    pub fn serve(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        peer: &Peer,
        guard: RequestGuard,
    ) -> Serving {
        let target = match route(req.method(), req.uri().path()) {
            Route::Invoke { name, .. } => match self.function(name) {
                Some(function) => {
                    let name_end = FUNCTION_PREFIX.len() + name.len();
                    // Before anything is counted: a caller without a valid token wakes nothing.
                    if function.config.auth == Auth::Token {
                        if let Err(e) = self.controls.authenticate(&function, &mut req) {
                            let call_id = forwarding::call_id(&req);
                            let mut resp = respond(&function, Err(e), call_id, Instant::now());
                            resp.body_mut().set_guard(guard);
                            return Box::pin(std::future::ready(Ok(resp)));
                        }
                    }
                    let draining = self.is_draining();
                    return Box::pin(invoke(
                        function,
                        req,
                        name_end,
                        peer.clone(),
                        draining,
                        guard,
                    ));
                }
                None => Target::Unknown(name.to_owned()),
            },
            Route::InvokeAsync { name, .. } => match self.function(name) {
                Some(function) => {
                    Target::InvokeAsync(function, ASYNC_FUNCTION_PREFIX.len() + name.len())
                }
                None => Target::Unknown(name.to_owned()),
            },
            Route::Metrics => Target::Metrics,
            Route::Healthz => Target::Healthz,
            Route::Readyz => Target::Readyz,
            Route::ListFunctions => Target::ListFunctions,
            Route::GetFunction(name) => Target::GetFunction(name.to_owned()),
            Route::ScaleFunction(name) => Target::ScaleFunction(name.to_owned()),
            Route::PauseFunction(name) => Target::PauseFunction(name.to_owned()),
            Route::ResumeFunction(name) => Target::ResumeFunction(name.to_owned()),
            Route::ListTokens(name) => Target::ListTokens(name.to_owned()),
            Route::CreateToken(name) => Target::CreateToken(name.to_owned()),
            Route::RevokeToken(name, id) => Target::RevokeToken(name.to_owned(), id.to_owned()),
            Route::Reload => Target::Reload,
            Route::AsyncRecord(call_id) => Target::AsyncRecord(call_id.to_owned()),
            Route::DeadLetters => Target::DeadLetters,
            Route::ReplayDeadLetter(name, id) => {
                Target::DeadLetter(name.to_owned(), id, queue::DeadLetterAction::Replay)
            }
            Route::DiscardDeadLetter(name, id) => {
                Target::DeadLetter(name.to_owned(), id, queue::DeadLetterAction::Discard)
            }
            Route::MalformedName => Target::MalformedName,
            Route::MethodNotAllowed(allow) => Target::MethodNotAllowed(allow),
            Route::NotFound => Target::NotFound,
        };
        let gateway = self.clone();
        let peer = peer.clone();
        Box::pin(async move {
            let mut resp = gateway.answer(target, req, &peer).await;
            resp.body_mut().set_guard(guard);
            Ok(resp)
        })
    }

    /// Answers a request that is not a sync invocation of a known function.
    async fn answer(
        &self,
        target: Target,
        req: Request<Incoming>,
        peer: &Peer,
    ) -> Response<ResponseBody> {
        let head = req.method() == Method::HEAD;
        let mut resp = match target {
            Target::InvokeAsync(function, name_end) => {
                Ok(Box::pin(self.invoke_async(function, req, name_end, peer)).await)
            }
            Target::Unknown(name) => Err(self.unknown(name)),
            Target::Metrics => Ok(self.metrics_response()),
            Target::Healthz => Ok(text(StatusCode::OK, "ok\n")),
            Target::Readyz if self.is_draining() => Err(GatewayError::Draining),
            Target::Readyz => Ok(text(StatusCode::OK, "ready\n")),
            Target::ListFunctions => system::list(self.admin(), &req),
            Target::GetFunction(name) => system::get(self.admin(), &req, &name),
            Target::ScaleFunction(name) => Box::pin(system::scale(self.admin(), req, &name)).await,
            Target::PauseFunction(name) => Box::pin(system::pause(self.admin(), req, &name)).await,
            Target::ResumeFunction(name) => {
                Box::pin(system::resume(self.admin(), req, &name)).await
            }
            Target::ListTokens(name) => system::list_tokens(self.admin(), &req, &name),
            Target::CreateToken(name) => {
                Box::pin(system::create_token(self.admin(), req, &name)).await
            }
            Target::RevokeToken(name, id) => {
                Box::pin(system::revoke_token(self.admin(), req, &name, &id)).await
            }
            Target::Reload => {
                Box::pin(system::reload(self.admin(), &req, self.reloader.get())).await
            }
            Target::AsyncRecord(_) | Target::DeadLetters | Target::DeadLetter(..) => {
                Box::pin(self.async_admin(target, &req)).await
            }
            Target::MalformedName => Err(GatewayError::MalformedName),
            Target::MethodNotAllowed(allow) => Err(GatewayError::MethodNotAllowed(allow)),
            Target::NotFound => Err(GatewayError::NoRoute(req.uri().path().to_owned())),
        }
        .unwrap_or_else(GatewayError::into_response);
        if head {
            *resp.body_mut() = ResponseBody::empty();
        }
        resp
    }

    /// The async record and dead-letter routes: admin rules first, then the queue answers.
    async fn async_admin(
        &self,
        target: Target,
        req: &Request<Incoming>,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        system::authorize(self.admin(), req)?;
        let queue = self.queue.as_ref().ok_or_else(|| {
            GatewayError::AsyncStoreUnavailable("the async queue is not running".into())
        })?;
        match target {
            Target::AsyncRecord(call_id) => queue.record_response(&call_id).await,
            Target::DeadLetters => queue.dead_letters_response(req.uri().query()).await,
            Target::DeadLetter(name, id, action) => {
                queue.dead_letter_response(&name, id, action).await
            }
            _ => unreachable!("only async admin targets come here"),
        }
    }

    fn unknown(&self, name: String) -> GatewayError {
        // No per-name series: a scan of random names must not grow the metrics.
        self.metrics.unknown_function();
        GatewayError::UnknownFunction(name)
    }

    /// An async invocation, accepted: `202` once stored (see `queue`), or the reason it was not.
    /// Counted in `gateway_function_invocation_total` with that status; the window counts the
    /// dispatch, not this.
    async fn invoke_async(
        &self,
        function: Arc<Function>,
        mut req: Request<Incoming>,
        name_end: usize,
        peer: &Peer,
    ) -> Response<ResponseBody> {
        let arrived = Instant::now();
        let call_id = forwarding::call_id(&req);
        // The token is checked at accept: what is stored was authorised.
        if function.config.auth == Auth::Token {
            if let Err(e) = self.controls.authenticate(&function, &mut req) {
                function.metrics.async_outcome(AsyncOutcome::Rejected);
                return respond(&function, Err(e), call_id, arrived);
            }
        }
        function.started();
        let coding = match forwarding::content_length(req.headers()) {
            None => transfer_coding(&req),
            Some(_) => Ok(()),
        };
        let result = match (&self.queue, coding) {
            _ if self.is_draining() => Err(GatewayError::Draining),
            (_, Err(e)) => Err(e),
            (Some(queue), Ok(())) => queue
                .accept(&function, req, name_end, peer, &call_id)
                .await
                .map(|()| {
                    let mut resp = queue::accepted();
                    resp.headers_mut().insert(&CALL_ID, call_id.clone());
                    resp
                }),
            (None, Ok(())) => Err(GatewayError::AsyncStoreUnavailable(
                "the async queue is not running".into(),
            )),
        };
        function.metrics.async_outcome(match result {
            Ok(_) => AsyncOutcome::Accepted,
            Err(_) => AsyncOutcome::Rejected,
        });
        respond(&function, result, call_id, arrived)
    }

    fn metrics_response(&self) -> Response<ResponseBody> {
        let now = Instant::now();
        self.functions.for_each(|f| {
            f.metrics.window_requests.set(f.window.sum(now) as i64);
        });
        let mut resp = Response::new(ResponseBody::full(Bytes::from(self.metrics.encode())));
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        resp
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

/// A sync invocation, phase by phase: count → limits → admit → forward with the permit →
/// respond. The response body carries `guard`.
async fn invoke(
    function: Arc<Function>,
    req: Request<Incoming>,
    name_end: usize,
    peer: Peer,
    draining: bool,
    guard: RequestGuard,
) -> Result<Response<ResponseBody>, Infallible> {
    let arrived = Instant::now();
    function.arrived(arrived);
    let call_id = forwarding::call_id(&req);
    // Each phase's result is bound before the next await, so that no match scrutinee is kept in
    // the future across it (the future is moved whole at every await above it).
    let result = 'phases: {
        let declared = match limits(&function, &req, draining) {
            Ok(declared) => declared,
            Err(e) => break 'phases Err(e),
        };
        let permit = match function.admit(arrived).await {
            Ok(permit) => permit,
            Err(rejection) => break 'phases Err(rejection.into()),
        };
        proxy::forward(&function, permit, req, name_end, &peer, &call_id, declared).await
    };
    let mut resp = respond(&function, result, call_id, arrived);
    resp.body_mut().set_guard(guard);
    Ok(resp)
}

/// What a request must pass before it takes any capacity: the gateway is not draining, and a
/// declared body is within `max_body_bytes`. Returns the declared length.
fn limits(
    function: &Function,
    req: &Request<Incoming>,
    draining: bool,
) -> Result<Option<u64>, GatewayError> {
    if draining {
        return Err(GatewayError::Draining);
    }
    let limit = function.config.max_body_bytes;
    let declared = content_length(req.headers());
    match declared {
        Some(len) if limit > 0 && len > limit => Err(GatewayError::BodyTooLarge(limit)),
        None => transfer_coding(req).map(|()| None),
        _ => Ok(declared),
    }
}

/// A body in a transfer coding other than `chunked` (`gzip, chunked`, say) is refused with `501`:
/// the gateway re-frames bodies, so the coding would be dropped on the way and the replica would
/// get coded bytes without being told (RFC 9112 §6.1). Only a request with a body and no
/// `Content-Length` is looked at: the hot path (no body) reads no header.
fn transfer_coding(req: &Request<Incoming>) -> Result<(), GatewayError> {
    use http_body::Body as _;
    if req.body().is_end_stream() {
        return Ok(());
    }
    for value in req.headers().get_all(http::header::TRANSFER_ENCODING) {
        let text = value.to_str().unwrap_or("?");
        for coding in text.split(',').map(str::trim) {
            if !coding.eq_ignore_ascii_case("chunked") {
                return Err(GatewayError::TransferCoding(coding.to_owned()));
            }
        }
    }
    Ok(())
}

/// The last phase: the function's response or the gateway's own answer, with `X-Start-Time`,
/// counted in `gateway_function_invocation_total` and the duration histogram.
///
/// Always inlined: called out of line, the response is moved in and out of it (two copies of
/// ~130 bytes per request, +58 instructions per request measured with callgrind).
#[inline(always)]
fn respond(
    function: &Function,
    result: Result<Response<ResponseBody>, GatewayError>,
    call_id: HeaderValue,
    arrived: Instant,
) -> Response<ResponseBody> {
    let mut resp = match result {
        Ok(resp) => resp,
        Err(e) => error_response(function, e, call_id),
    };
    resp.headers_mut()
        .insert(&START_TIME, forwarding::start_time());
    function
        .metrics
        .observe(resp.status().as_u16(), arrived.elapsed().as_secs_f64());
    resp
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
