//! `[functions.NAME.autoscaler]`: what the autoscaler measures for a function, the per-replica
//! target, the replica bounds and its timing.

use std::time::Duration;

use super::duration::Dur;
use super::line;
use super::provider::ProviderConfig;
use super::table::{count, table, At};
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
/// `cooldown_period = "adaptive"`: width of one bin of the idle-time histogram (240 bins).
pub const DEFAULT_ADAPTIVE_BIN_WIDTH: Duration = Duration::from_secs(60);
/// `cooldown_period = "adaptive"`: idle replica time worth spending to spare one cold start.
pub const DEFAULT_ADAPTIVE_COLD_START_COST: Duration = Duration::from_secs(900);

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
        adaptive_min_keep_alive: Dur,
        adaptive_max_keep_alive: Dur,
        adaptive_cold_start_cost: Dur,
        adaptive_bin_width: Dur => {
            /// With `cooldown_period = "adaptive"`: the learned keep-alive and pre-warm windows.
            pub adaptive: Option<AdaptiveConfig> = adaptive(
                cooldown_period,
                adaptive_min_keep_alive,
                adaptive_max_keep_alive,
                adaptive_cold_start_cost,
                adaptive_bin_width,
            ),
        },
        adaptive_scale_down_delay: Dur,
        cooldown_period: Cooldown => {
            /// A scale-down never goes below the highest desired count seen in this period. With
            /// `cooldown_period = "adaptive"` this is `adaptive_scale_down_delay` (default
            /// [`DEFAULT_COOLDOWN_PERIOD`]; it then governs only scale-downs between non-zero
            /// counts) and [`AutoscalerConfig::adaptive`] decides when the last replica goes and
            /// when one is started again.
            pub cooldown_period: Duration =
                scale_down_delay(cooldown_period, adaptive_scale_down_delay),
        },
    }
}

/// `cooldown_period` as written: a duration, or `"adaptive"`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(in crate::config) enum Cooldown {
    /// A fixed duration.
    Fixed(Dur),
    /// Learned per function from its idle times.
    Adaptive,
}

impl super::table::Merge for Cooldown {
    fn over(self, _: Self) -> Self {
        self
    }
}

impl<'de> serde::Deserialize<'de> for Cooldown {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Written {
            Text(String),
            Other(Dur),
        }
        match Written::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected whole seconds, a duration string such as \"5m\", or \"adaptive\"",
            )
        })? {
            Written::Text(t) if t.trim() == "adaptive" => Ok(Cooldown::Adaptive),
            Written::Text(t) => super::duration::parse_duration(&t)
                .map(|d| Cooldown::Fixed(Dur(d)))
                .map_err(|e| serde::de::Error::custom(format!("{e}, or \"adaptive\""))),
            Written::Other(d) => Ok(Cooldown::Fixed(d)),
        }
    }
}

/// `cooldown_period = "adaptive"`: the bounds and the time scale of the learned windows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdaptiveConfig {
    /// Width of one of the histogram's 240 bins (`adaptive_bin_width`, default 1 minute): the
    /// histogram covers 240 of them (4 hours by default); idle times beyond count apart.
    pub bin_width: Duration,
    /// The last replica stays at least this long after the function goes idle
    /// (`adaptive_min_keep_alive`; none by default).
    pub min_keep_alive: Option<Duration>,
    /// The function never stays up idle longer than this after it goes idle, and is never
    /// pre-warmed this late (`adaptive_max_keep_alive`; none by default).
    pub max_keep_alive: Option<Duration>,
    /// How much idle replica time is worth spending to spare a request one cold start
    /// (`adaptive_cold_start_cost`, default 15 minutes): a stretch of idle time is covered by a
    /// replica only when the requests it catches are worth more than the replica time it costs.
    pub cold_start_cost: Duration,
}

/// The wait before a scale-down: a fixed `cooldown_period`, or with `"adaptive"` the
/// `adaptive_scale_down_delay` (between non-zero counts; the learned windows decide the last
/// replica), [`DEFAULT_COOLDOWN_PERIOD`] when neither is written.
fn scale_down_delay(cooldown: Option<Cooldown>, adaptive: Option<Dur>) -> Result<Duration, String> {
    match (cooldown, adaptive) {
        (Some(Cooldown::Fixed(d)), None) => Ok(d.into()),
        (Some(Cooldown::Adaptive), Some(d)) => Ok(d.into()),
        (_, None) => Ok(DEFAULT_COOLDOWN_PERIOD),
        (_, Some(_)) => Err("adaptive_scale_down_delay applies only with cooldown_period = \"adaptive\" (a fixed cooldown_period is the scale-down delay itself)".into()),
    }
}

fn adaptive(
    cooldown: Option<Cooldown>,
    min: Option<Dur>,
    max: Option<Dur>,
    cost: Option<Dur>,
    bin: Option<Dur>,
) -> Result<Option<AdaptiveConfig>, String> {
    if cooldown != Some(Cooldown::Adaptive) {
        return match (min, max, cost, bin) {
            (None, None, None, None) => Ok(None),
            _ => Err("adaptive_min_keep_alive, adaptive_max_keep_alive, adaptive_cold_start_cost and adaptive_bin_width apply only with cooldown_period = \"adaptive\"".into()),
        };
    }
    let bin_width = at_least_10ms(bin, DEFAULT_ADAPTIVE_BIN_WIDTH)?;
    let cold_start_cost = cost.map_or(DEFAULT_ADAPTIVE_COLD_START_COST, Duration::from);
    if cold_start_cost.is_zero() {
        return Err("adaptive_cold_start_cost must be greater than zero".into());
    }
    let (min_keep_alive, max_keep_alive) = (min.map(Duration::from), max.map(Duration::from));
    if let (Some(lo), Some(hi)) = (min_keep_alive, max_keep_alive) {
        if hi < lo {
            return Err(format!(
                "adaptive_max_keep_alive ({hi:?}) is less than adaptive_min_keep_alive ({lo:?})"
            ));
        }
    }
    if max_keep_alive.is_some_and(|d| d.is_zero()) {
        return Err("adaptive_max_keep_alive must be greater than zero".into());
    }
    Ok(Some(AdaptiveConfig {
        bin_width,
        min_keep_alive,
        max_keep_alive,
        cold_start_cost,
    }))
}

impl AutoscalerConfig {
    /// Replicas requested when a request arrives for a function at zero.
    pub fn wake_replicas(&self) -> u32 {
        self.min_replicas.max(1)
    }

    /// `cooldown_period` as `check-config` and `/system` show it: `300s`, or `adaptive` with its
    /// bounds and bin width.
    pub fn describe_cooldown(&self) -> String {
        let Some(a) = &self.adaptive else {
            return format!("{:?}", self.cooldown_period);
        };
        let mut text = format!(
            "adaptive (bin {:?}, cold start worth {:?}",
            a.bin_width, a.cold_start_cost
        );
        if let Some(d) = a.min_keep_alive {
            text.push_str(&format!(", keep-alive at least {d:?}"));
        }
        if let Some(d) = a.max_keep_alive {
            text.push_str(&format!(", at most {d:?}"));
        }
        if self.min_replicas > 0 {
            text.push_str(", no effect: min_replicas > 0");
        }
        text.push_str(&format!(
            "; scale-downs above zero after {:?})",
            self.cooldown_period
        ));
        text
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
                "type = {}{target}, replicas {}..={}, rate_seconds = {:?}, polling_interval = {:?}, cooldown_period = {}",
                self.mode.name(),
                self.min_replicas,
                self.max_replicas,
                self.window,
                self.polling_interval,
                self.describe_cooldown()
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
