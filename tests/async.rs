//! Async invocations end to end: accept (202 only once stored), dispatch through admission,
//! callbacks, retries and dead letters, durability across restarts (in-process and SIGKILL).

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Request, Response};
use http_body_util::BodyExt;
use sluicegate::queue::AsyncStore;
use tokio::time::Instant;

/// One request a recording backend received.
#[derive(Clone, Debug)]
struct Seen {
    uri: String,
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// A backend that records every request and answers with what `answer` says for the n-th (0-based)
/// request: status, extra headers, body.
async fn recorder(
    answer: impl Fn(usize) -> (u16, Vec<(&'static str, String)>, String) + Send + Sync + 'static,
) -> (Backend, Log) {
    recorder_on("127.0.0.1:0".parse().unwrap(), answer).await
}

async fn recorder_on(
    addr: SocketAddr,
    answer: impl Fn(usize) -> (u16, Vec<(&'static str, String)>, String) + Send + Sync + 'static,
) -> (Backend, Log) {
    let log: Log = Arc::default();
    let seen = log.clone();
    let answer = Arc::new(answer);
    let backend = Backend::start_on(addr, move |req, _| {
        let seen = seen.clone();
        let answer = answer.clone();
        async move {
            let (parts, b) = req.into_parts();
            let data = b.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            let n = {
                let mut log = seen.lock().unwrap();
                log.push(Seen {
                    uri: parts.uri.to_string(),
                    headers: parts.headers,
                    body: data,
                    at: Instant::now(),
                });
                log.len() - 1
            };
            let (status, headers, text) = answer(n);
            let mut resp = Response::builder().status(status);
            for (k, v) in headers {
                resp = resp.header(k, v);
            }
            resp.body(body(text)).unwrap()
        }
    })
    .await;
    (backend, log)
}

fn ok_answer(_: usize) -> (u16, Vec<(&'static str, String)>, String) {
    (200, vec![], "done\n".into())
}

fn post_async(
    gw: &Gw,
    path: &str,
    data: &'static str,
    headers: &[(&str, &str)],
) -> Request<TestBody> {
    let mut req = Request::post(gw.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(body(data)).unwrap()
}

fn store_of(gw: &Gw) -> Arc<dyn AsyncStore> {
    gw.running
        .as_ref()
        .unwrap()
        .gateway()
        .queue()
        .and_then(|q| q.store())
        .expect("async store open")
        .clone()
}

/// Waits until the store says `check` holds (every 5 ms, at most `limit`).
async fn until_store<F: std::future::Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> F,
) {
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The call ids of the requests a recording backend received.
fn call_ids(log: &Log) -> HashSet<String> {
    log.lock()
        .unwrap()
        .iter()
        .map(|c| c.headers["x-call-id"].to_str().unwrap().to_owned())
        .collect()
}

fn backlog(gw: &Gw, name: &str) -> i64 {
    gw.function(name).metrics.async_backlog.get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_invocation_reaches_the_function_and_the_callback_gets_its_answer() {
    let (function, calls) = recorder(|_| {
        (
            201,
            vec![("content-type", "application/json".into())],
            "{\"ok\":true}".into(),
        )
    })
    .await;
    let (receiver, callbacks) = recorder(ok_answer).await;
    let gw = Gw::start_static("echo", &function.url(), "").await;
    let callback_url = format!("{}/hook?k=v", receiver.url());

    let r = gw
        .send(post_async(
            &gw,
            "/async-function/echo/some/path?x=1",
            "hello",
            &[
                ("x-call-id", "call-123"),
                ("x-callback-url", &callback_url),
                ("content-type", "text/plain"),
                ("x-custom", "kept"),
            ],
        ))
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.header("x-call-id"), Some("call-123"));
    assert!(r.header("x-start-time").is_some());

    until("the callback arrives", Duration::from_secs(10), || {
        !callbacks.lock().unwrap().is_empty()
    })
    .await;
    let call = calls.lock().unwrap()[0].clone();
    assert_eq!(call.uri, "/some/path?x=1");
    assert_eq!(call.body, "hello");
    assert_eq!(call.headers["x-call-id"], "call-123");
    assert_eq!(call.headers["x-custom"], "kept");
    assert_eq!(call.headers["content-type"], "text/plain");
    assert_eq!(call.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(call.headers["x-forwarded-proto"], "http");
    assert_eq!(call.headers["x-forwarded-host"], gw.addr.to_string());
    assert_eq!(call.headers["content-length"], "5");

    let cb = callbacks.lock().unwrap()[0].clone();
    assert_eq!(cb.uri, "/hook?k=v");
    assert_eq!(cb.headers["x-call-id"], "call-123");
    assert_eq!(cb.headers["x-function-name"], "echo");
    assert_eq!(cb.headers["x-function-status"], "201");
    assert_eq!(cb.headers["content-type"], "application/json");
    let seconds: f64 = cb.headers["x-duration-seconds"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((0.0..10.0).contains(&seconds), "{seconds}");
    assert_eq!(cb.body, "{\"ok\":true}");

    // Without a call id, one is generated and sent to the function.
    let r = gw
        .send(post_async(&gw, "/async-function/echo", "", &[]))
        .await;
    assert_eq!(r.status, 202);
    let generated = r.header("x-call-id").unwrap().to_owned();
    assert_eq!(generated.len(), 36, "{generated}");
    until("the second call", Duration::from_secs(10), || {
        calls.lock().unwrap().len() == 2
    })
    .await;
    assert_eq!(
        calls.lock().unwrap()[1].headers["x-call-id"],
        generated.as_str()
    );
    assert_eq!(calls.lock().unwrap()[1].uri, "/");

    let f = gw.function("echo");
    let store = &store_of(&gw);
    until_store(
        "the store is empty",
        Duration::from_secs(10),
        || async move { store.pending_count("echo").await.unwrap() == 0 },
    )
    .await;
    assert_eq!(f.metrics.async_backlog.get(), 0);
    let scrape = gw.metrics().await;
    for (series, value) in [
        (
            "sluicegate_async_invocations_total{function_name=\"echo\",outcome=\"accepted\"}",
            2.0,
        ),
        (
            "sluicegate_async_invocations_total{function_name=\"echo\",outcome=\"succeeded\"}",
            2.0,
        ),
        (
            "sluicegate_async_invocations_total{function_name=\"echo\",outcome=\"retried\"}",
            0.0,
        ),
        (
            "sluicegate_async_callbacks_total{function_name=\"echo\",result=\"delivered\"}",
            1.0,
        ),
        ("sluicegate_async_backlog{function_name=\"echo\"}", 0.0),
        (
            "gateway_function_invocation_total{code=\"202\",function_name=\"echo\"}",
            2.0,
        ),
        (
            "gateway_function_invocation_total{code=\"201\",function_name=\"echo\"}",
            2.0,
        ),
    ] {
        assert_eq!(sample(&scrape, series), Some(value), "{series}\n{scrape}");
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_store_nothing_and_say_why() {
    let (function, calls) = recorder(ok_answer).await;
    let keys = "max_body_bytes = 100\nasync_max_backlog = 2\nasync_initial_retry_wait = \"1h\"";
    let gw = Gw::start_static("echo", &function.url(), keys).await;
    let store = store_of(&gw);

    // Unknown function: 404, never 202 (faas#947), and nothing stored under that name.
    let r = gw
        .send(post_async(&gw, "/async-function/nope", "x", &[]))
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-sluicegate-reason"), Some("unknown_function"));
    assert_eq!(store.pending_count("nope").await.unwrap(), 0);

    // Malformed name, wrong method.
    assert_eq!(
        gw.send(post_async(&gw, "/async-function/Bad", "", &[]))
            .await
            .status,
        400
    );
    let r = gw.get("/async-function/echo").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));

    // A callback URL that cannot be called.
    for bad in ["https://example.com/hook", "/relative", "not a url"] {
        let r = gw
            .send(post_async(
                &gw,
                "/async-function/echo",
                "x",
                &[("x-callback-url", bad)],
            ))
            .await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        assert_eq!(r.header("x-sluicegate-reason"), Some("bad_callback_url"));
    }

    // Bodies over max_body_bytes: declared, and streamed without a length.
    let r = gw.post("/async-function/echo", vec![b'x'; 101]).await;
    assert_eq!(r.status, 413);
    assert!(r.body.contains("max_body_bytes (100 bytes)"), "{}", r.body);
    let chunks = futures_stream(vec![
        Bytes::from(vec![b'x'; 60]),
        Bytes::from(vec![b'y'; 60]),
    ]);
    let r = gw
        .send(
            Request::post(gw.url("/async-function/echo"))
                .body(chunks)
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 413);
    assert_eq!(store.pending_count("echo").await.unwrap(), 0);
    assert!(calls.lock().unwrap().is_empty());

    // The backlog bound: a function that is down keeps its invocations (retry in an hour).
    let down = format!("http://127.0.0.1:{}", closed_port());
    gw.shutdown().await;
    let keys = "async_max_backlog = 2\nasync_initial_retry_wait = \"1h\"";
    let gw = Gw::start_static("down", &down, keys).await;
    let store = store_of(&gw);
    for _ in 0..2 {
        assert_eq!(
            gw.send(post_async(&gw, "/async-function/down", "x", &[]))
                .await
                .status,
            202
        );
    }
    let r = gw
        .send(post_async(&gw, "/async-function/down", "x", &[]))
        .await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.header("x-sluicegate-reason"), Some("async_backlog_full"));
    let retry_after: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    assert!(r.body.contains("async_max_backlog"), "{}", r.body);
    assert_eq!(store.pending_count("down").await.unwrap(), 2);
    assert_eq!(backlog(&gw, "down"), 2);
    let scrape = gw.metrics().await;
    assert_eq!(
        sample(
            &scrape,
            "sluicegate_async_invocations_total{function_name=\"down\",outcome=\"rejected\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&scrape, "sluicegate_function_rejected_total{function_name=\"down\",reason=\"async_backlog_full\"}"),
        Some(1.0)
    );

    // Draining for shutdown: 503, nothing stored.
    gw.running.as_ref().unwrap().gateway().start_draining();
    let r = gw
        .send(post_async(&gw, "/async-function/down", "x", &[]))
        .await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-sluicegate-reason"), Some("draining"));
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(store.pending_count("down").await.unwrap(), 2);
    gw.shutdown().await;
}

/// A request body sent as separate chunks, without a Content-Length.
fn futures_stream(chunks: Vec<Bytes>) -> TestBody {
    let (tx, body) = channel_body(chunks.len().max(1));
    for chunk in chunks {
        tx.try_send(Ok(hyper::body::Frame::data(chunk)))
            .expect("the channel holds every chunk");
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_retried_with_backoff_then_dead_lettered() {
    // 429 with Retry-After: 1 first, then 503s.
    let (function, calls) = recorder(|n| match n {
        0 => (429, vec![("retry-after", "1".into())], "slow down\n".into()),
        _ => (
            503,
            vec![("content-type", "text/plain".into())],
            "still down\n".into(),
        ),
    })
    .await;
    let (receiver, callbacks) = recorder(ok_answer).await;
    let keys = "async_max_attempts = 3\nasync_initial_retry_wait = \"150ms\"\nasync_max_retry_wait = \"10s\"";
    let gw = Gw::start_static("flaky", &function.url(), keys).await;
    let hook = format!("{}/hook", receiver.url());
    let r = gw
        .send(post_async(
            &gw,
            "/async-function/flaky/job",
            "payload",
            &[("x-callback-url", &hook), ("x-call-id", "dl-1")],
        ))
        .await;
    assert_eq!(r.status, 202);
    until("the callback", Duration::from_secs(15), || {
        !callbacks.lock().unwrap().is_empty()
    })
    .await;
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 3, "async_max_attempts attempts, no more");
    // The function's Retry-After (1 s) wins over the first backoff (150 ms); then 2 x 150 ms.
    let first_wait = calls[1].at - calls[0].at;
    let second_wait = calls[2].at - calls[1].at;
    assert!(first_wait >= Duration::from_secs(1), "{first_wait:?}");
    assert!(second_wait >= Duration::from_millis(300), "{second_wait:?}");
    assert!(second_wait < Duration::from_millis(1000), "{second_wait:?}");
    for c in &calls {
        assert_eq!(c.body, "payload");
        assert_eq!(c.headers["x-call-id"], "dl-1");
    }

    // The callback gets the final answer.
    let cb = callbacks.lock().unwrap()[0].clone();
    assert_eq!(cb.headers["x-function-status"], "503");
    assert_eq!(cb.headers["x-sluicegate-attempts"], "3");
    assert_eq!(cb.body, "still down\n");

    // Kept in the dead-letter table, not lost; gone from the backlog.
    let store = &store_of(&gw);
    until_store(
        "dead-lettered in the store",
        Duration::from_secs(5),
        || async move { store.dead_letters("flaky").await.unwrap().len() == 1 },
    )
    .await;
    let dead = &store.dead_letters("flaky").await.unwrap()[0];
    assert_eq!((dead.attempts, dead.status), (3, 503));
    assert_eq!(dead.invocation.call_id, "dl-1");
    assert_eq!(dead.invocation.path_and_query, "/job");
    assert_eq!(dead.invocation.body, "payload");
    assert_eq!(store.pending_count("flaky").await.unwrap(), 0);
    assert_eq!(backlog(&gw, "flaky"), 0);
    let f = gw.function("flaky");
    use sluicegate::metrics::AsyncOutcome;
    assert_eq!(f.metrics.async_outcome_count(AsyncOutcome::Retried), 2);
    assert_eq!(f.metrics.async_outcome_count(AsyncOutcome::DeadLettered), 1);
    assert_eq!(f.metrics.async_outcome_count(AsyncOutcome::Succeeded), 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_error_fails_at_once_and_a_dead_callback_does_not_block_the_queue() {
    let (function, calls) = recorder(|n| {
        if n == 0 {
            (422, vec![], "bad input\n".into())
        } else {
            (200, vec![], "fine\n".into())
        }
    })
    .await;
    let keys = "async_initial_retry_wait = \"50ms\"\nasync_max_retry_wait = \"100ms\"\nasync_concurrency = 1";
    let gw = Gw::start_static("strict", &function.url(), keys).await;
    // The first invocation's callback receiver is down: its deliveries are retried and given up,
    // while the second invocation goes through meanwhile.
    let dead_hook = format!("http://127.0.0.1:{}/hook", closed_port());
    let r = gw
        .send(post_async(
            &gw,
            "/async-function/strict",
            "a",
            &[("x-callback-url", &dead_hook)],
        ))
        .await;
    assert_eq!(r.status, 202);
    let r = gw
        .send(post_async(&gw, "/async-function/strict", "b", &[]))
        .await;
    assert_eq!(r.status, 202);
    until("both invocations ran", Duration::from_secs(10), || {
        calls.lock().unwrap().len() == 2
    })
    .await;
    let f = gw.function("strict");
    use sluicegate::metrics::{AsyncOutcome, CallbackResult};
    until("the callback is given up", Duration::from_secs(10), || {
        f.metrics.callback_count(CallbackResult::Failed) == 1
    })
    .await;
    assert_eq!(
        f.metrics.callback_count(CallbackResult::Retried),
        (sluicegate::queue::CALLBACK_ATTEMPTS - 1) as u64
    );
    assert_eq!(f.metrics.async_outcome_count(AsyncOutcome::Failed), 1);
    assert_eq!(f.metrics.async_outcome_count(AsyncOutcome::Succeeded), 1);
    assert_eq!(
        f.metrics.async_outcome_count(AsyncOutcome::Retried),
        0,
        "422 is not retried"
    );
    let store = &store_of(&gw);
    until_store(
        "the store is empty",
        Duration::from_secs(5),
        || async move { store.pending_count("strict").await.unwrap() == 0 },
    )
    .await;
    assert!(store.dead_letters("strict").await.unwrap().is_empty());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_work_holds_one_queue_place_and_cannot_starve_sync_requests() {
    let function = Backend::sleeping(Duration::from_millis(100)).await;
    let limits = "max_ongoing_requests = 1\nmax_queued_requests = 4";
    let gw = Gw::start_static("busy", &function.url(), limits).await;
    for _ in 0..20 {
        assert_eq!(
            gw.send(post_async(&gw, "/async-function/busy", "", &[]))
                .await
                .status,
            202
        );
    }
    let f = gw.function("busy");
    until(
        "async work occupies the replica",
        Duration::from_secs(5),
        || f.figures(Instant::now()).ongoing == 1,
    )
    .await;
    assert!(
        f.figures(Instant::now()).queued <= 1,
        "async holds at most one queue place"
    );
    // Three sync requests at once: they queue beside at most one async waiter, and none is shed.
    let started = Instant::now();
    let sync: Vec<_> = (0..3).map(|_| gw.spawn_get("/function/busy/")).collect();
    for s in sync {
        assert_eq!(s.await.unwrap().status, 200);
    }
    // Each waited for at most the async invocations ahead of it, one per sync request: well under
    // the 20 x 100 ms the whole async backlog takes.
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    assert!(
        backlog(&gw, "busy") > 5,
        "the async backlog is still being worked off"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_invocations_survive_a_restart_and_are_all_delivered() {
    const N: usize = 20;
    let store_path = temp_store_path();
    let store = async_store(&store_path);
    // The function is down; its first attempts fail and wait an hour to be retried.
    let down = format!("http://127.0.0.1:{}", closed_port());
    let job = static_fn("job", &down, "async_initial_retry_wait = \"1h\"");
    let gw = Gw::start_with(&store, &job).await;
    let mut ids = HashSet::new();
    for i in 0..N {
        let id = format!("restart-{i}");
        let r = gw
            .send(post_async(
                &gw,
                &format!("/async-function/job/{i}"),
                "x",
                &[("x-call-id", &id)],
            ))
            .await;
        assert_eq!(r.status, 202);
        ids.insert(id);
    }
    assert_eq!(backlog(&gw, "job"), N as i64);
    gw.shutdown().await;

    // A new gateway on the same store, its function still down for now: the backlog is all there.
    let port = closed_port();
    let job = static_fn(
        "job",
        &format!("http://127.0.0.1:{port}"),
        "async_initial_retry_wait = \"50ms\"\nasync_max_retry_wait = \"200ms\"\nasync_max_attempts = 1000",
    );
    let gw = Gw::start_with(&store, &job).await;
    assert_eq!(
        backlog(&gw, "job"),
        N as i64,
        "the backlog gauge starts from the store"
    );
    let scrape = gw.metrics().await;
    assert_eq!(
        sample(&scrape, "sluicegate_async_backlog{function_name=\"job\"}"),
        Some(N as f64)
    );
    // The function comes up: every invocation is delivered, none lost.
    let (_function, calls) =
        recorder_on(format!("127.0.0.1:{port}").parse().unwrap(), ok_answer).await;
    until(
        "every invocation is delivered",
        Duration::from_secs(20),
        || call_ids(&calls) == ids,
    )
    .await;
    until("the backlog is empty", Duration::from_secs(5), || {
        backlog(&gw, "job") == 0
    })
    .await;
    for c in calls.lock().unwrap().iter() {
        let id = c.headers["x-call-id"].to_str().unwrap();
        let i = id.strip_prefix("restart-").unwrap();
        assert_eq!(c.uri, format!("/{i}"), "the stored path comes back");
    }
    gw.shutdown().await;
    let _ = std::fs::remove_file(store_path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invocations_acknowledged_by_a_sigkilled_gateway_are_delivered_after_restart() {
    const N: usize = 10;
    let dir = std::env::temp_dir().join(format!("sluicegate-sigkill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let store_path = dir.join("async.redb");
    let _ = std::fs::remove_file(&store_path);
    let port = closed_port();
    let job = static_fn(
        "job",
        &format!("http://127.0.0.1:{}", closed_port()),
        "async_initial_retry_wait = \"1h\"",
    );
    let mut child = spawn_binary(&dir, port, &async_store(&store_path), &job);
    let c = client();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up = c
            .request(
                Request::get(format!("{base}/healthz"))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .is_ok_and(|r| r.status() == 200);
        if up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway binary did not come up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut ids = HashSet::new();
    for i in 0..N {
        let id = format!("kill-{i}");
        let r = read_whole(
            c.request(
                Request::post(format!("{base}/async-function/job"))
                    .header("x-call-id", &id)
                    .body(body(format!("payload-{i}")))
                    .unwrap(),
            )
            .await
            .unwrap(),
        )
        .await;
        assert_eq!(r.status, 202);
        ids.insert(id);
    }
    // No drain, no flush: SIGKILL right after the last 202.
    child.kill().unwrap();
    child.wait().unwrap();

    let (function, calls) = recorder(ok_answer).await;
    let job = static_fn("job", &function.url(), "");
    let gw = Gw::start_with(&async_store(&store_path), &job).await;
    until(
        "every acknowledged invocation is delivered",
        Duration::from_secs(20),
        || call_ids(&calls) == ids,
    )
    .await;
    for c in calls.lock().unwrap().iter() {
        let id = c.headers["x-call-id"].to_str().unwrap();
        assert_eq!(
            c.body,
            format!("payload-{}", id.strip_prefix("kill-").unwrap())
        );
    }
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_scales_a_queue_mode_function_up_and_back_to_zero() {
    let tag = unique_tag("asyncqueue");
    let gw = Gw::start(&demo_fn(
        "worker",
        &tag,
        "",
        "max_ongoing_requests = 1\ntermination_grace = \"2s\"",
        "type = \"queue\"\nqueue_length = 4\nmin_replicas = 0\nmax_replicas = 3\n\
         polling_interval = \"100ms\"\ncooldown_period = \"1s\"\nrate_seconds = \"2s\"",
    ))
    .await;
    assert_eq!(count_processes(&tag), 0, "nothing runs before the backlog");
    for _ in 0..24 {
        let r = gw
            .send(post_async(
                &gw,
                "/async-function/worker/?sleep=150ms",
                "",
                &[],
            ))
            .await;
        assert_eq!(r.status, 202);
    }
    let f = gw.function("worker");
    // 24 pending, 4 per replica: ceil(24 / 4) = 6, clamped to max_replicas = 3.
    until("three replicas are ready", Duration::from_secs(15), || {
        let now = f.figures(Instant::now());
        now.replicas == 3 && now.ready == 3
    })
    .await;
    assert_eq!(count_processes(&tag), 3);
    assert!(f.metrics.scaled_up.get() >= 1);
    until("the backlog is worked off", Duration::from_secs(30), || {
        f.metrics.async_backlog.get() == 0
    })
    .await;
    use sluicegate::metrics::AsyncOutcome;
    assert_eq!(f.metrics.async_outcome_count(AsyncOutcome::Succeeded), 24);
    // Nothing pending: back to zero after the cooldown.
    until("scaled to zero", Duration::from_secs(15), || {
        f.figures(Instant::now()).replicas == 0
    })
    .await;
    gw.shutdown().await;
    assert_eq!(count_processes(&tag), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_store_refuses_async_calls_and_keeps_serving_sync_ones() {
    let (function, calls) = recorder(ok_answer).await;
    // The store's directory cannot be created: a file is in the way.
    let blocker = temp_store_path();
    std::fs::write(&blocker, b"not a directory").unwrap();
    let echo = static_fn("echo", &function.url(), "");
    let gw = Gw::start_with(&async_store(&blocker.join("async.redb")), &echo).await;
    let r = gw
        .send(post_async(&gw, "/async-function/echo", "x", &[]))
        .await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(
        r.header("x-sluicegate-reason"),
        Some("async_store_unavailable")
    );
    assert_eq!(r.header("retry-after"), Some("30"));
    assert!(r.body.contains("nothing was stored"), "{}", r.body);
    assert_eq!(gw.get("/function/echo/").await.status, 200);
    assert_eq!(
        calls.lock().unwrap().len(),
        1,
        "only the sync call reached the function"
    );
    gw.shutdown().await;

    // A store another gateway holds open is unavailable too (redb locks the file).
    let shared = temp_store_path();
    let first = Gw::start_with(&async_store(&shared), &echo).await;
    let second = Gw::start_with(&async_store(&shared), &echo).await;
    let r = second
        .send(post_async(&second, "/async-function/echo", "x", &[]))
        .await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(
        r.header("x-sluicegate-reason"),
        Some("async_store_unavailable")
    );
    let r = first
        .send(post_async(&first, "/async-function/echo", "x", &[]))
        .await;
    assert_eq!(r.status, 202);
    second.shutdown().await;
    first.shutdown().await;
    let _ = std::fs::remove_file(blocker);
    let _ = std::fs::remove_file(shared);
}

#[tokio::test]
async fn callback_urls_to_link_local_metadata_or_the_gateway_itself_are_refused_at_accept() {
    let (function, calls) = recorder(ok_answer).await;
    let gw = Gw::start_static("echo", &function.url(), "").await;
    let store = store_of(&gw);
    let own = format!("http://127.0.0.1:{}/system/functions", gw.addr.port());
    for bad in [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/x",
        "http://[::ffff:169.254.169.254]/x",
        "http://0.0.0.0:9/x",
        own.as_str(),
    ] {
        let r = gw
            .send(post_async(
                &gw,
                "/async-function/echo",
                "x",
                &[("x-callback-url", bad)],
            ))
            .await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        assert_eq!(r.header("x-sluicegate-reason"), Some("bad_callback_url"));
        assert_eq!(r.body.lines().count(), 1, "{}", r.body);
    }
    assert_eq!(store.pending_count("echo").await.unwrap(), 0);
    assert!(calls.lock().unwrap().is_empty());
    gw.shutdown().await;
}

#[tokio::test]
async fn a_name_resolving_to_loopback_is_refused_when_loopback_is_not_allowed() {
    let (receiver, callbacks) = recorder(ok_answer).await;
    let (function, calls) = recorder(ok_answer).await;
    let echo = static_fn("echo", &function.url(), "");
    let hook = format!("http://localhost:{}/hook", receiver.addr.port());
    for keys in [
        "callback_allow_loopback = false",
        "callback_allow = [\"10.0.0.0/8\", \"hooks.example.com\"]",
    ] {
        let gw = Gw::start_with(keys, &echo).await;
        let r = gw
            .send(post_async(
                &gw,
                "/async-function/echo",
                "x",
                &[("x-callback-url", &hook)],
            ))
            .await;
        assert_eq!(r.status, 400, "{keys}: {}", r.body);
        assert_eq!(r.header("x-sluicegate-reason"), Some("bad_callback_url"));
        assert!(
            r.body.contains("`localhost` resolves to 127.0.0.1"),
            "{}",
            r.body
        );
        gw.shutdown().await;
    }
    // Allowed by name, or with the default rules: accepted and called back.
    for keys in ["callback_allow = [\"localhost\"]", ""] {
        let gw = Gw::start_with(keys, &echo).await;
        let before = callbacks.lock().unwrap().len();
        let r = gw
            .send(post_async(
                &gw,
                "/async-function/echo",
                "x",
                &[("x-callback-url", &hook)],
            ))
            .await;
        assert_eq!(r.status, 202, "{keys}: {}", r.body);
        until("the callback", Duration::from_secs(10), || {
            callbacks.lock().unwrap().len() > before
        })
        .await;
        gw.shutdown().await;
    }
    assert_eq!(calls.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_callback_refused_at_delivery_dead_letters_the_invocation_with_the_reason() {
    let store_path = temp_store_path();
    let store_key = async_store(&store_path);
    let (receiver, callbacks) = recorder(ok_answer).await;
    let hook = format!("http://localhost:{}/hook", receiver.addr.port());
    // Accepted while loopback callbacks are allowed; the function is down and waits an hour.
    let down = format!("http://127.0.0.1:{}", closed_port());
    let gw = Gw::start_with(
        &store_key,
        &static_fn("job", &down, "async_initial_retry_wait = \"1h\""),
    )
    .await;
    let r = gw
        .send(post_async(
            &gw,
            "/async-function/job",
            "x",
            &[("x-callback-url", &hook), ("x-call-id", "moved-1")],
        ))
        .await;
    assert_eq!(r.status, 202);
    gw.shutdown().await;

    // Delivered by a gateway whose rules refuse where the name now leads.
    let (function, calls) = recorder(ok_answer).await;
    let gw = Gw::start_with(
        &format!("{store_key}\ncallback_allow_loopback = false"),
        &static_fn("job", &function.url(), ""),
    )
    .await;
    let store = store_of(&gw);
    until_store(
        "the invocation is dead-lettered",
        Duration::from_secs(10),
        || {
            let store = store.clone();
            async move { store.dead_letters("job").await.unwrap().len() == 1 }
        },
    )
    .await;
    let dead = &store.dead_letters("job").await.unwrap()[0];
    assert_eq!(dead.invocation.call_id, "moved-1");
    assert!(dead.reason.contains("callback refused"), "{}", dead.reason);
    assert!(dead.reason.contains("localhost"), "{}", dead.reason);
    assert_eq!(calls.lock().unwrap().len(), 1, "the function ran");
    assert!(callbacks.lock().unwrap().is_empty(), "nothing was POSTed");
    gw.shutdown().await;
}

/// A static function `flaky` in front of a backend that answers 503 while the flag is false,
/// 200 once it is true.
async fn flaky_backend() -> (Backend, Arc<std::sync::atomic::AtomicBool>) {
    let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = up.clone();
    let backend = Backend::start(move |_, _| {
        let up = flag.load(std::sync::atomic::Ordering::SeqCst);
        async move {
            let status = if up { 200 } else { 503 };
            Response::builder()
                .status(status)
                .body(body("answer\n"))
                .unwrap()
        }
    })
    .await;
    (backend, up)
}

const FLAKY_KEYS: &str =
    "async_max_attempts = 2\nasync_initial_retry_wait = \"50ms\"\nasync_max_retry_wait = \"50ms\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_async_record_follows_an_invocation_on_a_real_replica_and_expires_after_the_retention()
{
    use common::records::{admin_keys, record, until_record, until_state};
    let tag = unique_tag("async-record");
    let work = demo_fn(
        "work",
        &tag,
        "",
        "",
        "type = \"none\"\nmin_replicas = 1\nmax_replicas = 1",
    );
    let keys = format!("{}\nasync_record_retention = \"1s\"", admin_keys());
    let gw = Gw::start_with(&keys, &work).await;

    // /system rules: no token, no record.
    let r = gw.get("/system/async/rec-1").await;
    assert_eq!(r.status, 401, "{}", r.body);
    let (status, _) = record(&gw, "rec-1").await;
    assert_eq!(status, 404);

    let req = Request::post(gw.url("/async-function/work/slow?sleep=600ms&status=201"))
        .header("x-call-id", "rec-1")
        .body(body("payload"))
        .unwrap();
    let r = gw.send(req).await;
    assert_eq!(r.status, 202, "{}", r.body);
    // Queued (or already running: the dispatcher may be quicker than this GET), then running
    // its first attempt on the replica, then succeeded with the replica's status.
    let first = until_record(
        &gw,
        "rec-1",
        "the record exists",
        Duration::from_secs(5),
        |s, _| s == 200,
    )
    .await;
    assert!(
        first["state"] == "queued" || first["state"] == "running",
        "{first}"
    );
    assert_eq!(first["function"], "work");
    assert!(
        first["acceptedAt"].as_str().unwrap().ends_with('Z'),
        "{first}"
    );
    let running = until_state(&gw, "rec-1", "running").await;
    assert_eq!(running["attempts"], 1, "{running}");
    assert!(running.get("expiresAt").is_none(), "{running}");
    let done = until_state(&gw, "rec-1", "succeeded").await;
    assert_eq!(
        (&done["status"], &done["attempts"]),
        (&201.into(), &1.into()),
        "{done}"
    );
    assert!(done["expiresAt"].is_string(), "{done}");

    // A second after it finished, the record is gone.
    let r = until_record(
        &gw,
        "rec-1",
        "the record expires",
        Duration::from_secs(10),
        |s, _| s == 404,
    )
    .await;
    assert!(r.is_null());
    let r = common::records::admin(&gw, "GET", "/system/async/rec-1").await;
    assert_eq!(r.header("x-sluicegate-reason"), Some("unknown_call_id"));
    assert!(r.body.contains("async_record_retention"), "{}", r.body);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_listed_replayed_until_it_succeeds_and_another_discarded() {
    let (backend, up) = flaky_backend().await;
    let gw = Gw::start_with(
        &common::records::admin_keys(),
        &static_fn("flaky", &backend.url(), FLAKY_KEYS),
    )
    .await;
    common::records::dead_letter_replay_and_discard(&gw, &up).await;
    assert_eq!(backlog(&gw, "flaky"), 0);
    // Replaying a dead letter of a function that is not configured: 404.
    let r = common::records::admin(&gw, "POST", "/system/async-dead-letters/other/1/replay").await;
    assert_eq!(r.status, 404, "{}", r.body);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_and_records_survive_a_restart_and_are_replayed_by_the_next_gateway() {
    let store_path = temp_store_path();
    let keys = format!(
        "{}\n{}",
        async_store(&store_path),
        common::records::admin_keys()
    );
    let (backend, up) = flaky_backend().await;
    let flaky = static_fn("flaky", &backend.url(), FLAKY_KEYS);
    let gw = Gw::start_with(&keys, &flaky).await;
    common::records::post(&gw, "flaky", "kept-1").await;
    let dead = common::records::until_state(&gw, "kept-1", "dead_lettered").await;
    let id = dead["deadLetter"]["id"].as_u64().unwrap();
    gw.shutdown().await;

    up.store(true, std::sync::atomic::Ordering::SeqCst);
    let gw = Gw::start_with(&keys, &flaky).await;
    let (status, again) = common::records::record(&gw, "kept-1").await;
    assert_eq!((status, &again["state"]), (200, &"dead_lettered".into()));
    let r = common::records::admin(
        &gw,
        "POST",
        &format!("/system/async-dead-letters/flaky/{id}/replay"),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    common::records::until_state(&gw, "kept-1", "succeeded").await;
    gw.shutdown().await;
    let _ = std::fs::remove_file(store_path);
}
