//! `sluicegate simulate`: replays a request trace through the real autoscaler on virtual time.
//!
//! A deterministic discrete-event simulation, one function at a time, with no clock and no
//! runtime: time is a [`Duration`] since the start of the run. The autoscaler part is the live
//! loop's own [`Controller`] (so the real [`Policy`](crate::autoscaler::Policy)) fed with
//! [`Figures`] built exactly as the live loop builds them — the window is the same bucketed
//! [`Ring`] — sampled every [`sample_interval`] (on whole milliseconds, as tokio's timer fires),
//! deciding on the first sample at or after each `polling_interval`. Around it, a
//! model of the gateway and the provider:
//!
//! * a replica is ready `cold_start` after it is asked for, and costs from that moment until it
//!   is gone;
//! * a request being served uses `request_cpu` cores of CPU for its whole duration (what the
//!   `cpu` autoscaler mode measures; no contention is modelled);
//! * a ready replica serves at most `max_ongoing_requests` at once; a request takes the
//!   least-loaded ready replica (the oldest among equals), else waits in a FIFO queue of at most
//!   `max_queued_requests`, else is shed (queue full);
//! * a waiting request is shed (timeout) after `cold_start_timeout` if the function had no ready
//!   replica when it arrived, else after `queue_timeout`;
//! * the first request that finds no ready replica while none is asked for asks for
//!   `max(min_replicas, 1)` at once (the gateway's wake-up from zero), even if it is shed;
//! * scale-down removes starting replicas first, then the least-loaded ready ones; a replica that
//!   is still serving takes no new request and goes when its last one finishes (as the process
//!   provider drains).
//!
//! Events at the same instant run in this order: requests finishing, replicas becoming ready,
//! timeouts, arrivals, the autoscaler's sample. The run lasts until the trace's end, and then
//! until every request has been served or shed.

pub mod compare;
pub mod svg;
pub mod trace;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::autoscaler::adaptive::PrewarmEvent;
use crate::autoscaler::{next_decision, sample_interval, Controller};
use crate::config::{Config, FunctionConfig, ScaleMode};
use crate::function::window::Ring;
use crate::function::Figures;
pub use trace::{MinuteOptions, Request, Shape, ShapeParams, Trace, TraceError};

/// Time from asking for a replica to its being ready, when `--cold-start` is not given.
pub const DEFAULT_COLD_START: Duration = Duration::from_secs(2);
/// Cores a request keeps busy while it is served, when `--request-cpu` is not given.
pub const DEFAULT_REQUEST_CPU: f64 = 1.0;

/// How the model differs from run to run (the trace aside).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Options {
    /// Time from asking for a replica to its being ready.
    pub cold_start: Duration,
    /// Cores a request keeps busy while it is served (CPU seconds per second of service), for
    /// the `cpu` autoscaler mode.
    pub request_cpu: f64,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            cold_start: DEFAULT_COLD_START,
            request_cpu: DEFAULT_REQUEST_CPU,
        }
    }
}

/// The result of a whole run.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// One per configured function, by name.
    pub functions: Vec<FunctionReport>,
}

/// The result for one function.
#[derive(Clone, Debug, PartialEq)]
pub struct FunctionReport {
    /// The function's name.
    pub name: String,
    /// What was counted.
    pub summary: Summary,
    /// What happened over time, for the chart.
    pub timeline: Timeline,
}

/// The figures a user compares configurations by. Times are seconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    /// The function's name.
    pub function: String,
    /// Length of the simulated run for this function, seconds.
    pub simulated_seconds: f64,
    /// Requests that arrived.
    pub requests: u64,
    /// Requests served to the end.
    pub served: u64,
    /// Requests shed at once because `max_queued_requests` were waiting.
    pub shed_queue_full: u64,
    /// Requests shed after waiting `queue_timeout` behind busy replicas.
    pub shed_queue_timeout: u64,
    /// Requests shed after waiting `cold_start_timeout` for a first ready replica.
    pub shed_cold_start_timeout: u64,
    /// Served requests that had to wait for a slot.
    pub held: u64,
    /// Of those, the ones that arrived while the function had no ready replica.
    pub held_cold_start: u64,
    /// Mean wait of the held requests, seconds (0 when none).
    pub hold_mean_seconds: f64,
    /// 99th percentile (nearest rank) wait of the held requests, seconds (0 when none).
    pub hold_p99_seconds: f64,
    /// Longest wait of a held request, seconds (0 when none).
    pub hold_max_seconds: f64,
    /// Sum over replicas of the time from being asked for to being gone, seconds.
    pub replica_seconds: f64,
    /// Most replicas asked for at once.
    pub peak_replicas: u32,
    /// Most replicas ready at once.
    pub peak_ready_replicas: u32,
    /// Scale-ups from zero replicas.
    pub cold_starts: u64,
    /// Requests that arrived while the function had no ready replica (they waited for a cold
    /// start, or were shed): what a user feels as a cold start.
    pub cold_start_requests: u64,
    /// Replica-seconds during which the replica served no request (starting ones included).
    pub idle_replica_seconds: f64,
    /// `cooldown_period = "adaptive"`: replicas started before a predicted request.
    pub prewarms: u64,
    /// Of those, the ones a request arrived for while they were up.
    pub prewarms_used: u64,
    /// And the ones that went unused.
    pub prewarms_wasted: u64,
    /// Scale-ups the autoscaler asked for (burst or tick; wake-ups from zero not included).
    pub scale_ups: u64,
    /// Scale-downs the autoscaler asked for.
    pub scale_downs: u64,
}

impl Summary {
    /// Requests shed for any reason.
    pub fn shed(&self) -> u64 {
        self.shed_queue_full + self.shed_queue_timeout + self.shed_cold_start_timeout
    }
}

/// What happened over time to one function, for [`svg::render`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timeline {
    /// Arrival times.
    pub arrivals: Vec<Duration>,
    /// Times requests were shed.
    pub shed: Vec<Duration>,
    /// `(t, asked for, ready)` at the start and at each change.
    pub replicas: Vec<(Duration, u32, u32)>,
    /// End of the run.
    pub end: Duration,
}

/// Runs every configured function through its part of `trace` (functions without requests see
/// an empty trace of the same length).
///
/// With a per-minute trace read against a one-function config ([`Trace::template`]), every
/// function of the trace is simulated with that function's settings under its own name.
/// Functions are simulated in parallel, one thread per available CPU; the report is the same
/// whatever the number of threads.
pub fn run(config: &Config, trace: &Trace, options: &Options) -> Report {
    let none = Vec::new();
    let jobs: Vec<(std::borrow::Cow<'_, FunctionConfig>, &[Request])> = match &trace.template {
        Some(template) => {
            let template = &config.functions[template];
            trace
                .requests
                .iter()
                .map(|(name, requests)| {
                    let mut f = template.clone();
                    f.name = name.clone();
                    (std::borrow::Cow::Owned(f), requests.as_slice())
                })
                .collect()
        }
        None => config
            .functions
            .values()
            .map(|f| {
                let requests = trace.requests.get(&f.name).unwrap_or(&none);
                (std::borrow::Cow::Borrowed(f), requests.as_slice())
            })
            .collect(),
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(jobs.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<Option<FunctionReport>> = vec![None; jobs.len()];
    let done = std::sync::Mutex::new(&mut results);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((f, requests)) = jobs.get(i) else {
                    return;
                };
                let report = simulate_function(f, requests, trace.end, options);
                done.lock().unwrap()[i] = Some(report);
            });
        }
    });
    Report {
        functions: results
            .into_iter()
            .map(|r| r.expect("every job ran"))
            .collect(),
    }
}

/// Simulates one function: `requests` must be sorted by arrival; the run lasts at least until
/// `end`, and then until every request has been served or shed.
pub fn simulate_function(
    config: &FunctionConfig,
    requests: &[Request],
    end: Duration,
    options: &Options,
) -> FunctionReport {
    let mut sim = Sim::new(config, requests, options);
    sim.run(end);
    sim.report()
}

/// When the live loop's `n`th sample runs, for a nominal time `at`: tokio's timer fires on whole
/// milliseconds, rounding deadlines up. It matters: with `rate_seconds = 10` the sample interval
/// is 166.666666 ms, and the sample due at 499.999998 ms runs at 500 ms, in time for a 500 ms
/// `polling_interval`.
fn tick(at: Duration) -> Duration {
    let ms = at.as_nanos().div_ceil(1_000_000);
    Duration::from_millis(ms as u64)
}

/// What happens at an instant. The derived order is the order at equal times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// Request `request` finishes on replica `replica`.
    Finish { replica: u64, request: usize },
    /// Replica `replica` becomes ready.
    Ready { replica: u64 },
    /// Request `request` has waited as long as it may.
    Timeout { request: usize },
    /// Request `request` arrives.
    Arrive { request: usize },
    /// The timer of a loop at rest (a pre-warm to start) fires, if it is still the rest `rest`.
    Wake { rest: u64 },
    /// The autoscaler loop wakes up.
    Sample,
}

#[derive(Clone, Copy, Debug)]
struct Replica {
    id: u64,
    ready: bool,
    /// Removed by a scale-down, finishing its requests.
    draining: bool,
    busy: u32,
}

#[derive(Clone, Copy, Debug)]
struct Waiter {
    request: usize,
    arrived: Duration,
    cold: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    Pending,
    Queued,
    Done,
}

struct Sim<'a> {
    config: &'a FunctionConfig,
    requests: &'a [Request],
    options: Options,
    /// `None` when the function is not scaled automatically (no loop runs for it).
    controller: Option<Controller>,
    /// Whether the provider can change the replica count (`process`; not `static`).
    scalable: bool,
    ring: Ring,
    every: Duration,
    /// Samples taken so far (the index of the next one on the grid).
    samples: u32,
    /// While the loop rests (see `Autoscaler::run`): when its last step was taken.
    resting: Option<Duration>,
    /// Rests so far (a timer set for an earlier rest is ignored).
    rests: u64,
    next_decision: Duration,
    events: BinaryHeap<Reverse<(Duration, Event, u64)>>,
    seq: u64,
    now: Duration,
    last_activity: Duration,
    replicas: Vec<Replica>,
    next_replica: u64,
    queue: VecDeque<Waiter>,
    state: Vec<State>,
    ongoing: u64,
    replica_nanos: u128,
    /// CPU seconds used by requests so far.
    cpu_seconds: f64,
    idle_nanos: u128,
    holds: Vec<Duration>,
    summary: Summary,
    timeline: Timeline,
}

impl<'a> Sim<'a> {
    fn new(config: &'a FunctionConfig, requests: &'a [Request], options: &Options) -> Sim<'a> {
        let auto = &config.autoscaler;
        let scalable = config.provider.scalable();
        let initial = config.provider.initial_replicas(auto);
        let controller =
            (scalable && auto.mode != ScaleMode::None).then(|| Controller::new(auto.clone()));
        let mut sim = Sim {
            config,
            requests,
            options: *options,
            controller,
            scalable,
            ring: Ring::new(auto.window),
            every: sample_interval(auto.window, auto.polling_interval),
            samples: 0,
            resting: None,
            rests: 0,
            next_decision: auto.polling_interval,
            events: BinaryHeap::new(),
            seq: 0,
            now: Duration::ZERO,
            last_activity: Duration::ZERO,
            replicas: Vec::new(),
            next_replica: 0,
            queue: VecDeque::new(),
            state: vec![State::Pending; requests.len()],
            ongoing: 0,
            replica_nanos: 0,
            cpu_seconds: 0.0,
            idle_nanos: 0,
            holds: Vec::new(),
            summary: Summary {
                function: config.name.clone(),
                ..Summary::default()
            },
            timeline: Timeline::default(),
        };
        // The run starts as a gateway that has been up a while: the initial replicas are ready.
        for _ in 0..initial {
            sim.next_replica += 1;
            sim.replicas.push(Replica {
                id: sim.next_replica,
                ready: true,
                draining: false,
                busy: 0,
            });
        }
        sim.record_replicas();
        for (i, r) in requests.iter().enumerate() {
            sim.schedule(r.time, Event::Arrive { request: i });
        }
        if sim.controller.is_some() {
            sim.schedule(Duration::ZERO, Event::Sample);
        }
        sim
    }

    fn schedule(&mut self, at: Duration, event: Event) {
        self.seq += 1;
        self.events.push(Reverse((at, event, self.seq)));
    }

    fn run(&mut self, end: Duration) {
        while let Some(Reverse((at, event, _))) = self.events.peek().copied() {
            if at > end && self.ongoing == 0 && self.queue.is_empty() {
                break;
            }
            self.events.pop();
            if let Event::Timeout { request } = event {
                if self.state[request] != State::Queued {
                    continue; // served meanwhile: nothing happens at this instant
                }
            }
            self.advance(at);
            match event {
                Event::Finish { replica, request } => self.finish(replica, request),
                Event::Ready { replica } => self.ready(replica),
                Event::Timeout { request } => self.time_out(request),
                Event::Arrive { request } => self.arrive(request),
                Event::Wake { rest } => {
                    if rest == self.rests {
                        self.wake();
                    }
                }
                Event::Sample => self.sample(),
            }
        }
        let end = end.max(self.now);
        self.advance(end);
        self.timeline.end = end;
    }

    /// Moves the clock to `t`, charging every existing replica for the time passed.
    fn advance(&mut self, t: Duration) {
        let passed = t.saturating_sub(self.now);
        if !passed.is_zero() {
            let idle = self.replicas.iter().filter(|r| r.busy == 0).count();
            self.replica_nanos += passed.as_nanos() * self.replicas.len() as u128;
            self.idle_nanos += passed.as_nanos() * idle as u128;
        }
        self.cpu_seconds += passed.as_secs_f64() * self.ongoing as f64 * self.options.request_cpu;
        self.now = t;
    }

    fn asked(&self) -> u32 {
        self.replicas.iter().filter(|r| !r.draining).count() as u32
    }

    fn ready_count(&self) -> u32 {
        self.replicas
            .iter()
            .filter(|r| r.ready && !r.draining)
            .count() as u32
    }

    fn record_replicas(&mut self) {
        let (t, asked, ready) = (self.now, self.asked(), self.ready_count());
        self.summary.peak_replicas = self.summary.peak_replicas.max(asked);
        self.summary.peak_ready_replicas = self.summary.peak_ready_replicas.max(ready);
        let points = &mut self.timeline.replicas;
        match points.last_mut() {
            Some(last) if last.1 == asked && last.2 == ready => {}
            Some(last) if last.0 == t => *last = (t, asked, ready),
            _ => points.push((t, asked, ready)),
        }
    }

    fn touch(&mut self) {
        self.last_activity = self.last_activity.max(self.now);
    }

    /// The least-loaded ready replica with room (the oldest among equals), as an index.
    fn free_slot(&self) -> Option<usize> {
        let max = self.config.max_ongoing_requests;
        self.replicas
            .iter()
            .enumerate()
            .filter(|(_, r)| r.ready && !r.draining && r.busy < max)
            .min_by_key(|(_, r)| r.busy)
            .map(|(i, _)| i)
    }

    fn start(&mut self, slot: usize, request: usize) {
        let replica = &mut self.replicas[slot];
        replica.busy += 1;
        let id = replica.id;
        self.ongoing += 1;
        self.state[request] = State::Done;
        let done = self.now + self.requests[request].duration;
        self.schedule(
            done,
            Event::Finish {
                replica: id,
                request,
            },
        );
    }

    /// Gives free slots to the head of the queue, in order, until either runs out.
    fn dispatch(&mut self) {
        while let Some(head) = self.queue.front().copied() {
            let Some(slot) = self.free_slot() else {
                break;
            };
            self.queue.pop_front();
            let held = self.now - head.arrived;
            self.holds.push(held);
            self.summary.held += 1;
            self.summary.held_cold_start += head.cold as u64;
            self.start(slot, head.request);
        }
    }

    fn arrive(&mut self, request: usize) {
        self.summary.requests += 1;
        self.timeline.arrivals.push(self.now);
        self.ring.record(self.now);
        self.touch();
        if self.ready_count() == 0 {
            self.summary.cold_start_requests += 1;
        }
        // The arrival wakes a loop at rest (`Function::started`).
        if self.resting.is_some() {
            self.wake();
        }
        if self.queue.is_empty() {
            if let Some(slot) = self.free_slot() {
                self.start(slot, request);
                return;
            }
        }
        let cold = self.ready_count() == 0;
        if let Some(max) = self.config.max_queued_requests {
            if self.queue.len() >= max as usize {
                self.state[request] = State::Done;
                self.summary.shed_queue_full += 1;
                self.timeline.shed.push(self.now);
                if cold {
                    self.wake_from_zero();
                }
                return;
            }
        }
        self.queue.push_back(Waiter {
            request,
            arrived: self.now,
            cold,
        });
        self.state[request] = State::Queued;
        let limit = if cold {
            self.config.cold_start_timeout
        } else {
            self.config.queue_timeout
        };
        self.schedule(self.now + limit, Event::Timeout { request });
        if cold {
            self.wake_from_zero();
        }
    }

    /// A request found no ready replica: ask for `max(min_replicas, 1)` unless some are asked for.
    fn wake_from_zero(&mut self) {
        if self.scalable && self.asked() == 0 {
            self.scale_to(self.config.autoscaler.wake_replicas());
        }
    }

    fn time_out(&mut self, request: usize) {
        let Some(pos) = self.queue.iter().position(|w| w.request == request) else {
            return;
        };
        let waiter = self.queue.remove(pos).expect("position is in range");
        self.state[request] = State::Done;
        if waiter.cold && self.ready_count() == 0 {
            self.summary.shed_cold_start_timeout += 1;
        } else {
            self.summary.shed_queue_timeout += 1;
        }
        self.timeline.shed.push(self.now);
    }

    fn finish(&mut self, replica: u64, _request: usize) {
        let index = self
            .replicas
            .iter()
            .position(|r| r.id == replica)
            .expect("a busy replica stays until its requests finish");
        let r = &mut self.replicas[index];
        r.busy -= 1;
        if r.draining && r.busy == 0 {
            self.replicas.remove(index);
        }
        self.ongoing -= 1;
        self.summary.served += 1;
        self.touch();
        self.dispatch();
    }

    fn ready(&mut self, replica: u64) {
        // A replica removed while starting never becomes ready.
        if let Some(r) = self
            .replicas
            .iter_mut()
            .find(|r| r.id == replica && !r.draining)
        {
            r.ready = true;
            self.record_replicas();
            self.dispatch();
        }
    }

    /// The live loop's step: figures → controller → apply.
    fn sample(&mut self) {
        let t = self.now;
        let decide = t >= self.next_decision;
        if decide {
            self.next_decision = next_decision(
                self.next_decision,
                t,
                self.config.autoscaler.polling_interval,
            );
        }
        let figures = Figures {
            ready: self.ready_count(),
            replicas: self.asked(),
            ongoing: self.ongoing,
            queued: self.queue.len() as u64,
            window_requests: self.ring.sum(t),
            burst_requests: self.ring.sum_burst(t),
            idle_for: t.saturating_sub(self.last_activity),
            backlog: 0,
            cpu_seconds: self.cpu_seconds,
        };
        let controller = self
            .controller
            .as_mut()
            .expect("samples are scheduled only with a controller");
        let step = controller.step(t, &figures, None, decide);
        let at_rest = controller.at_rest(t, &step);
        match step.prewarm {
            Some(PrewarmEvent::Started) => self.summary.prewarms += 1,
            Some(PrewarmEvent::Used) => self.summary.prewarms_used += 1,
            Some(PrewarmEvent::Wasted) => self.summary.prewarms_wasted += 1,
            None => {}
        }
        if let Some(up) = step.burst {
            self.apply(up);
        }
        if let Some(decision) = step.decision {
            self.apply(decision.desired);
        }
        self.samples += 1;
        if !at_rest {
            self.schedule(tick(self.every * self.samples), Event::Sample);
            return;
        }
        // At rest, as the live loop: no sample until an arrival or the controller's timer.
        let controller = self.controller.as_mut().expect("checked above");
        controller.rest();
        self.resting = Some(t);
        self.rests += 1;
        if let Some(at) = controller.wake_at(t) {
            self.schedule(tick(at), Event::Wake { rest: self.rests });
        }
    }

    /// The loop at rest wakes up now: back on the sample grid at its next point, with the zero
    /// samples it skipped, and the decision that fell due meanwhile taken at that sample.
    fn wake(&mut self) {
        let Some(rested) = self.resting.take() else {
            return;
        };
        let woke = self.now;
        let every = self.every;
        let ticks = woke.as_nanos() / every.as_nanos().max(1) + 1;
        self.samples = ticks as u32;
        self.schedule(tick(every * self.samples), Event::Sample);
        let controller = self
            .controller
            .as_mut()
            .expect("resting needs a controller");
        controller.rested(rested, woke, every);
        let polling = self.config.autoscaler.polling_interval;
        if woke >= self.next_decision {
            self.next_decision =
                next_decision(self.next_decision, woke, polling).saturating_sub(polling);
        }
    }

    /// Like the live loop's `apply`: no change, or never to zero while anything is in flight.
    fn apply(&mut self, desired: u32) {
        let current = self.asked();
        if desired == current || (desired == 0 && self.ongoing + self.queue.len() as u64 > 0) {
            return;
        }
        if desired > current {
            self.summary.scale_ups += 1;
        } else {
            self.summary.scale_downs += 1;
        }
        self.scale_to(desired);
    }

    /// The provider's reconcile: start replicas, or remove starting ones first, then the
    /// least-loaded ready ones (draining those still serving).
    fn scale_to(&mut self, want: u32) {
        let have = self.asked();
        if have == 0 && want > 0 {
            self.summary.cold_starts += 1;
        }
        for _ in have..want {
            self.next_replica += 1;
            let id = self.next_replica;
            self.replicas.push(Replica {
                id,
                ready: false,
                draining: false,
                busy: 0,
            });
            self.schedule(
                self.now + self.options.cold_start,
                Event::Ready { replica: id },
            );
        }
        for _ in want..have {
            let index = self
                .replicas
                .iter()
                .rposition(|r| !r.ready && !r.draining)
                .or_else(|| {
                    self.replicas
                        .iter()
                        .enumerate()
                        .filter(|(_, r)| !r.draining)
                        .min_by_key(|(_, r)| r.busy)
                        .map(|(i, _)| i)
                })
                .expect("have > want >= 0");
            if self.replicas[index].busy == 0 {
                self.replicas.remove(index);
            } else {
                self.replicas[index].draining = true;
            }
        }
        self.record_replicas();
    }

    fn report(mut self) -> FunctionReport {
        let s = &mut self.summary;
        s.simulated_seconds = self.timeline.end.as_secs_f64();
        s.replica_seconds = self.replica_nanos as f64 / 1e9;
        s.idle_replica_seconds = self.idle_nanos as f64 / 1e9;
        if !self.holds.is_empty() {
            self.holds.sort();
            let n = self.holds.len();
            let total: Duration = self.holds.iter().sum();
            s.hold_mean_seconds = total.as_secs_f64() / n as f64;
            s.hold_p99_seconds = self.holds[(n * 99).div_ceil(100) - 1].as_secs_f64();
            s.hold_max_seconds = self.holds[n - 1].as_secs_f64();
        }
        FunctionReport {
            name: self.config.name.clone(),
            summary: self.summary,
            timeline: self.timeline,
        }
    }
}

impl Report {
    /// The per-function table `sluicegate simulate` prints.
    pub fn table(&self) -> String {
        let header = [
            "function",
            "requests",
            "served",
            "shed full",
            "shed timeout",
            "held",
            "hold mean",
            "hold p99",
            "replica-s",
            "peak",
            "cold starts",
        ];
        let secs = |held: u64, v: f64| {
            if held == 0 {
                "-".to_owned()
            } else {
                format!("{v:.3}s")
            }
        };
        let rows: Vec<[String; 11]> = self
            .functions
            .iter()
            .map(|f| {
                let s = &f.summary;
                [
                    f.name.clone(),
                    s.requests.to_string(),
                    s.served.to_string(),
                    s.shed_queue_full.to_string(),
                    (s.shed_queue_timeout + s.shed_cold_start_timeout).to_string(),
                    s.held.to_string(),
                    secs(s.held, s.hold_mean_seconds),
                    secs(s.held, s.hold_p99_seconds),
                    format!("{:.1}", s.replica_seconds),
                    s.peak_replicas.to_string(),
                    s.cold_starts.to_string(),
                ]
            })
            .collect();
        let widths: Vec<usize> = (0..header.len())
            .map(|c| {
                rows.iter()
                    .map(|r| r[c].len())
                    .chain([header[c].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        let line = |out: &mut String, cells: &[&str]| {
            let mut text = String::new();
            for (c, cell) in cells.iter().enumerate() {
                if c == 0 {
                    let _ = write!(text, "{cell:<w$}", w = widths[c]);
                } else {
                    let _ = write!(text, "  {cell:>w$}", w = widths[c]);
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        line(&mut out, &header);
        for row in &rows {
            let cells: Vec<&str> = row.iter().map(String::as_str).collect();
            line(&mut out, &cells);
        }
        out
    }

    /// The summaries as pretty-printed JSON (`--json`).
    pub fn json(&self) -> String {
        let summaries: Vec<&Summary> = self.functions.iter().map(|f| &f.summary).collect();
        serde_json::to_string_pretty(&summaries).expect("summaries serialize")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::trace::{generate, parse_csv, parse_seconds, shape_trace, SplitMix64};
    use super::*;

    /// One function, one request in flight per replica, a queue of two, rps mode with a 6 s
    /// window (so a 100 ms sample interval and a 600 ms burst window).
    const CONFIG: &str = r#"
[functions.f]
provider = "process"
command = ["x"]
max_ongoing_requests = 1
max_queued_requests = 2
queue_timeout = "3s"
cold_start_timeout = "5s"

[functions.f.autoscaler]
type = "rps"
min_replicas = 0
max_replicas = 3
threshold = 6
rate_seconds = 6
polling_interval = 1
cooldown_period = 5
"#;

    /// Wake-up from zero with a full queue; a burst; a scale-down that drains busy replicas and
    /// lets a queued request time out; scale to zero; a second cold start.
    const TRACE: &str = "time,duration
0,1
0.5,1
1,1
4,8
4.1,0.2
4.2,0.2
4.3,0.2
4.4,0.2
10.5,5
10.6,5
10.7,1
30,0.5
";

    fn config(text: &str) -> Config {
        Config::parse(std::path::Path::new("t.toml"), text, None).unwrap()
    }

    fn simulate(config_text: &str, trace_text: &str, options: Options) -> FunctionReport {
        let config = config(config_text);
        let names: Vec<&str> = config.functions.keys().map(String::as_str).collect();
        let trace = parse_csv(trace_text, &names).unwrap();
        run(&config, &trace, &options).functions.remove(0)
    }

    fn s(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }

    #[test]
    fn small_trace_result_is_pinned() {
        // Worked by hand:
        // 0    the first request finds no replica: held, wakes 1 replica (ready at 2).
        // 0.5  held too. The burst window shows 2 requests (×10 = 20 ≥ 2 × 6): burst to 3.
        // 1    the queue holds 2: shed (queue full).
        // 2    replica 1 ready: the 0 s request starts (held 2 s); 2.5: replicas 2 and 3.
        // 4    8 s request on replica 1; 4.1–4.4 alternate on replicas 2 and 3, no wait.
        // 10.5, 10.6 fill replicas 2 and 3; 10.7 waits (queue_timeout, as replicas are ready).
        // 11   burst over, the 6 s tick's candidate of 2 ages out: down to 2; all are busy,
        //      so the oldest (replica 1) drains until 12.
        // 12   down to 1: replica 2 drains until 15.5. 13.7: the waiting request times out.
        // 22   idle since 15.6 for a whole cooldown, and no candidate above 0: down to zero.
        // 30   a second cold start; served 32–32.5, which ends the run.
        // Replica-seconds: 12 + 15 + 21.5 + 2.5.
        let report = simulate(CONFIG, TRACE, Options::default());
        assert_eq!(
            report.summary,
            Summary {
                function: "f".into(),
                simulated_seconds: 32.5,
                requests: 12,
                served: 10,
                shed_queue_full: 1,
                shed_queue_timeout: 1,
                shed_cold_start_timeout: 0,
                held: 3,
                held_cold_start: 3,
                hold_mean_seconds: 2.0,
                hold_p99_seconds: 2.0,
                hold_max_seconds: 2.0,
                replica_seconds: 51.0,
                peak_replicas: 3,
                peak_ready_replicas: 3,
                cold_starts: 2,
                cold_start_requests: 4,
                idle_replica_seconds: 29.7,
                prewarms: 0,
                prewarms_used: 0,
                prewarms_wasted: 0,
                scale_ups: 1,
                scale_downs: 3,
            }
        );
        assert_eq!(
            report.timeline.replicas,
            vec![
                (s(0.0), 1, 0),
                (s(0.5), 3, 0),
                (s(2.0), 3, 1),
                (s(2.5), 3, 3),
                (s(11.0), 2, 2),
                (s(12.0), 1, 1),
                (s(22.0), 0, 0),
                (s(30.0), 1, 0),
                (s(32.0), 1, 1),
            ]
        );
        assert_eq!(report.timeline.shed, vec![s(1.0), s(13.7)]);
        assert_eq!(report.timeline.end, s(32.5));
    }

    #[test]
    fn small_trace_in_concurrency_mode_is_pinned() {
        // Same trace, scaled on average ongoing+queued (target 1 per replica), worked by hand:
        // 1     the 0–1 s samples average 17/11 requests: up to 2 (ready at 3).
        // 4.2–4.4 wait 0.1–0.3 s behind the two busy replicas.
        // 11.3  the burst window has averaged 4 in flight (≥ 2 × 2 ready): burst to 3.
        // 12    the 10.6 s request gets replica 1 (held 1.4 s); 13.3: the 10.7 s one gets
        //       replica 3 (held 2.6 s) before its 13.7 s timeout, unlike in rps mode.
        // 17    the last candidate of 3 (6 s average 2.43); 23: down to 2, 25: to 1, 28: to 0.
        // Replica-seconds: 23 + 24 + 16.7 + 2.5.
        let config = CONFIG
            .replace("type = \"rps\"", "type = \"concurrency\"")
            .replace("threshold = 6", "target_ongoing_requests = 1");
        let report = simulate(&config, TRACE, Options::default());
        assert_eq!(
            report.summary,
            Summary {
                function: "f".into(),
                simulated_seconds: 32.5,
                requests: 12,
                served: 11,
                shed_queue_full: 1,
                shed_queue_timeout: 0,
                shed_cold_start_timeout: 0,
                held: 8,
                held_cold_start: 3,
                hold_mean_seconds: 1.3875,
                hold_p99_seconds: 2.6,
                hold_max_seconds: 2.6,
                replica_seconds: 66.2,
                peak_replicas: 3,
                peak_ready_replicas: 3,
                cold_starts: 2,
                cold_start_requests: 4,
                idle_replica_seconds: 43.9,
                prewarms: 0,
                prewarms_used: 0,
                prewarms_wasted: 0,
                scale_ups: 2,
                scale_downs: 3,
            }
        );
        assert_eq!(
            report.timeline.replicas,
            vec![
                (s(0.0), 1, 0),
                (s(1.0), 2, 0),
                (s(2.0), 2, 1),
                (s(3.0), 2, 2),
                (s(11.3), 3, 2),
                (s(13.3), 3, 3),
                (s(23.0), 2, 2),
                (s(25.0), 1, 1),
                (s(28.0), 0, 0),
                (s(30.0), 1, 0),
                (s(32.0), 1, 1),
            ]
        );
    }

    #[test]
    fn cpu_mode_scales_on_the_cpu_the_requests_use() {
        let cpu = r#"
[functions.f]
provider = "process"
command = ["x"]
max_ongoing_requests = 10
max_queued_requests = -1

[functions.f.autoscaler]
type = "cpu"
target_cpu_percent = 50
min_replicas = 1
max_replicas = 8
rate_seconds = 10
polling_interval = 1
cooldown_period = 10
"#;
        // Two requests a second, each served for a second: two in flight all along.
        let mut trace = String::from("time,duration\n");
        for i in 0..120 {
            trace.push_str(&format!("{},1\n", i as f64 * 0.5));
        }
        let bound = simulate(cpu, &trace, Options::default());
        // CPU-bound (a core per request): 200 % of one core -> 4 replicas at 50 %.
        assert_eq!(bound.summary.peak_replicas, 4);
        let light = Options {
            request_cpu: 0.1,
            ..Options::default()
        };
        // Mostly waiting (a tenth of a core per request): 20 % -> one replica is enough.
        let io = simulate(cpu, &trace, light);
        assert_eq!(io.summary.peak_replicas, 1);
        assert_eq!(io.summary.scale_ups, 0);
    }

    #[test]
    fn held_requests_are_shed_after_cold_start_timeout() {
        let slow = |secs| Options {
            cold_start: Duration::from_secs(secs),
            ..Options::default()
        };
        let report = simulate(CONFIG, "time,duration\n0,1\n1,1\n", slow(7));
        let s = &report.summary;
        assert_eq!((s.requests, s.served, s.shed_cold_start_timeout), (2, 0, 2));
        assert_eq!(
            report.timeline.shed,
            vec![Duration::from_secs(5), Duration::from_secs(6)]
        );
        // A replica ready at the very instant of a deadline still takes that request.
        let report = simulate(CONFIG, "time,duration\n0,1\n1,1\n", slow(6));
        let s = &report.summary;
        assert_eq!(
            (s.served, s.shed_cold_start_timeout, s.hold_max_seconds),
            (1, 1, 5.0)
        );
    }

    #[test]
    fn without_a_queue_a_shed_request_still_wakes_the_function() {
        // Concurrency mode sees nothing in flight when every request is shed at once, so only
        // the wake-up on arrival can bring the function up from zero.
        let config = CONFIG
            .replace("type = \"rps\"", "type = \"concurrency\"")
            .replace("threshold = 6", "target_ongoing_requests = 1")
            .replace("max_queued_requests = 2", "max_queued_requests = 0");
        let report = simulate(&config, "time,duration\n0,1\n3,1\n", Options::default());
        let summary = &report.summary;
        assert_eq!(
            (summary.shed_queue_full, summary.served, summary.cold_starts),
            (1, 1, 1)
        );
        assert_eq!(
            report.timeline.replicas[..2],
            [(s(0.0), 1, 0), (s(2.0), 1, 1)]
        );
    }

    #[test]
    fn starting_replicas_cost_money_and_the_run_outlasts_the_last_request() {
        // One request, a 2 s cold start, 1 s of work: one replica from 0 to 3 (no scale-down
        // within the run), so 3 replica-seconds although the trace "ends" at 0.
        let report = simulate(CONFIG, "time,duration\n0,1\n", Options::default());
        assert_eq!(report.summary.replica_seconds, 3.0);
        assert_eq!(report.summary.simulated_seconds, 3.0);
        assert_eq!(report.summary.hold_mean_seconds, 2.0);
    }

    #[test]
    fn min_replicas_start_ready_and_keep_the_function_warm() {
        let config = CONFIG.replace("min_replicas = 0", "min_replicas = 1");
        let report = simulate(&config, "time,duration\n0,1\n100,1\n", Options::default());
        let s = &report.summary;
        assert_eq!((s.held, s.cold_starts, s.served), (0, 0, 2));
        assert_eq!(s.replica_seconds, 101.0);
        assert_eq!(report.timeline.replicas[0], (Duration::ZERO, 1, 1));
    }

    #[test]
    fn a_static_function_never_scales() {
        let text = "[functions.f]\nprovider = \"static\"\nupstreams = [\"http://a:1\", \"http://b:2\"]\nmax_ongoing_requests = 1\nmax_queued_requests = 0\n";
        let report = simulate(text, "time,duration\n0,1\n0,1\n0,1\n", Options::default());
        let s = &report.summary;
        assert_eq!((s.served, s.shed_queue_full, s.peak_replicas), (2, 1, 2));
        assert_eq!(s.replica_seconds, 2.0);
    }

    #[test]
    fn the_same_input_gives_the_same_report() {
        let config = config(CONFIG);
        let mut params = ShapeParams::new(Shape::Spike);
        params.duration = Duration::from_secs(120);
        let trace = shape_trace(&params, &["f"]);
        let a = run(&config, &trace, &Options::default());
        let b = run(&config, &trace, &Options::default());
        assert_eq!(a, b);
    }

    #[test]
    fn csv_columns_decimals_comments_and_order() {
        let trace = parse_csv(
            "# a comment\nfunction, time ,duration\n\nf,2.5,0.125\n,1,1\n",
            &["f"],
        )
        .unwrap();
        assert_eq!(
            trace.requests["f"],
            vec![
                Request {
                    time: s(1.0),
                    duration: s(1.0)
                },
                Request {
                    time: s(2.5),
                    duration: s(0.125)
                },
            ]
        );
        assert_eq!(trace.end, s(2.5));
        assert_eq!(
            parse_seconds("0.000000001"),
            Ok(Duration::from_nanos(1)),
            "exact to the nanosecond"
        );
        assert!(parse_seconds("1e3").is_err());
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds(".").is_err());
    }

    #[test]
    fn csv_function_rule_and_errors_name_the_line() {
        let two = ["a", "b"];
        assert_eq!(
            parse_csv("time,duration\n0,1\n", &two)
                .unwrap_err()
                .to_string(),
            "line 2: no function named, and the config has several (a, b): add a `function` column"
        );
        assert_eq!(
            parse_csv("time,duration,function\n0,1,a\n1,1,c\n", &two)
                .unwrap_err()
                .to_string(),
            "line 3: unknown function `c` (the config has: a, b)"
        );
        assert_eq!(
            parse_csv("time,duration\n0,x\n", &["a"])
                .unwrap_err()
                .to_string(),
            "line 2: duration: `x` is not a number of seconds such as 1.25 (no sign, no exponent)"
        );
        assert!(matches!(
            parse_csv("0,1\n", &["a"]),
            Err(TraceError::Header(_))
        ));
        assert!(matches!(
            parse_csv("time,duration,extra\n", &["a"]),
            Err(TraceError::Header(_))
        ));
        let ok = parse_csv("time,duration,function\n0,1,b\n0,2,a\n", &two).unwrap();
        assert_eq!(ok.requests["a"].len(), 1);
        assert_eq!(ok.requests["b"].len(), 1);
    }

    #[test]
    fn minute_traces_spread_each_count_over_its_minute() {
        use super::trace::{parse_minutes, MinuteOptions};
        let text = "HashOwner,HashApp,HashFunction,Trigger,duration,1,2,3\n\
                    o,a,fa,http,0.5,2,0,1\n\
                    o,a,fb,timer,,0,3,\n";
        let options = MinuteOptions {
            seed: 7,
            service_time: Duration::from_secs(1),
        };
        let trace = parse_minutes(text, &["template"], &options).unwrap();
        assert_eq!(trace.template.as_deref(), Some("template"));
        assert_eq!(trace.end, Duration::from_secs(180));
        let a = &trace.requests["fa"];
        assert_eq!(a.len(), 3);
        assert!(a[..2].iter().all(|r| r.time < s(60.0)) && a[2].time >= s(120.0));
        assert!(a.iter().all(|r| r.duration == s(0.5)));
        let b = &trace.requests["fb"];
        assert_eq!(b.len(), 3);
        assert!(b.iter().all(|r| (s(60.0)..s(120.0)).contains(&r.time)));
        assert!(b.iter().all(|r| r.duration == s(1.0)));
        assert_eq!(
            parse_minutes(text, &["template"], &options).unwrap(),
            trace,
            "seeded"
        );
        // Simulated with the template's settings, under their own names.
        let config = config(
            CONFIG
                .replace("[functions.f]", "[functions.template]")
                .replace("[functions.f.", "[functions.template.")
                .as_str(),
        );
        let report = run(&config, &trace, &Options::default());
        let names: Vec<&str> = report.functions.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["fa", "fb"]);
        assert_eq!(report.functions[0].summary.requests, 3);
        // Several functions in the config: rows must name them.
        let err = parse_minutes("function,1\nx,1\n", &["a", "b"], &options).unwrap_err();
        assert_eq!(
            err.to_string(),
            "line 2: unknown function `x` (the config has: a, b)"
        );
        assert!(matches!(
            parse_minutes("function,duration\nx,1\n", &["a"], &options),
            Err(TraceError::Header(_))
        ));
        let err = parse_minutes("function,1\nx,many\n", &["a"], &options).unwrap_err();
        assert_eq!(
            err.to_string(),
            "line 2: minute 1: `many` is not a count of invocations"
        );
    }

    fn shape(shape: Shape, seconds: u64, rps: f64) -> (ShapeParams, Vec<Request>) {
        let mut params = ShapeParams::new(shape);
        params.duration = Duration::from_secs(seconds);
        params.rps = rps;
        let requests = generate(&params);
        (params, requests)
    }

    fn count_in(requests: &[Request], from: f64, to: f64) -> usize {
        requests
            .iter()
            .filter(|r| (from..to).contains(&r.time.as_secs_f64()))
            .count()
    }

    /// Common to every shape: sorted, inside the run, service times within ±50%, reproducible.
    fn check_basics(params: &ShapeParams, requests: &[Request]) {
        assert!(requests.windows(2).all(|w| w[0].time <= w[1].time));
        assert!(requests.iter().all(|r| r.time < params.duration));
        let service = params.service_time.as_secs_f64();
        assert!(requests.iter().all(|r| {
            let d = r.duration.as_secs_f64();
            d >= 0.5 * service && d <= 1.5 * service
        }));
        assert_eq!(generate(params), requests, "same seed, same trace");
        let mut other = *params;
        other.seed += 1;
        assert_ne!(generate(&other), requests, "another seed, another trace");
    }

    #[test]
    fn steady_shape_has_a_constant_rate() {
        let (params, requests) = shape(Shape::Steady, 1000, 20.0);
        check_basics(&params, &requests);
        let n = requests.len() as f64;
        assert!((n - 20_000.0).abs() < 600.0, "{n}");
        let (first, second) = (
            count_in(&requests, 0.0, 500.0),
            count_in(&requests, 500.0, 1000.0),
        );
        assert!((first as f64 / second as f64 - 1.0).abs() < 0.05);
    }

    #[test]
    fn spike_shape_is_ten_times_the_base_in_the_middle_tenth() {
        let (params, requests) = shape(Shape::Spike, 1000, 20.0);
        check_basics(&params, &requests);
        let before = count_in(&requests, 0.0, 100.0) as f64;
        let spike = count_in(&requests, 450.0, 550.0) as f64;
        let after = count_in(&requests, 900.0, 1000.0) as f64;
        assert!((spike / before - 10.0).abs() < 1.0, "{spike} vs {before}");
        assert!((after / before - 1.0).abs() < 0.15, "{after} vs {before}");
    }

    #[test]
    fn onoff_shape_is_silent_in_the_idle_halves() {
        let (params, requests) = shape(Shape::OnOff, 1200, 20.0);
        check_basics(&params, &requests);
        assert_eq!(params.period(), Duration::from_secs(400));
        for cycle in 0..3 {
            let start = cycle as f64 * 400.0;
            assert!(count_in(&requests, start, start + 200.0) > 3500);
            assert_eq!(count_in(&requests, start + 200.0, start + 400.0), 0);
        }
    }

    #[test]
    fn diurnal_shape_peaks_in_the_middle() {
        let (params, requests) = shape(Shape::Diurnal, 1000, 20.0);
        check_basics(&params, &requests);
        let n = requests.len() as f64;
        assert!((n - 20_000.0).abs() < 800.0, "mean rate is rps: {n}");
        let night = count_in(&requests, 0.0, 50.0) + count_in(&requests, 950.0, 1000.0);
        let noon = count_in(&requests, 450.0, 550.0);
        assert!(night < 100, "{night}");
        assert!(noon > 3800, "{noon}");
    }

    #[test]
    fn splitmix_is_the_reference_sequence() {
        // First outputs of SplitMix64 seeded with 0, as published with the algorithm.
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(rng.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn table_json_and_svg_show_every_function() {
        let text = format!(
            "{CONFIG}\n[functions.g]\nprovider = \"static\"\nupstreams = [\"http://a:1\"]\n"
        );
        let config = config(&text);
        let trace = parse_csv(
            "time,duration,function\n0,1,f\n0,1,g\n0.1,1,g\n",
            &["f", "g"],
        )
        .unwrap();
        let report = run(&config, &trace, &Options::default());
        let table = report.table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "function  requests  served  shed full  shed timeout  held  hold mean  hold p99  replica-s  peak  cold starts"
        );
        assert_eq!(
            lines[1],
            "f                1       1          0             0     1     2.000s    2.000s        3.0     1            1"
        );
        assert_eq!(
            lines[2],
            "g                2       2          0             0     0          -         -        1.1     1            0"
        );
        let json: serde_json::Value = serde_json::from_str(&report.json()).unwrap();
        assert_eq!(json[1]["function"], "g");
        assert_eq!(json[0]["hold_p99_seconds"], 2.0);
        assert_eq!(json[0]["replica_seconds"], 3.0);
        let svg = svg::render(&report, "t.toml\n& <trace>");
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains(">t.toml</text>") && svg.contains(">&amp; &lt;trace&gt;</text>"));
        assert_eq!(svg.matches(">time (s)</text>").count(), 2);
        assert_eq!(svg.matches(">requests/s</text>").count(), 2);
        assert_eq!(svg.matches(">replicas</text>").count(), 2);
    }

    /// Like [`TRACE`], with times off the 100 ms sample grid and a 2.03 s cold start, so that
    /// no two things happen at the same millisecond and the live run's order is not left to
    /// the scheduler. The live gateway picks at random among equally loaded replicas (the
    /// simulator: the oldest), so the trace keeps outcomes independent of that choice: the long
    /// 4.05 s request outlasts the 10.5 s ones, and whichever replicas the scale-downs at 11 s
    /// and 12 s keep stay busy past the 10.75 s request's queue timeout.
    const OFF_GRID: &str = "time,duration
0.05,1.013
0.25,1.013
0.45,1.013
0.65,0.513
4.05,11.513
4.15,0.213
4.25,0.213
4.35,0.213
4.45,0.213
10.55,4.513
10.65,4.513
10.75,1.013
30.05,0.513
";

    /// Runs [`OFF_GRID`] through the live `Function` and `Autoscaler` on paused time and through
    /// the simulator; asserts that both saw the same replica changes at the same instants and
    /// the same outcomes; returns the simulator's summary.
    async fn cross_check(config_text: &str, trace_text: &str) -> Summary {
        use crate::autoscaler::Autoscaler;
        use crate::function::{Function, Rejection, Waited};
        use crate::metrics::Metrics;
        use crate::test_support::Delayed;
        use tokio::time::Instant;

        let config = config(config_text);
        let trace = parse_csv(trace_text, &["f"]).unwrap();
        let options = Options {
            cold_start: Duration::from_millis(2030),
            ..Options::default()
        };
        let simulated = run(&config, &trace, &options).functions.remove(0);

        let origin = Instant::now();
        let f = Function::new(config.functions["f"].clone(), &Metrics::new());
        let publisher = f.publisher();
        let publish = move |endpoints| publisher.publish(endpoints);
        let provider = Arc::new(Delayed::new(publish, options.cold_start, origin));
        f.attach(provider.clone());
        let scaler = Autoscaler::new(f.clone()).expect("scalable");
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let scaling = tokio::spawn(scaler.run(stop_rx));
        let requests: Vec<_> = trace.requests["f"]
            .iter()
            .map(|r| {
                let (f, r) = (f.clone(), *r);
                tokio::spawn(async move {
                    tokio::time::sleep_until(origin + r.time).await;
                    f.arrived(Instant::now());
                    let permit = f.admit(Instant::now()).await?;
                    let waited = permit.waited();
                    tokio::time::sleep(r.duration).await;
                    drop(permit);
                    Ok::<Waited, Rejection>(waited)
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for r in requests {
            outcomes.push(r.await.unwrap());
        }
        tokio::time::sleep_until(origin + simulated.timeline.end).await;
        let _ = stop.send(true);
        scaling.await.unwrap();

        assert_eq!(provider.log(), simulated.timeline.replicas);
        let count = |p: &dyn Fn(&Result<Waited, Rejection>) -> bool| {
            outcomes.iter().filter(|o| p(o)).count() as u64
        };
        let s = &simulated.summary;
        assert_eq!(count(&|o| o.is_ok()), s.served);
        assert_eq!(
            count(&|o| matches!(o, Err(Rejection::QueueFull { .. }))),
            s.shed_queue_full
        );
        assert_eq!(
            count(&|o| matches!(o, Err(Rejection::QueueTimeout { .. }))),
            s.shed_queue_timeout
        );
        assert_eq!(
            count(&|o| matches!(o, Ok(Waited::Queued(_) | Waited::ColdStart(_)))),
            s.held
        );
        assert_eq!(
            count(&|o| matches!(o, Ok(Waited::ColdStart(_)))),
            s.held_cold_start
        );
        simulated.summary
    }

    #[tokio::test(start_paused = true)]
    async fn the_live_loop_on_paused_time_agrees_with_the_simulator() {
        let s = cross_check(CONFIG, OFF_GRID).await;
        // The trace exercises what the comparison is for.
        assert!(s.shed_queue_full > 0 && s.shed_queue_timeout > 0, "{s:?}");
        assert!(
            s.cold_starts == 2 && s.scale_ups > 0 && s.scale_downs > 1,
            "{s:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_live_loop_agrees_when_samples_do_not_divide_the_polling_interval() {
        // rate_seconds = 10: a sample every 166.666666 ms, a decision due every 500 ms.
        let config = CONFIG
            .replace("type = \"rps\"", "type = \"concurrency\"")
            .replace("threshold = 6", "target_ongoing_requests = 1")
            .replace("rate_seconds = 6", "rate_seconds = 10")
            .replace("polling_interval = 1", "polling_interval = \"500ms\"");
        let s = cross_check(&config, OFF_GRID).await;
        assert!(s.scale_ups > 0 && s.scale_downs > 1, "{s:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_live_loop_agrees_with_the_simulator_on_adaptive_prewarms() {
        // A call every 20 s with 1 s bins: the fixed window keeps it warm while it learns (ten
        // idle times), then it is unloaded after 1 s of idleness and pre-warmed at 18 s (idle
        // times of 19.5 s: bin 19). The 2 s cold start is longer than the one-bin lead, so a
        // few requests still wait a little for the pre-warmed replica.
        let config = CONFIG
            .replace(
                "cooldown_period = 5",
                "cooldown_period = \"adaptive\"\nadaptive_bin_width = \"1s\"",
            )
            .replace("max_queued_requests = 2", "max_queued_requests = 10");
        let mut trace = String::from("time,duration\n");
        for i in 0..25 {
            trace.push_str(&format!("{}.037,0.513\n", 20 * i));
        }
        let s = cross_check(&config, &trace).await;
        assert!(s.prewarms >= 10 && s.prewarms_used == s.prewarms, "{s:?}");
        assert!(s.cold_start_requests <= 12, "{s:?}");
    }
}
