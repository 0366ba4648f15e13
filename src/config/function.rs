//! `[functions.NAME]` and `[defaults]`: the keys every function has, whatever its provider, and
//! how one function's table is resolved (provider, then autoscaler, then these keys).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use serde::de::MapAccess;
use serde::{Deserialize, Deserializer};

use super::autoscaler::{self, AutoscalerConfig, RawAutoscaler};
use super::duration::Dur;
use super::provider::{self, ProviderConfig, RawProvider};
use super::table::{self, count, given, positive, table, At, Merge, Table};
use super::{line, ConfigError};

/// Longest a request is held waiting for a function's first ready replica.
pub const DEFAULT_COLD_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a request waits in a function's queue while the function has ready replicas.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a replica that just turned ready takes to reach `max_ongoing_requests` (HAProxy's
/// `slowstart`): small function servers (a listen backlog of 5) drop connections opened all at once.
pub const DEFAULT_SLOW_START: Duration = Duration::from_secs(2);
/// Largest request body accepted, in bytes (10 MiB).
pub const DEFAULT_MAX_BODY_BYTES: u64 = 10 * 1024 * 1024;
/// Requests in flight per replica (Ray Serve's default).
pub const DEFAULT_MAX_ONGOING_REQUESTS: u32 = 5;
/// Requests waiting per function. Bounded by default: an unbounded queue is how peers run out of memory.
pub const DEFAULT_MAX_QUEUED_REQUESTS: i64 = 100;
/// Upstream timeout: how long a replica has to start its response (OpenFaaS's default).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest silence inside a response body before it is aborted. nginx's `proxy_read_timeout` is
/// 60 s; long enough here for event streams with the usual 15-30 s heartbeats.
pub const DEFAULT_RESPONSE_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
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

table! {
    /// The keys of `[functions.NAME]` (and `[defaults]`) that every function has, as written.
    struct RawFunctionKeys;

    /// One function, with defaults applied.
    #[derive(Clone, Debug, PartialEq)]
    pub struct FunctionConfig {
        /// The function's name, as in `/function/{name}`.
        pub name: String,
        /// Where its replicas come from.
        pub provider: ProviderConfig,
        /// How the autoscaler treats this function.
        pub autoscaler: AutoscalerConfig,
    }

    keys {
        max_ongoing_requests: i64 => {
            /// Requests in flight per ready replica. Never 0.
            pub max_ongoing_requests: u32 = count(
                max_ongoing_requests,
                DEFAULT_MAX_ONGOING_REQUESTS.into(),
                1..=1_000_000,
            ),
        },
        max_queued_requests: i64 => {
            /// Requests waiting per function; `None` is unlimited (`-1` in the file).
            pub max_queued_requests: Option<u32> = queue_bound(max_queued_requests),
        },
        timeout: Dur => {
            /// Time a replica has to start its response before the client gets `504`.
            pub timeout: Duration = positive(timeout, DEFAULT_TIMEOUT),
        },
        response_idle_timeout: Dur => {
            /// Longest a replica may send nothing in the middle of a response body before the
            /// response is aborted and its slot freed; `None` (`0` in the file) never.
            pub response_idle_timeout: Option<Duration> =
                zero_is_never(response_idle_timeout, DEFAULT_RESPONSE_IDLE_TIMEOUT),
        },
        cold_start_timeout: Dur => {
            /// Longest a request is held waiting for the function's first ready replica (then
            /// `503`).
            pub cold_start_timeout: Duration =
                positive(cold_start_timeout, DEFAULT_COLD_START_TIMEOUT),
        },
        queue_timeout: Dur => {
            /// Longest a request waits in the queue while the function has ready replicas (then
            /// `503`).
            pub queue_timeout: Duration = positive(queue_timeout, DEFAULT_QUEUE_TIMEOUT),
        },
        slow_start: Dur => {
            /// Time over which a replica that just turned ready (on a scaling provider) is given
            /// more requests at once: from a few to `max_ongoing_requests`, faster as its responses
            /// come back; requests beyond stay queued. `None` (`0` in the file) gives it all at once.
            pub slow_start: Option<Duration> = zero_is_never(slow_start, DEFAULT_SLOW_START),
        },
        max_body_bytes: u64 => {
            /// Largest request body in bytes; `0` is unlimited (async bodies then stop at
            /// [`ASYNC_BODY_CEILING`]).
            pub max_body_bytes: u64 = given(max_body_bytes, DEFAULT_MAX_BODY_BYTES),
        },
        async_max_backlog: i64 => {
            /// Async invocations accepted and not yet finished (waiting, in flight, retrying,
            /// delivering their callback) beyond which new ones get `503`. At least 1.
            pub async_max_backlog: u64 =
                count(async_max_backlog, DEFAULT_ASYNC_MAX_BACKLOG as i64, 1..=100_000_000),
        },
        async_concurrency: i64 => {
            /// Async invocations in flight to the function at once (holding or awaiting a
            /// replica slot). Default `max_ongoing_requests × max_replicas`, the function's
            /// capacity at full scale. At least 1.
            pub async_concurrency: u32 = count(
                async_concurrency,
                full_capacity(max_ongoing_requests, &autoscaler),
                1..=1_000_000,
            ),
        },
        async_max_attempts: i64 => {
            /// Attempts per async invocation, the first included, before it is dead-lettered.
            /// At least 1.
            pub async_max_attempts: u32 =
                count(async_max_attempts, DEFAULT_ASYNC_MAX_ATTEMPTS.into(), 1..=1000),
        },
        async_initial_retry_wait: Dur => {
            /// Wait before the first retry of an async invocation; doubles with each retry.
            pub async_initial_retry_wait: Duration =
                positive(async_initial_retry_wait, DEFAULT_ASYNC_INITIAL_RETRY_WAIT),
        },
        async_max_retry_wait: Dur => {
            /// Longest wait between two attempts (the doubling stops there; a longer
            /// `Retry-After` from the function is still honoured, up to an hour).
            pub async_max_retry_wait: Duration =
                longest_retry_wait(async_max_retry_wait, async_initial_retry_wait),
        },
        when_paused: String => {
            /// What a sync request gets while the function is paused (admin API): `refuse`
            /// (`503 paused` at once) or `hold` (waits for the resume, as for a cold start:
            /// within `max_queued_requests` and `cold_start_timeout`).
            pub when_paused: WhenPaused = when_paused_rule(when_paused),
        },
        auth: String => {
            /// Who may invoke the function: `none` (anyone who reaches the gateway) or `token`
            /// (a service token created through the admin API, on every sync and async call).
            pub auth: Auth = auth_rule(auth),
        },
        token_query_param: String => {
            /// With `auth = "token"`: a query parameter that may carry the token instead of
            /// `Authorization: Bearer` (removed before the replica sees the query). `None`: the
            /// header only.
            pub token_query_param: Option<String> = query_param_rule(token_query_param),
        },
    }
}

/// What a sync request gets while its function is paused (`when_paused`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WhenPaused {
    /// `503 paused` with `Retry-After` at once.
    #[default]
    Refuse,
    /// Held until the resume, within `max_queued_requests` and `cold_start_timeout`.
    Hold,
}

impl WhenPaused {
    /// Whether requests are held while paused.
    pub fn holds(self) -> bool {
        self == WhenPaused::Hold
    }

    /// The name used in the config file.
    pub fn name(self) -> &'static str {
        match self {
            WhenPaused::Refuse => "refuse",
            WhenPaused::Hold => "hold",
        }
    }
}

/// Who may invoke a function (`auth`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Auth {
    /// Anyone who reaches the gateway.
    #[default]
    None,
    /// A caller with a valid service token of the function.
    Token,
}

impl Auth {
    /// The name used in the config file.
    pub fn name(self) -> &'static str {
        match self {
            Auth::None => "none",
            Auth::Token => "token",
        }
    }
}

fn when_paused_rule(written: Option<String>) -> Result<WhenPaused, String> {
    match written.as_deref() {
        None | Some("refuse") => Ok(WhenPaused::Refuse),
        Some("hold") => Ok(WhenPaused::Hold),
        Some(other) => Err(format!("`{other}` is not \"refuse\" or \"hold\"")),
    }
}

fn auth_rule(written: Option<String>) -> Result<Auth, String> {
    match written.as_deref() {
        None | Some("none") => Ok(Auth::None),
        Some("token") => Ok(Auth::Token),
        Some(other) => Err(format!("`{other}` is not \"none\" or \"token\"")),
    }
}

/// A query parameter name: letters, digits, `-`, `_`, `.`, `~` (nothing to percent-decode).
fn query_param_rule(written: Option<String>) -> Result<Option<String>, String> {
    match written {
        Some(p)
            if p.is_empty()
                || !p.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~')
                }) =>
        {
            Err(format!(
                "`{p}` is not a query parameter name (letters, digits, -, _, ., ~)"
            ))
        }
        other => Ok(other),
    }
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

    /// Appends this function's `check-config` section.
    pub(super) fn describe(&self, out: &mut String) {
        let _ = writeln!(out, "\n[functions.{}]", self.name);
        self.provider.describe(out);
        let max_ongoing = self.max_ongoing_requests;
        line(
            out,
            "max_ongoing_requests",
            format!("{max_ongoing} per replica"),
        );
        line(
            out,
            "max_queued_requests",
            unlimited(self.max_queued_requests),
        );
        line(out, "timeout", format!("{:?}", self.timeout));
        let idle = self.response_idle_timeout;
        line(
            out,
            "response_idle_timeout",
            idle.map_or("none".into(), |d| format!("{d:?}")),
        );
        line(
            out,
            "cold_start_timeout",
            format!("{:?}", self.cold_start_timeout),
        );
        line(out, "queue_timeout", format!("{:?}", self.queue_timeout));
        let slow = self.slow_start;
        line(
            out,
            "slow_start",
            slow.map_or("off".into(), |d| format!("{d:?}")),
        );
        let body = Some(self.max_body_bytes).filter(|&n| n != 0);
        line(out, "max_body_bytes", unlimited(body));
        line(
            out,
            "async",
            format!(
                "max_backlog = {}, concurrency = {}, max_attempts = {}, retry wait {:?} doubling to {:?}, max body {} bytes",
                self.async_max_backlog,
                self.async_concurrency,
                self.async_max_attempts,
                self.async_initial_retry_wait,
                self.async_max_retry_wait,
                self.async_max_body_bytes()
            ),
        );
        line(out, "when_paused", self.when_paused.name());
        match (self.auth, &self.token_query_param) {
            (Auth::Token, Some(param)) => line(
                out,
                "auth",
                format!("token (Authorization: Bearer, or ?{param}=)"),
            ),
            (Auth::Token, None) => line(out, "auth", "token (Authorization: Bearer)"),
            (Auth::None, _) => line(out, "auth", "none"),
        }
        self.autoscaler.describe(out);
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

/// `[functions.NAME]` (and `[defaults]`) as written: `provider` and every provider's keys, the
/// keys every function has, and the `autoscaler` sub-table.
#[derive(Clone, Debug, Default)]
pub(super) struct RawFunction {
    pub(super) provider: RawProvider,
    pub(super) keys: RawFunctionKeys,
    pub(super) autoscaler: Option<RawAutoscaler>,
}

impl Merge for RawFunction {
    fn over(self, under: Self) -> Self {
        RawFunction {
            provider: self.provider.over(under.provider),
            keys: self.keys.over(under.keys),
            autoscaler: self.autoscaler.over(under.autoscaler),
        }
    }
}

impl Table for RawFunction {
    fn keys() -> &'static [&'static str] {
        static KEYS: OnceLock<Vec<&str>> = OnceLock::new();
        KEYS.get_or_init(|| {
            [
                RawProvider::keys(),
                RawFunctionKeys::keys(),
                &["autoscaler"],
            ]
            .concat()
        })
    }

    fn read<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
        if key == "autoscaler" {
            self.autoscaler = Some(map.next_value()?);
            return Ok(true);
        }
        Ok(self.provider.read(key, map)? || self.keys.read(key, map)?)
    }
}

impl<'de> Deserialize<'de> for RawFunction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        table::deserialize(d, "RawFunction")
    }
}

/// Resolves function `name` from its table with `[defaults]` applied. `base_dir` is the config
/// file's directory.
pub(super) fn resolve(
    name: &str,
    raw: RawFunction,
    path: &Path,
    base_dir: &Path,
) -> Result<FunctionConfig, ConfigError> {
    if !is_valid_function_name(name) {
        return Err(At::new(path, "functions.".into()).invalid(
            name,
            "a function name must match [a-z0-9]([-a-z0-9]*[a-z0-9])? and be at most 63 characters",
        ));
    }
    let at = At::new(path, format!("functions.{name}."));
    // A process replica's startup_timeout defaults to the cold start timeout as written.
    let cold_start = raw.keys.cold_start_timeout;
    let cold_start = cold_start.map_or(DEFAULT_COLD_START_TIMEOUT, Duration::from);
    let provider = provider::resolve(raw.provider, name, &at, base_dir, cold_start)?;
    let autoscaler = autoscaler::resolve(raw.autoscaler, &provider, &at.table("autoscaler"))?;
    FunctionConfig::resolve(raw.keys, &at, name.to_owned(), provider, autoscaler)
}

/// `-1` is unlimited.
fn queue_bound(written: Option<i64>) -> Result<Option<u32>, String> {
    match written.unwrap_or(DEFAULT_MAX_QUEUED_REQUESTS) {
        -1 => Ok(None),
        n @ 0..=10_000_000 => Ok(Some(n as u32)),
        n => Err(format!("{n} is not -1 (unlimited) or 0..=10000000")),
    }
}

/// `0` is never.
fn zero_is_never(written: Option<Dur>, default: Duration) -> Result<Option<Duration>, String> {
    Ok(Some(written.map_or(default, Duration::from)).filter(|d| !d.is_zero()))
}

/// `max_ongoing_requests × max_replicas`, within the bound of `async_concurrency`.
fn full_capacity(max_ongoing_requests: u32, autoscaler: &AutoscalerConfig) -> i64 {
    let capacity = i64::from(max_ongoing_requests) * i64::from(autoscaler.max_replicas);
    capacity.min(1_000_000)
}

/// At least `initial`, the first retry's wait.
fn longest_retry_wait(written: Option<Dur>, initial: Duration) -> Result<Duration, String> {
    let longest = written.map_or(DEFAULT_ASYNC_MAX_RETRY_WAIT.max(initial), Duration::from);
    if longest < initial {
        return Err(format!(
            "{longest:?} is shorter than async_initial_retry_wait ({initial:?})"
        ));
    }
    Ok(longest)
}

fn unlimited(n: Option<impl ToString>) -> String {
    n.map_or("unlimited".into(), |n| n.to_string())
}
