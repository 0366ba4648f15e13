//! The `kubernetes` provider end to end: the real gateway with the real kube client against the
//! fake API server on loopback (tests/common/fake_kube.rs), function "pods" being real loopback
//! HTTP servers whose readiness the fake publishes in EndpointSlices.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use common::fake_kube::{crash_loop_status, FakeEndpoint, FakeKube, Resource};
use common::{body, until, Backend, Gw};
use http::Response;

const NS: &str = "fns";

fn scratch(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sluicegate-kube-{}-{}", std::process::id(), test));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A gateway connected to `fake` through a kubeconfig file, with `functions`.
async fn gateway(fake: &FakeKube, test: &str, gateway_keys: &str, functions: &str) -> Gw {
    let kubeconfig = fake.write_kubeconfig(&scratch(test), NS);
    Gw::start_with(
        &format!(
            "kubeconfig = {:?}\n{gateway_keys}",
            kubeconfig.display().to_string()
        ),
        functions,
    )
    .await
}

fn kube_fn(name: &str, keys: &str, autoscaler: &str) -> String {
    format!(
        "[functions.{name}]\nprovider = \"kubernetes\"\n{keys}\n[functions.{name}.autoscaler]\n{autoscaler}\n"
    )
}

/// A pod: answers `pod <n>`, and records when each request arrived.
async fn pod(n: usize, arrivals: Arc<Mutex<Vec<Instant>>>) -> Backend {
    Backend::start(move |_, _| {
        let arrivals = arrivals.clone();
        async move {
            arrivals.lock().unwrap().push(Instant::now());
            Response::new(body(format!("pod {n}\n")))
        }
    })
    .await
}

/// Writes to the API other than reads and watches.
fn writes(fake: &FakeKube) -> Vec<String> {
    fake.requests()
        .into_iter()
        .filter(|r| r.method != "GET")
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_from_zero_writes_only_the_scale_and_releases_held_requests_when_a_pod_turns_ready() {
    let fake = FakeKube::start().await;
    fake.apply_deployment(NS, "echo", 0, &[], &[], &[("app", "echo")]);
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let pods = [
        pod(0, arrivals.clone()).await,
        pod(1, arrivals.clone()).await,
    ];
    fake.bind_replicas(
        NS,
        "echo",
        "echo",
        pods.iter().map(|p| p.addr).collect(),
        Duration::from_millis(300),
    );
    let gw = gateway(
        &fake,
        "wake",
        "",
        &kube_fn("echo", "", "min_replicas = 0\nmax_replicas = 2"),
    )
    .await;
    fake.until_watching(Resource::EndpointSlices).await;

    let held: Vec<_> = (0..5).map(|_| gw.spawn_get("/function/echo/hi")).collect();
    until("the wake to be written", Duration::from_secs(5), || {
        fake.deployment_replicas(NS, "echo") == Some(1)
    })
    .await;
    let asked = Instant::now();
    for h in held {
        let resp = h.await.unwrap();
        assert_eq!(resp.status, 200, "{}", resp.body);
        assert_eq!(resp.body, "pod 0\n");
        assert!(resp.header("x-sluicegate-cold-start").is_some());
    }
    // Released by the watch event, not a poll: the first request reached the pod right after
    // the endpoint turned ready (300 ms after it was asked for).
    let first = arrivals.lock().unwrap()[0];
    let waited = first.duration_since(asked);
    eprintln!("first request reached the pod {waited:?} after the wake was seen written");
    assert!(
        waited >= Duration::from_millis(250),
        "released only once the endpoint turned ready (300 ms after the write): {waited:?}"
    );
    assert!(waited < Duration::from_secs(2), "{waited:?}");

    // Only the scale subresource was ever written, and only as GET-then-PUT.
    assert_eq!(
        writes(&fake),
        ["PUT /apis/apps/v1/namespaces/fns/deployments/echo/scale"]
    );
    // The count is read back.
    until("replicas read back", Duration::from_secs(5), || {
        gw.function("echo").figures(Instant::now()).replicas == 1
    })
    .await;
    gw.shutdown().await;
    assert_eq!(
        fake.deployment_replicas(NS, "echo"),
        Some(1),
        "the Deployment keeps its replicas when the gateway stops"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_scale_up_and_down_goes_through_the_subresource_and_endpoints_follow() {
    let fake = FakeKube::start().await;
    fake.apply_deployment(NS, "work", 1, &[], &[], &[("app", "work")]);
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let mut pods = Vec::new();
    for n in 0..3 {
        pods.push(pod(n, arrivals.clone()).await);
    }
    fake.bind_replicas(
        NS,
        "work",
        "work",
        pods.iter().map(|p| p.addr).collect(),
        Duration::from_millis(50),
    );
    let gw = gateway(
        &fake,
        "manual",
        "",
        &kube_fn(
            "work",
            "",
            "type = \"none\"\nmin_replicas = 0\nmax_replicas = 3",
        ),
    )
    .await;
    // The Deployment was at 1 before the gateway started; bind_replicas publishes it on the next
    // scale, so scale through the admin API.
    let resp = gw
        .post("/system/scale-function/work", r#"{"replicas": 3}"#)
        .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    until("3 ready replicas", Duration::from_secs(5), || {
        gw.function("work").ready() == 3
    })
    .await;
    assert_eq!(fake.deployment_replicas(NS, "work"), Some(3));
    let resp = gw
        .post("/system/scale-function/work", r#"{"replicas": 1}"#)
        .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    until("1 ready replica", Duration::from_secs(5), || {
        gw.function("work").ready() == 1
    })
    .await;
    for r in fake.requests() {
        if r.method != "GET" {
            assert_eq!(r.method, "PUT", "{r:?}");
            assert!(r.path.ends_with("/deployments/work/scale"), "{r:?}");
        }
    }
    let status = gw.get("/system/function/work").await;
    let status: serde_json::Value = serde_json::from_str(&status.body).unwrap();
    assert_eq!(status["replicas"], 1);
    assert_eq!(status["availableReplicas"], 1);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_watch_resumes_and_the_api_server_down_keeps_warm_traffic_served() {
    let fake = FakeKube::start().await;
    fake.apply_deployment(NS, "warm", 1, &[], &[], &[("app", "warm")]);
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let a = pod(0, arrivals.clone()).await;
    let b = pod(1, arrivals.clone()).await;
    fake.set_endpoints(
        NS,
        "warm",
        vec![FakeEndpoint::ready(a.addr), FakeEndpoint::not_ready(b.addr)],
        "http",
    );
    let gw = gateway(&fake, "down", "", &kube_fn("warm", "", "type = \"none\"")).await;
    until("one ready replica", Duration::from_secs(5), || {
        gw.function("warm").ready() == 1
    })
    .await;
    for _ in 0..10 {
        assert_eq!(
            gw.get("/function/warm/").await.body,
            "pod 0\n",
            "not-ready b gets nothing"
        );
    }

    // A dropped watch resumes from its resourceVersion and sees what changed meanwhile.
    let lists_before = fake
        .requests()
        .iter()
        .filter(|r| r.is_list(Resource::EndpointSlices))
        .count();
    fake.drop_watches();
    fake.set_endpoints(
        NS,
        "warm",
        vec![FakeEndpoint::ready(a.addr), FakeEndpoint::ready(b.addr)],
        "http",
    );
    until("two ready replicas", Duration::from_secs(10), || {
        gw.function("warm").ready() == 2
    })
    .await;
    let lists_after = fake
        .requests()
        .iter()
        .filter(|r| r.is_list(Resource::EndpointSlices))
        .count();
    assert_eq!(lists_before, lists_after, "resumed, not relisted");

    // An expired resourceVersion relists; the endpoints are never emptied in between.
    fake.expire_watches();
    fake.set_endpoints(
        NS,
        "warm",
        vec![
            FakeEndpoint::terminating(a.addr),
            FakeEndpoint::ready(b.addr),
        ],
        "http",
    );
    until(
        "back to one replica after the relist",
        Duration::from_secs(10),
        || gw.function("warm").ready() == 1,
    )
    .await;

    // The API server goes away: the endpoints it last said keep serving.
    fake.set_down(true).await;
    for _ in 0..20 {
        let resp = gw.get("/function/warm/").await;
        assert_eq!(resp.status, 200, "{}", resp.body);
        assert_eq!(resp.body, "pod 1\n");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gw.function("warm").ready(), 1);
    let resp = gw.get("/function/warm/").await;
    assert_eq!(resp.status, 200);
    fake.set_down(false).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_function_fails_held_requests_fast_with_the_reason() {
    let fake = FakeKube::start().await;
    fake.apply_deployment(NS, "crash", 0, &[], &[], &[("app", "crash")]);
    let gw = gateway(
        &fake,
        "crash",
        "",
        &kube_fn(
            "crash",
            "cold_start_timeout = \"30s\"",
            "min_replicas = 0\nmax_replicas = 1",
        ),
    )
    .await;
    fake.until_watching(Resource::Pods).await;
    let held = gw.spawn_get("/function/crash/");
    until("the wake to be written", Duration::from_secs(5), || {
        fake.deployment_replicas(NS, "crash") == Some(1)
    })
    .await;
    let started = Instant::now();
    fake.apply_pod(
        NS,
        "crash-7d9-x",
        &[("app", "crash")],
        crash_loop_status(3, "panic: no DATABASE_URL"),
    );
    let resp = held.await.unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status, 503, "{}", resp.body);
    assert_eq!(resp.header("x-sluicegate-reason"), Some("start_failed"));
    assert!(resp.body.contains("CrashLoopBackOff"), "{}", resp.body);
    assert!(resp.body.contains("last exit code 3"), "{}", resp.body);
    assert!(
        took < Duration::from_secs(5),
        "failed fast, not after 30 s: {took:?}"
    );
    // New requests get the same answer at once.
    let again = gw.get("/function/crash/").await;
    assert_eq!(again.status, 503);
    assert!(again.body.contains("CrashLoopBackOff"), "{}", again.body);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_deleted_while_requests_are_held_answers_them_503_with_a_reason() {
    let fake = FakeKube::start().await;
    fake.apply_deployment(NS, "gone", 0, &[], &[], &[("app", "gone")]);
    let gw = gateway(
        &fake,
        "deleted",
        "",
        &kube_fn("gone", "", "min_replicas = 0\nmax_replicas = 1"),
    )
    .await;
    fake.until_watching(Resource::Deployments).await;
    let held = gw.spawn_get("/function/gone/");
    until("the wake to be written", Duration::from_secs(5), || {
        fake.deployment_replicas(NS, "gone") == Some(1)
    })
    .await;
    assert!(fake.delete_deployment(NS, "gone"));
    let resp = held.await.unwrap();
    assert_eq!(resp.status, 503, "{}", resp.body);
    assert!(
        resp.body.contains("deployment fns/gone does not exist"),
        "{}",
        resp.body
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_external_scaler_the_gateway_only_wakes_from_zero() {
    let fake = FakeKube::start().await;
    fake.apply_deployment(NS, "keda", 0, &[], &[], &[("app", "keda")]);
    let p = pod(0, Arc::new(Mutex::new(Vec::new()))).await;
    let q = pod(1, Arc::new(Mutex::new(Vec::new()))).await;
    fake.bind_replicas(
        NS,
        "keda",
        "keda",
        vec![p.addr, q.addr],
        Duration::from_millis(50),
    );
    let gw = gateway(
        &fake,
        "external",
        "",
        &kube_fn(
            "keda",
            "",
            "type = \"none\"\nmin_replicas = 0\nmax_replicas = 5",
        ),
    )
    .await;
    fake.until_watching(Resource::EndpointSlices).await;
    let resp = gw.get("/function/keda/").await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(fake.deployment_replicas(NS, "keda"), Some(1), "woken to 1");
    // The external scaler takes it to 2: the gateway follows and never writes.
    fake.clear_requests();
    fake.apply_deployment(NS, "keda", 2, &[], &[], &[("app", "keda")]);
    until("two ready replicas", Duration::from_secs(5), || {
        gw.function("keda").ready() == 2
    })
    .await;
    for _ in 0..20 {
        assert_eq!(gw.get("/function/keda/").await.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(writes(&fake).is_empty(), "{:?}", writes(&fake));
    assert_eq!(gw.function("keda").figures(Instant::now()).replicas, 2);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_picks_a_labelled_deployment_up_reads_its_annotations_and_drops_it() {
    let fake = FakeKube::start().await;
    let p = pod(0, Arc::new(Mutex::new(Vec::new()))).await;
    let gw = gateway(
        &fake,
        "discovery",
        "kubernetes_discovery = true",
        "[defaults]\nmax_ongoing_requests = 3\n",
    )
    .await;
    fake.until_watching(Resource::Deployments).await;
    assert_eq!(gw.get("/function/hello/").await.status, 404);

    fake.apply_deployment(
        NS,
        "hello-v1",
        1,
        &[("sluicegate.io/function", "hello")],
        &[
            ("sluicegate.io/max_queued_requests", "7"),
            ("sluicegate.io/timeout", "20s"),
            ("sluicegate.io/service", "hello-svc"),
            ("sluicegate.io/autoscaler.type", "none"),
        ],
        &[("app", "hello")],
    );
    fake.set_endpoints(NS, "hello-svc", vec![FakeEndpoint::ready(p.addr)], "http");
    until("hello served", Duration::from_secs(5), || {
        gw.running
            .as_ref()
            .unwrap()
            .gateway()
            .function("hello")
            .is_some_and(|f| f.ready() == 1)
    })
    .await;
    let resp = gw.get("/function/hello/x").await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    let f = gw.function("hello");
    assert_eq!(f.config.max_ongoing_requests, 3, "[defaults] apply");
    assert_eq!(f.config.max_queued_requests, Some(7));
    assert_eq!(f.config.timeout, Duration::from_secs(20));
    let listed = gw.get("/system/functions").await;
    assert!(listed.body.contains("\"hello\""), "{}", listed.body);

    // A bad annotation: the function answers 503 naming the key, and the gateway keeps serving.
    fake.apply_deployment(
        NS,
        "hello-v1",
        1,
        &[("sluicegate.io/function", "hello")],
        &[("sluicegate.io/max_ongoing_requests", "lots")],
        &[("app", "hello")],
    );
    let mut last = String::new();
    until("the bad annotation named", Duration::from_secs(5), || {
        let gateway = gw.running.as_ref().unwrap().gateway();
        gateway
            .function("hello")
            .is_some_and(|f| f.backend().kind() == "kubernetes" && !f.backend().scalable())
    })
    .await;
    let resp = gw.get("/function/hello/").await;
    last.push_str(&resp.body);
    assert_eq!(resp.status, 503, "{last}");
    assert!(last.contains("max_ongoing_requests"), "{last}");
    assert!(last.contains("deployment fns/hello-v1"), "{last}");

    // Deleted: dropped.
    assert!(fake.delete_deployment(NS, "hello-v1"));
    until("hello dropped", Duration::from_secs(5), || {
        gw.running
            .as_ref()
            .unwrap()
            .gateway()
            .function("hello")
            .is_none()
    })
    .await;
    assert_eq!(gw.get("/function/hello/").await.status, 404);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_writes_retry_through_server_errors() {
    let fake = FakeKube::start().await;
    fake.apply_deployment(NS, "flaky", 0, &[], &[], &[("app", "flaky")]);
    let p = pod(0, Arc::new(Mutex::new(Vec::new()))).await;
    fake.bind_replicas(
        NS,
        "flaky",
        "flaky",
        vec![p.addr],
        Duration::from_millis(20),
    );
    let gw = gateway(
        &fake,
        "flaky",
        "",
        &kube_fn("flaky", "", "min_replicas = 0\nmax_replicas = 1"),
    )
    .await;
    fake.until_watching(Resource::EndpointSlices).await;
    fake.fail_next(3, 503);
    let resp = gw.get("/function/flaky/").await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(fake.deployment_replicas(NS, "flaky"), Some(1));
    assert!(p.stats.requests.load(Ordering::SeqCst) >= 1);
    gw.shutdown().await;
}

/// Functions woken one after another, each released by its endpoint's publication: every held
/// request is served by the pod that turned ready. Also the measurement behind
/// `loadtests/kube-wake-gap.sh` (`WAKE_GAP_ROUNDS`, default 5 here): the time from the fake API
/// server publishing the ready endpoint to the held request reaching the pod is printed, never
/// asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_gap() {
    let rounds: usize = std::env::var("WAKE_GAP_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let fake = FakeKube::start().await;
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let p = pod(0, arrivals.clone()).await;
    let mut functions = String::new();
    for n in 0..rounds {
        fake.apply_deployment(NS, &format!("gap{n}"), 0, &[], &[], &[("app", "gap")]);
        functions.push_str(&kube_fn(
            &format!("gap{n}"),
            "",
            "min_replicas = 0\nmax_replicas = 1",
        ));
    }
    let gw = gateway(&fake, "gap", "", &functions).await;
    fake.until_watches(Resource::EndpointSlices, rounds).await;
    let mut gaps = Vec::new();
    for n in 0..rounds {
        let name = format!("gap{n}");
        let held = gw.spawn_get(&format!("/function/{name}/"));
        until("the wake to be written", Duration::from_secs(5), || {
            fake.deployment_replicas(NS, &name) == Some(1)
        })
        .await;
        // Held now; the endpoint turns ready at `published`.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let before = arrivals.lock().unwrap().len();
        let published = Instant::now();
        fake.set_endpoints(NS, &name, vec![FakeEndpoint::ready(p.addr)], "http");
        let resp = held.await.unwrap();
        assert_eq!(resp.status, 200, "{}", resp.body);
        let arrived = arrivals.lock().unwrap()[before];
        gaps.push(arrived.duration_since(published));
    }
    let micros: Vec<u128> = gaps.iter().map(|g| g.as_micros()).collect();
    println!("wake gap (endpoint published -> request at the pod), microseconds: {micros:?}");
    gw.shutdown().await;
}

/// The RBAC rule a recorded request needs: (API group, resource[/subresource], verb).
fn rule_of(r: &common::fake_kube::Recorded) -> (String, String, String) {
    let parts: Vec<&str> = r.path.trim_start_matches('/').split('/').collect();
    // /api/v1/namespaces/{ns}/{resource}[/{name}[/{sub}]] or /apis/{group}/{version}/…
    let (group, rest) = match parts.first() {
        Some(&"api") => ("", &parts[2..]),
        Some(&"apis") => (parts[1], &parts[3..]),
        _ => panic!("not an API path: {r:?}"),
    };
    let rest = match rest {
        ["namespaces", _ns, rest @ ..] => rest,
        rest => rest,
    };
    let (resource, named) = match rest {
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, sub] => (format!("{resource}/{sub}"), true),
        _ => panic!("unexpected path {r:?}"),
    };
    let verb = match (r.method.as_str(), named) {
        ("GET", _) if r.is_watch() => "watch",
        ("GET", false) => "list",
        ("GET", true) => "get",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("POST", _) => "create",
        ("DELETE", _) => "delete",
        (m, _) => panic!("method {m}"),
    };
    (group.to_owned(), resource, verb.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discovered_function_at_rest_has_no_autoscaler_task_until_its_first_request() {
    let fake = FakeKube::start().await;
    let p = pod(0, Arc::new(Mutex::new(Vec::new()))).await;
    fake.bind_replicas(NS, "lazy", "lazy", vec![p.addr], Duration::from_millis(20));
    let gw = gateway(&fake, "lazy", "kubernetes_discovery = true", "").await;
    fake.until_watching(Resource::Deployments).await;
    fake.apply_deployment(
        NS,
        "lazy",
        0,
        &[("sluicegate.io/function", "lazy")],
        &[
            ("sluicegate.io/service", "lazy"),
            ("sluicegate.io/autoscaler.type", "rps"),
            ("sluicegate.io/autoscaler.min_replicas", "0"),
            ("sluicegate.io/autoscaler.max_replicas", "1"),
        ],
        &[("app", "lazy")],
    );
    until("lazy discovered", Duration::from_secs(5), || {
        gw.running
            .as_ref()
            .unwrap()
            .gateway()
            .function("lazy")
            .is_some()
    })
    .await;
    let f = gw.function("lazy");
    assert!(
        f.autoscaler_parked(),
        "no autoscaler task while never invoked"
    );
    let resp = gw.get("/function/lazy/").await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert!(!f.autoscaler_parked(), "the first request started it");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_call_is_one_the_role_grants_and_every_grant_is_used() {
    let fake = FakeKube::start().await;
    fake.apply_deployment(NS, "echo", 0, &[], &[], &[("app", "echo")]);
    let p = pod(0, Arc::new(Mutex::new(Vec::new()))).await;
    fake.bind_replicas(NS, "echo", "echo", vec![p.addr], Duration::from_millis(20));
    let gw = gateway(
        &fake,
        "rbac",
        "kubernetes_discovery = true",
        &kube_fn("echo", "", "min_replicas = 0\nmax_replicas = 1"),
    )
    .await;
    fake.until_watching(Resource::Pods).await;
    assert_eq!(gw.get("/function/echo/").await.status, 200);
    gw.shutdown().await;

    let used: std::collections::BTreeSet<(String, String, String)> =
        fake.requests().iter().map(rule_of).collect();
    let granted: std::collections::BTreeSet<(String, String, String)> =
        sluicegate::provider::kubernetes::API_RULES
            .iter()
            .flat_map(|rule| {
                rule.verbs.iter().map(|v| {
                    (
                        rule.group.to_owned(),
                        rule.resource.to_owned(),
                        (*v).to_owned(),
                    )
                })
            })
            .collect();
    let ungranted: Vec<_> = used.difference(&granted).collect();
    assert!(
        ungranted.is_empty(),
        "calls the Role does not grant: {ungranted:?}"
    );
    let unused: Vec<_> = granted.difference(&used).collect();
    assert!(unused.is_empty(), "grants no call needs: {unused:?}");
}
