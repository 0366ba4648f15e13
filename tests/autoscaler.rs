//! The autoscaler end to end: real gateway, real replica processes, paced load over real sockets.

mod common;

use std::time::Duration;

use common::*;
use http::Request;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_load_scales_up_to_the_computed_count_and_back_after_the_cooldown() {
    let tag = unique_tag("autoscale");
    // 40 requests/s against 30 per replica per 2 s window: ceil(80 / 30) = 3 replicas.
    let gw = Gw::start(&demo_fn(
        "auto",
        &tag,
        "",
        "max_ongoing_requests = 10",
        "type = \"rps\"\nthreshold = 30\nrate_seconds = \"2s\"\n\
         polling_interval = \"200ms\"\ncooldown_period = \"1500ms\"\nmin_replicas = 1\nmax_replicas = 6",
    ))
    .await;
    let f = gw.function("auto");
    let figures = || f.figures(Instant::now());

    let load = {
        let client = gw.client.clone();
        let url = gw.url("/function/auto/?sleep=20ms");
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(25));
            let mut sent = Vec::new();
            for _ in 0..160 {
                tick.tick().await;
                let req = Request::get(&url).body(empty()).unwrap();
                sent.push(spawn_send_with(&client, req));
            }
            let mut statuses = Vec::new();
            for s in sent {
                statuses.push(s.await.unwrap().status.as_u16());
            }
            statuses
        })
    };

    // Rises to 3 while the load runs, and only to 3.
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut peak = 0;
    while Instant::now() < deadline {
        let now = figures();
        peak = peak.max(now.replicas);
        if now.ready == 3 && now.replicas == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        (figures().replicas, figures().ready),
        (3, 3),
        "peak was {peak}"
    );
    assert_eq!(count_processes(&tag), 3);
    let statuses = load.await.unwrap();
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let scrape = gw.metrics().await;
    assert!(
        sample(
            &scrape,
            "sluicegate_autoscaler_decisions_total{direction=\"up\",function_name=\"auto\"}"
        )
        .unwrap()
            >= 1.0
    );

    // Load stopped: the window empties in 2 s, then 1.5 s of cooldown, then back to min_replicas.
    let stopped = Instant::now();
    while figures().replicas != 1 {
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "never scaled down: {:?}",
            figures()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        stopped.elapsed() >= Duration::from_millis(1500),
        "scaled down inside the cooldown after {:?}",
        stopped.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while count_processes(&tag) != 1 {
        assert!(Instant::now() < deadline, "replicas were not stopped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let scrape = gw.metrics().await;
    assert_eq!(
        sample(
            &scrape,
            "sluicegate_function_desired_replicas{function_name=\"auto\"}"
        ),
        Some(1.0)
    );
    gw.shutdown().await;
    assert_eq!(count_processes(&tag), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_function_scales_to_zero_and_wakes_again() {
    let tag = unique_tag("zero");
    let gw = Gw::start(&demo_fn(
        "nap",
        &tag,
        "",
        "",
        "type = \"rps\"\nrate_seconds = \"1s\"\npolling_interval = \"100ms\"\n\
         cooldown_period = \"800ms\"\nmin_replicas = 0\nmax_replicas = 2",
    ))
    .await;
    assert_eq!(gw.get("/function/nap/").await.status, 200);
    assert_eq!(count_processes(&tag), 1);
    let f = gw.function("nap");
    let idle = Instant::now();
    while f.figures(Instant::now()).replicas != 0 {
        assert!(
            idle.elapsed() < Duration::from_secs(10),
            "never scaled to zero"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        idle.elapsed() >= Duration::from_millis(800),
        "idled inside the cooldown"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while count_processes(&tag) != 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The next request wakes it again.
    let r = gw.get("/function/nap/").await;
    assert_eq!(r.status, 200);
    assert!(r.header("x-sluicegate-cold-start").is_some());
    assert_eq!(f.metrics.cold_starts.get(), 2);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_mode_scales_a_cpu_bound_function_up_and_an_idle_one_down() {
    let busy_tag = unique_tag("cpu-busy");
    let idle_tag = unique_tag("cpu-idle");
    let policy = "type = \"cpu\"\ntarget_cpu_percent = 10\nmin_replicas = 1\nmax_replicas = 3\n\
                  rate_seconds = \"2s\"\npolling_interval = \"200ms\"\ncooldown_period = \"1s\"";
    // Each `busy` replica is a shell that starts a busy loop in the background (in the replica's
    // process group, so it counts; it ends with the replica, `$$` being the replica's pid after
    // `exec`), then runs the demo function.
    let busy = format!(
        "[functions.busy]\nprovider = \"process\"\n\
         command = [\"sh\", \"-c\", \"while kill -0 $$ 2>/dev/null; do :; done & exec {BIN} demo-function --tag {busy_tag}\"]\n\
         readiness_path = \"/healthz\"\n[functions.busy.autoscaler]\n{policy}\n"
    );
    let idle = demo_fn("idle", &idle_tag, "", "", policy);
    let gw = Gw::start(&format!("{busy}\n{idle}")).await;
    let busy = gw.function("busy");
    let idle = gw.function("idle");
    let figures = |f: &sluicegate::function::Function| f.figures(Instant::now());

    // The idle function, scaled to 3 by hand, uses no CPU: back to min_replicas once the
    // manual count has stood for the cooldown.
    let r = gw
        .post("/system/scale-function/idle", "{\"replicas\": 3}")
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(figures(&idle).replicas, 3);

    // One busy replica keeps a core busy, or what a loaded machine gives it: far above the
    // 10 % target (low, so that the test holds on a shared machine), so the autoscaler asks
    // for max_replicas.
    until("busy reaches 3 replicas", Duration::from_secs(30), || {
        figures(&busy).replicas == 3
    })
    .await;
    until("idle is back to 1 replica", Duration::from_secs(30), || {
        figures(&idle).replicas == 1
    })
    .await;
    assert_eq!(
        figures(&busy).replicas,
        3,
        "busy stays up while it burns CPU"
    );
    gw.shutdown().await;
    // The busy loops ended with their replicas.
    until("the busy loops are gone", Duration::from_secs(10), || {
        count_processes(&busy_tag) == 0
    })
    .await;
}
