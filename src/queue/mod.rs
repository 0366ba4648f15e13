//! Async invocations: accept into the durable store, dispatch through the same admission path,
//! report the outcome to the callback.
//!
//! The path of one invocation:
//!
//! 1. **accept** ([`AsyncQueue::accept`]): validate `X-Callback-Url`, refuse a body over the
//!    limit, reserve a place in the function's backlog (`async_max_backlog`), read the body whole,
//!    rewrite the headers as for a sync call, and store it; `202` only once the store's
//!    transaction is committed (fsync'd). Nothing is acknowledged that was not stored.
//! 2. **dispatch** (one [`Dispatcher`] task per function): invocations are taken oldest first
//!    (retries that are due before new ones) and admitted through [`Function::admit`], exactly as
//!    sync requests are: per-replica cap, FIFO queue, cold start from zero, counted in the window.
//!    The dispatcher waits for one admission at a time, so async work holds at most one place in
//!    the function's queue (sync requests arriving meanwhile queue ahead of the next async one and
//!    cannot be starved), and keeps at most `async_concurrency` attempts in flight.
//! 3. **outcome**: the function's answer 1xx-3xx succeeds; 408, 429, 500, 502, 503, 504 (the
//!    function's or the gateway's own) are retried after a doubling wait (at least the
//!    `Retry-After` asked for) up to `async_max_attempts`, then dead-lettered (kept in the store's
//!    dead-letter table); anything else fails at once. The final answer is POSTed to the callback
//!    URL (retried a few times), and only then is the invocation deleted from the store. A crash
//!    before that means the invocation is dispatched again at the next start: at least once.

pub mod store;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, EXPECT};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::error::{GatewayError, REASON_HEADER};
use crate::forwarding::{self, Peer, CALL_ID};
use crate::function::{retry_seconds, Function, Permit, Rejection};
use crate::metrics::{AsyncOutcome, CallbackResult};
use crate::proxy;
use crate::upstream::{HttpClient, UpstreamBody};
pub use store::{DeadLetter, Invocation, Pending, Store, StoreError};

/// Request header naming where to POST the outcome.
pub static CALLBACK_URL: HeaderName = HeaderName::from_static("x-callback-url");
/// Callback header: the function's name.
pub static FUNCTION_NAME: HeaderName = HeaderName::from_static("x-function-name");
/// Callback header: the function's status code (or the gateway's, when it could not get one).
pub static FUNCTION_STATUS: HeaderName = HeaderName::from_static("x-function-status");
/// Callback header: how long the final attempt took, seconds.
pub static DURATION_SECONDS: HeaderName = HeaderName::from_static("x-duration-seconds");
/// Callback header: attempts made.
pub static ATTEMPTS: HeaderName = HeaderName::from_static("x-sluicegate-attempts");

/// Callback deliveries per outcome before it is given up.
pub const CALLBACK_ATTEMPTS: u32 = 4;
/// Time a callback receiver has to answer.
pub const CALLBACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest `Retry-After` from a function that is honoured between attempts.
pub const MAX_HONOURED_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Pause after the store failed a read, before the dispatcher tries again.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// One function's share of the async queue: its backlog count and the dispatcher's wake-up.
struct Lane {
    function: Arc<Function>,
    /// Invocations of the function in the store, being accepted or finishing included: what
    /// `async_max_backlog` bounds.
    stored: AtomicU64,
    /// Rung when an invocation was stored.
    wake: Notify,
}

impl Lane {
    /// Reserves a place in the backlog, or refuses with `503` when it is full.
    fn reserve(self: &Arc<Self>) -> Result<Reservation, GatewayError> {
        let config = &self.function.config;
        let max = config.async_max_backlog;
        let mut current = self.stored.load(Ordering::Relaxed);
        loop {
            if current >= max {
                // Time for the whole backlog to drain at the function's observed service time.
                let mean = self.function.mean_service_time().map(|d| d.as_secs_f64());
                let estimate =
                    mean.map(|m| m * current as f64 / config.async_concurrency.max(1) as f64);
                return Err(GatewayError::AsyncBacklogFull {
                    max,
                    retry_after: retry_seconds(estimate.or(Some(5.0))),
                });
            }
            match self.stored.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Ok(Reservation {
                        lane: self.clone(),
                        armed: true,
                    })
                }
                Err(now) => current = now,
            }
        }
    }

    /// An invocation left the store (or never made it in).
    fn release(&self) {
        self.stored.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A place in a function's backlog, taken before the body is read. Dropped without
/// [`Reservation::stored`] (refused, client gone, store failed), it gives the place back.
struct Reservation {
    lane: Arc<Lane>,
    armed: bool,
}

impl Reservation {
    /// The invocation is durably stored: it counts in the backlog gauge and the dispatcher wakes.
    fn stored(mut self) {
        self.armed = false;
        self.lane.function.metrics.async_backlog.inc();
        self.lane.wake.notify_one();
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.armed {
            self.lane.release();
        }
    }
}

/// The async queue of every configured function: the store, and one dispatcher per function.
pub struct AsyncQueue {
    store: Result<Arc<Store>, String>,
    pending_at_start: u64,
    lanes: HashMap<Arc<str>, Arc<Lane>>,
    stop: watch::Sender<bool>,
    deadline: watch::Sender<Option<Instant>>,
    dispatchers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for AsyncQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncQueue")
            .field("store", &self.store)
            .field("functions", &self.lanes.len())
            .finish()
    }
}

impl AsyncQueue {
    /// Opens the store at `path`, sets each function's backlog gauge to what the store holds for
    /// it, and starts one dispatcher per function. When the store cannot be opened the gateway
    /// still runs: async invocations get `503` naming the reason, sync calls are unaffected.
    pub async fn start(
        path: &std::path::Path,
        functions: Vec<Arc<Function>>,
        client: HttpClient,
    ) -> AsyncQueue {
        let owned = path.to_owned();
        let opened = tokio::task::spawn_blocking(move || Store::open(&owned))
            .await
            .unwrap_or_else(|e| Err(StoreError::Database(format!("open panicked: {e}"))));
        let (stop, stop_rx) = watch::channel(false);
        let (deadline, deadline_rx) = watch::channel(None);
        let mut lanes = HashMap::new();
        let (store, recovered) = match opened {
            Ok((store, recovered)) => (Ok(Arc::new(store)), recovered),
            Err(e) => {
                let reason = e.to_string();
                warn!(path = %path.display(), error = %reason, "async store unavailable: async invocations will be refused with 503");
                (Err(reason), store::Recovered::default())
            }
        };
        for function in functions {
            let pending = recovered.pending.get(&*function.name).copied().unwrap_or(0);
            function.metrics.async_backlog.set(pending as i64);
            lanes.insert(
                function.name.clone(),
                Arc::new(Lane {
                    function,
                    stored: AtomicU64::new(pending),
                    wake: Notify::new(),
                }),
            );
        }
        for (name, count) in &recovered.pending {
            if !lanes.contains_key(name.as_str()) {
                warn!(function = %name, pending = count, "async store holds invocations of a function that is not configured; they stay stored");
            }
        }
        let mut dispatchers = Vec::new();
        if let Ok(store) = &store {
            debug!(path = %store.path().display(), "async store open");
            for lane in lanes.values() {
                let dispatcher = Dispatcher {
                    ctx: Arc::new(Ctx {
                        lane: lane.clone(),
                        store: store.clone(),
                        client: client.clone(),
                        stop: stop_rx.clone(),
                    }),
                    deadline: deadline_rx.clone(),
                };
                dispatchers.push(tokio::spawn(dispatcher.run()));
            }
        }
        AsyncQueue {
            pending_at_start: recovered.pending.values().sum(),
            store,
            lanes,
            stop,
            deadline,
            dispatchers: Mutex::new(dispatchers),
        }
    }

    /// Invocations the store held when it was opened (all functions).
    pub fn pending_at_start(&self) -> u64 {
        self.pending_at_start
    }

    /// The store, when it is open.
    pub fn store(&self) -> Option<&Arc<Store>> {
        self.store.as_ref().ok()
    }

    /// Accepts one async invocation of `function`: `Ok` once it is durably stored. The replica
    /// will see the path after byte `name_end` of the request path.
    pub async fn accept(
        &self,
        function: &Arc<Function>,
        req: Request<Incoming>,
        name_end: usize,
        peer: &Peer,
        call_id: &HeaderValue,
    ) -> Result<(), GatewayError> {
        let store = self
            .store
            .as_ref()
            .map_err(|reason| GatewayError::AsyncStoreUnavailable(reason.clone()))?;
        let lane = self.lanes.get(&*function.name).ok_or_else(|| {
            GatewayError::Internal(format!("no async lane for {}", function.name))
        })?;

        // 1. The callback URL, if any, must be one we can call.
        let callback = match req.headers().get(&CALLBACK_URL) {
            Some(value) => Some(parse_callback_url(value)?),
            None => None,
        };

        // 2. A declared body over the limit is refused before anything is reserved or read.
        let limit = function.config.async_max_body_bytes();
        if forwarding::content_length(req.headers()).is_some_and(|len| len > limit) {
            return Err(GatewayError::BodyTooLarge(limit));
        }

        // 3. A place in the backlog (503 when full), given back if anything below fails.
        let reservation = lane.reserve()?;

        // 4. The body, whole (the store keeps it whole).
        let (mut parts, body) = req.into_parts();
        let body = match Limited::new(body, limit as usize).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(GatewayError::BodyTooLarge(limit))
            }
            Err(e) => return Err(GatewayError::ClientBody(e.to_string())),
        };

        // 5. The request as the function will receive it: the sync path's header rules.
        let forwarded_host = forwarding::forwarded_host(&parts);
        let path_and_query = forwarding::replica_path_and_query(&parts.uri, name_end);
        let headers = &mut parts.headers;
        forwarding::rewrite_request_headers(headers, peer, forwarded_host, call_id, false);
        headers.remove(CONTENT_LENGTH);
        headers.remove(EXPECT);
        let invocation = Invocation {
            call_id: String::from_utf8_lossy(call_id.as_bytes()).into_owned(),
            path_and_query,
            headers: headers
                .iter()
                .map(|(n, v)| (n.as_str().to_owned(), Bytes::copy_from_slice(v.as_bytes())))
                .collect(),
            body,
            callback,
            accepted_unix_ms: store::unix_ms(),
        };

        // 6. Stored durably, or refused: the reservation turns into backlog on the writer thread,
        //    so it is counted even if this client goes away before hearing 202.
        let (tx, rx) = oneshot::channel();
        store.insert(&function.name, &invocation, move |result| {
            let result = result.map(|_| reservation.stored());
            let _ = tx.send(result);
        });
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(GatewayError::AsyncStoreUnavailable(e.to_string())),
            Err(_) => Err(GatewayError::AsyncStoreUnavailable(
                "the store writer stopped".into(),
            )),
        }
    }

    /// Stops starting attempts (called when the gateway begins to drain).
    pub fn begin_shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// Lets attempts in flight finish until `deadline`, abandons the rest (they stay stored and
    /// run again at the next start), and closes the store.
    pub async fn shutdown(&self, deadline: Instant) {
        let _ = self.deadline.send(Some(deadline));
        let _ = self.stop.send(true);
        let dispatchers: Vec<_> = std::mem::take(&mut *self.dispatchers.lock().unwrap());
        for d in dispatchers {
            let _ = d.await;
        }
        if let Ok(store) = &self.store {
            store.close().await;
        }
    }
}

/// Checks `X-Callback-Url`: an absolute `http://` URL with a host.
fn parse_callback_url(value: &HeaderValue) -> Result<String, GatewayError> {
    let text = value
        .to_str()
        .map_err(|_| GatewayError::BadCallbackUrl("not visible ASCII".into()))?
        .trim();
    let uri: Uri = text
        .parse()
        .map_err(|_| GatewayError::BadCallbackUrl(format!("`{text}` is not a URL")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(GatewayError::BadCallbackUrl(format!(
                "`{text}`: scheme `{other}` is not supported (only http)"
            )))
        }
        None => {
            return Err(GatewayError::BadCallbackUrl(format!(
                "`{text}` is not an absolute http:// URL"
            )))
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(GatewayError::BadCallbackUrl(format!(
            "`{text}` has no host"
        )));
    }
    Ok(text.to_owned())
}

/// What a dispatcher and its attempts share.
struct Ctx {
    lane: Arc<Lane>,
    store: Arc<Store>,
    client: HttpClient,
    stop: watch::Receiver<bool>,
}

impl Ctx {
    fn function(&self) -> &Arc<Function> {
        &self.lane.function
    }
}

/// What an attempt tells its dispatcher.
enum Event {
    /// The attempt is over and its outcome final (the callback may still be under way).
    Finished,
    /// The attempt failed and the invocation runs again at `at`.
    Retry {
        seq: u64,
        attempts: u32,
        at: Instant,
    },
}

/// One function's dispatcher: takes stored invocations oldest first and runs each through
/// admission, at most `async_concurrency` at once.
struct Dispatcher {
    ctx: Arc<Ctx>,
    /// Set when the gateway shuts down: attempts in flight get until then.
    deadline: watch::Receiver<Option<Instant>>,
}

/// The dispatcher's plan: where it is in the store, and the retries it holds.
#[derive(Default)]
struct Plan {
    /// First attempts: the next sequence number to look at.
    cursor: u64,
    /// Whether the store had nothing at or after `cursor` at the last look.
    exhausted: bool,
    /// Retries whose time has come, oldest invocation first, with the attempts already made.
    due: BTreeMap<u64, u32>,
    /// Retries waiting for their time.
    scheduled: BTreeSet<(Instant, u64, u32)>,
    /// No attempt starts before this (admission said the queue is full, or the store failed).
    paused_until: Option<Instant>,
    /// Attempts in flight.
    inflight: usize,
}

impl Plan {
    /// Moves retries whose time has come to `due`, and ends a pause that is over.
    fn promote(&mut self, now: Instant) {
        while let Some(&(at, seq, attempts)) = self.scheduled.first() {
            if at > now {
                break;
            }
            self.scheduled.pop_first();
            self.due.insert(seq, attempts);
        }
        if self.paused_until.is_some_and(|p| p <= now) {
            self.paused_until = None;
        }
    }

    /// When the dispatcher must look again: the end of a pause, else the next scheduled retry.
    fn next_timer(&self) -> Option<Instant> {
        self.paused_until
            .or_else(|| self.scheduled.first().map(|s| s.0))
    }
}

impl Dispatcher {
    /// Runs until the queue stops, then waits for attempts in flight until the shutdown deadline.
    async fn run(self) {
        let ctx = self.ctx.clone();
        let function = ctx.function().clone();
        let config = &function.config;
        let mut stop = ctx.stop.clone();
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let mut tasks = JoinSet::new();
        let mut plan = Plan::default();
        'run: loop {
            if *stop.borrow() {
                break;
            }
            plan.promote(Instant::now());
            // Start attempts while there is room, work, and no pause.
            while plan.paused_until.is_none() && plan.inflight < config.async_concurrency as usize {
                let Some(pending) = self.take_next(&mut plan).await else {
                    break;
                };
                if pending.attempts >= config.async_max_attempts {
                    // Out of attempts before a restart (or async_max_attempts was lowered).
                    plan.inflight += 1;
                    let report = Report::without_answer(&pending, "out of attempts");
                    tasks.spawn(finish(
                        ctx.clone(),
                        pending,
                        report,
                        AsyncOutcome::DeadLettered,
                        events_tx.clone(),
                    ));
                    continue;
                }
                // Admission, exactly as a sync request: one async invocation waits at a time.
                let arrived = Instant::now();
                function.arrived(arrived);
                let admitted = tokio::select! {
                    admitted = function.admit(arrived) => admitted,
                    _ = stop.changed() => {
                        plan.due.insert(pending.seq, pending.attempts);
                        break 'run;
                    }
                };
                if let Err(Rejection::QueueFull { retry_after }) = admitted {
                    // The function's queue is full of sync requests: not an attempt; wait.
                    debug!(function = %function.name, retry_after, "async dispatch paused: function queue full");
                    function
                        .metrics
                        .rejected(Rejection::QueueFull { retry_after }.reason());
                    function
                        .metrics
                        .observe(503, arrived.elapsed().as_secs_f64());
                    plan.due.insert(pending.seq, pending.attempts);
                    plan.paused_until = Some(Instant::now() + Duration::from_secs(retry_after));
                    break;
                }
                plan.inflight += 1;
                tasks.spawn(attempt(
                    ctx.clone(),
                    pending,
                    admitted,
                    arrived,
                    events_tx.clone(),
                ));
            }

            let timer = plan.next_timer();
            tokio::select! {
                _ = ctx.lane.wake.notified() => plan.exhausted = false,
                Some(event) = events.recv() => match event {
                    Event::Finished => plan.inflight -= 1,
                    Event::Retry { seq, attempts, at } => {
                        plan.inflight -= 1;
                        plan.scheduled.insert((at, seq, attempts));
                    }
                },
                _ = sleep_until_opt(timer) => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = stop.changed() => break,
            }
        }
        // Draining: attempts in flight get until the shutdown deadline (known once the server
        // has drained); the rest stay stored and run again at the next start.
        let mut deadline = self.deadline;
        loop {
            let at = *deadline.borrow_and_update();
            tokio::select! {
                next = tasks.join_next() => if next.is_none() { return },
                _ = sleep_until_opt(at) => break,
                changed = deadline.changed() => if changed.is_err() { break },
            }
        }
        info!(function = %function.name, abandoned = tasks.len(), "async attempts abandoned at shutdown; they run again at the next start");
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }

    /// The next invocation to attempt: a due retry first (oldest first), else the next one never
    /// attempted in this process. `None` when there is none (or the store failed: then a pause).
    async fn take_next(&self, plan: &mut Plan) -> Option<Pending> {
        let name = self.ctx.function().name.clone();
        loop {
            let (read, retry) = if let Some((seq, attempts)) = plan.due.pop_first() {
                let store = self.ctx.store.clone();
                let name = name.clone();
                let read = tokio::task::spawn_blocking(move || store.get(&name, seq)).await;
                (read, Some((seq, attempts)))
            } else if !plan.exhausted {
                let store = self.ctx.store.clone();
                let name = name.clone();
                let from = plan.cursor;
                (
                    tokio::task::spawn_blocking(move || store.next(&name, from)).await,
                    None,
                )
            } else {
                return None;
            };
            match read {
                Ok(Ok(Some(mut pending))) => {
                    match retry {
                        Some((_, attempts)) => pending.attempts = pending.attempts.max(attempts),
                        None => plan.cursor = pending.seq + 1,
                    }
                    return Some(pending);
                }
                // A retry whose invocation is gone (it cannot be, but nothing to do), or the end.
                Ok(Ok(None)) => {
                    if retry.is_none() {
                        plan.exhausted = true;
                    }
                }
                Ok(Err(StoreError::Corrupt { seq, reason, .. })) => {
                    warn!(function = %name, seq, reason, "async store: corrupt invocation moved to the dead-letter table");
                    if retry.is_none() {
                        plan.cursor = seq + 1;
                    }
                    let lane = self.ctx.lane.clone();
                    self.ctx
                        .store
                        .dead_letter(&name, seq, 0, 0, "corrupt record", move |r| {
                            if r.is_ok() {
                                lane.function.metrics.async_backlog.dec();
                                lane.function
                                    .metrics
                                    .async_outcome(AsyncOutcome::DeadLettered);
                                lane.release();
                            }
                        });
                }
                Ok(Err(e)) => {
                    warn!(function = %name, error = %e, "async store read failed; pausing dispatch");
                    if let Some((seq, attempts)) = retry {
                        plan.due.insert(seq, attempts);
                    }
                    plan.paused_until = Some(Instant::now() + STORE_RETRY);
                    return None;
                }
                Err(e) => {
                    warn!(function = %name, error = %e, "async store read panicked; pausing dispatch");
                    plan.paused_until = Some(Instant::now() + STORE_RETRY);
                    return None;
                }
            }
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The final word on one attempt: what the callback receives.
struct Report {
    /// The function's status, or the gateway's when it got none.
    status: u16,
    /// The function's `Content-Type` (or the gateway's `text/plain` for its own errors).
    content_type: Option<HeaderValue>,
    /// The function's response body, or the gateway's reason line.
    body: Bytes,
    /// The gateway's reason code when it answered itself.
    reason: Option<&'static str>,
    /// The failure in one line (for the dead-letter table), empty on success.
    detail: String,
    /// Attempts made.
    attempts: u32,
    /// Time the final attempt took, from admission to the end of the response body.
    duration: Duration,
}

impl Report {
    fn without_answer(pending: &Pending, detail: &str) -> Report {
        Report {
            status: pending.last_status,
            content_type: None,
            body: Bytes::new(),
            reason: None,
            detail: detail.to_owned(),
            attempts: pending.attempts,
            duration: Duration::ZERO,
        }
    }

    fn gateway(error: &GatewayError, attempts: u32, duration: Duration) -> Report {
        let mut line = error.to_string();
        line.push('\n');
        Report {
            status: error.status().as_u16(),
            content_type: Some(HeaderValue::from_static("text/plain; charset=utf-8")),
            body: Bytes::from(line),
            reason: Some(error.code()),
            detail: error.to_string(),
            attempts,
            duration,
        }
    }
}

/// Statuses that are worth another attempt (OpenFaaS Pro's list).
fn retryable(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

/// `Retry-After` in whole seconds (the HTTP-date form is not honoured).
fn retry_after_header(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs))
}

/// The wait before attempt `attempts + 1`: `async_initial_retry_wait` doubled per earlier retry,
/// at most `async_max_retry_wait`; at least the `Retry-After` asked for (up to an hour).
pub fn retry_wait(
    initial: Duration,
    max: Duration,
    attempts: u32,
    retry_after: Option<Duration>,
) -> Duration {
    let doublings = attempts.saturating_sub(1).min(31);
    let backoff = initial.saturating_mul(1u32 << doublings).min(max);
    match retry_after {
        Some(asked) => backoff.max(asked.min(MAX_HONOURED_RETRY_AFTER)),
        None => backoff,
    }
}

/// The function's answer to one attempt, read whole.
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

/// Why an attempt got no usable answer, and whether another attempt could help.
struct AttemptError {
    error: GatewayError,
    retry: bool,
}

impl From<GatewayError> for AttemptError {
    fn from(error: GatewayError) -> Self {
        let retry = retryable(error.status().as_u16());
        AttemptError { error, retry }
    }
}

/// Sends the invocation to the replica `permit` holds a slot on and reads the answer whole (kept
/// only when there is a callback to give it to). The slot is freed when this returns.
async fn call(ctx: &Ctx, pending: &Pending, permit: Permit) -> Result<Answer, AttemptError> {
    let function = ctx.function();
    let inv = &pending.invocation;
    let mut headers = HeaderMap::with_capacity(inv.headers.len() + 1);
    for (name, value) in &inv.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_maybe_shared(value.clone()),
        ) {
            headers.append(n, v);
        }
    }
    headers.insert(CONTENT_LENGTH, HeaderValue::from(inv.body.len()));
    let resp = proxy::send_stored(
        function,
        &permit,
        &inv.path_and_query,
        headers,
        inv.body.clone(),
    )
    .await?;
    let (parts, body) = resp.into_parts();
    let timeout = function.config.timeout;
    let body = if inv.callback.is_some() {
        let limit = function.config.async_max_body_bytes();
        match tokio::time::timeout(timeout, Limited::new(body, limit as usize).collect()).await {
            Err(_) => return Err(GatewayError::UpstreamTimeout(timeout).into()),
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                // Another attempt would send the same body: final.
                return Err(AttemptError {
                    error: GatewayError::UpstreamInvalid(format!(
                        "response body exceeds the async limit ({limit} bytes) for the callback"
                    )),
                    retry: false,
                });
            }
            Ok(Err(e)) => return Err(GatewayError::UpstreamReset(e.to_string()).into()),
        }
    } else {
        // Nobody will read it: drain it to free the connection and the slot.
        let drained = tokio::time::timeout(timeout, async {
            let mut body = body;
            while let Some(frame) = body.frame().await {
                frame?;
            }
            Ok::<(), crate::upstream::BoxError>(())
        })
        .await;
        match drained {
            Err(_) => return Err(GatewayError::UpstreamTimeout(timeout).into()),
            Ok(Err(e)) => return Err(GatewayError::UpstreamReset(e.to_string()).into()),
            Ok(Ok(())) => Bytes::new(),
        }
    };
    drop(permit);
    Ok(Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    })
}

/// One attempt: forward (if admitted), read the answer, then retry later or finish.
async fn attempt(
    ctx: Arc<Ctx>,
    pending: Pending,
    admitted: Result<Permit, Rejection>,
    arrived: Instant,
    events: mpsc::UnboundedSender<Event>,
) {
    let function = ctx.function().clone();
    let config = &function.config;
    let result = match admitted {
        Ok(permit) => call(&ctx, &pending, permit).await,
        Err(rejection) => Err(GatewayError::Rejected(rejection).into()),
    };
    let duration = arrived.elapsed();
    let attempts = pending.attempts + 1;
    // Counted like any invocation of the function, with the status it got.
    let (status, retry, retry_after) = match &result {
        Ok(answer) => (
            answer.status,
            retryable(answer.status),
            retry_after_header(&answer.headers),
        ),
        Err(e) => {
            if let Some(reason) = e.error.reject_reason() {
                function.metrics.rejected(reason);
            }
            (
                e.error.status().as_u16(),
                e.retry,
                e.error.retry_after().map(Duration::from_secs),
            )
        }
    };
    function.metrics.observe(status, duration.as_secs_f64());

    if retry && attempts < config.async_max_attempts {
        let wait = retry_wait(
            config.async_initial_retry_wait,
            config.async_max_retry_wait,
            attempts,
            retry_after,
        );
        function.metrics.async_outcome(AsyncOutcome::Retried);
        debug!(function = %function.name, call_id = %pending.invocation.call_id, status, attempts, wait_ms = wait.as_millis() as u64, "async attempt failed; retrying");
        let seq = pending.seq;
        let at = Instant::now() + wait;
        // The retry is scheduled once the attempt count is stored, so that it is never lost.
        ctx.store
            .attempted(&function.name, seq, attempts, status, move |result| {
                if let Err(e) = result {
                    warn!(error = %e, seq, "async store: could not record an attempt");
                }
                let _ = events.send(Event::Retry { seq, attempts, at });
            });
        return;
    }

    let (outcome, report) = match result {
        Ok(answer) => {
            let outcome = if retry {
                AsyncOutcome::DeadLettered
            } else if answer.status < 400 {
                AsyncOutcome::Succeeded
            } else {
                AsyncOutcome::Failed
            };
            let detail = if outcome == AsyncOutcome::Succeeded {
                String::new()
            } else {
                format!("function answered {}", answer.status)
            };
            let report = Report {
                status: answer.status,
                content_type: answer.headers.get(CONTENT_TYPE).cloned(),
                body: answer.body,
                reason: None,
                detail,
                attempts,
                duration,
            };
            (outcome, report)
        }
        Err(e) => {
            let outcome = if e.retry {
                AsyncOutcome::DeadLettered
            } else {
                AsyncOutcome::Failed
            };
            (outcome, Report::gateway(&e.error, attempts, duration))
        }
    };
    finish(ctx, pending, report, outcome, events).await;
}

/// The outcome is final: count it, tell the dispatcher, deliver the callback, then delete the
/// invocation from the store (or move it to the dead-letter table).
async fn finish(
    ctx: Arc<Ctx>,
    pending: Pending,
    report: Report,
    outcome: AsyncOutcome,
    events: mpsc::UnboundedSender<Event>,
) {
    let function = ctx.function().clone();
    function.metrics.async_outcome(outcome);
    function.metrics.async_backlog.dec();
    let _ = events.send(Event::Finished);
    let inv = &pending.invocation;
    match outcome {
        AsyncOutcome::DeadLettered => {
            warn!(function = %function.name, call_id = %inv.call_id, status = report.status, attempts = report.attempts, reason = %report.detail, "async invocation dead-lettered")
        }
        _ => {
            debug!(function = %function.name, call_id = %inv.call_id, status = report.status, attempts = report.attempts, "async invocation finished")
        }
    }
    if let Some(url) = &inv.callback {
        if !deliver_callback(&ctx, url, &inv.call_id, &report).await {
            // Shutting down mid-delivery: keep the invocation stored, it runs again at the next start.
            return;
        }
    }
    let lane = ctx.lane.clone();
    let done = move |result: Result<(), StoreError>| {
        if let Err(e) = result {
            warn!(error = %e, "async store: could not finish an invocation; it may run again after a restart");
        }
        lane.release();
    };
    if outcome == AsyncOutcome::DeadLettered {
        ctx.store.dead_letter(
            &function.name,
            pending.seq,
            report.attempts,
            report.status,
            &report.detail,
            done,
        );
    } else {
        ctx.store.remove(&function.name, pending.seq, done);
    }
}

/// POSTs the report to the callback URL, retrying a few times. `false` when the gateway began
/// shutting down before the delivery was settled.
async fn deliver_callback(ctx: &Ctx, url: &str, call_id: &str, report: &Report) -> bool {
    let function = ctx.function();
    let config = &function.config;
    let Ok(uri) = url.parse::<Uri>() else {
        function.metrics.callback(CallbackResult::Failed);
        return true;
    };
    let mut stop = ctx.stop.clone();
    for n in 1..=CALLBACK_ATTEMPTS {
        let mut req = Request::new(UpstreamBody::Full(
            (!report.body.is_empty()).then(|| report.body.clone()),
        ));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = uri.clone();
        let h = req.headers_mut();
        if let Ok(v) = HeaderValue::from_str(call_id) {
            h.insert(CALL_ID.clone(), v);
        }
        if let Ok(v) = HeaderValue::from_str(&function.name) {
            h.insert(FUNCTION_NAME.clone(), v);
        }
        h.insert(FUNCTION_STATUS.clone(), HeaderValue::from(report.status));
        if let Ok(v) = HeaderValue::from_str(&format!("{:.6}", report.duration.as_secs_f64())) {
            h.insert(DURATION_SECONDS.clone(), v);
        }
        h.insert(ATTEMPTS.clone(), HeaderValue::from(report.attempts));
        h.insert(CONTENT_LENGTH, HeaderValue::from(report.body.len()));
        if let Some(ct) = &report.content_type {
            h.insert(CONTENT_TYPE, ct.clone());
        }
        if let Some(reason) = report.reason {
            h.insert(REASON_HEADER, HeaderValue::from_static(reason));
        }
        let sent = tokio::time::timeout(CALLBACK_TIMEOUT, ctx.client.request(req)).await;
        let (status, retry_after) = match sent {
            Ok(Ok(resp)) => {
                let status = resp.status();
                let retry_after = retry_after_header(resp.headers());
                let _ = resp.into_body().collect().await;
                (Some(status), retry_after)
            }
            Ok(Err(e)) => {
                debug!(function = %function.name, call_id, error = %e, "callback failed");
                (None, None)
            }
            Err(_) => (None, None),
        };
        if status.is_some_and(|s| s.is_success()) {
            function.metrics.callback(CallbackResult::Delivered);
            return true;
        }
        let again = status.is_none_or(|s| retryable(s.as_u16()));
        if !again || n == CALLBACK_ATTEMPTS {
            function.metrics.callback(CallbackResult::Failed);
            warn!(function = %function.name, call_id, url, status = status.map(|s| s.as_u16()), attempts = n, "async callback not delivered; giving up");
            return true;
        }
        function.metrics.callback(CallbackResult::Retried);
        let wait = retry_wait(
            config.async_initial_retry_wait,
            config.async_max_retry_wait,
            n,
            retry_after,
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return false,
        }
    }
    true
}

/// A `202 Accepted` for a stored invocation.
pub fn accepted() -> Response<crate::body::ResponseBody> {
    let mut resp = Response::new(crate::body::ResponseBody::empty());
    *resp.status_mut() = StatusCode::ACCEPTED;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_wait_doubles_up_to_the_max_and_honours_retry_after() {
        let s = Duration::from_secs;
        assert_eq!(retry_wait(s(1), s(60), 1, None), s(1));
        assert_eq!(retry_wait(s(1), s(60), 2, None), s(2));
        assert_eq!(retry_wait(s(1), s(60), 4, None), s(8));
        assert_eq!(retry_wait(s(1), s(60), 30, None), s(60));
        assert_eq!(retry_wait(s(1), s(60), 1, Some(s(7))), s(7));
        assert_eq!(retry_wait(s(1), s(60), 4, Some(s(2))), s(8));
        assert_eq!(
            retry_wait(s(1), s(60), 1, Some(s(86_400))),
            MAX_HONOURED_RETRY_AFTER
        );
    }

    #[test]
    fn callback_urls_must_be_absolute_http() {
        let ok = |s: &'static str| parse_callback_url(&HeaderValue::from_static(s));
        assert_eq!(
            ok("http://127.0.0.1:9/cb?x=1").unwrap(),
            "http://127.0.0.1:9/cb?x=1"
        );
        assert!(ok("https://example.com/").is_err());
        assert!(ok("/relative").is_err());
        assert!(ok("example.com/cb").is_err());
        assert!(ok("not a url").is_err());
        assert!(ok("ftp://x/").is_err());
    }

    #[test]
    fn retryable_statuses_are_openfaas_list() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(retryable(s), "{s}");
        }
        for s in [200, 202, 301, 400, 404, 409, 422, 501] {
            assert!(!retryable(s), "{s}");
        }
    }
}
