//! The scaling policy, pure: figures + config + its own short memory → desired replicas.
//!
//! No clock, no I/O: time is passed in as `t` (time since an arbitrary origin), so the live loop,
//! the tests and the offline simulator all run exactly this code.
//!
//! The rules (DESIGN.md, "Autoscaler semantics"):
//! * `candidate = ceil(metric / per-replica target)`, clamped to `[min_replicas, max_replicas]`,
//!   and at least 1 while anything is ongoing or queued;
//! * the desired count is the highest candidate seen over the last `cooldown_period`: up at once,
//!   down only when the higher candidates have aged out;
//! * scale to zero only when `min_replicas = 0` and no request arrived or was in flight for the
//!   whole `cooldown_period`;
//! * with `cooldown_period = "adaptive"` (and `min_replicas = 0`), while nothing is in flight the
//!   learned windows ([`super::adaptive`]) decide instead: keep the last replica, go to zero, or
//!   pre-warm one; `cooldown_period` (`adaptive_scale_down_delay`, 300 s by default) then only
//!   governs scale-downs between non-zero counts;
//! * burst mode (Knative's panic window): when the burst window (a tenth of the window) shows at
//!   least twice the current capacity, scale up at once to what the burst needs, and do not scale
//!   down until the burst condition has been absent for a whole window.

use std::collections::VecDeque;
use std::time::Duration;

use super::adaptive::{Adaptive, Phase, PrewarmEvent};
use crate::config::{AutoscalerConfig, ScaleMode};

/// The figures one decision uses.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Inputs {
    /// Ready replicas.
    pub ready: u32,
    /// Replicas asked of the provider now.
    pub current: u32,
    /// The mode's metric over the window: requests in the window (`rps`), average ongoing+queued
    /// (`concurrency`), async backlog (`queue`), CPU time of all replicas in percent of one core
    /// (`cpu`).
    pub metric: f64,
    /// The same metric over the burst window, scaled to be comparable with `metric`
    /// (for `rps`: burst-window requests × 10).
    pub burst_metric: f64,
    /// Requests ongoing or queued right now.
    pub in_flight: u64,
    /// Time since the last request arrived or finished.
    pub idle_for: Duration,
}

/// One decision, with what it was based on (for logs and metrics).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    /// Replicas to ask for.
    pub desired: u32,
    /// `ceil(metric / target)` before clamping and cooldown.
    pub raw: u32,
    /// Whether burst mode is on.
    pub burst: bool,
    /// `cooldown_period = "adaptive"`: a pre-warm started, or one that went unused.
    pub prewarm: Option<PrewarmEvent>,
}

/// The policy's memory: recent candidates (for the cooldown) and burst state.
#[derive(Clone, Debug)]
pub struct Policy {
    config: AutoscalerConfig,
    history: VecDeque<(Duration, u32)>,
    /// While `Some(t)`: burst mode, ending at `t` unless the condition is seen again.
    burst_until: Option<Duration>,
    /// `cooldown_period = "adaptive"` on a function that may scale to zero.
    adaptive: Option<Adaptive>,
    /// After a manual scale, the learned windows wait until then (a whole `cooldown_period`).
    manual_until: Option<Duration>,
}

impl Policy {
    /// A policy with no memory yet.
    pub fn new(config: AutoscalerConfig) -> Policy {
        let adaptive = config
            .adaptive
            .filter(|_| config.min_replicas == 0)
            .map(Adaptive::new);
        Policy {
            config,
            history: VecDeque::new(),
            burst_until: None,
            adaptive,
            manual_until: None,
        }
    }

    /// The adaptive keep-alive's state, with `cooldown_period = "adaptive"`.
    pub fn adaptive(&self) -> Option<&Adaptive> {
        self.adaptive.as_ref()
    }

    /// The same, to load a persisted histogram into.
    pub fn adaptive_mut(&mut self) -> Option<&mut Adaptive> {
        self.adaptive.as_mut()
    }

    /// Every sample: lets the adaptive keep-alive see arrivals and idle periods. Reports a
    /// pre-warm that an arrival used.
    pub fn observe(&mut self, t: Duration, inputs: &Inputs) -> Option<PrewarmEvent> {
        let adaptive = self.adaptive.as_mut()?;
        adaptive.replicas(t, inputs.ready, inputs.current);
        adaptive.observe(t, inputs.in_flight, inputs.idle_for)
    }

    /// The learned windows' say at `t`, when they have one: adaptive, idle, no manual scale
    /// being held.
    fn phase(&self, t: Duration) -> Option<Phase> {
        if self.manual_until.is_some_and(|until| t < until) {
            return None;
        }
        match self.adaptive.as_ref()?.phase(t) {
            Phase::Unknown => None,
            phase => Some(phase),
        }
    }

    /// When a policy at rest must look again by itself (a pre-warm to start), if ever.
    pub fn wake_at(&self, t: Duration) -> Option<Duration> {
        self.adaptive.as_ref()?.wake_at(t)
    }

    /// The configuration it applies.
    pub fn config(&self) -> &AutoscalerConfig {
        &self.config
    }

    /// Per-replica target of the mode, or `None` for `type = "none"`.
    fn target(&self) -> Option<f64> {
        match self.config.mode {
            ScaleMode::Rps { threshold } => Some(threshold),
            ScaleMode::Concurrency {
                target_ongoing_requests,
            } => Some(target_ongoing_requests),
            ScaleMode::Queue { queue_length } => Some(queue_length),
            ScaleMode::Cpu { target_cpu_percent } => Some(target_cpu_percent),
            ScaleMode::None => None,
        }
    }

    fn clamp(&self, n: u32, in_flight: u64) -> u32 {
        let floor = if in_flight > 0 { 1 } else { 0 };
        n.max(floor)
            .clamp(self.config.min_replicas, self.config.max_replicas)
    }

    fn ceil_ratio(metric: f64, target: f64) -> u32 {
        // A metric computed as a rate (CPU seconds over seconds) lands a rounding error above an
        // exact multiple of the target: that is the multiple, not one more replica.
        let r = (metric / target - 1e-9).ceil();
        if r.is_finite() && r > 0.0 {
            r.min(u32::MAX as f64) as u32
        } else {
            0
        }
    }

    /// Whether the burst window shows at least twice the current capacity.
    fn burst_condition(&self, inputs: &Inputs) -> Option<u32> {
        let target = self.target()?;
        let capacity = inputs.ready.max(1) as f64 * target;
        (inputs.burst_metric >= 2.0 * capacity).then(|| {
            self.clamp(
                Self::ceil_ratio(inputs.burst_metric, target),
                inputs.in_flight,
            )
        })
    }

    /// Checked between ticks: in a burst, the replica count to go up to now (if higher than current).
    pub fn burst_check(&mut self, t: Duration, inputs: &Inputs) -> Option<u32> {
        let need = self.burst_condition(inputs)?;
        self.burst_until = Some(t + self.config.window);
        self.remember(t, need);
        (need > inputs.current).then_some(need)
    }

    /// Whether every later decision is zero until something arrives: no burst, and nothing above
    /// zero remembered for the cooldown. With zero load, [`Policy::decide`] then stays at zero.
    /// With the adaptive keep-alive, a function in its zero phase is at rest whatever it remembers
    /// (only an arrival or the pre-warm time changes that).
    pub fn at_rest(&self, t: Duration) -> bool {
        !self.in_burst(t)
            && match self.phase(t) {
                Some(Phase::Down) => true,
                Some(_) => false,
                None => self.history.iter().all(|(_, c)| *c == 0),
            }
    }

    /// Frees the memory of a policy [at rest](Policy::at_rest): the remembered candidates are
    /// all zero, and a maximum over them and a new candidate is that candidate.
    pub fn rest(&mut self) {
        self.history = VecDeque::new();
    }

    /// Whether burst mode is on at `t`.
    pub fn in_burst(&self, t: Duration) -> bool {
        self.burst_until.is_some_and(|until| t < until)
    }

    fn remember(&mut self, t: Duration, candidate: u32) {
        self.history.push_back((t, candidate));
        let keep_from = t.saturating_sub(self.config.cooldown_period);
        while self.history.front().is_some_and(|(at, _)| *at < keep_from) {
            self.history.pop_front();
        }
    }

    /// A manual scale: the count is treated as a desired count seen now, replacing older memory,
    /// so the loop does not scale below it until `cooldown_period` passes (but may scale above it).
    pub fn manual(&mut self, t: Duration, replicas: u32) {
        self.history.clear();
        self.burst_until = None;
        self.history.push_back((t, replicas));
        if self.adaptive.is_some() {
            self.manual_until = Some(t + self.config.cooldown_period);
        }
    }

    /// One tick's decision.
    pub fn decide(&mut self, t: Duration, inputs: &Inputs) -> Decision {
        let Some(target) = self.target() else {
            return Decision {
                desired: inputs.current,
                raw: inputs.current,
                burst: false,
                prewarm: None,
            };
        };
        let raw = Self::ceil_ratio(inputs.metric, target);
        let mut candidate = self.clamp(raw, inputs.in_flight);
        if let Some(need) = self.burst_condition(inputs) {
            self.burst_until = Some(t + self.config.window);
            candidate = candidate.max(need);
        }
        self.remember(t, candidate);
        let burst = self.in_burst(t);
        if !burst && self.burst_until.is_some() {
            self.burst_until = None;
        }
        let mut desired = self
            .history
            .iter()
            .map(|(_, c)| *c)
            .max()
            .unwrap_or(candidate);
        if burst {
            desired = desired.max(inputs.current);
        }
        let mut prewarm = None;
        match self.phase(t).filter(|_| inputs.in_flight == 0 && !burst) {
            // The learned windows decide the last replica.
            Some(Phase::Warm) => desired = desired.max(1),
            Some(Phase::Down) => {
                desired = 0;
                if inputs.current > 0 {
                    prewarm = self.adaptive.as_mut().and_then(Adaptive::unloaded);
                }
            }
            Some(Phase::Prewarm) => {
                desired = desired.min(inputs.current).max(1);
                if inputs.current == 0 {
                    if let Some(a) = self.adaptive.as_mut() {
                        a.prewarm_started(t);
                    }
                    prewarm = Some(PrewarmEvent::Started);
                }
            }
            // Zero only after a whole cooldown with nothing arriving or in flight.
            _ => {
                if desired == 0
                    && inputs.current > 0
                    && (inputs.in_flight > 0 || inputs.idle_for < self.config.cooldown_period)
                {
                    desired = 1;
                }
            }
        }
        Decision {
            desired: desired.clamp(self.config.min_replicas, self.config.max_replicas),
            raw,
            burst,
            prewarm,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rps(min: u32, max: u32) -> AutoscalerConfig {
        AutoscalerConfig {
            mode: ScaleMode::Rps { threshold: 100.0 },
            min_replicas: min,
            max_replicas: max,
            window: Duration::from_secs(30),
            polling_interval: Duration::from_secs(1),
            cooldown_period: Duration::from_secs(300),
            adaptive: None,
        }
    }

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn load(current: u32, metric: f64) -> Inputs {
        Inputs {
            ready: current,
            current,
            metric,
            burst_metric: metric,
            in_flight: 0,
            idle_for: Duration::ZERO,
        }
    }

    #[test]
    fn desired_is_the_ceiling_of_metric_over_target() {
        let mut p = Policy::new(rps(1, 10));
        assert_eq!(p.decide(s(0), &load(1, 250.0)).desired, 3);
        let mut p = Policy::new(rps(1, 10));
        assert_eq!(p.decide(s(0), &load(1, 100.0)).desired, 1);
    }

    #[test]
    fn bounds_are_respected() {
        let mut p = Policy::new(rps(2, 4));
        assert_eq!(p.decide(s(0), &load(2, 0.0)).desired, 2);
        assert_eq!(p.decide(s(1), &load(2, 10_000.0)).desired, 4);
    }

    #[test]
    fn no_scale_down_inside_the_cooldown_then_down() {
        let mut p = Policy::new(rps(1, 10));
        assert_eq!(p.decide(s(0), &load(1, 500.0)).desired, 5);
        assert_eq!(p.decide(s(10), &load(5, 100.0)).desired, 5);
        assert_eq!(p.decide(s(299), &load(5, 100.0)).desired, 5);
        assert_eq!(p.decide(s(301), &load(5, 100.0)).desired, 1);
    }

    #[test]
    fn scale_to_zero_needs_a_whole_idle_cooldown() {
        let mut p = Policy::new(rps(0, 5));
        let mut inputs = load(1, 0.0);
        inputs.idle_for = s(100);
        assert_eq!(p.decide(s(400), &inputs).desired, 1, "idle only 100 s");
        inputs.idle_for = s(300);
        assert_eq!(p.decide(s(600), &inputs).desired, 0);
    }

    #[test]
    fn a_long_running_request_keeps_the_function_alive() {
        let mut p = Policy::new(rps(0, 5));
        let mut inputs = load(1, 0.0);
        inputs.idle_for = s(10_000);
        inputs.in_flight = 1;
        assert_eq!(p.decide(s(10_000), &inputs).desired, 1);
    }

    #[test]
    fn held_requests_scale_up_from_zero() {
        let mut p = Policy::new(rps(0, 5));
        let mut inputs = load(0, 0.0);
        inputs.in_flight = 3;
        assert_eq!(p.decide(s(0), &inputs).desired, 1);
    }

    #[test]
    fn burst_scales_up_between_ticks_and_blocks_scale_down() {
        let mut p = Policy::new(rps(1, 20));
        // 2 replicas handle 200 per window; the burst window extrapolates to 1000.
        let mut inputs = load(2, 150.0);
        inputs.burst_metric = 1000.0;
        assert_eq!(p.burst_check(s(0), &inputs), Some(10));
        assert!(p.in_burst(s(1)));
        // Load drops; still in burst for a window: no scale-down even after the cooldown.
        let calm = load(10, 0.0);
        let mut p2 = p.clone();
        assert_eq!(p2.decide(s(29), &calm).desired, 10);
        // Below twice capacity: not a burst.
        let mut p3 = Policy::new(rps(1, 20));
        let mut mild = load(2, 150.0);
        mild.burst_metric = 350.0;
        assert_eq!(p3.burst_check(s(0), &mild), None);
    }

    #[test]
    fn manual_scale_holds_for_the_cooldown_but_load_can_raise_it() {
        let mut p = Policy::new(rps(1, 10));
        p.manual(s(0), 4);
        assert_eq!(p.decide(s(1), &load(4, 0.0)).desired, 4);
        assert_eq!(p.decide(s(2), &load(4, 700.0)).desired, 7);
        p.manual(s(3), 2);
        assert_eq!(
            p.decide(s(4), &load(2, 0.0)).desired,
            2,
            "manual scale-down sticks"
        );
        assert_eq!(p.decide(s(400), &load(2, 0.0)).desired, 1);
    }

    #[test]
    fn concurrency_mode_uses_target_ongoing_requests() {
        let mut cfg = rps(1, 10);
        cfg.mode = ScaleMode::Concurrency {
            target_ongoing_requests: 2.0,
        };
        let mut p = Policy::new(cfg);
        assert_eq!(p.decide(s(0), &load(1, 7.0)).desired, 4);
    }

    #[test]
    fn mode_none_keeps_the_current_count() {
        let mut cfg = rps(0, 10);
        cfg.mode = ScaleMode::None;
        let mut p = Policy::new(cfg);
        assert_eq!(p.decide(s(0), &load(3, 1e6)).desired, 3);
    }
}
