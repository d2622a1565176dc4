//! The client-mode driver: turns parsed flags into one process's work (or
//! hands the run to [`crate::spawn`] when it needs more descriptors than one
//! process may hold), starts one worker thread per share, samples live
//! counters into the progress line and the timeline, and merges what the
//! workers measured.
//!
//! Invariants: every connection of a run has one global id (`first_id` +
//! slot); a worker's share of connections and of paced rates is
//! proportional (`share`), so the sums over workers and processes equal what
//! the user asked for; every worker stops by itself at `deadline` (plus a
//! bounded drain) or when [`crate::stop`] is requested.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cli::ClientArgs;
use crate::dial::Endpoints;
use crate::report;
use crate::spawn;
use crate::stats::{Measurement, Progress, Snapshot};

/// What one worker thread is asked to do.
#[derive(Debug)]
pub struct WorkerPlan {
    /// Connections (slots) this worker owns.
    pub conns: u64,
    /// Process-local number of this worker's first connection (endpoint pairing).
    pub local_first: u64,
    /// Global id of this worker's first connection (message ids).
    pub first_id: u64,
    /// This worker's fraction of the whole run's connections; paced rates
    /// (ramp, request rate) are scaled by it.
    pub share: f64,
    pub endpoints: Endpoints,
    pub start: Instant,
    pub deadline: Instant,
    pub connect_timeout: Duration,
}

/// One client mode (hold, rate, throughput, latency).
pub trait ClientMode: Sync {
    fn name(&self) -> &'static str;
    fn client(&self) -> &ClientArgs;
    /// Connections the whole run holds at once (decides the process split).
    fn conns(&self) -> u64;
    fn default_duration(&self) -> Duration {
        Duration::from_secs(10)
    }
    fn validate(&self) -> Result<()>;
    fn run_worker(&self, plan: &WorkerPlan, progress: &Progress) -> Result<Measurement>;
}

/// Descriptors a process keeps for itself (rings, pipes, std streams).
pub const FD_RESERVE: u64 = 200;

/// The run's settings after defaults are applied.
pub struct Settings {
    pub duration: Duration,
    pub sources: Vec<IpAddr>,
    pub fds_per_process: u64,
    pub processes: usize,
}

pub fn settings(mode: &dyn ClientMode, nofile: u64) -> Result<Settings> {
    mode.validate()?;
    let c = mode.client();
    let duration = c.duration.unwrap_or(mode.default_duration());
    let sources = match &c.sources {
        Some(s) => crate::sources::parse(s)?,
        None => Vec::new(),
    };
    if c.child.is_none() {
        crate::sources::check_usable(&sources, &c.targets)?;
    }
    let limit = nofile.saturating_sub(FD_RESERVE).max(1);
    let fds_per_process = match c.fds_per_process {
        Some(0) => bail!("--fds-per-process must be at least 1"),
        Some(n) if n > limit => bail!(
            "--fds-per-process {n} is more than this process may open (RLIMIT_NOFILE {nofile} minus a reserve of {FD_RESERVE}); use at most {limit}"
        ),
        Some(n) => n,
        None => limit,
    };
    if let Some(p) = &c.report {
        crate::chart::check_path(p)?;
    }
    let processes = spawn::processes_needed(mode.conns(), fds_per_process)?;
    Ok(Settings { duration, sources, fds_per_process, processes })
}

/// Run a client mode from the command line; returns the exit code.
pub fn main(mode: &dyn ClientMode, nofile: u64) -> Result<u8> {
    let s = settings(mode, nofile)?;
    let c = mode.client();
    if let Some((index, count)) = c.child {
        let (first, n) = spawn::share_of(mode.conns(), index, count);
        let sources = crate::sources::share(&s.sources, index, count);
        let m = run_local(mode, &s, first, n, sources, count, Display::ChildLines)?;
        spawn::emit_result(&m)?;
        return Ok(0);
    }
    report::warn_port_budget(mode, &s);
    let m = if s.processes > 1 {
        spawn::run_children(mode, &s)?
    } else {
        let display = if c.no_progress || !report::stderr_is_terminal() { Display::None } else { Display::Terminal };
        run_local(mode, &s, 0, mode.conns(), s.sources.clone(), 1, display)?
    };
    report::finish(mode, &s, &m)
}

/// How a process shows its live counters.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Display {
    None,
    /// One `\r`-rewritten line on stderr.
    Terminal,
    /// JSON progress lines on stdout for the parent process.
    ChildLines,
}

/// Timeline sampling interval for a run of `duration` (same in every
/// process of a run, so timelines merge index by index).
pub fn sample_interval(duration: Duration) -> Duration {
    Duration::from_secs_f64((duration.as_secs_f64() / 200.0).clamp(0.1, 1.0))
}

/// Run this process's share: `n` connections with global ids from `first`.
pub fn run_local(
    mode: &dyn ClientMode,
    s: &Settings,
    first: u64,
    n: u64,
    sources: Vec<IpAddr>,
    processes: usize,
    display: Display,
) -> Result<Measurement> {
    let c = mode.client();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = c.workers.unwrap_or((cpus / processes).max(1)).clamp(1, n.max(1) as usize);
    let total = mode.conns().max(1) as f64;
    let start = Instant::now();
    let deadline = start + s.duration;
    let endpoints = Endpoints::new(c.targets.clone(), sources);
    let progress = Arc::new(Progress::default());
    let plans: Vec<WorkerPlan> = (0..workers)
        .map(|w| {
            let (off, cnt) = spawn::share_of(n, w, workers);
            WorkerPlan {
                conns: cnt,
                local_first: off,
                first_id: first + off,
                share: cnt as f64 / total,
                endpoints: endpoints.clone(),
                start,
                deadline,
                connect_timeout: c.connect_timeout,
            }
        })
        .collect();
    let dt = sample_interval(s.duration);
    let mut timeline = Vec::new();
    let results: Vec<Result<Measurement>> = std::thread::scope(|scope| {
        let handles: Vec<_> = plans
            .iter()
            .enumerate()
            .map(|(w, plan)| {
                let progress = &progress;
                std::thread::Builder::new().name(format!("ringload-{}-{w}", mode.name())).spawn_scoped(
                    scope,
                    move || {
                        let r = mode.run_worker(plan, progress);
                        if r.is_err() {
                            crate::stop::request();
                        }
                        r
                    },
                )
            })
            .collect();
        let mut next_sample = Duration::ZERO;
        let mut last_print = Instant::now();
        let mut prev = progress.snapshot();
        loop {
            let all_done = handles.iter().all(|h| h.as_ref().map_or(true, |h| h.is_finished()));
            let elapsed = start.elapsed();
            let snap = progress.snapshot();
            while elapsed >= next_sample {
                timeline.push(snap.sample(timeline.len() as f64 * dt.as_secs_f64()));
                next_sample += dt;
            }
            if last_print.elapsed() >= Duration::from_millis(500) || all_done {
                let secs = last_print.elapsed().as_secs_f64();
                show(display, mode.name(), &snap, &prev, secs, elapsed);
                prev = snap;
                last_print = Instant::now();
            }
            if all_done {
                break;
            }
            std::thread::sleep(Duration::from_millis(50).min(dt));
        }
        if display == Display::Terminal {
            eprintln!();
        }
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a worker thread panicked"))),
                Err(e) => Err(anyhow::anyhow!("cannot start a worker thread: {e}")),
            })
            .collect()
    });
    let mut parts = Vec::new();
    for r in results {
        parts.push(r.context("worker failed")?);
    }
    let mut m = Measurement::merge_all(&parts);
    m.timeline = timeline;
    m.processes = 1;
    m.workers = workers as u32;
    m.interrupted = crate::stop::requested();
    Ok(m)
}

fn show(display: Display, mode: &str, snap: &Snapshot, prev: &Snapshot, secs: f64, elapsed: Duration) {
    match display {
        Display::None => {}
        Display::Terminal => report::progress_line(mode, snap, prev, secs, elapsed),
        Display::ChildLines => spawn::emit_progress(snap),
    }
}
