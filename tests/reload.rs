//! Config reload end to end: functions added, changed and removed under load through real
//! sockets and real replica processes, with no failed request that was not for a removed
//! function; an invalid file refused with check-config's line while the old config keeps
//! running; `[gateway]` keys that apply only at a restart named; SIGHUP on the real binary.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::records::{admin, admin_keys, json};
use common::*;
use http::Request;
use sluicegate::config::Config;

/// A fresh directory for one test's config file and store.
fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluicegate-reload-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes the config file: a gateway on 127.0.0.1:0 with the admin token, then `functions`.
fn write(path: &Path, gateway_keys: &str, functions: &str) {
    let store = path.with_extension("redb");
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n{}\n{}\n{gateway_keys}\n{functions}",
        async_store(&store),
        admin_keys()
    );
    std::fs::write(path, text).unwrap();
}

async fn start(path: &Path) -> Gw {
    Gw::start_config(Config::load(path).expect("test config loads")).await
}

/// What every request of the load loop got, per function.
type Statuses = Arc<Mutex<BTreeMap<String, Vec<u16>>>>;

/// `workers` clients, each sending requests in turn to `functions` (path `/function/<f>/<rest>`)
/// until `stop` is set or it has sent `max` requests; records every status.
fn load(
    gw: &Gw,
    functions: &[(&str, &str)],
    workers: usize,
    max: usize,
    stop: &Arc<AtomicBool>,
) -> (Statuses, Vec<tokio::task::JoinHandle<()>>) {
    let statuses: Statuses = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let functions: Vec<(String, String)> = functions
            .iter()
            .map(|(f, rest)| (f.to_string(), rest.to_string()))
            .collect();
        let (client, base) = (gw.client.clone(), gw.url(""));
        let (statuses, stop) = (statuses.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..max {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let (f, rest) = &functions[(i + w) % functions.len()];
                let req = Request::get(format!("{base}/function/{f}/{rest}"))
                    .body(empty())
                    .unwrap();
                let status = send_with(&client, req).await.status.as_u16();
                statuses
                    .lock()
                    .unwrap()
                    .entry(f.clone())
                    .or_default()
                    .push(status);
            }
        }));
    }
    (statuses, tasks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_changes_and_removes_functions_under_load_failing_only_the_removed_ones() {
    let dir = temp_dir("under-load");
    let path = dir.join("gw.toml");
    let stay_tag = unique_tag("reload-stay");
    let old_tag = unique_tag("reload-old");
    let new_tag = unique_tag("reload-new");
    let gone_tag = unique_tag("reload-gone");
    let cold_tag = unique_tag("reload-cold");
    let add_tag = unique_tag("reload-add");
    let warm = "type = \"none\"\nmin_replicas = 1\nmax_replicas = 1";
    let stay = demo_fn("stay", &stay_tag, "", "", warm);
    let change_before = demo_fn("change", &old_tag, "", "max_ongoing_requests = 4", warm);
    let change_after = demo_fn("change", &new_tag, "", "max_ongoing_requests = 6", warm);
    let gone = demo_fn("gone", &gone_tag, "", "", warm);
    // At zero, with a replica that takes 500 ms to warm up: a request to it is held.
    let cold = demo_fn(
        "cold",
        &cold_tag,
        ", \"--startup-delay\", \"500ms\"",
        "",
        "type = \"none\"\nmin_replicas = 0\nmax_replicas = 1",
    );
    let added = demo_fn("added", &add_tag, "", "", warm);
    write(&path, "", &format!("{stay}{change_before}{gone}{cold}"));
    let gw = start(&path).await;
    until("the warm replicas are up", Duration::from_secs(20), || {
        count_processes(&stay_tag) == 1
            && count_processes(&old_tag) == 1
            && count_processes(&gone_tag) == 1
    })
    .await;

    // Load on every function, slow requests to `gone` (in flight when it goes).
    let stop = Arc::new(AtomicBool::new(false));
    let (statuses, workers) = load(
        &gw,
        &[
            ("stay", ""),
            ("change", "?sleep=20ms"),
            ("gone", "?sleep=300ms"),
        ],
        6,
        400,
        &stop,
    );
    let held = gw.spawn_get("/function/cold/held");
    until("requests are under way", Duration::from_secs(10), || {
        let s = statuses.lock().unwrap();
        s.values().map(Vec::len).sum::<usize>() >= 30
    })
    .await;
    let gone_in_flight = gw.function("gone").metrics.ongoing.get();

    write(&path, "", &format!("{stay}{change_after}{added}"));
    let r = admin(&gw, "POST", "/system/reload").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let report = json(&r);
    assert_eq!(report["added"], serde_json::json!(["added"]), "{report}");
    assert_eq!(report["changed"], serde_json::json!(["change"]), "{report}");
    assert_eq!(
        report["removed"],
        serde_json::json!(["cold", "gone"]),
        "{report}"
    );
    assert_eq!(report["unchanged"], 1, "{report}");
    assert_eq!(report["notApplied"], serde_json::json!([]), "{report}");

    // The added function answers (its replica starts at once: min_replicas = 1).
    let r = gw.get("/function/added/").await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The changed one runs on new replicas with the new settings; the old replica goes once
    // it holds nothing.
    until(
        "the changed function's new replica runs",
        Duration::from_secs(20),
        || count_processes(&new_tag) == 1,
    )
    .await;
    assert_eq!(gw.function("change").config.max_ongoing_requests, 6);
    until("the old replicas stop", Duration::from_secs(20), || {
        count_processes(&old_tag) == 0 && count_processes(&gone_tag) == 0
    })
    .await;
    // The request held for `cold` when it was removed is served by its (retired) replica.
    let held = held.await.unwrap();
    assert_eq!(held.status, 200, "{}", held.body);

    // Keep the load on for a moment after the reload, then stop it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let statuses = statuses.lock().unwrap().clone();
    for f in ["stay", "change"] {
        let got = &statuses[f];
        assert!(got.len() > 20, "{f}: {} requests", got.len());
        assert!(got.iter().all(|s| *s == 200), "{f}: {got:?}");
    }
    // `gone`: served until it was removed (those in flight too), then 404; never a 5xx.
    let gone = &statuses["gone"];
    assert!(gone.iter().all(|s| *s == 200 || *s == 404), "{gone:?}");
    let first_404 = gone
        .iter()
        .position(|s| *s == 404)
        .expect("404 after the removal");
    assert!(gone[..first_404].iter().all(|s| *s == 200), "{gone:?}");
    assert!(
        gone_in_flight > 0,
        "no request to `gone` was in flight at the reload"
    );
    let r = gw.get("/function/gone/").await;
    assert_eq!(r.header("x-sluicegate-reason"), Some("unknown_function"));
    gw.shutdown().await;
    for tag in [&stay_tag, &new_tag, &add_tag, &cold_tag] {
        until("every replica stops", Duration::from_secs(10), || {
            count_processes(tag) == 0
        })
        .await;
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// What `sluicegate check-config FILE` prints on stderr, trimmed.
fn check_config_line(path: &Path) -> String {
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    String::from_utf8(out.stderr).unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_is_refused_with_check_configs_line_and_the_old_config_keeps_running() {
    let dir = temp_dir("invalid");
    let path = dir.join("gw.toml");
    let backend = Backend::ok().await;
    let echo = static_fn("echo", &backend.url(), "");
    write(&path, "", &echo);
    let gw = start(&path).await;

    for bad in [
        "[functions.echo]\nprovider = \"process\"\ncommand = [\"x\"]\n[functions.echo.autoscaler]\nmin_replicas = 3\nmax_replicas = 2\n".to_owned(),
        format!("{echo}\n[functions.typo]\nprovider = \"static\"\nupstreams = [\"http://127.0.0.1:1\"]\nmax_ongoing_request = 2\n"),
        "[functions.broken\n".to_owned(),
    ] {
        write(&path, "", &bad);
        let expected = check_config_line(&path);
        let r = admin(&gw, "POST", "/system/reload").await;
        assert_eq!(r.status, 400, "{}", r.body);
        assert_eq!(r.header("x-sluicegate-reason"), Some("invalid_config"));
        assert_eq!(r.body.trim(), expected);
        assert!(expected.starts_with("sluicegate: invalid configuration: "), "{expected}");
        if !expected.contains("TOML parse error") {
            // A key's value: one line naming the file, the key and the reason. (A file that is
            // not TOML gets the parser's message, with its caret under the line, as
            // check-config prints it.)
            assert_eq!(r.body.trim().lines().count(), 1, "{}", r.body);
            assert!(expected.contains("functions.echo.autoscaler.max_replicas"), "{expected}");
        }
        // The old config keeps running.
        assert_eq!(gw.get("/function/echo/").await.status, 200);
        assert_eq!(gw.get("/function/typo/").await.status, 404);
    }
    // Without the token, no reload; a GET is not one.
    let r = gw
        .send(
            Request::post(gw.url("/system/reload"))
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(admin(&gw, "GET", "/system/reload").await.status, 405);
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_keys_that_apply_only_at_a_restart_are_named_and_function_defaults_apply() {
    let dir = temp_dir("gateway-keys");
    let path = dir.join("gw.toml");
    let backend = Backend::ok().await;
    let echo = static_fn("echo", &backend.url(), "");
    write(&path, "", &echo);
    let gw = start(&path).await;
    // `idle_timeout` is the server's; `queue_timeout` is a function default, so `echo` changes.
    write(
        &path,
        "idle_timeout = \"5s\"\nqueue_timeout = \"7s\"",
        &echo,
    );
    let r = admin(&gw, "POST", "/system/reload").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let report = json(&r);
    assert_eq!(
        report["notApplied"],
        serde_json::json!(["gateway.idle_timeout"]),
        "{report}"
    );
    assert_eq!(report["changed"], serde_json::json!(["echo"]), "{report}");
    assert_eq!(
        gw.function("echo").config.queue_timeout,
        Duration::from_secs(7)
    );
    assert_eq!(
        gw.running.as_ref().unwrap().gateway().config.idle_timeout,
        sluicegate::config::DEFAULT_IDLE_TIMEOUT,
        "the running value stays"
    );
    assert_eq!(gw.get("/function/echo/").await.status, 200);
    // The same file again: nothing changes, and the key is still named.
    let report = json(&admin(&gw, "POST", "/system/reload").await);
    assert_eq!(report["unchanged"], 1, "{report}");
    assert_eq!(report["changed"], serde_json::json!([]), "{report}");
    assert_eq!(
        report["notApplied"],
        serde_json::json!(["gateway.idle_timeout"]),
        "{report}"
    );
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_binary_and_a_bad_file_leaves_it_running() {
    let dir = temp_dir("sighup");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let backend = Backend::ok().await;
    let store = format!("async_store = \"{}\"", dir.join("store.redb").display());
    let one = static_fn("one", &backend.url(), "");
    let two = static_fn("two", &backend.url(), "");
    let mut child = spawn_binary(&dir, port, &store, &one);
    let config = dir.join("gw.toml");
    let c = client();
    let get = |path: &'static str| {
        let c = c.clone();
        async move {
            let req = Request::get(format!("http://127.0.0.1:{port}{path}"))
                .body(empty())
                .unwrap();
            match c.request(req).await {
                Ok(resp) => resp.status().as_u16(),
                Err(_) => 0,
            }
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while get("/function/one/").await != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway never answered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get("/function/two/").await, 404);

    let hup = |child: &std::process::Child| {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    };
    // A new function appears on SIGHUP.
    let text = format!("[gateway]\nlisten = \"127.0.0.1:{port}\"\n{store}\n{one}{two}");
    std::fs::write(&config, text).unwrap();
    hup(&child);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while get("/function/two/").await != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGHUP did not add `two`"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A bad file: refused, the gateway keeps running with both functions.
    std::fs::write(&config, "[gateway\n").unwrap();
    hup(&child);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(child.try_wait().unwrap().is_none(), "the gateway exited");
    assert_eq!(get("/function/one/").await, 200);
    assert_eq!(get("/function/two/").await, 200);
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_attempts_in_flight_finish_across_a_reload_and_later_ones_run_on_the_new_settings() {
    use common::records::{post, until_state};
    let dir = temp_dir("async");
    let path = dir.join("gw.toml");
    let slow = Backend::sleeping(Duration::from_millis(600)).await;
    let fast = Backend::ok().await;
    write(&path, "", &static_fn("job", &slow.url(), ""));
    let gw = start(&path).await;
    post(&gw, "job", "before").await;
    until_state(&gw, "before", "running").await;
    slow.until_inflight(1).await;

    // `job` now points elsewhere; the attempt under way finishes on the old upstream.
    write(&path, "", &static_fn("job", &fast.url(), ""));
    let r = admin(&gw, "POST", "/system/reload").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(json(&r)["changed"], serde_json::json!(["job"]));
    let done = until_state(&gw, "before", "succeeded").await;
    assert_eq!(done["attempts"], 1, "{done}");
    post(&gw, "job", "after").await;
    until_state(&gw, "after", "succeeded").await;
    assert_eq!(slow.stats.requests.load(Ordering::SeqCst), 1);
    assert_eq!(fast.stats.requests.load(Ordering::SeqCst), 1);
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}
