//! The process provider and scale from zero, with real child processes of the built binary.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;
use http::Request;
use tokio::time::Instant;

fn field<'a>(body: &'a str, key: &str) -> Option<&'a str> {
    body.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

async fn fire(gw: &Gw, path: &str, n: usize) -> Vec<Resp> {
    let tasks: Vec<_> = (0..n).map(|_| gw.spawn_get(path)).collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_requests_at_zero_start_exactly_one_replica() {
    let tag = unique_tag("zero200");
    let gw = Gw::start(&demo_fn(
        "hello",
        &tag,
        ", \"--startup-delay\", \"400ms\"",
        "termination_grace = \"2s\"\nmax_ongoing_requests = 50\nmax_queued_requests = 500",
        "type = \"none\"\nmin_replicas = 0\nmax_replicas = 5",
    ))
    .await;
    assert_eq!(
        count_processes(&tag),
        0,
        "nothing runs before the first request"
    );
    let responses = fire(&gw, "/function/hello/?sleep=10ms", 200).await;
    let pids: HashSet<&str> = responses
        .iter()
        .filter_map(|r| field(&r.body, "pid"))
        .collect();
    for r in &responses {
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_eq!(
        pids.len(),
        1,
        "every request was served by the one replica: {pids:?}"
    );
    assert_eq!(
        count_processes(&tag),
        1,
        "exactly one replica process exists"
    );
    let f = gw.function("hello");
    assert_eq!(f.metrics.cold_starts.get(), 1);
    let held = responses
        .iter()
        .filter(|r| r.header("x-sluicegate-cold-start").is_some())
        .count();
    assert!(
        held >= 1,
        "the first requests report waiting for the cold start"
    );
    let scrape = gw.metrics().await;
    assert_eq!(
        sample(
            &scrape,
            "sluicegate_function_cold_start_seconds_count{function_name=\"hello\"}"
        ),
        Some(1.0)
    );
    gw.shutdown().await;
    assert_eq!(count_processes(&tag), 0, "no replica survives the gateway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_one_by_one_never_get_two_requests_at_once() {
    let tag = unique_tag("onebyone");
    let gw = Gw::start(&demo_fn(
        "single",
        &tag,
        ", \"--startup-delay\", \"100ms\", \"--startup-jitter\", \"900ms\"",
        "termination_grace = \"2s\"\nmax_ongoing_requests = 1\nmax_queued_requests = 100",
        "type = \"none\"\nmin_replicas = 0\nmax_replicas = 3",
    ))
    .await;
    // Requests arrive at zero; a manual scale asks for three replicas, which become ready at
    // different times.
    let load: Vec<_> = (0..40)
        .map(|_| gw.spawn_get("/function/single/?sleep=60ms"))
        .collect();
    until("requests held", Duration::from_secs(5), || {
        gw.function("single").figures(Instant::now()).queued > 0
    })
    .await;
    let r = gw
        .send(
            Request::post(gw.url("/system/scale-function/single"))
                .body(body(r#"{"replicas": 3}"#))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let mut responses = Vec::new();
    for r in load {
        responses.push(r.await.unwrap());
    }
    let mut per_pid: HashMap<String, usize> = HashMap::new();
    for r in &responses {
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(field(&r.body, "inflight"), Some("1"), "{}", r.body);
        assert_eq!(field(&r.body, "max_inflight"), Some("1"), "{}", r.body);
        *per_pid
            .entry(field(&r.body, "pid").unwrap().to_owned())
            .or_default() += 1;
    }
    assert!(
        per_pid.len() >= 2,
        "later replicas took their share: {per_pid:?}"
    );
    gw.shutdown().await;
    assert_eq!(count_processes(&tag), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_that_cannot_start_answers_503_within_a_second() {
    let config = "[functions.missing]\nprovider = \"process\"\ncommand = [\"/nonexistent/sluicegate-test-binary\"]\n\
                  [functions.missing.autoscaler]\nmin_replicas = 0\n"
        .to_owned()
        + &demo_fn(
            "crashy",
            &unique_tag("crashy"),
            ", \"--fail-start\", \"model file weights.bin not found\"",
            "termination_grace = \"2s\"",
            "min_replicas = 0",
        );
    let gw = Gw::start(&config).await;
    for (name, needle) in [
        ("missing", "No such file or directory"),
        ("crashy", "model file weights.bin not found"),
    ] {
        let started = Instant::now();
        let r = gw.get(&format!("/function/{name}/")).await;
        let took = started.elapsed();
        assert_eq!(r.status, 503, "{name}: {}", r.body);
        assert!(took < Duration::from_secs(1), "{name} took {took:?}");
        assert_eq!(r.header("x-sluicegate-reason"), Some("start_failed"));
        assert!(r.body.contains(needle), "{name}: {}", r.body);
        assert!(
            r.body.contains(&format!("function {name} cannot start")),
            "{}",
            r.body
        );
        assert!(r.header("retry-after").is_some());
        // Asked again while it keeps failing: still a fast, explained 503.
        let started = Instant::now();
        let r = gw.get(&format!("/function/{name}/")).await;
        assert_eq!(r.status, 503);
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    // The others keep being served meanwhile.
    assert_eq!(gw.get("/healthz").await.status, 200);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_load_is_replaced_and_only_its_requests_fail() {
    let tag = unique_tag("sigkill");
    let gw = Gw::start(&demo_fn(
        "sturdy",
        &tag,
        "",
        "termination_grace = \"2s\"\nmax_ongoing_requests = 4\nmax_queued_requests = 1000",
        "type = \"none\"\nmin_replicas = 2\nmax_replicas = 2",
    ))
    .await;
    until("two replicas ready", Duration::from_secs(10), || {
        gw.function("sturdy").ready() == 2
    })
    .await;
    // Find the two pids.
    let mut pids = HashSet::new();
    while pids.len() < 2 {
        let r = gw.get("/function/sturdy/").await;
        pids.insert(field(&r.body, "pid").unwrap().parse::<i32>().unwrap());
    }
    let victim = *pids.iter().next().unwrap();
    let load = {
        let client = gw.client.clone();
        let url = gw.url("/function/sturdy/?sleep=150ms");
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            let deadline = Instant::now() + Duration::from_millis(1500);
            while Instant::now() < deadline {
                let batch: Vec<_> = (0..8)
                    .map(|_| spawn_send_with(&client, Request::get(&url).body(empty()).unwrap()))
                    .collect();
                for b in batch {
                    statuses.push(b.await.unwrap().status.as_u16());
                }
            }
            statuses
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(victim, libc::SIGKILL);
    }
    let statuses = load.await.unwrap();
    let failed = statuses.iter().filter(|&&s| s == 502).count();
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    assert_eq!(
        ok + failed,
        statuses.len(),
        "only 200s and 502s: {statuses:?}"
    );
    assert!(
        failed <= 4,
        "at most the killed replica's in-flight requests fail, got {failed}"
    );
    assert!(ok > 20);
    until(
        "the killed replica is replaced",
        Duration::from_secs(10),
        || gw.function("sturdy").ready() == 2,
    )
    .await;
    let after: HashSet<i32> = fire(&gw, "/function/sturdy/?sleep=20ms", 16)
        .await
        .iter()
        .map(|r| {
            assert_eq!(r.status, 200);
            field(&r.body, "pid").unwrap().parse().unwrap()
        })
        .collect();
    assert!(!after.contains(&victim));
    assert_eq!(count_processes(&tag), 2);
    gw.shutdown().await;
    assert_eq!(count_processes(&tag), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_replica_survives_a_sigkilled_gateway() {
    let tag = unique_tag("orphan");
    let dir = std::env::temp_dir().join(format!("sluicegate-orphan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = closed_port();
    let hello = demo_fn(
        "hello",
        &tag,
        "",
        "termination_grace = \"2s\"",
        "type = \"none\"\nmin_replicas = 2\nmax_replicas = 2",
    );
    let mut gateway = spawn_binary(&dir, port, "", &hello);
    until("both replicas run", Duration::from_secs(10), || {
        count_processes(&tag) == 2
    })
    .await;
    gateway.kill().unwrap(); // SIGKILL: no chance to clean up
    gateway.wait().unwrap();
    until(
        "the replicas died with the gateway",
        Duration::from_secs(3),
        || count_processes(&tag) == 0,
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_scale_is_clamped_to_the_bounds() {
    let tag = unique_tag("manual");
    let gw = Gw::start(&demo_fn(
        "clamped",
        &tag,
        "",
        "termination_grace = \"2s\"",
        "type = \"none\"\nmin_replicas = 1\nmax_replicas = 2",
    ))
    .await;
    let scale = |n: i64| {
        Request::post(gw.url("/system/scale-function/clamped"))
            .body(body(format!("{{\"replicas\": {n}}}")))
            .unwrap()
    };
    let r = gw.send(scale(10)).await;
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["replicas"], 2);
    until("two ready", Duration::from_secs(10), || {
        gw.function("clamped").ready() == 2
    })
    .await;
    let r = gw.send(scale(0)).await;
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["replicas"], 1, "clamped to min_replicas");
    until("one left", Duration::from_secs(10), || {
        count_processes(&tag) == 1
    })
    .await;
    let r = gw
        .send(
            Request::post(gw.url("/system/scale-function/clamped"))
                .body(body("not json"))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("replicas"), "{}", r.body);
    gw.shutdown().await;
    assert_eq!(count_processes(&tag), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_down_lets_in_flight_requests_finish() {
    let tag = unique_tag("drainrep");
    let gw = Gw::start(&demo_fn(
        "drainer",
        &tag,
        "",
        "termination_grace = \"2s\"\nmax_ongoing_requests = 2",
        "type = \"none\"\nmin_replicas = 0\nmax_replicas = 1",
    ))
    .await;
    assert_eq!(gw.get("/function/drainer/").await.status, 200);
    let slow = gw.spawn_get("/function/drainer/?sleep=700ms");
    until("slow request in flight", Duration::from_secs(5), || {
        gw.function("drainer").figures(Instant::now()).ongoing == 1
    })
    .await;
    let r = gw
        .send(
            Request::post(gw.url("/system/scale-function/drainer"))
                .body(body(r#"{"replicas": 0}"#))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 200);
    let done = slow.await.unwrap();
    assert_eq!(
        done.status, 200,
        "the in-flight request finished on the draining replica"
    );
    until("replica gone", Duration::from_secs(5), || {
        count_processes(&tag) == 0
    })
    .await;
    gw.shutdown().await;
}
