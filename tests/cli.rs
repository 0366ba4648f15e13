//! The real binary: config errors (exit 64), check-config, --help, SIGTERM exits 0.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{closed_port, BIN};

fn write_config(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sluicegate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn an_invalid_config_exits_64_naming_file_key_and_reason() {
    let path = write_config(
        "bad-bounds.toml",
        "[functions.echo]\nprovider = \"process\"\ncommand = [\"x\"]\n[functions.echo.autoscaler]\nmin_replicas = 3\nmax_replicas = 2\n",
    );
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(
        err.contains("functions.echo.autoscaler.max_replicas"),
        "{err}"
    );
    assert!(err.contains("less than min_replicas"), "{err}");
}

#[test]
fn a_typo_is_an_error_not_a_default() {
    let path = write_config(
        "typo.toml",
        "[functions.echo]\nprovider = \"static\"\nupstreams = [\"http://127.0.0.1:9\"]\nmax_ongoing_request = 3\n",
    );
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `max_ongoing_request`"), "{err}");
}

#[test]
fn a_missing_file_or_flag_exits_64() {
    let out = Command::new(BIN)
        .arg("--config")
        .arg("/nonexistent/sg.toml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/sg.toml: cannot read"));
    let out = Command::new(BIN)
        .env_remove("SLUICEGATE_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));
}

#[test]
fn check_config_prints_the_effective_settings() {
    let out = Command::new(BIN)
        .args([
            "check-config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[functions.hello]"), "{text}");
    assert!(
        text.contains("max_ongoing_requests = 5 per replica"),
        "{text}"
    );
    assert!(
        text.contains("type = rps, threshold = 50, replicas 0..=4"),
        "{text}"
    );
    assert!(text.contains("[functions.slow]"), "{text}");
}

#[test]
fn help_names_the_commands() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--config",
        "check-config",
        "simulate",
        "demo-function",
        "config/demo.toml",
    ] {
        assert!(text.contains(word), "--help lacks {word}:\n{text}");
    }
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let port = closed_port();
    let path = write_config(
        "run.toml",
        &format!("[gateway]\nlisten = \"127.0.0.1:{port}\"\ndrain_timeout = \"2s\"\n"),
    );
    let child = Command::new(BIN)
        .env("SLUICEGATE_CONFIG", &path)
        .args(["--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gateway did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let log = String::from_utf8_lossy(&out.stderr);
    let first = log.lines().next().unwrap_or("");
    let event: serde_json::Value = serde_json::from_str(first).expect("json log lines");
    assert_eq!(event["message"], "sluicegate listening");
    assert!(log.contains("\"stopped\""), "{log}");
}
