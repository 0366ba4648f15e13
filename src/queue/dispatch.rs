//! The dispatcher: one task per function that takes what the store hands out and runs each
//! invocation through admission, at most `async_concurrency` attempts at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::attempt::{attempt, finish, Report};
use super::backlog::Lane;
use super::store::{AsyncStore, Pending, Settlement, StoreError};
use crate::function::{Function, Rejection};
use crate::metrics::AsyncOutcome;
use crate::upstream::CallbackClient;

/// Pause after the store failed a read, before the dispatcher asks again.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// What a dispatcher and its attempts share.
pub(super) struct Ctx {
    pub(super) lane: Arc<Lane>,
    pub(super) store: Arc<dyn AsyncStore>,
    pub(super) client: CallbackClient,
    /// `true` once the gateway stops starting attempts.
    pub(super) stop: watch::Receiver<bool>,
}

impl Ctx {
    pub(super) fn function(&self) -> &Arc<Function> {
        &self.lane.function
    }
}

/// One function's dispatcher.
pub(super) struct Dispatcher {
    pub(super) ctx: Arc<Ctx>,
    /// Set when the gateway shuts down: attempts in flight get until then.
    pub(super) deadline: watch::Receiver<Option<Instant>>,
    /// `true` once this dispatcher is retired (its function replaced or removed while the
    /// gateway runs): it takes nothing new, and what it started runs to its end.
    pub(super) retire: watch::Receiver<bool>,
}

impl Dispatcher {
    /// Runs until the queue stops, then waits for attempts in flight until the shutdown deadline.
    pub(super) async fn run(self) {
        let ctx = self.ctx.clone();
        let function = ctx.function().clone();
        let config = &function.config;
        let mut stop = ctx.stop.clone();
        let mut retire = self.retire.clone();
        let mut retired = false;
        let slots = Arc::new(Semaphore::new(config.async_concurrency as usize));
        let mut tasks = JoinSet::new();
        // One `next` at a time, replaced once it has handed something out: waiting for a slot or
        // a pause leaves it where it was.
        let mut next = ctx.store.next(&function.name);
        // Taken from the store, not yet admitted: the function's queue was full.
        let mut held: Option<Pending> = None;
        loop {
            while tasks.try_join_next().is_some() {}
            // 1. A slot: at most `async_concurrency` attempts in flight.
            let slot = tokio::select! {
                slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                _ = stopped(&mut stop) => break,
                _ = stopped(&mut retire) => { retired = true; break }
            };

            // 1b. Nothing is delivered while the function is paused: its invocations wait stored.
            if function.is_paused() {
                drop(slot);
                tokio::select! {
                    _ = function.until_resumed() => {}
                    _ = stopped(&mut stop) => break,
                    _ = stopped(&mut retire) => { retired = true; break }
                }
                continue;
            }

            // 2. The invocation held back, else the next one the store says is due.
            let pending = match held.take() {
                Some(pending) => pending,
                None => {
                    let taken = tokio::select! {
                        taken = &mut next => taken,
                        _ = stopped(&mut stop) => break,
                        _ = stopped(&mut retire) => { retired = true; break }
                    };
                    next = ctx.store.next(&function.name);
                    match taken {
                        Ok(pending) => pending,
                        Err(e) => {
                            drop(slot);
                            if !self.store_failed(e, &mut stop).await {
                                break;
                            }
                            continue;
                        }
                    }
                }
            };
            if pending.attempts >= config.async_max_attempts {
                // Out of attempts before a restart (or async_max_attempts was lowered).
                let report = Report::without_answer(&pending, "out of attempts");
                let outcome = AsyncOutcome::DeadLettered;
                tasks.spawn(finish(ctx.clone(), pending, report, outcome, slot));
                continue;
            }

            // 3. The record says `running` from here on (admission included); written beside
            //    the attempt, which does not wait for it.
            let (store, name) = (ctx.store.clone(), function.name.clone());
            let (seq, number) = (pending.seq, pending.attempts + 1);
            tokio::spawn(async move {
                if let Err(e) = store.started(&name, seq, number).await {
                    debug!(function = %name, seq, error = %e, "async record not marked running");
                }
            });

            // 4. Admission, exactly as a sync request: one async invocation waits at a time
            //    (to its end even when retired meanwhile: the invocation is out of the store).
            let arrived = Instant::now();
            function.arrived(arrived);
            let admitted = tokio::select! {
                admitted = function.admit(arrived) => admitted,
                _ = stopped(&mut stop) => break,
            };
            if let Err(Rejection::Paused { .. }) = admitted {
                // Paused since it was taken: not an attempt; it waits for the resume (1b).
                debug!(function = %function.name, "async dispatch waits: function paused");
                held = Some(pending);
                drop(slot);
                continue;
            }
            if let Err(Rejection::QueueFull { retry_after }) = admitted {
                // The function's queue is full of sync requests: not an attempt; wait.
                debug!(function = %function.name, retry_after, "async dispatch paused: function queue full");
                function
                    .metrics
                    .rejected(Rejection::QueueFull { retry_after }.reason());
                function
                    .metrics
                    .observe(503, arrived.elapsed().as_secs_f64());
                held = Some(pending);
                drop(slot);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(retry_after)) => {}
                    _ = stopped(&mut stop) => break,
                    _ = stopped(&mut retire) => { retired = true; break }
                }
                continue;
            }

            // 5. The attempt, beside the dispatcher; it gives the slot back when it is over.
            tasks.spawn(attempt(ctx.clone(), pending, admitted, arrived, slot));
        }
        if retired && !*stop.borrow() {
            // Replaced or removed: an invocation held back goes back to the store at once (for
            // the function's next dispatcher, or the next start), attempts in flight finish.
            if let Some(pending) = held.take() {
                let back = Settlement::Retry {
                    attempts: pending.attempts,
                    status: pending.last_status,
                    after: Duration::ZERO,
                };
                if let Err(e) = ctx.store.settle(&function.name, pending.seq, back).await {
                    warn!(function = %function.name, error = %e, "async store: could not give back an invocation");
                }
            }
            info!(function = %function.name, in_flight = tasks.len(), "async dispatcher retired; attempts in flight finish");
            loop {
                tokio::select! {
                    next = tasks.join_next() => if next.is_none() { return },
                    _ = stopped(&mut stop) => break,
                }
            }
        }
        // Draining: attempts in flight get until the shutdown deadline (known once the server
        // has drained); the rest stay stored and run again at the next start.
        let mut deadline = self.deadline;
        loop {
            let at = *deadline.borrow_and_update();
            tokio::select! {
                next = tasks.join_next() => if next.is_none() { return },
                _ = super::sleep_until_opt(at) => break,
                changed = deadline.changed() => if changed.is_err() { break },
            }
        }
        info!(function = %function.name, abandoned = tasks.len(), "async attempts abandoned at shutdown; they run again at the next start");
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }

    /// The store could not hand out an invocation: a corrupt one is dead-lettered, anything else
    /// pauses dispatch for a moment. `false` when the queue stopped meanwhile.
    async fn store_failed(&self, error: StoreError, stop: &mut watch::Receiver<bool>) -> bool {
        let function = self.ctx.function();
        let StoreError::Corrupt { seq, reason, .. } = error else {
            warn!(function = %function.name, error = %error, "async store read failed; pausing dispatch");
            return pause(STORE_RETRY, stop).await;
        };
        warn!(function = %function.name, seq, reason, "async store: corrupt invocation moved to the dead letters");
        let dead = Settlement::DeadLetter {
            attempts: 0,
            status: 0,
            reason: "corrupt record".into(),
        };
        if self
            .ctx
            .store
            .settle(&function.name, seq, dead)
            .await
            .is_ok()
        {
            function.metrics.async_backlog.dec();
            function.metrics.async_outcome(AsyncOutcome::DeadLettered);
            self.ctx.lane.release();
        }
        true
    }
}

/// Resolves once the queue stops starting attempts.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Waits `wait`; `false` when the queue stopped first.
async fn pause(wait: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = stopped(stop) => false,
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::metrics::RejectReason;
    use crate::queue::store::memory::{MemoryStore, Settled};
    use crate::queue::{AsyncQueue, Invocation};
    use crate::test_support;

    fn invocation() -> Invocation {
        Invocation {
            call_id: "call-1".into(),
            path_and_query: "/job".into(),
            headers: Vec::new(),
            body: Bytes::from_static(b"payload"),
            callback: None,
            accepted_unix_ms: 0,
        }
    }

    /// Function `f` (never ready: every admission waits its cold start out) with `extra` in its
    /// config, and a queue for it on `store`.
    async fn start(store: &Arc<MemoryStore>, extra: &str) -> (AsyncQueue, Arc<Function>) {
        let (f, _) = test_support::function(extra);
        let store = store.clone() as Arc<dyn AsyncStore>;
        let client = CallbackClient::new(Default::default(), None);
        let queue = AsyncQueue::with_store(Ok(store), vec![f.clone()], client).await;
        (queue, f)
    }

    async fn until_settled(store: &MemoryStore, n: usize) -> Vec<Settled> {
        for _ in 0..600 {
            if store.settled().len() >= n {
                return store.settled();
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        panic!("not settled {n} times: {:?}", store.settled());
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_retried_after_the_doubling_wait_then_dead_lettered() {
        let store = Arc::new(MemoryStore::default());
        let seq = store.put("f", invocation(), 0, 0);
        let started = Instant::now();
        let (queue, f) = start(
            &store,
            "cold_start_timeout = \"1s\"\nasync_max_attempts = 3\n\
             async_initial_retry_wait = \"10s\"\nasync_max_retry_wait = \"60s\"",
        )
        .await;
        assert_eq!(f.metrics.async_backlog.get(), 1);

        // Each attempt waits 1 s for a replica and gets the gateway's 503; the store is told to
        // retry after 10 s, then 20 s, and hands the invocation out again when that is over.
        let settled = until_settled(&store, 3).await;
        let secs = Duration::from_secs;
        let retry = |attempts, after| Settlement::Retry {
            attempts,
            status: 503,
            after,
        };
        assert_eq!(settled[0].settlement, retry(1, secs(10)));
        assert_eq!(settled[0].at - started, secs(1));
        assert_eq!(settled[1].settlement, retry(2, secs(20)));
        assert_eq!(settled[1].at - started, secs(1 + 10 + 1));
        let Settlement::DeadLetter {
            attempts, status, ..
        } = &settled[2].settlement
        else {
            panic!("{:?}", settled[2]);
        };
        assert_eq!((*attempts, *status), (3, 503));
        assert_eq!(settled[2].at - started, secs(12 + 20 + 1));
        assert!(settled.iter().all(|s| s.seq == seq && s.function == "f"));

        assert_eq!(f.metrics.async_outcome_count(AsyncOutcome::Retried), 2);
        assert_eq!(f.metrics.async_outcome_count(AsyncOutcome::DeadLettered), 1);
        assert_eq!(f.metrics.async_backlog.get(), 0);
        assert!(store.pending().await.unwrap().is_empty());
        assert_eq!(store.dead_letters("f").await.unwrap().len(), 1);
        queue.shutdown(Instant::now()).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_function_queue_pauses_dispatch_without_counting_an_attempt() {
        let store = Arc::new(MemoryStore::default());
        let seq = store.put("f", invocation(), 0, 0);
        let (queue, f) = start(&store, "max_queued_requests = 0").await;
        // Refused at once, with Retry-After: 5 (no replica, no cold start seen yet): tried again
        // every 5 s, never an attempt, never given back to the store.
        tokio::time::sleep(Duration::from_secs(12)).await;
        assert_eq!(f.metrics.rejected_count(RejectReason::QueueFull), 3);
        assert!(store.settled().is_empty());
        assert_eq!(store.get("f", seq), Some((0, true)));
        assert_eq!(f.metrics.async_backlog.get(), 1);
        queue.shutdown(Instant::now()).await;
        // Still stored for the next start.
        assert_eq!(store.pending_count("f").await.unwrap(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_invocation_out_of_attempts_at_start_is_dead_lettered_without_an_attempt() {
        let store = Arc::new(MemoryStore::default());
        store.put("f", invocation(), 5, 502);
        let (queue, f) = start(&store, "async_max_attempts = 5").await;
        let settled = until_settled(&store, 1).await;
        assert_eq!(
            settled[0].settlement,
            Settlement::DeadLetter {
                attempts: 5,
                status: 502,
                reason: "out of attempts".into()
            }
        );
        assert_eq!(f.metrics.started.get(), 0, "no attempt made");
        assert_eq!(f.metrics.async_backlog.get(), 0);
        queue.shutdown(Instant::now()).await;
    }
}
