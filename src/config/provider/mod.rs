//! `provider = …`: which provider a function's replicas come from, that provider's keys, and
//! what the rest of the crate asks of a provider kind (can it scale, how many replicas to start).

mod fixed;
mod kubernetes;
mod process;

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use serde::de::MapAccess;

pub use self::fixed::*;
pub use self::kubernetes::*;
pub use self::process::*;
use super::autoscaler::AutoscalerConfig;
use super::line;
use super::table::{At, Merge, Table};
use super::ConfigError;

/// Where a function's replicas come from.
#[derive(Clone, Debug, PartialEq)]
pub enum ProviderConfig {
    /// Local child processes, started from `command` with env `PORT`.
    Process(ProcessConfig),
    /// Fixed upstream URLs; no scaling.
    Static(StaticConfig),
    /// A Deployment scaled through its `scale` subresource; its Service's ready endpoints.
    Kubernetes(KubernetesConfig),
}

impl ProviderConfig {
    /// The name used in the config file.
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderConfig::Process(_) => "process",
            ProviderConfig::Static(_) => "static",
            ProviderConfig::Kubernetes(_) => "kubernetes",
        }
    }

    /// The replica count of a provider that cannot change it (`static`: one per upstream);
    /// `None` for a provider that scales.
    pub fn fixed_replicas(&self) -> Option<u32> {
        match self {
            ProviderConfig::Process(_) | ProviderConfig::Kubernetes(_) => None,
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
            ProviderConfig::Kubernetes(k) => k.describe(out),
        }
    }
}

/// The provider's keys of `[functions.NAME]` as written: `provider`, then each provider's own.
#[derive(Clone, Debug, Default)]
pub(in crate::config) struct RawProvider {
    kind: Option<String>,
    process: RawProcess,
    fixed: RawStatic,
    kubernetes: RawKubernetes,
}

impl Merge for RawProvider {
    fn over(self, under: Self) -> Self {
        RawProvider {
            kind: self.kind.over(under.kind),
            process: self.process.over(under.process),
            fixed: self.fixed.over(under.fixed),
            kubernetes: self.kubernetes.over(under.kubernetes),
        }
    }
}

impl Table for RawProvider {
    fn keys() -> &'static [&'static str] {
        static KEYS: OnceLock<Vec<&str>> = OnceLock::new();
        KEYS.get_or_init(|| {
            [
                &["provider"],
                RawProcess::keys(),
                RawStatic::keys(),
                RawKubernetes::keys(),
            ]
            .concat()
        })
    }

    fn read<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
        if key == "provider" {
            self.kind = Some(map.next_value()?);
            return Ok(true);
        }
        Ok(self.process.read(key, map)?
            || self.fixed.read(key, map)?
            || self.kubernetes.read(key, map)?)
    }
}

/// Resolves the provider of function `name`, whose keys are `at`. `base_dir` is the config file's
/// directory; `cold_start` is the function's cold start timeout as written (or its default).
pub(super) fn resolve(
    raw: RawProvider,
    name: &str,
    at: &At<'_>,
    base_dir: &Path,
    cold_start: Duration,
) -> Result<ProviderConfig, ConfigError> {
    let RawProvider {
        kind,
        process,
        fixed,
        kubernetes,
    } = raw;
    // A key of another provider is a mistake worth naming, not something to ignore.
    let foreign = |kind: &str| -> Result<(), ConfigError> {
        let written: [(&str, &str, bool); 9] = [
            ("command", "process", process.command.is_some()),
            ("env", "process", process.env.is_some()),
            ("env_from_file", "process", process.env_from_file.is_some()),
            ("env_from_env", "process", process.env_from_env.is_some()),
            (
                "readiness_path",
                "process",
                process.readiness_path.is_some(),
            ),
            ("upstreams", "static", fixed.upstreams.is_some()),
            ("deployment", "kubernetes", kubernetes.deployment.is_some()),
            ("service", "kubernetes", kubernetes.service.is_some()),
            ("port", "kubernetes", kubernetes.port.is_some()),
        ];
        match written.iter().find(|(_, owner, set)| *set && *owner != kind) {
            Some((key, owner, _)) => Err(at.invalid(
                key,
                format!("only provider \"{owner}\" takes {key} (this function's provider is \"{kind}\")"),
            )),
            None => Ok(()),
        }
    };
    match kind.as_deref() {
        Some("process") => {
            foreign("process")?;
            let config = ProcessConfig::resolve(process, at, base_dir, cold_start)?;
            Ok(ProviderConfig::Process(config))
        }
        Some("static") => {
            foreign("static")?;
            let config = StaticConfig::resolve(fixed, at)?;
            Ok(ProviderConfig::Static(config))
        }
        Some("kubernetes") => {
            foreign("kubernetes")?;
            let config = KubernetesConfig::resolve(kubernetes, at, name)?;
            Ok(ProviderConfig::Kubernetes(config))
        }
        Some(other) => Err(at.invalid(
            "provider",
            format!(
                "unknown provider `{other}` (expected \"process\", \"static\" or \"kubernetes\")"
            ),
        )),
        None => Err(at.invalid(
            "provider",
            "missing: set provider = \"process\", \"static\" or \"kubernetes\"",
        )),
    }
}
