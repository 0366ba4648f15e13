//! Each function's backlog: how many of its invocations are stored or on their way in, the
//! bound `async_max_backlog` puts on it, and the reservation an accept holds until it is stored.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::watch;
use tracing::debug;

use super::store::AsyncStore;
use crate::error::GatewayError;
use crate::function::{retry_seconds, Function};

/// One function's share of the async queue.
pub(super) struct Lane {
    pub(super) function: Arc<Function>,
    /// Invocations of the function in the store, being accepted or finishing included: what
    /// `async_max_backlog` bounds.
    stored: AtomicU64,
}

impl Lane {
    /// A lane for `function`, whose store holds `pending` of its invocations.
    pub(super) fn new(function: Arc<Function>, pending: u64) -> Lane {
        Lane {
            function,
            stored: AtomicU64::new(pending),
        }
    }

    /// Reserves a place in the backlog, or refuses with `503` when it is full.
    pub(super) fn reserve(self: &Arc<Self>) -> Result<Reservation, GatewayError> {
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
    pub(super) fn release(&self) {
        // Saturating: a shared store's count may have been read after the invocation left it.
        let _ = self
            .stored
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
    }

    /// The store says it holds `stored` invocations of the function (it is shared with other
    /// gateways, which accept and settle too): the backlog and its gauge are that.
    pub(super) fn resync(&self, stored: u64) {
        self.stored.store(stored, Ordering::Release);
        self.function.metrics.async_backlog.set(stored as i64);
    }
}

/// A place in a function's backlog, taken before the body is read. Dropped without
/// [`Reservation::stored`] (refused, client gone, store failed), it gives the place back.
pub(super) struct Reservation {
    lane: Arc<Lane>,
    armed: bool,
}

impl Reservation {
    /// The invocation is durably stored: it counts in the backlog gauge until it is final.
    pub(super) fn stored(mut self) {
        self.armed = false;
        self.lane.function.metrics.async_backlog.inc();
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.armed {
            self.lane.release();
        }
    }
}

/// How often a shared store's backlog is read.
pub(super) const RESYNC_INTERVAL: Duration = Duration::from_secs(1);

/// For a store shared with other gateways: reads every function's backlog from the store every
/// [`RESYNC_INTERVAL`] (one request for all functions) until the queue stops, so that the
/// backlog gauge, the `queue` autoscaler mode and `async_max_backlog` see every gateway's
/// invocations. A failed read leaves the figures as they were.
pub(super) async fn resync(
    store: Arc<dyn AsyncStore>,
    lanes: Arc<DashMap<Arc<str>, Arc<Lane>>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(RESYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match store.pending().await {
            Ok(counts) => {
                let lanes: Vec<_> = lanes.iter().map(|l| l.value().clone()).collect();
                for lane in lanes {
                    lane.resync(counts.get(&*lane.function.name).copied().unwrap_or(0));
                }
            }
            Err(e) => debug!(error = %e, "async store backlog not read"),
        }
    }
}
