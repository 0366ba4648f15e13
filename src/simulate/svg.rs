//! Draws a simulation [`Report`] as one self-contained SVG: per function, a panel with arrivals
//! (and shed requests) per second on the left axis and replicas asked for and ready on the right.

use std::fmt::Write as _;
use std::time::Duration;

use super::{FunctionReport, Report};

const WIDTH: f64 = 960.0;
const PANEL_HEIGHT: f64 = 300.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 70.0;
const TOP: f64 = 56.0;
const BOTTOM: f64 = 50.0;
/// At most this many points per series: longer runs are averaged over wider bins.
const MAX_BINS: u64 = 600;

const ARRIVALS: &str = "#4e79a7";
const SHED: &str = "#e15759";
const ASKED: &str = "#f28e2b";
const READY: &str = "#59a14f";

/// Escapes text for SVG content and attributes.
fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A round step (1, 2 or 5 × 10ⁿ) giving at most about `ticks` ticks up to `max`.
fn nice_step(max: f64, ticks: f64) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let raw = max / ticks;
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude)
}

/// A tick label without needless decimals.
fn label(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        format!("{v:.1}")
    }
}

/// Events per second, averaged over bins of `bin` seconds, covering `[0, end)`.
fn per_second(times: &[Duration], bin: u64, bins: usize) -> Vec<f64> {
    let mut counts = vec![0u64; bins];
    for t in times {
        let i = (t.as_secs() / bin) as usize;
        if let Some(c) = counts.get_mut(i.min(bins - 1)) {
            *c += 1;
        }
    }
    counts.iter().map(|c| *c as f64 / bin as f64).collect()
}

/// Renders the report with `title` on top, one line per line of `title` (e.g. the config file,
/// then the trace).
pub fn render(report: &Report, title: &str) -> String {
    let lines: Vec<&str> = title.lines().collect();
    let head = 16.0 + 20.0 * lines.len().max(1) as f64;
    let height = head + PANEL_HEIGHT * report.functions.len().max(1) as f64;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>"#
    );
    for (i, line) in lines.iter().enumerate() {
        let _ = writeln!(
            out,
            r#"<text x="{x}" y="{y}" font-size="14" text-anchor="middle">{line}</text>"#,
            x = WIDTH / 2.0,
            y = 24.0 + 20.0 * i as f64,
            line = esc(line)
        );
    }
    for (i, f) in report.functions.iter().enumerate() {
        panel(&mut out, f, head + i as f64 * PANEL_HEIGHT);
    }
    out.push_str("</svg>\n");
    out
}

fn panel(out: &mut String, f: &FunctionReport, top: f64) {
    let tl = &f.timeline;
    let s = &f.summary;
    let end = tl.end.as_secs_f64().max(1.0);
    let seconds = (tl.end.as_secs() + u64::from(tl.end.subsec_nanos() > 0)).max(1);
    let bin = seconds.div_ceil(MAX_BINS).max(1);
    let bins = seconds.div_ceil(bin) as usize;
    let arrivals = per_second(&tl.arrivals, bin, bins);
    let shed = per_second(&tl.shed, bin, bins);

    let (x0, x1) = (LEFT, WIDTH - RIGHT);
    let (y0, y1) = (top + PANEL_HEIGHT - BOTTOM, top + TOP);
    let x = |t: f64| x0 + (x1 - x0) * (t / end).min(1.0);

    let rate_max = arrivals.iter().copied().fold(0.0, f64::max);
    let rate_step = nice_step(rate_max, 5.0);
    let rate_top = ((rate_max / rate_step).ceil() * rate_step).max(rate_step);
    let y_rate = |v: f64| y0 - (y0 - y1) * v / rate_top;
    let replica_max = tl
        .replicas
        .iter()
        .map(|p| p.1.max(p.2))
        .max()
        .unwrap_or(0)
        .max(1) as f64
        + 1.0; // headroom: the top count stays off the frame
    let replica_step = nice_step(replica_max, 5.0).max(1.0);
    let replica_top = (replica_max / replica_step).ceil() * replica_step;
    let y_rep = |v: f64| y0 - (y0 - y1) * v / replica_top;

    // Title and legend.
    let shed_total = s.shed();
    let _ = writeln!(
        out,
        r#"<text x="{x0}" y="{ty}" font-size="13" font-weight="bold">{name}</text>
<text x="{x1}" y="{ty}" text-anchor="end">{requests} requests, {shed_total} shed, {held} held, {rs:.0} replica-s, peak {peak}</text>"#,
        ty = top + 18.0,
        name = esc(&f.name),
        requests = s.requests,
        held = s.held,
        rs = s.replica_seconds,
        peak = s.peak_replicas,
    );
    let legend = [
        (ARRIVALS, "arrivals/s", ""),
        (SHED, "shed/s", ""),
        (ASKED, "replicas asked for", r#" stroke-dasharray="6 3""#),
        (READY, "replicas ready", ""),
    ];
    let mut lx = x0;
    for (color, text, dash) in legend {
        let ly = top + 36.0;
        let _ = writeln!(
            out,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2.5"{dash}/><text x="{}" y="{}">{text}</text>"#,
            lx + 22.0,
            lx + 27.0,
            ly + 4.0
        );
        lx += 40.0 + 7.0 * text.len() as f64;
    }

    // Grid, axes and tick labels.
    let _ = writeln!(out, r##"<g stroke="#ccc" stroke-width="1">"##);
    let mut v = 0.0;
    while v <= rate_top + 1e-9 {
        let _ = writeln!(
            out,
            r#"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}"/>"#,
            y = y_rate(v)
        );
        v += rate_step;
    }
    out.push_str("</g>\n");
    let _ = writeln!(
        out,
        r##"<g stroke="#333" stroke-width="1"><line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}"/><line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}"/><line x1="{x1}" y1="{y0}" x2="{x1}" y2="{y1}"/></g>"##
    );
    let mut v = 0.0;
    while v <= rate_top + 1e-9 {
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            x0 - 6.0,
            y_rate(v) + 4.0,
            label(v)
        );
        v += rate_step;
    }
    let mut v = 0.0;
    while v <= replica_top + 1e-9 {
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{:.1}">{}</text>"#,
            x1 + 6.0,
            y_rep(v) + 4.0,
            label(v)
        );
        v += replica_step;
    }
    let time_step = nice_step(end, 10.0);
    let mut t = 0.0;
    while t <= end + 1e-9 {
        let _ = writeln!(
            out,
            r##"<line x1="{xt:.1}" y1="{y0}" x2="{xt:.1}" y2="{}" stroke="#333"/><text x="{xt:.1}" y="{}" text-anchor="middle">{}</text>"##,
            y0 + 5.0,
            y0 + 18.0,
            label(t),
            xt = x(t)
        );
        t += time_step;
    }
    let mid = (y0 + y1) / 2.0;
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">time (s)</text>
<text transform="translate({},{mid}) rotate(-90)" text-anchor="middle" fill="{ARRIVALS}">requests/s</text>
<text transform="translate({},{mid}) rotate(90)" text-anchor="middle" fill="{READY}">replicas</text>"#,
        (x0 + x1) / 2.0,
        y0 + 38.0,
        x0 - 48.0,
        x1 + 40.0,
    );

    // Series: rates as filled steps, replica counts as step lines.
    let steps = |values: &[f64]| {
        let mut d = format!("M{x0:.1},{y0:.1}");
        for (i, v) in values.iter().enumerate() {
            let (a, b) = ((i as u64 * bin) as f64, ((i as u64 + 1) * bin) as f64);
            let _ = write!(
                d,
                " L{:.1},{:.1} L{:.1},{:.1}",
                x(a),
                y_rate(*v),
                x(b.min(end)),
                y_rate(*v)
            );
        }
        let _ = write!(d, " L{:.1},{y0:.1} Z", x(end));
        d
    };
    let _ = writeln!(
        out,
        r#"<path d="{}" fill="{ARRIVALS}" fill-opacity="0.35" stroke="{ARRIVALS}" stroke-width="1"/>"#,
        steps(&arrivals)
    );
    if shed_total > 0 {
        let _ = writeln!(
            out,
            r#"<path d="{}" fill="{SHED}" fill-opacity="0.5" stroke="{SHED}" stroke-width="1"/>"#,
            steps(&shed)
        );
    }
    // Ready first, so that the dashed asked-for line stays visible where the two agree.
    for (which, color, dash) in [(2, READY, ""), (1, ASKED, r#" stroke-dasharray="6 3""#)] {
        let mut d = String::new();
        let mut last = None;
        for p in &tl.replicas {
            let v = if which == 1 { p.1 } else { p.2 } as f64;
            let px = x(p.0.as_secs_f64());
            match last {
                None => {
                    let _ = write!(d, "M{px:.1},{:.1}", y_rep(v));
                }
                Some(prev) => {
                    let _ = write!(d, " L{px:.1},{:.1} L{px:.1},{:.1}", y_rep(prev), y_rep(v));
                }
            }
            last = Some(v);
        }
        if let Some(prev) = last {
            let _ = write!(d, " L{:.1},{:.1}", x(end), y_rep(prev));
        }
        let _ = writeln!(
            out,
            r#"<path d="{d}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#
        );
    }
}
