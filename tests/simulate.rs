//! `sluicegate simulate` as a user runs it: the real binary, a config and a trace on disk.

use std::path::PathBuf;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_sluicegate");

const CONFIG: &str = r#"
[functions.echo]
provider = "process"
command = ["sluicegate", "demo-function"]
max_ongoing_requests = 1
max_queued_requests = 2

[functions.echo.autoscaler]
type = "rps"
min_replicas = 0
max_replicas = 2
threshold = 100
rate_seconds = 10
polling_interval = 1
cooldown_period = 5
"#;

/// Three requests while the function is at zero: the first two wait for the one replica it
/// wakes (then take turns on it), the third is shed because the queue of two is full.
const TRACE: &str = "time,duration\n0,0.5\n0.1,0.5\n0.2,0.5\n";

/// A fresh directory for one test's files.
fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("sluicegate-simulate-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn simulate(dir: &std::path::Path, trace: &str, extra: &[&str]) -> Output {
    std::fs::write(dir.join("sim.toml"), CONFIG).unwrap();
    std::fs::write(dir.join("trace.csv"), trace).unwrap();
    Command::new(BIN)
        .arg("simulate")
        .arg("--config")
        .arg(dir.join("sim.toml"))
        .arg("--trace")
        .arg(dir.join("trace.csv"))
        .args(extra)
        .output()
        .expect("run sluicegate simulate")
}

#[test]
fn simulate_prints_the_table_for_a_small_trace_and_draws_the_svg() {
    let dir = scratch("table");
    let svg = dir.join("out.svg");
    let out = simulate(&dir, TRACE, &["--svg", svg.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].ends_with("trace.csv; cold start 2s"), "{stdout}");
    assert_eq!(
        lines[1],
        "function  requests  served  shed full  shed timeout  held  hold mean  hold p99  replica-s  peak  cold starts"
    );
    // Held 2 s (served 2–2.5) and 2.4 s (2.5–3); one replica from 0 until 3 s.
    assert_eq!(
        lines[2],
        "echo             3       2          1             0     2     2.200s    2.400s        3.0     1            1"
    );
    let drawing = std::fs::read_to_string(&svg).unwrap();
    assert!(drawing.starts_with("<svg") && drawing.contains(">echo</text>"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn simulate_json_names_every_figure() {
    let dir = scratch("json");
    let out = simulate(&dir, TRACE, &["--json", "--cold-start", "500ms"]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let echo = &json[0];
    assert_eq!(echo["function"], "echo");
    assert_eq!(echo["requests"], 3);
    assert_eq!(echo["shed_queue_full"], 1);
    assert_eq!(echo["cold_starts"], 1);
    assert_eq!(echo["hold_max_seconds"], 0.9);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_trace_line_is_named_and_fails() {
    let dir = scratch("bad");
    let out = simulate(&dir, "time,duration\n0,1\nsoon,1\n", &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("trace.csv: line 3: time: `soon` is not a number of seconds"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_shape_runs_without_a_trace_file() {
    let dir = scratch("shape");
    std::fs::write(dir.join("sim.toml"), CONFIG).unwrap();
    let out = Command::new(BIN)
        .args([
            "simulate",
            "--shape",
            "onoff",
            "--duration",
            "60s",
            "--rps",
            "5",
        ])
        .arg("--config")
        .arg(dir.join("sim.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.starts_with(&format!(
            "{}: shape onoff: 60s at 5 rps, service time 0.2s (uniform ±50%), seed 1, period 20s; cold start 2s\n",
            dir.join("sim.toml").display()
        )),
        "{stdout}"
    );
    // --rps makes no sense with a trace file.
    let out = simulate(&dir, TRACE, &["--rps", "5"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_kubernetes_provider_config_is_simulated_with_the_cold_start_given() {
    let dir = scratch("kubernetes");
    std::fs::write(
        dir.join("sim.toml"),
        "[gateway]\nkubernetes_namespace = \"fns\"\n\n[functions.resize]\nprovider = \"kubernetes\"\nmax_ongoing_requests = 4\n[functions.resize.autoscaler]\nmin_replicas = 0\nmax_replicas = 6\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args([
            "simulate",
            "--shape",
            "onoff",
            "--duration",
            "120s",
            "--rps",
            "20",
            "--cold-start",
            "8s",
        ])
        .arg("--config")
        .arg(dir.join("sim.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("cold start 8s"), "{stdout}");
    assert!(stdout.contains("resize"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}
