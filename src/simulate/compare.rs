//! `sluicegate simulate --compare`: one trace through several configurations, among them built-in
//! presets that reproduce the scale-to-zero policies of the gateways users come from, totalled
//! into one table and one chart of cold starts against replica-seconds.
//!
//! A preset keeps everything of the user's config but the autoscaler: its mode, per-replica
//! target, window, decision interval and idle time to zero are the peer's documented defaults
//! (sources in docs/simulate.md), with `min_replicas = 0` and the config's `max_replicas`.

use std::fmt::Write as _;
use std::time::Duration;

use super::{Report, Summary};
use crate::config::{
    AdaptiveConfig, AutoscalerConfig, Config, ScaleMode, DEFAULT_ADAPTIVE_BIN_WIDTH,
    DEFAULT_ADAPTIVE_COLD_START_COST, DEFAULT_COOLDOWN_PERIOD,
};

/// A built-in configuration of the autoscaler.
#[derive(Clone, Copy, Debug)]
pub struct Preset {
    /// The name given to `--compare`.
    pub name: &'static str,
    /// What it reproduces, in a few words.
    pub summary: &'static str,
    /// Sets the autoscaler, given the function's `max_ongoing_requests` (what one replica takes
    /// at once).
    apply: fn(&mut AutoscalerConfig, u32),
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn fixed(a: &mut AutoscalerConfig, keep: u64) {
    a.cooldown_period = secs(keep);
    a.adaptive = None;
}

/// Every preset, in the order the table lists them.
pub const PRESETS: [Preset; 9] = [
    Preset {
        name: "keda-http",
        summary: "KEDA HTTP add-on: 100 in flight per replica (at most max_ongoing_requests), HPA every 15 s, cooldownPeriod 300 s",
        apply: |a, capacity| {
            // targetPendingRequests 100, but never more than a replica here takes at once: a
            // user of the add-on with such replicas must set it so.
            a.mode = ScaleMode::Concurrency {
                target_ongoing_requests: 100.0_f64.min(capacity as f64),
            };
            a.window = secs(15);
            a.polling_interval = secs(15);
            fixed(a, 300);
        },
    },
    Preset {
        name: "knative-kpa",
        summary: "Knative KPA: 70% of min(100, max_ongoing_requests) in flight per pod over 60 s (panic 6 s), tick 2 s, zero 30 s after the window empties",
        apply: |a, capacity| {
            // Knative's target is 70% of containerConcurrency when that hard limit is set (as
            // max_ongoing_requests is), of container-concurrency-target-default (100) otherwise.
            a.mode = ScaleMode::Concurrency {
                target_ongoing_requests: 0.7 * 100.0_f64.min(capacity as f64),
            };
            a.window = secs(60);
            a.polling_interval = secs(2);
            fixed(a, 30);
        },
    },
    Preset {
        name: "openfaas-ce-idler",
        summary: "OpenFaaS CE: 5 rps per replica over 10 s, alert every 30 s; idler: zero after 15 min",
        apply: |a, _| {
            a.mode = ScaleMode::Rps { threshold: 50.0 };
            a.window = secs(10);
            a.polling_interval = secs(30);
            fixed(a, 900);
        },
    },
    Preset {
        name: "ray-serve",
        summary: "Ray Serve: 2 ongoing per replica over a 30 s look-back, downscale delay 600 s (min_replicas 0)",
        apply: |a, capacity| {
            a.mode = ScaleMode::Concurrency {
                target_ongoing_requests: 2.0_f64.min(capacity as f64),
            };
            a.window = secs(30);
            a.polling_interval = secs(1);
            fixed(a, 600);
        },
    },
    Preset {
        name: "fixed-1m",
        summary: "the config, with cooldown_period = 1 minute",
        apply: |a, _| fixed(a, 60),
    },
    Preset {
        name: "fixed-5m",
        summary: "the config, with cooldown_period = 5 minutes",
        apply: |a, _| fixed(a, 300),
    },
    Preset {
        name: "fixed-10m",
        summary: "the config, with cooldown_period = 10 minutes (AWS Lambda's keep-alive as the paper reports it)",
        apply: |a, _| fixed(a, 600),
    },
    Preset {
        name: "fixed-20m",
        summary: "the config, with cooldown_period = 20 minutes (Azure Functions' keep-alive as the paper reports it)",
        apply: |a, _| fixed(a, 1200),
    },
    Preset {
        name: "adaptive",
        summary: "the config, with cooldown_period = \"adaptive\"",
        apply: |a, _| {
            a.cooldown_period = DEFAULT_COOLDOWN_PERIOD;
            a.adaptive = Some(AdaptiveConfig {
                bin_width: DEFAULT_ADAPTIVE_BIN_WIDTH,
                min_keep_alive: None,
                max_keep_alive: None,
                cold_start_cost: DEFAULT_ADAPTIVE_COLD_START_COST,
            });
        },
    },
];

/// The preset named `name`.
pub fn preset(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}

impl Preset {
    /// `config` with every scalable function's autoscaler replaced by this preset's (bounds
    /// `0..=max_replicas`).
    pub fn apply(&self, config: &Config) -> Config {
        let mut config = config.clone();
        for f in config.functions.values_mut() {
            if f.autoscaler.mode == ScaleMode::None || !f.provider.scalable() {
                continue;
            }
            f.autoscaler.min_replicas = 0;
            (self.apply)(&mut f.autoscaler, f.max_ongoing_requests);
        }
        config
    }
}

/// One configuration's totals over every function of the trace.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Totals {
    /// The preset's name or the config file.
    pub name: String,
    /// Requests that arrived.
    pub requests: u64,
    /// Requests that arrived while their function had no ready replica.
    pub cold_start_requests: u64,
    /// Replica-seconds, all functions.
    pub replica_seconds: f64,
    /// Of which no request was being served.
    pub idle_replica_seconds: f64,
    /// Requests shed for any reason.
    pub shed: u64,
    /// Pre-warms started, used and wasted.
    pub prewarms: u64,
    /// Pre-warms a request arrived for.
    pub prewarms_used: u64,
    /// Pre-warms that went unused.
    pub prewarms_wasted: u64,
    /// Functions simulated.
    pub functions: usize,
    /// The 75th percentile over functions of the share of requests that found no ready replica
    /// (the paper's "3rd-quartile application cold-start %"), in percent.
    pub cold_start_p75_percent: f64,
}

impl Totals {
    /// The totals of one run.
    pub fn of(name: &str, report: &Report) -> Totals {
        let mut t = Totals {
            name: name.to_owned(),
            functions: report.functions.len(),
            ..Totals::default()
        };
        let mut shares: Vec<f64> = Vec::new();
        for f in &report.functions {
            let s: &Summary = &f.summary;
            t.requests += s.requests;
            t.cold_start_requests += s.cold_start_requests;
            t.replica_seconds += s.replica_seconds;
            t.idle_replica_seconds += s.idle_replica_seconds;
            t.shed += s.shed();
            t.prewarms += s.prewarms;
            t.prewarms_used += s.prewarms_used;
            t.prewarms_wasted += s.prewarms_wasted;
            if s.requests > 0 {
                shares.push(100.0 * s.cold_start_requests as f64 / s.requests as f64);
            }
        }
        shares.sort_by(f64::total_cmp);
        if !shares.is_empty() {
            t.cold_start_p75_percent = shares[(shares.len() * 3).div_ceil(4) - 1];
        }
        t
    }
}

/// The `--compare` table.
pub fn table(rows: &[Totals]) -> String {
    let header = [
        "config",
        "requests",
        "cold-start req",
        "cold %",
        "p75 fn cold %",
        "replica-h",
        "idle replica-h",
        "shed",
        "pre-warms used/wasted",
    ];
    let cells: Vec<[String; 9]> = rows
        .iter()
        .map(|t| {
            [
                t.name.clone(),
                t.requests.to_string(),
                t.cold_start_requests.to_string(),
                format!(
                    "{:.2}",
                    100.0 * t.cold_start_requests as f64 / t.requests.max(1) as f64
                ),
                format!("{:.1}", t.cold_start_p75_percent),
                format!("{:.1}", t.replica_seconds / 3600.0),
                format!("{:.1}", t.idle_replica_seconds / 3600.0),
                t.shed.to_string(),
                if t.prewarms == 0 {
                    "-".into()
                } else {
                    format!("{}/{}", t.prewarms_used, t.prewarms_wasted)
                },
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            cells
                .iter()
                .map(|r| r[c].len())
                .chain([header[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let line = |out: &mut String, row: &[&str]| {
        let mut text = String::new();
        for (c, cell) in row.iter().enumerate() {
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
    for row in &cells {
        let row: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&mut out, &row);
    }
    out
}

/// The chart: one point per configuration, replica-hours across, requests that met a cold start
/// up; the fixed keep-alives joined by a line (the frontier a fixed idle time can reach).
pub fn svg(rows: &[Totals], title: &str) -> String {
    const W: f64 = 860.0;
    const H: f64 = 560.0;
    const L: f64 = 90.0;
    const R: f64 = 40.0;
    const T: f64 = 70.0;
    const B: f64 = 60.0;
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let xs: Vec<f64> = rows.iter().map(|t| t.replica_seconds / 3600.0).collect();
    let ys: Vec<f64> = rows.iter().map(|t| t.cold_start_requests as f64).collect();
    let (x0, x1) = bounds(&xs);
    let (y0, y1) = bounds(&ys);
    let px = |x: f64| L + (x - x0) / (x1 - x0) * (W - L - R);
    let py = |y: f64| H - B - (y - y0) / (y1 - y0) * (H - T - B);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>"#
    );
    for (i, line) in title.lines().enumerate() {
        let _ = writeln!(
            out,
            r#"<text x="{L}" y="{}" font-size="13">{}</text>"#,
            20.0 + 18.0 * i as f64,
            esc(line)
        );
    }
    // Axes with five ticks each.
    let _ = writeln!(
        out,
        r##"<line x1="{L}" y1="{}" x2="{}" y2="{}" stroke="#333"/><line x1="{L}" y1="{T}" x2="{L}" y2="{}" stroke="#333"/>"##,
        H - B,
        W - R,
        H - B,
        H - B
    );
    for k in 0..=5 {
        let x = x0 + (x1 - x0) * k as f64 / 5.0;
        let y = y0 + (y1 - y0) * k as f64 / 5.0;
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{}" text-anchor="middle" fill="#555">{:.0}</text><text x="{}" y="{:.1}" text-anchor="end" fill="#555">{:.0}</text>"##,
            px(x),
            H - B + 18.0,
            x,
            L - 8.0,
            py(y) + 4.0,
            y
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">replica-hours (cost)</text><text x="20" y="{}" transform="rotate(-90 20 {})" text-anchor="middle">requests that met a cold start</text>"#,
        (L + W - R) / 2.0,
        H - 15.0,
        (T + H - B) / 2.0,
        (T + H - B) / 2.0
    );
    // The fixed keep-alives, joined in order of their idle time.
    let fixed: Vec<(f64, f64)> = rows
        .iter()
        .zip(xs.iter().zip(&ys))
        .filter(|(t, _)| t.name.starts_with("fixed-"))
        .map(|(_, (x, y))| (px(*x), py(*y)))
        .collect();
    if fixed.len() > 1 {
        let points: Vec<String> = fixed
            .iter()
            .map(|(x, y)| format!("{x:.1},{y:.1}"))
            .collect();
        let _ = writeln!(
            out,
            r##"<polyline points="{}" fill="none" stroke="#999" stroke-dasharray="4 3"/>"##,
            points.join(" ")
        );
    }
    for ((t, x), y) in rows.iter().zip(&xs).zip(&ys) {
        let colour = if t.name == "adaptive" {
            "#e15759"
        } else if t.name.starts_with("fixed-") {
            "#777"
        } else {
            "#4e79a7"
        };
        let _ = writeln!(
            out,
            r#"<circle cx="{:.1}" cy="{:.1}" r="5" fill="{colour}"/><text x="{:.1}" y="{:.1}" fill="{colour}">{}</text>"#,
            px(*x),
            py(*y),
            px(*x) + 8.0,
            py(*y) - 6.0,
            esc(&t.name)
        );
    }
    out.push_str("</svg>\n");
    out
}

/// From 0 (or a little under the least) to a little over the most.
fn bounds(values: &[f64]) -> (f64, f64) {
    let max = values.iter().copied().fold(0.0, f64::max);
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let low = if min.is_finite() && min > 0.3 * max {
        min - 0.1 * (max - min).max(1.0)
    } else {
        0.0
    };
    let high = if max > low {
        max + 0.08 * (max - low)
    } else {
        low + 1.0
    };
    (low.max(0.0), high)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::{run, trace::parse_csv, Options};

    const CONFIG: &str = "[functions.f]\nprovider = \"process\"\ncommand = [\"x\"]\n[functions.f.autoscaler]\nmin_replicas = 1\nmax_replicas = 7\n[functions.s]\nprovider = \"static\"\nupstreams = [\"http://a:1\"]\n";

    fn config() -> Config {
        Config::parse(std::path::Path::new("t.toml"), CONFIG, None).unwrap()
    }

    #[test]
    fn presets_replace_the_autoscaler_of_scalable_functions_only() {
        let base = config();
        let knative = preset("knative-kpa").unwrap().apply(&base);
        let a = &knative.functions["f"].autoscaler;
        assert_eq!(
            (a.min_replicas, a.max_replicas, a.cooldown_period, a.window),
            (0, 7, secs(30), secs(60))
        );
        // 70% of what a replica takes at once (max_ongoing_requests, 5 by default), as Knative
        // does with containerConcurrency set; KEDA's 100 and Ray Serve's 2 capped the same way.
        assert_eq!(
            a.mode,
            ScaleMode::Concurrency {
                target_ongoing_requests: 3.5
            }
        );
        let target = |name: &str| {
            preset(name).unwrap().apply(&base).functions["f"]
                .autoscaler
                .mode
        };
        assert_eq!(
            (target("keda-http"), target("ray-serve")),
            (
                ScaleMode::Concurrency {
                    target_ongoing_requests: 5.0
                },
                ScaleMode::Concurrency {
                    target_ongoing_requests: 2.0
                }
            )
        );
        assert_eq!(
            knative.functions["s"].autoscaler,
            base.functions["s"].autoscaler
        );
        let adaptive = preset("adaptive").unwrap().apply(&base);
        assert!(adaptive.functions["f"].autoscaler.adaptive.is_some());
        let fixed = preset("fixed-20m").unwrap().apply(&adaptive);
        let a = &fixed.functions["f"].autoscaler;
        assert_eq!((a.cooldown_period, a.adaptive), (secs(1200), None));
        assert!(preset("lambda").is_none());
    }

    #[test]
    fn totals_table_and_chart() {
        let base = config();
        let trace = parse_csv(
            "time,duration,function\n0,1,f\n1000,1,f\n1001,1,f\n",
            &["f", "s"],
        )
        .unwrap();
        let rows: Vec<Totals> = ["fixed-1m", "fixed-20m"]
            .iter()
            .map(|name| {
                let config = preset(name).unwrap().apply(&base);
                Totals::of(name, &run(&config, &trace, &Options::default()))
            })
            .collect();
        // One minute: cold at 0 and again at 1000 (the 1001 s one waits for the same start);
        // twenty minutes: only the first.
        assert_eq!(rows[0].cold_start_requests, 3);
        assert_eq!(rows[1].cold_start_requests, 1);
        assert!(rows[0].replica_seconds < rows[1].replica_seconds);
        assert_eq!(rows[1].requests, 3);
        let text = table(&rows);
        assert!(text.starts_with("config"), "{text}");
        assert!(text.lines().nth(2).unwrap().starts_with("fixed-20m"));
        let chart = svg(&rows, "t");
        assert_eq!(chart.matches("<circle").count(), 2);
        assert!(chart.contains("<polyline"));
    }
}
