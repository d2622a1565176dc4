//! `--report FILE.svg|.html`: a picture of the run drawn with plotters.
//! The top chart is the run over time (hold: open connections; rate and
//! latency: completions per second; throughput: Gbit/s per direction), the
//! bottom one the latency distribution as a percentile curve (x axis
//! log-scaled towards the tail: 0%, 90%, 99%, 99.9%, ...), corrected and
//! uncorrected for `latency` mode. The HTML form wraps the same SVG with
//! the final table.
//!
//! Invariant: drawing never fails because of the data (empty timeline or
//! histogram, zero rates): axis ranges are clamped to be non-empty.

use std::path::Path;

use anyhow::{Result, anyhow, bail};
use plotters::prelude::*;

use crate::report::{Report, table};
use crate::stats::{Hist, Measurement, Sample};

/// Check `--report`'s extension before the run starts.
pub fn check_path(path: &Path) -> Result<()> {
    match ext(path).as_str() {
        "svg" | "html" | "htm" => Ok(()),
        _ => bail!("--report {}: the file name must end in .svg or .html", path.display()),
    }
}

fn ext(path: &Path) -> String {
    path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase()
}

pub fn write(path: &Path, r: &Report, m: &Measurement) -> Result<()> {
    check_path(path)?;
    let svg = render(r, m)?;
    let body = if ext(path) == "svg" {
        svg
    } else {
        format!(
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>ringload {mode}</title>\
             <style>body{{font-family:sans-serif;margin:2em}}pre{{background:#f4f4f4;padding:1em}}</style></head>\
             <body><h1>ringload {mode}</h1><p><code>{cmd}</code></p><pre>{table}</pre>{svg}</body></html>\n",
            mode = escape(&r.mode),
            cmd = escape(&r.command),
            table = escape(&table(r)),
        )
    };
    std::fs::write(path, body)?;
    Ok(())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the report: {e:?}")
}

/// A named, coloured line of (x, y) points.
type Series = (&'static str, RGBColor, Vec<(f64, f64)>);

/// Per-interval rates from cumulative samples.
fn rates(tl: &[Sample], f: impl Fn(&Sample) -> u64, scale: f64) -> Vec<(f64, f64)> {
    tl.windows(2)
        .filter_map(|w| {
            let dt = w[1].t_s - w[0].t_s;
            (dt > 0.0).then(|| (w[1].t_s, f(&w[1]).saturating_sub(f(&w[0])) as f64 / dt * scale))
        })
        .collect()
}

fn render(r: &Report, m: &Measurement) -> Result<String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (1000, 760)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (top, bottom) = root.split_vertically(380);
        let tl = &m.timeline;
        let (title, ylabel, series): (&str, &str, Vec<Series>) = match r.mode.as_str() {
            "hold" => (
                "connections over time",
                "open connections",
                vec![("open", BLUE, tl.iter().map(|s| (s.t_s, s.open as f64)).collect())],
            ),
            "throughput" => (
                "throughput over time",
                "Gbit/s",
                vec![("up", BLUE, rates(tl, |s| s.up_bytes, 8e-9)), ("down", RED, rates(tl, |s| s.down_bytes, 8e-9))],
            ),
            "rate" => (
                "connections per second",
                "connections/s",
                vec![("completed/s", BLUE, rates(tl, |s| s.completed, 1.0))],
            ),
            _ => ("requests per second", "requests/s", vec![("responses/s", BLUE, rates(tl, |s| s.completed, 1.0))]),
        };
        let tmax = tl.last().map_or(1.0, |s| s.t_s).max(0.1);
        let ymax = series.iter().flat_map(|(_, _, p)| p.iter().map(|&(_, y)| y)).fold(0.0f64, f64::max).max(1.0) * 1.1;
        let mut chart = ChartBuilder::on(&top)
            .caption(format!("ringload {}: {title}", r.mode), ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..tmax, 0f64..ymax)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("seconds since start")
            .y_desc(ylabel)
            .y_label_formatter(&axis_number)
            .draw()
            .map_err(err)?;
        for (name, color, pts) in series {
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(err)?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
        chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw().map_err(err)?;

        let mut curves: Vec<(&str, RGBColor, &Hist)> = Vec::new();
        if !m.latency.is_empty() {
            let name = match r.mode.as_str() {
                "hold" => "heartbeat RTT",
                "rate" => "connect + echo",
                "latency" => "corrected (from intended send time)",
                _ => "latency",
            };
            curves.push((name, BLUE, &m.latency));
        }
        if !m.latency_uncorrected.is_empty() {
            curves.push(("uncorrected (from actual send)", RED, &m.latency_uncorrected));
        }
        if curves.is_empty() && !m.connect_latency.is_empty() {
            curves.push(("connect time", BLUE, &m.connect_latency));
        }
        let lmax = curves.iter().map(|(_, _, h)| h.0.max()).max().unwrap_or(1).max(1) as f64 / 1000.0 * 1.1;
        let mut chart = ChartBuilder::on(&bottom)
            .caption("latency distribution", ("sans-serif", 20))
            .margin(15)
            .margin_right(40)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..5f64, 0f64..lmax)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("milliseconds")
            .y_label_formatter(&axis_number)
            .x_labels(6)
            .x_label_formatter(&|x| format!("{}%", percentile_label(*x)))
            .draw()
            .map_err(err)?;
        for (name, color, h) in curves {
            let pts: Vec<(f64, f64)> = (0..=500)
                .map(|i| {
                    let x = i as f64 / 100.0;
                    let q = 100.0 * (1.0 - 10f64.powf(-x));
                    (x, h.0.value_at_percentile(q) as f64 / 1000.0)
                })
                .collect();
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(err)?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(out)
}

/// Axis numbers without needless decimals: 300000, 2.5, 0.25.
fn axis_number(y: &f64) -> String {
    if y.abs() >= 100.0 {
        format!("{y:.0}")
    } else {
        let s = format!("{y:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// `x` = -log10(1 - p): 0 → 0, 1 → 90, 2 → 99, 3 → 99.9 ...
fn percentile_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    let s = format!("{p:.5}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(percentile_label(0.0), "0");
        assert_eq!(percentile_label(2.0), "99");
        assert_eq!(percentile_label(3.0), "99.9");
    }
}
