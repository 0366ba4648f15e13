//! Pause and resume, service tokens and secret environment, through real sockets and real
//! replica processes (the bundled demo function), and the binary for what it prints.

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use http::Request;
use serde_json::Value;

fn json(r: &Resp) -> Value {
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.body))
}

async fn get_with(gw: &Gw, path: &str, headers: &[(&str, &str)]) -> Resp {
    let mut req = Request::get(gw.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    gw.send(req.body(empty()).unwrap()).await
}

async fn post_with(gw: &Gw, path: &str, data: &str, headers: &[(&str, &str)]) -> Resp {
    let mut req = Request::post(gw.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    gw.send(req.body(body(data.to_owned())).unwrap()).await
}

fn paused_gauge(scrape: &str, name: &str) -> Option<f64> {
    sample(
        scrape,
        &format!("sluicegate_function_paused{{function_name=\"{name}\"}}"),
    )
}

/// Creates a token of `function`; returns (id, token).
async fn create_token(gw: &Gw, function: &str, body: &str) -> (String, String) {
    let r = gw
        .post(
            &format!("/system/function/{function}/tokens"),
            body.to_owned(),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let v = json(&r);
    (
        v["id"].as_str().unwrap().to_owned(),
        v["token"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_function_answers_503_paused_and_resumes_with_its_replicas() {
    let tag = unique_tag("pause");
    let gw = Gw::start(&demo_fn(
        "hello",
        &tag,
        "",
        "termination_grace = \"2s\"",
        "min_replicas = 1\nmax_replicas = 3",
    ))
    .await;
    let ok = gw.get("/function/hello/").await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(count_processes(&tag), 1);

    let r = gw.post("/system/pause-function/hello", "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(json(&r)["paused"], true);
    let r = gw.get("/function/hello/").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-sluicegate-reason"), Some("paused"));
    assert_eq!(r.header("retry-after"), Some("30"));
    assert_eq!(r.body, "function is paused\n");
    until("the replica is stopped", Duration::from_secs(10), || {
        count_processes(&tag) == 0
    })
    .await;
    // The status and the metric say so; a manual scale is refused while paused.
    let listed = json(&gw.get("/system/functions").await);
    assert_eq!(listed[0]["paused"], true);
    assert_eq!(listed[0]["replicas"], 0);
    let scrape = gw.metrics().await;
    assert_eq!(paused_gauge(&scrape, "hello"), Some(1.0));
    assert_eq!(
        sample(
            &scrape,
            "sluicegate_function_rejected_total{function_name=\"hello\",reason=\"paused\"}"
        ),
        Some(1.0)
    );
    let r = gw
        .post("/system/scale-function/hello", r#"{"replicas": 2}"#)
        .await;
    assert_eq!(r.status, 409);
    assert_eq!(r.header("x-sluicegate-reason"), Some("function_paused"));
    // The autoscaler does not bring it back meanwhile (min_replicas = 1).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(count_processes(&tag), 0);

    let r = gw.post("/system/resume-function/hello", "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = json(&r);
    assert_eq!(
        (v["paused"].clone(), v["replicas"].clone()),
        (false.into(), 1.into())
    );
    let r = gw.get("/function/hello/").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(paused_gauge(&gw.metrics().await, "hello"), Some(0.0));
    assert_eq!(count_processes(&tag), 1);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_when_paused_hold_requests_wait_for_the_resume_within_their_bound() {
    let tag = unique_tag("hold");
    let gw = Gw::start(&demo_fn(
        "hello",
        &tag,
        "",
        "when_paused = \"hold\"\ncold_start_timeout = \"2s\"\ntermination_grace = \"2s\"",
        "min_replicas = 0\nmax_replicas = 2",
    ))
    .await;
    let r = gw.post("/system/pause-function/hello", "").await;
    assert_eq!(json(&r)["whenPaused"], "hold");
    let f = gw.function("hello");

    // Held, never started a replica, and refused once its cold_start_timeout is over.
    let held = gw.spawn_get("/function/hello/");
    until("the request is held", Duration::from_secs(5), || {
        f.metrics.queued.get() == 1
    })
    .await;
    let r = held.await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-sluicegate-reason"), Some("paused"));
    assert_eq!(count_processes(&tag), 0, "no replica started while paused");

    // Held, then released by the resume.
    let held = gw.spawn_get("/function/hello/");
    until("the request is held", Duration::from_secs(5), || {
        f.metrics.queued.get() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished());
    let r = gw.post("/system/resume-function/hello", "").await;
    assert_eq!(r.status, 200);
    let r = held.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_invocations_are_accepted_while_paused_and_delivered_after_the_resume() {
    let backend = Backend::ok().await;
    let gw = Gw::start_static("job", &backend.url(), "").await;
    assert_eq!(gw.post("/system/pause-function/job", "").await.status, 200);
    let r = post_with(
        &gw,
        "/async-function/job/x",
        "payload",
        &[("x-call-id", "p-1")],
    )
    .await;
    assert_eq!(r.status, 202);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(backend.stats.requests.load(Ordering::SeqCst), 0);
    let record = json(&gw.get("/system/async/p-1").await);
    assert_eq!(record["state"], "queued");

    assert_eq!(gw.post("/system/resume-function/job", "").await.status, 200);
    until(
        "the invocation is delivered",
        Duration::from_secs(10),
        || backend.stats.requests.load(Ordering::SeqCst) == 1,
    )
    .await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_survives_a_restart_on_the_same_state_file() {
    let backend = Backend::ok().await;
    let store_path = temp_store_path();
    let store = async_store(&store_path);
    let job = static_fn("job", &backend.url(), "");
    let gw = Gw::start_with(&store, &job).await;
    assert_eq!(gw.post("/system/pause-function/job", "").await.status, 200);
    gw.shutdown().await;

    let gw = Gw::start_with(&store, &job).await;
    let r = gw.get("/function/job/").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-sluicegate-reason"), Some("paused"));
    assert_eq!(json(&gw.get("/system/function/job").await)["paused"], true);
    assert_eq!(paused_gauge(&gw.metrics().await, "job"), Some(1.0));
    assert_eq!(gw.post("/system/resume-function/job", "").await.status, 200);
    assert_eq!(gw.get("/function/job/").await.status, 200);
    gw.shutdown().await;

    // Resumed is kept too.
    let gw = Gw::start_with(&store, &job).await;
    assert_eq!(gw.get("/function/job/").await.status, 200);
    gw.shutdown().await;
    let _ = std::fs::remove_file(store_path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_token_opens_a_token_function_and_never_reaches_the_replica() {
    let tag = unique_tag("token");
    let store_path = temp_store_path();
    let gw = Gw::start_with(
        &async_store(&store_path),
        &demo_fn(
            "secure",
            &tag,
            "",
            "auth = \"token\"\ntoken_query_param = \"access_token\"",
            "min_replicas = 1",
        ),
    )
    .await;
    // No token: 401 with the reason and a challenge; the function is not counted as started.
    let r = gw.get("/function/secure/").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("x-sluicegate-reason"), Some("token_missing"));
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"sluicegate\"")
    );
    let r = get_with(
        &gw,
        "/function/secure/",
        &[("authorization", "Bearer sgt_nope")],
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("x-sluicegate-reason"), Some("token_invalid"));
    assert!(r
        .header("www-authenticate")
        .unwrap()
        .contains("invalid_token"));

    let (id, token) = create_token(&gw, "secure", r#"{"name": "ci"}"#).await;
    let bearer = format!("Bearer {token}");
    let r = get_with(
        &gw,
        "/function/secure/?headers=1",
        &[
            ("authorization", &bearer),
            ("x-sluicegate-token-name", "spoofed"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body.contains("header x-sluicegate-token-name: ci\n"),
        "{}",
        r.body
    );
    assert!(!r.body.contains("spoofed"), "{}", r.body);
    assert!(!r.body.contains("authorization"), "{}", r.body);
    assert!(!r.body.contains(&token), "{}", r.body);

    // The query parameter works too, and is taken out of the query the replica sees.
    let r = gw
        .get(&format!(
            "/function/secure/q?a=1&access_token={token}&headers=1"
        ))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("query=a=1&headers=1 "), "{}", r.body);
    assert!(!r.body.contains(&token), "{}", r.body);
    assert!(r.body.contains("header x-sluicegate-token-name: ci\n"));

    // The listing has no token values; the store file has no token either.
    let listed = gw.get("/system/function/secure/tokens").await;
    assert_eq!(listed.status, 200);
    let v = json(&listed);
    assert_eq!(v["auth"], "token");
    assert_eq!(v["tokens"][0]["id"], id.as_str());
    assert_eq!(v["tokens"][0]["state"], "active");
    assert!(!listed.body.contains(&token));
    let functions = gw.get("/system/functions").await;
    assert!(!functions.body.contains(&token));
    gw.shutdown().await;
    let bytes = std::fs::read(&store_path).unwrap();
    let secret = &token.as_bytes()[4..];
    assert!(
        !bytes.windows(secret.len()).any(|w| w == secret),
        "the token is stored only as its hash"
    );
    let _ = std::fs::remove_file(store_path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_expire_are_revoked_rotate_and_guard_async_calls() {
    let backend = Backend::ok().await;
    let gw = Gw::start_static("job", &backend.url(), "auth = \"token\"").await;
    let (_, short) = create_token(&gw, "job", r#"{"name": "short", "expires_in": 1}"#).await;
    let (old_id, old) = create_token(&gw, "job", r#"{"name": "v1"}"#).await;
    let (_, new) = create_token(&gw, "job", r#"{"name": "v2", "expires_in": "1h"}"#).await;
    let call = |token: String| {
        let gw = &gw;
        async move {
            let bearer = format!("Bearer {token}");
            get_with(gw, "/function/job/", &[("authorization", &bearer)]).await
        }
    };
    assert_eq!(call(short.clone()).await.status, 200);
    // Rotation: both valid at once.
    assert_eq!(call(old.clone()).await.status, 200);
    assert_eq!(call(new.clone()).await.status, 200);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = call(short).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("x-sluicegate-reason"), Some("token_expired"));
    assert_eq!(r.body, "service token expired\n");

    let r = gw
        .send(
            Request::delete(gw.url(&format!("/system/function/job/tokens/{old_id}")))
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(json(&r)["state"], "revoked");
    let r = call(old).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("x-sluicegate-reason"), Some("token_revoked"));
    assert_eq!(call(new.clone()).await.status, 200);
    let states: Vec<String> = json(&gw.get("/system/function/job/tokens").await)["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["state"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(states, ["expired", "revoked", "active"]);
    let r = gw
        .send(
            Request::delete(gw.url("/system/function/job/tokens/0000000000000000"))
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-sluicegate-reason"), Some("unknown_token"));

    // Async calls need the token at accept; the stored request carries its name, not the token.
    let r = post_with(&gw, "/async-function/job/", "x", &[]).await;
    assert_eq!(r.status, 401);
    let before = backend.stats.requests.load(Ordering::SeqCst);
    let bearer = format!("Bearer {new}");
    let r = post_with(
        &gw,
        "/async-function/job/",
        "x",
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    until(
        "the invocation is delivered",
        Duration::from_secs(10),
        || backend.stats.requests.load(Ordering::SeqCst) == before + 1,
    )
    .await;
    let headers = backend.stats.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(headers["x-sluicegate-token-name"], "v2");
    assert!(headers.get("authorization").is_none());
    gw.shutdown().await;
}

/// A directory of its own for a test that writes files.
fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("sluicegate-controls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_reach_the_replica_and_are_printed_nowhere() {
    let dir = temp_dir("secrets");
    let port = closed_port();
    let file_secret = format!("file-secret-{}", std::process::id());
    let env_secret = format!("env-secret-{}", std::process::id());
    let secret_file = dir.join("api_key");
    std::fs::write(&secret_file, format!("{file_secret}\n")).unwrap();
    let variable = "SGTEST_GATEWAY_DB_PASSWORD";
    let config = dir.join("gw.toml");
    let write_config = || {
        std::fs::write(
            &config,
            format!(
                "[gateway]\nlisten = \"127.0.0.1:{port}\"\nasync_store = \"{}\"\n\
                 [functions.fx]\nprovider = \"process\"\ncommand = [\"sluicegate\", \"demo-function\"]\n\
                 readiness_path = \"/healthz\"\nenv = {{ PLAIN = \"visible\" }}\n\
                 env_from_file = {{ API_KEY = \"api_key\" }}\n\
                 env_from_env = {{ DB_PASSWORD = \"{variable}\" }}\n",
                dir.join("store.redb").display()
            ),
        )
        .unwrap()
    };
    write_config();

    // check-config names where each secret comes from, never the value.
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&config)
        .env(variable, &env_secret)
        .output()
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{printed}");
    assert!(
        printed.contains(&format!("<secret from {}>", secret_file.display())),
        "{printed}"
    );
    assert!(
        printed.contains(&format!("<secret from ${variable}>")),
        "{printed}"
    );
    assert!(!printed.contains(&file_secret) && !printed.contains(&env_secret));

    // The gateway, logging at debug level to a file.
    let log = dir.join("gateway.log");
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .env(variable, &env_secret)
        .env("SLUICEGATE_LOG", "debug")
        .stdout(Stdio::from(
            std::fs::File::create(dir.join("stdout.log")).unwrap(),
        ))
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    let c = client();
    let get = |path: String| {
        let c = c.clone();
        async move {
            let req = Request::get(format!("http://127.0.0.1:{port}{path}"))
                .body(empty())
                .unwrap();
            match c.request(req).await {
                Ok(resp) => read_whole(resp).await,
                Err(e) => Resp {
                    status: http::StatusCode::BAD_GATEWAY,
                    headers: Default::default(),
                    body: e.to_string(),
                },
            }
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let first = loop {
        let r = get("/function/fx/?env=API_KEY".into()).await;
        if r.status == 200 {
            break r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no answer: {}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        first.body.contains(&format!("env API_KEY={file_secret}\n")),
        "{}",
        first.body
    );
    let r = get("/function/fx/?env=DB_PASSWORD".into()).await;
    assert!(
        r.body.contains(&format!("env DB_PASSWORD={env_secret}\n")),
        "{}",
        r.body
    );
    let r = get("/function/fx/?env=PLAIN".into()).await;
    assert!(r.body.contains("env PLAIN=visible\n"), "{}", r.body);
    for path in ["/system/functions", "/system/function/fx", "/metrics"] {
        let r = get(path.into()).await;
        assert!(
            !r.body.contains(&file_secret) && !r.body.contains(&env_secret),
            "{path}"
        );
    }

    // A changed file changes the function: the reload replaces it and its replicas.
    let rotated = format!("rotated-{}", std::process::id());
    std::fs::write(&secret_file, &rotated).unwrap();
    let req = Request::post(format!("http://127.0.0.1:{port}/system/reload"))
        .body(empty())
        .unwrap();
    let report = read_whole(c.request(req).await.unwrap()).await;
    assert_eq!(report.status, 200, "{}", report.body);
    assert_eq!(json(&report)["changed"], serde_json::json!(["fx"]));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = get("/function/fx/?env=API_KEY".into()).await;
        if r.body.contains(&format!("env API_KEY={rotated}\n")) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{}", r.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A missing file is a one-line config error naming the function, the key and the path; the
    // running gateway keeps its config.
    std::fs::remove_file(&secret_file).unwrap();
    let req = Request::post(format!("http://127.0.0.1:{port}/system/reload"))
        .body(empty())
        .unwrap();
    let refused = read_whole(c.request(req).await.unwrap()).await;
    assert_eq!(refused.status, 400);
    assert_eq!(
        refused.body.trim_end().lines().count(),
        1,
        "{}",
        refused.body
    );
    assert!(
        refused
            .body
            .contains("functions.fx.env_from_file: API_KEY: cannot read")
            && refused.body.contains(&secret_file.display().to_string()),
        "{}",
        refused.body
    );
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&config)
        .env(variable, &env_secret)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));

    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("reload"), "the log was captured: {logged}");
    for secret in [&file_secret, &env_secret, &rotated] {
        assert!(
            !logged.contains(secret.as_str()),
            "{secret} logged: {logged}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
