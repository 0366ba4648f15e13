//! `[functions.NAME.autoscaler]`: what the autoscaler measures for a function, the per-replica
//! target, the replica bounds and its timing.

use std::time::Duration;

use super::duration::Dur;
use super::line;
use super::provider::ProviderConfig;
use super::table::{count, given, table, At};
use super::ConfigError;

/// Smallest replica count the autoscaler keeps.
pub const DEFAULT_MIN_REPLICAS: u32 = 1;
/// Largest replica count the autoscaler asks for.
pub const DEFAULT_MAX_REPLICAS: u32 = 5;
/// `rps` mode: requests per replica per window.
pub const DEFAULT_THRESHOLD: f64 = 100.0;
/// Sliding-window length, used by every mode.
pub const DEFAULT_RATE_SECONDS: Duration = Duration::from_secs(30);
/// `concurrency` mode: ongoing+queued requests per replica (Ray Serve's default).
pub const DEFAULT_TARGET_ONGOING_REQUESTS: f64 = 2.0;
/// `queue` mode: pending async invocations per replica.
pub const DEFAULT_QUEUE_LENGTH: f64 = 10.0;
/// `cpu` mode: CPU time per replica, percent of one core, averaged over the window.
pub const DEFAULT_TARGET_CPU_PERCENT: f64 = 75.0;
/// Time between autoscaler decisions.
pub const DEFAULT_POLLING_INTERVAL: Duration = Duration::from_secs(1);
/// Time a scale-down waits: the replica count never drops below the highest desired count in this period.
pub const DEFAULT_COOLDOWN_PERIOD: Duration = Duration::from_secs(300);

table! {
    /// `[functions.NAME.autoscaler]` (and `[defaults.autoscaler]`) as written.
    struct RawAutoscaler;

    /// `[functions.NAME.autoscaler]`, with defaults applied.
    #[derive(Clone, Debug, PartialEq)]
    pub struct AutoscalerConfig {
        /// What is measured, and the per-replica target.
        pub mode: ScaleMode,
    }

    given(provider: &ProviderConfig);

    keys {
        // `type` and the targets of the modes make `mode` (see `scale_mode`).
        r#type: String,
        min_replicas: i64 => {
            /// Lower bound; `0` allows scale to zero.
            pub min_replicas: u32 = count(
                min_replicas,
                provider.fixed_replicas().unwrap_or(DEFAULT_MIN_REPLICAS).into(),
                0..=10_000,
            ),
        },
        max_replicas: i64 => {
            /// Upper bound.
            pub max_replicas: u32 = upper_bound(max_replicas, min_replicas, provider),
        },
        threshold: f64,
        rate_seconds: Dur => {
            /// Length of the sliding window (`rate_seconds`). The burst window is a tenth of it.
            pub window: Duration = at_least_10ms(rate_seconds, DEFAULT_RATE_SECONDS),
        },
        target_ongoing_requests: f64,
        queue_length: f64,
        target_cpu_percent: f64,
        polling_interval: Dur => {
            /// Time between decisions.
            pub polling_interval: Duration =
                at_least_10ms(polling_interval, DEFAULT_POLLING_INTERVAL),
        },
        cooldown_period: Dur => {
            /// A scale-down never goes below the highest desired count seen in this period.
            pub cooldown_period: Duration = given(cooldown_period, DEFAULT_COOLDOWN_PERIOD),
        },
    }
}

impl AutoscalerConfig {
    /// Replicas requested when a request arrives for a function at zero.
    pub fn wake_replicas(&self) -> u32 {
        self.min_replicas.max(1)
    }

    /// Appends the `check-config` line of the autoscaler.
    pub(super) fn describe(&self, out: &mut String) {
        let target = match self.mode {
            ScaleMode::Rps { threshold } => format!(", threshold = {threshold}"),
            ScaleMode::Concurrency {
                target_ongoing_requests,
            } => format!(", target_ongoing_requests = {target_ongoing_requests}"),
            ScaleMode::Queue { queue_length } => format!(", queue_length = {queue_length}"),
            ScaleMode::Cpu { target_cpu_percent } => {
                format!(", target_cpu_percent = {target_cpu_percent}")
            }
            ScaleMode::None => String::new(),
        };
        line(
            out,
            "autoscaler",
            format!(
                "type = {}{target}, replicas {}..={}, rate_seconds = {:?}, polling_interval = {:?}, cooldown_period = {:?}",
                self.mode.name(),
                self.min_replicas,
                self.max_replicas,
                self.window,
                self.polling_interval,
                self.cooldown_period
            ),
        );
    }
}

/// What the autoscaler measures for a function.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScaleMode {
    /// `threshold` requests per replica in the window of `rate_seconds`.
    Rps {
        /// Requests per replica per window.
        threshold: f64,
    },
    /// `target_ongoing_requests` ongoing+queued per replica, averaged over the window.
    Concurrency {
        /// Ongoing+queued requests per replica.
        target_ongoing_requests: f64,
    },
    /// `queue_length` pending async invocations per replica.
    Queue {
        /// Pending async invocations per replica.
        queue_length: f64,
    },
    /// `target_cpu_percent` percent of one core of CPU time per replica (its process group's),
    /// averaged over the window. Process replicas only.
    Cpu {
        /// Percent of one core per replica.
        target_cpu_percent: f64,
    },
    /// No automatic scaling: the replica count changes only by hand (and from zero on demand).
    None,
}

impl ScaleMode {
    /// The name used in the config file.
    pub fn name(&self) -> &'static str {
        match self {
            ScaleMode::Rps { .. } => "rps",
            ScaleMode::Concurrency { .. } => "concurrency",
            ScaleMode::Queue { .. } => "queue",
            ScaleMode::Cpu { .. } => "cpu",
            ScaleMode::None => "none",
        }
    }
}

/// Resolves the autoscaler of a function whose provider is `provider`; `at` is the sub-table.
pub(super) fn resolve(
    raw: Option<RawAutoscaler>,
    provider: &ProviderConfig,
    at: &At<'_>,
) -> Result<AutoscalerConfig, ConfigError> {
    let raw = raw.unwrap_or_default();
    let mode = scale_mode(&raw, provider, at)?;
    let bounds_written = raw.min_replicas.is_some() || raw.max_replicas.is_some();
    let config = AutoscalerConfig::resolve(raw, at, mode, provider)?;
    if !provider.scalable() && (config.mode != ScaleMode::None || bounds_written) {
        return Err(at.invalid(
            "type",
            "a static function has a fixed set of upstreams and cannot be autoscaled; remove its [autoscaler] table",
        ));
    }
    Ok(config)
}

/// `type` (by default `rps`, or `none` where the replica count cannot change) and its target.
fn scale_mode(
    raw: &RawAutoscaler,
    provider: &ProviderConfig,
    at: &At<'_>,
) -> Result<ScaleMode, ConfigError> {
    let target = |key: &str, written: Option<f64>, default: f64| {
        let v = written.unwrap_or(default);
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(at.invalid(key, format!("{v} must be greater than zero")))
        }
    };
    let default = if provider.scalable() { "rps" } else { "none" };
    Ok(match raw.r#type.as_deref().unwrap_or(default) {
        "rps" => ScaleMode::Rps {
            threshold: target("threshold", raw.threshold, DEFAULT_THRESHOLD)?,
        },
        "concurrency" => ScaleMode::Concurrency {
            target_ongoing_requests: target(
                "target_ongoing_requests",
                raw.target_ongoing_requests,
                DEFAULT_TARGET_ONGOING_REQUESTS,
            )?,
        },
        "queue" => ScaleMode::Queue {
            queue_length: target("queue_length", raw.queue_length, DEFAULT_QUEUE_LENGTH)?,
        },
        "cpu" if !matches!(provider, ProviderConfig::Process(_)) => {
            return Err(at.invalid(
                "type",
                "cpu scaling measures the replicas' own processes: it needs provider = \"process\"",
            ))
        }
        "cpu" => ScaleMode::Cpu {
            target_cpu_percent: target(
                "target_cpu_percent",
                raw.target_cpu_percent,
                DEFAULT_TARGET_CPU_PERCENT,
            )?,
        },
        "none" => ScaleMode::None,
        other => {
            return Err(at.invalid(
                "type",
                format!("unknown type `{other}` (expected rps, concurrency, queue, cpu or none)"),
            ))
        }
    })
}

/// At least `min_replicas` and at least 1.
fn upper_bound(written: Option<i64>, min: u32, provider: &ProviderConfig) -> Result<u32, String> {
    let default = provider
        .fixed_replicas()
        .unwrap_or(DEFAULT_MAX_REPLICAS)
        .max(min);
    let max: u32 = count(written, default.into(), 0..=10_000)?;
    if max < min {
        return Err(format!("{max} is less than min_replicas ({min})"));
    }
    if max == 0 {
        return Err("must be at least 1".into());
    }
    Ok(max)
}

fn at_least_10ms(written: Option<Dur>, default: Duration) -> Result<Duration, String> {
    match written.map_or(default, Duration::from) {
        d if d < Duration::from_millis(10) => Err(format!("{d:?} is shorter than 10ms")),
        d => Ok(d),
    }
}
