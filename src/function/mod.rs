//! Per-function state on the request path: admission control, the queue, cold starts.
//!
//! A [`Function`] is found once per request and owns everything the request path needs:
//!
//! * the published set of ready replicas (an `ArcSwap` snapshot, read without locking);
//! * admission: at most `max_ongoing_requests` in flight per replica, taken with a compare-and-swap
//!   on the least-loaded replica; beyond that a FIFO queue of at most `max_queued_requests`;
//! * the sliding window of arrivals and the ongoing/queued gauges that `/metrics` exports and the
//!   autoscaler reads;
//! * the cold-start trigger: the first request that finds no replica asks the backend for one,
//!   exactly once however many requests arrive meanwhile.
//!
//! Slots are [`Permit`]s: dropping one frees the replica slot, decrements the gauge and hands the
//! slot to the head of the queue. Nothing is ever decremented by hand.

mod pause;
mod registry;
pub mod window;

pub use pause::PAUSED_RETRY_AFTER;
pub use registry::{Fnv, Functions, NameHasher};

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::FunctionConfig;
use crate::metrics::{FunctionMetrics, Metrics, RejectReason};
use crate::provider::{Backend, Endpoints, Publisher, Replica, Subscriber};
use crate::upstream::Endpoint;
use window::Window;

/// Why admission turned a request away. Each maps to a `503` with `Retry-After`.
#[derive(Clone, Debug, PartialEq)]
pub enum Rejection {
    /// `max_queued_requests` requests are already waiting.
    QueueFull {
        /// Suggested `Retry-After`, whole seconds ≥ 1.
        retry_after: u64,
    },
    /// Waited `queue_timeout` without a slot.
    QueueTimeout {
        /// Suggested `Retry-After`.
        retry_after: u64,
    },
    /// No replica became ready within `cold_start_timeout`.
    ColdStartTimeout {
        /// Suggested `Retry-After`.
        retry_after: u64,
    },
    /// The function's replicas fail to start.
    StartFailed {
        /// What failed, in one line.
        reason: Arc<str>,
        /// Suggested `Retry-After`.
        retry_after: u64,
    },
    /// The function is paused (`when_paused = "refuse"`), or was still paused when a request
    /// held for it (`when_paused = "hold"`) ran out of time.
    Paused {
        /// Suggested `Retry-After`.
        retry_after: u64,
    },
}

impl Rejection {
    /// The metric label for this rejection.
    pub fn reason(&self) -> RejectReason {
        match self {
            Rejection::QueueFull { .. } => RejectReason::QueueFull,
            Rejection::QueueTimeout { .. } => RejectReason::QueueTimeout,
            Rejection::ColdStartTimeout { .. } => RejectReason::ColdStartTimeout,
            Rejection::StartFailed { .. } => RejectReason::StartFailed,
            Rejection::Paused { .. } => RejectReason::Paused,
        }
    }
}

/// Whether a request had to wait for its slot, and why.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Waited {
    /// Got a slot at once.
    No,
    /// Waited in the queue behind busy replicas.
    Queued(Duration),
    /// Was held while the function had no ready replica (a cold start).
    ColdStart(Duration),
}

/// One request's slot on one replica. Dropping it frees the slot.
pub struct Permit {
    function: Arc<Function>,
    replica: Arc<Replica>,
    granted: Instant,
    waited: Waited,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("function", &self.function.name)
            .field("replica", &self.replica.id())
            .field("waited", &self.waited)
            .finish()
    }
}

impl Permit {
    /// The replica this request goes to.
    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }

    /// Where this request goes: the replica's address and connection pool.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        self.replica.endpoint()
    }

    /// Whether and how long the request waited.
    pub fn waited(&self) -> Waited {
        self.waited
    }

    /// When the slot was granted.
    pub fn granted(&self) -> Instant {
        self.granted
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let f = &self.function;
        self.replica.release();
        f.metrics.ongoing.dec();
        let now = Instant::now();
        f.service_micros.fetch_add(
            now.saturating_duration_since(self.granted).as_micros() as u64,
            Ordering::Relaxed,
        );
        f.service_count.fetch_add(1, Ordering::Relaxed);
        f.touch(now);
        // Pairs with the fence in `enqueue`: either the waiter sees our freed slot, or we see it.
        fence(Ordering::SeqCst);
        if f.metrics.queued.get() > 0 {
            f.dispatch();
        }
    }
}

struct Waiter {
    id: u64,
    tx: oneshot::Sender<Result<Permit, Rejection>>,
}

#[derive(Debug, Default)]
struct ColdStart {
    /// When the current scale-up from zero began.
    started: Option<Instant>,
    /// Smoothed cold-start time, seconds (`None` until one was seen).
    typical: Option<f64>,
}

/// Everything the gateway knows about one configured function.
pub struct Function {
    /// The function's name.
    pub name: Arc<str>,
    /// Its validated configuration.
    pub config: FunctionConfig,
    /// Its metric handles.
    pub metrics: Arc<FunctionMetrics>,
    /// Arrivals in the sliding window of `rate_seconds`.
    pub window: Window,
    endpoints: ArcSwap<Endpoints>,
    waiters: Mutex<VecDeque<Waiter>>,
    next_waiter: AtomicU64,
    /// Set once, right after construction (`lib.rs: start`): the backend is started with this
    /// function's [`Publisher`], so it cannot exist before the function does. A backend may
    /// publish from inside its start (the static one does), which rules out building both in one
    /// `Arc::new_cyclic`. Read without a lock; only cold starts and figures read it.
    backend: OnceLock<Arc<dyn Backend>>,
    cold: Mutex<ColdStart>,
    origin: Instant,
    last_activity: AtomicU64,
    service_micros: AtomicU64,
    service_count: AtomicU64,
    manual: Mutex<Option<u32>>,
    /// This gateway's share of `max_ongoing_requests` per replica: all of it for a single
    /// gateway, a part of it when several share the replicas (see `cluster`).
    share: AtomicU32,
    /// The other gateways' view, when there are several (set once at start).
    cluster: OnceLock<Arc<dyn ClusterView>>,
    /// Set while the autoscaler sleeps until this function does something.
    dormant: AtomicBool,
    /// Wakes the dormant autoscaler.
    wake: Notify,
    /// Starts the autoscaler's task, when it was not started because the function was at rest.
    parked: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Set while the function is paused (admin API): read on the request path.
    paused: AtomicBool,
    /// `true` while paused, for what waits for the resume (the autoscaler, the async dispatcher).
    pause_switch: tokio::sync::watch::Sender<bool>,
}

/// What the other gateways of a cluster add to this one's view of a function.
pub trait ClusterView: Send + Sync {
    /// The sum of the live peers' figures for `function` (this gateway's own excluded).
    fn peers(&self, function: &str, now: Instant) -> PeerFigures;
    /// Whether this gateway runs the autoscalers now.
    fn is_leader(&self) -> bool;
}

/// The live peers' figures for one function, summed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PeerFigures {
    /// Peers that reported recently (this gateway not counted).
    pub gateways: u32,
    /// Their requests being served.
    pub ongoing: u64,
    /// Their requests waiting.
    pub queued: u64,
    /// Their arrivals in the window.
    pub window_requests: u64,
    /// Their arrivals in the burst window.
    pub burst_requests: u64,
    /// The shortest time since a peer last saw activity, if any peer reported the function.
    pub idle_for: Option<Duration>,
}

impl std::fmt::Debug for Function {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Function")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The figures the autoscaler and `/system` read: the same ones `/metrics` exports.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Figures {
    /// Ready replicas.
    pub ready: u32,
    /// Replicas asked for.
    pub replicas: u32,
    /// Requests being served.
    pub ongoing: u64,
    /// Requests waiting (including those held for a cold start).
    pub queued: u64,
    /// Arrivals in the window.
    pub window_requests: u64,
    /// Arrivals in the burst window (a tenth of the window).
    pub burst_requests: u64,
    /// Time since the last request arrived or finished.
    pub idle_for: Duration,
    /// Async invocations accepted and not yet finished (the `sluicegate_async_backlog` gauge).
    pub backlog: u64,
    /// CPU seconds the function's replicas have used so far (a counter; only the `cpu` mode's
    /// autoscaler reads it from the provider, elsewhere 0).
    pub cpu_seconds: f64,
}

thread_local! {
    static RNG: Cell<u64> = const { Cell::new(0) };
}

/// A cheap per-thread xorshift, to spread ties between equally loaded replicas.
fn random() -> u64 {
    RNG.with(|cell| {
        let mut x = cell.get();
        if x == 0 {
            x = (cell as *const _ as u64) | 1;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        cell.set(x);
        x
    })
}

impl Function {
    /// Creates a function with no backend yet; see [`Function::attach`].
    pub fn new(config: FunctionConfig, metrics: &Metrics) -> Arc<Function> {
        let origin = Instant::now();
        let window = Window::new(config.autoscaler.window, origin);
        Arc::new(Function {
            name: Arc::from(config.name.as_str()),
            metrics: metrics.function(&config.name),
            window,
            endpoints: ArcSwap::from_pointee(Endpoints::default()),
            waiters: Mutex::new(VecDeque::new()),
            next_waiter: AtomicU64::new(0),
            backend: OnceLock::new(),
            cold: Mutex::new(ColdStart::default()),
            origin,
            last_activity: AtomicU64::new(0),
            service_micros: AtomicU64::new(0),
            service_count: AtomicU64::new(0),
            manual: Mutex::new(None),
            share: AtomicU32::new(config.max_ongoing_requests),
            cluster: OnceLock::new(),
            dormant: AtomicBool::new(false),
            wake: Notify::new(),
            parked: Mutex::new(None),
            paused: AtomicBool::new(false),
            pause_switch: tokio::sync::watch::Sender::new(false),
            config,
        })
    }

    /// A publisher for this function's provider.
    pub fn publisher(self: &Arc<Self>) -> Publisher {
        let subscriber: Arc<dyn Subscriber> = self.clone();
        Publisher::new(Arc::downgrade(&subscriber))
    }

    /// Connects the function to its backend (once).
    pub fn attach(&self, backend: Arc<dyn Backend>) {
        let _ = self.backend.set(backend);
    }

    /// The function's backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        self.backend.get().expect("backend attached at start")
    }

    fn touch(&self, now: Instant) {
        let nanos = now.saturating_duration_since(self.origin).as_nanos() as u64;
        self.last_activity.fetch_max(nanos, Ordering::Relaxed);
    }

    /// Counts a request's arrival (window, `invocation_started`, activity).
    pub fn arrived(&self, now: Instant) {
        self.window.record(now);
        self.started();
        self.touch(now);
    }

    /// Counts `gateway_function_invocation_started` and wakes the autoscaler if it is dormant.
    pub fn started(&self) {
        // Both `SeqCst`, as are the store and load in `dormant_until_woken`: either that sees
        // this arrival, or this sees it dormant (the same instructions as `Relaxed` on x86).
        self.metrics.started.inc_ordered();
        if self.dormant.load(Ordering::SeqCst) && self.dormant.swap(false, Ordering::SeqCst) {
            self.wake_autoscaler();
        }
    }

    /// Leaves the autoscaler unstarted until the function first does something: `start` (which
    /// spawns its task) runs then, on the request path, once. For a function at rest from the
    /// beginning (at zero, `min_replicas = 0`), so that one never invoked costs no task.
    pub fn park_autoscaler(&self, start: Box<dyn FnOnce() + Send>) {
        *self.parked.lock().unwrap() = Some(start);
        self.dormant.store(true, Ordering::SeqCst);
    }

    /// Drops the parked start of the autoscaler (see [`Function::park_autoscaler`]): the
    /// function was replaced or removed before its loop ever ran.
    pub fn unpark_autoscaler(&self) {
        drop(self.parked.lock().unwrap().take());
    }

    /// Requests this function holds itself: waiting in its queue, and in flight on its ready
    /// replicas. Exact for this object, unlike the gauges, which a function replaced by a reload
    /// shares with its successor (same name, same series).
    pub fn own_load(&self) -> usize {
        let waiting = self.waiters.lock().unwrap().len();
        let replicas = self.endpoints.load();
        waiting
            + replicas
                .replicas
                .iter()
                .map(|r| r.inflight() as usize)
                .sum::<usize>()
    }

    /// Requests counted so far, for [`Function::dormant_until_woken`].
    pub fn arrivals(&self) -> u64 {
        self.metrics.started.get_ordered()
    }

    /// The autoscaler's rest: returns `true` once something happened to the function (an arrival,
    /// a cold start, a manual scale), at once `false` if a request arrived since `arrivals` was
    /// read. Costs no timer; cancel-safe.
    pub async fn dormant_until_woken(&self, arrivals: u64) -> bool {
        self.dormant.store(true, Ordering::SeqCst);
        if self.metrics.started.get_ordered() != arrivals {
            self.dormant.store(false, Ordering::SeqCst);
            return false;
        }
        self.wake.notified().await;
        self.dormant.store(false, Ordering::SeqCst);
        true
    }

    /// Another gateway of the cluster reports this function busy: a dormant autoscaler wakes, so
    /// that the leader decides on load it does not see itself.
    pub fn peer_activity(&self) {
        if self.dormant.load(Ordering::SeqCst) && self.dormant.swap(false, Ordering::SeqCst) {
            self.wake_autoscaler();
        }
    }

    /// Whether the autoscaler has no task yet: it starts when the function first does something.
    pub fn autoscaler_parked(&self) -> bool {
        self.parked.lock().unwrap().is_some()
    }

    /// The autoscaler woke by itself (a timer), not through the function.
    pub fn leave_dormancy(&self) {
        self.dormant.store(false, Ordering::SeqCst);
    }

    /// Whether the autoscaler is asleep until this function does something.
    pub fn autoscaler_dormant(&self) -> bool {
        self.dormant.load(Ordering::SeqCst)
    }

    /// Wakes the autoscaler whether or not it has gone dormant yet (a stored wake-up is only one
    /// extra step).
    fn wake_autoscaler(&self) {
        self.dormant.store(false, Ordering::SeqCst);
        let parked = self.parked.lock().unwrap().take();
        match parked {
            Some(start) => start(),
            None => self.wake.notify_one(),
        }
    }

    /// The ready replicas now.
    pub fn ready(&self) -> usize {
        self.endpoints.load().replicas.len()
    }

    /// The current figures.
    pub fn figures(&self, now: Instant) -> Figures {
        let last = Duration::from_nanos(self.last_activity.load(Ordering::Relaxed));
        let since_origin = now.saturating_duration_since(self.origin);
        Figures {
            ready: self.ready() as u32,
            replicas: self.backend.get().map_or(0, |b| b.replicas()),
            ongoing: self.metrics.ongoing.get().max(0) as u64,
            queued: self.metrics.queued.get().max(0) as u64,
            window_requests: self.window.sum(now),
            burst_requests: self.window.sum_burst(now),
            idle_for: since_origin.saturating_sub(last),
            backlog: self.metrics.async_backlog.get().max(0) as u64,
            cpu_seconds: 0.0,
        }
    }

    /// Takes a slot on the least-loaded ready replica, if one has room.
    fn try_take_slot(&self) -> Option<Arc<Replica>> {
        let endpoints = self.endpoints.load();
        let replicas = &endpoints.replicas;
        let n = replicas.len();
        if n == 0 {
            return None;
        }
        let max = self.share.load(Ordering::Relaxed);
        for _ in 0..4 {
            let start = if n == 1 {
                0
            } else {
                (random() % n as u64) as usize
            };
            let mut best: Option<(&Arc<Replica>, u32, u32)> = None;
            for i in 0..n {
                let r = &replicas[(start + i) % n];
                let load = r.inflight();
                // Below `max` only while the replica is in slow start.
                let cap = r.cap(max);
                if load < cap && best.is_none_or(|(_, b, _)| load < b) {
                    best = Some((r, load, cap));
                    if load == 0 {
                        break;
                    }
                }
            }
            let (replica, seen, cap) = best?;
            if replica.try_acquire(seen, cap) {
                return Some(replica.clone());
            }
        }
        None
    }

    fn permit(self: &Arc<Self>, replica: Arc<Replica>, waited: Waited, granted: Instant) -> Permit {
        self.metrics.ongoing.inc();
        Permit {
            function: self.clone(),
            replica,
            granted,
            waited,
        }
    }

    /// Admits one request: a slot at once, or a place in the queue until a slot frees up, or a
    /// [`Rejection`]. Dropping the returned future (the client went away) leaves the queue at once.
    /// `arrived` is when the request arrived (the service time counts from there when no wait).
    pub async fn admit(self: &Arc<Self>, arrived: Instant) -> Result<Permit, Rejection> {
        if self.metrics.queued.get() == 0 && !self.is_paused() {
            if let Some(replica) = self.try_take_slot() {
                return Ok(self.permit(replica, Waited::No, arrived));
            }
        }
        // Boxed: the queue path is rare, and keeping it out of line keeps the common request
        // future small.
        Box::pin(self.enqueue(arrived)).await
    }

    async fn enqueue(self: &Arc<Self>, arrived: Instant) -> Result<Permit, Rejection> {
        let (rx, id, cold) = {
            let mut queue = self.waiters.lock().unwrap();
            let paused = self.is_paused();
            if paused && !self.config.when_paused.holds() {
                return Err(Rejection::Paused {
                    retry_after: PAUSED_RETRY_AFTER,
                });
            }
            if queue.is_empty() && !paused {
                if let Some(replica) = self.try_take_slot() {
                    return Ok(self.permit(replica, Waited::No, arrived));
                }
            }
            let endpoints = self.endpoints.load();
            // Paused with `when_paused = "hold"`: held as for a cold start, but none is started.
            let cold = endpoints.replicas.is_empty() || paused;
            if cold && !paused {
                if let Some(failure) = &endpoints.failure {
                    return Err(Rejection::StartFailed {
                        reason: failure.reason.clone(),
                        retry_after: retry_seconds(
                            failure
                                .retry_at
                                .map(|at| at.saturating_duration_since(arrived).as_secs_f64()),
                        ),
                    });
                }
            }
            if let Some(max) = self.config.max_queued_requests {
                if queue.len() >= max as usize {
                    drop(queue);
                    if cold {
                        // Not held, but the requests after it need the function awake.
                        self.wake_from_zero(arrived);
                    }
                    return Err(Rejection::QueueFull {
                        retry_after: self.retry_after(arrived),
                    });
                }
            }
            let (tx, rx) = oneshot::channel();
            let id = self.next_waiter.fetch_add(1, Ordering::Relaxed);
            queue.push_back(Waiter { id, tx });
            self.metrics.queued.inc();
            (rx, id, cold)
        };
        let mut wait = WaitGuard {
            function: self,
            id,
            rx: Some(rx),
        };
        if cold {
            self.wake_from_zero(arrived);
        }
        // Pairs with the fence in `Permit::drop`: a slot freed before our push is taken here.
        fence(Ordering::SeqCst);
        self.dispatch();

        let limit = if cold {
            self.config.cold_start_timeout
        } else {
            self.config.queue_timeout
        };
        let rx = wait.rx.as_mut().expect("receiver present until drop");
        match tokio::time::timeout_at(arrived + limit, rx).await {
            Ok(Ok(Ok(mut permit))) => {
                let held = permit.granted.saturating_duration_since(arrived);
                permit.waited = if cold {
                    Waited::ColdStart(held)
                } else {
                    Waited::Queued(held)
                };
                Ok(permit)
            }
            Ok(Ok(Err(rejection))) => Err(rejection),
            // The sender is only dropped after sending; treat a lost sender like a timeout.
            Ok(Err(_)) | Err(_) if self.is_paused() => Err(Rejection::Paused {
                retry_after: PAUSED_RETRY_AFTER,
            }),
            Ok(Err(_)) | Err(_) => {
                let retry_after = self.retry_after(Instant::now());
                Err(if cold && self.ready() == 0 {
                    Rejection::ColdStartTimeout { retry_after }
                } else {
                    Rejection::QueueTimeout { retry_after }
                })
            }
        }
    }

    /// Gives free slots to the head of the queue, in order, until either runs out (none while
    /// the function is paused: held requests wait for the resume).
    fn dispatch(self: &Arc<Self>) {
        if self.is_paused() {
            return;
        }
        let mut spare: Option<Permit> = None;
        {
            let mut queue = self.waiters.lock().unwrap();
            while let Some(head) = queue.front() {
                if head.tx.is_closed() {
                    queue.pop_front();
                    self.metrics.queued.dec();
                    continue;
                }
                let permit = match spare.take() {
                    Some(p) => p,
                    None => match self.try_take_slot() {
                        Some(replica) => self.permit(replica, Waited::No, Instant::now()),
                        None => break,
                    },
                };
                let waiter = queue.pop_front().expect("head exists");
                self.metrics.queued.dec();
                if let Err(Ok(unsent)) = waiter.tx.send(Ok(permit)) {
                    spare = Some(unsent);
                }
            }
        }
        // Dropped outside the lock: its release may dispatch again.
        drop(spare);
    }

    /// Fails every waiting request with `rejection` (a function that cannot start).
    fn fail_waiters(&self, rejection: Rejection) {
        let waiters: Vec<Waiter> = {
            let mut queue = self.waiters.lock().unwrap();
            let all: Vec<Waiter> = queue.drain(..).collect();
            self.metrics.queued.sub(all.len() as i64);
            all
        };
        for w in waiters {
            let _ = w.tx.send(Err(rejection.clone()));
        }
    }

    fn remove_waiter(&self, id: u64) {
        let mut queue = self.waiters.lock().unwrap();
        if let Some(pos) = queue.iter().position(|w| w.id == id) {
            queue.remove(pos);
            self.metrics.queued.dec();
        }
    }

    /// Asks the backend to scale up from zero, once for all requests arriving meanwhile.
    fn wake_from_zero(&self, now: Instant) {
        let Some(backend) = self.backend.get() else {
            return;
        };
        if self.is_paused() {
            return;
        }
        if !backend.scalable() {
            return;
        }
        let target = self.config.autoscaler.wake_replicas();
        if backend.scale_from_zero(target) {
            self.metrics.cold_starts.inc();
            self.metrics.desired.set(target as i64);
            self.cold.lock().unwrap().started = Some(now);
            self.wake_autoscaler();
            info!(function = %self.name, replicas = target, "cold start: scaling up from zero");
        }
    }

    /// Publishes a new ready set: wakes waiters, records cold starts, fails waiters on failure.
    pub fn set_endpoints(self: &Arc<Self>, endpoints: Endpoints) {
        let now = Instant::now();
        let ready = endpoints.replicas.len();
        let failure = endpoints.failure.clone();
        self.slow_start(&endpoints);
        self.endpoints.store(Arc::new(endpoints));
        self.metrics.ready.set(ready as i64);
        if ready > 0 {
            let mut cold = self.cold.lock().unwrap();
            if let Some(started) = cold.started.take() {
                let secs = now.saturating_duration_since(started).as_secs_f64();
                self.metrics.cold_start_observed(secs);
                cold.typical = Some(match cold.typical {
                    Some(t) => 0.7 * t + 0.3 * secs,
                    None => secs,
                });
                info!(function = %self.name, seconds = secs, "cold start: first replica ready");
            }
            drop(cold);
            self.dispatch();
        } else if let Some(failure) = failure {
            self.cold.lock().unwrap().started = None;
            warn!(function = %self.name, reason = %failure.reason, "function cannot start; failing held requests");
            self.fail_waiters(Rejection::StartFailed {
                retry_after: retry_seconds(
                    failure
                        .retry_at
                        .map(|at| at.saturating_duration_since(now).as_secs_f64()),
                ),
                reason: failure.reason,
            });
        }
    }

    /// Puts replicas that just turned ready into slow start (scaling providers only: a static
    /// upstream was serving before the gateway started), and while any is ramping, offers the
    /// queue their growing capacity every eighth of the period (responses coming back offer it
    /// too). The ticking task lives for one period at most.
    fn slow_start(self: &Arc<Self>, endpoints: &Endpoints) {
        let Some(period) = self.config.slow_start else {
            return;
        };
        if !self.backend.get().is_some_and(|b| b.scalable()) {
            return;
        }
        let current = self.endpoints.load();
        let mut fresh = false;
        for r in &endpoints.replicas {
            if !current.replicas.iter().any(|c| Arc::ptr_eq(c, r)) && !r.ramping() {
                r.slow_start(period);
                fresh |= r.ramping();
            }
        }
        if !fresh || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let function = Arc::downgrade(self);
        let every = (period / 8).max(Duration::from_millis(10));
        let end = Instant::now() + period + every;
        tokio::spawn(async move {
            while Instant::now() < end {
                tokio::time::sleep(every).await;
                let Some(f) = function.upgrade() else {
                    return;
                };
                if f.metrics.queued.get() > 0 {
                    f.dispatch();
                }
            }
        });
    }

    /// Smoothed time this function takes to start from zero, if it has ever done so.
    pub fn typical_cold_start(&self) -> Option<Duration> {
        self.cold
            .lock()
            .unwrap()
            .typical
            .map(Duration::from_secs_f64)
    }

    /// `Retry-After` for a capacity rejection: the remaining cold start when at zero, else the
    /// time the queue ahead should take to drain at the observed service time.
    pub fn retry_after(&self, now: Instant) -> u64 {
        let endpoints = self.endpoints.load();
        let ready = endpoints.replicas.len();
        if ready == 0 {
            let cold = self.cold.lock().unwrap();
            let estimate = cold.typical.map(|typical| {
                let elapsed = cold
                    .started
                    .map_or(0.0, |s| now.saturating_duration_since(s).as_secs_f64());
                (typical - elapsed).max(typical.min(1.0))
            });
            return retry_seconds(estimate.or(Some(5.0)));
        }
        let count = self.service_count.load(Ordering::Relaxed);
        if count == 0 {
            return 1;
        }
        let mean = self.service_micros.load(Ordering::Relaxed) as f64 / count as f64 / 1e6;
        let capacity = (ready as u64 * self.share.load(Ordering::Relaxed) as u64).max(1);
        let ahead = self.metrics.queued.get().max(0) as u64 + 1;
        retry_seconds(Some(mean * ahead as f64 / capacity as f64))
    }

    /// Mean time a replica slot was held per finished request so far, if any finished.
    pub fn mean_service_time(&self) -> Option<Duration> {
        let count = self.service_count.load(Ordering::Relaxed);
        (count > 0)
            .then(|| Duration::from_micros(self.service_micros.load(Ordering::Relaxed) / count))
    }

    /// Joins a cluster of gateways: the autoscaler decides on everyone's figures, and only on
    /// the leader (see [`Function::decision_figures`], [`Function::is_leader`]).
    pub fn join_cluster(&self, view: Arc<dyn ClusterView>) {
        let _ = self.cluster.set(view);
    }

    /// The per-replica cap this gateway admits up to.
    pub fn share(&self) -> u32 {
        self.share.load(Ordering::Relaxed)
    }

    /// Sets this gateway's share of `max_ongoing_requests` per replica (at least 1, at most all
    /// of it); a larger share admits waiting requests at once.
    pub fn set_share(self: &Arc<Self>, n: u32) {
        let n = n.clamp(1, self.config.max_ongoing_requests.max(1));
        let before = self.share.swap(n, Ordering::Relaxed);
        if n > before {
            self.dispatch();
        }
    }

    /// The other gateways' figures for this function, when there are others.
    pub fn peer_figures(&self, now: Instant) -> Option<PeerFigures> {
        self.cluster.get().map(|c| c.peers(&self.name, now))
    }

    /// The figures the autoscaler decides on: this gateway's, plus its live peers' when it is one
    /// of several (ready and asked-for replicas are the backend's, shared by all).
    pub fn decision_figures(&self, now: Instant) -> Figures {
        let mut f = self.figures(now);
        if let Some(p) = self.peer_figures(now) {
            f.ongoing += p.ongoing;
            f.queued += p.queued;
            f.window_requests += p.window_requests;
            f.burst_requests += p.burst_requests;
            if let Some(idle) = p.idle_for {
                f.idle_for = f.idle_for.min(idle);
            }
        }
        f
    }

    /// Whether this gateway's autoscaler may act: always for a single gateway, only on the
    /// leader for several.
    pub fn is_leader(&self) -> bool {
        self.cluster.get().is_none_or(|c| c.is_leader())
    }

    /// Asks the backend for `n` replicas (the autoscaler uses this).
    pub fn scale_to(&self, n: u32) {
        self.metrics.desired.set(n as i64);
        self.backend().set_replicas(n);
    }

    /// A manual scale: applied at once, and handed to the autoscaler at its next step.
    pub fn scale_manually(&self, n: u32) {
        self.scale_to(n);
        *self.manual.lock().unwrap() = Some(n);
        self.wake_autoscaler();
    }

    /// The manual scale not yet seen by the autoscaler, if any.
    pub fn take_manual(&self) -> Option<u32> {
        self.manual.lock().unwrap().take()
    }
}

impl Subscriber for Function {
    fn publish(self: Arc<Self>, endpoints: Endpoints) {
        self.set_endpoints(endpoints);
    }

    fn name(&self) -> Arc<str> {
        self.name.clone()
    }
}

/// Whole seconds, at least 1 and at most 300, rounding up.
pub fn retry_seconds(estimate: Option<f64>) -> u64 {
    match estimate {
        Some(s) if s.is_finite() && s > 0.0 => (s.ceil() as u64).clamp(1, 300),
        _ => 1,
    }
}

/// Removes a waiter from the queue when its request goes away (client disconnect or timeout).
struct WaitGuard<'a> {
    function: &'a Arc<Function>,
    id: u64,
    rx: Option<oneshot::Receiver<Result<Permit, Rejection>>>,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.function.remove_waiter(self.id);
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            // A permit sent just before we left is released here, outside the queue lock.
            if let Ok(Ok(permit)) = rx.try_recv() {
                drop(permit);
            }
        }
    }
}

#[cfg(test)]
mod tests;
