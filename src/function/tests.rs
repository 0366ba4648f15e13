//! Admission, queueing and cold starts on paused time, with a fake backend.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::provider::{Backend, Endpoints, Replica, StartFailure, SLOW_START_INITIAL};
use crate::test_support::{self, replica, Fake};

fn function(extra: &str) -> (Arc<Function>, Arc<Fake>) {
    test_support::function(&format!(
        "{extra}\n[functions.f.autoscaler]\nmin_replicas = 0\n"
    ))
}

fn publish(f: &Arc<Function>, replicas: &[Arc<Replica>]) {
    f.set_endpoints(Endpoints {
        replicas: replicas.to_vec(),
        failure: None,
    });
}

#[tokio::test(start_paused = true)]
async fn many_requests_at_zero_trigger_exactly_one_scale_up() {
    let (f, fake) = function("max_ongoing_requests = 1");
    let waiters: Vec<_> = (0..20)
        .map(|_| {
            let f = f.clone();
            tokio::spawn(async move { f.admit(Instant::now()).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(fake.wakes.load(Ordering::SeqCst), 1);
    assert_eq!(fake.replicas(), 1);
    assert_eq!(f.metrics.queued.get(), 20);
    assert_eq!(f.metrics.cold_starts.get(), 1);
    // One replica, one slot: exactly one waiter is released, the first.
    let r1 = replica(1);
    publish(&f, std::slice::from_ref(&r1));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(r1.inflight(), 1);
    assert_eq!(f.metrics.queued.get(), 19);
    // Releasing each permit hands the slot to the next waiter, never two at once.
    let mut done = 0;
    for w in waiters {
        let permit = w.await.unwrap().expect("admitted");
        assert!(matches!(permit.waited(), Waited::ColdStart(_)));
        assert_eq!(r1.inflight(), 1);
        drop(permit);
        done += 1;
        tokio::task::yield_now().await;
    }
    assert_eq!(done, 20);
    assert_eq!(r1.inflight(), 0);
    assert_eq!(f.metrics.ongoing.get(), 0);
    assert_eq!(f.metrics.cold_start_seconds().get_sample_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn replicas_appearing_one_by_one_each_get_at_most_their_cap() {
    let (f, _) = function("max_ongoing_requests = 2\nmax_queued_requests = -1");
    let waiters: Vec<_> = (0..10)
        .map(|_| {
            let f = f.clone();
            tokio::spawn(async move { f.admit(Instant::now()).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let (a, b, c) = (replica(1), replica(2), replica(3));
    publish(&f, std::slice::from_ref(&a));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!((a.inflight(), f.metrics.queued.get()), (2, 8));
    publish(&f, &[a.clone(), b.clone()]);
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(
        (a.inflight(), b.inflight(), f.metrics.queued.get()),
        (2, 2, 6)
    );
    publish(&f, &[a.clone(), b.clone(), c.clone()]);
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(
        (
            a.inflight(),
            b.inflight(),
            c.inflight(),
            f.metrics.queued.get()
        ),
        (2, 2, 2, 4)
    );
    drop(waiters);
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_rejects_at_once() {
    let (f, _) = function("max_ongoing_requests = 1\nmax_queued_requests = 2");
    publish(&f, &[replica(1)]);
    let held = f.admit(Instant::now()).await.unwrap();
    let queued: Vec<_> = (0..2)
        .map(|_| {
            let f = f.clone();
            tokio::spawn(async move { f.admit(Instant::now()).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let started = Instant::now();
    let rejection = f.admit(Instant::now()).await.unwrap_err();
    assert!(matches!(rejection, Rejection::QueueFull { retry_after } if retry_after >= 1));
    assert_eq!(started.elapsed(), Duration::ZERO);
    drop(held);
    for q in queued {
        drop(q.await.unwrap().unwrap());
    }
}

#[tokio::test(start_paused = true)]
async fn cold_start_timeout_then_503_with_retry_after() {
    let (f, _) = function("cold_start_timeout = \"2s\"");
    let started = Instant::now();
    let rejection = f.admit(Instant::now()).await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert!(matches!(rejection, Rejection::ColdStartTimeout { .. }));
    assert_eq!(f.metrics.queued.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_start_failure_fails_held_requests_at_once() {
    let (f, _) = function("");
    let waiter = {
        let f = f.clone();
        tokio::spawn(async move { f.admit(Instant::now()).await })
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    f.set_endpoints(Endpoints {
        replicas: vec![],
        failure: Some(StartFailure {
            reason: Arc::from("function f cannot start: cannot run `x`: No such file or directory"),
            retry_at: Some(Instant::now() + Duration::from_millis(2500)),
        }),
    });
    let rejection = waiter.await.unwrap().unwrap_err();
    match rejection {
        Rejection::StartFailed {
            reason,
            retry_after,
        } => {
            assert!(reason.contains("No such file"));
            assert_eq!(retry_after, 3);
        }
        other => panic!("unexpected {other:?}"),
    }
    // While failing with nothing ready, new requests are refused at once too.
    let started = Instant::now();
    assert!(matches!(
        f.admit(Instant::now()).await,
        Err(Rejection::StartFailed { .. })
    ));
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn retry_after_follows_the_observed_cold_start() {
    let (f, _) = function("max_queued_requests = 1");
    // Learn a 7 s cold start.
    let waiter = {
        let f = f.clone();
        tokio::spawn(async move { f.admit(Instant::now()).await })
    };
    tokio::time::sleep(Duration::from_secs(7)).await;
    publish(&f, &[replica(1)]);
    drop(waiter.await.unwrap().unwrap());
    assert_eq!(f.typical_cold_start(), Some(Duration::from_secs(7)));
    // Back at zero with a full queue: Retry-After is the cold start still to go.
    publish(&f, &[]);
    let filler = {
        let f = f.clone();
        tokio::spawn(async move { f.admit(Instant::now()).await })
    };
    tokio::time::sleep(Duration::from_millis(1)).await;
    let rejection = f.admit(Instant::now()).await.unwrap_err();
    assert_eq!(rejection, Rejection::QueueFull { retry_after: 7 });
    filler.abort();
}

#[tokio::test(start_paused = true)]
async fn window_counts_arrivals_over_rate_seconds() {
    let text = "[functions.g]\nprovider = \"process\"\ncommand = [\"x\"]\n[functions.g.autoscaler]\nrate_seconds = 10\n";
    let config = Config::parse(std::path::Path::new("t.toml"), text, None).unwrap();
    let g = Function::new(config.functions["g"].clone(), &Metrics::new());
    for _ in 0..30 {
        g.arrived(Instant::now());
    }
    tokio::time::advance(Duration::from_secs(5)).await;
    for _ in 0..20 {
        g.arrived(Instant::now());
    }
    tokio::time::advance(Duration::from_millis(4900)).await;
    assert_eq!(g.figures(Instant::now()).window_requests, 50);
    tokio::time::advance(Duration::from_millis(600)).await;
    assert_eq!(
        g.figures(Instant::now()).window_requests,
        20,
        "the first 30 slid out"
    );
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(g.figures(Instant::now()).window_requests, 0);
    assert_eq!(g.metrics.started.get(), 50);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_leaves_the_queue() {
    let (f, _) = function("max_ongoing_requests = 1");
    publish(&f, &[replica(1)]);
    let held = f.admit(Instant::now()).await.unwrap();
    let waiter = {
        let f = f.clone();
        tokio::spawn(async move { f.admit(Instant::now()).await })
    };
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(f.metrics.queued.get(), 1);
    waiter.abort();
    let _ = waiter.await;
    assert_eq!(f.metrics.queued.get(), 0);
    drop(held);
    assert_eq!(f.metrics.ongoing.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_request_shed_at_zero_still_wakes_the_function() {
    // With no queue, a request for a function at zero cannot be held: it gets 503 at once. But
    // it must still start the scale-up, or (in concurrency mode, where nothing is ever in flight
    // to be averaged) the function stays at zero and every request is shed forever.
    let (f, fake) = function("max_queued_requests = 0");
    let rejection = f.admit(Instant::now()).await.unwrap_err();
    assert!(
        matches!(rejection, Rejection::QueueFull { .. }),
        "{rejection:?}"
    );
    assert_eq!(
        fake.replicas(),
        1,
        "the rejected request asked for a replica"
    );
    assert_eq!(fake.wakes.load(Ordering::SeqCst), 1);
    assert_eq!(f.metrics.cold_starts.get(), 1);
    let _ = f.admit(Instant::now()).await.unwrap_err();
    assert_eq!(
        fake.wakes.load(Ordering::SeqCst),
        1,
        "once, not per request"
    );
}

/// Admits `n` requests in tasks; returns their handles.
fn flood(f: &Arc<Function>, n: usize) -> Vec<tokio::task::JoinHandle<Result<Permit, Rejection>>> {
    (0..n)
        .map(|_| {
            let f = f.clone();
            tokio::spawn(async move { f.admit(Instant::now()).await })
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_just_turned_ready_is_ramped_up_not_flooded() {
    let (f, _) =
        function("max_ongoing_requests = 100\nmax_queued_requests = 1000\nslow_start = \"2s\"");
    let waiters = flood(&f, 200);
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(f.metrics.queued.get(), 200);
    let r = replica(1);
    publish(&f, std::slice::from_ref(&r));
    tokio::time::sleep(Duration::from_millis(1)).await;
    // A few at first; the rest stay queued.
    assert_eq!(r.inflight(), SLOW_START_INITIAL);
    assert_eq!(f.metrics.queued.get(), 200 - SLOW_START_INITIAL as i64);
    // Halfway through the period: about half of the cap, still below it.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let half = r.inflight();
    assert!(
        (45..=60).contains(&half),
        "{half} in flight after 1 s of 2 s"
    );
    // After the period: the whole cap; the other 100 wait for slots as before.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(r.inflight(), 100);
    assert!(!r.ramping());
    assert_eq!(f.metrics.queued.get(), 100);
    // Every request is served in the end (none timed out: they stayed queued, in order).
    let mut served = 0;
    for w in waiters {
        drop(w.await.unwrap().expect("admitted"));
        served += 1;
    }
    assert_eq!(served, 200);
    assert_eq!(r.inflight(), 0);
}

#[tokio::test(start_paused = true)]
async fn responses_coming_back_grow_a_slow_start_faster_than_the_clock() {
    let (f, _) =
        function("max_ongoing_requests = 100\nmax_queued_requests = 1000\nslow_start = \"60s\"");
    let waiters = flood(&f, 100);
    tokio::time::sleep(Duration::from_millis(1)).await;
    let r = replica(1);
    publish(&f, std::slice::from_ref(&r));
    let mut waiters = waiters.into_iter();
    // Each response that comes back frees its slot and adds one: the cap doubles per round trip.
    let mut in_flight = Vec::new();
    for _ in 0..SLOW_START_INITIAL {
        in_flight.push(waiters.next().unwrap().await.unwrap().unwrap());
    }
    assert_eq!(r.inflight(), 4);
    in_flight.clear();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(r.inflight(), 8, "4 back: 4 + 4 allowed");
    assert_eq!(f.metrics.queued.get(), 100 - 12);
    for w in waiters {
        drop(w.await.unwrap().unwrap());
    }
    assert_eq!(f.metrics.queued.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn slow_start_zero_gives_a_new_replica_its_whole_cap_at_once() {
    let (f, _) = function("max_ongoing_requests = 100\nmax_queued_requests = 1000\nslow_start = 0");
    let _waiters = flood(&f, 150);
    tokio::time::sleep(Duration::from_millis(1)).await;
    let r = replica(1);
    publish(&f, std::slice::from_ref(&r));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(r.inflight(), 100);
    assert!(!r.ramping());
    assert_eq!(f.metrics.queued.get(), 50);
}

#[tokio::test(start_paused = true)]
async fn a_held_request_keeps_its_cold_start_timeout_during_slow_start() {
    let (f, _) = function(
        "max_ongoing_requests = 100\nmax_queued_requests = 1000\nslow_start = \"600s\"\ncold_start_timeout = \"5s\"",
    );
    let waiters = flood(&f, 10);
    tokio::time::sleep(Duration::from_millis(1)).await;
    let r = replica(1);
    publish(&f, std::slice::from_ref(&r));
    tokio::time::sleep(Duration::from_secs(6)).await;
    // Four got slots (and hold them: 6 s of 600 s adds none); the six others waited past their
    // timeout and were told so.
    let mut admitted = 0;
    let mut timed_out = 0;
    for w in waiters {
        match w.await.unwrap() {
            Ok(_) => admitted += 1,
            Err(Rejection::QueueTimeout { .. } | Rejection::ColdStartTimeout { .. }) => {
                timed_out += 1
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!((admitted, timed_out), (4, 6));
}

#[tokio::test(start_paused = true)]
async fn a_pause_refuses_new_and_waiting_requests_and_the_resume_restores_the_count() {
    let (f, fake) = function("max_ongoing_requests = 1\ncold_start_timeout = \"10s\"");
    let r1 = replica(1);
    fake.set_replicas(2);
    publish(&f, std::slice::from_ref(&r1));
    let busy = f.admit(Instant::now()).await.expect("a free slot");
    let waiting = {
        let f = f.clone();
        tokio::spawn(async move { f.admit(Instant::now()).await })
    };
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(f.metrics.queued.get(), 1);

    assert_eq!(f.pause(), Some(2), "the count asked for before");
    assert_eq!(f.pause(), None, "paused once");
    assert_eq!(fake.replicas(), 0);
    let paused = Rejection::Paused {
        retry_after: PAUSED_RETRY_AFTER,
    };
    assert_eq!(waiting.await.unwrap().unwrap_err(), paused);
    // Even with a free slot on a replica not yet gone, nothing is admitted.
    drop(busy);
    assert_eq!(f.admit(Instant::now()).await.unwrap_err(), paused);
    assert_eq!(fake.wakes.load(Ordering::SeqCst), 0, "no cold start");
    assert!(f.metrics.paused());

    assert!(f.resume(2));
    assert!(!f.resume(2), "resumed once");
    assert_eq!(fake.replicas(), 2);
    assert_eq!(f.take_manual(), Some(2), "handed to the autoscaler");
    assert!(f.admit(Instant::now()).await.is_ok());
    assert!(!f.metrics.paused());
}

#[tokio::test(start_paused = true)]
async fn with_hold_a_paused_function_holds_requests_until_the_resume_or_their_timeout() {
    let (f, fake) = function("when_paused = \"hold\"\ncold_start_timeout = \"10s\"");
    f.pause();
    let start = Instant::now();
    let timed_out = {
        let f = f.clone();
        tokio::spawn(async move { f.admit(Instant::now()).await })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    let released = {
        let f = f.clone();
        tokio::spawn(async move { f.admit(Instant::now()).await })
    };
    tokio::time::sleep(Duration::from_secs(6)).await;
    // The first waited its cold_start_timeout out, with no replica asked for.
    assert_eq!(
        timed_out.await.unwrap().unwrap_err(),
        Rejection::Paused {
            retry_after: PAUSED_RETRY_AFTER
        }
    );
    assert_eq!(Instant::now() - start, Duration::from_secs(11));
    assert_eq!(fake.replicas(), 0);
    assert_eq!(f.metrics.queued.get(), 1);
    // The resume (to zero, as before the pause) wakes the function for the one held.
    f.resume(0);
    assert_eq!(fake.wakes.load(Ordering::SeqCst), 1);
    publish(&f, &[replica(1)]);
    let permit = released.await.unwrap().expect("released by the resume");
    assert!(matches!(permit.waited(), Waited::ColdStart(_)));
}
