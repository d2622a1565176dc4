//! Health checks: one thread for the whole engine checks every server whose backend has a `check`
//! section, and tells every worker when a server goes DOWN or comes back UP.
//!
//! A check is a TCP connect (from the server's first source address, so it tests the path real
//! connections take), optionally followed by sending `send` and waiting for `expect` in the answer,
//! all within `timeout`. `fall` consecutive failures take an UP server DOWN; `rise` consecutive
//! successes bring it back. Servers start UP. Checks run on non-blocking sockets multiplexed with
//! poll(2), so one thread checks hundreds of servers without blocking on any; workers learn of state
//! changes over their control channels and never wait for a check.
//!
//! The thread runs under the engine's [`Watch`]: should it ever fail, the engine says so and stops.
//! Its time arithmetic saturates, so no configured interval or timeout can make it panic (a value
//! beyond a century means "not within a century").

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use socket2::{Domain, Socket, Type};

use crate::config::{Config, HealthCheck};
use crate::control::{Control, Peer};
use crate::watch::Watch;

/// The furthest ahead a deadline is put: later than any run, and far from overflowing the clock.
const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `t + d`, saturating at a century ahead (a configured `18446744073709551615s` means "never").
fn after(t: Instant, d: Duration) -> Instant {
    // The monotonic clock counts seconds since boot in an i64: a century cannot overflow it.
    t.checked_add(d.min(CENTURY)).unwrap_or(t)
}

/// What the checker knows about one server (shown by `ringproxy stats`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerHealth {
    pub backend: String,
    pub server: String,
    pub up: bool,
    pub checks: u64,
    pub failures: u64,
    /// UP→DOWN and DOWN→UP changes since start.
    pub changes: u64,
    pub last_error: Option<String>,
    /// Seconds since start at the last change.
    pub last_change_s: Option<u64>,
}

/// Why one check failed (shown as the server's `last_error`).
#[derive(Debug, thiserror::Error)]
enum CheckFailure {
    /// Creating, connecting, writing to or reading from the check's socket.
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("bind {src}: {source}")]
    Bind { src: IpAddr, source: io::Error },
    #[error("closed before sending the expected answer")]
    Closed,
    #[error("expected answer not in the first 4096 bytes")]
    NotFound,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// The running checker; stops when dropped.
pub struct HealthChecker {
    pub status: Arc<Mutex<Vec<ServerHealth>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Servers added or deleted at run time (`add server`, `del server`): taken at the thread's
    /// next turn, which `bell` starts at once.
    changes: crossbeam_channel::Sender<Change>,
    /// Wakes the thread from its poll (a change, or the stop).
    bell: Arc<crate::sys::EventFd>,
}

/// A change to the set of checked servers.
pub enum Change {
    /// Check server `server` of backend `backend` (of `config`, the running configuration), from now.
    Add { backend: usize, server: usize, config: Arc<Config> },
    /// Stop checking it; `done` hears once the checker has (from then on it says nothing of the
    /// server to the workers: its index can be given to another server). At once: the change
    /// rings the checker's doorbell.
    Remove { backend: usize, server: usize, done: crossbeam_channel::Sender<()> },
}

impl HealthChecker {
    /// Hands the checker a change (a checker that has stopped drops it).
    pub fn change(&self, c: Change) {
        let _ = self.changes.send(c);
        self.bell.signal();
    }
}

enum Phase {
    Connecting,
    Sending(usize),
    Expecting(Vec<u8>),
}

struct InFlight {
    sock: Socket,
    deadline: Instant,
    phase: Phase,
}

struct Target {
    backend: usize,
    server: usize,
    row: usize,
    addr: SocketAddr,
    source: Option<IpAddr>,
    check: HealthCheck,
    up: bool,
    ok_run: u32,
    fail_run: u32,
    next_due: Instant,
    inflight: Option<InFlight>,
}

/// Starts checking every server that asks for it, on a thread watched by `watch`; `None` when no
/// backend has a check. A backend with a check but no checked server yet (each opted out with
/// `check: false`) still gets the thread: a server `add server` puts there is checked.
pub fn spawn(config: &Config, peers: Arc<Vec<Peer>>, watch: &Watch) -> io::Result<Option<HealthChecker>> {
    let mut targets = Vec::new();
    let mut rows = Vec::new();
    let now = Instant::now();
    for (b, be) in config.backends.iter().enumerate() {
        let Some(check) = &be.check else { continue };
        for (s, _) in be.servers.iter().enumerate().filter(|(_, s)| s.check) {
            // Spread the first checks over one interval so they do not all start at once.
            let offset = check.interval.mul_f64((targets.len() % 16) as f64 / 16.0);
            let (t, row) = target(config, b, s, check, rows.len(), after(now, offset));
            targets.push(t);
            rows.push(row);
        }
    }
    if !config.backends.iter().any(|b| b.check.is_some()) {
        return Ok(None);
    }
    let status = Arc::new(Mutex::new(rows));
    let stop = Arc::new(AtomicBool::new(false));
    let (changes, changes_rx) = crossbeam_channel::unbounded();
    let bell = Arc::new(crate::sys::EventFd::new()?);
    let (st, flag, rung) = (status.clone(), stop.clone(), bell.clone());
    let thread = watch.spawn("ringproxy-health", move || {
        run(targets, peers, st, flag, changes_rx, &rung);
        Ok::<(), io::Error>(())
    })?;
    Ok(Some(HealthChecker { status, stop, thread: Some(thread), changes, bell }))
}

/// The check of server `s` of backend `b`, with its status row (at `row`), first due at `due`.
fn target(
    config: &Config,
    b: usize,
    s: usize,
    check: &HealthCheck,
    row: usize,
    due: Instant,
) -> (Target, ServerHealth) {
    let (be, srv) = (&config.backends[b], &config.backends[b].servers[s]);
    let t = Target {
        backend: b,
        server: s,
        row,
        addr: srv.address,
        source: srv.sources.first().copied(),
        check: check.clone(),
        up: true,
        ok_run: 0,
        fail_run: 0,
        next_due: due,
        inflight: None,
    };
    (t, ServerHealth { backend: be.name.clone(), server: srv.name.clone(), up: true, ..Default::default() })
}

/// Takes the servers added or deleted since the last turn.
fn apply_changes(
    targets: &mut Vec<Target>,
    status: &Mutex<Vec<ServerHealth>>,
    rx: &crossbeam_channel::Receiver<Change>,
) {
    while let Ok(c) = rx.try_recv() {
        let Ok(mut rows) = status.lock() else { return };
        match c {
            Change::Add { backend, server, config } => {
                let Some(check) = config.backends.get(backend).and_then(|b| b.check.as_ref()) else { continue };
                if config.backends[backend].servers.get(server).is_none() {
                    continue;
                }
                let (t, row) = target(&config, backend, server, check, rows.len(), Instant::now());
                targets.push(t);
                rows.push(row);
            }
            Change::Remove { backend, server, done } => {
                if let Some(i) = targets.iter().position(|t| t.backend == backend && t.server == server) {
                    let gone = targets.remove(i).row;
                    rows.remove(gone);
                    for t in targets.iter_mut().filter(|t| t.row > gone) {
                        t.row -= 1;
                    }
                }
                let _ = done.send(());
            }
        }
    }
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.bell.signal();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    mut targets: Vec<Target>,
    peers: Arc<Vec<Peer>>,
    status: Arc<Mutex<Vec<ServerHealth>>>,
    stop: Arc<AtomicBool>,
    changes: crossbeam_channel::Receiver<Change>,
    bell: &crate::sys::EventFd,
) {
    let started = Instant::now();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    let mut polled: Vec<usize> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        apply_changes(&mut targets, &status, &changes);
        let now = Instant::now();
        for t in targets.iter_mut().filter(|t| t.inflight.is_none() && now >= t.next_due) {
            t.next_due = after(now, t.check.interval);
            match start(t) {
                Ok(f) => t.inflight = Some(f),
                Err(e) => record(t, Err(e), &peers, &status, started),
            }
        }
        fds.clear();
        polled.clear();
        let mut wake = after(now, Duration::from_millis(200));
        for (i, t) in targets.iter().enumerate() {
            wake = wake.min(t.next_due);
            if let Some(f) = &t.inflight {
                wake = wake.min(f.deadline);
                let events = match f.phase {
                    Phase::Connecting | Phase::Sending(_) => libc::POLLOUT,
                    Phase::Expecting(_) => libc::POLLIN,
                };
                fds.push(libc::pollfd { fd: f.sock.as_raw_fd(), events, revents: 0 });
                polled.push(i);
            }
        }
        // Last, after the checks' sockets: the doorbell (a change or the stop).
        fds.push(libc::pollfd { fd: bell.fd(), events: libc::POLLIN, revents: 0 });
        let timeout = wake.saturating_duration_since(Instant::now()).as_millis().min(200) as libc::c_int;
        // An error (EINTR) is a wakeup like any other: every check's deadline is looked at below.
        let _ = crate::sys::poll(&mut fds, timeout);
        if fds.last().is_some_and(|f| f.revents != 0) {
            bell.take();
        }
        let now = Instant::now();
        for (k, &i) in polled.iter().enumerate() {
            let revents = fds[k].revents;
            let t = &mut targets[i];
            let Some(f) = t.inflight.as_mut() else { continue };
            let mut outcome = if revents != 0 { advance(f, &t.check) } else { None };
            if outcome.is_none() && now >= f.deadline {
                outcome = Some(Err(CheckFailure::Timeout(t.check.timeout)));
            }
            if let Some(result) = outcome {
                t.inflight = None;
                record(t, result, &peers, &status, started);
            }
        }
    }
}

/// Opens the check's connection (non-blocking).
fn start(t: &Target) -> Result<InFlight, CheckFailure> {
    let domain = if t.addr.is_ipv6() { Domain::IPV6 } else { Domain::IPV4 };
    let sock = Socket::new(domain, Type::STREAM.nonblocking().cloexec(), None)?;
    if let Some(src) = t.source {
        crate::sys::set_bind_address_no_port(&sock)?;
        sock.bind(&SocketAddr::new(src, 0).into()).map_err(|source| CheckFailure::Bind { src, source })?;
    }
    match sock.connect(&t.addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(InFlight { sock, deadline: after(Instant::now(), t.check.timeout), phase: Phase::Connecting })
}

/// Moves a check on after poll reported its socket ready; `Some` when it has finished.
fn advance(f: &mut InFlight, check: &HealthCheck) -> Option<Result<(), CheckFailure>> {
    loop {
        match &mut f.phase {
            Phase::Connecting => {
                match f.sock.take_error() {
                    Ok(None) => {}
                    Ok(Some(e)) | Err(e) => return Some(Err(e.into())),
                }
                if f.sock.peer_addr().is_err() {
                    return None; // not connected yet
                }
                f.phase = match (&check.send, &check.expect) {
                    (Some(_), _) => Phase::Sending(0),
                    (None, Some(_)) => Phase::Expecting(Vec::new()),
                    (None, None) => return Some(Ok(())),
                };
            }
            Phase::Sending(sent) => {
                let data = check.send.as_deref().unwrap_or_default();
                match (&f.sock).write(&data[*sent..]) {
                    Ok(n) => *sent += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                    Err(e) => return Some(Err(e.into())),
                }
                if *sent < data.len() {
                    return None;
                }
                if check.expect.is_none() {
                    return Some(Ok(()));
                }
                f.phase = Phase::Expecting(Vec::new());
            }
            Phase::Expecting(got) => {
                let want = check.expect.as_deref().unwrap_or_default();
                let mut buf = [0u8; 1024];
                match (&f.sock).read(&mut buf) {
                    Ok(0) => return Some(Err(CheckFailure::Closed)),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                    Err(e) => return Some(Err(e.into())),
                }
                if got.windows(want.len().max(1)).any(|w| w == want) {
                    return Some(Ok(()));
                }
                if got.len() > 4096 {
                    return Some(Err(CheckFailure::NotFound));
                }
            }
        }
    }
}

/// Counts a result, applies rise/fall, and tells the workers about a change.
fn record(
    t: &mut Target,
    result: Result<(), CheckFailure>,
    peers: &[Peer],
    status: &Mutex<Vec<ServerHealth>>,
    started: Instant,
) {
    let was_up = t.up;
    match &result {
        Ok(()) => {
            t.ok_run += 1;
            t.fail_run = 0;
            if !t.up && t.ok_run >= t.check.rise {
                t.up = true;
            }
        }
        Err(_) => {
            t.fail_run += 1;
            t.ok_run = 0;
            if t.up && t.fail_run >= t.check.fall {
                t.up = false;
            }
        }
    }
    let mut name = String::new();
    if let Ok(mut rows) = status.lock() {
        let row = &mut rows[t.row];
        name = format!("{}/{}", row.backend, row.server);
        row.checks += 1;
        if let Err(e) = &result {
            row.failures += 1;
            row.last_error = Some(e.to_string());
        }
        if t.up != was_up {
            row.up = t.up;
            row.changes += 1;
            row.last_change_s = Some(started.elapsed().as_secs());
        }
    }
    if t.up != was_up {
        let (state, why) = match &result {
            Ok(()) => ("UP", format!("{} check(s) passed", t.check.rise)),
            Err(e) => ("DOWN", format!("{} check(s) failed, last: {e}", t.check.fall)),
        };
        eprintln!("ringproxy: server {name} ({}) is {state}: {why}", t.addr);
        for p in peers {
            p.send(Control::ServerState { backend: t.backend, server: t.server, up: t.up });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_saturate_instead_of_overflowing() {
        let now = Instant::now();
        assert_eq!(after(now, Duration::from_secs(2)), now + Duration::from_secs(2));
        assert_eq!(after(now, Duration::MAX), now + CENTURY, "review 3d: the type maximum is a century");
        assert!(after(now, Duration::MAX.mul_f64(15.0 / 16.0)) > now);
    }
}
