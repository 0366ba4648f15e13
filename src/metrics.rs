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

use std::sync::OnceLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

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
}

impl RejectReason {
    /// Every reason, in label order.
    pub const ALL: [RejectReason; 8] = [
        RejectReason::QueueFull,
        RejectReason::QueueTimeout,
        RejectReason::ColdStartTimeout,
        RejectReason::StartFailed,
        RejectReason::Draining,
        RejectReason::BodyTooLarge,
        RejectReason::AsyncBacklogFull,
        RejectReason::AsyncStoreUnavailable,
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

/// Every metric family the gateway exports.
pub struct Metrics {
    registry: Registry,
    invocation_total: IntCounterVec,
    functions_seconds: HistogramVec,
    invocation_started: IntCounterVec,
    service_count: IntGaugeVec,
    window_requests: IntGaugeVec,
    ongoing: IntGaugeVec,
    queued: IntGaugeVec,
    rejected: IntCounterVec,
    cold_starts: IntCounterVec,
    cold_start_seconds: HistogramVec,
    desired_replicas: IntGaugeVec,
    scaling_decisions: IntCounterVec,
    burst_mode: IntGaugeVec,
    async_backlog: IntGaugeVec,
    async_invocations: IntCounterVec,
    async_callbacks: IntCounterVec,
    unknown_function: IntCounter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: T) -> T {
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique and valid");
    c
}

impl Metrics {
    /// Creates every family in a fresh registry.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let fname = &["function_name"];
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).unwrap(),
            )
        };
        let gauge_vec = |name: &str, help: &str| {
            register(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), fname).unwrap(),
            )
        };
        Metrics {
            invocation_total: counter_vec(
                "gateway_function_invocation_total",
                "Function invocations, by function and status code (including the gateway's own errors).",
                &["function_name", "code"],
            ),
            functions_seconds: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "gateway_functions_seconds",
                        "Time from request arrival to response headers, cold-start and queue wait included.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                    &["function_name", "code"],
                )
                .unwrap(),
            ),
            invocation_started: counter_vec(
                "gateway_function_invocation_started",
                "Function invocations that arrived at the gateway.",
                fname,
            ),
            service_count: gauge_vec(
                "gateway_service_count",
                "Ready replicas of the function.",
            ),
            window_requests: gauge_vec(
                "sluicegate_function_window_requests",
                "Requests that arrived within the function's sliding window (rate_seconds).",
            ),
            ongoing: gauge_vec(
                "sluicegate_function_ongoing_requests",
                "Requests being served by a replica of the function.",
            ),
            queued: gauge_vec(
                "sluicegate_function_queued_requests",
                "Requests waiting for a replica slot (including those held for a cold start).",
            ),
            rejected: counter_vec(
                "sluicegate_function_rejected_total",
                "Requests the gateway answered itself instead of forwarding, by reason.",
                &["function_name", "reason"],
            ),
            cold_starts: counter_vec(
                "sluicegate_function_cold_starts_total",
                "Scale-ups from zero ready replicas triggered by a request.",
                fname,
            ),
            cold_start_seconds: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "sluicegate_function_cold_start_seconds",
                        "Time from a scale-up from zero to the first ready replica.",
                    )
                    .buckets(COLD_START_BUCKETS.to_vec()),
                    fname,
                )
                .unwrap(),
            ),
            desired_replicas: gauge_vec(
                "sluicegate_function_desired_replicas",
                "Replicas the gateway currently asks the provider for.",
            ),
            scaling_decisions: counter_vec(
                "sluicegate_autoscaler_decisions_total",
                "Replica count changes made by the autoscaler, by direction.",
                &["function_name", "direction"],
            ),
            burst_mode: gauge_vec(
                "sluicegate_autoscaler_burst_mode",
                "1 while the function is in burst mode (short-window load at least twice its capacity).",
            ),
            async_backlog: gauge_vec(
                "sluicegate_async_backlog",
                "Async invocations accepted and not yet finished (waiting, in flight or waiting to be retried).",
            ),
            async_invocations: counter_vec(
                "sluicegate_async_invocations_total",
                "Async invocations by outcome: accepted, succeeded, failed, retried (per retry), dead_lettered, rejected (at accept time).",
                &["function_name", "outcome"],
            ),
            async_callbacks: counter_vec(
                "sluicegate_async_callbacks_total",
                "Async callback delivery attempts by result: delivered, retried, failed (given up).",
                &["function_name", "result"],
            ),
            unknown_function: register(
                &registry,
                IntCounter::new(
                    "sluicegate_unknown_function_requests_total",
                    "Requests for function names that are not configured (no per-name series by design).",
                )
                .unwrap(),
            ),
            registry,
        }
    }

    /// Resolves every per-function handle once; the request path uses only these.
    pub fn function(&self, name: &str) -> FunctionMetrics {
        let one = [name];
        FunctionMetrics {
            name: name.to_owned(),
            started: self.invocation_started.with_label_values(&one),
            ready: self.service_count.with_label_values(&one),
            window_requests: self.window_requests.with_label_values(&one),
            ongoing: self.ongoing.with_label_values(&one),
            queued: self.queued.with_label_values(&one),
            rejected: RejectReason::ALL
                .map(|r| self.rejected.with_label_values(&[name, r.label()])),
            cold_starts: self.cold_starts.with_label_values(&one),
            cold_start_seconds: self.cold_start_seconds.with_label_values(&one),
            desired: self.desired_replicas.with_label_values(&one),
            scaled_up: self.scaling_decisions.with_label_values(&[name, "up"]),
            scaled_down: self.scaling_decisions.with_label_values(&[name, "down"]),
            burst_mode: self.burst_mode.with_label_values(&one),
            async_backlog: self.async_backlog.with_label_values(&one),
            async_outcomes: AsyncOutcome::ALL
                .map(|o| self.async_invocations.with_label_values(&[name, o.label()])),
            async_callbacks: CallbackResult::ALL
                .map(|r| self.async_callbacks.with_label_values(&[name, r.label()])),
            by_code: (0..CODES).map(|_| OnceLock::new()).collect(),
            invocation_total: self.invocation_total.clone(),
            functions_seconds: self.functions_seconds.clone(),
        }
    }

    /// Counts a request for a name that is not configured.
    pub fn unknown_function(&self) {
        self.unknown_function.inc();
    }

    /// The registry, for tests and for encoding.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Encodes every family in the Prometheus text format.
    ///
    /// The two OpenFaaS names that break the naming rules of their types
    /// (`gateway_function_invocation_started` is a counter without `_total`,
    /// `gateway_service_count` a gauge ending in `_count`) are exported as `untyped`: the names stay
    /// (PromQL and dashboards only see names), and `promtool check metrics` stays clean.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let (compat, typed): (Vec<_>, Vec<_>) = self
            .registry
            .gather()
            .into_iter()
            .partition(|mf| UNTYPED_FOR_COMPATIBILITY.contains(&mf.name()));
        TextEncoder::new()
            .encode(&typed, &mut out)
            .expect("encoding to a Vec cannot fail");
        for family in &compat {
            encode_untyped(family, &mut out);
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

/// One function's metric handles, resolved once when the function is created.
pub struct FunctionMetrics {
    name: String,
    /// `gateway_function_invocation_started`.
    pub started: IntCounter,
    /// `gateway_service_count`: ready replicas.
    pub ready: IntGauge,
    /// `sluicegate_function_window_requests`, refreshed from the window at each scrape.
    pub window_requests: IntGauge,
    /// `sluicegate_function_ongoing_requests`: the admission counter itself.
    pub ongoing: IntGauge,
    /// `sluicegate_function_queued_requests`: the admission queue length itself.
    pub queued: IntGauge,
    rejected: [IntCounter; RejectReason::ALL.len()],
    /// `sluicegate_function_cold_starts_total`.
    pub cold_starts: IntCounter,
    /// `sluicegate_function_cold_start_seconds`.
    pub cold_start_seconds: Histogram,
    /// `sluicegate_function_desired_replicas`.
    pub desired: IntGauge,
    /// `sluicegate_autoscaler_decisions_total{direction="up"}`.
    pub scaled_up: IntCounter,
    /// `sluicegate_autoscaler_decisions_total{direction="down"}`.
    pub scaled_down: IntCounter,
    /// `sluicegate_autoscaler_burst_mode`.
    pub burst_mode: IntGauge,
    /// `sluicegate_async_backlog`: async invocations accepted and not yet finished. The async
    /// queue keeps it exact (initialised from the store at start); the `queue` autoscaler reads it.
    pub async_backlog: IntGauge,
    async_outcomes: [IntCounter; AsyncOutcome::ALL.len()],
    async_callbacks: [IntCounter; CallbackResult::ALL.len()],
    by_code: Box<[OnceLock<(IntCounter, Histogram)>]>,
    invocation_total: IntCounterVec,
    functions_seconds: HistogramVec,
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
        let (count, latency) = self.code(status);
        count.inc();
        latency.observe(seconds);
    }

    fn code(&self, status: u16) -> &(IntCounter, Histogram) {
        let index = (status.clamp(100, 599) - 100) as usize;
        self.by_code[index].get_or_init(|| {
            let buf = itoa_status(status);
            let code = std::str::from_utf8(&buf).unwrap_or("0");
            let labels = [self.name.as_str(), code];
            (
                self.invocation_total.with_label_values(&labels),
                self.functions_seconds.with_label_values(&labels),
            )
        })
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
        self.by_code
            .iter()
            .filter_map(|c| c.get())
            .map(|(count, _)| count.get())
            .sum()
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
}

/// OpenFaaS-compatible families whose names break the Prometheus naming rules for their types.
const UNTYPED_FOR_COMPATIBILITY: [&str; 2] = [
    "gateway_function_invocation_started",
    "gateway_service_count",
];

/// Writes a counter or gauge family as `untyped` (prometheus' `TextEncoder` cannot).
fn encode_untyped(family: &prometheus::proto::MetricFamily, out: &mut Vec<u8>) {
    use std::io::Write;
    let name = family.name();
    let help = family.help().replace('\\', "\\\\").replace('\n', "\\n");
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} untyped");
    for metric in family.get_metric() {
        let value = match family.get_field_type() {
            prometheus::proto::MetricType::COUNTER => metric.get_counter().get_value(),
            _ => metric.get_gauge().get_value(),
        };
        out.extend_from_slice(name.as_bytes());
        let labels = metric.get_label();
        if !labels.is_empty() {
            out.push(b'{');
            for (i, label) in labels.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let value = label
                    .value()
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(out, "{}=\"{value}\"", label.name());
            }
            out.push(b'}');
        }
        let _ = writeln!(out, " {value}");
    }
}

fn itoa_status(status: u16) -> [u8; 3] {
    let s = status.clamp(100, 999);
    [
        b'0' + (s / 100) as u8,
        b'0' + (s / 10 % 10) as u8,
        b'0' + (s % 10) as u8,
    ]
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
}
