//! What a run shows: the live progress line, the final table, the `--json`
//! object (schema `ringload.v1`, documented in loadgen/README.md) and the
//! exit code; `--report FILE.svg|.html` is drawn by [`crate::chart`].
//!
//! Invariants: the JSON object always has every key of the schema (null
//! where a figure does not apply to the mode), so scripts never need to
//! check for presence; adding keys is allowed, renaming or removing them
//! needs a new schema version. Exit code: 1 if any message was lost or
//! corrupted (or, in hold, a heartbeat came late after the warm-up), else 3
//! if any connection failed or dropped (or hold could not open them all),
//! else 130 if interrupted, else 0.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::run::{ClientMode, Settings};
use crate::stats::{Causes, Hist, Measurement, Sample, Snapshot};

pub const SCHEMA: &str = "ringload.v1";

pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    if secs <= 0.0 { 0.0 } else { bytes as f64 * 8.0 / secs / 1e9 }
}

/// Rewrite the one-line live display on stderr.
pub fn progress_line(mode: &str, s: &Snapshot, prev: &Snapshot, secs: f64, elapsed: Duration) {
    let secs = secs.max(1e-3);
    let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
    let detail = match mode {
        "hold" => format!(
            "open {:>7}  est {:>7}  +{:>7.0}/s  hb ok {}  late {}",
            s.open,
            s.established,
            per(s.established, prev.established),
            s.completed,
            s.late
        ),
        "throughput" => format!(
            "streams {}  up {:.2} Gbit/s  down {:.2} Gbit/s",
            s.open,
            gbps(s.up_bytes.saturating_sub(prev.up_bytes), secs),
            gbps(s.down_bytes.saturating_sub(prev.down_bytes), secs)
        ),
        "rate" => {
            format!("conns/s {:>8.0}  done {:>9}  open {}", per(s.completed, prev.completed), s.completed, s.open)
        }
        _ => format!("req/s {:>8.0}  done {:>9}  open {}", per(s.completed, prev.completed), s.completed, s.open),
    };
    let mut e = std::io::stderr().lock();
    let _ = write!(
        e,
        "\r\x1b[2K[{:>6.1}s] {mode} {detail}  errors {}  lost {}  corrupt {}",
        elapsed.as_secs_f64(),
        s.failed,
        s.lost,
        s.corrupted
    );
    let _ = e.flush();
}

/// Warn up front when the connections per (source, target) pair exceed the
/// kernel's ephemeral port range (they would fail as port exhaustion).
pub fn warn_port_budget(mode: &dyn ClientMode, s: &Settings) {
    let Some(range) = crate::sources::local_port_range_size() else {
        return;
    };
    let pairs = (s.sources.len().max(1) * mode.client().targets.len().max(1)) as u64;
    let per_pair = mode.conns().div_ceil(pairs);
    let what = if per_pair > range {
        "more than the local ports available (ip_local_port_range); expect port exhaustion"
    } else if per_pair > range / 2 {
        "more than half the local ports (ip_local_port_range); connects slow down as the kernel searches for free ports"
    } else {
        return;
    };
    eprintln!(
        "ringload: warning: {} connections over {} source x {} target pairs is {per_pair} per pair, {what} ({range} ports). Add source addresses with --sources (on loopback e.g. --sources 127.0.1.0/24).",
        mode.conns(),
        s.sources.len().max(1),
        mode.client().targets.len()
    );
}

/// Latency percentiles in microseconds.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub p9999: u64,
    pub max: u64,
}

pub fn percentiles(h: &Hist) -> Option<Percentiles> {
    if h.is_empty() {
        return None;
    }
    let q = |p: f64| h.0.value_at_percentile(p);
    Some(Percentiles {
        count: h.len(),
        min: h.0.min(),
        mean: (h.0.mean() * 10.0).round() / 10.0,
        p50: q(50.0),
        p90: q(90.0),
        p99: q(99.0),
        p999: q(99.9),
        p9999: q(99.99),
        max: h.0.max(),
    })
}

#[derive(Serialize, Debug)]
pub struct Connections {
    pub planned: u64,
    pub attempted: u64,
    pub established: u64,
    pub failed: u64,
    pub failed_by_cause: Causes,
    pub dropped: u64,
    pub dropped_by_cause: Causes,
    pub peak_open: u64,
    pub ramp_time_s: Option<f64>,
    /// hold --reconnect: connections dialed again after one ended, and established.
    pub reconnects: u64,
    /// hold: connections open at the end of the run.
    pub open_at_end: u64,
}

#[derive(Serialize, Debug)]
pub struct Messages {
    pub sent: u64,
    pub echoed_ok: u64,
    pub lost: u64,
    /// hold: echoes that came after the next heartbeat was due (sent at or after
    /// `--latency-after`; before it: `late_in_warmup`).
    pub late: u64,
    pub late_in_warmup: u64,
    pub corrupted: u64,
}

#[derive(Serialize, Debug)]
pub struct Throughput {
    pub up_bytes: u64,
    pub down_bytes: u64,
    pub up_gbps: f64,
    pub down_gbps: f64,
}

/// The `--json` object.
#[derive(Serialize, Debug)]
pub struct Report {
    pub schema: &'static str,
    pub mode: String,
    pub command: String,
    pub targets: Vec<String>,
    pub sources: usize,
    pub processes: u32,
    pub workers: u32,
    pub duration_s: f64,
    pub elapsed_s: f64,
    pub interrupted: bool,
    pub connections: Connections,
    pub messages: Messages,
    pub connections_per_s: Option<f64>,
    pub requests_per_s: Option<f64>,
    pub throughput: Option<Throughput>,
    pub latency_us: Option<Percentiles>,
    pub latency_uncorrected_us: Option<Percentiles>,
    pub connect_latency_us: Option<Percentiles>,
    pub timeline: Vec<Sample>,
    pub exit_code: u8,
    pub verdict: String,
}

pub fn exit_code(mode: &str, m: &Measurement) -> (u8, String) {
    if m.lost > 0 || m.corrupted > 0 {
        return (1, format!("integrity: {} lost, {} corrupted messages", m.lost, m.corrupted));
    }
    if m.late > 0 {
        return (1, format!("late: {} heartbeats echoed after the next was due", m.late));
    }
    if m.reconnecting {
        // Clients that dial again: ends and failed dials are part of the run; what counts is that
        // every planned connection is open at the end.
        if m.open_at_end < m.planned {
            return (
                3,
                format!(
                    "{} of {} planned connections open at the end ({} reconnects, {} failed dials, {} dropped)",
                    m.open_at_end,
                    m.planned,
                    m.reconnects,
                    m.failed.total(),
                    m.dropped.total()
                ),
            );
        }
        return if m.interrupted { (130, "interrupted".into()) } else { (0, "ok".into()) };
    }
    let not_opened = if mode == "hold" { m.planned.saturating_sub(m.established) } else { 0 };
    if m.failed.total() > 0 || m.dropped.total() > 0 || not_opened > 0 {
        return (
            3,
            format!(
                "connection errors: {} failed, {} dropped, {} of {} planned not established",
                m.failed.total(),
                m.dropped.total(),
                not_opened,
                m.planned
            ),
        );
    }
    if m.interrupted {
        return (130, "interrupted".into());
    }
    (0, "ok".into())
}

pub fn build(mode: &dyn ClientMode, s: &Settings, m: &Measurement) -> Report {
    let name = mode.name();
    let (code, verdict) = exit_code(name, m);
    let w = m.window_s.max(1e-9);
    let c = mode.client();
    Report {
        schema: SCHEMA,
        mode: name.into(),
        command: std::env::args_os().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" "),
        targets: c.targets.iter().map(|t| t.to_string()).collect(),
        sources: s.sources.len(),
        processes: m.processes,
        workers: m.workers,
        duration_s: s.duration.as_secs_f64(),
        elapsed_s: m.window_s,
        interrupted: m.interrupted,
        connections: Connections {
            planned: m.planned,
            attempted: m.attempted,
            established: m.established,
            failed: m.failed.total(),
            failed_by_cause: m.failed,
            dropped: m.dropped.total(),
            dropped_by_cause: m.dropped,
            peak_open: m.peak_open,
            ramp_time_s: m.ramp_time_s,
            reconnects: m.reconnects,
            open_at_end: m.open_at_end,
        },
        messages: Messages {
            sent: m.msgs_sent,
            echoed_ok: m.msgs_ok,
            lost: m.lost,
            late: m.late,
            late_in_warmup: m.late_in_warmup,
            corrupted: m.corrupted,
        },
        connections_per_s: (name == "rate").then(|| m.completed as f64 / w),
        requests_per_s: (name == "latency").then(|| m.completed as f64 / w),
        throughput: (name == "throughput").then(|| Throughput {
            up_bytes: m.up_bytes,
            down_bytes: m.down_bytes,
            up_gbps: gbps(m.up_bytes, w),
            down_gbps: gbps(m.down_bytes, w),
        }),
        latency_us: percentiles(&m.latency),
        latency_uncorrected_us: percentiles(&m.latency_uncorrected),
        connect_latency_us: percentiles(&m.connect_latency),
        timeline: m.timeline.clone(),
        exit_code: code,
        verdict,
    }
}

/// Print the final report (table or JSON), write `--report`, return the exit code.
pub fn finish(mode: &dyn ClientMode, s: &Settings, m: &Measurement) -> Result<u8> {
    let r = build(mode, s, m);
    let c = mode.client();
    if let Some(path) = &c.report {
        crate::chart::write(path, &r, m).with_context(|| format!("writing the report {}", path.display()))?;
    }
    if c.json {
        let j = serde_json::to_string(&r).context("encoding the JSON report")?;
        println!("{j}");
    } else {
        print!("{}", table(&r));
        if let Some(path) = &c.report {
            println!("report written to {}", path.display());
        }
    }
    Ok(r.exit_code)
}

fn fmt_us(us: u64) -> String {
    if us >= 1_000_000 {
        format!("{:.2}s", us as f64 / 1e6)
    } else if us >= 1000 {
        format!("{:.2}ms", us as f64 / 1e3)
    } else {
        format!("{us}us")
    }
}

fn causes_line(c: &Causes) -> String {
    format!(
        "refused {}, timeout {}, reset {}, port exhaustion {}, peer closed {}, other {}",
        c.refused, c.timeout, c.reset, c.port_exhaustion, c.peer_closed, c.other
    )
}

/// The human-readable table.
pub fn table(r: &Report) -> String {
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |k: &str, v: String| rows.push((k.to_string(), v));
    row("mode", r.mode.clone());
    row("targets", r.targets.join(", "));
    row("processes", format!("{} ({} worker threads in all)", r.processes, r.workers));
    row("sources", if r.sources == 0 { "kernel default".into() } else { r.sources.to_string() });
    row("duration", format!("{:.1}s requested, {:.2}s measured", r.duration_s, r.elapsed_s));
    let c = &r.connections;
    row(
        "connections",
        format!(
            "{} established of {} attempted ({} planned), peak open {}",
            c.established, c.attempted, c.planned, c.peak_open
        ),
    );
    if let Some(t) = c.ramp_time_s {
        row("ramp time", format!("{t:.2}s"));
    }
    row("failed", format!("{} ({})", c.failed, causes_line(&c.failed_by_cause)));
    row("dropped", format!("{} ({})", c.dropped, causes_line(&c.dropped_by_cause)));
    if c.reconnects > 0 || c.open_at_end > 0 {
        row("open at the end", format!("{} ({} reconnects)", c.open_at_end, c.reconnects));
    }
    let m = &r.messages;
    if m.sent > 0 {
        row(
            "messages",
            format!("{} sent, {} echoed ok, {} LOST, {} CORRUPTED", m.sent, m.echoed_ok, m.lost, m.corrupted),
        );
        if r.mode == "hold" {
            row("late echoes", format!("{} ({} more in the warm-up, --latency-after)", m.late, m.late_in_warmup));
        }
    }
    if let Some(v) = r.connections_per_s {
        row("connections/s", format!("{v:.0}"));
    }
    if let Some(v) = r.requests_per_s {
        row("requests/s", format!("{v:.0}"));
    }
    if let Some(t) = &r.throughput {
        row("throughput up", format!("{:.3} Gbit/s ({} bytes)", t.up_gbps, t.up_bytes));
        row("throughput down", format!("{:.3} Gbit/s ({} bytes)", t.down_gbps, t.down_bytes));
    }
    let lat_name = match r.mode.as_str() {
        "hold" => "heartbeat RTT",
        "rate" => "connect+echo",
        "latency" => "latency (CO-corrected)",
        _ => "latency",
    };
    for (name, p) in [
        (lat_name, &r.latency_us),
        ("latency (uncorrected)", &r.latency_uncorrected_us),
        ("connect time", &r.connect_latency_us),
    ] {
        if let Some(p) = p {
            row(
                name,
                format!(
                    "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n={})",
                    fmt_us(p.p50),
                    fmt_us(p.p90),
                    fmt_us(p.p99),
                    fmt_us(p.p999),
                    fmt_us(p.max),
                    p.count
                ),
            );
        }
    }
    row("result", format!("{} (exit {})", r.verdict, r.exit_code));
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter().map(|(k, v)| format!("{k:<w$}  {v}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        let mut m = Measurement { planned: 10, established: 10, ..Default::default() };
        assert_eq!(exit_code("hold", &m).0, 0);
        m.established = 9;
        assert_eq!(exit_code("hold", &m).0, 3);
        m.corrupted = 1;
        assert_eq!(exit_code("hold", &m).0, 1);
    }

    #[test]
    fn percentiles_of_empty_is_none() {
        assert!(percentiles(&Hist::new()).is_none());
        let mut h = Hist::new();
        h.record_us(100);
        let p = percentiles(&h).unwrap();
        assert_eq!(p.count, 1);
        assert_eq!(p.p50, 100);
    }
}
