//! Human views of [`EngineStats`]: the per-core table (the view operators tune from), the
//! per-server and per-source tables, `show info`, and HAProxy-style CSV (`show stat`).
//!
//! Rates (`--watch`) are computed from two snapshots; a single snapshot shows totals and averages
//! since start.

use std::fmt::Write;

use super::{EngineStats, WorkerStats};

const MIB: f64 = 1024.0 * 1024.0;

/// `show info`: one `key: value` per line.
pub fn info(s: &EngineStats) -> String {
    let mut o = String::new();
    let kv = |o: &mut String, k: &str, v: String| {
        let _ = writeln!(o, "{k}: {v}");
    };
    kv(&mut o, "version", s.version.clone());
    kv(&mut o, "pid", s.pid.to_string());
    kv(&mut o, "uptime_s", s.uptime_s.to_string());
    kv(&mut o, "workers", s.workers.len().to_string());
    kv(&mut o, "maxconn", s.effective_maxconn.to_string());
    kv(&mut o, "maxconn_configured", s.configured_maxconn.map_or("unset".into(), |m| m.to_string()));
    kv(&mut o, "rlimit_nofile", s.nofile.to_string());
    kv(&mut o, "active", s.total(|w| w.active).to_string());
    kv(&mut o, "parked", s.total(|w| w.parked).to_string());
    kv(&mut o, "queued", s.total(|w| w.queued).to_string());
    kv(&mut o, "accepted", s.total(|w| w.accepted).to_string());
    kv(&mut o, "closed", s.total(|w| w.closed).to_string());
    kv(&mut o, "failed", s.total(|w| w.failed).to_string());
    kv(&mut o, "denied", s.total(|w| w.denied).to_string());
    kv(&mut o, "killed", s.total(|w| w.killed).to_string());
    kv(&mut o, "lifetime_ends", s.total(|w| w.lifetime_ends).to_string());
    kv(&mut o, "moved_in", s.total(|w| w.moved_in).to_string());
    kv(&mut o, "moved_out", s.total(|w| w.moved_out).to_string());
    kv(&mut o, "move_refused", s.total(|w| w.move_refused).to_string());
    kv(&mut o, "move_failed", s.total(|w| w.move_failed).to_string());
    kv(&mut o, "source_refused_maxconn", s.total(|w| w.source_refused.maxconn).to_string());
    kv(&mut o, "source_refused_rate", s.total(|w| w.source_refused.rate).to_string());
    kv(&mut o, "source_refused_table_full", s.total(|w| w.source_refused.table_full).to_string());
    kv(&mut o, "sources_tracked", s.total(|w| w.sources_tracked).to_string());
    kv(&mut o, "bytes_client_to_server", s.total(|w| w.bytes_client_to_server).to_string());
    kv(&mut o, "bytes_server_to_client", s.total(|w| w.bytes_server_to_client).to_string());
    o
}

/// Per-second rates between two snapshots of one worker.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rates {
    pub accepted: f64,
    pub bytes_in: f64,
    pub bytes_out: f64,
    pub busy: f64,
}

pub fn rates(prev: &WorkerStats, now: &WorkerStats) -> Rates {
    let dt = (now.uptime_ms.saturating_sub(prev.uptime_ms)) as f64 / 1000.0;
    if dt <= 0.0 {
        return Rates::default();
    }
    Rates {
        accepted: (now.accepted.saturating_sub(prev.accepted)) as f64 / dt,
        bytes_in: (now.bytes_client_to_server.saturating_sub(prev.bytes_client_to_server)) as f64 / dt,
        bytes_out: (now.bytes_server_to_client.saturating_sub(prev.bytes_server_to_client)) as f64 / dt,
        busy: (now.busy_ns.saturating_sub(prev.busy_ns)) as f64 / (dt * 1e9),
    }
}

/// The per-core table. With `prev` (an earlier snapshot), the rate columns are per second over the
/// interval; without, they are averages since start.
pub fn cores(s: &EngineStats, prev: Option<&EngineStats>) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:>4} {:>3} {:>8} {:>6} {:>6} {:>10} {:>10} {:>9} {:>8} {:>8} {:>9} {:>7} {:>6} {:>11} {:>10} {:>8} {:>8} {:>5} {:>8}",
        "core",
        "cpu",
        "active",
        "parked",
        "queued",
        "accepted",
        "closed",
        "accept/s",
        "MiB/s in",
        "MiB/s out",
        "conn_err",
        "tmouts",
        "resets",
        "share(lent)",
        "pipes u/p",
        "submits",
        "sq_full",
        "busy",
        "max turn"
    );
    let mut sum = WorkerStats::default();
    let mut sum_rates = Rates::default();
    for w in &s.workers {
        let r = match prev.and_then(|p| p.workers.iter().find(|x| x.worker == w.worker)) {
            Some(p) => rates(p, w),
            None => rates(&WorkerStats::default(), w),
        };
        row(&mut o, &w.worker.to_string(), w.cpu.map_or("-".into(), |c| c.to_string()), w, &r);
        add(&mut sum, w);
        sum_rates.accepted += r.accepted;
        sum_rates.bytes_in += r.bytes_in;
        sum_rates.bytes_out += r.bytes_out;
        sum_rates.busy += r.busy;
    }
    row(&mut o, "all", "".into(), &sum, &sum_rates);
    o
}

fn row(o: &mut String, core: &str, cpu: String, w: &WorkerStats, r: &Rates) {
    let t = &w.timeouts;
    let _ = writeln!(
        o,
        "{:>4} {:>3} {:>8} {:>6} {:>6} {:>10} {:>10} {:>9.0} {:>8.1} {:>9.1} {:>9} {:>7} {:>6} {:>11} {:>10} {:>8} {:>8} {:>4.0}% {:>6.1}ms",
        core,
        cpu,
        w.active,
        w.parked,
        w.queued,
        w.accepted,
        w.closed,
        r.accepted,
        r.bytes_in / MIB,
        r.bytes_out / MIB,
        w.connect_errors.total(),
        t.client + t.server + t.queue,
        w.resets_from_client + w.resets_from_server,
        format!("{}({})", w.global_share, w.share_lent),
        format!("{}/{}", w.pipes_in_use, w.pipes_pooled),
        w.ring.submitted,
        w.ring.sq_full,
        r.busy * 100.0,
        w.longest_turn_us as f64 / 1000.0
    );
}

fn add(sum: &mut WorkerStats, w: &WorkerStats) {
    sum.active += w.active;
    sum.parked += w.parked;
    sum.queued += w.queued;
    sum.accepted += w.accepted;
    sum.closed += w.closed;
    sum.connect_errors.add(&w.connect_errors);
    sum.timeouts.add(&w.timeouts);
    sum.resets_from_client += w.resets_from_client;
    sum.resets_from_server += w.resets_from_server;
    sum.global_share += w.global_share;
    sum.share_lent += w.share_lent;
    sum.pipes_in_use += w.pipes_in_use;
    sum.pipes_pooled += w.pipes_pooled;
    sum.splice_fds += w.splice_fds;
    sum.ring.submitted += w.ring.submitted;
    sum.ring.sq_full += w.ring.sq_full;
    sum.longest_turn_us = sum.longest_turn_us.max(w.longest_turn_us);
}

/// Per-frontend table (summed over workers). With `prev` (an earlier snapshot), the rate columns
/// are per second over the interval; without, they are averages since start.
pub fn frontends(s: &EngineStats, prev: Option<&EngineStats>) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<20} {:>8} {:>6} {:>10} {:>10} {:>9} {:>8} {:>9} {:>12} {:>12} {:>8} {:>8} {:>8} {:>14}",
        "frontend",
        "active",
        "parked",
        "accepted",
        "closed",
        "accept/s",
        "MiB/s in",
        "MiB/s out",
        "MiB in",
        "MiB out",
        "refused",
        "waits",
        "maxconn",
        "rate_limit"
    );
    // (Seconds between the snapshots, or since start, as the per-core table's rates.)
    let ms = |e: &EngineStats| e.workers.first().map_or(0, |w| w.uptime_ms);
    let dt = (ms(s).saturating_sub(prev.map_or(0, ms))) as f64 / 1000.0;
    for (i, f) in s.frontends.iter().enumerate() {
        let before = prev.and_then(|p| p.frontends.get(i)).filter(|p| p.frontend == f.frontend);
        let rate = |now: u64, then: fn(&super::FrontendStats) -> u64| match dt > 0.0 {
            true => now.saturating_sub(before.map_or(0, then)) as f64 / dt,
            false => 0.0,
        };
        let hits = &f.limit_hits;
        let _ = writeln!(
            o,
            "{:<20} {:>8} {:>6} {:>10} {:>10} {:>9.0} {:>8.1} {:>9.1} {:>12.1} {:>12.1} {:>8} {:>8} {:>8} {:>14}",
            f.frontend,
            f.active,
            f.parked,
            f.accepted,
            f.closed,
            rate(f.accepted, |p| p.accepted),
            rate(f.bytes_in, |p| p.bytes_in) / MIB,
            rate(f.bytes_out, |p| p.bytes_out) / MIB,
            f.bytes_in as f64 / MIB,
            f.bytes_out as f64 / MIB,
            f.refused(),
            hits.global + hits.frontend + hits.rate,
            if f.maxconn == 0 { "-".into() } else { f.maxconn.to_string() },
            if f.rate_limit == 0 { "-".into() } else { format!("{}/s", f.rate_limit) },
        );
    }
    o
}

/// Per-server table (summed over workers), with connect latency.
pub fn servers(s: &EngineStats) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<24} {:<22} {:<8} {:>6} {:>8} {:>10} {:>8} {:>8} {:>10} {:>10} {:>10}",
        "backend/server",
        "address",
        "state",
        "weight",
        "active",
        "total",
        "errors",
        "maxconn",
        "conn p50",
        "conn p99",
        "conn max"
    );
    for v in &s.servers {
        let l = &v.connect_latency_us;
        let _ = writeln!(
            o,
            "{:<24} {:<22} {:<8} {:>6} {:>8} {:>10} {:>8} {:>8} {:>8}us {:>8}us {:>8}us",
            format!("{}/{}", v.backend, v.server),
            v.address,
            // A server ramping up after `slowstart` says how far it has got.
            match v.status() {
                "UP" if v.ramp_pct < 100 => format!("UP {}%", v.ramp_pct),
                s => s.to_string(),
            },
            v.weight,
            v.active,
            v.total,
            v.connect_errors,
            if v.maxconn == 0 { "-".into() } else { v.maxconn.to_string() },
            l.p50,
            l.p99,
            l.max
        );
    }
    for h in &s.health {
        let _ = writeln!(
            o,
            "check {:<18} {:<4} {} checks, {} failed, {} state changes{}",
            format!("{}/{}", h.backend, h.server),
            if h.up { "UP" } else { "DOWN" },
            h.checks,
            h.failures,
            h.changes,
            h.last_error.as_ref().map_or(String::new(), |e| format!(", last error: {e}"))
        );
    }
    for b in &s.backends {
        let _ = writeln!(
            o,
            "{:<24} {:<22} {:<5} {:>8} {:>10} {:>8} {:>8} queued {} splice {}",
            format!("{}/BACKEND", b.backend),
            b.balance,
            "UP",
            b.active,
            b.total,
            b.connect_errors,
            if b.maxconn == 0 { "-".into() } else { b.maxconn.to_string() },
            b.queued,
            b.splice
        );
    }
    o
}

/// Per-worker source-IP table: ports in use and left, per server.
pub fn sources(s: &EngineStats) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:>4} {:<24} {:<16} {:>8} {:>9} {:>6}",
        "core", "backend/server", "source", "in use", "capacity", "free"
    );
    for w in &s.workers {
        for src in &w.sources {
            let free = 100.0 * (src.capacity.saturating_sub(src.active)) as f64 / src.capacity.max(1) as f64;
            let _ = writeln!(
                o,
                "{:>4} {:<24} {:<16} {:>8} {:>9} {:>5.1}%",
                w.worker,
                format!("{}/{}", src.backend, src.server),
                src.ip,
                src.active,
                src.capacity,
                free
            );
        }
    }
    o
}

/// The whole dump: info line, per-core table, per-server table, sources (when any).
pub fn dump(s: &EngineStats, prev: Option<&EngineStats>) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "ringproxy {} pid {} up {}s: {} workers, maxconn {}{}, {} active, {} parked, {} queued",
        s.version,
        s.pid,
        s.uptime_s,
        s.workers.len(),
        s.effective_maxconn,
        s.configured_maxconn
            .filter(|m| *m != s.effective_maxconn)
            .map_or(String::new(), |m| format!(" (configured {m})")),
        s.total(|w| w.active),
        s.total(|w| w.parked),
        s.total(|w| w.queued),
    );
    o.push_str(&cores(s, prev));
    o.push('\n');
    o.push_str(&frontends(s, prev));
    o.push('\n');
    o.push_str(&servers(s));
    if s.workers.iter().any(|w| !w.sources.is_empty()) {
        o.push('\n');
        o.push_str(&sources(s));
    }
    o
}

/// `show stat`: CSV with HAProxy's first columns (same names and order), one FRONTEND row per
/// frontend, one row per server and a BACKEND row per backend; columns ringproxy does not track are
/// left empty, as HAProxy does. A frontend's `dreq` counts the connections its access list and
/// per-source limits refused, its `ereq` the PROXY headers refused; its status is OPEN, or STOP
/// once no worker listens (a drain), as in HAProxy.
pub fn csv(s: &EngineStats) -> String {
    let mut o = String::from(
        "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight,\n",
    );
    let limit = |m: u64| if m == 0 { String::new() } else { m.to_string() };
    let listening = s.workers.iter().any(|w| w.listening > 0);
    for f in &s.frontends {
        let _ = writeln!(
            o,
            "{},FRONTEND,,,{},,{},{},{},{},{},,{},,,,,{},,",
            f.frontend,
            f.active,
            limit(f.maxconn),
            f.accepted,
            f.bytes_in,
            f.bytes_out,
            f.refused(),
            f.proxy_header_errors,
            if listening { "OPEN" } else { "STOP" },
        );
    }
    for v in &s.servers {
        let _ = writeln!(
            o,
            "{},{},,,{},,{},{},{},{},,,,{},,,,{},{},",
            v.backend,
            v.server,
            v.active,
            limit(v.maxconn),
            v.total,
            v.bytes_in,
            v.bytes_out,
            v.connect_errors,
            v.status(),
            v.weight
        );
    }
    for b in &s.backends {
        let _ = writeln!(
            o,
            "{},BACKEND,{},,{},,{},{},{},{},,,,{},,,,UP,,",
            b.backend,
            b.queued,
            b.active,
            limit(b.maxconn),
            b.total,
            b.bytes_in,
            b.bytes_out,
            b.connect_errors
        );
    }
    o
}
