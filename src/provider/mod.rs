//! Providers: where a function's replicas come from, and how many of them there are.
//!
//! A provider starts one [`Backend`] per function. The backend is told how many replicas to run
//! ([`Backend::set_replicas`]) and publishes the set of *ready* replicas through a [`Publisher`]
//! whenever it changes, so that requests waiting for capacity wake at once instead of polling.
//!
//! This module defines both sides of that seam and knows nothing of what is above it: a backend
//! publishes [`Endpoints`] to whatever implements [`Subscriber`] (the function, in the gateway; a
//! recorder, in tests), and each [`Replica`] wraps the `upstream` [`Endpoint`] requests are sent to.

pub mod cpu;
pub mod fixed;
pub mod kubernetes;
pub mod process;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::{FunctionConfig, ProviderConfig, Upstream};
use crate::upstream::Endpoint;

/// A boxed future, for the one async method of the object-safe [`Backend`] trait.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Requests a replica in slow start is given at once at first.
pub const SLOW_START_INITIAL: u32 = 4;

/// One ready replica of a function, as the request path sees it.
///
/// `inflight` is the exact number of requests this replica is serving; admission control raises it
/// with a compare-and-swap that never passes the replica's [`cap`](Replica::cap): the function's
/// `max_ongoing_requests`, or less while the replica is in slow start.
pub struct Replica {
    /// Where requests for this replica go, and its idle connections.
    endpoint: Arc<Endpoint>,
    inflight: AtomicU32,
    draining: AtomicBool,
    idle: Notify,
    /// Set while the replica is in slow start: the only thing the request path reads otherwise.
    ramping: AtomicBool,
    ramp: OnceLock<Ramp>,
}

/// A slow start: the cap grows from [`SLOW_START_INITIAL`] to the maximum over `period`, and by one
/// more for every response that came back meanwhile (so it doubles per round trip).
#[derive(Debug)]
struct Ramp {
    from: Instant,
    period: Duration,
    served: AtomicU32,
}

impl fmt::Debug for Replica {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replica")
            .field("id", &self.endpoint.id)
            .field("upstream", &self.endpoint.upstream.to_string())
            .field("inflight", &self.inflight())
            .finish()
    }
}

impl Replica {
    /// A new replica serving at `upstream`, with a fresh id.
    pub fn new(upstream: Upstream) -> Arc<Replica> {
        Arc::new(Replica {
            endpoint: Arc::new(Endpoint::new(upstream)),
            inflight: AtomicU32::new(0),
            draining: AtomicBool::new(false),
            idle: Notify::new(),
            ramping: AtomicBool::new(false),
            ramp: OnceLock::new(),
        })
    }

    /// Starts this replica's slow start over `period` (once; later calls do nothing).
    pub fn slow_start(&self, period: Duration) {
        let ramp = Ramp {
            from: Instant::now(),
            period,
            served: AtomicU32::new(0),
        };
        if self.ramp.set(ramp).is_ok() {
            self.endpoint.set_careful(true);
            self.ramping.store(true, Ordering::Release);
        }
    }

    /// Whether the replica is still in slow start.
    pub fn ramping(&self) -> bool {
        self.ramping.load(Ordering::Relaxed)
    }

    /// Requests this replica may serve at once now, given the function's `max`.
    #[inline]
    pub fn cap(&self, max: u32) -> u32 {
        if !self.ramping.load(Ordering::Relaxed) {
            return max;
        }
        self.ramp_cap(max, Instant::now())
    }

    #[cold]
    fn ramp_cap(&self, max: u32, now: Instant) -> u32 {
        let Some(ramp) = self.ramp.get() else {
            return max;
        };
        let elapsed = now.saturating_duration_since(ramp.from);
        if elapsed >= ramp.period {
            self.ramping.store(false, Ordering::Relaxed);
            self.endpoint.set_careful(false);
            return max;
        }
        let initial = SLOW_START_INITIAL.min(max);
        let by_time = u128::from(max - initial) * elapsed.as_nanos() / ramp.period.as_nanos();
        let served = u128::from(ramp.served.load(Ordering::Relaxed));
        (u128::from(initial) + by_time + served).min(u128::from(max)) as u32
    }

    /// Unique within the gateway process.
    pub fn id(&self) -> u64 {
        self.endpoint.id
    }

    /// Where requests for this replica go.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// The replica's address.
    pub fn upstream(&self) -> &Upstream {
        &self.endpoint.upstream
    }

    /// Requests this replica is serving now.
    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Takes one slot if the replica serves exactly `seen` requests and `seen < max`.
    /// Fails if the replica is draining.
    pub(crate) fn try_acquire(&self, seen: u32, max: u32) -> bool {
        if seen >= max
            || self
                .inflight
                .compare_exchange(seen, seen + 1, Ordering::SeqCst, Ordering::Relaxed)
                .is_err()
        {
            return false;
        }
        // Pairs with `drain`: either it sees our slot and waits for it, or we see it draining.
        if self.draining.load(Ordering::SeqCst) {
            self.release();
            return false;
        }
        true
    }

    /// Gives back one slot.
    pub(crate) fn release(&self) {
        if self.ramping.load(Ordering::Relaxed) {
            if let Some(ramp) = self.ramp.get() {
                ramp.served.fetch_add(1, Ordering::Relaxed);
            }
        }
        if self.inflight.fetch_sub(1, Ordering::SeqCst) == 1 && self.draining.load(Ordering::SeqCst)
        {
            self.idle.notify_waiters();
        }
    }

    /// Stops new requests reaching this replica and waits until the ones in flight are done.
    /// Call it after removing the replica from the published endpoints.
    pub async fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.inflight.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// Why a function's replicas are not starting, published so that held requests fail fast.
#[derive(Clone, Debug)]
pub struct StartFailure {
    /// One line naming the failure, e.g. `replica exited with status 1 before becoming ready`.
    pub reason: Arc<str>,
    /// When the provider will try again, if known.
    pub retry_at: Option<Instant>,
}

/// The set of ready replicas of one function.
#[derive(Clone, Debug, Default)]
pub struct Endpoints {
    /// Ready replicas, accepting requests.
    pub replicas: Vec<Arc<Replica>>,
    /// Set while the function's replicas fail to start; cleared when a new attempt begins.
    pub failure: Option<StartFailure>,
}

/// What a backend publishes to: the function it serves (or a test's recorder).
pub trait Subscriber: Send + Sync {
    /// Replaces the ready set (and failure state) and wakes requests waiting for it.
    fn publish(self: Arc<Self>, endpoints: Endpoints);
    /// The function's name, for log fields.
    fn name(&self) -> Arc<str>;
}

/// Hands a backend's endpoint updates to its [`Subscriber`]; holds it weakly, so a backend never
/// keeps its function alive.
#[derive(Clone)]
pub struct Publisher(Weak<dyn Subscriber>);

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Publisher")
            .field(&self.function_name())
            .finish()
    }
}

impl Publisher {
    /// A publisher to `subscriber`.
    pub fn new(subscriber: Weak<dyn Subscriber>) -> Publisher {
        Publisher(subscriber)
    }

    /// Replaces the subscriber's ready set (and failure state) and wakes requests waiting for it.
    pub fn publish(&self, endpoints: Endpoints) {
        if let Some(s) = self.0.upgrade() {
            s.publish(endpoints);
        }
    }

    /// The function's name, for log fields (empty once the function is gone).
    pub fn function_name(&self) -> Arc<str> {
        self.0
            .upgrade()
            .map(|s| s.name())
            .unwrap_or_else(|| Arc::from(""))
    }
}

/// One function's replica source.
pub trait Backend: Send + Sync + fmt::Debug {
    /// The provider's name (`process`, `static`).
    fn kind(&self) -> &'static str;
    /// Whether `set_replicas` can change anything.
    fn scalable(&self) -> bool;
    /// Replicas asked for (ready or not).
    fn replicas(&self) -> u32;
    /// Asks for `n` replicas. Returns at once; the published endpoints follow.
    fn set_replicas(&self, n: u32);
    /// Asks for `n` replicas only if none are asked for now. Returns whether it changed anything,
    /// so that of many requests arriving for a function at zero exactly one starts the scale-up.
    fn scale_from_zero(&self, n: u32) -> bool;
    /// Stops every replica (gracefully where the provider can) and ends the backend's tasks.
    fn shutdown(&self) -> BoxFuture<'_, ()>;
    /// CPU seconds the function's replicas have used since the backend started, a counter that
    /// only grows (for the autoscaler's `cpu` mode); `None` when the provider cannot tell.
    /// Reads the operating system: call it from the autoscaler, not the request path.
    fn cpu_seconds(&self) -> Option<f64> {
        None
    }
}

/// A function that cannot run at all (e.g. a discovered Deployment with a bad annotation): no
/// replicas, ever, and every request answered `503` with `reason`.
#[derive(Debug)]
pub struct Unavailable {
    kind: &'static str,
}

impl Unavailable {
    /// Publishes the failure at once.
    pub fn start(kind: &'static str, reason: &str, publisher: Publisher) -> Unavailable {
        publisher.publish(Endpoints {
            replicas: Vec::new(),
            failure: Some(StartFailure {
                reason: Arc::from(reason),
                retry_at: None,
            }),
        });
        Unavailable { kind }
    }
}

impl Backend for Unavailable {
    fn kind(&self) -> &'static str {
        self.kind
    }
    fn scalable(&self) -> bool {
        false
    }
    fn replicas(&self) -> u32 {
        0
    }
    fn set_replicas(&self, _n: u32) {}
    fn scale_from_zero(&self, _n: u32) -> bool {
        false
    }
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// What the backends of all functions share: the cluster connection, when a function needs it.
#[derive(Clone, Debug, Default)]
pub struct Providers {
    /// Set when some function uses `provider = "kubernetes"` (or discovery is on).
    pub cluster: Option<kubernetes::Cluster>,
}

/// Starts the backend for one function. Must be called inside a Tokio runtime.
///
/// # Panics
///
/// If the function uses `provider = "kubernetes"` and `providers` has no cluster (`lib.rs: start`
/// connects one whenever a function needs it).
pub fn start(
    config: &FunctionConfig,
    publisher: Publisher,
    providers: &Providers,
) -> Arc<dyn Backend> {
    match &config.provider {
        ProviderConfig::Kubernetes(k) => Arc::new(kubernetes::KubernetesBackend::start(
            &config.name,
            k,
            providers
                .cluster
                .as_ref()
                .expect("a cluster is connected for kubernetes functions"),
            publisher,
        )),
        ProviderConfig::Static(s) => Arc::new(fixed::StaticBackend::start(s, publisher)),
        ProviderConfig::Process(p) => Arc::new(process::ProcessBackend::start(
            &config.name,
            p,
            config.autoscaler.min_replicas,
            config.timeout,
            publisher,
        )),
    }
}
