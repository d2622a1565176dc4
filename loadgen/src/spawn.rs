//! The multi-process split: when a run needs more connections than one
//! process may hold (`--fds-per-process`, default RLIMIT_NOFILE minus a
//! reserve), the parent re-executes itself (`current_exe`) once per share
//! with the hidden `--child I/K` flag and the same arguments, reads each
//! child's stdout, and merges their results into one report.
//!
//! Child protocol (stdout, one JSON object per line): `{"progress": Snapshot}`
//! about twice a second, then exactly one `{"result": Measurement}`. Anything
//! else a child has to say goes to stderr, which is passed through.
//!
//! Invariants: shares are contiguous, disjoint and sum to the total
//! ([`share_of`]); children die with their parent (`PR_SET_PDEATHSIG`); a
//! parent that is asked to stop forwards SIGTERM to its children and still
//! merges what they report; a child that never reports is killed after the
//! run's duration plus a grace period, and the run fails with a message
//! naming it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::report;
use crate::run::{ClientMode, Settings};
use crate::stats::{Measurement, Snapshot};

/// Most worker processes one run may start.
pub const MAX_PROCESSES: u64 = 512;

/// Extra time past `--duration` a child may take before it is killed.
const GRACE: Duration = Duration::from_secs(30);

/// And per connection of the whole run: at the end every connection is shut down at once, and
/// through a proxy on a small host a million of them take about a minute of CPU to close.
const GRACE_PER_CONN: Duration = Duration::from_micros(60);

/// The time past `--duration` the children of a run of `conns` connections may take.
fn grace(conns: u64) -> Duration {
    GRACE + GRACE_PER_CONN.saturating_mul(u32::try_from(conns).unwrap_or(u32::MAX))
}

/// Processes needed so that none holds more than `fds_per_process` connections.
pub fn processes_needed(conns: u64, fds_per_process: u64) -> Result<usize> {
    let k = conns.div_ceil(fds_per_process.max(1)).max(1);
    if k > MAX_PROCESSES {
        bail!(
            "{conns} connections at {fds_per_process} per process would need {k} processes (more than {MAX_PROCESSES}); raise --fds-per-process or lower the count"
        );
    }
    Ok(k as usize)
}

/// `(first, count)` of part `index` when `total` is dealt into `parts` contiguous shares.
pub fn share_of(total: u64, index: usize, parts: usize) -> (u64, u64) {
    let parts = parts.max(1) as u64;
    let i = index as u64;
    let base = total / parts;
    let extra = total % parts;
    let count = base + u64::from(i < extra);
    let first = i * base + i.min(extra);
    (first, count)
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ChildLine {
    Progress(Snapshot),
    Result(Box<Measurement>),
}

fn emit(line: &ChildLine) -> Result<()> {
    let s = serde_json::to_string(line).context("encoding a child report line")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{s}").and_then(|_| out.flush()).context("writing to the parent process (did it exit?)")
}

/// Child: send a progress line to the parent (errors ignored: the parent may be gone).
pub fn emit_progress(s: &Snapshot) {
    let _ = emit(&ChildLine::Progress(*s));
}

/// Child: send the final result to the parent.
pub fn emit_result(m: &Measurement) -> Result<()> {
    emit(&ChildLine::Result(Box::new(m.clone())))
}

struct ChildState {
    progress: Snapshot,
    result: Option<Measurement>,
    bad_line: Option<String>,
}

/// Parent: start `s.processes` children, show merged progress, merge results.
pub fn run_children(mode: &dyn ClientMode, s: &Settings) -> Result<Measurement> {
    let exe = std::env::current_exe().context("finding ringload's own executable to start worker processes")?;
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let k = s.processes;
    let parent = std::process::id() as i32;
    let states: Arc<Mutex<Vec<ChildState>>> = Arc::new(Mutex::new(
        (0..k).map(|_| ChildState { progress: Snapshot::default(), result: None, bad_line: None }).collect(),
    ));
    let mut children: Vec<Child> = Vec::with_capacity(k);
    let mut readers = Vec::with_capacity(k);
    for i in 0..k {
        let mut cmd = Command::new(&exe);
        cmd.args(&args)
            .arg("--child")
            .arg(format!("{i}/{k}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: the pre-exec hook only calls async-signal-safe functions
        // (prctl, getppid, _exit).
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                kill_all(&mut children, libc::SIGKILL);
                return Err(e).with_context(|| format!("starting worker process {i} of {k} ({})", exe.display()));
            }
        };
        let Some(stdout) = child.stdout.take() else {
            kill_all(&mut children, libc::SIGKILL);
            bail!("worker process {i} has no stdout pipe");
        };
        children.push(child);
        let states = Arc::clone(&states);
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let parsed = serde_json::from_str::<ChildLine>(&line);
                let Ok(mut st) = states.lock() else { break };
                match parsed {
                    Ok(ChildLine::Progress(p)) => st[i].progress = p,
                    Ok(ChildLine::Result(m)) => st[i].result = Some(*m),
                    Err(_) => st[i].bad_line = Some(line.chars().take(200).collect()),
                }
            }
        }));
    }
    let show = !mode.client().no_progress && report::stderr_is_terminal();
    let start = Instant::now();
    let grace = grace(mode.conns());
    let kill_at = start + s.duration + grace + mode.client().connect_timeout;
    let mut forwarded = false;
    let mut killed = false;
    let mut prev = Snapshot::default();
    let mut last_print = Instant::now();
    while !readers.iter().all(|r| r.is_finished()) {
        std::thread::sleep(Duration::from_millis(100));
        if crate::stop::requested() && !forwarded {
            kill_all(&mut children, libc::SIGTERM);
            forwarded = true;
        }
        if Instant::now() > kill_at && !killed {
            eprintln!(
                "ringload: worker processes did not finish {}s after the run should have ended; killing them",
                grace.as_secs()
            );
            kill_all(&mut children, libc::SIGKILL);
            killed = true;
        }
        if show && last_print.elapsed() >= Duration::from_millis(500) {
            let snap = states.lock().map(|st| Snapshot::sum(st.iter().map(|c| &c.progress))).unwrap_or_default();
            report::progress_line(mode.name(), &snap, &prev, last_print.elapsed().as_secs_f64(), start.elapsed());
            prev = snap;
            last_print = Instant::now();
        }
    }
    if show {
        eprintln!();
    }
    for r in readers {
        let _ = r.join();
    }
    let mut statuses = Vec::with_capacity(k);
    for c in &mut children {
        statuses.push(c.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()));
    }
    let states = match Arc::try_unwrap(states) {
        Ok(m) => m.into_inner().unwrap_or_default(),
        Err(_) => bail!("internal error: child readers still running"),
    };
    let mut parts = Vec::with_capacity(k);
    for (i, st) in states.into_iter().enumerate() {
        match st.result {
            Some(m) => parts.push(m),
            None => {
                let extra = st.bad_line.map(|l| format!("; unexpected output: {l:?}")).unwrap_or_default();
                bail!(
                    "worker process {i} of {k} ended without a result ({}){extra}; its error, if any, is printed above",
                    statuses[i]
                );
            }
        }
    }
    let mut m = Measurement::merge_all(&parts);
    m.interrupted |= crate::stop::requested();
    Ok(m)
}

fn kill_all(children: &mut [Child], sig: i32) {
    for c in children.iter() {
        // SAFETY: signalling our own child by pid; it has not been reaped
        // yet (we only wait() after this), so the pid is still ours.
        unsafe { libc::kill(c.id() as i32, sig) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_total_exactly() {
        for (total, parts) in [(1000u64, 4usize), (7, 3), (3, 5), (300_000, 16)] {
            let mut next = 0;
            for i in 0..parts {
                let (first, n) = share_of(total, i, parts);
                assert_eq!(first, next);
                next += n;
            }
            assert_eq!(next, total);
        }
    }

    #[test]
    fn grace_grows_with_the_connections_to_close() {
        assert_eq!(grace(0), GRACE);
        assert_eq!(grace(1_000_000), GRACE + Duration::from_secs(60));
        assert_eq!(grace(u64::MAX), GRACE + GRACE_PER_CONN.saturating_mul(u32::MAX));
    }

    #[test]
    fn split_counts() {
        assert_eq!(processes_needed(1000, 300).unwrap(), 4);
        assert_eq!(processes_needed(300_000, 19_800).unwrap(), 16);
        assert_eq!(processes_needed(10, 20_000).unwrap(), 1);
        assert!(processes_needed(10_000_000, 1).is_err());
    }

    #[test]
    fn child_lines_roundtrip() {
        let m = Measurement { established: 5, ..Default::default() };
        let s = serde_json::to_string(&ChildLine::Result(Box::new(m))).unwrap();
        assert!(s.starts_with("{\"result\":"));
        match serde_json::from_str::<ChildLine>(&s).unwrap() {
            ChildLine::Result(m) => assert_eq!(m.established, 5),
            ChildLine::Progress(_) => panic!("wrong variant"),
        }
    }
}
