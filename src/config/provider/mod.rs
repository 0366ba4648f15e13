//! `provider = …`: which provider a function's replicas come from, that provider's keys, and
//! what the rest of the crate asks of a provider kind (can it scale, how many replicas to start).

mod fixed;
mod process;

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use serde::de::MapAccess;

pub use self::fixed::*;
pub use self::process::*;
use super::autoscaler::AutoscalerConfig;
use super::line;
use super::table::{At, Merge, Table};
use super::ConfigError;

/// Where a function's replicas come from.
#[derive(Clone, Debug)]
pub enum ProviderConfig {
    /// Local child processes, started from `command` with env `PORT`.
    Process(ProcessConfig),
    /// Fixed upstream URLs; no scaling.
    Static(StaticConfig),
}

impl ProviderConfig {
    /// The name used in the config file.
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderConfig::Process(_) => "process",
            ProviderConfig::Static(_) => "static",
        }
    }

    /// The replica count of a provider that cannot change it (`static`: one per upstream);
    /// `None` for a provider that scales.
    pub fn fixed_replicas(&self) -> Option<u32> {
        match self {
            ProviderConfig::Process(_) => None,
            ProviderConfig::Static(s) => Some(s.upstreams.len() as u32),
        }
    }

    /// Whether the replica count can change, by the autoscaler or by hand.
    pub fn scalable(&self) -> bool {
        self.fixed_replicas().is_none()
    }

    /// Replicas a function has once the gateway has started it and before any request arrives:
    /// `min_replicas` where the count can change, else the fixed count.
    pub fn initial_replicas(&self, autoscaler: &AutoscalerConfig) -> u32 {
        self.fixed_replicas().unwrap_or(autoscaler.min_replicas)
    }

    /// Appends the provider's `check-config` lines.
    pub(super) fn describe(&self, out: &mut String) {
        line(out, "provider", self.kind());
        match self {
            ProviderConfig::Process(p) => p.describe(out),
            ProviderConfig::Static(s) => s.describe(out),
        }
    }
}

/// The provider's keys of `[functions.NAME]` as written: `provider`, then each provider's own.
#[derive(Clone, Debug, Default)]
pub(in crate::config) struct RawProvider {
    kind: Option<String>,
    process: RawProcess,
    fixed: RawStatic,
}

impl Merge for RawProvider {
    fn over(self, under: Self) -> Self {
        RawProvider {
            kind: self.kind.over(under.kind),
            process: self.process.over(under.process),
            fixed: self.fixed.over(under.fixed),
        }
    }
}

impl Table for RawProvider {
    fn keys() -> &'static [&'static str] {
        static KEYS: OnceLock<Vec<&str>> = OnceLock::new();
        KEYS.get_or_init(|| [&["provider"], RawProcess::keys(), RawStatic::keys()].concat())
    }

    fn read<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
        if key == "provider" {
            self.kind = Some(map.next_value()?);
            return Ok(true);
        }
        Ok(self.process.read(key, map)? || self.fixed.read(key, map)?)
    }
}

/// Resolves the provider of the function whose keys are `at`. `base_dir` is the config file's
/// directory; `cold_start` is the function's cold start timeout as written (or its default).
pub(super) fn resolve(
    raw: RawProvider,
    at: &At<'_>,
    base_dir: &Path,
    cold_start: Duration,
) -> Result<ProviderConfig, ConfigError> {
    let RawProvider {
        kind,
        process,
        fixed,
    } = raw;
    match kind.as_deref() {
        Some("process") => {
            let config = ProcessConfig::resolve(process, at, base_dir, cold_start)?;
            if fixed.upstreams.is_some() {
                return Err(at.invalid("upstreams", "only provider \"static\" takes upstreams"));
            }
            Ok(ProviderConfig::Process(config))
        }
        Some("static") => {
            let config = StaticConfig::resolve(fixed, at)?;
            if process.command.is_some() {
                return Err(at.invalid("command", "only provider \"process\" takes a command"));
            }
            Ok(ProviderConfig::Static(config))
        }
        Some("kubernetes") => Err(at.invalid(
            "provider",
            "provider \"kubernetes\" is not available in this build yet; use \"process\" or \"static\"",
        )),
        Some(other) => Err(at.invalid(
            "provider",
            format!("unknown provider `{other}` (expected \"process\" or \"static\")"),
        )),
        None => Err(at.invalid(
            "provider",
            "missing: set provider = \"process\" or \"static\"",
        )),
    }
}
