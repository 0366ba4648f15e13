//! Every input a fuzz target ever crashed on (`fuzz/regressions/<target>/*`), replayed through
//! the same function the target calls, on the stable toolchain, with no fuzzer.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.file_name().is_some_and(|n| n == ".gitkeep") {
            continue;
        }
        let data = std::fs::read(&path).unwrap();
        eprintln!("replaying {}", path.display());
        run(&data);
    }
}

#[test]
fn h1_response_regressions() {
    replay("h1_response", sluicegate::fuzzing::h1_response);
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
