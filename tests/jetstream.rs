//! The JetStream async store end to end, against a real `nats-server -js` on loopback (see
//! `common/nats.rs`; `scripts/test` installs it): several gateways sharing one queue, leases and
//! redelivery after a SIGKILL, a NATS restart under load, dead letters, the `queue` autoscaler
//! reading the shared backlog, and NATS being unreachable.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use common::nats::NatsServer;
use common::*;
use http::{HeaderMap, Request, Response};
use http_body_util::BodyExt;
use sluicegate::metrics::AsyncOutcome;
use sluicegate::queue::store::{ASYNC_STREAM, DLQ_STREAM, DLQ_SUBJECT_PREFIX};
use tokio::time::Instant;

/// One request a recording backend received.
#[derive(Clone, Debug)]
struct Seen {
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// A backend that records every request, waits `delay`, and answers `status`.
async fn recorder(status: u16, delay: Duration) -> (Backend, Log) {
    let log: Log = Arc::default();
    let seen = log.clone();
    let backend = Backend::start(move |req, _| {
        let seen = seen.clone();
        async move {
            let (parts, b) = req.into_parts();
            let data = b.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            seen.lock().unwrap().push(Seen {
                headers: parts.headers,
                body: data,
                at: Instant::now(),
            });
            tokio::time::sleep(delay).await;
            Response::builder()
                .status(status)
                .body(body("done\n"))
                .unwrap()
        }
    })
    .await;
    (backend, log)
}

fn call_ids(log: &Log) -> Vec<String> {
    log.lock()
        .unwrap()
        .iter()
        .map(|c| c.headers["x-call-id"].to_str().unwrap().to_owned())
        .collect()
}

fn post_async(base: &str, function: &str, id: &str, data: String) -> Request<TestBody> {
    Request::post(format!("{base}/async-function/{function}"))
        .header("x-call-id", id)
        .body(body(data))
        .unwrap()
}

async fn until_async(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The messages a stream holds, read straight from the server.
async fn stream_messages(nats: &NatsServer, stream: &str) -> u64 {
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    let mut s = js.get_stream(stream).await.unwrap();
    s.info().await.unwrap().state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invocations_accepted_on_one_gateway_are_dispatched_by_another() {
    const N: usize = 20;
    let nats = NatsServer::start().await;
    let keys = nats.gateway_keys("5s");
    // A's replica is slow and A runs one attempt at a time: B, sharing the consumer, takes most.
    let (slow, slow_calls) = recorder(200, Duration::from_millis(300)).await;
    let (fast, fast_calls) = recorder(200, Duration::ZERO).await;
    let a = Gw::start_with(
        &keys,
        &static_fn("job", &slow.url(), "async_concurrency = 1"),
    )
    .await;
    let b = Gw::start_with(&keys, &static_fn("job", &fast.url(), "")).await;
    let base = format!("http://{}", a.addr);
    let mut ids = HashSet::new();
    for i in 0..N {
        let id = format!("a-{i}");
        let r = a.send(post_async(&base, "job", &id, format!("p{i}"))).await;
        assert_eq!(r.status, 202, "{}", r.body);
        ids.insert(id);
    }
    until("every invocation ran", Duration::from_secs(20), || {
        slow_calls.lock().unwrap().len() + fast_calls.lock().unwrap().len() >= N
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut all = call_ids(&slow_calls);
    all.extend(call_ids(&fast_calls));
    assert_eq!(all.len(), N, "each invocation ran once: {all:?}");
    assert_eq!(all.into_iter().collect::<HashSet<_>>(), ids);
    assert!(
        fast_calls.lock().unwrap().len() > N / 2,
        "gateway B dispatched most of what A accepted"
    );
    until_async("the stream is empty", Duration::from_secs(5), async || {
        stream_messages(&nats, ASYNC_STREAM).await == 0
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_attempt_keeps_its_lease_and_runs_once() {
    let nats = NatsServer::start().await;
    // The ack wait is 1 s; the attempt takes 3 s: renewed, never handed to B meanwhile.
    let keys = nats.gateway_keys("1s");
    let (slow, slow_calls) = recorder(200, Duration::from_secs(3)).await;
    let (other, other_calls) = recorder(200, Duration::ZERO).await;
    let a = Gw::start_with(&keys, &static_fn("job", &slow.url(), "")).await;
    let base = format!("http://{}", a.addr);
    let r = a.send(post_async(&base, "job", "long-1", "x".into())).await;
    assert_eq!(r.status, 202, "{}", r.body);
    until("the attempt started", Duration::from_secs(5), || {
        slow_calls.lock().unwrap().len() == 1
    })
    .await;
    let b = Gw::start_with(&keys, &static_fn("job", &other.url(), "")).await;
    until_async("it is settled", Duration::from_secs(10), async || {
        stream_messages(&nats, ASYNC_STREAM).await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(slow_calls.lock().unwrap().len(), 1);
    assert!(other_calls.lock().unwrap().is_empty(), "never redelivered");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invocation_held_by_a_sigkilled_gateway_is_redelivered_after_the_ack_wait() {
    let nats = NatsServer::start().await;
    let keys = nats.gateway_keys("2s");
    // The replica behind the gateway process never answers in time.
    let (stuck, stuck_calls) = recorder(200, Duration::from_secs(60)).await;
    let dir = std::env::temp_dir().join(format!("sluicegate-js-kill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = closed_port();
    let mut child = spawn_binary(&dir, port, &keys, &static_fn("job", &stuck.url(), ""));
    let base = format!("http://127.0.0.1:{port}");
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let healthz = Request::get(format!("{base}/healthz"))
            .body(empty())
            .unwrap();
        if c.request(healthz).await.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway binary did not come up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = send_with(&c, post_async(&base, "job", "held-1", "payload".into())).await;
    assert_eq!(r.status, 202, "{}", r.body);
    until("the attempt is in flight", Duration::from_secs(10), || {
        !stuck_calls.lock().unwrap().is_empty()
    })
    .await;
    // Held past several renewals, then SIGKILL mid-attempt.
    tokio::time::sleep(Duration::from_secs(3)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();

    let (fine, fine_calls) = recorder(200, Duration::ZERO).await;
    let gw = Gw::start_with(&keys, &static_fn("job", &fine.url(), "")).await;
    until("it is redelivered", Duration::from_secs(15), || {
        !fine_calls.lock().unwrap().is_empty()
    })
    .await;
    let seen = fine_calls.lock().unwrap()[0].clone();
    assert_eq!(seen.headers["x-call-id"], "held-1");
    assert_eq!(seen.body, "payload");
    // Not before the lease it held ran out (renewed up to the kill; at most ack_wait after it).
    let after = seen.at - killed;
    assert!(
        after >= Duration::from_secs(1) && after <= Duration::from_secs(4),
        "redelivered {after:?} after the kill (lease 2 s, renewed every 0.67 s)"
    );
    until_async("it is settled", Duration::from_secs(5), async || {
        stream_messages(&nats, ASYNC_STREAM).await == 0
    })
    .await;
    assert_eq!(fine_calls.lock().unwrap().len(), 1);
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_mid_load_loses_no_acknowledged_invocation() {
    const N: usize = 150;
    let mut nats = NatsServer::start().await;
    let (function, calls) = recorder(200, Duration::ZERO).await;
    let (sync_backend, _) = recorder(200, Duration::ZERO).await;
    let functions = format!(
        "{}{}",
        static_fn("job", &function.url(), ""),
        static_fn("echo", &sync_backend.url(), "")
    );
    let gw = Gw::start_with(&nats.gateway_keys("5s"), &functions).await;
    let base = format!("http://{}", gw.addr);
    let mut acked = HashSet::new();
    let mut refused = 0;
    let started = Instant::now();
    for i in 0..N {
        if i == 50 {
            nats.kill();
        }
        if i == 90 {
            nats.restart().await;
        }
        let id = format!("load-{i}");
        let r = gw
            .send(post_async(&base, "job", &id, format!("p{i}")))
            .await;
        match r.status.as_u16() {
            202 => {
                acked.insert(id);
            }
            503 => {
                assert_eq!(
                    r.header("x-sluicegate-reason"),
                    Some("async_store_unavailable")
                );
                refused += 1;
            }
            other => panic!("unexpected {other}: {}", r.body),
        }
        // Sync traffic does not notice.
        let s = gw.get("/function/echo/").await;
        assert_eq!(s.status, 200, "sync call {i}");
        if i >= 90 && r.status == 503 {
            // Reconnecting: wait a little, bounded by the loop count.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "load loop bounded"
        );
    }
    assert!(refused > 0, "the outage was seen");
    assert!(
        acked.len() > 100,
        "async resumed by itself: {} acked",
        acked.len()
    );
    // Accepting again after the restart.
    let r = gw
        .send(post_async(&base, "job", "after-restart", "x".into()))
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    acked.insert("after-restart".into());
    until(
        "every acknowledged invocation ran",
        Duration::from_secs(30),
        || {
            let seen: HashSet<_> = call_ids(&calls).into_iter().collect();
            acked.is_subset(&seen)
        },
    )
    .await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_back_off_then_the_dead_letter_lands_in_the_dlq_stream() {
    let nats = NatsServer::start().await;
    let (function, calls) = recorder(503, Duration::ZERO).await;
    let job = static_fn(
        "job",
        &function.url(),
        "async_max_attempts = 3\nasync_initial_retry_wait = \"400ms\"\nasync_max_retry_wait = \"5s\"",
    );
    let gw = Gw::start_with(&nats.gateway_keys("5s"), &job).await;
    let base = format!("http://{}", gw.addr);
    let r = gw
        .send(post_async(&base, "job", "doomed-1", "body-1".into()))
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let f = gw.function("job");
    until("dead-lettered", Duration::from_secs(15), || {
        f.metrics.async_outcome_count(AsyncOutcome::DeadLettered) == 1
    })
    .await;
    let seen = calls.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "three attempts");
    // Waits of 400 ms, then 800 ms: JetStream's nak delay, as the dispatcher asked.
    let first = seen[1].at - seen[0].at;
    let second = seen[2].at - seen[1].at;
    assert!(first >= Duration::from_millis(380), "{first:?}");
    assert!(second >= Duration::from_millis(780), "{second:?}");
    assert!(second < Duration::from_secs(3), "{second:?}");

    // Where the README says: the SLUICEGATE_DLQ stream, subject sluicegate.dlq.job; gone from
    // the queue.
    let store = gw
        .running
        .as_ref()
        .unwrap()
        .gateway()
        .queue()
        .unwrap()
        .store()
        .unwrap()
        .clone();
    until_async("the letter is listed", Duration::from_secs(5), async || {
        store.dead_letters("job").await.unwrap().len() == 1
    })
    .await;
    let letters = store.dead_letters("job").await.unwrap();
    assert_eq!(letters[0].invocation.call_id, "doomed-1");
    assert_eq!(letters[0].invocation.body, "body-1");
    assert_eq!((letters[0].attempts, letters[0].status), (3, 503));
    assert_eq!(store.dead_letter_count().await.unwrap(), 1);
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    let dlq = js.get_stream(DLQ_STREAM).await.unwrap();
    let raw = dlq
        .get_last_raw_message_by_subject(&format!("{DLQ_SUBJECT_PREFIX}job"))
        .await
        .unwrap();
    assert!(raw.payload.len() > 6);
    assert_eq!(stream_messages(&nats, ASYNC_STREAM).await, 0);
    assert_eq!(store.pending_count("job").await.unwrap(), 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_autoscaler_reads_the_shared_backlog_of_invocations_another_gateway_accepted() {
    const N: u64 = 9;
    let nats = NatsServer::start().await;
    let keys = nats.gateway_keys("5s");
    // Gateway A accepts; its replica refuses, so each invocation waits an hour for its retry.
    let a = Gw::start_with(
        &keys,
        &static_fn(
            "job",
            &format!("http://127.0.0.1:{}", closed_port()),
            "async_initial_retry_wait = \"1h\"\nasync_max_retry_wait = \"1h\"",
        ),
    )
    .await;
    let base = format!("http://{}", a.addr);
    for i in 0..N {
        let r = a
            .send(post_async(&base, "job", &format!("q-{i}"), "x".into()))
            .await;
        assert_eq!(r.status, 202, "{}", r.body);
    }
    let fa = a.function("job");
    until(
        "every invocation failed once",
        Duration::from_secs(10),
        || fa.metrics.async_outcome_count(AsyncOutcome::Retried) == N,
    )
    .await;

    // Gateway B accepted nothing; its `queue` autoscaler sees the consumer's pending count.
    let tag = unique_tag("js-queue");
    let b = Gw::start_with(
        &keys,
        &demo_fn(
            "job",
            &tag,
            "",
            "",
            "type = \"queue\"\nqueue_length = 2\nmin_replicas = 0\nmax_replicas = 20\npolling_interval = 1",
        ),
    )
    .await;
    let fb = b.function("job");
    until(
        "B's backlog is the shared one",
        Duration::from_secs(10),
        || fb.metrics.async_backlog.get() == N as i64,
    )
    .await;
    until(
        "B's autoscaler wants ceil(9 / 2)",
        Duration::from_secs(10),
        || fb.metrics.desired.get() == 5,
    )
    .await;
    let store = a
        .running
        .as_ref()
        .unwrap()
        .gateway()
        .queue()
        .unwrap()
        .store()
        .unwrap()
        .clone();
    assert_eq!(store.pending_count("job").await.unwrap(), N);
    assert_eq!(store.pending().await.unwrap().get("job"), Some(&N));
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_unreachable_at_start_and_later_refuses_async_and_serves_sync() {
    let mut nats = NatsServer::not_started();
    let (function, calls) = recorder(200, Duration::ZERO).await;
    let (sync_backend, _) = recorder(200, Duration::ZERO).await;
    let functions = format!(
        "{}{}",
        static_fn("job", &function.url(), ""),
        static_fn("echo", &sync_backend.url(), "")
    );
    let gw = Gw::start_with(&nats.gateway_keys("5s"), &functions).await;
    let base = format!("http://{}", gw.addr);

    // Nothing listens yet: refused at once, sync fine.
    let asked = Instant::now();
    let r = gw.send(post_async(&base, "job", "early", "x".into())).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(
        r.header("x-sluicegate-reason"),
        Some("async_store_unavailable")
    );
    assert!(asked.elapsed() < Duration::from_secs(1), "refused at once");
    assert_eq!(gw.get("/function/echo/").await.status, 200);

    // NATS comes up: the gateway connects by itself and async works.
    nats.restart().await;
    let mut n = 0;
    until_async("async is accepted", Duration::from_secs(20), async || {
        n += 1;
        let r = gw
            .send(post_async(&base, "job", &format!("up-{n}"), "x".into()))
            .await;
        r.status == 202
    })
    .await;
    until("it ran", Duration::from_secs(10), || {
        call_ids(&calls).iter().any(|id| id.starts_with("up-"))
    })
    .await;

    // NATS goes away again: 503 again, sync still 200.
    nats.kill();
    until_async("async is refused", Duration::from_secs(20), async || {
        let r = gw.send(post_async(&base, "job", "down", "x".into())).await;
        r.status == 503 && r.header("x-sluicegate-reason") == Some("async_store_unavailable")
    })
    .await;
    for _ in 0..5 {
        assert_eq!(gw.get("/function/echo/").await.status, 200);
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_state_is_shared_through_the_state_bucket_and_survives_a_restart() {
    let nats = NatsServer::start().await;
    let keys = nats.gateway_keys("5s");
    let (echo, _) = recorder(200, Duration::ZERO).await;
    let a = Gw::start_with(&keys, &static_fn("job", &echo.url(), "")).await;
    let b = Gw::start_with(&keys, &static_fn("job", &echo.url(), "")).await;
    let state_a = a.running.as_ref().unwrap().gateway().state().unwrap();
    let state_b = b.running.as_ref().unwrap().gateway().state().unwrap();
    state_a
        .state_put("paused", "job", b"yes".to_vec())
        .await
        .unwrap();
    state_a
        .state_put("paused", "other", b"no".to_vec())
        .await
        .unwrap();
    state_a
        .state_put("tokens", "job", b"t".to_vec())
        .await
        .unwrap();
    assert_eq!(
        state_b.state_get("paused", "job").await.unwrap(),
        Some(b"yes".to_vec()),
        "gateway B reads what A wrote"
    );
    state_b.state_delete("paused", "other").await.unwrap();
    let paused = state_a.state_scan("paused").await.unwrap();
    assert_eq!(
        paused.into_iter().collect::<Vec<_>>(),
        [("job".to_owned(), b"yes".to_vec())]
    );
    a.shutdown().await;
    b.shutdown().await;
    let c = Gw::start_with(&keys, &static_fn("job", &echo.url(), "")).await;
    let state_c = c.running.as_ref().unwrap().gateway().state().unwrap();
    assert_eq!(
        state_c.state_get("tokens", "job").await.unwrap(),
        Some(b"t".to_vec())
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_shared_and_expire_and_dead_letters_are_replayed_and_discarded_in_jetstream() {
    use common::records::{admin_keys, record, until_record, until_state};
    let nats = NatsServer::start().await;
    let keys = format!(
        "{}\n{}\nasync_record_retention = \"1s\"",
        nats.gateway_keys("5s"),
        admin_keys()
    );
    let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = up.clone();
    let backend = Backend::start(move |req, _| {
        let up = flag.load(std::sync::atomic::Ordering::SeqCst);
        let slow = req.uri().path() == "/slow";
        async move {
            if slow {
                tokio::time::sleep(Duration::from_millis(600)).await;
            }
            let status = match (slow, up) {
                (true, _) => 201,
                (false, true) => 200,
                (false, false) => 503,
            };
            Response::builder()
                .status(status)
                .body(body("answer\n"))
                .unwrap()
        }
    })
    .await;
    let keys_fn = "async_max_attempts = 2\nasync_initial_retry_wait = \"50ms\"\nasync_max_retry_wait = \"50ms\"";
    let a = Gw::start_with(&keys, &static_fn("flaky", &backend.url(), keys_fn)).await;
    // A second gateway on the same store: it may run the invocation too; either way it reads
    // the same record.
    let b = Gw::start_with(&keys, &static_fn("flaky", &backend.url(), keys_fn)).await;

    // One invocation's life, read from the other gateway: running, then succeeded with the
    // function's status, then gone after the retention (the record's TTL).
    let req = Request::post(a.url("/async-function/flaky/slow"))
        .header("x-call-id", "shared.1")
        .body(body("x"))
        .unwrap();
    assert_eq!(a.send(req).await.status, 202);
    let running = until_state(&b, "shared.1", "running").await;
    assert_eq!(running["attempts"], 1, "{running}");
    let done = until_state(&b, "shared.1", "succeeded").await;
    assert_eq!(done["status"], 201, "{done}");
    until_record(
        &a,
        "shared.1",
        "the record expires",
        Duration::from_secs(10),
        |s, _| s == 404,
    )
    .await;
    // Gone from the stream too, not only hidden: JetStream's TTL removed the message.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    let records = js
        .get_stream(sluicegate::queue::store::RECORDS_STREAM)
        .await
        .unwrap();
    let mut gone = false;
    for _ in 0..200 {
        let last = records
            .get_last_raw_message_by_subject("sluicegate.record.h.7368617265642e31")
            .await;
        if last.is_err() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "the expired record is still stored");
    let (status, _) = record(&b, "shared.1").await;
    assert_eq!(status, 404);
    b.shutdown().await;

    // Dead letters: listed, replayed once the replica is up, discarded.
    common::records::dead_letter_replay_and_discard(&a, &up).await;
    assert_eq!(stream_messages(&nats, DLQ_STREAM).await, 0);
    a.shutdown().await;
}
