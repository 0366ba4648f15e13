//! Pause and resume (the admin API's `POST /system/pause-function/{name}`): a paused function
//! has no replicas, starts none, and its requests are refused (`503 paused`) or held until the
//! resume (`when_paused = "hold"`), within the function's usual bounds. What survives a restart
//! (the pause itself, the replica count to restore) is kept by the admin API
//! (`system::Controls`); this is the function's side.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::time::Instant;

use super::{Function, Rejection};

/// `Retry-After` of a `503 paused`, in seconds: nobody knows when an operator will resume the
/// function, so a client is asked to come back in half a minute rather than hammer it.
pub const PAUSED_RETRY_AFTER: u64 = 30;

impl Function {
    /// Whether the function is paused.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// Pauses the function: from now on nothing is admitted and no replica is started; the
    /// replicas it has are asked to go (their requests in flight finish as at any scale-down);
    /// with `when_paused = "refuse"` the requests waiting in its queue get `503 paused` at once,
    /// with `"hold"` they stay. Returns the replica count asked for before, or `None` when it was
    /// paused already.
    pub fn pause(self: &Arc<Self>) -> Option<u32> {
        if self.paused.swap(true, Ordering::SeqCst) {
            return None;
        }
        self.pause_switch.send_replace(true);
        self.metrics.set_paused(true);
        let before = self.backend.get().map_or(0, |b| b.replicas());
        if self.backend.get().is_some_and(|b| b.scalable()) {
            self.scale_to(0);
        }
        if !self.config.when_paused.holds() {
            self.fail_waiters(Rejection::Paused {
                retry_after: PAUSED_RETRY_AFTER,
            });
        }
        Some(before)
    }

    /// Resumes a paused function with `replicas` asked for (clamped to the function's bounds;
    /// the count it had when it was paused): the autoscaler takes it as a manual scale and goes
    /// on from there, and requests held meanwhile are served as replicas turn ready (one is
    /// started for them if `replicas` is 0). `false` when it was not paused.
    pub fn resume(self: &Arc<Self>, replicas: u32) -> bool {
        if !self.paused.swap(false, Ordering::SeqCst) {
            return false;
        }
        self.pause_switch.send_replace(false);
        self.metrics.set_paused(false);
        if self.backend.get().is_some_and(|b| b.scalable()) {
            let bounds = &self.config.autoscaler;
            let n = replicas.clamp(bounds.min_replicas, bounds.max_replicas);
            self.scale_manually(n);
            if n == 0 && self.metrics.queued.get() > 0 {
                self.wake_from_zero(Instant::now());
            }
        } else {
            self.wake_autoscaler();
        }
        // Replicas that stayed (a static upstream, or a scale-down not yet done) take the held
        // requests at once.
        self.dispatch();
        true
    }

    /// Resolves once the function is not paused (at once if it is not).
    pub async fn until_resumed(&self) {
        let mut switch = self.pause_switch.subscribe();
        let _ = switch.wait_for(|paused| !*paused).await;
    }
}
