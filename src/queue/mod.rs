//! Async invocations: accept into the durable store, dispatch through the same admission path,
//! report the outcome to the callback. [`AsyncQueue`] is the face the rest of the gateway sees.
//!
//! The path of one invocation:
//!
//! 1. **accept** ([`AsyncQueue::accept`]): validate `X-Callback-Url` (`callback`), refuse a body
//!    over the limit, reserve a place in the function's backlog (`backlog`, `async_max_backlog`),
//!    read the body whole, rewrite the headers as for a sync call, and store it; `202` only once
//!    the store says it is durable (redb: the group commit is fsync'd). Nothing is acknowledged
//!    that was not stored.
//! 2. **dispatch** (`dispatch`, one task per function): the store hands out what is due, and each
//!    is admitted through [`Function::admit`], exactly as sync requests are: per-replica cap, FIFO
//!    queue, cold start from zero, counted in the window. The dispatcher waits for one admission
//!    at a time, so async work holds at most one place in the function's queue (sync requests
//!    arriving meanwhile queue ahead of the next async one and cannot be starved), and keeps at
//!    most `async_concurrency` attempts in flight.
//! 3. **outcome** (`attempt`): the function's answer 1xx-3xx succeeds; 408, 429, 500, 502, 503,
//!    504 (the function's or the gateway's own) are retried after a doubling wait (at least the
//!    `Retry-After` asked for; `retry`) up to `async_max_attempts`, then dead-lettered; anything
//!    else fails at once. The final answer is POSTed to the callback URL (retried a few times),
//!    and only then is the invocation settled in the store. A crash before that means the
//!    invocation is handed out again: at least once.
//!
//! # Who owns redelivery and retry timing
//!
//! The dispatcher owns the retry *policy*, computed from the function's config: whether an
//! attempt is retried, how long to wait (`async_initial_retry_wait` doubling up to
//! `async_max_retry_wait`, at least the `Retry-After` asked for) and when attempts run out. The
//! store owns *delivery and its timing*: it is told "done", "retry after D" or "dead letter" for
//! each attempt ([`AsyncStore::settle`]) and hands the invocation out again when D is over
//! ([`AsyncStore::next`]); the dispatcher keeps no cursor, timer or redelivery of its own.
//!
//! * The embedded redb store ([`RedbStore`]) stores the attempt count and keeps a cursor and the
//!   retry timers in this process: after a restart every stored invocation is due at once, with
//!   the attempts it had made.
//! * A broker (NATS JetStream, with a durable pull consumer) maps the same settlements onto ack,
//!   nak with delay, and term plus a publish to a dead-letter subject. Its own ack wait and
//!   redelivery already bring an unsettled or delayed message back, across gateway restarts and
//!   across several gateways; timers here as well would deliver twice or fight the broker's.

mod attempt;
mod backlog;
mod callback;
mod dispatch;
mod records;
mod retry;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use crate::incoming::Incoming;
use bytes::Bytes;
use dashmap::DashMap;
use http::header::{HeaderValue, CONTENT_LENGTH, EXPECT};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::config::AsyncStoreLocation;
use crate::error::GatewayError;
use crate::forwarding::{self, Peer};
use crate::function::Function;
use crate::upstream::CallbackClient;
use backlog::Lane;
use callback::parse_callback_url;
use dispatch::{Ctx, Dispatcher};

pub use callback::{
    ATTEMPTS, CALLBACK_ATTEMPTS, CALLBACK_TIMEOUT, CALLBACK_URL, DURATION_SECONDS, FUNCTION_NAME,
    FUNCTION_STATUS,
};
pub use records::{rfc3339, DeadLetterAction, MAX_LISTED_DEAD_LETTERS};
pub use retry::{retry_wait, MAX_HONOURED_RETRY_AFTER};
pub use store::{
    check_record_round_trip, AsyncRecord, AsyncState, AsyncStore, DeadLetter, DeadLetters,
    Invocation, JetStreamStore, Pending, RedbStore, Settlement, StoreError, StoreFuture,
};

/// A dispatcher's task, and the switch that retires it.
type Running = (tokio::task::JoinHandle<()>, watch::Sender<bool>);

/// The async queue of every configured function: the store, and one dispatcher per function.
pub struct AsyncQueue {
    store: Result<Arc<dyn AsyncStore>, String>,
    pending_at_start: u64,
    /// One lane per function; a concurrent map because discovered functions come and go.
    lanes: Arc<DashMap<Arc<str>, Arc<Lane>>>,
    stop: watch::Sender<bool>,
    deadline: watch::Sender<Option<Instant>>,
    client: CallbackClient,
    /// Each function's dispatcher task, and the switch that retires it.
    dispatchers: Mutex<HashMap<Arc<str>, Running>>,
    /// Dispatchers retired while the gateway runs, finishing their attempts.
    retired: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// For a store shared with other gateways: the task reading the backlog from it.
    resync: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// How long the store keeps the records of finished invocations (for `expiresAt`).
    retention: std::time::Duration,
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
    /// Opens the store `location` names (a redb file, or a NATS server with JetStream whose
    /// deliveries are leased for `ack_wait`), keeping the records of finished invocations for
    /// `retention`, and starts the queue on it (see [`AsyncQueue::with_store`]). When the store
    /// cannot be opened the gateway still runs: async invocations get `503` naming the reason,
    /// sync calls are unaffected.
    pub async fn start(
        location: &AsyncStoreLocation,
        ack_wait: std::time::Duration,
        retention: std::time::Duration,
        functions: Vec<Arc<Function>>,
        client: CallbackClient,
    ) -> AsyncQueue {
        let path = match location {
            AsyncStoreLocation::File(path) => path,
            AsyncStoreLocation::Nats(url) => {
                let store = JetStreamStore::connect(url, ack_wait, retention)
                    .await
                    .map(|store| Arc::new(store) as Arc<dyn AsyncStore>)
                    .map_err(|e| {
                        let reason = e.to_string();
                        warn!(%url, error = %reason, "async store unavailable: async invocations will be refused with 503");
                        reason
                    });
                let mut queue = AsyncQueue::with_store(store, functions, client).await;
                queue.retention = retention;
                return queue;
            }
        };
        let owned = path.to_owned();
        let opened =
            tokio::task::spawn_blocking(move || RedbStore::open_with_retention(&owned, retention))
                .await
                .unwrap_or_else(|e| Err(StoreError::Database(format!("open panicked: {e}"))));
        let store = opened
            .map(|store| Arc::new(store) as Arc<dyn AsyncStore>)
            .map_err(|e| {
                let reason = e.to_string();
                warn!(path = %path.display(), error = %reason, "async store unavailable: async invocations will be refused with 503");
                reason
            });
        let mut queue = AsyncQueue::with_store(store, functions, client).await;
        queue.retention = retention;
        queue
    }

    /// Starts the queue on `store` (or on none, for the reason given): sets each function's
    /// backlog gauge to what the store holds for it, and starts one dispatcher per function.
    pub async fn with_store(
        store: Result<Arc<dyn AsyncStore>, String>,
        functions: Vec<Arc<Function>>,
        client: CallbackClient,
    ) -> AsyncQueue {
        let (stop, _) = watch::channel(false);
        let (deadline, _) = watch::channel(None);
        let (store, pending) = match store {
            Ok(store) => match store.pending().await {
                Ok(pending) => (Ok(store), pending),
                Err(e) if store.shared() => {
                    // A server that may come back: the backlog is read again every second.
                    warn!(error = %e, "async store not reachable yet: async invocations get 503 until it is");
                    (Ok(store), BTreeMap::new())
                }
                Err(e) => {
                    let reason = e.to_string();
                    warn!(error = %reason, "async store cannot be read: async invocations will be refused with 503");
                    store.close().await;
                    (Err(reason), BTreeMap::new())
                }
            },
            Err(reason) => (Err(reason), BTreeMap::new()),
        };
        let queue = AsyncQueue {
            pending_at_start: pending.values().sum(),
            store,
            lanes: Arc::new(DashMap::new()),
            stop,
            deadline,
            client,
            dispatchers: Mutex::new(HashMap::new()),
            retired: Mutex::new(Vec::new()),
            resync: Mutex::new(None),
            retention: crate::config::DEFAULT_ASYNC_RECORD_RETENTION,
        };
        for function in functions {
            let stored = pending.get(&*function.name).copied().unwrap_or(0);
            queue.add_lane(function, stored);
        }
        for (name, count) in &pending {
            if !queue.lanes.contains_key(name.as_str()) {
                warn!(function = %name, pending = count, "async store holds invocations of a function that is not configured; they stay stored");
            }
        }
        if let Ok(store) = &queue.store {
            debug!(?store, "async store open");
            if store.shared() {
                let task =
                    backlog::resync(store.clone(), queue.lanes.clone(), queue.stop.subscribe());
                *queue.resync.lock().unwrap() = Some(tokio::spawn(task));
            }
        }
        queue
    }

    /// Adds a function that appeared while the gateway runs (Kubernetes discovery): its backlog
    /// gauge is what the store holds for it, and its dispatcher starts.
    pub async fn add_function(&self, function: Arc<Function>) {
        let stored = match &self.store {
            Ok(store) => store.pending_count(&function.name).await.unwrap_or(0),
            Err(_) => 0,
        };
        self.add_lane(function, stored);
    }

    /// Stops dispatching a function that went away: its dispatcher takes nothing new, and the
    /// attempts it started run to their end. What the store holds for it stays stored and is
    /// dispatched again if the function comes back.
    pub fn remove_function(&self, name: &str) {
        self.lanes.remove(name);
        self.retire_dispatcher(name);
    }

    /// Retires the dispatcher of `name`, if one runs (see [`AsyncQueue::remove_function`]).
    fn retire_dispatcher(&self, name: &str) {
        let Some((task, retire)) = self.dispatchers.lock().unwrap().remove(name) else {
            return;
        };
        retire.send_replace(true);
        let mut retired = self.retired.lock().unwrap();
        retired.retain(|t| !t.is_finished());
        retired.push(task);
    }

    fn add_lane(&self, function: Arc<Function>, stored: u64) {
        function.metrics.async_backlog.set(stored as i64);
        let name = function.name.clone();
        let lane = Arc::new(Lane::new(function, stored));
        self.lanes.insert(name.clone(), lane.clone());
        if let Ok(store) = &self.store {
            store.configure(&name, lane.function.config.async_max_attempts);
        }
        // A function replaced while the gateway runs: the old dispatcher finishes what it
        // started, the new one takes what comes next.
        self.retire_dispatcher(&name);
        // A function with nothing stored gets its dispatcher at its first accepted invocation;
        // with a store several gateways share, at once: another gateway may accept what this
        // one dispatches.
        let shared = self.store.as_ref().is_ok_and(|s| s.shared());
        if stored > 0 || shared {
            self.ensure_dispatcher(&lane);
        }
    }

    /// Starts the lane's dispatcher unless it runs (or the queue is shutting down).
    fn ensure_dispatcher(&self, lane: &Arc<Lane>) {
        let Ok(store) = &self.store else {
            return;
        };
        let mut dispatchers = self.dispatchers.lock().unwrap();
        if dispatchers.contains_key(&lane.function.name) || *self.stop.borrow() {
            return;
        }
        let (retire, retire_rx) = watch::channel(false);
        let dispatcher = Dispatcher {
            ctx: Arc::new(Ctx {
                lane: lane.clone(),
                store: store.clone(),
                client: self.client.clone(),
                stop: self.stop.subscribe(),
            }),
            deadline: self.deadline.subscribe(),
            retire: retire_rx,
        };
        dispatchers.insert(
            lane.function.name.clone(),
            (tokio::spawn(dispatcher.run()), retire),
        );
    }

    /// The gateway state kept with the invocations (see [`crate::state`]), or why the store
    /// is unavailable.
    pub fn state(&self) -> Result<Arc<dyn crate::state::StateStore>, String> {
        match &self.store {
            Ok(store) => Ok(store.clone() as Arc<dyn crate::state::StateStore>),
            Err(reason) => Err(reason.clone()),
        }
    }

    /// Invocations the store held when the queue started (all functions).
    pub fn pending_at_start(&self) -> u64 {
        self.pending_at_start
    }

    /// The store, when it is open.
    pub fn store(&self) -> Option<&Arc<dyn AsyncStore>> {
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
        let lane = self
            .lanes
            .get(&*function.name)
            .map(|l| l.value().clone())
            .ok_or_else(|| {
                GatewayError::Internal(format!("no async lane for {}", function.name))
            })?;
        self.ensure_dispatcher(&lane);

        // 1. The callback URL, if any, must be one we can call.
        let callback = match req.headers().get(&CALLBACK_URL) {
            Some(value) => Some(parse_callback_url(value, &self.client).await?),
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
        let token_name = parts.extensions.remove::<forwarding::TokenName>();
        let headers = &mut parts.headers;
        forwarding::rewrite_request_headers(
            headers,
            peer,
            forwarded_host,
            call_id,
            false,
            token_name,
        );
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

        // 6. Stored durably, or refused. In a task of its own, so that a client that goes away
        //    before hearing 202 does not cancel it: the reservation turns into backlog either way.
        let store = store.clone();
        let name = function.name.clone();
        let stored = tokio::spawn(async move {
            store.insert(&name, &invocation).await?;
            reservation.stored();
            Ok::<(), StoreError>(())
        });
        match stored.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(GatewayError::AsyncStoreUnavailable(e.to_string())),
            Err(e) => Err(GatewayError::AsyncStoreUnavailable(format!(
                "the store write failed: {e}"
            ))),
        }
    }

    /// Stops starting attempts (called when the gateway begins to drain).
    pub fn begin_shutdown(&self) {
        self.stop.send_replace(true);
    }

    /// Lets attempts in flight finish until `deadline`, abandons the rest (they stay stored and
    /// run again at the next start), and closes the store.
    pub async fn shutdown(&self, deadline: Instant) {
        self.deadline.send_replace(Some(deadline));
        self.stop.send_replace(true);
        let mut dispatchers: Vec<_> = std::mem::take(&mut *self.dispatchers.lock().unwrap())
            .into_values()
            .map(|(task, _)| task)
            .collect();
        dispatchers.extend(std::mem::take(&mut *self.retired.lock().unwrap()));
        for d in dispatchers {
            let _ = d.await;
        }
        if let Some(resync) = self.resync.lock().unwrap().take() {
            resync.abort();
        }
        if let Ok(store) = &self.store {
            store.close().await;
        }
    }
}

/// A `202 Accepted` for a stored invocation.
pub fn accepted() -> Response<crate::body::ResponseBody> {
    let mut resp = Response::new(crate::body::ResponseBody::empty());
    *resp.status_mut() = StatusCode::ACCEPTED;
    resp
}

/// Sleeps until `at`, or forever.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
