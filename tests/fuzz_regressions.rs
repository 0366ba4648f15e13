//! Every input a fuzz target ever crashed on (`fuzz/regressions/<target>/*`), replayed through
//! the same function the target calls, on the stable toolchain, with no fuzzer.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    replay_dir(&format!("fuzz/regressions/{target}"), run);
}

/// Runs every file in `dir`; how many there were.
fn replay_dir(dir: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut count = 0;
    for entry in entries {
        let path = entry.unwrap().path();
        if path.file_name().is_some_and(|n| n == ".gitkeep") {
            continue;
        }
        let data = std::fs::read(&path).unwrap();
        eprintln!("replaying {}", path.display());
        run(&data);
        count += 1;
    }
    count
}

#[test]
fn h1_response_regressions() {
    replay("h1_response", sluicegate::fuzzing::h1_response);
}

#[test]
fn h1_request_regressions() {
    replay("h1_request", sluicegate::fuzzing::h1_request);
}

/// The seed corpus of the server-side request parser holds the smuggling suite's requests:
/// the parser's properties hold on every one of them without a fuzzer.
#[test]
fn h1_request_seed_corpus() {
    let seeds = replay_dir("fuzz/corpus/h1_request", sluicegate::fuzzing::h1_request);
    assert!(seeds >= 30, "only {seeds} seeds in fuzz/corpus/h1_request");
}

#[test]
fn router_regressions() {
    replay("router", sluicegate::fuzzing::router);
}

#[test]
fn config_regressions() {
    replay("config", sluicegate::fuzzing::config);
}

#[test]
fn store_record_regressions() {
    replay("store_record", sluicegate::fuzzing::store_record);
}

#[test]
fn callback_url_regressions() {
    replay(
        "callback_url",
        sluicegate::fuzzing::callback_url_and_duration,
    );
}
