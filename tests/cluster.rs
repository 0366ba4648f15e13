//! Several gateways as one, through a real `nats-server -js`: shared per-replica caps, one
//! autoscaler leader deciding on everyone's figures, hand-over when the leader dies.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::fake_kube::{FakeKube, Resource};
use common::nats::NatsServer;
use common::{body, closed_port, spawn_binary, until, Backend, Gw};
use http::Response;
use tokio::time::Instant;

fn cluster_keys(nats: &NatsServer, id: &str, lease: &str) -> String {
    format!(
        "cluster = \"{}\"\ngateway_id = \"{id}\"\ncluster_lease = \"{lease}\"",
        nats.url()
    )
}

/// Waits until every gateway counts `n` live members for `function`.
async fn until_members(gws: &[&Gw], function: &str, n: u32) {
    until(
        &format!("{n} gateways in every view"),
        Duration::from_secs(10),
        || {
            gws.iter().all(|gw| {
                gw.function(function)
                    .peer_figures(Instant::now())
                    .is_some_and(|p| p.gateways + 1 == n)
            })
        },
    )
    .await;
}

/// Three gateways ("a", "b", "c") in one cluster on `nats`, connected to `fake` (namespace
/// `fns`), serving `function`.
async fn three_on_kube(nats: &NatsServer, fake: &FakeKube, test: &str, function: &str) -> Vec<Gw> {
    let dir =
        std::env::temp_dir().join(format!("sluicegate-cluster-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = fake.write_kubeconfig(&dir, "fns");
    let mut gws = Vec::new();
    for id in ["a", "b", "c"] {
        let keys = format!(
            "{}\nkubeconfig = {:?}",
            cluster_keys(nats, id, "3s"),
            kubeconfig.display().to_string()
        );
        gws.push(Gw::start_with(&keys, function).await);
    }
    gws
}

/// Deployment `name` in `fns` at `replicas`, its pods `n` loopback servers answering after
/// 100 ms, bound to it (each ready 20 ms after it is asked for).
async fn slow_deployment(fake: &FakeKube, name: &str, replicas: i32, n: usize) -> Vec<Backend> {
    fake.apply_deployment("fns", name, replicas, &[], &[], &[("app", name)]);
    let mut pods = Vec::new();
    for _ in 0..n {
        pods.push(
            Backend::start(|_, _| async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Response::new(body("ok\n"))
            })
            .await,
        );
    }
    fake.bind_replicas(
        "fns",
        name,
        name,
        pods.iter().map(|p| p.addr).collect(),
        Duration::from_millis(20),
    );
    pods
}

/// A kubernetes function scaled on concurrency (2 per replica), quickly.
fn concurrency_fn(name: &str, min_replicas: u32, max_replicas: u32) -> String {
    format!(
        "[functions.{name}]\nprovider = \"kubernetes\"\nmax_ongoing_requests = 4\n\
         [functions.{name}.autoscaler]\ntype = \"concurrency\"\ntarget_ongoing_requests = 2\n\
         min_replicas = {min_replicas}\nmax_replicas = {max_replicas}\nrate_seconds = \"2s\"\n\
         polling_interval = \"200ms\"\n"
    )
}

/// Waits until exactly one of `gws` leads.
async fn until_one_leader(gws: &[Gw], function: &str) {
    until("one leader", Duration::from_secs(10), || {
        gws.iter()
            .filter(|gw| gw.function(function).is_leader())
            .count()
            == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_never_sees_more_than_its_cap_from_three_gateways_together() {
    let nats = NatsServer::start().await;
    let slow = Backend::start(|_, _| async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        Response::new(body("ok\n"))
    })
    .await;
    let function = format!(
        "[functions.slow]\nprovider = \"static\"\nupstreams = [\"{}\"]\nmax_ongoing_requests = 6\nmax_queued_requests = 1000\n",
        slow.url()
    );
    let mut gws = Vec::new();
    for id in ["a", "b", "c"] {
        gws.push(Gw::start_with(&cluster_keys(&nats, id, "3s"), &function).await);
    }
    until_members(&gws.iter().collect::<Vec<_>>(), "slow", 3).await;
    until("shares of 2 each", Duration::from_secs(5), || {
        gws.iter().all(|gw| gw.function("slow").share() == 2)
    })
    .await;

    // 60 requests at once, 20 through each gateway.
    let mut calls = Vec::new();
    for gw in &gws {
        for _ in 0..20 {
            calls.push(gw.spawn_get("/function/slow/"));
        }
    }
    for c in calls {
        let resp = c.await.unwrap();
        assert_eq!(resp.status, 200, "{}", resp.body);
    }
    let most = slow.stats.max_inflight.load(Ordering::SeqCst);
    assert!(
        most <= 6,
        "the replica saw {most} at once from the three gateways"
    );
    assert!(most >= 4, "and the three together did use it: {most}");

    // One leaves: the other two split the cap between them.
    let c = gws.pop().unwrap();
    c.shutdown().await;
    until("shares of 3 each", Duration::from_secs(10), || {
        gws.iter().all(|gw| gw.function("slow").share() == 3)
    })
    .await;
    let status = gws[0].get("/system/function/slow").await;
    let status: serde_json::Value = serde_json::from_str(&status.body).unwrap();
    assert_eq!(status["cluster"]["gateways"], 2, "{status}");
    assert_eq!(status["cluster"]["share"], 3, "{status}");
    for gw in gws {
        gw.shutdown().await;
    }
}

/// Three gateways sharing the fake API server and NATS: the leader scales on the sum of the
/// load the three see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_decides_on_the_load_all_three_gateways_see() {
    let nats = NatsServer::start().await;
    let fake = FakeKube::start().await;
    let pods = slow_deployment(&fake, "busy", 1, 8).await;
    let function = &concurrency_fn("busy", 1, 8);
    let gws = three_on_kube(&nats, &fake, "busy", function).await;
    fake.until_watches(Resource::EndpointSlices, 3).await;
    until_members(&gws.iter().collect::<Vec<_>>(), "busy", 3).await;
    until_one_leader(&gws, "busy").await;

    // 12 clients in a closed loop for ~3 s, 4 through each gateway: ~12 in flight in all, so
    // with 2 per replica the leader should ask for about 6, though each gateway alone sees 4.
    drive(&gws, "busy", 4).await;
    let asked = fake.deployment_replicas("fns", "busy").unwrap();
    for gw in gws {
        gw.shutdown().await;
    }

    // The same load through one gateway alone, on a Deployment of its own.
    fake.apply_deployment("fns", "solo", 1, &[], &[], &[("app", "solo")]);
    fake.bind_replicas(
        "fns",
        "solo",
        "solo",
        pods.iter().map(|p| p.addr).collect(),
        Duration::from_millis(20),
    );
    let dir = std::env::temp_dir().join(format!("sluicegate-cluster-solo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = fake.write_kubeconfig(&dir, "fns");
    let one = Gw::start_with(
        &format!("kubeconfig = {:?}", kubeconfig.display().to_string()),
        &concurrency_fn("solo", 1, 8),
    )
    .await;
    fake.until_watching(Resource::EndpointSlices).await;
    drive(&[one], "solo", 12).await;
    let alone = fake.deployment_replicas("fns", "solo").unwrap();
    eprintln!(
        "three gateways: the leader asked for {asked}; one gateway with the same load: {alone}"
    );
    assert!(
        asked.abs_diff(alone) <= 1,
        "three gateways asked for {asked}, one for {alone}"
    );
    assert!(
        asked >= 4,
        "one gateway's view alone (4 in flight) would ask for 2: {asked}"
    );
}

/// `per_gateway` clients per gateway in a closed loop for 3 s (at most 200 requests each).
async fn drive(gws: &[Gw], function: &str, per_gateway: usize) {
    let stop_at = Instant::now() + Duration::from_secs(3);
    let mut clients = Vec::new();
    for gw in gws {
        for _ in 0..per_gateway {
            let url = gw.url(&format!("/function/{function}/"));
            clients.push(tokio::spawn(async move {
                let c = common::client();
                let mut n = 0;
                while Instant::now() < stop_at && n < 200 {
                    let req = http::Request::get(&url).body(common::empty()).unwrap();
                    let resp = common::send_with(&c, req).await;
                    assert!(resp.status == 200 || resp.status == 503, "{}", resp.status);
                    n += 1;
                }
            }));
        }
    }
    for c in clients {
        c.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_process_hands_over_within_the_lease() {
    let nats = NatsServer::start().await;
    kill_the_leader(&nats, None).await;
}

/// The same on Kubernetes: the leader holds a `coordination.k8s.io` Lease on the fake API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_holding_the_kubernetes_lease_hands_over_and_scaling_continues() {
    let nats = NatsServer::start().await;
    let fake = FakeKube::start().await;
    let pods = slow_deployment(&fake, "echo", 1, 4).await;
    // Published once the count is next written: start with one pod ready.
    fake.set_endpoints(
        "fns",
        "echo",
        vec![common::fake_kube::FakeEndpoint::ready(pods[0].addr)],
        "http",
    );
    kill_the_leader(&nats, Some(&fake)).await;
    let lease = fake
        .object(Resource::Leases, "fns", "sluicegate-autoscaler")
        .expect("the Lease exists");
    assert!(
        lease["spec"]["leaseTransitions"].as_i64().unwrap() >= 1,
        "{lease}"
    );
    // Only reads, the one create and resourceVersion-checked replaces of the Lease.
    for r in fake.requests() {
        if r.path.contains("/leases") {
            assert!(matches!(r.method.as_str(), "GET" | "POST" | "PUT"), "{r:?}");
        }
    }
}

async fn kill_the_leader(nats: &NatsServer, fake: Option<&FakeKube>) {
    let ok = Backend::ok().await;
    let function = format!(
        "[functions.echo]\nprovider = \"static\"\nupstreams = [\"{}\"]\n",
        ok.url()
    );
    let dir = std::env::temp_dir().join(format!(
        "sluicegate-cluster-kill-{}-{}",
        std::process::id(),
        fake.is_some()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    // With a cluster connected, the leader holds a Kubernetes Lease instead of the NATS KV one.
    let kube_keys = fake
        .map(|f| {
            format!(
                "kubeconfig = {:?}\n",
                f.write_kubeconfig(&dir, "fns").display().to_string()
            )
        })
        .unwrap_or_default();
    let function = match fake {
        Some(_) => concurrency_fn("echo", 1, 4),
        None => function,
    };
    let mut gateways = Vec::new();
    for id in ["a", "b", "c"] {
        let sub = dir.join(id);
        std::fs::create_dir_all(&sub).unwrap();
        let port = closed_port();
        let child = spawn_binary(
            &sub,
            port,
            &format!(
                "{}\n{kube_keys}async_store = \"{}\"",
                cluster_keys(nats, id, "2s"),
                sub.join("async.redb").display()
            ),
            &function,
        );
        gateways.push((id, port, child));
    }
    let c = common::client();
    let status = |port: u16| {
        let c = c.clone();
        async move {
            let req = http::Request::get(format!("http://127.0.0.1:{port}/system/function/echo"))
                .body(common::empty())
                .unwrap();
            let resp = c.request(req).await.ok()?;
            let resp = common::read_whole(resp).await;
            serde_json::from_str::<serde_json::Value>(&resp.body).ok()
        }
    };
    let leader_among = |ports: Vec<u16>| {
        let status = &status;
        async move {
            let mut leaders = Vec::new();
            for port in ports {
                if let Some(s) = status(port).await {
                    if s["cluster"]["leader"] == true {
                        leaders.push(port);
                    }
                }
            }
            leaders
        }
    };
    let ports: Vec<u16> = gateways.iter().map(|g| g.1).collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    let leader = loop {
        let leaders = leader_among(ports.clone()).await;
        if leaders.len() == 1 {
            break leaders[0];
        }
        assert!(Instant::now() < deadline, "no single leader: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // SIGKILL the leader: no hand-over message, the lease must expire.
    let index = gateways.iter().position(|g| g.1 == leader).unwrap();
    let (_, _, mut child) = gateways.remove(index);
    let killed = Instant::now();
    child.kill().unwrap();
    child.wait().unwrap();
    let rest: Vec<u16> = gateways.iter().map(|g| g.1).collect();
    let new_leader = loop {
        let leaders = leader_among(rest.clone()).await;
        if leaders.len() == 1 {
            break leaders[0];
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "no new leader 10 s after the old one died: {leaders:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let took = killed.elapsed();
    eprintln!("leader on port {new_leader} {took:?} after the old one was killed (lease 2s)");
    assert_ne!(new_leader, leader);
    assert!(
        took <= Duration::from_millis(2000 + 2000 / 3 + 1500),
        "hand-over within the lease (plus one renewal period and polling): {took:?}"
    );
    if let Some(fake) = fake {
        // Scaling continues under the new leader: load through the two survivors.
        let before = fake.deployment_replicas("fns", "echo").unwrap_or(0);
        let stop_at = Instant::now() + Duration::from_secs(4);
        let mut clients = Vec::new();
        for &port in &rest {
            for _ in 0..4 {
                clients.push(tokio::spawn(async move {
                    let c = common::client();
                    let url = format!("http://127.0.0.1:{port}/function/echo/");
                    let mut n = 0;
                    while Instant::now() < stop_at && n < 200 {
                        let req = http::Request::get(&url).body(common::empty()).unwrap();
                        let _ = common::send_with(&c, req).await;
                        n += 1;
                    }
                }));
            }
        }
        for c in clients {
            c.await.unwrap();
        }
        let after = fake.deployment_replicas("fns", "echo").unwrap_or(0);
        eprintln!("under the new leader: {before} -> {after} replicas for 8 in flight");
        assert!(after >= 3 && after > before, "{before} -> {after}");
    }
    for (_, _, mut child) in gateways {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Cold requests reaching three gateways at once wake the function once, without the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_requests_on_three_gateways_make_one_scale_up() {
    let nats = NatsServer::start().await;
    let fake = FakeKube::start().await;
    fake.apply_deployment("fns", "cold", 0, &[], &[], &[("app", "cold")]);
    let pods = [Backend::ok().await, Backend::ok().await];
    fake.bind_replicas(
        "fns",
        "cold",
        "cold",
        pods.iter().map(|p| p.addr).collect(),
        Duration::from_millis(100),
    );
    let function = "[functions.cold]\nprovider = \"kubernetes\"\n[functions.cold.autoscaler]\nmin_replicas = 0\nmax_replicas = 2\n";
    let gws = three_on_kube(&nats, &fake, "cold", function).await;
    fake.until_watches(Resource::EndpointSlices, 3).await;
    let held: Vec<_> = gws
        .iter()
        .flat_map(|gw| (0..3).map(|_| gw.spawn_get("/function/cold/")))
        .collect();
    for h in held {
        let resp = h.await.unwrap();
        assert_eq!(resp.status, 200, "{}", resp.body);
    }
    assert_eq!(
        fake.deployment_replicas("fns", "cold"),
        Some(1),
        "one scale-up, to 1"
    );
    let puts = fake
        .requests()
        .iter()
        .filter(|r| r.method == "PUT" && r.path.ends_with("/cold/scale"))
        .count();
    assert!(
        (1..=3).contains(&puts),
        "at most one wake write per gateway: {puts}"
    );
    for gw in gws {
        gw.shutdown().await;
    }
}

/// Load only the followers see wakes the leader's autoscaler (at rest with nothing local to
/// wake it) and it scales on their figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_only_followers_see_still_scales_through_the_leader() {
    let nats = NatsServer::start().await;
    let fake = FakeKube::start().await;
    let _pods = slow_deployment(&fake, "far", 0, 8).await;
    let function = &concurrency_fn("far", 0, 8);
    let gws = three_on_kube(&nats, &fake, "far", function).await;
    fake.until_watches(Resource::EndpointSlices, 3).await;
    until_members(&gws.iter().collect::<Vec<_>>(), "far", 3).await;
    until_one_leader(&gws, "far").await;
    let (leader, followers): (Vec<Gw>, Vec<Gw>) = gws
        .into_iter()
        .partition(|gw| gw.function("far").is_leader());
    drive(&followers, "far", 6).await;
    let asked = fake.deployment_replicas("fns", "far").unwrap();
    eprintln!("12 in flight through the two followers only: the leader asked for {asked}");
    assert!(
        asked >= 4,
        "the leader scaled on its followers' load: {asked}"
    );
    for gw in leader.into_iter().chain(followers) {
        gw.shutdown().await;
    }
}
