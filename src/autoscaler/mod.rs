//! The built-in autoscaler loop: one task per scalable function.
//!
//! Every sample interval (a sixtieth of the window, between 10 ms and 1 s) the loop reads the
//! function's figures — the very gauges and window `/metrics` exports — records a concurrency
//! sample (and, in the `cpu` mode, the replicas' CPU-seconds counter from the provider), and
//! checks for a burst; every `polling_interval` it asks the [`Policy`] for a decision
//! and applies it through the provider. Each change is logged with the figures it used. The
//! clock-free part of that step (samples → [`Inputs`] → burst check → decision) is the
//! [`Controller`], which the offline simulator (`sluicegate simulate`) runs on virtual time.
//!
//! A function at zero with nothing to do costs no wake-ups: once a step finds it at rest (no
//! replica asked for, `min_replicas = 0`, nothing in the window, in flight or remembered for the
//! cooldown) the loop sleeps without a timer until the function wakes it (its first arrival, a
//! cold start, a manual scale; [`Function::dormant_until_woken`]); the `queue` mode, whose metric
//! changes without arrivals, keeps sampling. Every step it skipped would
//! have decided zero; the concurrency samples it skipped are filled in as zeros on waking, and the
//! decision schedule resumes on its grid.
//!
//! A paused function's loop stops until the resume (`Function::until_resumed`), which hands it
//! the count to restore as a manual scale.
//!
//! Manual scaling (`/system/scale-function`) is applied at once by the admin API and handed to the
//! policy as a desired count seen now: the loop will not go below it until `cooldown_period` has
//! passed, but scales above it if load needs more.

pub mod adaptive;
pub mod policy;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::{AutoscalerConfig, ScaleMode};
use crate::function::{Figures, Function};
use crate::metrics::{Direction, PrewarmResult};
use crate::state::StateStore;
use adaptive::{IdleHistogram, PrewarmEvent};
pub use policy::{Decision, Inputs, Policy};

/// The state-store bucket of the adaptive keep-alive's histograms (key: the function's name).
pub const IDLE_HISTORY_BUCKET: &str = "idle_history";
/// A changed histogram is written at most this often (and when the loop stops).
pub const SAVE_EVERY: Duration = Duration::from_secs(60);
/// Longest wait for the state store when loading or saving a histogram.
const STATE_TIMEOUT: Duration = Duration::from_secs(5);

/// The decision deadline after one taken at `now` that was due at `due`: anchored to the schedule
/// (`due + polling`), so decisions average one per `polling_interval` even when samples do not
/// divide it; deadlines missed entirely are skipped, not made up in a burst.
pub fn next_decision(due: Duration, now: Duration, polling: Duration) -> Duration {
    let mut next = due + polling;
    while next <= now {
        next += polling;
    }
    next
}

/// Time between samples for a window of `window`.
pub fn sample_interval(window: Duration, polling: Duration) -> Duration {
    (window / 60)
        .clamp(Duration::from_millis(10), Duration::from_secs(1))
        .min(polling)
}

/// Recent readings of the replicas' CPU-seconds counter, for the `cpu` mode.
#[derive(Debug, Default)]
pub struct CpuSamples(VecDeque<(Duration, f64)>);

impl CpuSamples {
    /// Records the counter `seconds` at `t` and forgets readings older than `keep` before `t`
    /// (keeping one at or before `t - keep`, the start of the window).
    pub fn push(&mut self, t: Duration, seconds: f64, keep: Duration) {
        self.0.push_back((t, seconds));
        let from = t.saturating_sub(keep);
        while self.0.get(1).is_some_and(|(at, _)| *at <= from) {
            self.0.pop_front();
        }
    }

    /// CPU used between the reading at (or just before) `from` and the last one, in percent
    /// of one core: 100 per core kept busy. 0 with fewer than two readings.
    pub fn percent_since(&self, from: Duration) -> f64 {
        let Some(&(last_at, last)) = self.0.back() else {
            return 0.0;
        };
        let first = self
            .0
            .iter()
            .rev()
            .find(|(at, _)| *at <= from)
            .or_else(|| self.0.front())
            .copied();
        match first {
            Some((at, value)) if last_at > at => {
                (last - value).max(0.0) / (last_at - at).as_secs_f64() * 100.0
            }
            _ => 0.0,
        }
    }
}

/// Recent ongoing+queued samples, for the `concurrency` mode's averages.
#[derive(Debug, Default)]
pub struct Samples(VecDeque<(Duration, u64)>);

impl Samples {
    /// Records `value` at `t` and forgets samples older than `keep` before `t`.
    pub fn push(&mut self, t: Duration, value: u64, keep: Duration) {
        self.0.push_back((t, value));
        let from = t.saturating_sub(keep);
        while self.0.front().is_some_and(|(at, _)| *at < from) {
            self.0.pop_front();
        }
    }

    /// Average of the samples taken at or after `from` (0 when there are none).
    pub fn average_since(&self, from: Duration) -> f64 {
        let (sum, n) = self
            .0
            .iter()
            .rev()
            .take_while(|(at, _)| *at >= from)
            .fold((0u64, 0u64), |(s, n), (_, v)| (s + v, n + 1));
        if n == 0 {
            0.0
        } else {
            sum as f64 / n as f64
        }
    }
}

/// The policy's [`Inputs`] at `t` from a function's figures and the recent samples: requests in
/// the window and in the burst window × 10 (`rps`), average ongoing+queued over the window and
/// over the burst window (`concurrency`), the async backlog (`queue`), the replicas' CPU time in
/// percent of one core over the window and over the burst window (`cpu`).
pub fn inputs(
    config: &AutoscalerConfig,
    samples: &Samples,
    cpu: &CpuSamples,
    t: Duration,
    figures: &Figures,
) -> Inputs {
    let window = config.window;
    let burst_window = window / 10;
    // Work the function still owes: requests being served or waiting, and async invocations
    // not yet final (some may be waiting for a retry). None of it may be scaled to zero.
    let in_flight = figures.ongoing + figures.queued + figures.backlog;
    let (metric, burst_metric) = match config.mode {
        ScaleMode::Rps { .. } => (
            figures.window_requests as f64,
            figures.burst_requests as f64 * 10.0,
        ),
        ScaleMode::Concurrency { .. } => (
            samples.average_since(t.saturating_sub(window)),
            samples.average_since(t.saturating_sub(burst_window)),
        ),
        ScaleMode::Queue { .. } => (figures.backlog as f64, figures.backlog as f64),
        ScaleMode::Cpu { .. } => (
            cpu.percent_since(t.saturating_sub(window)),
            cpu.percent_since(t.saturating_sub(burst_window)),
        ),
        ScaleMode::None => (0.0, 0.0),
    };
    Inputs {
        ready: figures.ready,
        current: figures.replicas,
        metric,
        burst_metric,
        in_flight,
        idle_for: figures.idle_for,
    }
}

/// What one step of the loop asks for. Both answers come from the same [`Inputs`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Step {
    /// The inputs the policy saw.
    pub inputs: Inputs,
    /// In a burst: the replica count to go up to at once.
    pub burst: Option<u32>,
    /// On a decision step: the policy's decision.
    pub decision: Option<Decision>,
    /// `cooldown_period = "adaptive"`: a pre-warm started, used or wasted at this step.
    pub prewarm: Option<adaptive::PrewarmEvent>,
}

/// The loop's pure part, without clock or I/O: samples and policy. Given a function's figures at
/// `t`, it says what to scale to. The live [`Autoscaler`] and the offline simulator both run it.
#[derive(Debug)]
pub struct Controller {
    policy: Policy,
    samples: Samples,
    cpu: CpuSamples,
    /// When the first sample was taken.
    first: Option<Duration>,
}

impl Controller {
    /// A controller with no memory yet.
    pub fn new(config: AutoscalerConfig) -> Controller {
        Controller {
            policy: Policy::new(config),
            samples: Samples::default(),
            cpu: CpuSamples::default(),
            first: None,
        }
    }

    /// The configuration it applies.
    pub fn config(&self) -> &AutoscalerConfig {
        self.policy.config()
    }

    /// The policy (for the adaptive keep-alive's state).
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The same, mutable (to load a persisted histogram).
    pub fn policy_mut(&mut self) -> &mut Policy {
        &mut self.policy
    }

    /// When a controller at rest must take a step by itself (a pre-warm), if ever.
    pub fn wake_at(&self, t: Duration) -> Option<Duration> {
        self.policy.wake_at(t)
    }

    /// Whether a step at `t` that saw `step` leaves nothing to do until something arrives: no
    /// replicas asked for and none required, nothing counted, in flight or remembered.
    pub fn at_rest(&self, t: Duration, step: &Step) -> bool {
        let i = &step.inputs;
        // The `queue` mode's metric, the async backlog, is fed by the async queue (the store at
        // start, retries), not only by arrivals: that mode keeps sampling.
        !matches!(self.policy.config().mode, ScaleMode::Queue { .. })
            && self.policy.config().min_replicas == 0
            && i.current == 0
            && i.metric == 0.0
            && i.burst_metric == 0.0
            && i.in_flight == 0
            && step.burst.is_none()
            && step.decision.is_none_or(|d| d.desired == 0)
            && self.policy.at_rest(t)
    }

    /// Frees what a controller [at rest](Controller::at_rest) remembers: zeros only (the samples
    /// within the window are zeros when the `concurrency` metric is 0, and no other mode reads
    /// them). [`Controller::rested`] records the zeros again on waking.
    pub fn rest(&mut self) {
        self.samples = Samples::default();
        self.cpu = CpuSamples::default();
        self.policy.rest();
    }

    /// After [`Controller::rest`]: records again the zero samples a ticking loop would hold at
    /// `to`: those on the grid of `every` through `from` (the last step taken, at rest) within
    /// the window, and those of the steps skipped from then until `to` (exclusive).
    pub fn rested(&mut self, from: Duration, to: Duration, every: Duration) {
        let window = self.policy.config().window;
        if every.is_zero() {
            return;
        }
        // Not before the first sample this controller took.
        let low = to.saturating_sub(window).max(self.first.unwrap_or(from));
        let mut t = if from >= low {
            let back = (from - low).as_nanos() / every.as_nanos();
            from - every * back as u32
        } else {
            let ahead = (low - from).as_nanos().div_ceil(every.as_nanos());
            from + every * ahead as u32
        };
        while t <= from || t < to {
            self.samples.push(t, 0, window);
            t += every;
        }
    }

    /// One sample at `t` (time since the loop's origin): records ongoing+queued, hands a pending
    /// manual scale to the policy, checks for a burst and, with `decide`, takes a decision.
    pub fn step(
        &mut self,
        t: Duration,
        figures: &Figures,
        manual: Option<u32>,
        decide: bool,
    ) -> Step {
        let window = self.policy.config().window;
        self.first.get_or_insert(t);
        self.samples
            .push(t, figures.ongoing + figures.queued, window);
        if matches!(self.policy.config().mode, ScaleMode::Cpu { .. }) {
            self.cpu.push(t, figures.cpu_seconds, window);
        }
        if let Some(replicas) = manual {
            self.policy.manual(t, replicas);
        }
        let inputs = inputs(self.policy.config(), &self.samples, &self.cpu, t, figures);
        let used = self.policy.observe(t, &inputs);
        let burst = self.policy.burst_check(t, &inputs);
        let decision = decide.then(|| self.policy.decide(t, &inputs));
        Step {
            inputs,
            burst,
            decision,
            prewarm: used.or(decision.and_then(|d| d.prewarm)),
        }
    }
}

/// The loop for one function.
pub struct Autoscaler {
    function: Arc<Function>,
    controller: Controller,
    origin: Instant,
    /// Where the adaptive keep-alive's histogram is kept across restarts.
    state: Option<Arc<dyn StateStore>>,
    /// The histogram changed since it was last saved.
    unsaved: bool,
    saved_at: Option<Instant>,
}

impl Autoscaler {
    /// A loop for `function`, or `None` when it is not scaled automatically.
    pub fn new(function: Arc<Function>) -> Option<Autoscaler> {
        let config = function.config.autoscaler.clone();
        if config.mode == ScaleMode::None || !function.backend().scalable() {
            return None;
        }
        function
            .metrics
            .desired
            .set(function.backend().replicas() as i64);
        let controller = Controller::new(config);
        if let Some(a) = controller.policy().adaptive() {
            let w = a.windows();
            function
                .metrics
                .set_adaptive_windows(w.keep_alive, w.prewarm.map(|p| p.at));
        }
        Some(Autoscaler {
            function,
            controller,
            origin: Instant::now(),
            state: None,
            unsaved: false,
            saved_at: None,
        })
    }

    /// Keeps the adaptive keep-alive's histogram in `state` (bucket [`IDLE_HISTORY_BUCKET`]):
    /// loaded when the loop starts, saved when it changed, at most every [`SAVE_EVERY`], and when
    /// the loop stops.
    pub fn with_state(mut self, state: Arc<dyn StateStore>) -> Autoscaler {
        self.state = Some(state);
        self
    }

    /// The controller (for tests and `/system`).
    pub fn controller(&self) -> &Controller {
        &self.controller
    }

    fn publish_windows(&self) {
        if let Some(a) = self.controller.policy().adaptive() {
            let w = a.windows();
            self.function
                .metrics
                .set_adaptive_windows(w.keep_alive, w.prewarm.map(|p| p.at));
        }
    }

    /// Loads the persisted histogram, if there is a store and one was saved.
    pub async fn load_histogram(&mut self) {
        let (Some(state), Some(a)) = (&self.state, self.controller.policy().adaptive()) else {
            return;
        };
        let width = a.histogram().bin_width();
        let name = &self.function.name;
        match tokio::time::timeout(STATE_TIMEOUT, state.state_get(IDLE_HISTORY_BUCKET, name)).await
        {
            Ok(Ok(Some(bytes))) => match IdleHistogram::decode(&bytes, width) {
                Some(h) => {
                    info!(function = %name, observations = h.observations(), "adaptive keep-alive: idle-time histogram loaded");
                    if let Some(a) = self.controller.policy_mut().adaptive_mut() {
                        a.load(h);
                    }
                    self.publish_windows();
                }
                None => {
                    warn!(function = %name, "adaptive keep-alive: stored histogram is of another format or bin width; starting afresh")
                }
            },
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                warn!(function = %name, error = %e, "adaptive keep-alive: cannot load the histogram")
            }
            Err(_) => {
                warn!(function = %name, "adaptive keep-alive: the state store did not answer; starting afresh")
            }
        }
    }

    /// Saves the histogram now if it changed (awaited: for the loop's end).
    pub async fn save_histogram(&mut self) {
        let Some(put) = self.pending_save(Instant::now()) else {
            return;
        };
        put.await;
    }

    /// The save to run if the histogram changed, marking it saved at `now`.
    fn pending_save(
        &mut self,
        now: Instant,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        if !self.unsaved {
            return None;
        }
        let state = self.state.clone()?;
        let bytes = self.controller.policy().adaptive()?.histogram().encode();
        self.unsaved = false;
        self.saved_at = Some(now);
        let name = self.function.name.clone();
        Some(async move {
            match tokio::time::timeout(
                STATE_TIMEOUT,
                state.state_put(IDLE_HISTORY_BUCKET, &name, bytes),
            )
            .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(function = %name, error = %e, "adaptive keep-alive: cannot save the histogram")
                }
                Err(_) => {
                    warn!(function = %name, "adaptive keep-alive: the state store did not answer; histogram not saved")
                }
            }
        })
    }

    /// Whether `function` starts at rest: scaled automatically, not in `queue` mode, at zero with
    /// `min_replicas = 0` and nothing owed. Its loop need not run until something happens.
    pub fn at_rest_from_the_start(function: &Function) -> bool {
        let config = &function.config.autoscaler;
        config.mode != ScaleMode::None
            && !matches!(config.mode, ScaleMode::Queue { .. })
            && config.min_replicas == 0
            && function.backend().scalable()
            && function.backend().replicas() == 0
            && function.metrics.async_backlog.get() == 0
    }

    /// Runs until `shutdown` turns true: a sample every sample interval and a decision every
    /// `polling_interval`, both on a fixed grid from the start, except while at rest.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        self.load_histogram().await;
        self.ticking(&mut shutdown).await;
        self.save_histogram().await;
    }

    async fn ticking(&mut self, shutdown: &mut watch::Receiver<bool>) {
        let config = self.controller.config().clone();
        let every = sample_interval(config.window, config.polling_interval);
        let start = Instant::now();
        let mut tick = start + every;
        let mut next = config.polling_interval;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(tick) => {}
                _ = shutdown.changed() => return,
            }
            if self.function.is_paused() {
                // Stopped while paused: the resume hands it the count to go on from.
                tokio::select! {
                    _ = self.function.until_resumed() => {}
                    _ = shutdown.changed() => return,
                }
                tick = Instant::now() + every;
                continue;
            }
            let now = Instant::now();
            let t = now.saturating_duration_since(start);
            let decide = t >= next;
            let arrivals = self.function.arrivals();
            let at_rest = self.step(now, decide);
            if decide {
                next = next_decision(next, t, config.polling_interval);
            }
            tick += every;
            if tick <= now {
                tick = now + every;
            }
            if !at_rest {
                continue;
            }
            self.controller.rest();
            // A pre-warm to start is the only reason to look again without an arrival.
            let timer = self
                .controller
                .wake_at(now.saturating_duration_since(self.origin))
                .map(|at| self.origin + at);
            let woken = tokio::select! {
                woken = self.function.dormant_until_woken(arrivals) => woken,
                _ = sleep_until_some(timer) => {
                    self.function.leave_dormancy();
                    true
                }
                _ = shutdown.changed() => return,
            };
            // Back on the grid; the skipped samples were zeros, the skipped decisions zero.
            let woke = Instant::now();
            if !woken {
                self.controller.rested(
                    now.saturating_duration_since(self.origin),
                    now.saturating_duration_since(self.origin),
                    every,
                );
                continue;
            }
            let since = woke.saturating_duration_since(start);
            let ticks = since.as_nanos() / every.as_nanos().max(1) + 1;
            tick = start + every * ticks as u32;
            self.controller.rested(
                now.saturating_duration_since(self.origin),
                woke.saturating_duration_since(self.origin),
                every,
            );
            if since >= next {
                next = next_decision(next, since, config.polling_interval);
                // The decision that fell due while at rest is taken at the next sample.
                next = next.saturating_sub(config.polling_interval);
            }
        }
    }

    /// One sample; with `decide`, one decision. Returns whether the function is at rest (see
    /// [`Controller::at_rest`]). Public for tests on paused time.
    pub fn step(&mut self, now: Instant, decide: bool) -> bool {
        let t = now.saturating_duration_since(self.origin);
        let mut figures = self.function.decision_figures(now);
        if matches!(self.controller.config().mode, ScaleMode::Cpu { .. }) {
            figures.cpu_seconds = self.function.backend().cpu_seconds().unwrap_or(0.0);
        }
        let manual = self.function.take_manual();
        let step = self.controller.step(t, &figures, manual, decide);
        if let Some(up) = step.burst {
            self.apply(up, &step.inputs, &figures, "burst");
        }
        let prewarm = step.prewarm == Some(PrewarmEvent::Started);
        if let Some(decision) = step.decision {
            self.function.metrics.burst_mode.set(decision.burst as i64);
            let why = if prewarm { "prewarm" } else { "tick" };
            self.apply(decision.desired, &step.inputs, &figures, why);
        }
        self.adaptive_step(now, &step);
        manual.is_none() && self.controller.at_rest(t, &step)
    }

    /// The adaptive keep-alive's side of a step: pre-warm metrics and log, windows published,
    /// the histogram saved when it changed (at most every [`SAVE_EVERY`]).
    fn adaptive_step(&mut self, now: Instant, step: &Step) {
        let Some(changed) = self
            .controller
            .policy_mut()
            .adaptive_mut()
            .map(adaptive::Adaptive::take_changed)
        else {
            return;
        };
        let metrics = &self.function.metrics;
        match step.prewarm {
            Some(PrewarmEvent::Started) => {
                metrics.prewarm(PrewarmResult::Started);
                let w = self.controller.policy().adaptive().map(|a| a.windows());
                info!(
                    function = %self.function.name,
                    idle_s = step.inputs.idle_for.as_secs_f64(),
                    prewarm_s = w.and_then(|w| w.prewarm).map_or(0.0, |p| p.at.as_secs_f64()),
                    keep_alive_s = w.map_or(0.0, |w| w.keep_alive.as_secs_f64()),
                    basis = w.map_or("", |w| w.basis.name()),
                    "pre-warm: starting one replica before the predicted next request"
                );
            }
            Some(PrewarmEvent::Used) => metrics.prewarm(PrewarmResult::Used),
            Some(PrewarmEvent::Wasted) => metrics.prewarm(PrewarmResult::Wasted),
            None => {}
        }
        if changed {
            self.publish_windows();
            self.unsaved = true;
        }
        if self.saved_at.is_none_or(|at| now >= at + SAVE_EVERY) {
            if let Some(put) = self.pending_save(now) {
                tokio::spawn(put);
            }
        }
    }

    fn apply(&self, desired: u32, inputs: &Inputs, figures: &Figures, why: &'static str) {
        // Of several gateways only the leader scales; the others keep their samples warm. A
        // paused function is not scaled.
        if !self.function.is_leader() || self.function.is_paused() {
            return;
        }
        let current = self.function.backend().replicas();
        if desired == current {
            return;
        }
        if desired == 0 {
            // Re-read at the last moment: a request may have arrived since the figures were taken.
            let now = self.function.decision_figures(Instant::now());
            if now.ongoing + now.queued + now.backlog > 0 {
                return;
            }
        }
        let direction = if desired > current {
            Direction::Up
        } else {
            Direction::Down
        };
        self.function.metrics.decision(direction);
        info!(
            function = %self.function.name,
            from = current,
            to = desired,
            why,
            mode = self.controller.config().mode.name(),
            metric = inputs.metric,
            burst_metric = inputs.burst_metric,
            ready = figures.ready,
            ongoing = figures.ongoing,
            queued = figures.queued,
            window_requests = figures.window_requests,
            idle_ms = figures.idle_for.as_millis() as u64,
            "scaling"
        );
        self.function.scale_to(desired);
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
