//! `provider = "process"`: replicas are local child processes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::duration::Dur;
use crate::config::line;
use crate::config::table::{given, positive, table};

/// Path probed on a process replica until it answers 2xx.
pub const DEFAULT_READINESS_PATH: &str = "/";
/// Time between SIGTERM and SIGKILL when a process replica is stopped.
pub const DEFAULT_TERMINATION_GRACE: Duration = Duration::from_secs(10);

table! {
    /// The keys of `provider = "process"`, as written.
    struct RawProcess;

    /// `provider = "process"`.
    #[derive(Clone, Debug, PartialEq)]
    pub struct ProcessConfig {}

    given(base_dir: &Path, cold_start: Duration);

    keys {
        command: Vec<String> => {
            /// Program and arguments. A first element of exactly `sluicegate` means the running
            /// binary.
            pub command: Vec<String> = program(command),
        },
        env: BTreeMap<String, String> => {
            /// Extra environment for every replica (`PORT` is always set by the gateway).
            pub env: BTreeMap<String, String> = given(env, BTreeMap::new()),
        },
        working_dir: String => {
            /// Working directory: `working_dir` if set (relative to the config file), else the
            /// config file's directory.
            pub working_dir: PathBuf = relative_to(base_dir, working_dir),
        },
        readiness_path: String => {
            /// Path probed with `GET` until it answers 2xx.
            pub readiness_path: String = probe_path(readiness_path),
        },
        startup_timeout: Dur => {
            /// Time a starting replica has to become ready before it is killed and counted as
            /// failed.
            pub startup_timeout: Duration = positive(startup_timeout, cold_start),
        },
        termination_grace: Dur => {
            /// Time between SIGTERM and SIGKILL on scale-down and shutdown.
            pub termination_grace: Duration = given(termination_grace, DEFAULT_TERMINATION_GRACE),
        },
    }
}

impl ProcessConfig {
    /// Appends the `check-config` lines of the process provider's keys.
    pub(super) fn describe(&self, out: &mut String) {
        line(out, "command", format!("{:?}", self.command));
        line(out, "working_dir", self.working_dir.display());
        if !self.env.is_empty() {
            line(out, "env", format!("{:?}", self.env));
        }
        line(out, "readiness_path", &self.readiness_path);
        line(
            out,
            "startup_timeout",
            format!("{:?}", self.startup_timeout),
        );
        line(
            out,
            "termination_grace",
            format!("{:?}", self.termination_grace),
        );
    }
}

fn program(command: Option<Vec<String>>) -> Result<Vec<String>, String> {
    match command {
        Some(command) if !command.is_empty() && !command[0].trim().is_empty() => Ok(command),
        _ => Err(
            "provider \"process\" needs a command, e.g. command = [\"python3\", \"fn.py\"]".into(),
        ),
    }
}

/// `dir` relative to `base_dir`; `base_dir` itself when not set.
fn relative_to(base_dir: &Path, dir: Option<String>) -> Result<PathBuf, String> {
    Ok(dir.map_or_else(|| base_dir.to_owned(), |dir| base_dir.join(dir)))
}

fn probe_path(written: Option<String>) -> Result<String, String> {
    let path = written.unwrap_or_else(|| DEFAULT_READINESS_PATH.to_owned());
    if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
        return Err(format!("`{path}` is not a path starting with /"));
    }
    Ok(path)
}
