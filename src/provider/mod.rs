//! Providers: where a function's replicas come from, and how many of them there are.
//!
//! A provider starts one [`Backend`] per function. The backend is told how many replicas to run
//! ([`Backend::set_replicas`]) and publishes the set of *ready* replicas through a [`Publisher`]
//! whenever it changes, so that requests waiting for capacity wake at once instead of polling.

pub mod fixed;
pub mod process;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::{FunctionConfig, ProviderConfig, Upstream};
pub use crate::function::Publisher;

/// A boxed future, for the one async method of the object-safe [`Backend`] trait.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One ready replica of a function, as the request path sees it.
///
/// `inflight` is the exact number of requests this replica is serving; admission control raises it
/// with a compare-and-swap that never passes `max_ongoing_requests`.
pub struct Replica {
    /// Unique within the gateway process.
    pub id: u64,
    /// Where requests for this replica go.
    pub upstream: Upstream,
    /// Idle keep-alive connections to it.
    pub pool: crate::upstream::Pool,
    inflight: AtomicU32,
    draining: AtomicBool,
    idle: Notify,
}

impl fmt::Debug for Replica {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replica")
            .field("id", &self.id)
            .field("upstream", &self.upstream.to_string())
            .field("inflight", &self.inflight())
            .finish()
    }
}

static NEXT_REPLICA_ID: AtomicU64 = AtomicU64::new(1);

impl Replica {
    /// A new replica serving at `upstream`, with a fresh id.
    pub fn new(upstream: Upstream) -> Arc<Replica> {
        Arc::new(Replica {
            id: NEXT_REPLICA_ID.fetch_add(1, Ordering::Relaxed),
            upstream,
            pool: crate::upstream::Pool::default(),
            inflight: AtomicU32::new(0),
            draining: AtomicBool::new(false),
            idle: Notify::new(),
        })
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
}

/// Starts the backend for one function. Must be called inside a Tokio runtime.
pub fn start(config: &FunctionConfig, publisher: Publisher) -> Arc<dyn Backend> {
    match &config.provider {
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
