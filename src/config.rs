//! Typed configuration: the TOML file a user writes, its defaults, and `validate()`.
//!
//! This is the only module that reads files or environment variables. Everything else receives a
//! [`Config`] whose values have already been checked, so the request path never has to ask
//! "what if this is zero?".
//!
//! The file has three kinds of table: `[gateway]` (listener and connection limits), `[defaults]`
//! (any function key) and `[functions.NAME]` (one function; overrides `[defaults]`). Unknown keys are
//! errors: a typo must never silently fall back to a default.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// Address the gateway listens on when `[gateway] listen` is not set.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Longest a request is held waiting for a function's first ready replica.
pub const DEFAULT_COLD_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a request waits in a function's queue while the function has ready replicas.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request body accepted, in bytes (10 MiB).
pub const DEFAULT_MAX_BODY_BYTES: u64 = 10 * 1024 * 1024;
/// Time a client has, from its first byte (or from connecting), to send a complete request head.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (request line plus headers) accepted, in bytes.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Time an idle keep-alive connection is kept open.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// Time in-flight requests have to finish after SIGTERM before the gateway exits anyway.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests in flight per replica (Ray Serve's default).
pub const DEFAULT_MAX_ONGOING_REQUESTS: u32 = 5;
/// Requests waiting per function. Bounded by default: an unbounded queue is how peers run out of memory.
pub const DEFAULT_MAX_QUEUED_REQUESTS: i64 = 100;
/// Upstream timeout: how long a replica has to start its response (OpenFaaS's default).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest silence inside a response body before it is aborted. nginx's `proxy_read_timeout` is
/// 60 s; long enough here for event streams with the usual 15-30 s heartbeats.
pub const DEFAULT_RESPONSE_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Path probed on a process replica until it answers 2xx.
pub const DEFAULT_READINESS_PATH: &str = "/";
/// Time between SIGTERM and SIGKILL when a process replica is stopped.
pub const DEFAULT_TERMINATION_GRACE: Duration = Duration::from_secs(10);
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
/// Time between autoscaler decisions.
pub const DEFAULT_POLLING_INTERVAL: Duration = Duration::from_secs(1);
/// Time a scale-down waits: the replica count never drops below the highest desired count in this period.
pub const DEFAULT_COOLDOWN_PERIOD: Duration = Duration::from_secs(300);
/// Async invocations per function accepted and not yet finished before new ones get `503`.
pub const DEFAULT_ASYNC_MAX_BACKLOG: u64 = 10_000;
/// Attempts per async invocation (the first included) before it is dead-lettered.
pub const DEFAULT_ASYNC_MAX_ATTEMPTS: u32 = 5;
/// Wait before an async invocation's first retry; it doubles with each further retry.
pub const DEFAULT_ASYNC_INITIAL_RETRY_WAIT: Duration = Duration::from_secs(1);
/// Longest wait between two attempts of an async invocation (the doubling stops there).
pub const DEFAULT_ASYNC_MAX_RETRY_WAIT: Duration = Duration::from_secs(60);
/// Largest async request body when `max_body_bytes = 0` (unlimited for sync calls, which stream):
/// an async body is held in memory and stored whole, so it always has a bound (64 MiB).
pub const ASYNC_BODY_CEILING: u64 = 64 * 1024 * 1024;
/// File name suffix of the default async store, next to the config file (`demo.toml` →
/// `demo.async.redb`).
pub const DEFAULT_ASYNC_STORE_SUFFIX: &str = ".async.redb";
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
}

/// `[gateway]`: the listener, connection limits and shutdown.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Socket address for functions, `/metrics`, `/healthz`, `/readyz` and `/system`.
    pub listen: SocketAddr,
    /// Time a client has to send a complete request head, counted from its first byte (or from
    /// connecting, for a new connection). Slow-loris protection.
    pub header_read_timeout: Duration,
    /// Largest request head in bytes; larger heads get `431`.
    pub max_header_bytes: usize,
    /// Time an idle keep-alive connection stays open.
    pub idle_timeout: Duration,
    /// Time in-flight requests get to finish after SIGTERM.
    pub drain_timeout: Duration,
    /// Bearer token required on `/system/*`; `None` leaves `/system` open.
    pub admin_token: Option<String>,
    /// Threads serving requests; `0` is one per available CPU. With one thread the gateway runs a
    /// single-threaded runtime, which costs measurably less CPU per request than a multi-threaded
    /// runtime with one worker.
    pub worker_threads: usize,
    /// The file holding accepted async invocations (an embedded redb database): `async_store`
    /// relative to the config file's directory, else `<config name>.async.redb` beside the config
    /// file; `SLUICEGATE_ASYNC_STORE` overrides both.
    pub async_store: PathBuf,
}

/// One function, with defaults applied.
#[derive(Clone, Debug)]
pub struct FunctionConfig {
    /// The function's name, as in `/function/{name}`.
    pub name: String,
    /// Where its replicas come from.
    pub provider: ProviderConfig,
    /// Requests in flight per ready replica. Never 0.
    pub max_ongoing_requests: u32,
    /// Requests waiting per function; `None` is unlimited (`-1` in the file).
    pub max_queued_requests: Option<u32>,
    /// Time a replica has to start its response before the client gets `504`.
    pub timeout: Duration,
    /// Longest a replica may send nothing in the middle of a response body before the response
    /// is aborted and its slot freed; `None` (`0` in the file) never.
    pub response_idle_timeout: Option<Duration>,
    /// Longest a request is held waiting for the function's first ready replica (then `503`).
    pub cold_start_timeout: Duration,
    /// Longest a request waits in the queue while the function has ready replicas (then `503`).
    pub queue_timeout: Duration,
    /// Largest request body in bytes; `0` is unlimited (async bodies then stop at
    /// [`ASYNC_BODY_CEILING`]).
    pub max_body_bytes: u64,
    /// Async invocations accepted and not yet finished (waiting, in flight, retrying, delivering
    /// their callback) beyond which new ones get `503`. At least 1.
    pub async_max_backlog: u64,
    /// Async invocations in flight to the function at once (holding or awaiting a replica slot).
    /// Default `max_ongoing_requests × max_replicas`, the function's capacity at full scale. At
    /// least 1.
    pub async_concurrency: u32,
    /// Attempts per async invocation, the first included, before it is dead-lettered. At least 1.
    pub async_max_attempts: u32,
    /// Wait before the first retry of an async invocation; doubles with each retry.
    pub async_initial_retry_wait: Duration,
    /// Longest wait between two attempts (the doubling stops there; a longer `Retry-After` from
    /// the function is still honoured, up to an hour).
    pub async_max_retry_wait: Duration,
    /// How the autoscaler treats this function.
    pub autoscaler: AutoscalerConfig,
}

impl FunctionConfig {
    /// Largest async request body in bytes: `max_body_bytes`, or [`ASYNC_BODY_CEILING`] when that
    /// is `0` (an async body is held in memory and stored whole).
    pub fn async_max_body_bytes(&self) -> u64 {
        match self.max_body_bytes {
            0 => ASYNC_BODY_CEILING,
            n => n,
        }
    }
}

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
}

/// `provider = "process"`.
#[derive(Clone, Debug)]
pub struct ProcessConfig {
    /// Program and arguments. A first element of exactly `sluicegate` means the running binary.
    pub command: Vec<String>,
    /// Extra environment for every replica (`PORT` is always set by the gateway).
    pub env: BTreeMap<String, String>,
    /// Working directory: `working_dir` if set (relative to the config file), else the config file's directory.
    pub working_dir: PathBuf,
    /// Path probed with `GET` until it answers 2xx.
    pub readiness_path: String,
    /// Time a starting replica has to become ready before it is killed and counted as failed.
    pub startup_timeout: Duration,
    /// Time between SIGTERM and SIGKILL on scale-down and shutdown.
    pub termination_grace: Duration,
}

/// `provider = "static"`.
#[derive(Clone, Debug)]
pub struct StaticConfig {
    /// `http://host:port` of each upstream.
    pub upstreams: Vec<Upstream>,
}

/// One upstream base URL: scheme and authority; requests keep their own path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    /// Always `http` for now.
    pub scheme: Scheme,
    /// `host:port`.
    pub authority: Authority,
    /// `authority` as a `Host` header value, built once.
    pub host_header: http::HeaderValue,
}

impl Upstream {
    /// An `http://` upstream at `authority`.
    pub fn http(authority: Authority) -> Upstream {
        let host_header = http::HeaderValue::from_str(authority.as_str())
            .expect("an authority is a valid header value");
        Upstream {
            scheme: Scheme::HTTP,
            authority,
            host_header,
        }
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
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
            ScaleMode::None => "none",
        }
    }
}

/// `[functions.NAME.autoscaler]`, with defaults applied.
#[derive(Clone, Debug, PartialEq)]
pub struct AutoscalerConfig {
    /// What is measured, and the per-replica target.
    pub mode: ScaleMode,
    /// Lower bound; `0` allows scale to zero.
    pub min_replicas: u32,
    /// Upper bound.
    pub max_replicas: u32,
    /// Length of the sliding window (`rate_seconds`). The burst window is a tenth of it.
    pub window: Duration,
    /// Time between decisions.
    pub polling_interval: Duration,
    /// A scale-down never goes below the highest desired count seen in this period.
    pub cooldown_period: Duration,
}

impl AutoscalerConfig {
    /// Replicas requested when a request arrives for a function at zero.
    pub fn wake_replicas(&self) -> u32 {
        self.min_replicas.max(1)
    }
}

// ---------------------------------------------------------------------------------------------
// Durations: whole seconds (`10`) or strings (`"250ms"`, `"1.5s"`, `"5m"`, `"1h"`).

/// Parses `"250ms"`, `"10s"`, `"1.5s"`, `"5m"`, `"1h"` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        format!("`{text}` is not a duration (write e.g. \"250ms\", \"10s\", \"5m\")")
    })?;
    let secs = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "`{text}` has unknown unit `{other}` (use ms, s, m or h)"
            ))
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("`{text}` is not a non-negative duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A duration as written in the file: integer seconds or a string with a unit.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("whole seconds or a duration string such as \"250ms\" or \"5m\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                u64::try_from(v)
                    .map(|s| Dur(Duration::from_secs(s)))
                    .map_err(|_| E::custom("a duration cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                Ok(Dur(Duration::from_secs(v)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Dur, E> {
                if v.is_finite() && v >= 0.0 {
                    Ok(Dur(Duration::from_secs_f64(v)))
                } else {
                    Err(E::custom("a duration cannot be negative"))
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                parse_duration(v).map(Dur).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------------------------
// The file as written. Every field is optional so that `[defaults]` can fill it in.

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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    listen: Option<String>,
    cold_start_timeout: Option<Dur>,
    queue_timeout: Option<Dur>,
    max_body_bytes: Option<u64>,
    header_read_timeout: Option<Dur>,
    max_header_bytes: Option<usize>,
    idle_timeout: Option<Dur>,
    drain_timeout: Option<Dur>,
    admin_token: Option<String>,
    worker_threads: Option<usize>,
    async_store: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFunction {
    provider: Option<String>,
    // process
    command: Option<Vec<String>>,
    env: Option<BTreeMap<String, String>>,
    working_dir: Option<String>,
    readiness_path: Option<String>,
    startup_timeout: Option<Dur>,
    termination_grace: Option<Dur>,
    // static
    upstreams: Option<Vec<String>>,
    // admission and timeouts
    max_ongoing_requests: Option<i64>,
    max_queued_requests: Option<i64>,
    timeout: Option<Dur>,
    response_idle_timeout: Option<Dur>,
    cold_start_timeout: Option<Dur>,
    queue_timeout: Option<Dur>,
    max_body_bytes: Option<u64>,
    // async invocations
    async_max_backlog: Option<i64>,
    async_concurrency: Option<i64>,
    async_max_attempts: Option<i64>,
    async_initial_retry_wait: Option<Dur>,
    async_max_retry_wait: Option<Dur>,
    autoscaler: Option<RawAutoscaler>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAutoscaler {
    #[serde(rename = "type")]
    kind: Option<String>,
    min_replicas: Option<i64>,
    max_replicas: Option<i64>,
    threshold: Option<f64>,
    rate_seconds: Option<Dur>,
    target_ongoing_requests: Option<f64>,
    queue_length: Option<f64>,
    polling_interval: Option<Dur>,
    cooldown_period: Option<Dur>,
}

/// `[functions.NAME]` over `[defaults]`, field by field (a sub-table merges too).
fn merge(f: &RawFunction, d: &RawFunction) -> RawFunction {
    fn or<T: Clone>(a: &Option<T>, b: &Option<T>) -> Option<T> {
        a.clone().or_else(|| b.clone())
    }
    let autoscaler = match (&f.autoscaler, &d.autoscaler) {
        (None, None) => None,
        (a, b) => {
            let a = a.clone().unwrap_or_default();
            let b = b.clone().unwrap_or_default();
            Some(RawAutoscaler {
                kind: or(&a.kind, &b.kind),
                min_replicas: or(&a.min_replicas, &b.min_replicas),
                max_replicas: or(&a.max_replicas, &b.max_replicas),
                threshold: or(&a.threshold, &b.threshold),
                rate_seconds: or(&a.rate_seconds, &b.rate_seconds),
                target_ongoing_requests: or(&a.target_ongoing_requests, &b.target_ongoing_requests),
                queue_length: or(&a.queue_length, &b.queue_length),
                polling_interval: or(&a.polling_interval, &b.polling_interval),
                cooldown_period: or(&a.cooldown_period, &b.cooldown_period),
            })
        }
    };
    RawFunction {
        provider: or(&f.provider, &d.provider),
        command: or(&f.command, &d.command),
        env: match (&f.env, &d.env) {
            (None, None) => None,
            (a, b) => {
                let mut env = b.clone().unwrap_or_default();
                env.extend(a.clone().unwrap_or_default());
                Some(env)
            }
        },
        working_dir: or(&f.working_dir, &d.working_dir),
        readiness_path: or(&f.readiness_path, &d.readiness_path),
        startup_timeout: or(&f.startup_timeout, &d.startup_timeout),
        termination_grace: or(&f.termination_grace, &d.termination_grace),
        upstreams: or(&f.upstreams, &d.upstreams),
        max_ongoing_requests: or(&f.max_ongoing_requests, &d.max_ongoing_requests),
        max_queued_requests: or(&f.max_queued_requests, &d.max_queued_requests),
        timeout: or(&f.timeout, &d.timeout),
        response_idle_timeout: or(&f.response_idle_timeout, &d.response_idle_timeout),
        cold_start_timeout: or(&f.cold_start_timeout, &d.cold_start_timeout),
        queue_timeout: or(&f.queue_timeout, &d.queue_timeout),
        max_body_bytes: or(&f.max_body_bytes, &d.max_body_bytes),
        async_max_backlog: or(&f.async_max_backlog, &d.async_max_backlog),
        async_concurrency: or(&f.async_concurrency, &d.async_concurrency),
        async_max_attempts: or(&f.async_max_attempts, &d.async_max_attempts),
        async_initial_retry_wait: or(&f.async_initial_retry_wait, &d.async_initial_retry_wait),
        async_max_retry_wait: or(&f.async_max_retry_wait, &d.async_max_retry_wait),
        autoscaler,
    }
}

/// Checks one function name against `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
pub fn is_valid_function_name(name: &str) -> bool {
    let b = name.as_bytes();
    let ok = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= 63
        && ok(b[0])
        && ok(b[b.len() - 1])
        && b.iter().all(|&c| ok(c) || c == b'-')
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
        if let Some(store) = std::env::var_os(ASYNC_STORE_ENV).filter(|s| !s.is_empty()) {
            config.gateway.async_store = PathBuf::from(store);
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
        let invalid = |key: &str, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            reason,
        };
        let base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));

        let g = &raw.gateway;
        let listen_text = g
            .listen
            .clone()
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            invalid(
                "gateway.listen",
                format!("`{listen_text}` is not an address like \"127.0.0.1:8080\""),
            )
        })?;
        let max_header_bytes = g.max_header_bytes.unwrap_or(DEFAULT_MAX_HEADER_BYTES);
        if !(8192..=16 * 1024 * 1024).contains(&max_header_bytes) {
            return Err(invalid(
                "gateway.max_header_bytes",
                format!("{max_header_bytes} is outside 8192..=16777216"),
            ));
        }
        let positive = |key: &str, d: Option<Dur>, default: Duration| {
            let v = d.map(|d| d.0).unwrap_or(default);
            if v.is_zero() {
                Err(invalid(key, "must be greater than zero".into()))
            } else {
                Ok(v)
            }
        };
        let gateway = GatewayConfig {
            listen,
            header_read_timeout: positive(
                "gateway.header_read_timeout",
                g.header_read_timeout,
                DEFAULT_HEADER_READ_TIMEOUT,
            )?,
            max_header_bytes,
            idle_timeout: positive("gateway.idle_timeout", g.idle_timeout, DEFAULT_IDLE_TIMEOUT)?,
            drain_timeout: g
                .drain_timeout
                .map(|d| d.0)
                .unwrap_or(DEFAULT_DRAIN_TIMEOUT),
            admin_token: env_admin_token
                .or_else(|| g.admin_token.clone())
                .filter(|t| !t.is_empty()),
            worker_threads: match g.worker_threads.unwrap_or(0) {
                n @ 0..=1024 => n,
                n => {
                    return Err(invalid(
                        "gateway.worker_threads",
                        format!("{n} is outside 0..=1024 (0: one per available CPU)"),
                    ))
                }
            },
            async_store: match g.async_store.as_deref() {
                Some("") => {
                    return Err(invalid(
                        "gateway.async_store",
                        "must name a file, e.g. \"/var/lib/sluicegate/async.redb\"".into(),
                    ))
                }
                Some(file) => base_dir.join(file),
                None => {
                    let stem = path
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .filter(|s| !s.is_empty())
                        .unwrap_or_else(|| "sluicegate".to_owned());
                    base_dir.join(format!("{stem}{DEFAULT_ASYNC_STORE_SUFFIX}"))
                }
            },
        };

        // Gateway-wide values act as the outermost defaults for the function keys of the same name.
        let gateway_defaults = RawFunction {
            cold_start_timeout: g.cold_start_timeout,
            queue_timeout: g.queue_timeout,
            max_body_bytes: g.max_body_bytes,
            ..RawFunction::default()
        };
        let defaults = merge(&raw.defaults, &gateway_defaults);

        let mut functions = BTreeMap::new();
        for (name, raw_fn) in &raw.functions {
            let key = |k: &str| format!("functions.{name}.{k}");
            if !is_valid_function_name(name) {
                return Err(invalid(
                    &format!("functions.{name}"),
                    "a function name must match [a-z0-9]([-a-z0-9]*[a-z0-9])? and be at most 63 characters".into(),
                ));
            }
            let f = merge(raw_fn, &defaults);
            let provider = match f.provider.as_deref() {
                Some("process") => {
                    let command = f.command.clone().unwrap_or_default();
                    if command.is_empty() || command[0].trim().is_empty() {
                        return Err(invalid(
                            &key("command"),
                            "provider \"process\" needs a command, e.g. command = [\"python3\", \"fn.py\"]".into(),
                        ));
                    }
                    if f.upstreams.is_some() {
                        return Err(invalid(
                            &key("upstreams"),
                            "only provider \"static\" takes upstreams".into(),
                        ));
                    }
                    let readiness_path = f
                        .readiness_path
                        .clone()
                        .unwrap_or_else(|| DEFAULT_READINESS_PATH.to_owned());
                    if !readiness_path.starts_with('/')
                        || readiness_path.parse::<http::uri::PathAndQuery>().is_err()
                    {
                        return Err(invalid(
                            &key("readiness_path"),
                            format!("`{readiness_path}` is not a path starting with /"),
                        ));
                    }
                    let cold = f.cold_start_timeout.map(|d| d.0).unwrap_or(DEFAULT_COLD_START_TIMEOUT);
                    ProviderConfig::Process(ProcessConfig {
                        command,
                        env: f.env.clone().unwrap_or_default(),
                        working_dir: match &f.working_dir {
                            Some(dir) => base_dir.join(dir),
                            None => base_dir.clone(),
                        },
                        readiness_path,
                        startup_timeout: positive(&key("startup_timeout"), f.startup_timeout, cold)?,
                        termination_grace: f
                            .termination_grace
                            .map(|d| d.0)
                            .unwrap_or(DEFAULT_TERMINATION_GRACE),
                    })
                }
                Some("static") => {
                    let list = f.upstreams.clone().unwrap_or_default();
                    if list.is_empty() {
                        return Err(invalid(
                            &key("upstreams"),
                            "provider \"static\" needs at least one upstream, e.g. upstreams = [\"http://127.0.0.1:9000\"]".into(),
                        ));
                    }
                    if f.command.is_some() {
                        return Err(invalid(&key("command"), "only provider \"process\" takes a command".into()));
                    }
                    let mut upstreams = Vec::with_capacity(list.len());
                    for u in &list {
                        upstreams.push(parse_upstream(u).map_err(|r| invalid(&key("upstreams"), r))?);
                    }
                    ProviderConfig::Static(StaticConfig { upstreams })
                }
                Some("kubernetes") => {
                    return Err(invalid(
                        &key("provider"),
                        "provider \"kubernetes\" is not available in this build yet; use \"process\" or \"static\"".into(),
                    ))
                }
                Some(other) => {
                    return Err(invalid(
                        &key("provider"),
                        format!("unknown provider `{other}` (expected \"process\" or \"static\")"),
                    ))
                }
                None => {
                    return Err(invalid(
                        &key("provider"),
                        "missing: set provider = \"process\" or \"static\"".into(),
                    ))
                }
            };

            let max_ongoing = f
                .max_ongoing_requests
                .unwrap_or(DEFAULT_MAX_ONGOING_REQUESTS as i64);
            if !(1..=1_000_000).contains(&max_ongoing) {
                return Err(invalid(
                    &key("max_ongoing_requests"),
                    format!("{max_ongoing} is outside 1..=1000000"),
                ));
            }
            let max_queued = match f.max_queued_requests.unwrap_or(DEFAULT_MAX_QUEUED_REQUESTS) {
                -1 => None,
                n @ 0..=10_000_000 => Some(n as u32),
                n => {
                    return Err(invalid(
                        &key("max_queued_requests"),
                        format!("{n} is not -1 (unlimited) or 0..=10000000"),
                    ))
                }
            };
            let autoscaler = resolve_autoscaler(f.autoscaler.as_ref(), &provider, &|k, r| {
                invalid(&key(&format!("autoscaler.{k}")), r)
            })?;
            let in_range = |k: &str, v: Option<i64>, default: i64, max: i64| {
                let v = v.unwrap_or(default);
                if (1..=max).contains(&v) {
                    Ok(v)
                } else {
                    Err(invalid(&key(k), format!("{v} is outside 1..={max}")))
                }
            };
            let async_max_backlog = in_range(
                "async_max_backlog",
                f.async_max_backlog,
                DEFAULT_ASYNC_MAX_BACKLOG as i64,
                100_000_000,
            )? as u64;
            let full_capacity = max_ongoing.saturating_mul(autoscaler.max_replicas as i64);
            let async_concurrency = in_range(
                "async_concurrency",
                f.async_concurrency,
                full_capacity.min(1_000_000),
                1_000_000,
            )? as u32;
            let async_max_attempts = in_range(
                "async_max_attempts",
                f.async_max_attempts,
                DEFAULT_ASYNC_MAX_ATTEMPTS as i64,
                1000,
            )? as u32;
            let async_initial_retry_wait = positive(
                &key("async_initial_retry_wait"),
                f.async_initial_retry_wait,
                DEFAULT_ASYNC_INITIAL_RETRY_WAIT,
            )?;
            let async_max_retry_wait = f
                .async_max_retry_wait
                .map(|d| d.0)
                .unwrap_or(DEFAULT_ASYNC_MAX_RETRY_WAIT.max(async_initial_retry_wait));
            if async_max_retry_wait < async_initial_retry_wait {
                return Err(invalid(
                    &key("async_max_retry_wait"),
                    format!(
                        "{async_max_retry_wait:?} is shorter than async_initial_retry_wait ({async_initial_retry_wait:?})"
                    ),
                ));
            }

            functions.insert(
                name.clone(),
                FunctionConfig {
                    name: name.clone(),
                    provider,
                    max_ongoing_requests: max_ongoing as u32,
                    max_queued_requests: max_queued,
                    timeout: positive(&key("timeout"), f.timeout, DEFAULT_TIMEOUT)?,
                    response_idle_timeout: Some(
                        f.response_idle_timeout
                            .map_or(DEFAULT_RESPONSE_IDLE_TIMEOUT, |d| d.0),
                    )
                    .filter(|d| !d.is_zero()),
                    cold_start_timeout: positive(
                        &key("cold_start_timeout"),
                        f.cold_start_timeout,
                        DEFAULT_COLD_START_TIMEOUT,
                    )?,
                    queue_timeout: positive(
                        &key("queue_timeout"),
                        f.queue_timeout,
                        DEFAULT_QUEUE_TIMEOUT,
                    )?,
                    max_body_bytes: f.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES),
                    async_max_backlog,
                    async_concurrency,
                    async_max_attempts,
                    async_initial_retry_wait,
                    async_max_retry_wait,
                    autoscaler,
                },
            );
        }

        Ok(Config {
            path: path.to_owned(),
            gateway,
            functions,
        })
    }

    /// The effective per-function settings, as `sluicegate check-config` prints them.
    pub fn describe(&self) -> String {
        use std::fmt::Write;
        let g = &self.gateway;
        let mut out = String::new();
        let _ = writeln!(out, "{}: ok", self.path.display());
        let _ = writeln!(
            out,
            "[gateway] listen = {}, worker_threads = {}, header_read_timeout = {:?}, max_header_bytes = {}, idle_timeout = {:?}, drain_timeout = {:?}, admin_token = {}, async_store = {}",
            g.listen,
            match g.worker_threads {
                0 => "one per CPU".to_owned(),
                n => n.to_string(),
            },
            g.header_read_timeout,
            g.max_header_bytes,
            g.idle_timeout,
            g.drain_timeout,
            if g.admin_token.is_some() { "set" } else { "not set" },
            g.async_store.display()
        );
        for f in self.functions.values() {
            let _ = writeln!(out, "\n[functions.{}]", f.name);
            match &f.provider {
                ProviderConfig::Process(p) => {
                    let _ = writeln!(out, "  provider             = process");
                    let _ = writeln!(out, "  command              = {:?}", p.command);
                    let _ = writeln!(out, "  working_dir          = {}", p.working_dir.display());
                    if !p.env.is_empty() {
                        let _ = writeln!(out, "  env                  = {:?}", p.env);
                    }
                    let _ = writeln!(out, "  readiness_path       = {}", p.readiness_path);
                    let _ = writeln!(out, "  startup_timeout      = {:?}", p.startup_timeout);
                    let _ = writeln!(out, "  termination_grace    = {:?}", p.termination_grace);
                }
                ProviderConfig::Static(s) => {
                    let list: Vec<String> = s.upstreams.iter().map(ToString::to_string).collect();
                    let _ = writeln!(out, "  provider             = static");
                    let _ = writeln!(out, "  upstreams            = {list:?}");
                }
            }
            let queued = match f.max_queued_requests {
                Some(n) => n.to_string(),
                None => "unlimited".into(),
            };
            let body = match f.max_body_bytes {
                0 => "unlimited".to_owned(),
                n => n.to_string(),
            };
            let _ = writeln!(
                out,
                "  max_ongoing_requests = {} per replica",
                f.max_ongoing_requests
            );
            let _ = writeln!(out, "  max_queued_requests  = {queued}");
            let _ = writeln!(out, "  timeout              = {:?}", f.timeout);
            let _ = writeln!(
                out,
                "  response_idle_timeout = {}",
                f.response_idle_timeout
                    .map_or("none".to_owned(), |d| format!("{d:?}"))
            );
            let _ = writeln!(out, "  cold_start_timeout   = {:?}", f.cold_start_timeout);
            let _ = writeln!(out, "  queue_timeout        = {:?}", f.queue_timeout);
            let _ = writeln!(out, "  max_body_bytes       = {body}");
            let _ = writeln!(
                out,
                "  async                = max_backlog = {}, concurrency = {}, max_attempts = {}, retry wait {:?} doubling to {:?}, max body {} bytes",
                f.async_max_backlog,
                f.async_concurrency,
                f.async_max_attempts,
                f.async_initial_retry_wait,
                f.async_max_retry_wait,
                f.async_max_body_bytes()
            );
            let a = &f.autoscaler;
            let target = match a.mode {
                ScaleMode::Rps { threshold } => format!(", threshold = {threshold}"),
                ScaleMode::Concurrency {
                    target_ongoing_requests,
                } => {
                    format!(", target_ongoing_requests = {target_ongoing_requests}")
                }
                ScaleMode::Queue { queue_length } => format!(", queue_length = {queue_length}"),
                ScaleMode::None => String::new(),
            };
            let _ = writeln!(
                out,
                "  autoscaler           = type = {}{target}, replicas {}..={}, rate_seconds = {:?}, polling_interval = {:?}, cooldown_period = {:?}",
                a.mode.name(),
                a.min_replicas,
                a.max_replicas,
                a.window,
                a.polling_interval,
                a.cooldown_period
            );
        }
        out
    }
}

fn parse_upstream(text: &str) -> Result<Upstream, String> {
    let uri: http::Uri = text
        .parse()
        .map_err(|_| format!("`{text}` is not a URL like \"http://127.0.0.1:9000\""))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(format!(
                "`{text}`: scheme `{other}` is not supported (only http)"
            ))
        }
        None => return Err(format!("`{text}` needs a scheme, e.g. \"http://{text}\"")),
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("`{text}` has no host"))?;
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(format!(
            "`{text}`: an upstream is scheme://host:port only; a path prefix is not supported"
        ));
    }
    Ok(Upstream::http(authority))
}

type InvalidFn<'a> = dyn Fn(&str, String) -> ConfigError + 'a;

fn resolve_autoscaler(
    raw: Option<&RawAutoscaler>,
    provider: &ProviderConfig,
    invalid: &InvalidFn<'_>,
) -> Result<AutoscalerConfig, ConfigError> {
    let empty = RawAutoscaler::default();
    let a = raw.unwrap_or(&empty);
    let is_static = matches!(provider, ProviderConfig::Static(_));
    let kind = a
        .kind
        .clone()
        .unwrap_or_else(|| if is_static { "none" } else { "rps" }.to_owned());
    let positive_f = |k: &str, v: Option<f64>, default: f64| {
        let v = v.unwrap_or(default);
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(invalid(k, format!("{v} must be greater than zero")))
        }
    };
    let mode = match kind.as_str() {
        "rps" => ScaleMode::Rps {
            threshold: positive_f("threshold", a.threshold, DEFAULT_THRESHOLD)?,
        },
        "concurrency" => ScaleMode::Concurrency {
            target_ongoing_requests: positive_f(
                "target_ongoing_requests",
                a.target_ongoing_requests,
                DEFAULT_TARGET_ONGOING_REQUESTS,
            )?,
        },
        "queue" => ScaleMode::Queue {
            queue_length: positive_f("queue_length", a.queue_length, DEFAULT_QUEUE_LENGTH)?,
        },
        "none" => ScaleMode::None,
        other => {
            return Err(invalid(
                "type",
                format!("unknown type `{other}` (expected rps, concurrency, queue or none)"),
            ))
        }
    };
    let count = |k: &str, v: Option<i64>, default: u32| -> Result<u32, ConfigError> {
        let v = v.unwrap_or(default as i64);
        u32::try_from(v)
            .ok()
            .filter(|&n| n <= 10_000)
            .ok_or_else(|| invalid(k, format!("{v} is outside 0..=10000")))
    };
    let (min_default, max_default) = match provider {
        ProviderConfig::Static(s) => (s.upstreams.len() as u32, s.upstreams.len() as u32),
        ProviderConfig::Process(_) => (DEFAULT_MIN_REPLICAS, DEFAULT_MAX_REPLICAS),
    };
    let min_replicas = count("min_replicas", a.min_replicas, min_default)?;
    let max_replicas = count(
        "max_replicas",
        a.max_replicas,
        max_default.max(min_replicas),
    )?;
    if max_replicas < min_replicas {
        return Err(invalid(
            "max_replicas",
            format!("{max_replicas} is less than min_replicas ({min_replicas})"),
        ));
    }
    if max_replicas == 0 {
        return Err(invalid("max_replicas", "must be at least 1".into()));
    }
    if is_static
        && (mode != ScaleMode::None || a.min_replicas.is_some() || a.max_replicas.is_some())
    {
        return Err(invalid(
            "type",
            "a static function has a fixed set of upstreams and cannot be autoscaled; remove its [autoscaler] table".into(),
        ));
    }
    let dur = |k: &str, v: Option<Dur>, default: Duration| {
        let v = v.map(|d| d.0).unwrap_or(default);
        if v < Duration::from_millis(10) {
            Err(invalid(k, format!("{v:?} is shorter than 10ms")))
        } else {
            Ok(v)
        }
    };
    Ok(AutoscalerConfig {
        mode,
        min_replicas,
        max_replicas,
        window: dur("rate_seconds", a.rate_seconds, DEFAULT_RATE_SECONDS)?,
        polling_interval: dur(
            "polling_interval",
            a.polling_interval,
            DEFAULT_POLLING_INTERVAL,
        )?,
        cooldown_period: a
            .cooldown_period
            .map(|d| d.0)
            .unwrap_or(DEFAULT_COOLDOWN_PERIOD),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("config/test.toml"), text, None)
    }

    #[test]
    fn durations_accept_seconds_and_strings() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn the_design_example_parses_with_defaults_applied() {
        let cfg = parse(
            r#"
            [gateway]
            listen = "127.0.0.1:8080"
            cold_start_timeout = "30s"
            max_body_bytes = 10485760

            [defaults]
            max_ongoing_requests = 5
            max_queued_requests = 100
            timeout = "60s"

            [functions.echo]
            provider = "process"
            command = ["python3", "fn/echo.py"]
            readiness_path = "/healthz"
            max_ongoing_requests = 2
            max_queued_requests = 2

            [functions.echo.autoscaler]
            type = "rps"
            min_replicas = 0
            max_replicas = 5
            threshold = 100
            rate_seconds = 30
            polling_interval = 10
            cooldown_period = 300

            [functions.legacy]
            provider = "static"
            upstreams = ["http://127.0.0.1:9000"]
            "#,
        )
        .unwrap();
        let echo = &cfg.functions["echo"];
        assert_eq!(echo.max_ongoing_requests, 2);
        assert_eq!(echo.max_queued_requests, Some(2));
        assert_eq!(echo.timeout, Duration::from_secs(60));
        assert_eq!(echo.cold_start_timeout, Duration::from_secs(30));
        assert_eq!(echo.autoscaler.min_replicas, 0);
        assert_eq!(echo.autoscaler.polling_interval, Duration::from_secs(10));
        assert_eq!(echo.autoscaler.mode, ScaleMode::Rps { threshold: 100.0 });
        match &echo.provider {
            ProviderConfig::Process(p) => {
                assert_eq!(p.working_dir, PathBuf::from("config"));
                assert_eq!(p.readiness_path, "/healthz");
            }
            other => panic!("unexpected provider {other:?}"),
        }
        let legacy = &cfg.functions["legacy"];
        assert_eq!(legacy.max_ongoing_requests, 5, "[defaults] applies");
        assert_eq!(legacy.autoscaler.mode, ScaleMode::None);
        assert_eq!(
            legacy.response_idle_timeout,
            Some(DEFAULT_RESPONSE_IDLE_TIMEOUT)
        );
    }

    #[test]
    fn response_idle_timeout_zero_means_never() {
        let cfg = parse(
            "[defaults]\nresponse_idle_timeout = \"2s\"\n[functions.a]\nprovider = \"static\"\nupstreams = [\"http://127.0.0.1:1\"]\n[functions.b]\nprovider = \"static\"\nupstreams = [\"http://127.0.0.1:1\"]\nresponse_idle_timeout = 0\n",
        )
        .unwrap();
        assert_eq!(
            cfg.functions["a"].response_idle_timeout,
            Some(Duration::from_secs(2))
        );
        assert_eq!(cfg.functions["b"].response_idle_timeout, None);
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let err = parse(
            "[functions.echo]\nprovider = \"static\"\nupstreams = [\"http://127.0.0.1:1\"]\nmax_ongoing_request = 3\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("config/test.toml"), "{err}");
        assert!(err.contains("max_ongoing_request"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_key_and_reason() {
        let err = parse(
            "[functions.echo]\nprovider = \"process\"\ncommand = [\"x\"]\n[functions.echo.autoscaler]\nmin_replicas = 3\nmax_replicas = 2\n",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "config/test.toml: functions.echo.autoscaler.max_replicas: 2 is less than min_replicas (3)"
        );
        let err = parse("[functions.Echo]\nprovider = \"static\"\nupstreams = [\"http://a:1\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("functions.Echo"), "{err}");
        let err = parse("[functions.x]\nprovider = \"static\"\nupstreams = [\"https://a:1\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("functions.x.upstreams") && err.contains("https"),
            "{err}"
        );
        let err = parse("[functions.x]\nprovider = \"static\"\nupstreams = [\"http://a:1\"]\ntimeout = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("timeout") && err.contains("soon"), "{err}");
        let err = parse("[functions.x]\ncommand = [\"a\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("functions.x.provider: missing"), "{err}");
    }

    #[test]
    fn minus_one_means_unlimited_queue() {
        let cfg = parse("[defaults]\nmax_queued_requests = -1\n[functions.x]\nprovider = \"static\"\nupstreams = [\"http://a:1\"]\n").unwrap();
        assert_eq!(cfg.functions["x"].max_queued_requests, None);
        assert!(parse("[functions.x]\nprovider = \"static\"\nupstreams = [\"http://a:1\"]\nmax_queued_requests = -2\n").is_err());
    }

    #[test]
    fn env_token_overrides_file_token() {
        let cfg = Config::parse(
            Path::new("x.toml"),
            "[gateway]\nadmin_token = \"file\"\n",
            Some("env".into()),
        )
        .unwrap();
        assert_eq!(cfg.gateway.admin_token.as_deref(), Some("env"));
    }

    #[test]
    fn async_keys_have_defaults_merge_from_defaults_and_are_validated() {
        let cfg = parse(
            "[defaults]\nasync_max_attempts = 7\n[functions.x]\nprovider = \"process\"\ncommand = [\"x\"]\nmax_ongoing_requests = 3\n[functions.x.autoscaler]\nmax_replicas = 4\n",
        )
        .unwrap();
        let x = &cfg.functions["x"];
        assert_eq!(x.async_max_backlog, DEFAULT_ASYNC_MAX_BACKLOG);
        assert_eq!(
            x.async_concurrency, 12,
            "max_ongoing_requests x max_replicas"
        );
        assert_eq!(x.async_max_attempts, 7, "[defaults] applies");
        assert_eq!(x.async_initial_retry_wait, Duration::from_secs(1));
        assert_eq!(x.async_max_retry_wait, Duration::from_secs(60));
        assert_eq!(x.async_max_body_bytes(), DEFAULT_MAX_BODY_BYTES);
        assert_eq!(
            cfg.gateway.async_store,
            PathBuf::from("config/test.async.redb")
        );

        let f = "[functions.x]\nprovider = \"static\"\nupstreams = [\"http://a:1\"]\n";
        let err = parse(&format!("{f}async_max_backlog = 0\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("functions.x.async_max_backlog: 0 is outside"),
            "{err}"
        );
        let err = parse(&format!("{f}async_concurrency = -1\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("functions.x.async_concurrency"), "{err}");
        let err = parse(&format!(
            "{f}async_initial_retry_wait = \"10s\"\nasync_max_retry_wait = \"1s\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("async_max_retry_wait: 1s is shorter"), "{err}");
        let cfg = parse(&format!(
            "[gateway]\nasync_store = \"state/q.redb\"\n{f}max_body_bytes = 0\n"
        ))
        .unwrap();
        assert_eq!(
            cfg.gateway.async_store,
            PathBuf::from("config/state/q.redb")
        );
        assert_eq!(
            cfg.functions["x"].async_max_body_bytes(),
            ASYNC_BODY_CEILING
        );
        assert!(parse("[gateway]\nasync_store = \"\"\n").is_err());
    }

    #[test]
    fn queue_mode_is_accepted_with_its_queue_length() {
        let cfg = parse(
            "[functions.x]\nprovider = \"process\"\ncommand = [\"x\"]\n[functions.x.autoscaler]\ntype = \"queue\"\nqueue_length = 4\n",
        )
        .unwrap();
        assert_eq!(
            cfg.functions["x"].autoscaler.mode,
            ScaleMode::Queue { queue_length: 4.0 }
        );
        assert!(cfg.describe().contains("type = queue, queue_length = 4"));
    }

    #[test]
    fn function_names_follow_dns_labels() {
        assert!(is_valid_function_name("echo"));
        assert!(is_valid_function_name("a-1"));
        assert!(!is_valid_function_name("-a"));
        assert!(!is_valid_function_name("a-"));
        assert!(!is_valid_function_name("A"));
        assert!(!is_valid_function_name(""));
        assert!(!is_valid_function_name(&"a".repeat(64)));
    }
}
