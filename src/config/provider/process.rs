//! `provider = "process"`: replicas are local child processes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::duration::Dur;
use crate::config::line;
use crate::config::table::{given, positive, table};
use crate::config::Secret;

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
        env_from_file: BTreeMap<String, String> => {
            /// Secret environment read from files (`KEY = "/run/secrets/key"`, relative paths
            /// from the config file's directory), read at every load and reload: a changed
            /// content changes the function. One trailing newline is dropped.
            pub env_from_file: BTreeMap<String, SecretValue> =
                from_files(env_from_file, base_dir, &env),
        },
        env_from_env: BTreeMap<String, String> => {
            /// Secret environment copied from the gateway's own environment
            /// (`KEY = "GATEWAY_VARIABLE"`), read at every load and reload.
            pub env_from_env: BTreeMap<String, SecretValue> =
                from_gateway_env(env_from_env, &env, &env_from_file),
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
    /// Every replica's environment besides `PORT`: `env`, then the secrets (`env_from_file`,
    /// `env_from_env`), whose values only the replica sees.
    pub fn environment(&self) -> impl Iterator<Item = (&str, &str)> {
        let plain = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        let secrets = self
            .env_from_file
            .iter()
            .chain(&self.env_from_env)
            .map(|(k, v)| (k.as_str(), v.value.expose()));
        plain.chain(secrets)
    }

    /// Appends the `check-config` lines of the process provider's keys.
    pub(super) fn describe(&self, out: &mut String) {
        line(out, "command", format!("{:?}", self.command));
        line(out, "working_dir", self.working_dir.display());
        if !self.env.is_empty() {
            line(out, "env", format!("{:?}", self.env));
        }
        // Secrets by where they come from, never by value.
        if !self.env_from_file.is_empty() {
            line(out, "env_from_file", format!("{:?}", self.env_from_file));
        }
        if !self.env_from_env.is_empty() {
            line(out, "env_from_env", format!("{:?}", self.env_from_env));
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

/// A secret environment value and where it came from. `Debug` and `Display` name the source
/// (`<secret from /run/secrets/api_key>`), never the value, so that `check-config`, a logged
/// config or an error never shows it; two are equal when both source and value are (a file whose
/// content changed makes a different config, so a reload replaces the function).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue {
    /// A file's path, or `$VARIABLE` for the gateway's environment.
    pub source: String,
    /// The value.
    pub value: Secret,
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<secret from {}>", self.source)
    }
}

impl std::fmt::Display for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// An environment variable name the replica can be given: not empty, no `=` or NUL, not `PORT`
/// (the gateway's), not set twice.
/// `set_in` lists the other tables with whether each sets `key` already.
fn env_name(key: &str, set_in: &[(&str, bool)]) -> Result<(), String> {
    if key.is_empty() || key.contains(['=', '\0']) {
        return Err(format!("`{key}` is not an environment variable name"));
    }
    if key == "PORT" {
        return Err("PORT is set by the gateway".into());
    }
    if let Some((table, _)) = set_in.iter().find(|(_, set)| *set) {
        return Err(format!("{key} is also set in {table}"));
    }
    Ok(())
}

fn from_files(
    written: Option<BTreeMap<String, String>>,
    base_dir: &Path,
    env: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, SecretValue>, String> {
    let mut secrets = BTreeMap::new();
    for (key, file) in written.unwrap_or_default() {
        env_name(&key, &[("env", env.contains_key(&key))])?;
        let path = base_dir.join(&file);
        let mut value = std::fs::read_to_string(&path)
            .map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))?;
        if value.ends_with('\n') {
            value.pop();
            if value.ends_with('\r') {
                value.pop();
            }
        }
        if value.contains('\0') {
            return Err(format!("{key}: {} holds a NUL byte", path.display()));
        }
        let source = path.display().to_string();
        secrets.insert(
            key,
            SecretValue {
                source,
                value: Secret::new(value),
            },
        );
    }
    Ok(secrets)
}

fn from_gateway_env(
    written: Option<BTreeMap<String, String>>,
    env: &BTreeMap<String, String>,
    files: &BTreeMap<String, SecretValue>,
) -> Result<BTreeMap<String, SecretValue>, String> {
    let mut secrets = BTreeMap::new();
    for (key, variable) in written.unwrap_or_default() {
        env_name(
            &key,
            &[
                ("env", env.contains_key(&key)),
                ("env_from_file", files.contains_key(&key)),
            ],
        )?;
        let value = std::env::var(&variable)
            .map_err(|e| format!("{key}: the gateway's environment variable {variable}: {e}"))?;
        secrets.insert(
            key,
            SecretValue {
                source: format!("${variable}"),
                value: Secret::new(value),
            },
        );
    }
    Ok(secrets)
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
