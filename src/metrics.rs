//! Prometheus metrics: one struct owning a non-global `Registry`, and per-function handles.
//!
//! Names are part of the external contract. The OpenFaaS-compatible series keep their OpenFaaS
//! names and labels (`function_name`, `code`) so existing dashboards and alert rules work; our own
//! series are prefixed `sluicegate_`. Series exist only for configured functions: a request for an
//! unknown name increments one unlabelled counter and creates nothing.
//!
//! The gauges here are not copies: admission control increments and decrements `ongoing` and
//! `queued` directly, and the autoscaler reads them, so `/metrics` and the scaling loop see the
//! same figures.
//!
//! Per-function series cost what the function does: each is a bare atomic (no prometheus child,
//! no label strings), histograms and per-status-code series are allocated on first use, and the
//! exposition is written straight from the atomics. A function that was never invoked shows only
//! `gateway_service_count` and `sluicegate_function_desired_replicas` (README §Metrics); once it
//! has seen a request, a ready replica or an async backlog it shows its whole fixed set.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use prometheus::{Encoder, IntCounter, Registry, TextEncoder};

/// Latency buckets for `gateway_functions_seconds`, in seconds: Prometheus' defaults plus the
/// long tail that function timeouts allow.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Buckets for `sluicegate_cold_start_seconds`.
const COLD_START_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Why the gateway answered a request for a known function itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// `max_queued_requests` reached.
    QueueFull,
    /// Waited in the queue longer than `queue_timeout`.
    QueueTimeout,
    /// No replica became ready within `cold_start_timeout`.
    ColdStartTimeout,
    /// The function's replicas fail to start.
    StartFailed,
    /// The gateway is shutting down.
    Draining,
    /// The request body was larger than `max_body_bytes`.
    BodyTooLarge,
    /// An async invocation refused: `async_max_backlog` reached.
    AsyncBacklogFull,
    /// An async invocation refused: the async store could not be opened or written.
    AsyncStoreUnavailable,
    /// The function is paused (admin API), or a request held while it was paused waited too long.
    Paused,
}

impl RejectReason {
    /// Every reason, in label order.
    pub const ALL: [RejectReason; 9] = [
        RejectReason::QueueFull,
        RejectReason::QueueTimeout,
        RejectReason::ColdStartTimeout,
        RejectReason::StartFailed,
        RejectReason::Draining,
        RejectReason::BodyTooLarge,
        RejectReason::AsyncBacklogFull,
        RejectReason::AsyncStoreUnavailable,
        RejectReason::Paused,
    ];

    /// The `reason` label value.
    pub fn label(self) -> &'static str {
        match self {
            RejectReason::QueueFull => "queue_full",
            RejectReason::QueueTimeout => "queue_timeout",
            RejectReason::ColdStartTimeout => "cold_start_timeout",
            RejectReason::StartFailed => "start_failed",
            RejectReason::Draining => "draining",
            RejectReason::BodyTooLarge => "body_too_large",
            RejectReason::AsyncBacklogFull => "async_backlog_full",
            RejectReason::AsyncStoreUnavailable => "async_store_unavailable",
            RejectReason::Paused => "paused",
        }
    }
}

/// What became of an async invocation (the `outcome` label of
/// `sluicegate_async_invocations_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AsyncOutcome {
    /// Stored and answered `202`.
    Accepted,
    /// The function answered 1xx-3xx (final).
    Succeeded,
    /// The function answered a status that is not retried (4xx other than 408/429, 501, ...), or
    /// the gateway could not forward it in a way a retry would fix (final).
    Failed,
    /// An attempt failed in a way that is retried (408, 429, 500, 502, 503, 504); counted once per
    /// retry scheduled.
    Retried,
    /// Out of attempts: kept in the dead-letter table (final).
    DeadLettered,
    /// Refused at accept time (`400`, `413`, `503`): nothing stored.
    Rejected,
}

impl AsyncOutcome {
    /// Every outcome, in label order.
    pub const ALL: [AsyncOutcome; 6] = [
        AsyncOutcome::Accepted,
        AsyncOutcome::Succeeded,
        AsyncOutcome::Failed,
        AsyncOutcome::Retried,
        AsyncOutcome::DeadLettered,
        AsyncOutcome::Rejected,
    ];

    /// The `outcome` label value.
    pub fn label(self) -> &'static str {
        match self {
            AsyncOutcome::Accepted => "accepted",
            AsyncOutcome::Succeeded => "succeeded",
            AsyncOutcome::Failed => "failed",
            AsyncOutcome::Retried => "retried",
            AsyncOutcome::DeadLettered => "dead_lettered",
            AsyncOutcome::Rejected => "rejected",
        }
    }
}

/// What became of one callback delivery attempt (the `result` label of
/// `sluicegate_async_callbacks_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallbackResult {
    /// The receiver answered 2xx.
    Delivered,
    /// The attempt failed and another one is scheduled.
    Retried,
    /// Given up: out of attempts, or the receiver answered a status that is not retried.
    Failed,
}

impl CallbackResult {
    /// Every result, in label order.
    pub const ALL: [CallbackResult; 3] = [
        CallbackResult::Delivered,
        CallbackResult::Retried,
        CallbackResult::Failed,
    ];

    /// The `result` label value.
    pub fn label(self) -> &'static str {
        match self {
            CallbackResult::Delivered => "delivered",
            CallbackResult::Retried => "retried",
            CallbackResult::Failed => "failed",
        }
    }
}

/// The direction of a scaling decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// More replicas.
    Up,
    /// Fewer replicas.
    Down,
}

/// A monotonic counter: one atomic.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds one, ordered with every other `SeqCst` operation (see `Function::arrived`).
    pub fn inc_ordered(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    /// The count so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// The count so far, ordered with every other `SeqCst` operation.
    pub fn get_ordered(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A gauge: one atomic.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Subtracts one.
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    /// Subtracts `n`.
    pub fn sub(&self, n: i64) {
        self.0.fetch_sub(n, Ordering::Relaxed);
    }

    /// Sets the value.
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// The value now.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A histogram with fixed bucket bounds: an atomic per bucket, the sum and the count.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Box<[AtomicU64]>,
    sum_bits: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_bits: AtomicU64::new(0f64.to_bits()),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        let mut current = self.sum_bits.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(current) + v).to_bits();
            match self.sum_bits.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(seen) => current = seen,
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn get_sample_count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Sum of the observations so far.
    pub fn get_sample_sum(&self) -> f64 {
        f64::from_bits(self.sum_bits.load(Ordering::Relaxed))
    }

    /// Writes `{name}_bucket…`, `_sum` and `_count` lines; `labels` is `k="v",…` without braces.
    fn encode(&self, out: &mut Vec<u8>, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds.iter().zip(self.buckets.iter()) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let count = self.get_sample_count();
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.get_sample_sum());
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// Every metric family the gateway exports.
pub struct Metrics {
    registry: Registry,
    /// Every live function's series, by name (the exposition's order).
    functions: Mutex<BTreeMap<Box<str>, Weak<FunctionMetrics>>>,
    unknown_function: IntCounter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The per-function families, in exposition order: name, type, help.
const FAMILIES: [(&str, &str, &str); 15] = [
    ("gateway_function_invocation_total", "counter", "Function invocations, by function and status code (including the gateway's own errors)."),
    ("gateway_functions_seconds", "histogram", "Time from request arrival to response headers, cold-start and queue wait included."),
    // The two OpenFaaS names that break the naming rules of their types (a counter without
    // `_total`, a gauge ending in `_count`) are exported as `untyped`: the names stay (PromQL and
    // dashboards only see names), and `promtool check metrics` stays clean.
    ("gateway_function_invocation_started", "untyped", "Function invocations that arrived at the gateway."),
    ("gateway_service_count", "untyped", "Ready replicas of the function."),
    ("sluicegate_function_window_requests", "gauge", "Requests that arrived within the function's sliding window (rate_seconds)."),
    ("sluicegate_function_ongoing_requests", "gauge", "Requests being served by a replica of the function."),
    ("sluicegate_function_queued_requests", "gauge", "Requests waiting for a replica slot (including those held for a cold start)."),
    ("sluicegate_function_rejected_total", "counter", "Requests the gateway answered itself instead of forwarding, by reason."),
    ("sluicegate_function_cold_starts_total", "counter", "Scale-ups from zero ready replicas triggered by a request."),
    ("sluicegate_function_cold_start_seconds", "histogram", "Time from a scale-up from zero to the first ready replica."),
    ("sluicegate_function_desired_replicas", "gauge", "Replicas the gateway currently asks the provider for."),
    ("sluicegate_autoscaler_decisions_total", "counter", "Replica count changes made by the autoscaler, by direction."),
    ("sluicegate_autoscaler_burst_mode", "gauge", "1 while the function is in burst mode (short-window load at least twice its capacity)."),
    ("sluicegate_async_backlog", "gauge", "Async invocations accepted and not yet finished (waiting, in flight or waiting to be retried)."),
    ("sluicegate_async_invocations_total", "counter", "Async invocations by outcome: accepted, succeeded, failed, retried (per retry), dead_lettered, rejected (at accept time)."),
];

/// Also per function, after [`FAMILIES`].
const CALLBACKS_FAMILY: (&str, &str, &str) = (
    "sluicegate_async_callbacks_total",
    "counter",
    "Async callback delivery attempts by result: delivered, retried, failed (given up).",
);

/// Per function once it is active or has ever been paused, after [`CALLBACKS_FAMILY`].
const PAUSED_FAMILY: (&str, &str, &str) = (
    "sluicegate_function_paused",
    "gauge",
    "1 while the function is paused through the admin API (POST /system/pause-function), else 0.",
);

/// Per function with `cooldown_period = "adaptive"` only, after [`PAUSED_FAMILY`].
const ADAPTIVE_FAMILIES: [(&str, &str, &str); 3] = [
    ("sluicegate_function_keep_alive_seconds", "gauge", "cooldown_period = \"adaptive\": idle time after which the function goes to zero, as learned now."),
    ("sluicegate_function_prewarm_seconds", "gauge", "cooldown_period = \"adaptive\": idle time after which one replica is started again before the predicted next request (0: no pre-warm)."),
    ("sluicegate_function_prewarms_total", "counter", "cooldown_period = \"adaptive\": pre-warms by result: started, used (a request came while it was up), wasted (it went unused)."),
];

/// What became of a pre-warm (the `result` label of `sluicegate_function_prewarms_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrewarmResult {
    /// One replica started before the predicted next request.
    Started,
    /// A request arrived while it was up.
    Used,
    /// It went unused.
    Wasted,
}

impl PrewarmResult {
    /// Every result, in label order.
    pub const ALL: [PrewarmResult; 3] = [
        PrewarmResult::Started,
        PrewarmResult::Used,
        PrewarmResult::Wasted,
    ];

    /// The `result` label value.
    pub fn label(self) -> &'static str {
        match self {
            PrewarmResult::Started => "started",
            PrewarmResult::Used => "used",
            PrewarmResult::Wasted => "wasted",
        }
    }
}

impl Metrics {
    /// Creates the registry and its global series.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let unknown_function = IntCounter::new(
            "sluicegate_unknown_function_requests_total",
            "Requests for function names that are not configured (no per-name series by design).",
        )
        .unwrap();
        registry
            .register(Box::new(unknown_function.clone()))
            .expect("metric names are unique and valid");
        Metrics {
            registry,
            functions: Mutex::new(BTreeMap::new()),
            unknown_function,
        }
    }

    /// A function's series, exported for as long as a returned handle lives. Asked again for a
    /// name whose series are alive (a function replaced while requests still hold the old one),
    /// it returns the same series, as a prometheus vector returns the same child.
    pub fn function(&self, name: &str) -> Arc<FunctionMetrics> {
        let mut all = self.functions.lock().unwrap();
        if let Some(live) = all.get(name).and_then(Weak::upgrade) {
            return live;
        }
        let f = Arc::new(FunctionMetrics {
            name: name.into(),
            started: Counter::default(),
            ready: Gauge::default(),
            window_requests: Gauge::default(),
            ongoing: Gauge::default(),
            queued: Gauge::default(),
            rejected: Default::default(),
            cold_starts: Counter::default(),
            cold_start_seconds: OnceLock::new(),
            desired: Gauge::default(),
            scaled_up: Counter::default(),
            scaled_down: Counter::default(),
            burst_mode: Gauge::default(),
            async_backlog: Gauge::default(),
            async_outcomes: Default::default(),
            async_callbacks: Default::default(),
            adaptive: AtomicBool::new(false),
            keep_alive_ms: AtomicU64::new(0),
            prewarm_ms: AtomicU64::new(0),
            prewarms: Default::default(),
            paused: Gauge::default(),
            pause_known: AtomicBool::new(false),
            by_code: OnceLock::new(),
        });
        all.insert(name.into(), Arc::downgrade(&f));
        f
    }

    /// Counts a request for a name that is not configured.
    pub fn unknown_function(&self) {
        self.unknown_function.inc();
    }

    /// The registry of the global (unlabelled) series.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Encodes every family in the Prometheus text format, straight from the atomics.
    pub fn encode(&self) -> Vec<u8> {
        let functions: Vec<Arc<FunctionMetrics>> = {
            let mut all = self.functions.lock().unwrap();
            all.retain(|_, w| w.strong_count() > 0);
            all.values().filter_map(Weak::upgrade).collect()
        };
        let mut out = Vec::with_capacity(4096 + functions.len() * 160);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to a Vec cannot fail");
        for (index, (name, kind, help)) in FAMILIES.iter().chain([&CALLBACKS_FAMILY]).enumerate() {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for f in &functions {
                f.encode(index, name, &mut out);
            }
        }
        let (name, kind, help) = PAUSED_FAMILY;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for f in &functions {
            if f.active() || f.pause_known.load(Ordering::Relaxed) {
                let _ = writeln!(
                    out,
                    "{name}{{function_name=\"{}\"}} {}",
                    f.name,
                    f.paused.get()
                );
            }
        }
        for (index, (name, kind, help)) in ADAPTIVE_FAMILIES.iter().enumerate() {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for f in functions
                .iter()
                .filter(|f| f.adaptive.load(Ordering::Relaxed))
            {
                f.encode_adaptive(index, name, &mut out);
            }
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Status codes 100..=599 get a lazily created pair of series each.
const CODES: usize = 500;

/// One status code's series of one function.
#[derive(Debug)]
struct CodeSeries {
    count: Counter,
    latency: Histogram,
}

/// One function's series: bare atomics, exported by [`Metrics::encode`].
pub struct FunctionMetrics {
    name: Box<str>,
    /// `gateway_function_invocation_started`.
    pub started: Counter,
    /// `gateway_service_count`: ready replicas.
    pub ready: Gauge,
    /// `sluicegate_function_window_requests`, refreshed from the window at each scrape.
    pub window_requests: Gauge,
    /// `sluicegate_function_ongoing_requests`: the admission counter itself.
    pub ongoing: Gauge,
    /// `sluicegate_function_queued_requests`: the admission queue length itself.
    pub queued: Gauge,
    rejected: [Counter; RejectReason::ALL.len()],
    /// `sluicegate_function_cold_starts_total`.
    pub cold_starts: Counter,
    cold_start_seconds: OnceLock<Histogram>,
    /// `sluicegate_function_desired_replicas`.
    pub desired: Gauge,
    /// `sluicegate_autoscaler_decisions_total{direction="up"}`.
    pub scaled_up: Counter,
    /// `sluicegate_autoscaler_decisions_total{direction="down"}`.
    pub scaled_down: Counter,
    /// `sluicegate_autoscaler_burst_mode`.
    pub burst_mode: Gauge,
    /// `sluicegate_async_backlog`: async invocations accepted and not yet finished. The async
    /// queue keeps it exact (initialised from the store at start); the `queue` autoscaler reads it.
    pub async_backlog: Gauge,
    async_outcomes: [Counter; AsyncOutcome::ALL.len()],
    async_callbacks: [Counter; CallbackResult::ALL.len()],
    /// Whether the adaptive keep-alive runs for the function (its series are exported then).
    adaptive: AtomicBool,
    keep_alive_ms: AtomicU64,
    prewarm_ms: AtomicU64,
    prewarms: [Counter; PrewarmResult::ALL.len()],
    /// `sluicegate_function_paused`: 1 while paused.
    paused: Gauge,
    /// Whether the function was ever paused (its paused series is exported from then on).
    pause_known: AtomicBool,
    /// Allocated at the first finished invocation, one slot per status code.
    by_code: OnceLock<Box<[OnceLock<Box<CodeSeries>>]>>,
}

impl std::fmt::Debug for FunctionMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionMetrics")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl FunctionMetrics {
    /// Records a finished invocation (response headers sent) with its status and latency.
    pub fn observe(&self, status: u16, seconds: f64) {
        let series = self.code(status);
        series.count.inc();
        series.latency.observe(seconds);
    }

    fn code(&self, status: u16) -> &CodeSeries {
        let index = (status.clamp(100, 599) - 100) as usize;
        let table = self
            .by_code
            .get_or_init(|| (0..CODES).map(|_| OnceLock::new()).collect());
        table[index].get_or_init(|| {
            Box::new(CodeSeries {
                count: Counter::default(),
                latency: Histogram::new(LATENCY_BUCKETS),
            })
        })
    }

    /// Records a cold start's duration (`sluicegate_function_cold_start_seconds`).
    pub fn cold_start_observed(&self, seconds: f64) {
        self.cold_start_seconds().observe(seconds);
    }

    /// `sluicegate_function_cold_start_seconds`, created on first use.
    pub fn cold_start_seconds(&self) -> &Histogram {
        self.cold_start_seconds
            .get_or_init(|| Histogram::new(COLD_START_BUCKETS))
    }

    /// Counts a request the gateway answered itself.
    pub fn rejected(&self, reason: RejectReason) {
        self.rejected[reason as usize].inc();
    }

    /// Rejections so far for one reason.
    pub fn rejected_count(&self, reason: RejectReason) -> u64 {
        self.rejected[reason as usize].get()
    }

    /// Sum of `gateway_function_invocation_total` over every code (OpenFaaS' `invocationCount`).
    pub fn invocation_count(&self) -> u64 {
        self.by_code.get().map_or(0, |table| {
            table
                .iter()
                .filter_map(|c| c.get())
                .map(|s| s.count.get())
                .sum()
        })
    }

    /// Counts an async invocation outcome.
    pub fn async_outcome(&self, outcome: AsyncOutcome) {
        self.async_outcomes[outcome as usize].inc();
    }

    /// Async invocation outcomes so far of one kind.
    pub fn async_outcome_count(&self, outcome: AsyncOutcome) -> u64 {
        self.async_outcomes[outcome as usize].get()
    }

    /// Counts a callback delivery attempt's result.
    pub fn callback(&self, result: CallbackResult) {
        self.async_callbacks[result as usize].inc();
    }

    /// Callback delivery attempts so far with one result.
    pub fn callback_count(&self, result: CallbackResult) -> u64 {
        self.async_callbacks[result as usize].get()
    }

    /// Records a scaling decision.
    pub fn decision(&self, direction: Direction) {
        match direction {
            Direction::Up => self.scaled_up.inc(),
            Direction::Down => self.scaled_down.inc(),
        }
    }

    /// Publishes the adaptive keep-alive's current windows (and exports its series from now on).
    pub fn set_adaptive_windows(
        &self,
        keep_alive: std::time::Duration,
        prewarm: Option<std::time::Duration>,
    ) {
        self.adaptive.store(true, Ordering::Relaxed);
        self.keep_alive_ms
            .store(keep_alive.as_millis() as u64, Ordering::Relaxed);
        self.prewarm_ms.store(
            prewarm.map_or(0, |d| d.as_millis() as u64),
            Ordering::Relaxed,
        );
    }

    /// The adaptive keep-alive's windows as last published: keep-alive and pre-warm (`None`:
    /// no pre-warm); `None` when the function is not adaptive.
    pub fn adaptive_windows(&self) -> Option<(std::time::Duration, Option<std::time::Duration>)> {
        use std::time::Duration;
        if !self.adaptive.load(Ordering::Relaxed) {
            return None;
        }
        let prewarm = self.prewarm_ms.load(Ordering::Relaxed);
        Some((
            Duration::from_millis(self.keep_alive_ms.load(Ordering::Relaxed)),
            (prewarm > 0).then(|| Duration::from_millis(prewarm)),
        ))
    }

    /// Sets `sluicegate_function_paused` (exported from the first pause on).
    pub fn set_paused(&self, paused: bool) {
        self.pause_known.store(true, Ordering::Relaxed);
        self.paused.set(i64::from(paused));
    }

    /// `sluicegate_function_paused` now.
    pub fn paused(&self) -> bool {
        self.paused.get() != 0
    }

    /// Counts a pre-warm's start, use or waste.
    pub fn prewarm(&self, result: PrewarmResult) {
        self.prewarms[result as usize].inc();
    }

    /// Pre-warms so far with one result.
    pub fn prewarm_count(&self, result: PrewarmResult) -> u64 {
        self.prewarms[result as usize].get()
    }

    fn encode_adaptive(&self, index: usize, name: &str, out: &mut Vec<u8>) {
        let fname = &*self.name;
        let seconds = |ms: &AtomicU64| ms.load(Ordering::Relaxed) as f64 / 1000.0;
        match index {
            0 => {
                let _ = writeln!(
                    out,
                    "{name}{{function_name=\"{fname}\"}} {}",
                    seconds(&self.keep_alive_ms)
                );
            }
            1 => {
                let _ = writeln!(
                    out,
                    "{name}{{function_name=\"{fname}\"}} {}",
                    seconds(&self.prewarm_ms)
                );
            }
            _ => {
                for (r, c) in PrewarmResult::ALL.iter().zip(&self.prewarms) {
                    let _ = writeln!(
                        out,
                        "{name}{{function_name=\"{fname}\",result=\"{}\"}} {}",
                        r.label(),
                        c.get()
                    );
                }
            }
        }
    }

    /// Whether the function has done anything yet: seen a request, had a ready replica or an
    /// async backlog. Until then only its replica counts are exported.
    fn active(&self) -> bool {
        self.started.get() > 0
            || self.ready.get() != 0
            || self.async_backlog.get() != 0
            || self.queued.get() != 0
            || self.by_code.get().is_some()
    }

    /// Writes this function's series of family `index` (see [`FAMILIES`]).
    fn encode(&self, index: usize, name: &str, out: &mut Vec<u8>) {
        let fname = &*self.name;
        let int = |out: &mut Vec<u8>, value: i64| {
            let _ = writeln!(out, "{name}{{function_name=\"{fname}\"}} {value}");
        };
        match index {
            3 => return int(out, self.ready.get()),
            10 => return int(out, self.desired.get()),
            _ if !self.active() => return,
            _ => {}
        }
        match index {
            0 | 1 => {
                let Some(table) = self.by_code.get() else {
                    return;
                };
                for (i, series) in table.iter().enumerate() {
                    let Some(series) = series.get() else {
                        continue;
                    };
                    let code = 100 + i;
                    if index == 0 {
                        let _ = writeln!(
                            out,
                            "{name}{{code=\"{code}\",function_name=\"{fname}\"}} {}",
                            series.count.get()
                        );
                    } else {
                        let labels = format!("code=\"{code}\",function_name=\"{fname}\"");
                        series.latency.encode(out, name, &labels);
                    }
                }
            }
            2 => int(out, self.started.get() as i64),
            4 => int(out, self.window_requests.get()),
            5 => int(out, self.ongoing.get()),
            6 => int(out, self.queued.get()),
            7 => {
                for (r, c) in RejectReason::ALL.iter().zip(&self.rejected) {
                    let _ = writeln!(
                        out,
                        "{name}{{function_name=\"{fname}\",reason=\"{}\"}} {}",
                        r.label(),
                        c.get()
                    );
                }
            }
            8 => int(out, self.cold_starts.get() as i64),
            9 => {
                if let Some(h) = self.cold_start_seconds.get() {
                    h.encode(out, name, &format!("function_name=\"{fname}\""));
                }
            }
            11 => {
                for (direction, c) in [("up", &self.scaled_up), ("down", &self.scaled_down)] {
                    let _ = writeln!(
                        out,
                        "{name}{{direction=\"{direction}\",function_name=\"{fname}\"}} {}",
                        c.get()
                    );
                }
            }
            12 => int(out, self.burst_mode.get()),
            13 => int(out, self.async_backlog.get()),
            14 => {
                for (o, c) in AsyncOutcome::ALL.iter().zip(&self.async_outcomes) {
                    let _ = writeln!(
                        out,
                        "{name}{{function_name=\"{fname}\",outcome=\"{}\"}} {}",
                        o.label(),
                        c.get()
                    );
                }
            }
            _ => {
                for (r, c) in CallbackResult::ALL.iter().zip(&self.async_callbacks) {
                    let _ = writeln!(
                        out,
                        "{name}{{function_name=\"{fname}\",result=\"{}\"}} {}",
                        r.label(),
                        c.get()
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_appear_only_for_resolved_functions_and_codes() {
        let m = Metrics::new();
        let f = m.function("echo");
        f.started.inc();
        f.observe(200, 0.01);
        f.observe(503, 0.001);
        f.rejected(RejectReason::QueueFull);
        m.unknown_function();
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(
            text.contains(
                "gateway_function_invocation_total{code=\"200\",function_name=\"echo\"} 1"
            ),
            "{text}"
        );
        assert!(text
            .contains("gateway_function_invocation_total{code=\"503\",function_name=\"echo\"} 1"));
        assert!(text.contains(
            "gateway_functions_seconds_bucket{code=\"200\",function_name=\"echo\",le=\"0.025\"} 1"
        ));
        assert!(text.contains("gateway_function_invocation_started{function_name=\"echo\"} 1"));
        assert!(text.contains("# TYPE gateway_function_invocation_started untyped\n"));
        assert!(text.contains("# TYPE gateway_service_count untyped\n"));
        assert!(text.contains("gateway_service_count{function_name=\"echo\"} 0\n"));
        assert!(text.contains(
            "sluicegate_function_rejected_total{function_name=\"echo\",reason=\"queue_full\"} 1"
        ));
        assert!(text.contains("sluicegate_unknown_function_requests_total 1"));
        assert!(!text.contains("code=\"404\""));
        assert_eq!(f.invocation_count(), 2);
    }

    #[test]
    fn a_never_invoked_function_exports_only_its_replica_counts_until_its_first_request() {
        let m = Metrics::new();
        let f = m.function("idle");
        let text = String::from_utf8(m.encode()).unwrap();
        let series: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            series,
            [
                "sluicegate_unknown_function_requests_total 0",
                "gateway_service_count{function_name=\"idle\"} 0",
                "sluicegate_function_desired_replicas{function_name=\"idle\"} 0",
            ]
        );
        // Every family is still described.
        assert!(text.contains("# TYPE gateway_functions_seconds histogram\n"));
        assert!(text.contains("# TYPE sluicegate_function_cold_start_seconds histogram\n"));
        f.started.inc();
        let text = String::from_utf8(m.encode()).unwrap();
        for line in [
            "gateway_function_invocation_started{function_name=\"idle\"} 1",
            "sluicegate_function_ongoing_requests{function_name=\"idle\"} 0",
            "sluicegate_function_rejected_total{function_name=\"idle\",reason=\"queue_full\"} 0",
            "sluicegate_autoscaler_decisions_total{direction=\"up\",function_name=\"idle\"} 0",
        ] {
            assert!(text.contains(line), "missing {line} in {text}");
        }
    }

    #[test]
    fn a_name_asked_for_twice_shares_its_series_and_is_exported_once() {
        let m = Metrics::new();
        let a = m.function("echo");
        let b = m.function("echo");
        a.started.inc();
        assert_eq!(b.started.get(), 1);
        let text = String::from_utf8(m.encode()).unwrap();
        assert_eq!(text.matches("gateway_service_count{").count(), 1);
        drop((a, b));
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(
            !text.contains("echo"),
            "a dropped function's series are gone"
        );
    }
}
