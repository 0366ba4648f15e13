//! Admission, queueing and cold starts on paused time, with a fake backend.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::provider::{Backend, Endpoints, Replica, StartFailure};
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
    assert_eq!(f.metrics.cold_start_seconds.get_sample_count(), 1);
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
