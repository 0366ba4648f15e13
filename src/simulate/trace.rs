//! The simulator's input: request traces read from CSV (one row per request, or per-minute
//! invocation counts as published for Azure Functions), and the built-in synthetic shapes.
//!
//! A trace is, per function, a list of requests: when each arrives and how long a replica takes
//! to serve it. Times are virtual ([`Duration`] since the start of the run); nothing here reads a
//! clock, and the shapes draw their randomness from a seeded [`SplitMix64`], so a run is
//! reproducible bit for bit.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// One request of a trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Arrival, since the start of the run.
    pub time: Duration,
    /// Time a replica is busy with it (from getting its slot to finishing).
    pub duration: Duration,
}

/// What the simulator replays: each function's requests in arrival order, and where the run ends.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Trace {
    /// Requests per function name, sorted by arrival time (ties keep their order in the input).
    pub requests: BTreeMap<String, Vec<Request>>,
    /// End of the trace: the simulated run lasts at least this long.
    pub end: Duration,
    /// A per-minute trace read against a config of one function: the name of that function,
    /// whose settings every function of the trace is simulated with.
    pub template: Option<String>,
}

/// Why a trace file could not be read.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum TraceError {
    /// The first line is not a header naming the columns.
    #[error("line 1: expected a header such as `time,duration,function`, found `{0}`")]
    Header(String),
    /// A row is malformed or names an unknown function.
    #[error("line {line}: {reason}")]
    Row {
        /// 1-based line number in the file.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// Parses decimal seconds (`12`, `0.25`, `1.000001`) exactly, to the nanosecond.
pub fn parse_seconds(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && frac.is_empty()) || !digits(whole) || !digits(frac) {
        return Err(format!(
            "`{text}` is not a number of seconds such as 1.25 (no sign, no exponent)"
        ));
    }
    if frac.len() > 9 {
        return Err(format!("`{text}` has more than 9 decimal places"));
    }
    let secs: u64 = if whole.is_empty() {
        0
    } else {
        whole
            .parse()
            .map_err(|_| format!("`{text}` is too large"))?
    };
    let nanos: u32 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().expect("nine digits")
    };
    Ok(Duration::new(secs, nanos))
}

/// Formats a duration as decimal seconds, the way [`parse_seconds`] reads it.
pub fn format_seconds(d: Duration) -> String {
    let nanos = d.subsec_nanos();
    if nanos == 0 {
        return d.as_secs().to_string();
    }
    let frac = format!("{nanos:09}");
    format!("{}.{}", d.as_secs(), frac.trim_end_matches('0'))
}

/// Reads a CSV trace.
///
/// The first line is a header naming the columns: `time` and `duration` (decimal seconds), and
/// optionally `function`, in any order. Blank lines and lines starting with `#` are skipped. A row
/// with no `function` column, or an empty one, belongs to the config's only function; when
/// `functions` has several names, every row must name one of them. Rows need not be sorted. The
/// trace ends at its last arrival.
pub fn parse_csv(text: &str, functions: &[&str]) -> Result<Trace, TraceError> {
    let mut reader = reader(text);
    let header = read_header(&mut reader)?;
    let columns: Vec<&str> = header.iter().collect();
    let find = |name: &str| columns.iter().position(|c| *c == name);
    let joined = columns.join(",");
    let (Some(time_col), Some(duration_col)) = (find("time"), find("duration")) else {
        return Err(TraceError::Header(joined));
    };
    let function_col = find("function");
    if columns
        .iter()
        .any(|c| !matches!(*c, "time" | "duration" | "function"))
        || columns.len() != 2 + function_col.is_some() as usize
    {
        return Err(TraceError::Header(joined));
    }
    let only = match functions {
        [one] => Some(*one),
        _ => None,
    };

    let mut requests: BTreeMap<String, Vec<Request>> = BTreeMap::new();
    let mut end = Duration::ZERO;
    let mut record = csv::StringRecord::new();
    loop {
        let (line, more) = next_record(&mut reader, &mut record)?;
        if !more {
            break;
        }
        let err = |reason: String| TraceError::Row { line, reason };
        if record.len() != columns.len() {
            return Err(err(format!(
                "expected {} fields ({}), found {}",
                columns.len(),
                joined,
                record.len()
            )));
        }
        let time = parse_seconds(&record[time_col]).map_err(|r| err(format!("time: {r}")))?;
        let duration =
            parse_seconds(&record[duration_col]).map_err(|r| err(format!("duration: {r}")))?;
        let name = match function_col.map(|c| &record[c]).filter(|f| !f.is_empty()) {
            Some(name) if functions.contains(&name) => name,
            Some(name) => {
                return Err(err(format!(
                    "unknown function `{name}` (the config has: {})",
                    functions.join(", ")
                )))
            }
            None => only.ok_or_else(|| {
                err(format!(
                    "no function named, and the config has several ({}): add a `function` column",
                    functions.join(", ")
                ))
            })?,
        };
        end = end.max(time);
        requests
            .entry(name.to_owned())
            .or_default()
            .push(Request { time, duration });
    }
    for list in requests.values_mut() {
        list.sort_by_key(|r| r.time);
    }
    Ok(Trace {
        requests,
        end,
        template: None,
    })
}

fn reader(text: &str) -> csv::Reader<&[u8]> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        .comment(Some(b'#'))
        .trim(csv::Trim::All)
        .flexible(true)
        .from_reader(text.as_bytes())
}

fn read_header(reader: &mut csv::Reader<&[u8]>) -> Result<csv::StringRecord, TraceError> {
    let mut header = csv::StringRecord::new();
    match reader.read_record(&mut header) {
        Ok(true) => Ok(header),
        Ok(false) => Err(TraceError::Header(String::new())),
        Err(e) => Err(TraceError::Header(e.to_string())),
    }
}

/// Reads the next record; returns its line number and whether there was one.
fn next_record(
    reader: &mut csv::Reader<&[u8]>,
    record: &mut csv::StringRecord,
) -> Result<(usize, bool), TraceError> {
    let more = reader.read_record(record).map_err(|e| TraceError::Row {
        line: e.position().map_or(0, |p| p.line() as usize),
        reason: e.to_string(),
    })?;
    let line = record.position().map_or(0, |p| p.line() as usize);
    Ok((line, more))
}

/// How a per-minute trace's counts become requests.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MinuteOptions {
    /// Seed of the spread of each minute's arrivals.
    pub seed: u64,
    /// Service time of a function whose row gives none.
    pub service_time: Duration,
}

/// Reads a per-minute invocation-count trace, as published for Azure Functions 2019
/// (`invocations_per_function_md.anon.dNN.csv`): a header, then one row per function with its
/// name in the `function` column (or `HashFunction`; `HashOwner`, `HashApp` and `Trigger` are
/// ignored), its invocations in each minute in columns named `1`, `2`, … and optionally its mean
/// service time in seconds in a `duration` column.
///
/// Each minute's count becomes that many arrivals spread uniformly at random over the minute
/// (seeded by `options.seed` and the function's name), each busy for the function's duration.
/// With `functions` of one name, every row is simulated with that function's settings, under the
/// row's own name ([`Trace::template`]); otherwise every row must name a function of the config.
pub fn parse_minutes(
    text: &str,
    functions: &[&str],
    options: &MinuteOptions,
) -> Result<Trace, TraceError> {
    let mut reader = reader(text);
    let header = read_header(&mut reader)?;
    let joined = header.iter().collect::<Vec<_>>().join(",");
    let function_col = header
        .iter()
        .position(|c| c == "function")
        .or_else(|| header.iter().position(|c| c == "HashFunction"));
    let duration_col = header.iter().position(|c| c == "duration");
    let minutes: Vec<(usize, u64)> = header
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.parse::<u64>().ok().filter(|m| *m >= 1).map(|m| (i, m)))
        .collect();
    let Some(function_col) = function_col.filter(|_| !minutes.is_empty()) else {
        return Err(TraceError::Header(format!(
            "{joined} (a per-minute trace needs a `function` or `HashFunction` column and minute columns 1, 2, …)"
        )));
    };
    let template = match functions {
        [one] => Some(one.to_string()),
        _ => None,
    };
    let last_minute = minutes.iter().map(|(_, m)| *m).max().unwrap_or(0);
    let mut requests: BTreeMap<String, Vec<Request>> = BTreeMap::new();
    let mut record = csv::StringRecord::new();
    loop {
        let (line, more) = next_record(&mut reader, &mut record)?;
        if !more {
            break;
        }
        let err = |reason: String| TraceError::Row { line, reason };
        let name = record.get(function_col).unwrap_or("").to_owned();
        if name.is_empty() {
            return Err(err("no function named".into()));
        }
        if template.is_none() && !functions.contains(&name.as_str()) {
            return Err(err(format!(
                "unknown function `{name}` (the config has: {})",
                functions.join(", ")
            )));
        }
        let duration = match duration_col
            .and_then(|c| record.get(c))
            .filter(|d| !d.is_empty())
        {
            Some(d) => parse_seconds(d).map_err(|r| err(format!("duration: {r}")))?,
            None => options.service_time,
        };
        let mut rng = SplitMix64::new(options.seed ^ fnv1a(&name));
        let list = requests.entry(name).or_default();
        for (col, minute) in &minutes {
            let text = record.get(*col).unwrap_or("");
            let count: u64 = if text.is_empty() {
                0
            } else {
                text.parse().map_err(|_| {
                    err(format!(
                        "minute {minute}: `{text}` is not a count of invocations"
                    ))
                })?
            };
            let start = (minute - 1) as f64 * 60.0;
            for _ in 0..count {
                let time = micros(start + 60.0 * rng.next_f64());
                list.push(Request { time, duration });
            }
        }
    }
    for list in requests.values_mut() {
        list.sort_by_key(|r| r.time);
    }
    Ok(Trace {
        requests,
        end: Duration::from_secs(60 * last_minute),
        template,
    })
}

/// FNV-1a of a name: mixes a function's name into its seed.
fn fnv1a(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A small, fast, seedable generator (Steele, Lea and Flood's SplitMix64): the same seed gives
/// the same sequence on every platform.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`, with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A built-in synthetic load shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Constant rate `rps`.
    Steady,
    /// `rps`, with ten times that during the middle tenth of the run.
    Spike,
    /// Cycles of `period`: busy at `rps` for the first half, idle for the second.
    OnOff,
    /// One sinusoidal day over the run: from 0 up to `2 × rps` at the middle and back (mean `rps`).
    Diurnal,
}

impl Shape {
    /// Every shape, in the order the docs list them.
    pub const ALL: [Shape; 4] = [Shape::Steady, Shape::Spike, Shape::OnOff, Shape::Diurnal];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Steady => "steady",
            Shape::Spike => "spike",
            Shape::OnOff => "onoff",
            Shape::Diurnal => "diurnal",
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Shape {
    type Err = String;

    fn from_str(s: &str) -> Result<Shape, String> {
        Shape::ALL
            .into_iter()
            .find(|shape| shape.name() == s)
            .ok_or_else(|| {
                format!("unknown shape `{s}` (expected steady, spike, onoff or diurnal)")
            })
    }
}

/// Length of a synthetic run when `--duration` is not given.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(3600);
/// Mean arrival rate when `--rps` is not given.
pub const DEFAULT_RPS: f64 = 10.0;
/// Mean service time when `--service-time` is not given.
pub const DEFAULT_SERVICE_TIME: Duration = Duration::from_millis(200);
/// Seed when `--seed` is not given.
pub const DEFAULT_SEED: u64 = 1;

/// Everything that defines a synthetic trace.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ShapeParams {
    /// Which shape.
    pub shape: Shape,
    /// Length of the run.
    pub duration: Duration,
    /// Base (or mean, for `diurnal`) arrival rate, requests per second.
    pub rps: f64,
    /// Mean service time; each request's is drawn uniformly from half to one and a half times it.
    pub service_time: Duration,
    /// `onoff` only: length of one busy+idle cycle. `None` is a third of the run.
    pub period: Option<Duration>,
    /// Seed of the random arrivals and service times.
    pub seed: u64,
}

impl ShapeParams {
    /// The shape's defaults for everything but the shape.
    pub fn new(shape: Shape) -> ShapeParams {
        ShapeParams {
            shape,
            duration: DEFAULT_DURATION,
            rps: DEFAULT_RPS,
            service_time: DEFAULT_SERVICE_TIME,
            period: None,
            seed: DEFAULT_SEED,
        }
    }

    /// The `onoff` cycle length in effect.
    pub fn period(&self) -> Duration {
        self.period.unwrap_or(self.duration / 3)
    }

    /// The arrival rate (requests per second) at `t` seconds into the run.
    pub fn rate(&self, t: f64) -> f64 {
        let length = self.duration.as_secs_f64();
        match self.shape {
            Shape::Steady => self.rps,
            Shape::Spike => {
                if (0.45 * length..0.55 * length).contains(&t) {
                    10.0 * self.rps
                } else {
                    self.rps
                }
            }
            Shape::OnOff => {
                let period = self.period().as_secs_f64();
                if period <= 0.0 || t % period < period / 2.0 {
                    self.rps
                } else {
                    0.0
                }
            }
            Shape::Diurnal => self.rps * (1.0 - (2.0 * std::f64::consts::PI * t / length).cos()),
        }
    }

    /// The highest rate the shape reaches.
    pub fn peak_rate(&self) -> f64 {
        match self.shape {
            Shape::Steady | Shape::OnOff => self.rps,
            Shape::Spike => 10.0 * self.rps,
            Shape::Diurnal => 2.0 * self.rps,
        }
    }

    /// One line describing the trace, for reports.
    pub fn describe(&self) -> String {
        let mut text = format!(
            "shape {}: {}s at {} rps, service time {}s (uniform ±50%), seed {}",
            self.shape,
            format_seconds(self.duration),
            self.rps,
            format_seconds(self.service_time),
            self.seed
        );
        if self.shape == Shape::OnOff {
            text.push_str(&format!(", period {}s", format_seconds(self.period())));
        }
        text
    }
}

/// Rounds seconds to whole microseconds, so generated traces print exactly as CSV.
fn micros(secs: f64) -> Duration {
    Duration::from_micros((secs * 1e6).round() as u64)
}

/// Generates the requests of a synthetic shape: a Poisson process whose rate follows the shape
/// (drawn by thinning at the peak rate), with service times uniform in `[½, 1½) × service_time`.
pub fn generate(params: &ShapeParams) -> Vec<Request> {
    let mut rng = SplitMix64::new(params.seed);
    let peak = params.peak_rate();
    let length = params.duration.as_secs_f64();
    let mut requests = Vec::new();
    if !(peak.is_finite() && peak > 0.0) {
        return requests;
    }
    let service = params.service_time.as_secs_f64();
    let mut t = 0.0;
    loop {
        t += -(1.0 - rng.next_f64()).ln() / peak;
        if t >= length {
            break;
        }
        let accept = rng.next_f64() * peak < params.rate(t);
        let duration = micros(service * (0.5 + rng.next_f64()));
        let time = micros(t);
        if accept && time < params.duration {
            requests.push(Request { time, duration });
        }
    }
    requests
}

/// The trace of a shape, applied to each of `functions` alike.
pub fn shape_trace(params: &ShapeParams, functions: &[&str]) -> Trace {
    let requests = generate(params);
    Trace {
        requests: functions
            .iter()
            .map(|name| (name.to_string(), requests.clone()))
            .collect(),
        end: params.duration,
        template: None,
    }
}
