//! `cooldown_period = "adaptive"`: per function, when to let the last replica go and when to
//! start one again, learned from the function's own idle times (the hybrid histogram policy of
//! "Serverless in the Wild", Shahrad et al., USENIX ATC 2020, adapted to a gateway that sees
//! every request).
//!
//! Pure and deterministic: time is passed in as `t` (time since the loop's origin, read from
//! `tokio::time`), so the live loop, its tests on paused time and the offline simulator run this
//! very code.
//!
//! * **Idle time**: from the moment the function has nothing in flight to the next arrival. At
//!   most one is recorded per bin width of time (the paper's one sample per active minute), so a
//!   busy function records a 0 about once a minute, not once per request.
//! * **Histogram**: 240 bins of `adaptive_bin_width` (1 minute: 4 hours), plus a count of idle
//!   times beyond; 16-bit weights, decayed by 1/32 at each observation so that it follows
//!   changes (507 bytes persisted, with the last three idle times and the follow-up share).
//! * **Windows** once there are [`MIN_OBSERVATIONS`] and fewer than half of them beyond the
//!   range: where the paper takes the 5th and 99th percentiles, the windows here are the one
//!   stretch of idle time whose arrivals are worth more than the replica time spent waiting for
//!   them, a cold start being worth `adaptive_cold_start_cost` of replica time (see [`windows`]).
//!   The keep-alive is the end of that stretch plus 10%; when it starts two bins or more after
//!   the function goes idle, the replica goes after the first bin's hold and one is started again
//!   before the stretch (the pre-warm), kept until the keep-alive: one bin before it until a
//!   replica start from zero has been seen, then twice the time such starts take (see
//!   [`Adaptive::lead`]). Idle times with no pattern (the paper's flat histogram) then get no
//!   stretch: the first bin's hold, or the cold start's worth when they average less than that
//!   and none is seen beyond (a busy function's rare longer idle time, which its histogram is
//!   too short-lived to show).
//! * **The first bin's hold**: the replica stays the first bin after the function goes idle
//!   only when idle periods end within it often enough to pay for that (every idle period
//!   counts, not one a bin width: a timer's second call of a tick, a burst's next call); a
//!   timer with one call a tick, or a rare random function, loses its replica as soon as it is
//!   idle (see [`first_hold`]).
//! * **Forecast** while the histogram is not trusted (too few idle times, or most beyond the
//!   range, where the paper forecasts with ARIMA): when the last idle times agree (two of them at
//!   first, then the last [`RECENT`]), the next is forecast to agree too and pre-warmed (see
//!   [`forecast`]); otherwise the replica is kept as long as a cold start is worth, or one bin
//!   when every recent idle time was longer than that.
//! * **The timer's clock**: an arrival outside the pre-warm window (a random call between a
//!   timer's ticks) starts its own idle period, but the window is also kept counted from the
//!   idle period after the last arrival inside it, when the next tick is due.
//! * `adaptive_min_keep_alive` and `adaptive_max_keep_alive` bound everything.

use std::time::Duration;

use crate::config::AdaptiveConfig;

/// The least time a pre-warm leads the stretch it is for (a start seen to take no time still
/// waits for the decision that asks for it).
pub const MIN_LEAD: Duration = Duration::from_secs(1);

/// Bins of the histogram.
pub const BINS: usize = 240;
/// Observations needed before the histogram is trusted.
pub const MIN_OBSERVATIONS: u32 = 10;
/// At or above this share of idle times beyond the range, the histogram is not representative.
pub const BEYOND_THRESHOLD: f64 = 0.5;
/// The least share of the idle times a stretch covered by a replica must catch (the paper's
/// 5th percentile for the pre-warm).
pub const MIN_STRETCH_SHARE: f64 = 0.05;
/// Added to the keep-alive.
pub const KEEP_ALIVE_MARGIN: f64 = 0.10;
/// The last idle times agree for the forecast when within this many bins of each other...
pub const FORECAST_TOLERANCE_BINS: u32 = 3;
/// ...or this share of the shortest.
pub const FORECAST_TOLERANCE: f64 = 0.10;
/// Idle times that must agree before the forecast is used.
pub const FORECAST_AFTER: usize = 2;
/// The weight of one new observation; every weight is decayed by `1/2^DECAY_SHIFT` first.
const ONE: u32 = 1024;
const DECAY_SHIFT: u32 = 5;
/// Version byte of the persisted form.
const FORMAT: u8 = 3;
/// Length of the persisted form, of the second version's (no follow-up share) and of the
/// first's (no recent idle times either).
const ENCODED_LEN: usize = V2_LEN + 4;
const V2_LEN: usize = 11 + 2 * BINS + 4 * RECENT;
const V1_LEN: usize = 11 + 2 * BINS;
/// The follow-up share decays by `1/2^PERIOD_DECAY_SHIFT` at each idle period.
const PERIOD_DECAY_SHIFT: u32 = 4;
/// Idle periods' weight before the follow-up share is trusted (three periods).
const PERIODS_KNOWN: u16 = 2 * ONE as u16 + ONE as u16 / 2;
/// Idle times kept in order for the forecast.
pub const RECENT: usize = 3;
/// A slot of `recent` with no idle time yet.
const NO_IDLE: u32 = u32::MAX;

/// Idle times of one function, decayed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdleHistogram {
    bin_width: Duration,
    bins: [u16; BINS],
    beyond: u16,
    observations: u32,
    /// The last [`RECENT`] idle times recorded, oldest first, in milliseconds (saturated);
    /// [`NO_IDLE`] where there is none yet.
    recent: [u32; RECENT],
    /// Every idle period, recorded or not (the histogram takes one a bin width), decayed: the
    /// weight of all of them, and of those that ended within the first bin (a call followed by
    /// another, like a timer's second call of a tick, which the histogram does not see).
    periods: u16,
    follow_ups: u16,
}

impl IdleHistogram {
    /// An empty histogram with bins of `bin_width`.
    pub fn new(bin_width: Duration) -> IdleHistogram {
        IdleHistogram {
            bin_width,
            bins: [0; BINS],
            beyond: 0,
            observations: 0,
            recent: [NO_IDLE; RECENT],
            periods: 0,
            follow_ups: 0,
        }
    }

    /// Idle times recorded so far (not decayed).
    pub fn observations(&self) -> u32 {
        self.observations
    }

    /// Width of a bin.
    pub fn bin_width(&self) -> Duration {
        self.bin_width
    }

    /// Records one idle time: every weight decays, then the idle time's bin gains one.
    pub fn record(&mut self, idle: Duration) {
        // Rounded up, so that a weight decays to zero rather than lingering.
        let decay =
            |w: &mut u16| *w -= ((*w as u32 + (1 << DECAY_SHIFT) - 1) >> DECAY_SHIFT) as u16;
        self.bins.iter_mut().for_each(decay);
        decay(&mut self.beyond);
        let bin = (idle.as_nanos() / self.bin_width.as_nanos().max(1)) as usize;
        let slot = self.bins.get_mut(bin).unwrap_or(&mut self.beyond);
        *slot = (*slot as u32 + ONE).min(u16::MAX as u32) as u16;
        self.observations = self.observations.saturating_add(1);
        self.recent.rotate_left(1);
        self.recent[RECENT - 1] = idle.as_millis().min(NO_IDLE as u128 - 1) as u32;
    }

    /// Counts one idle period of `idle`, every one (not one a bin width as [`record`]).
    ///
    /// [`record`]: IdleHistogram::record
    pub fn period(&mut self, idle: Duration) {
        let decay = |w: &mut u16| *w -= *w >> PERIOD_DECAY_SHIFT;
        decay(&mut self.periods);
        decay(&mut self.follow_ups);
        self.periods = self.periods.saturating_add(ONE as u16);
        if idle < self.bin_width {
            self.follow_ups = self.follow_ups.saturating_add(ONE as u16);
        }
    }

    /// The share of idle periods that end within the first bin, once a few were seen.
    pub fn follow_up_share(&self) -> Option<f64> {
        (self.periods >= PERIODS_KNOWN).then(|| self.follow_ups as f64 / self.periods as f64)
    }

    /// The last idle times recorded (up to [`RECENT`]), oldest first.
    pub fn recent(&self) -> impl Iterator<Item = Duration> + '_ {
        self.recent
            .iter()
            .filter(|ms| **ms != NO_IDLE)
            .map(|ms| Duration::from_millis(*ms as u64))
    }

    /// The persisted form: version, bin width (ms), observations, weight beyond, the bins, the
    /// recent idle times (ms).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ENCODED_LEN);
        out.push(FORMAT);
        out.extend_from_slice(&(self.bin_width.as_millis() as u32).to_le_bytes());
        out.extend_from_slice(&self.observations.to_le_bytes());
        out.extend_from_slice(&self.beyond.to_le_bytes());
        for w in self.bins {
            out.extend_from_slice(&w.to_le_bytes());
        }
        for ms in self.recent {
            out.extend_from_slice(&ms.to_le_bytes());
        }
        out.extend_from_slice(&self.periods.to_le_bytes());
        out.extend_from_slice(&self.follow_ups.to_le_bytes());
        out
    }

    /// Reads [`IdleHistogram::encode`]'s form (or an earlier version's, without the follow-up
    /// share, and the first without recent idle times either); `None` when it is not that, or
    /// was recorded with another bin width than `bin_width` (its bins would mean other times).
    pub fn decode(bytes: &[u8], bin_width: Duration) -> Option<IdleHistogram> {
        let (recent_from, periods_from) = match (bytes.first(), bytes.len()) {
            (Some(&FORMAT), ENCODED_LEN) => (Some(11 + 2 * BINS), Some(V2_LEN)),
            (Some(2), V2_LEN) => (Some(11 + 2 * BINS), None),
            (Some(1), V1_LEN) => (None, None),
            _ => return None,
        };
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
        let u16_at = |i: usize| u16::from_le_bytes(bytes[i..i + 2].try_into().unwrap());
        if u32_at(1) as u128 != bin_width.as_millis() {
            return None;
        }
        let mut bins = [0; BINS];
        for (i, w) in bins.iter_mut().enumerate() {
            *w = u16_at(11 + 2 * i);
        }
        let mut recent = [NO_IDLE; RECENT];
        if let Some(from) = recent_from {
            for (i, ms) in recent.iter_mut().enumerate() {
                *ms = u32_at(from + 4 * i);
            }
        }
        let (periods, follow_ups) = periods_from.map_or((0, 0), |i| (u16_at(i), u16_at(i + 2)));
        Some(IdleHistogram {
            bin_width,
            bins,
            beyond: u16_at(9),
            observations: u32_at(5),
            recent,
            periods,
            follow_ups,
        })
    }
}

/// What the windows are based on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Basis {
    /// The histogram.
    Histogram,
    /// Fewer than [`MIN_OBSERVATIONS`] idle times: the learning rule.
    TooFew,
    /// Too many idle times beyond the histogram's range: the learning rule.
    BeyondRange,
    /// Either of the last two, with the last idle times agreeing: the forecast.
    Forecast,
}

impl Basis {
    /// The name the pre-warm log line shows.
    pub fn name(self) -> &'static str {
        match self {
            Basis::Histogram => "histogram",
            Basis::TooFew => "too_few",
            Basis::BeyondRange => "beyond_range",
            Basis::Forecast => "forecast",
        }
    }
}

/// When, counted from the moment the function went idle, the last replica goes and comes back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Windows {
    /// With a pre-warm: the replica goes after `unload_after`, one is started at `at` and kept
    /// until `keep_alive`.
    pub prewarm: Option<Prewarm>,
    /// The function is at zero from this long after it went idle (until its next request).
    pub keep_alive: Duration,
    /// What the windows come from.
    pub basis: Basis,
}

/// A pre-warm: unload early, start again before the next predicted arrival.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prewarm {
    /// The replica goes this long after the function went idle.
    pub unload_after: Duration,
    /// One replica is started again this long after the function went idle.
    pub at: Duration,
}

/// The windows a histogram gives under `config`'s bounds.
///
/// Bin `j` holds the idle times in `[j, j+1)` bin widths. Keeping a replica up during bin `j`
/// catches the arrivals that end an idle time there (weight `w[j]`) and costs one bin width for
/// every idle period that lasts that long (weight `S[j]`, the idle times at or beyond bin `j`).
/// With a cold start worth `c` bins of replica time, the bin is worth `c·w[j] − S[j]`. Bin 0 is
/// always covered (one idle time is recorded per bin width, so several requests within a bin are
/// one sample: the replica must stay for them). Beyond it the replica covers the one stretch of
/// bins `a..=k` of greatest total worth, if positive; a stretch that does not start at bin 1 is
/// reached by a pre-warm up to one bin before it, whose bin is paid for (`S[a−1]`). The best
/// stretch is found in one pass (maximum-sum run), and kept only if it catches at least
/// [`MIN_STRETCH_SHARE`] of the idle times. The pre-warm starts `lead` (at most a bin) before
/// the stretch; the stretches are weighed as if it led by a whole bin (a pre-warm judged no
/// cheaper than that keeps the choice between stretches, and how soon a changed pattern is
/// followed, independent of how fast replicas start).
pub fn windows(h: &IdleHistogram, config: &AdaptiveConfig, lead: Duration) -> Windows {
    let bin = h.bin_width;
    let untrusted = |basis| forecast(h, config).unwrap_or_else(|| learning(h, config, basis));
    if h.observations < MIN_OBSERVATIONS {
        return untrusted(Basis::TooFew);
    }
    let inside: u64 = h.bins.iter().map(|w| *w as u64).sum();
    let beyond = h.beyond as u64;
    if inside == 0 || beyond as f64 >= BEYOND_THRESHOLD * (inside + beyond) as f64 {
        return untrusted(Basis::BeyondRange);
    }
    // S[j]: weight of the idle times at or beyond bin j.
    let mut survival = [0u64; BINS + 1];
    survival[BINS] = beyond;
    for j in (0..BINS).rev() {
        survival[j] = survival[j + 1] + h.bins[j] as u64;
    }
    let cost = config.cold_start_cost.as_secs_f64() / bin.as_secs_f64();
    let lead = lead.min(bin);
    let hold = first_hold(h, config);
    let worth = |j: usize| cost * h.bins[j] as f64 - survival[j] as f64;
    // The run ending at the current bin of greatest worth: (first bin, worth).
    let mut run: Option<(usize, f64)> = None;
    let mut best: Option<(usize, usize, f64)> = None;
    for j in 1..BINS {
        let w = worth(j);
        // Bin 0 is kept anyway, or costs what it does not catch; a later stretch is reached by
        // a pre-warm, paid for as a whole bin.
        let paid = match j {
            1 if hold.is_zero() => -worth(0),
            1 => 0.0,
            _ => survival[j - 1] as f64,
        };
        let fresh = (j, w - paid);
        run = Some(match run {
            Some((a, v)) if v + w >= fresh.1 => (a, v + w),
            _ => fresh,
        });
        let (a, v) = run.expect("set above");
        if v > best.map_or(0.0, |b| b.2) {
            best = Some((a, j, v));
        }
    }
    // A stretch must catch a share of the idle times: one recent sample far out, with few
    // others that long, would otherwise look worth waiting for.
    let best = best.filter(|&(first, last, _)| {
        let caught: u64 = h.bins[first..=last].iter().map(|w| *w as u64).sum();
        caught as f64 >= MIN_STRETCH_SHARE * survival[0] as f64
    });
    let (first, last) = best.map_or((1, 0), |(first, last, _)| (first, last));
    let stretch_end =
        |end: Duration| bounded(config, end.max(bin).mul_f64(1.0 + KEEP_ALIVE_MARGIN));
    let keep_alive = match best {
        None if hold.is_zero() => bounded(config, hold),
        _ => stretch_end(bin.saturating_mul(last as u32 + 1)),
    };
    let prewarm = prewarm_at(
        config,
        bin,
        hold,
        bin.saturating_mul(first as u32).saturating_sub(lead),
        keep_alive,
    );
    // The tail of a busy function's idle times is all but empty at one sample a bin width and
    // 1/32 decay, yet an idle time there is as likely as ever (random arrivals have no memory):
    // with idle times that average less than a cold start is worth, and not a sample's weight
    // beyond the keep-alive (bursts with long gaps show theirs), keep at least that long.
    let tail_unseen = survival[last + 1] < ONE as u64;
    let mean = {
        let weighted: f64 = (0..BINS).map(|j| h.bins[j] as f64 * (j as f64 + 0.5)).sum();
        (weighted + beyond as f64 * BINS as f64) / survival[0] as f64
    };
    let keep_alive = match prewarm {
        None if tail_unseen && mean < cost => keep_alive.max(stretch_end(config.cold_start_cost)),
        _ => keep_alive,
    };
    Windows {
        prewarm,
        keep_alive,
        basis: Basis::Histogram,
    }
}

/// The windows from the last [`RECENT`] idle times when the histogram is not trusted yet (or
/// most idle times are beyond its range), if they agree: within [`FORECAST_TOLERANCE_BINS`] bins
/// or [`FORECAST_TOLERANCE`] of the shortest, the next one is forecast to agree too (a timer,
/// learned in three calls rather than [`MIN_OBSERVATIONS`], and one called every few hours,
/// beyond the histogram). The replica goes after a bin and is started again a bin and half the
/// spread before the shortest, kept until a bin and half the spread after the longest; not when
/// that window costs more than the cold start it saves.
fn forecast(h: &IdleHistogram, config: &AdaptiveConfig) -> Option<Windows> {
    let bin = h.bin_width;
    let mut recent = h.recent();
    let first = recent.next()?;
    let (lo, hi, n) = recent.fold((first, first, 1), |(lo, hi, n), d| {
        (lo.min(d), hi.max(d), n + 1)
    });
    let spread = hi - lo;
    let tolerance = bin
        .saturating_mul(FORECAST_TOLERANCE_BINS)
        .max(lo.mul_f64(FORECAST_TOLERANCE));
    if n < FORECAST_AFTER || spread > tolerance {
        return None;
    }
    let slack = spread / 2 + bin;
    let (start, end) = (lo.saturating_sub(slack), hi + slack);
    if end - start > config.cold_start_cost {
        return None;
    }
    let keep_alive = bounded(config, end);
    Some(Windows {
        prewarm: prewarm_at(config, bin, first_hold(h, config), start, keep_alive),
        keep_alive,
        basis: Basis::Forecast,
    })
}

/// `d` within `adaptive_min_keep_alive` and `adaptive_max_keep_alive`.
fn bounded(config: &AdaptiveConfig, d: Duration) -> Duration {
    d.clamp(
        config.min_keep_alive.unwrap_or(Duration::ZERO),
        config.max_keep_alive.unwrap_or(Duration::MAX),
    )
}

/// How long the last replica stays once the function goes idle, whatever comes later: the
/// first bin, unless an idle period is seldom over within it (a call seldom followed by
/// another soon, as a timer's single call or a rare random one): then not at all. Keeping the
/// first bin costs up to a bin an idle period (about half of one for those that end in it) and
/// spares a cold start for each of those: worth it when the share `q` that do is above
/// `(1 − q/2) / c`, a cold start being worth `c` bins. A bin until a few idle periods were seen.
fn first_hold(h: &IdleHistogram, config: &AdaptiveConfig) -> Duration {
    let cost = config.cold_start_cost.as_secs_f64() / h.bin_width.as_secs_f64();
    match h.follow_up_share() {
        Some(q) if cost * q <= 1.0 - q / 2.0 => Duration::ZERO,
        _ => h.bin_width,
    }
}

/// A pre-warm at `at` before the (bounded) `keep_alive`: the replica goes after `hold` (or the
/// least keep-alive), and only when it would then be gone for at least a bin.
fn prewarm_at(
    config: &AdaptiveConfig,
    bin: Duration,
    hold: Duration,
    at: Duration,
    keep_alive: Duration,
) -> Option<Prewarm> {
    let unload_after = hold.max(config.min_keep_alive.unwrap_or(Duration::ZERO));
    (at >= unload_after + bin && at < keep_alive).then_some(Prewarm { unload_after, at })
}

/// The windows while too little is known and the last idle times do not agree: keep the
/// replica as long as a cold start is worth (`adaptive_cold_start_cost`, the ski-rental rule:
/// never more than twice the best choice in hindsight), or only the first bin's hold when every
/// recent idle time was longer than that (such a wait would have caught none of them).
fn learning(h: &IdleHistogram, config: &AdaptiveConfig, basis: Basis) -> Windows {
    let cost = config.cold_start_cost;
    let mut recent = h.recent().peekable();
    let keep_alive = if recent.peek().is_some() && recent.all(|d| d > cost) {
        first_hold(h, config)
    } else {
        cost
    };
    Windows {
        prewarm: None,
        keep_alive: bounded(config, keep_alive),
        basis,
    }
}

/// Where an idle function stands in its windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Something is in flight, or the function has not been seen busy yet.
    Unknown,
    /// Idle, within the keep-alive (or before the early unload): keep the last replica.
    Warm,
    /// Idle, between the early unload and the pre-warm, or past the keep-alive: zero.
    Down,
    /// Idle, within the pre-warm window: one replica.
    Prewarm,
}

/// A pre-warm's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrewarmEvent {
    /// One replica was asked for before the predicted arrival.
    Started,
    /// A request arrived while the pre-warmed replica was up (or starting).
    Used,
    /// The keep-alive ran out first: the replica went unused.
    Wasted,
}

/// One function's idle-time tracker and windows.
#[derive(Clone, Debug)]
pub struct Adaptive {
    config: AdaptiveConfig,
    histogram: IdleHistogram,
    windows: Windows,
    /// The last activity (arrival or finish) seen at the previous step.
    last_activity: Option<Duration>,
    /// When the current idle period began (the function is idle since then).
    idle_since: Option<Duration>,
    /// When the last idle time was recorded.
    last_observation: Option<Duration>,
    /// Where the timer's clock stands: the start of the idle period after the last arrival that
    /// came inside the pre-warm window. An arrival outside it (a random call between a timer's
    /// ticks) starts an idle period of its own, but the next tick is still due this long after
    /// the anchor: the window is kept from here too.
    anchor: Option<Duration>,
    /// The arrival that ended the current busy stretch came inside the pre-warm window.
    on_pattern: bool,
    /// A pre-warm was started in the current idle period.
    prewarmed: bool,
    /// The function was seen busy since the tracker started.
    seen: bool,
    /// The histogram changed since [`Adaptive::take_changed`].
    changed: bool,
    /// Since when a replica has been asked for and none is ready (a start under way).
    starting_since: Option<Duration>,
    /// How long a replica takes to start, as seen here: the latest start, or less when it was
    /// quicker than the ones before (it rises at once and falls by a quarter of the difference
    /// a start). Not persisted: after a restart, pre-warms lead by a bin until a start is seen.
    startup: Option<Duration>,
}

impl Adaptive {
    /// A tracker with an empty histogram.
    pub fn new(config: AdaptiveConfig) -> Adaptive {
        Adaptive::with_histogram(config, IdleHistogram::new(config.bin_width))
    }

    /// A tracker starting from `histogram` (e.g. loaded at start).
    pub fn with_histogram(config: AdaptiveConfig, histogram: IdleHistogram) -> Adaptive {
        Adaptive {
            windows: windows(&histogram, &config, config.bin_width),
            config,
            histogram,
            last_activity: None,
            idle_since: None,
            last_observation: None,
            anchor: None,
            starting_since: None,
            startup: None,
            on_pattern: false,
            prewarmed: false,
            seen: false,
            changed: false,
        }
    }

    /// The histogram.
    pub fn histogram(&self) -> &IdleHistogram {
        &self.histogram
    }

    /// Replaces the histogram (one loaded from the state store) and recomputes the windows.
    pub fn load(&mut self, histogram: IdleHistogram) {
        self.histogram = histogram;
        self.windows = self.learned();
    }

    /// The windows the histogram and the start time seen give now.
    fn learned(&self) -> Windows {
        windows(&self.histogram, &self.config, self.lead())
    }

    /// The windows in force.
    pub fn windows(&self) -> Windows {
        self.windows
    }

    /// Whether the histogram changed since the last call (for persisting it).
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// One sample at `t`: requests in flight (ongoing, queued) and the time since the last
    /// arrival or finish. Records the idle time an arrival ends; says whether that arrival found
    /// a pre-warmed replica.
    pub fn observe(
        &mut self,
        t: Duration,
        in_flight: u64,
        idle_for: Duration,
    ) -> Option<PrewarmEvent> {
        let activity = t.saturating_sub(idle_for);
        let moved = match self.last_activity {
            Some(before) => activity > before,
            None => activity > Duration::ZERO,
        };
        self.last_activity = Some(activity);
        let mut outcome = None;
        if in_flight > 0 || moved {
            if let Some(since) = self.idle_since.take() {
                let idle = activity.saturating_sub(since);
                // On the timer's clock: in the window counted from this idle period's start,
                // or from the anchor's (a random call came in between).
                self.on_pattern = self.in_window(idle)
                    || self
                        .anchor
                        .is_some_and(|a| self.in_window(activity.saturating_sub(a)));
                let hold = first_hold(&self.histogram, &self.config);
                self.histogram.period(idle);
                let recorded = self.record(activity, idle);
                if recorded || first_hold(&self.histogram, &self.config) != hold {
                    self.windows = self.learned();
                    self.changed = true;
                }
                if std::mem::take(&mut self.prewarmed) {
                    outcome = Some(PrewarmEvent::Used);
                }
            }
        }
        self.seen |= moved || in_flight > 0;
        if in_flight == 0 && self.idle_since.is_none() && self.seen {
            self.idle_since = Some(activity);
            if std::mem::take(&mut self.on_pattern) {
                self.anchor = Some(activity);
            }
        }
        outcome
    }

    /// Whether an idle time of `idle` falls in the pre-warm window (from the pre-warm to the
    /// keep-alive).
    fn in_window(&self, idle: Duration) -> bool {
        self.windows
            .prewarm
            .is_some_and(|p| idle >= p.at && idle < self.windows.keep_alive)
    }

    /// The idle period since the anchor, when the current one began after it (a call off the
    /// timer's clock came in between).
    fn anchored(&self) -> Option<Duration> {
        self.anchor
            .filter(|a| self.idle_since.is_some_and(|s| s > *a))
    }

    /// Records `idle` in the histogram unless one was recorded less than a bin width before
    /// `arrival`; says whether it was.
    fn record(&mut self, arrival: Duration, idle: Duration) -> bool {
        let bin = self.histogram.bin_width;
        if self.last_observation.is_some_and(|o| arrival < o + bin) {
            return false;
        }
        self.last_observation = Some(arrival);
        self.histogram.record(idle);
        true
    }

    /// Where the function stands at `t` (see [`Adaptive::observe`] for what it saw).
    pub fn phase(&self, t: Duration) -> Phase {
        let Some(since) = self.idle_since else {
            return Phase::Unknown;
        };
        let idle = t.saturating_sub(since);
        let w = &self.windows;
        let phase = match w.prewarm {
            _ if idle >= w.keep_alive => Phase::Down,
            Some(p) if idle >= p.at => Phase::Prewarm,
            Some(p) if idle >= p.unload_after => Phase::Down,
            _ => Phase::Warm,
        };
        match self.anchored() {
            Some(anchor) if phase == Phase::Down && self.in_window(t.saturating_sub(anchor)) => {
                Phase::Prewarm
            }
            _ => phase,
        }
    }

    /// When, after `t`, the function should next change phase by itself: the pre-warm time
    /// (counted from the current idle period or from the anchor), if still to come. A loop at
    /// rest sets a timer for it.
    pub fn wake_at(&self, t: Duration) -> Option<Duration> {
        let at = self.windows.prewarm?.at;
        [self.idle_since, self.anchored()]
            .into_iter()
            .flatten()
            .map(|from| from + at)
            .filter(|when| *when > t)
            .min()
    }

    /// A replica was started by the pre-warm at `t`.
    pub fn prewarm_started(&mut self, t: Duration) {
        self.prewarmed = true;
        self.starting_since.get_or_insert(t);
    }

    /// Every sample: replicas ready and asked for, to see how long a start takes.
    pub fn replicas(&mut self, t: Duration, ready: u32, asked: u32) {
        if asked == 0 {
            self.starting_since = None;
        } else if ready == 0 {
            self.starting_since.get_or_insert(t);
        } else if let Some(since) = self.starting_since.take() {
            let took = t.saturating_sub(since);
            let lead = self.lead();
            self.startup = Some(match self.startup {
                Some(before) if took < before => before - (before - took) / 4,
                _ => took,
            });
            if self.lead() != lead {
                let windows = self.learned();
                // Published (and the histogram saved) as after a new idle time.
                self.changed |= windows != self.windows;
                self.windows = windows;
            }
        }
    }

    /// How long before a learned stretch of idle times a pre-warm starts: twice the time a
    /// start takes (at least [`MIN_LEAD`]), at most one bin (also while no start has been seen).
    pub fn lead(&self) -> Duration {
        let bin = self.histogram.bin_width;
        self.startup
            .map_or(bin, |s| s.saturating_mul(2).max(MIN_LEAD).min(bin))
    }

    /// The function goes to zero: a pre-warm still unused was wasted.
    pub fn unloaded(&mut self) -> Option<PrewarmEvent> {
        std::mem::take(&mut self.prewarmed).then_some(PrewarmEvent::Wasted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AdaptiveConfig {
        AdaptiveConfig {
            bin_width: Duration::from_secs(60),
            min_keep_alive: None,
            max_keep_alive: None,
            cold_start_cost: Duration::from_secs(600),
        }
    }

    fn m(minutes: f64) -> Duration {
        Duration::from_secs_f64(minutes * 60.0)
    }

    /// An idle time between 1 s calls every `minutes`.
    fn period(minutes: f64) -> Duration {
        m(minutes) - Duration::from_secs(1)
    }

    /// Runs `idle` times through a tracker as a function would: one 1 s request, then idle.
    /// Returns when the next request arrives (the last idle period began `idles.last()` before).
    fn drive(a: &mut Adaptive, start: Duration, idles: &[Duration]) -> Duration {
        let mut t = start;
        for idle in idles {
            // A request arrives at t and finishes 1 s later; samples every second around it.
            a.observe(t, 1, Duration::ZERO);
            t += Duration::from_secs(1);
            a.observe(t, 0, Duration::ZERO);
            t += *idle;
        }
        t
    }

    #[test]
    fn too_few_observations_keep_the_cold_start_cost_or_one_bin() {
        let cases: [(&[Duration], Duration); 3] = [
            // Nothing known: as long as a cold start is worth.
            (&[], m(10.0)),
            // Idle times that disagree, some shorter than the cost: the same.
            (&[m(2.0), m(7.0), m(4.5)], m(10.0)),
            // Every recent one longer than the cost: such a wait would have caught none.
            (&[m(30.0), m(50.0), m(90.0)], m(1.0)),
        ];
        for (idles, keep_alive) in cases {
            let mut a = Adaptive::new(config());
            drive(&mut a, m(0.0), idles);
            let w = a.windows();
            assert_eq!(
                (w.basis, w.keep_alive, w.prewarm),
                (Basis::TooFew, keep_alive, None),
                "{idles:?}"
            );
        }
    }

    #[test]
    fn a_timer_is_forecast_once_two_idle_times_agree() {
        let mut a = Adaptive::new(config());
        // The timer's period twice (29 min 59 s, then 30 min 59 s): one idle time recorded,
        // the second when the next call arrives.
        let t = drive(&mut a, m(0.0), &[period(30.0), period(31.0)]);
        assert_eq!(a.windows().basis, Basis::TooFew);
        let t = drive(&mut a, t, &[m(12.0)]);
        let w = a.windows();
        assert_eq!(w.basis, Basis::Forecast);
        // Spread 1 min: pre-warm a bin and half the spread before the shortest, keep until a
        // bin and half the spread after the longest.
        let shortest = period(30.0);
        let slack = Duration::from_secs(30) + m(1.0);
        assert_eq!(
            w.prewarm,
            Some(Prewarm {
                unload_after: m(1.0),
                at: shortest - slack
            })
        );
        assert_eq!(w.keep_alive, period(31.0) + slack);
        // A third idle time far off: no forecast any more.
        drive(&mut a, t, &[m(1.0)]);
        assert_eq!(a.windows().basis, Basis::TooFew);
    }

    #[test]
    fn a_periodic_function_is_unloaded_and_prewarmed_before_its_next_call() {
        let mut a = Adaptive::new(config());
        let t = drive(&mut a, m(0.0), &[period(60.0); 12]);
        let w = a.windows();
        assert_eq!(w.basis, Basis::Histogram);
        // Idle 59 min 59 s: bin 59. Pre-warm one bin before: 58 min; keep-alive (60 + 10%). No
        // call was followed by another within a bin: the replica goes at once.
        assert_eq!(
            w.prewarm,
            Some(Prewarm {
                unload_after: Duration::ZERO,
                at: m(58.0)
            })
        );
        assert_eq!(w.keep_alive, m(66.0));
        // The last idle period began when the last request finished.
        let idle = t - period(60.0);
        assert_eq!(a.phase(idle), Phase::Down);
        assert_eq!(a.phase(idle + m(1.0)), Phase::Down);
        assert_eq!(a.wake_at(idle + m(1.0)), Some(idle + m(58.0)));
        assert_eq!(a.phase(idle + m(58.0)), Phase::Prewarm);
        assert_eq!(a.phase(idle + m(66.0)), Phase::Down);
    }

    #[test]
    fn the_prewarm_leads_by_twice_the_start_time_seen_once_a_start_was_seen() {
        let mut a = Adaptive::new(config());
        let t = drive(&mut a, m(0.0), &[period(60.0); 12]);
        let at = |a: &Adaptive| a.windows().prewarm.map(|p| p.at);
        // No start seen yet: one bin before the stretch (bin 59).
        assert_eq!((a.lead(), at(&a)), (m(1.0), Some(m(58.0))));
        // A start given up before it was ready says nothing.
        a.replicas(t, 0, 1);
        a.replicas(t + Duration::from_secs(1), 0, 0);
        assert_eq!(a.lead(), m(1.0));
        // The pre-warm asks at t; the replica is ready 3 s later: lead 6 s.
        let t = t + m(5.0);
        a.prewarm_started(t);
        a.replicas(t + Duration::from_secs(1), 0, 1);
        a.replicas(t + Duration::from_secs(3), 1, 1);
        assert_eq!(a.lead(), Duration::from_secs(6));
        assert_eq!(at(&a), Some(m(59.0) - Duration::from_secs(6)));
        assert!(a.take_changed(), "new windows are published");
        // A quicker start (1 s) lowers it by a quarter of the difference: 2.5 s, lead 5 s.
        let t = t + m(5.0);
        a.replicas(t, 0, 1);
        a.replicas(t + Duration::from_secs(1), 1, 1);
        assert_eq!(a.lead(), Duration::from_secs(5));
        // A slower one (40 s) counts at once, and the lead is never more than a bin.
        let t = t + m(5.0);
        a.replicas(t, 0, 1);
        a.replicas(t + Duration::from_secs(40), 2, 2);
        assert_eq!((a.lead(), at(&a)), (m(1.0), Some(m(58.0))));
    }

    #[test]
    fn a_busy_function_records_one_zero_a_minute_and_keeps_its_replica_for_the_cost() {
        let mut a = Adaptive::new(config());
        // A request every 5 s for an hour: 60 idle times recorded, all in bin 0.
        let mut t = Duration::ZERO;
        for _ in 0..720 {
            a.observe(t, 1, Duration::ZERO);
            a.observe(t + Duration::from_secs(1), 0, Duration::ZERO);
            t += Duration::from_secs(5);
        }
        assert_eq!(a.histogram().observations(), 60);
        let w = a.windows();
        assert_eq!((w.basis, w.prewarm), (Basis::Histogram, None));
        // Every sample in the first bin, none beyond: the rare longer idle time is not in
        // the histogram but is as likely as ever, and worth waiting for (mean far below the
        // cost).
        assert_eq!(w.keep_alive, m(11.0));
    }

    #[test]
    fn a_timer_beyond_the_range_is_forecast_and_patternless_idle_times_are_not_waited_for() {
        // Every 5 hours, beyond the histogram's 4: the forecast pre-warms it.
        let mut a = Adaptive::new(config());
        drive(&mut a, m(0.0), &[m(300.0); 12]);
        let w = a.windows();
        assert_eq!(w.basis, Basis::Forecast);
        assert_eq!(
            (w.prewarm.map(|p| p.at), w.keep_alive),
            (Some(m(299.0)), m(301.0))
        );
        // Beyond the range with no pattern: the learning rule (longer than the cost, and never
        // a call within a bin of the last: gone at once).
        let mut a = Adaptive::new(config());
        let t = drive(&mut a, m(0.0), &[m(300.0), m(420.0), m(260.0), m(500.0)]);
        let w = a.windows();
        assert_eq!((w.basis, w.keep_alive), (Basis::TooFew, Duration::ZERO));
        let far: Vec<Duration> = (0..12).map(|i| m(250.0 + 40.0 * i as f64)).collect();
        drive(&mut a, t, &far);
        let w = a.windows();
        assert_eq!(
            (w.basis, w.keep_alive, w.prewarm),
            (Basis::BeyondRange, Duration::ZERO, None)
        );
        // Until three idle periods were seen, the first bin is kept.
        let mut a = Adaptive::new(config());
        drive(&mut a, m(0.0), &[m(300.0), m(420.0)]);
        assert_eq!(a.windows().keep_alive, m(1.0));
        // One idle time in each of many bins: no stretch catches enough to pay for itself.
        let mut a = Adaptive::new(config());
        let spread: Vec<Duration> = (0..400).map(|i| m((i * 37 % 200) as f64 + 1.5)).collect();
        drive(&mut a, m(0.0), &spread);
        let w = a.windows();
        assert_eq!(
            (w.basis, w.prewarm, w.keep_alive),
            (Basis::Histogram, None, Duration::ZERO)
        );
    }

    #[test]
    fn the_first_bin_is_kept_when_calls_are_often_followed_by_another_within_it() {
        // A timer every 30 minutes with one call a tick: the replica goes right after it.
        let mut single = Adaptive::new(config());
        drive(&mut single, m(0.0), &[period(30.0); 12]);
        assert_eq!(single.histogram().follow_up_share(), Some(0.0));
        assert!(single
            .windows()
            .prewarm
            .is_some_and(|p| p.unload_after.is_zero()));
        // Two calls a tick, 20 s apart: the histogram records one idle time a bin (the second
        // call's is not), but every idle period counts for the share: half end within a bin,
        // and the replica stays a bin after each call.
        let mut double = Adaptive::new(config());
        let mut idles = Vec::new();
        for _ in 0..12 {
            idles.extend([Duration::from_secs(20), m(30.0) - Duration::from_secs(22)]);
        }
        drive(&mut double, m(0.0), &idles);
        assert_eq!(double.histogram().observations(), 12);
        let share = double.histogram().follow_up_share().unwrap();
        assert!((0.45..0.55).contains(&share), "{share}");
        let w = double.windows();
        assert_eq!(w.prewarm.map(|p| p.unload_after), Some(m(1.0)), "{w:?}");
        // Rare follow-ups, fewer than the cold start's worth pays a bin for (one in 16, worth
        // 10 bins): not kept.
        let mut rare = Adaptive::new(config());
        let mut idles = vec![period(30.0); 15];
        idles.push(Duration::from_secs(20));
        let idles: Vec<Duration> = idles.iter().cycle().take(48).copied().collect();
        drive(&mut rare, m(0.0), &idles);
        assert!(rare.histogram().follow_up_share().unwrap() < 0.09);
        assert!(rare
            .windows()
            .prewarm
            .is_some_and(|p| p.unload_after.is_zero()));
    }

    #[test]
    fn bursts_with_long_random_gaps_keep_one_bin_not_the_longest_gap() {
        // Bursts (idle times under a minute) every 30 to 180 minutes: the paper's 99th percentile
        // would keep the replica for hours after every burst; nothing between the burst and the
        // gaps catches enough requests to be worth it.
        let mut a = Adaptive::new(config());
        let mut idles = Vec::new();
        for i in 0..40 {
            idles.extend([Duration::from_secs(70); 3]);
            idles.push(m(30.0 + (i * 37 % 150) as f64 + 0.5));
        }
        drive(&mut a, m(0.0), &idles);
        let w = a.windows();
        assert_eq!((w.basis, w.prewarm), (Basis::Histogram, None));
        assert_eq!(w.keep_alive, m(2.0 * 1.1), "bins 0 and 1 (the bursts)");
    }

    #[test]
    fn a_timer_with_a_few_short_idle_times_is_still_prewarmed() {
        // Every 30 minutes, and now and then two calls 30 s apart: the short idle times are
        // caught by the first bin, they do not keep the replica up for the whole period.
        let mut a = Adaptive::new(config());
        let mut idles = Vec::new();
        for i in 0..30 {
            if i % 6 == 0 {
                idles.push(Duration::from_secs(30));
            }
            idles.push(period(30.0));
        }
        drive(&mut a, m(0.0), &idles);
        let w = a.windows();
        assert_eq!(
            w.prewarm,
            Some(Prewarm {
                unload_after: m(1.0),
                at: m(28.0)
            }),
            "{w:?}"
        );
        assert_eq!(w.keep_alive, m(33.0));
    }

    #[test]
    fn the_cold_start_cost_sets_how_much_waiting_a_stretch_may_cost() {
        // Idle times spread evenly over 1 to 40 minutes. Each minute of waiting early on catches
        // one arrival in 40 or so; near the end, one in a few. Worth 10 minutes a cold start,
        // only the last stretch pays (pre-warmed); worth an hour, the whole wait does (from
        // the end of the first minute, in which no idle time ended: a pre-warm then, if any).
        let idles: Vec<Duration> = (0..120).map(|i| m((i * 7 % 40) as f64 + 1.5)).collect();
        let mut cheap = Adaptive::new(config());
        drive(&mut cheap, m(0.0), &idles);
        let w = cheap.windows();
        assert!(w.prewarm.is_some_and(|p| p.at >= m(25.0)), "{w:?}");
        assert!(w.keep_alive >= m(41.0), "{w:?}");
        let mut dear = Adaptive::new(AdaptiveConfig {
            cold_start_cost: m(60.0),
            ..config()
        });
        drive(&mut dear, m(0.0), &idles);
        let w = dear.windows();
        assert!(w.prewarm.is_none_or(|p| p.at <= m(1.0)), "{w:?}");
        assert!(w.keep_alive >= m(41.0), "{w:?}");
    }

    #[test]
    fn bounds_clamp_the_windows() {
        let bounded = AdaptiveConfig {
            min_keep_alive: Some(m(2.0)),
            max_keep_alive: Some(m(30.0)),
            ..config()
        };
        let mut a = Adaptive::new(bounded);
        assert_eq!(
            a.windows().keep_alive,
            m(10.0),
            "the fallback, within bounds"
        );
        drive(&mut a, m(0.0), &[period(60.0); 12]);
        // 66 min capped at 30; a pre-warm at 58 min would come after it: none.
        assert_eq!(a.windows().keep_alive, m(30.0));
        assert_eq!(a.windows().prewarm, None);
        let mut a = Adaptive::new(bounded);
        drive(&mut a, m(0.0), &[period(20.0); 12]);
        assert_eq!(
            a.windows().prewarm,
            Some(Prewarm {
                unload_after: m(2.0),
                at: m(18.0)
            })
        );
    }

    #[test]
    fn a_changed_pattern_is_followed_within_a_bounded_number_of_calls() {
        let mut a = Adaptive::new(config());
        let t = drive(&mut a, m(0.0), &[period(60.0); 40]);
        // Now every 20 minutes. The windows cover one stretch: they move to the new period once
        // its arrivals are worth more than the old one's (1/32 decay per call: about 40% of the
        // weight), not at the first new idle time.
        let mut calls = 0;
        let mut t = t;
        while a.windows().prewarm.map(|p| p.at) != Some(m(18.0)) {
            t = drive(&mut a, t, &[period(20.0)]);
            calls += 1;
            assert!(calls <= 25, "{:?}", a.windows());
        }
        assert_eq!(a.windows().keep_alive, m(22.0));
        // And back to hourly: faster (the pre-warmed stretch at an hour costs less waiting).
        let mut calls = 0;
        while a.windows().prewarm.map(|p| p.at) != Some(m(58.0)) {
            t = drive(&mut a, t, &[period(60.0)]);
            calls += 1;
            assert!(calls <= 5, "{:?}", a.windows());
        }
        assert_eq!(a.windows().keep_alive, m(66.0));
    }

    #[test]
    fn a_random_call_between_ticks_does_not_lose_the_next_tick() {
        let mut a = Adaptive::new(config());
        let t = drive(&mut a, m(0.0), &[period(60.0); 12]);
        // A tick at t (on the timer's clock: the anchor is where its request ends), then a
        // random call 20 minutes later.
        let anchor = t + Duration::from_secs(1);
        let t = drive(&mut a, t, &[m(20.0)]);
        let since = drive(&mut a, t, &[Duration::ZERO]);
        // Counted from the random call the pre-warm would come at 20 + 1 + 58 min; the tick is
        // due 60 min after the anchor, and the window counted from there holds.
        assert_eq!(a.phase(since + m(30.0)), Phase::Down);
        assert_eq!(a.wake_at(since + m(30.0)), Some(anchor + m(58.0)));
        assert_eq!(a.phase(anchor + m(58.5)), Phase::Prewarm);
        // The tick comes: it was on the clock; its idle period is the new anchor.
        a.prewarm_started(Duration::ZERO);
        let tick = anchor + period(60.0) + Duration::from_secs(1);
        assert_eq!(a.observe(tick, 1, Duration::ZERO), Some(PrewarmEvent::Used));
        a.observe(tick + Duration::from_secs(1), 0, Duration::ZERO);
        assert_eq!(
            a.wake_at(tick + m(2.0)),
            Some(tick + Duration::from_secs(1) + m(58.0))
        );
    }

    #[test]
    fn pre_warm_outcomes_are_reported() {
        let mut a = Adaptive::new(config());
        let t = drive(&mut a, m(0.0), &[period(60.0); 12]);
        a.prewarm_started(Duration::ZERO);
        // The request comes as predicted: used.
        assert_eq!(a.observe(t, 1, Duration::ZERO), Some(PrewarmEvent::Used));
        assert_eq!(a.unloaded(), None);
        a.prewarm_started(Duration::ZERO);
        assert_eq!(a.unloaded(), Some(PrewarmEvent::Wasted));
    }

    #[test]
    fn the_histogram_round_trips_and_refuses_another_bin_width() {
        let mut a = Adaptive::new(config());
        drive(&mut a, m(0.0), &[m(7.0), m(300.0), m(0.2), m(7.0)]);
        let bytes = a.histogram().encode();
        assert_eq!(bytes.len(), 507);
        let back = IdleHistogram::decode(&bytes, m(1.0)).unwrap();
        assert_eq!(&back, a.histogram());
        assert_eq!(IdleHistogram::decode(&bytes, m(2.0)), None);
        assert_eq!(IdleHistogram::decode(&bytes[1..], m(1.0)), None);
        assert_eq!(back.follow_up_share(), a.histogram().follow_up_share());
        // The second version (no follow-up share) and the first (no recent idle times either)
        // are still read.
        let mut v2 = bytes[..503].to_vec();
        v2[0] = 2;
        let old = IdleHistogram::decode(&v2, m(1.0)).unwrap();
        assert_eq!(
            old.recent().collect::<Vec<_>>(),
            a.histogram().recent().collect::<Vec<_>>()
        );
        assert_eq!(old.follow_up_share(), None);
        let mut v1 = bytes[..491].to_vec();
        v1[0] = 1;
        let old = IdleHistogram::decode(&v1, m(1.0)).unwrap();
        assert_eq!(old.recent().count(), 0);
        assert_eq!(old.observations(), 2);
    }

    #[test]
    fn a_function_never_seen_busy_has_no_idle_period() {
        let mut a = Adaptive::new(config());
        // Samples of a function that never had a request since the loop started.
        for s in 1..100 {
            let t = Duration::from_secs(s);
            a.observe(t, 0, t);
        }
        assert_eq!(a.phase(m(100.0)), Phase::Unknown);
        assert_eq!(a.histogram().observations(), 0);
    }
}
