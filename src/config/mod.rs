//! Typed configuration: the TOML file a user writes, its defaults, and the checks applied at load.
//!
//! This is the only module that reads files or environment variables. Everything else receives a
//! [`Config`] whose values have already been checked, so the request path never has to ask
//! "what if this is zero?".
//!
//! The file has three kinds of table: `[gateway]` (listener and connection limits), `[defaults]`
//! (any function key) and `[functions.NAME]` (one function; overrides `[defaults]`). Unknown keys are
//! errors: a typo must never silently fall back to a default.
//!
//! One module per table, each declaring its keys once with the `table!` macro (`table.rs`):
//! `gateway.rs` (`[gateway]`), `function.rs` (the keys every function has, and how a function's
//! table is resolved), `provider/` (`provider`, and the keys of each kind: `process.rs`, and
//! `fixed.rs` for `"static"`), `autoscaler.rs` (`[functions.NAME.autoscaler]`); `duration.rs`
//! reads durations. Everything public is re-exported here, as `crate::config::…`.
//!
//! # Adding a key
//!
//! A new key touches three places, all in its table's module:
//!
//! 1. its `DEFAULT_*` constant, if it has a default;
//! 2. one row in the module's `table!`: the key, its type as written, and the field it becomes
//!    (doc comment, type, and the rule that applies the default and checks the value). The row
//!    gives the key its place in the struct as written, in `[defaults]` merging, in
//!    "unknown field" messages, in the checked struct and in its error messages;
//! 3. its line in the module's `describe` (what `sluicegate check-config` prints).
//!
//! Then document it in the README's tables. The rules rows share (`given`, `positive`, `count`)
//! are in `table.rs`; a rule of one key is a small function beside its table. A key that is read
//! but resolved by hand is a row without `=> { … }`: `[gateway]`'s function defaults, and the
//! autoscaler's `type` and per-mode targets, which make `ScaleMode` (a new mode is a variant,
//! an arm of `scale_mode`, and the autoscaler's policy).

mod autoscaler;
mod callback;
mod duration;
mod function;
mod gateway;
mod provider;
mod table;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use self::autoscaler::*;
pub use self::callback::{CallbackRules, Cidr};
pub use self::duration::parse_duration;
pub use self::function::*;
pub use self::gateway::*;
pub use self::provider::*;
use self::table::{At, Merge};

/// Environment variable naming the async store file (overrides `[gateway] async_store`).
pub const ASYNC_STORE_ENV: &str = "SLUICEGATE_ASYNC_STORE";
/// Environment variable holding the admin bearer token (overrides `[gateway] admin_token`).
pub const ADMIN_TOKEN_ENV: &str = "SLUICEGATE_ADMIN_TOKEN";

/// Why a configuration could not be used. The message names the file, the key and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("{path}: {key}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The dotted key, e.g. `functions.echo.autoscaler.max_replicas`.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The whole, validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where it was read from (used in messages and to resolve relative paths).
    pub path: PathBuf,
    /// Listener and connection settings.
    pub gateway: GatewayConfig,
    /// Every configured function, by name, with `[defaults]` already applied.
    pub functions: BTreeMap<String, FunctionConfig>,
    /// `[defaults]` over `[gateway]`'s function keys, for functions discovered while running.
    defaults: RawFunction,
}

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    gateway: RawGateway,
    #[serde(default)]
    defaults: RawFunction,
    #[serde(default)]
    functions: BTreeMap<String, RawFunction>,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let env_token = std::env::var(ADMIN_TOKEN_ENV)
            .ok()
            .filter(|t| !t.is_empty());
        let mut config = Config::parse(path, &text, env_token)?;
        if let Some(store) = std::env::var(ASYNC_STORE_ENV)
            .ok()
            .filter(|s| !s.is_empty())
        {
            config.gateway.async_store =
                AsyncStoreLocation::parse(&store, Path::new("")).map_err(|reason| {
                    ConfigError::Invalid {
                        path: path.to_owned(),
                        key: ASYNC_STORE_ENV.into(),
                        reason,
                    }
                })?;
        }
        Ok(config)
    }

    /// Validates config text. `path` is used in messages and to resolve relative paths;
    /// `env_admin_token` (from `SLUICEGATE_ADMIN_TOKEN`) overrides `[gateway] admin_token`.
    pub fn parse(
        path: &Path,
        text: &str,
        env_admin_token: Option<String>,
    ) -> Result<Config, ConfigError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));

        // `[gateway]`'s function keys are the outermost defaults, under `[defaults]`.
        let defaults = RawFunction {
            keys: raw.gateway.function_defaults(),
            ..RawFunction::default()
        };
        let defaults = raw.defaults.over(defaults);
        let at = At::new(path, "gateway.".into());
        let gateway = GatewayConfig::resolve(raw.gateway, &at, path, &base_dir, env_admin_token)?;
        let mut functions = BTreeMap::new();
        for (name, table) in raw.functions {
            let config = function::resolve(&name, table.over(defaults.clone()), path, &base_dir)?;
            functions.insert(name, config);
        }
        Ok(Config {
            path: path.to_owned(),
            gateway,
            functions,
            defaults,
        })
    }

    /// The config of function `name` discovered as Deployment `namespace/deployment`: its
    /// `sluicegate.io/<key>` annotations (given here without the prefix; `autoscaler.<key>` for
    /// the autoscaler's keys) over `[defaults]`, checked exactly as the file's keys are. A value
    /// is read as a TOML value when it is one (`10`, `true`, `2.5`), else as a string (`"30s"`).
    /// `provider`, `deployment` and `namespace` come from the object, not from annotations.
    pub fn discovered(
        &self,
        name: &str,
        namespace: &str,
        deployment: &str,
        annotations: &BTreeMap<String, String>,
    ) -> Result<FunctionConfig, ConfigError> {
        let origin = PathBuf::from(format!(
            "deployment {namespace}/{deployment}, annotation sluicegate.io"
        ));
        let at = At::new(&origin, "/".into());
        let mut table = toml::Table::new();
        let mut autoscaler = toml::Table::new();
        for (key, value) in annotations {
            if matches!(key.as_str(), "provider" | "deployment" | "namespace") {
                return Err(at.invalid(
                    key,
                    "is set by discovery (the Deployment is the function), not by an annotation",
                ));
            }
            let value = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(value.clone()));
            match key.strip_prefix("autoscaler.") {
                Some(key) => autoscaler.insert(key.to_owned(), value),
                None => table.insert(key.clone(), value),
            };
        }
        if !autoscaler.is_empty() {
            table.insert("autoscaler".into(), toml::Value::Table(autoscaler));
        }
        table.insert("provider".into(), "kubernetes".into());
        table.insert("deployment".into(), deployment.into());
        table.insert("namespace".into(), namespace.into());
        let raw = RawFunction::deserialize(toml::Value::Table(table))
            .map_err(|e| at.invalid("", e.to_string()))?;
        let base_dir = self
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        function::resolve(name, raw.over(self.defaults.clone()), &origin, &base_dir)
    }

    /// The effective per-function settings, as `sluicegate check-config` prints them.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{}: ok", self.path.display());
        self.gateway.describe(&mut out);
        for function in self.functions.values() {
            function.describe(&mut out);
        }
        out
    }
}

/// Appends one `check-config` line of a function: `  key                  = value`.
fn line(out: &mut String, key: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "  {key:<20} = {value}");
}
