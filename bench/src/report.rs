//! The table, the target checks and the latency picture.

use std::fmt::Write as _;

use crate::case::Outcome;
use crate::run::{Condition, Measured, Row, by_case};

/// The baseline every ratio divides by.
const BASELINE: &str = "raw blocking TCP";

/// p50, p99 and p99.9 of nanosecond samples, in microseconds.
pub fn percentiles(ns: &[u64]) -> [f64; 3] {
    if ns.is_empty() {
        return [f64::NAN; 3];
    }
    let mut v = ns.to_vec();
    v.sort_unstable();
    [0.50, 0.99, 0.999].map(|q| at(&v, q) / 1e3)
}

/// The `q` quantile of sorted samples (nearest rank).
fn at(sorted: &[u64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64
}

fn thousands(x: f64) -> String {
    let s = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The headline figures of a measurement, each "higher is better" or "lower is better"
/// according to its kind, for ratios.
fn figures(m: &Measured) -> Vec<f64> {
    match &m.outcome {
        Outcome::Latencies(v) => percentiles(v).to_vec(),
        Outcome::Throughput {
            messages,
            bytes,
            seconds,
        } => vec![*messages as f64 / seconds, *bytes as f64 / seconds / 1e6],
        Outcome::Rate { requests, seconds } => {
            let mut f = vec![*requests as f64 / seconds];
            f.extend(m.bytes_per_conn);
            f
        }
    }
}

fn describe(m: &Measured) -> String {
    let f = figures(m);
    let cores = m.cpu_seconds / m.wall_seconds.max(1e-9);
    match &m.outcome {
        Outcome::Latencies(_) => format!(
            "p50 {:.1} · p99 {:.1} · p99.9 {:.1} µs · CPU {cores:.2} cores",
            f[0], f[1], f[2]
        ),
        Outcome::Throughput { .. } => {
            format!("{} msg/s · {} MB/s", thousands(f[0]), thousands(f[1]))
        }
        Outcome::Rate { .. } => match f.get(1) {
            Some(b) => format!("{} req/s · {:.1} KiB/conn", thousands(f[0]), b / 1024.0),
            None => format!("{} req/s", thousands(f[0])),
        },
    }
}

fn ratios(m: &Measured, base: &Measured) -> String {
    let (a, b) = (figures(m), figures(base));
    let parts: Vec<String> = a
        .iter()
        .zip(&b)
        .map(|(x, y)| format!("{:.2}x", x / y))
        .collect();
    parts.join(" · ")
}

/// The one markdown table: every row with its ratio to raw blocking TCP in the same case
/// and condition.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str("| case | cores | system | figures | × raw blocking TCP |\n|---|---|---|---|---|\n");
    for (case, cond, group) in by_case(rows) {
        let base = group
            .iter()
            .find(|r| r.system == BASELINE)
            .and_then(|r| r.result.as_ref().ok());
        for r in group {
            let (fig, ratio) = match (&r.result, base) {
                (Ok(m), Some(b)) => (describe(m), ratios(m, b)),
                (Ok(m), None) => (describe(m), "no baseline".into()),
                (Err(e), _) => (format!("n/a ({e})"), String::new()),
            };
            let cond = match cond {
                Condition::Idle => "idle",
                Condition::Busy => "busy",
            };
            let _ = writeln!(s, "| {case} | {cond} | {} | {fig} | {ratio} |", r.system);
        }
    }
    s.push('\n');
    s.push_str(&targets(rows));
    s
}

fn find<'a>(rows: &'a [Row], case: &str, cond: Condition, system: &str) -> Option<&'a Measured> {
    rows.iter()
        .find(|r| r.case == case && r.condition == cond && r.system == system)
        .and_then(|r| r.result.as_ref().ok())
}

/// The issue's targets, checked against this run.
fn targets(rows: &[Row]) -> String {
    let mut s = String::from("Targets (ratios from this run):\n\n");
    let mut line = |what: String, ok: Option<bool>| {
        let mark = match ok {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        };
        let _ = writeln!(s, "- {what}: **{mark}**");
    };
    let slic = "slic (TCP)";
    for cond in [Condition::Idle, Condition::Busy] {
        let case = "round trip 64 B, saturated";
        let r = find(rows, case, cond, slic).zip(find(rows, case, cond, BASELINE));
        let (p50, p99) = r.map_or((f64::NAN, f64::NAN), |(a, b)| {
            let (a, b) = (figures(a), figures(b));
            (a[0] / b[0], a[1] / b[1])
        });
        line(
            format!(
                "64 B round trip, {cond:?} cores: p50 {p50:.2}x raw (≤ 1.3x), p99 {p99:.2}x (≤ 2x)"
            ),
            r.map(|_| p50 <= 1.3 && p99 <= 2.0),
        );
    }
    let c = "one-way stream 64 B";
    let i = Condition::Idle;
    let (sl, zm, raw) = (
        find(rows, c, i, slic),
        find(rows, c, i, "ZeroMQ PUSH/PULL"),
        find(rows, c, i, BASELINE),
    );
    let rate = |m: Option<&Measured>| m.map_or(f64::NAN, |m| figures(m)[0]);
    line(
        format!(
            "64 B stream: {:.2}x ZeroMQ (≥ 3x), {:.2}x raw (≥ 0.5x)",
            rate(sl) / rate(zm),
            rate(sl) / rate(raw)
        ),
        (sl.is_some() && zm.is_some() && raw.is_some())
            .then(|| rate(sl) / rate(zm) >= 3.0 && rate(sl) / rate(raw) >= 0.5),
    );
    let c = "one-way stream 1 MiB";
    let mbs = |m: Option<&Measured>| m.map_or(f64::NAN, |m| figures(m)[1]);
    let (sl, raw) = (find(rows, c, i, slic), find(rows, c, i, BASELINE));
    line(
        format!("1 MiB stream: {:.2}x raw MB/s (≥ 0.9x)", mbs(sl) / mbs(raw)),
        (sl.is_some() && raw.is_some()).then(|| mbs(sl) / mbs(raw) >= 0.9),
    );
    let c = "requests 64 B, 64 in flight";
    let (sl, gr) = (find(rows, c, i, slic), find(rows, c, i, "gRPC tonic unary"));
    line(
        format!("64 in flight: {:.2}x tonic (≥ 5x)", rate(sl) / rate(gr)),
        (sl.is_some() && gr.is_some()).then(|| rate(sl) / rate(gr) >= 5.0),
    );
    let mem = rows
        .iter()
        .filter(|r| r.system == slic && r.case.contains("connections"))
        .find_map(|r| r.result.as_ref().ok()?.bytes_per_conn);
    line(
        format!(
            "memory per idle connection: {:.1} KiB (< 64 KiB)",
            mem.unwrap_or(f64::NAN) / 1024.0
        ),
        mem.map(|b| b < 64.0 * 1024.0),
    );
    let c = "round trip 64 B, paced 1000/s";
    let (sl, raw) = (find(rows, c, i, slic), find(rows, c, i, BASELINE));
    let p50 = |m: Option<&Measured>| m.map_or(f64::NAN, |m| figures(m)[0]);
    line(
        format!(
            "paced 1000/s, idle cores: slic p50 {:.1} µs vs raw {:.1} µs (no slower)",
            p50(sl),
            p50(raw)
        ),
        (sl.is_some() && raw.is_some()).then(|| p50(sl) <= p50(raw)),
    );
    s
}

/// Date, CPU and kernel, for the head of the written table.
pub fn machine_line() -> String {
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "Measured {date} on {cores} × {cpu}, Linux {}, by `slic-bench run`.",
        kernel.trim()
    )
}

const COLORS: [&str; 8] = [
    "#222222", "#888888", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

/// Latency distributions (percentile curves) of every system, one panel per 64 B round-trip
/// case and condition, as an SVG.
pub fn latency_svg(rows: &[Row]) -> String {
    let panels: Vec<(String, Condition, Vec<&Row>)> = by_case(rows)
        .into_iter()
        .filter(|(c, _, _)| c.starts_with("round trip 64 B"))
        .collect();
    let (pw, ph, margin) = (460.0, 300.0, 60.0);
    let cols = 2usize;
    let nrows = panels.len().div_ceil(cols).max(1);
    let (w, h) = (
        cols as f64 * (pw + margin) + margin,
        nrows as f64 * (ph + 2.0 * margin) + 40.0,
    );
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>
<text x="{margin}" y="22" font-size="15">Round-trip latency by percentile (log scales), client and server in separate processes</text>
"#
    );
    // Common y range over all panels: log10 of microseconds.
    let all: Vec<f64> = panels
        .iter()
        .flat_map(|(_, _, g)| g.iter())
        .filter_map(|r| match &r.result {
            Ok(Measured {
                outcome: Outcome::Latencies(v),
                ..
            }) if !v.is_empty() => Some(v),
            _ => None,
        })
        .flat_map(|v| [*v.iter().min().unwrap_or(&1), *v.iter().max().unwrap_or(&1)])
        .map(|ns| (ns.max(1) as f64 / 1e3).log10())
        .collect();
    let ymin = all.iter().copied().fold(f64::INFINITY, f64::min).floor();
    let ymax = all.iter().copied().fold(f64::NEG_INFINITY, f64::max).ceil();
    let (ymin, ymax) = if ymin.is_finite() && ymax > ymin {
        (ymin, ymax)
    } else {
        (0.0, 3.0)
    };
    let xmax = 3.0; // -log10(1 - 0.999)
    for (k, (case, cond, group)) in panels.iter().enumerate() {
        let ox = margin + (k % cols) as f64 * (pw + margin);
        let oy = 40.0 + (k / cols) as f64 * (ph + 2.0 * margin) + 20.0;
        let _ = writeln!(
            s,
            r#"<text x="{ox}" y="{}" font-size="13">{case}, {} cores</text>"#,
            oy - 6.0,
            match cond {
                Condition::Idle => "idle",
                Condition::Busy => "busy",
            }
        );
        let _ = writeln!(
            s,
            r##"<rect x="{ox}" y="{oy}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##
        );
        let px = |x: f64| ox + x / xmax * pw;
        let py = |y: f64| oy + ph - (y - ymin) / (ymax - ymin) * ph;
        for (x, label) in [
            (0.0, "p0"),
            (0.301, "p50"),
            (1.0, "p90"),
            (2.0, "p99"),
            (3.0, "p99.9"),
        ] {
            let _ = writeln!(
                s,
                r##"<line x1="{0}" y1="{oy}" x2="{0}" y2="{1}" stroke="#eee"/><text x="{0}" y="{2}" text-anchor="middle">{label}</text>"##,
                px(x),
                oy + ph,
                oy + ph + 14.0
            );
        }
        let mut e = ymin;
        while e <= ymax + 1e-9 {
            for m in [1.0f64, 2.0, 5.0] {
                let y = e + m.log10();
                if y > ymax + 1e-9 {
                    break;
                }
                let _ = writeln!(
                    s,
                    r##"<line x1="{ox}" y1="{0}" x2="{1}" y2="{0}" stroke="#eee"/><text x="{2}" y="{3}" text-anchor="end">{4} µs</text>"##,
                    py(y),
                    ox + pw,
                    ox - 4.0,
                    py(y) + 4.0,
                    10f64.powf(y).round()
                );
            }
            e += 1.0;
        }
        let mut legend = 0;
        for (i, r) in group.iter().enumerate() {
            let Ok(Measured {
                outcome: Outcome::Latencies(v),
                ..
            }) = &r.result
            else {
                continue;
            };
            if v.is_empty() {
                continue;
            }
            let mut sorted = v.clone();
            sorted.sort_unstable();
            let color = COLORS[i % COLORS.len()];
            let mut d = String::new();
            for step in 0..=300 {
                let x = step as f64 / 100.0;
                let q = 1.0 - 10f64.powf(-x);
                let y = (at(&sorted, q).max(1.0) / 1e3).log10();
                let _ = write!(
                    d,
                    "{}{:.1},{:.1} ",
                    if step == 0 { "M" } else { "L" },
                    px(x),
                    py(y)
                );
            }
            let _ = writeln!(
                s,
                r#"<path d="{d}" fill="none" stroke="{color}" stroke-width="1.6"/>"#
            );
            let ly = oy + 14.0 + legend as f64 * 14.0;
            let _ = writeln!(
                s,
                r#"<line x1="{0}" y1="{1}" x2="{2}" y2="{1}" stroke="{color}" stroke-width="2"/><text x="{3}" y="{4}">{5}</text>"#,
                ox + 8.0,
                ly - 4.0,
                ox + 26.0,
                ox + 30.0,
                ly,
                r.system
            );
            legend += 1;
        }
    }
    s.push_str("</svg>\n");
    s
}
