//! The running service across reloads: the current engine, engines still draining after a reload,
//! and the stats endpoints that outlive them all.
//!
//! A reload re-reads the file. An invalid file is refused with the same `FILE:LINE:COLUMN` message
//! as at start, and nothing changes. A valid one starts a new engine that inherits the listening
//! sockets of the addresses still configured (the very same kernel sockets, so no queued connection
//! and no SYN is lost), binds new addresses, and only then tells the old engine to drain and to
//! move its established connections to the new engine (worker/moving.rs): each one whose frontend,
//! backend and server the new file still has continues there, with its sockets, times and
//! counters, under the new configuration; the others follow their backend's `on_removed` (stay
//! until they end or `timeout drain` passes, or close). Every new connection goes to the new engine
//! with the new backends, servers, weights and limits. Addresses no longer configured are closed
//! once the new engine runs.
//!
//! Every helper thread of every engine (health checks, connection log) starts under the
//! supervisor's [`Watcher`]: [`Supervisor::failure`] says when one has failed, and the binary then
//! shuts down with a non-zero status.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crossbeam_channel::{Receiver, Sender, unbounded};

use crate::admin::{Command, ServerOp};
use crate::config::{self, Config, ConfigError};
use crate::engine::{Engine, StartError, StartOptions, StatsSource};
use crate::listener::Bound;
use crate::privileges::{self, Ids};
use crate::stats::socket::{Answer, Level, Request};
use crate::stats::{Detail, EngineStats, prometheus, socket};
use crate::sys;
use crate::watch::{Failure, Watch, Watcher};

/// What a successful reload put in place. Displays as the one line operators read (then the
/// configuration's warnings, one per line).
#[derive(Clone, Debug)]
pub struct ReloadReport {
    pub path: PathBuf,
    pub workers: usize,
    pub maxconn: u32,
    pub listeners: Vec<Bound>,
    /// The new configuration's warnings (`FILE:LINE:COLUMN: warning: ...`).
    pub warnings: Vec<String>,
    /// Runtime-API changes the old engine ran with, which the new one does not have (the file
    /// wins).
    pub dropped: Vec<String>,
}

impl fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let listening: Vec<String> = self.listeners.iter().map(|b| format!("{} ({})", b.addr, b.frontend)).collect();
        write!(
            f,
            "reloaded {}: {} workers, maxconn {}, listening on {}",
            self.path.display(),
            self.workers,
            self.maxconn,
            listening.join(", ")
        )?;
        for w in &self.warnings {
            write!(f, "\n{w}")?;
        }
        if !self.dropped.is_empty() {
            write!(f, "\nruntime changes dropped (the file wins): {}", self.dropped.join("; "))?;
        }
        Ok(())
    }
}

/// What an engine replaced by a reload did before it exited. Displays as the line operators read.
#[derive(Clone, Debug)]
pub struct Handover {
    /// The reload that replaced it.
    pub generation: u64,
    /// From that reload to its exit.
    pub after: std::time::Duration,
    /// Established connections it moved on to a newer engine.
    pub moved: u64,
    /// Connections it closed after the reload (ended by their peers, timed out, removed servers
    /// with `on_removed: close`, or left at the drain deadline).
    pub closed: u64,
    /// Moves the newer engine refused (no room), each retried a second later.
    pub refused: u64,
}

impl fmt::Display for Handover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the engine replaced by reload {} exited {:.2}s after it: {} connections moved on, {} closed",
            self.generation,
            self.after.as_secs_f64(),
            self.moved,
            self.closed
        )?;
        if self.refused > 0 {
            write!(f, " ({} moves refused for want of room, and retried)", self.refused)?;
        }
        Ok(())
    }
}

/// The answer to a command the supervisor carried out, also written to the log.
fn logged(outcome: Result<String, String>) -> Answer {
    match &outcome {
        Ok(text) | Err(text) => eprintln!("ringproxy: {text}"),
    }
    answer(&outcome)
}

/// The runtime API's answer of `outcome`.
fn answer(outcome: &Result<String, String>) -> Answer {
    match outcome {
        Ok(text) => Answer::Ok(format!("{text}\n")),
        Err(text) => Answer::Fail(format!("{text}\n")),
    }
}

/// The path this program was started from: what `/proc/self/exe` names (" (deleted)" once a
/// package replaced the file there, which is then the binary to upgrade to).
fn own_binary() -> std::io::Result<PathBuf> {
    let p = std::fs::read_link("/proc/self/exe")?;
    let s = p.to_string_lossy();
    Ok(match s.strip_suffix(" (deleted)") {
        Some(stripped) => PathBuf::from(stripped),
        None => p,
    })
}

/// Why a reload was refused; the running configuration stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("a binary upgrade is under way (the new process takes over; reload it instead)")]
    Upgrading,
    #[error("the service is stopping (SIGTERM): it withdraws, then drains, then exits")]
    Stopping,
}

pub struct Supervisor {
    path: PathBuf,
    current: Engine,
    /// Engines replaced by reloads, still draining: each with the reload that replaced it
    /// (generation, when).
    draining: Vec<(Engine, u64, std::time::Instant)>,
    /// The current engine's stats, swapped on reload (read by the stats endpoints' threads).
    source: Arc<Mutex<Option<StatsSource>>>,
    requests: Receiver<Request>,
    /// Rung by the stats sockets after each command they hand over ([`Supervisor::doorbell`]).
    bell: Arc<sys::EventFd>,
    _stats_socket: Option<socket::Server>,
    _admin_socket: Option<socket::Server>,
    /// Where the stats sockets are (removed by [`Supervisor::abandon`]).
    stats_paths: Vec<PathBuf>,
    /// The runtime-API changes the current engine runs with, as commands: (what they set, line).
    runtime: Vec<(String, String)>,
    /// The configuration the current engine runs when servers were added at run time.
    live_config: Option<Arc<Config>>,
    /// Servers deleted at run time (backend, server), and whether the health checker has stopped
    /// checking each: their indices stay taken until a reload or an `add server` takes them
    /// ([`Supervisor::reusable`]).
    removed: std::collections::HashMap<(usize, usize), bool>,
    metrics: Option<prometheus::Endpoint>,
    watcher: Watcher,
    /// Successful reloads since start.
    pub generation: u64,
    /// A binary upgrade whose new process was started and has not said yet that it serves.
    starting: Option<Starting>,
    /// A binary upgrade handing everything to a new process.
    upgrading: Option<Upgrading>,
    /// The process an upgrade handed everything to (this one is about to exit).
    handed_to: Option<u32>,
    /// The client-side socket buffer sizes the listening sockets keep, by key: set by the current
    /// configuration or an earlier one (reloads and upgrades keep the sockets, and the kernel keeps
    /// a size set on a socket until it closes). See [`listener_buffers`].
    listener_buffers: Vec<(String, u32)>,
    /// Warnings of the start (an upgrade's new process: sizes its file dropped that the sockets
    /// it took over keep), told to the old process, which answers the upgrade with them.
    start_warnings: Vec<String>,
    /// Since when the service reports that it is going away (SIGTERM with `withdraw_delay`).
    withdrawing: Option<std::time::Instant>,
    /// Since when it drains on its way out (listeners closed; SIGTERM, or a helper failed).
    stopping: Option<std::time::Instant>,
}

/// An upgrade's new process, started and handed the listening sockets, until it says it serves.
struct Starting {
    binary: PathBuf,
    child: std::process::Child,
    link: crate::upgrade::Link,
    /// When it is stopped if it has not said that it serves.
    deadline: std::time::Instant,
    /// The admin-socket requests that asked for the upgrade: answered once it serves or failed.
    replies: Vec<Sender<Answer>>,
}

/// Stops an upgrade's new process that has not served.
fn stop_child(child: &mut std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A binary upgrade under way, seen from the old process.
struct Upgrading {
    binary: PathBuf,
    pid: u32,
    started: std::time::Instant,
    courier: std::thread::JoinHandle<Result<u64, String>>,
    failed: Receiver<String>,
}

/// How a binary upgrade ended, seen from the old process.
#[derive(Debug)]
pub enum UpgradeEnd {
    /// Everything was handed over: the old process exits (status 0).
    HandedOver { pid: u32, binary: PathBuf, taken: u64, after: std::time::Duration },
    /// The new process broke off after taking the listening sockets: this process started a
    /// fresh engine and serves on.
    RolledBack { pid: u32, reason: String },
}

impl fmt::Display for UpgradeEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpgradeEnd::HandedOver { pid, binary, taken, after } => write!(
                f,
                "upgrade: handed the listening sockets and {taken} established connections to {} (pid {pid}) in \
                 {:.2}s; exiting",
                binary.display(),
                after.as_secs_f64()
            ),
            UpgradeEnd::RolledBack { pid, reason } => write!(
                f,
                "upgrade: the new process (pid {pid}) broke off while taking over: {reason}; this process serves on \
                 (a fresh engine from its configuration file; connections it had taken are lost with it)"
            ),
        }
    }
}

/// The stats endpoints, each when configured: the stats socket, the admin socket, the Prometheus
/// endpoint.
struct Endpoints {
    stats: Option<socket::Server>,
    admin: Option<socket::Server>,
    metrics: Option<prometheus::Endpoint>,
}

/// Opens the stats endpoints `stats` configures: the sockets owned by `owner` (the user the engine
/// will run as), forwarding the runtime API's commands to `requests`. An endpoint the process a
/// binary upgrade replaces handed over (`inherited`, same path or address) is served from its
/// socket as it is.
fn open_endpoints(
    stats: &config::Stats,
    owner: Option<Ids>,
    collect: impl Fn(Detail) -> EngineStats + Clone + Send + 'static,
    requests: socket::Requests,
    watch: &Watch,
    inherited: &mut Option<crate::upgrade::Inherited>,
) -> Result<Endpoints, StartError> {
    let mut take_unix = |p: &Path, admin: bool| {
        let i = inherited.as_mut()?;
        let slot = if admin { &mut i.admin } else { &mut i.stats };
        slot.take_if(|(q, _)| q == p).map(|(_, fd)| fd)
    };
    let stats_socket = match &stats.socket {
        Some(p) => Some(match take_unix(p, false) {
            Some(fd) => socket::serve_inherited(p, fd, collect.clone(), Some(requests.clone()), Level::Read, watch)?,
            None => socket::serve(p, stats.mode, collect.clone(), Some(requests.clone()), Level::Read, owner, watch)?,
        }),
        None => None,
    };
    let admin = match &stats.admin_socket {
        Some(p) => Some(match take_unix(p, true) {
            Some(fd) => socket::serve_inherited(p, fd, collect.clone(), Some(requests), Level::Admin, watch)?,
            None => socket::serve(p, stats.admin_mode, collect.clone(), Some(requests), Level::Admin, owner, watch)?,
        }),
        None => None,
    };
    let metrics = match stats.prometheus {
        Some(addr) => {
            let handed = inherited.as_mut().and_then(|i| i.prometheus.take_if(|(a, _)| *a == addr)).map(|(_, fd)| fd);
            let served = match handed {
                Some(fd) => {
                    prometheus::serve_listener(std::net::TcpListener::from(fd), move || collect(Detail::Full), watch)
                }
                None => prometheus::serve(addr, move || collect(Detail::Full), watch),
            };
            Some(served.map_err(|source| StartError::Prometheus { addr, source })?)
        }
        None => None,
    };
    Ok(Endpoints { stats: stats_socket, admin, metrics })
}

impl Supervisor {
    /// Opens the stats endpoints and starts the first engine for `config` (read from `path`).
    ///
    /// Started as root, the endpoints come first: the engine switches to `global.user` once it has
    /// bound, and the socket may be in a directory only root can write to (it is given to `user`;
    /// the switch takes the capabilities of their threads too). Started as another user, they come
    /// once the engine has bound and dropped its capabilities, so their threads never hold one;
    /// either way before any worker runs.
    pub fn start(path: &Path, config: Config) -> Result<Supervisor, StartError> {
        Supervisor::start_from(path, config, None)
    }

    /// The new process of a binary upgrade: starts on the listening sockets the old process handed
    /// over (upgrade.rs), says it serves, and takes the established connections the old process
    /// sends, in the background. Whatever fails, the old process is told why (it serves on).
    pub fn take_over(path: &Path, config: Config, link: crate::upgrade::Link) -> Result<Supervisor, String> {
        let inherited = crate::upgrade::receive_hello(&link)?;
        let old = inherited.old_pid;
        let refuse = |why: String| {
            let _ = link.send(&crate::upgrade::Msg::Refused { reason: why.clone() }, &[]);
            why
        };
        let service = Supervisor::start_from(path, config, Some(inherited)).map_err(|e| refuse(e.to_string()))?;
        for w in &service.start_warnings {
            eprintln!("{w}");
        }
        let ready = crate::upgrade::Msg::Ready {
            protocol: crate::upgrade::PROTOCOL,
            pid: std::process::id(),
            warnings: service.start_warnings.clone(),
        };
        link.send(&ready, &[]).map_err(|e| format!("telling the old process it serves: {e}"))?;
        let plan = service.current.move_plan();
        std::thread::Builder::new()
            .name("ringproxy-upgrade".into())
            .spawn(move || {
                match crate::upgrade::receive_conns(link, std::sync::Arc::clone(&plan)) {
                    Ok(n) => eprintln!("ringproxy: upgrade: took {n} established connections from pid {old}"),
                    Err(e) => eprintln!("ringproxy: upgrade: taking connections from pid {old} broke off: {e}"),
                }
                crate::upgrade::after_old_exits(old, &plan);
            })
            .map_err(|e| format!("cannot start the upgrade's courier thread: {e}"))?;
        Ok(service)
    }

    fn start_from(
        path: &Path,
        config: Config,
        mut inherited: Option<crate::upgrade::Inherited>,
    ) -> Result<Supervisor, StartError> {
        let stats = config.global.stats.clone();
        let owner = match &config.global.user {
            Some(u) => Some(privileges::resolve(u, config.global.group.as_deref())?),
            None => None,
        };
        let source: Arc<Mutex<Option<StatsSource>>> = Arc::new(Mutex::new(None));
        let (tx, requests) = unbounded();
        let bell = Arc::new(sys::EventFd::new().map_err(StartError::EventFd)?);
        let requests_tx = socket::Requests { tx, bell: bell.clone() };
        let collect = {
            let source = source.clone();
            move |detail| -> EngineStats {
                let current = source.lock().ok().and_then(|s| s.clone());
                current.map(|s| s.collect_with(detail)).unwrap_or_default()
            }
        };
        let watcher = Watcher::new();
        let as_root = sys::ids().0 == 0;
        let mut endpoints = None;
        if as_root {
            endpoints = Some(open_endpoints(
                &stats,
                owner,
                collect.clone(),
                requests_tx.clone(),
                &watcher.watch(),
                &mut inherited,
            )?);
        }
        let kept = inherited.as_ref().map(|i| i.client_buffers.as_slice()).unwrap_or_default();
        let (listener_buffers, start_warnings) = listener_buffers(path, kept, &config);
        let groups = inherited.as_mut().map(|i| std::mem::take(&mut i.groups)).unwrap_or_default();
        let prepared = Engine::prepare(config, StartOptions { inherit: &groups, external_stats: true })?;
        drop(groups);
        if !as_root {
            endpoints = Some(open_endpoints(&stats, owner, collect, requests_tx, &watcher.watch(), &mut inherited)?);
        }
        let engine = prepared.launch(&watcher.watch())?;
        let Some(Endpoints { stats: stats_socket, admin, metrics }) = endpoints else {
            unreachable!("opened above, as root or not")
        };
        if let Ok(mut s) = source.lock() {
            *s = Some(engine.stats_source());
        }
        Ok(Supervisor {
            path: path.to_owned(),
            current: engine,
            draining: Vec::new(),
            source,
            requests,
            bell,
            _stats_socket: stats_socket,
            _admin_socket: admin,
            stats_paths: stats.socket.into_iter().chain(stats.admin_socket).collect(),
            runtime: Vec::new(),
            live_config: None,
            removed: std::collections::HashMap::new(),
            metrics,
            watcher,
            generation: 0,
            starting: None,
            upgrading: None,
            handed_to: None,
            listener_buffers,
            start_warnings,
            withdrawing: None,
            stopping: None,
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.current
    }

    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(|m| m.addr())
    }

    /// Where helper threads of the service start, so that their failure is seen.
    pub fn watch(&self) -> Watch {
        self.watcher.watch()
    }

    /// A helper thread that has failed since the last call, if any.
    pub fn failure(&self) -> Option<Failure> {
        self.watcher.failure()
    }

    /// Gives up at once, without joining any thread (a second SIGTERM): removes the stats socket's
    /// file and leaves the engines, still draining, to the process's exit, which the caller
    /// brings about right after. During an upgrade the files stay: the new process serves them.
    pub fn abandon(self) {
        if self.upgrading.is_none() {
            for p in &self.stats_paths {
                let _ = std::fs::remove_file(p);
            }
        }
        std::mem::forget(self);
    }

    /// The new process of the upgrade under way, once it serves (its pid), until
    /// [`Supervisor::upgrade_end`] has said how the hand-over ended.
    pub fn upgrading(&self) -> Option<u32> {
        self.upgrading.as_ref().map(|u| u.pid)
    }

    /// Engines still draining after reloads.
    pub fn draining(&self) -> usize {
        self.draining.len()
    }

    /// Re-reads the configuration file and switches to it, or explains why not.
    pub fn reload(&mut self) -> Result<ReloadReport, ReloadError> {
        if self.upgrading.is_some() || self.starting.is_some() || self.handed_to.is_some() {
            return Err(ReloadError::Upgrading);
        }
        if self.going_away() {
            return Err(ReloadError::Stopping);
        }
        let config = config::load(&self.path)?;
        let mut warnings = config.warnings.clone();
        let (kept, dropped) = listener_buffers(&self.path, &self.listener_buffers, &config);
        warnings.extend(dropped);
        // On failure the current engine is untouched: it still holds and serves its sockets.
        let opts = StartOptions { inherit: self.current.listeners(), external_stats: true };
        let new = Engine::prepare(config, opts)?.launch(&self.watcher.watch())?;
        let mut old = std::mem::replace(&mut self.current, new);
        if let Ok(mut s) = self.source.lock() {
            *s = Some(self.current.stats_source());
        }
        // The old engine stops accepting and moves its established connections to the new one;
        // engines still draining after earlier reloads move what they have left there too.
        old.move_to(&self.current);
        for (e, _, _) in &mut self.draining {
            e.move_to(&self.current);
        }
        // Return once the old engine has stopped accepting, so every connection from now on
        // meets the new configuration (its cancelled accepts can still hand over a few first,
        // which it serves).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline && old.stats_with(Detail::Totals).total(|w| w.listening) > 0 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // A connection that arrived while the old accepts were being cancelled may have woken only
        // one of them; the new engine's accepts re-arm and take it from the backlog.
        self.current.rearm_accepts();
        self.generation += 1;
        self.listener_buffers = kept;
        self.draining.push((old, self.generation, std::time::Instant::now()));
        Ok(ReloadReport {
            path: self.path.clone(),
            workers: self.current.plan().workers,
            maxconn: self.current.plan().maxconn,
            listeners: self.current.bound().to_vec(),
            warnings,
            dropped: {
                self.live_config = None;
                self.removed.clear();
                std::mem::take(&mut self.runtime).into_iter().map(|(_, line)| line).collect()
            },
        })
    }

    /// Starts `binary` (default: this program's path) with this process's arguments and hands it
    /// the listening sockets (upgrade.rs), then returns at once: [`Supervisor::upgrade_started`],
    /// called from the main loop, says when it serves them (and then hands it the established
    /// connections in the background; [`Supervisor::upgrade_end`] says when that is over) or has
    /// failed. Meanwhile signals and the runtime API are answered as always. If it does not start,
    /// refuses, or does not serve within 30 s, it is stopped and this process serves on: the error
    /// says why.
    pub fn upgrade(&mut self, binary: Option<&Path>) -> Result<String, String> {
        use std::os::fd::{AsFd, AsRawFd};
        if self.upgrading.is_some() || self.starting.is_some() {
            return Err("upgrade refused: an upgrade is already under way".into());
        }
        if self.going_away() {
            return Err(format!("upgrade refused: {}", ReloadError::Stopping));
        }
        if !self.draining.is_empty() {
            return Err(format!(
                "upgrade refused: {} engine(s) replaced by a reload still hold connections that could not move (their \
                 server was removed); retry once they have drained (at most timeout.drain)",
                self.draining.len()
            ));
        }
        let binary = match binary {
            Some(b) => b.to_owned(),
            None => own_binary().map_err(|e| format!("upgrade refused: cannot tell this program's path: {e}"))?,
        };
        let fail = |why: String| format!("upgrade to {} failed, this process serves on: {why}", binary.display());
        let (link, theirs) = crate::upgrade::Link::pair().map_err(|e| fail(format!("socketpair: {e}")))?;
        let raw = theirs.as_raw_fd();
        let mut cmd = std::process::Command::new(&binary);
        cmd.args(std::env::args_os().skip(1)).env(crate::upgrade::ENV_FD, raw.to_string());
        // SAFETY: between fork and exec only async-signal-safe calls: fcntl on a number.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                if libc::fcntl(raw, libc::F_SETFD, 0) == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
            });
        }
        let mut child = cmd.spawn().map_err(|e| fail(format!("cannot start it: {e}")))?;
        drop(theirs);
        // What it takes over: every frontend socket, then the stats endpoints.
        let groups = self.current.listeners();
        let listeners = groups
            .iter()
            .map(|g| crate::upgrade::ListenerDesc {
                frontend: g.frontend.clone(),
                configured: g.configured,
                bound: g.bound,
                fds: g.fds.len(),
            })
            .collect();
        let mut fds: Vec<std::os::fd::BorrowedFd<'_>> =
            groups.iter().flat_map(|g| g.fds.iter().map(|f| f.as_fd())).collect();
        fds.extend(self._stats_socket.as_ref().map(|s| s.listener()));
        fds.extend(self._admin_socket.as_ref().map(|s| s.listener()));
        fds.extend(self.metrics.as_ref().map(|m| m.listener()));
        let hello = crate::upgrade::Msg::Hello {
            protocol: crate::upgrade::PROTOCOL,
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            listeners,
            stats: self._stats_socket.as_ref().map(|s| s.path().to_owned()),
            admin: self._admin_socket.as_ref().map(|s| s.path().to_owned()),
            prometheus: self.metrics.as_ref().map(|m| m.addr()),
            client_buffers: self.listener_buffers.clone(),
        };
        if let Err(e) = link.send(&hello, &fds) {
            // Most likely it has exited already: say how.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(fail(format!("it exited ({status}) before serving")));
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            stop_child(&mut child);
            return Err(fail(format!("handing it the listening sockets: {e}")));
        }
        drop(fds);
        let text = format!(
            "upgrade: started {} (pid {}) and handed it the listening sockets; waiting for it to serve them (at most \
             {}s)",
            binary.display(),
            child.id(),
            crate::upgrade::START_WAIT.as_secs()
        );
        let deadline = std::time::Instant::now() + crate::upgrade::START_WAIT;
        self.starting = Some(Starting { binary, child, link, deadline, replies: Vec::new() });
        Ok(text)
    }

    /// Whether an upgrade's new process has been started and has not yet said that it serves (or
    /// failed).
    pub fn upgrade_starting(&self) -> bool {
        self.starting.is_some()
    }

    /// How the start of the upgrade under way came out, once it has (`None` before, and without
    /// one): the new process serves, and the established connections are on their way to it; or
    /// it failed, and this process serves on. Answered to whoever asked through the admin socket;
    /// the caller logs it.
    pub fn upgrade_started(&mut self) -> Option<Result<String, String>> {
        let st = self.starting.as_mut()?;
        let fail = |why: String| format!("upgrade to {} failed, this process serves on: {why}", st.binary.display());
        // (What it said first: a refusal comes before its exit.)
        let started: Result<(u32, Vec<String>), String> = match st.link.recv(std::time::Duration::ZERO) {
            Ok(None) => {
                if let Ok(Some(status)) = st.child.try_wait() {
                    Err(fail(format!("it exited ({status}) before serving")))
                } else if std::time::Instant::now() >= st.deadline {
                    stop_child(&mut st.child);
                    Err(fail(format!("it did not serve within {}s", crate::upgrade::START_WAIT.as_secs())))
                } else {
                    return None;
                }
            }
            Ok(Some((crate::upgrade::Msg::Ready { pid, warnings, .. }, _))) => Ok((pid, warnings)),
            Ok(Some((crate::upgrade::Msg::Refused { reason }, _))) => {
                stop_child(&mut st.child);
                Err(fail(format!("it refused: {reason}")))
            }
            Ok(Some((other, _))) => {
                stop_child(&mut st.child);
                Err(fail(format!("it said {other:?} instead of serving")))
            }
            Err(e) => {
                let status = st.child.wait().map(|s| s.to_string()).unwrap_or_else(|_| "unknown status".into());
                Err(fail(format!("it broke off ({e}) and exited ({status})")))
            }
        };
        let mut st = self.starting.take()?;
        let replies = std::mem::take(&mut st.replies);
        let outcome = started.and_then(|(pid, warnings)| self.hand_over(st, pid, warnings));
        for r in replies {
            let _ = r.send(answer(&outcome));
        }
        Some(outcome)
    }

    /// The new process `pid` serves (`st`): hands it the established connections in the
    /// background.
    fn hand_over(&mut self, st: Starting, pid: u32, warnings: Vec<String>) -> Result<String, String> {
        let Starting { binary, child, link, .. } = st;
        // It serves. (The child is not waited for: it outlives this process.)
        std::mem::forget(child);
        let (tx, exports) = crossbeam_channel::unbounded();
        self.current.export_to(Arc::new(crate::worker::ExportPlan { tx }));
        let (failed_tx, failed) = crossbeam_channel::bounded(1);
        let peers = self.current.peers();
        let courier = match std::thread::Builder::new()
            .name("ringproxy-upgrade".into())
            .spawn(move || crate::upgrade::send_conns(link, exports, peers, failed_tx))
        {
            Ok(c) => c,
            Err(e) => return Err(format!("upgrade: cannot start its courier thread: {e}")),
        };
        self.upgrading =
            Some(Upgrading { binary: binary.clone(), pid, started: std::time::Instant::now(), courier, failed });
        self.monitoring_accepts(false);
        let mut text = format!(
            "upgrade: {} (pid {pid}) serves the listening sockets; handing it the established connections",
            binary.display()
        );
        for w in warnings {
            text.push('\n');
            text.push_str(&w);
        }
        Ok(text)
    }

    /// Gives up the start of an upgrade under way (the service is going away before the new
    /// process served): stops the new process and tells whoever asked.
    pub fn cancel_upgrade_start(&mut self) {
        if let Some(mut st) = self.starting.take() {
            stop_child(&mut st.child);
            let answer = logged(Err(format!(
                "upgrade to {} cancelled: the service is stopping; the new process was stopped before it served",
                st.binary.display()
            )));
            for r in &st.replies {
                let _ = r.send(answer.clone());
            }
        }
    }

    /// How the binary upgrade under way ended, once it has: everything handed over (the caller
    /// exits), or rolled back after the new process broke off (a fresh engine serves on).
    pub fn upgrade_end(&mut self) -> Option<UpgradeEnd> {
        let u = self.upgrading.as_ref()?;
        if let Ok(reason) = u.failed.try_recv() {
            let pid = u.pid;
            self.upgrading = None;
            self.monitoring_accepts(true);
            // The courier answers "not taken" for everything from now on, so each connection
            // stays; a fresh engine on the same sockets takes them (a reload).
            let end = match self.reload() {
                Ok(_) => UpgradeEnd::RolledBack { pid, reason },
                Err(e) => UpgradeEnd::RolledBack { pid, reason: format!("{reason}; and the fresh engine failed: {e}") },
            };
            // (The courier thread ends once the old engine's workers exit.)
            return Some(end);
        }
        if !u.courier.is_finished() || !self.current.finished() {
            return None;
        }
        let u = self.upgrading.take()?;
        let after = u.started.elapsed();
        match u.courier.join() {
            Ok(Ok(taken)) => {
                self.handed_to = Some(u.pid);
                Some(UpgradeEnd::HandedOver { pid: u.pid, binary: u.binary, taken, after })
            }
            Ok(Err(reason)) => {
                self.monitoring_accepts(true);
                Some(UpgradeEnd::RolledBack { pid: u.pid, reason })
            }
            Err(_) => {
                self.monitoring_accepts(true);
                Some(UpgradeEnd::RolledBack { pid: u.pid, reason: "its courier thread failed".into() })
            }
        }
    }

    /// Whether the stats socket, the admin socket and the Prometheus endpoint accept new clients:
    /// not from the moment an upgrade's new process serves them (it shares their listening
    /// sockets and answers for the service from then on), again if it breaks off.
    fn monitoring_accepts(&self, accept: bool) {
        for s in [self._stats_socket.as_ref(), self._admin_socket.as_ref()].into_iter().flatten() {
            if accept { s.resume_accepting() } else { s.stop_accepting() }
        }
        if let Some(m) = &self.metrics {
            if accept { m.resume_accepting() } else { m.stop_accepting() }
        }
    }

    /// How long the old process of an upgrade goes on answering the monitoring clients it had
    /// accepted before it exits (the new process takes every new one).
    const ANSWER_BEFORE_EXIT: std::time::Duration = std::time::Duration::from_secs(2);

    /// The old process has handed everything over: it stops accepting monitoring clients (the new
    /// process, which shares the sockets, takes them), answers those it has — the runtime API's
    /// too, for at most [`Supervisor::ANSWER_BEFORE_EXIT`] — leaves the stats sockets' files to
    /// the new process and exits without draining anything more.
    pub fn handed_over(mut self) {
        self.monitoring_accepts(false);
        let deadline = std::time::Instant::now() + Self::ANSWER_BEFORE_EXIT;
        let quiet = |s: &Supervisor| {
            [s._stats_socket.as_ref(), s._admin_socket.as_ref()].iter().flatten().all(|s| s.quiet())
                && s.metrics.as_ref().is_none_or(|m| m.quiet())
        };
        while !quiet(&self) && std::time::Instant::now() < deadline {
            self.serve_requests();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if let Some(s) = self._stats_socket.take() {
            s.disown();
        }
        if let Some(s) = self._admin_socket.take() {
            s.disown();
        }
        self.stats_paths.clear();
    }

    /// Whether this host should get new connections, for a routing daemon's check (`show ready`):
    /// the engine runs (every listener bound), every frontend's backend has a server that takes
    /// connections (health up, admin `ready`), and the service is not going away. `Err` says why
    /// not.
    pub fn readiness(&self) -> Result<String, String> {
        if let Some(since) = self.stopping {
            return Err(format!(
                "not ready: draining on the way out (listeners closed {:.1}s ago)",
                since.elapsed().as_secs_f64()
            ));
        }
        if let Some(since) = self.withdrawing {
            return Err(format!(
                "not ready: going away (SIGTERM {:.1}s ago; draining follows)",
                since.elapsed().as_secs_f64()
            ));
        }
        if let Some(pid) = self.upgrading.as_ref().map(|u| u.pid).or(self.handed_to) {
            // The new process serves the listening sockets and answers for itself; this one's
            // engine is handing it its connections, and once it holds none its workers are gone
            // (their servers no longer in its stats): not a reason to withdraw the host.
            return Ok(format!(
                "ready: an upgrade's new process (pid {pid}) serves the listening sockets; this process hands it its \
                 connections"
            ));
        }
        let stats = self.current.stats_with(Detail::Servers);
        let config = self.config();
        let mut empty: Vec<&str> = Vec::new();
        for fe in &config.frontends {
            let be = &config.backends[fe.backend].name;
            let up = stats.servers.iter().any(|s| {
                &s.backend == be && !s.removed && s.state.is_up() && s.admin == crate::stats::AdminState::Ready
            });
            if !up && !empty.contains(&be.as_str()) {
                empty.push(be);
            }
        }
        if !empty.is_empty() {
            return Err(format!("not ready: no server up and ready in backend {}", empty.join(", ")));
        }
        Ok(format!("ready: {} listeners, generation {}", self.current.bound().len(), self.generation))
    }

    /// Withdrawing or draining on the way out: nothing may start a new engine any more.
    fn going_away(&self) -> bool {
        self.withdrawing.is_some() || self.stopping.is_some()
    }

    /// The service is going away (SIGTERM with `withdraw_delay`): from now on it reports not ready,
    /// while it still accepts, so that a routing daemon withdraws its route first.
    pub fn withdraw(&mut self) {
        self.withdrawing.get_or_insert_with(std::time::Instant::now);
    }

    /// Carries out a runtime-API command on the current engine. A command naming what the running
    /// configuration does not have changes nothing.
    pub fn command(&mut self, command: &Command) -> Answer {
        if let Some(pid) = self.handed_to
            && *command != Command::ShowReady
        {
            // (Its engine has handed everything over and its workers are gone.)
            return Answer::Fail(format!(
                "this process has handed everything to pid {pid} (a binary upgrade) and is exiting: ask again, the \
                 new process answers\n"
            ));
        }
        let (server, op) = match command {
            // (Answered by `serve_requests` once the new process serves or has failed.)
            Command::Upgrade { binary } => return logged(self.upgrade(binary.as_deref())),
            Command::Reload => {
                return logged(
                    self.reload()
                        .map(|r| r.to_string())
                        .map_err(|e| format!("reload refused, the running configuration stays: {e}")),
                );
            }
            Command::ShowReady => {
                return match self.readiness() {
                    Ok(text) => Answer::Ok(format!("{text}\n")),
                    Err(text) => Answer::Fail(format!("{text}\n")),
                };
            }
            Command::ShowConns { filter, limit } => {
                let at = match filter.server.as_ref().map(|n| self.find(n)).transpose() {
                    Ok(at) => at,
                    Err(e) => return Answer::Fail(format!("{e}\n")),
                };
                let config = self.config();
                let frontend = match &filter.frontend {
                    Some(name) => match config.frontends.iter().position(|f| f.name == *name) {
                        Some(f) => Some(f),
                        None => {
                            let names: Vec<&str> = config.frontends.iter().map(|f| f.name.as_str()).collect();
                            return Answer::Fail(format!("no frontend \"{name}\" (frontends: {})\n", names.join(", ")));
                        }
                    },
                    None => None,
                };
                // A client's address is known only where something needs it: a filter on it
                // where none is would list nothing, and say nothing of why.
                let mut scope = frontend.map_or(0..config.frontends.len(), |f| f..f + 1);
                if let Some(c) = filter.client
                    && !scope.any(|f| config.knows_clients(f))
                {
                    return Answer::Fail(format!(
                        "client {c}: {} its clients' addresses (nothing in the configuration needs them: a \
                         connection log, allow/deny, per_source limits, balance source or hash, PROXY headers in \
                         or out)\n",
                        if frontend.is_some() { "this frontend does not look up" } else { "no frontend looks up" }
                    ));
                }
                let m = crate::admin::ConnMatch { server: at, frontend, client: filter.client };
                let lines = self.current.list_conns(m, *limit);
                let mut text = format!("{} connections listed (limit {limit})\n", lines.len());
                for l in lines {
                    text.push_str(&l);
                    text.push('\n');
                }
                return Answer::Ok(text);
            }
            Command::AddServer(new) => return self.add_server(new, command),
            Command::DelServer { server } => return self.del_server(server, command),
            Command::SetState { server, state } => (server, ServerOp::State(*state)),
            Command::SetWeight { server, weight } => (server, ServerOp::Weight(*weight)),
            Command::Shutdown { server } => (server, ServerOp::Shutdown),
        };
        let (b, s) = match self.find(server) {
            Ok(at) => at,
            Err(e) => return Answer::Fail(format!("{e}\n")),
        };
        let config = self.config();
        // What it sets, and whether that is what the file says (then nothing is left to drop).
        let configured = &config.backends[b].servers[s];
        let (key, as_configured) = match op {
            ServerOp::State(st) => (format!("{server} state"), st == crate::stats::AdminState::Ready),
            ServerOp::Weight(w) => (format!("{server} weight"), w == configured.weight),
            ServerOp::Shutdown | ServerOp::Remove => (String::new(), true),
        };
        if let Err(e) = self.current.server_op(b, s, op) {
            return Answer::Fail(format!("{}: {e}\n", command.line()));
        }
        eprintln!("ringproxy: runtime API: {}", command.line());
        if !key.is_empty() {
            self.runtime.retain(|(k, _)| *k != key);
            if !as_configured {
                self.runtime.push((key, command.line()));
            }
        }
        let done = match op {
            ServerOp::Shutdown => match config.backends[b].close_spread {
                Some(w) => format!("closing its connections over {}", config::duration::format(w)),
                None => "its connections are closed".into(),
            },
            _ => "applied by every worker".into(),
        };
        Answer::Ok(format!("{}: {done}\n", command.line()))
    }

    /// The configuration the current engine runs: the file's, with the servers added at run time.
    fn config(&self) -> Arc<Config> {
        self.live_config.clone().unwrap_or_else(|| self.current.config_arc())
    }

    /// Where server `name` is (the latest of that name, removed ones left aside).
    fn find(&self, name: &crate::admin::ServerName) -> Result<(usize, usize), String> {
        name.find(&self.config(), |b, s| !self.removed.contains_key(&(b, s)))
    }

    /// `add server`: checked against the running configuration and the host (its sources must be
    /// local), then appended to the backend on every worker.
    fn add_server(&mut self, new: &crate::admin::NewServer, command: &Command) -> Answer {
        let fail = |e: String| Answer::Fail(format!("{}: {e}\n", command.line()));
        let mut config = (*self.config()).clone();
        let b = match crate::admin::backend_index(&config, &new.server.backend) {
            Ok(b) => b,
            Err(e) => return fail(e),
        };
        if self.find(&new.server).is_ok() {
            return fail(format!("backend \"{}\" already has a server \"{}\"", new.server.backend, new.server.server));
        }
        if let Err(e) = crate::config::check_name(&new.server.server, "server") {
            return fail(e);
        }
        // The index of a deleted server no connection names any more, else the next one.
        let reuse = self.reusable(b);
        let servers = &config.backends[b].servers;
        // (Indices are u16 in a connection; u16::MAX means none.)
        if reuse.is_none() && servers.len() >= usize::from(u16::MAX) - 1 {
            return fail(format!("backend \"{}\" has {} servers, the most it can", new.server.backend, servers.len()));
        }
        if let Err((ip, e)) = crate::sources::verify_local(new.sources.iter().copied()) {
            return fail(format!("source {ip} is not an address of this host: {e}"));
        }
        let checked = config.backends[b].check.is_some();
        let server = crate::config::Server {
            name: new.server.server.clone(),
            address: new.address,
            weight: new.weight,
            maxconn: new.maxconn,
            sources: new.sources.clone(),
            // Checked like the backend's other servers, when it has a check.
            check: checked,
            send_proxy: None,
            backup: false,
            slowstart: new.slowstart,
        };
        let s = match reuse {
            Some(s) => {
                config.backends[b].servers[s] = server;
                s
            }
            None => {
                config.backends[b].servers.push(server);
                config.backends[b].servers.len() - 1
            }
        };
        let config = Arc::new(config);
        if let Err(e) = self.current.add_server(b, s, config.clone()) {
            return fail(e);
        }
        self.removed.remove(&(b, s));
        if config.backends[b].servers[s].check {
            self.current.health_change(crate::health::Change::Add { backend: b, server: s, config: config.clone() });
        }
        self.live_config = Some(config);
        eprintln!("ringproxy: runtime API: {}", command.line());
        self.runtime.push((format!("{} add", new.server), command.line()));
        let checked = if self.config().backends[b].check.is_some() {
            "health-checked like the backend's other servers"
        } else {
            "the backend has no health check"
        };
        Answer::Ok(format!(
            "{}: added; every worker balances new connections to it; {checked} (put it in the file to keep it \
             across reloads)\n",
            command.line()
        ))
    }

    /// The lowest index among backend `b`'s deleted servers that no connection names any more on
    /// any worker (none open, none still closing: the workers' rows say), for `add server` to
    /// take: what a deleted server leaves (its row, latency histogram, place in the balancer and
    /// block of addresses on each worker) is then the new server's instead of staying until the
    /// next reload, and adding and deleting servers all day grows nothing. None while an engine
    /// replaced by a reload drains: its connections move to this one by server index.
    fn reusable(&self, b: usize) -> Option<usize> {
        let mut deleted: Vec<usize> =
            self.removed.iter().filter(|&(&(rb, _), &quiet)| rb == b && quiet).map(|(&(_, s), _)| s).collect();
        if deleted.is_empty() || !self.draining.is_empty() {
            return None;
        }
        deleted.sort_unstable();
        let config = self.config();
        let first = config.backends[..b].iter().map(|be| be.servers.len()).sum::<usize>();
        let stats = self.current.stats_with(crate::stats::Detail::Servers);
        let unnamed = |s: usize| {
            stats
                .workers
                .iter()
                .all(|w| w.servers.get(first + s).is_some_and(|r| r.removed && r.active == 0 && r.lingering == 0))
        };
        deleted.into_iter().find(|&s| unnamed(s))
    }

    /// `del server`: refused while the server has a connection; first it is put in maintenance so
    /// that none can start while the workers are counted, and set back as it was if one is open.
    fn del_server(&mut self, name: &crate::admin::ServerName, command: &Command) -> Answer {
        let fail = |e: String| Answer::Fail(format!("{}: {e}\n", command.line()));
        let (b, s) = match self.find(name) {
            Ok(at) => at,
            Err(e) => return fail(e),
        };
        let config = self.config();
        let k = config.backends[..b].iter().map(|be| be.servers.len()).sum::<usize>() + s;
        let row = |stats: &EngineStats| -> (u64, Option<crate::stats::AdminState>) {
            let active = stats.workers.iter().filter_map(|w| w.servers.get(k)).map(|r| r.active).sum();
            (active, stats.workers.first().and_then(|w| w.servers.get(k)).map(|r| r.admin))
        };
        let (_, before) = row(&self.current.stats_with(Detail::Servers));
        if let Err(e) = self.current.server_op(b, s, ServerOp::State(crate::stats::AdminState::Maint)) {
            return fail(e);
        }
        let (active, _) = row(&self.current.stats_with(Detail::Servers));
        if active > 0 {
            let _ = self.current.server_op(b, s, ServerOp::State(before.unwrap_or_default()));
            return fail(format!(
                "it has {active} connection(s) open; `shutdown sessions server {name}` (or wait), then delete it"
            ));
        }
        if let Err(e) = self.current.server_op(b, s, ServerOp::Remove) {
            return fail(e);
        }
        // Its index may go to the next server added, once no connection names it any more and
        // the health checker has stopped checking it (else never: it stays taken until a reload).
        let quiet = self.current.health_remove(b, s);
        self.removed.insert((b, s), quiet);
        eprintln!("ringproxy: runtime API: {}", command.line());
        let (prefix, del) = (format!("{name} "), format!("{name} del"));
        if self.runtime.iter().any(|(key, _)| *key == format!("{name} add")) {
            // Added at run time: deleted, it leaves nothing behind (but the deletion of the file's
            // server of that name before it, if there was one).
            self.runtime.retain(|(key, _)| *key == del || !key.starts_with(&prefix));
        } else {
            // A server of the file: the deletion is a runtime change.
            self.runtime.retain(|(key, _)| !key.starts_with(&prefix));
            self.runtime.push((del, command.line()));
        }
        Answer::Ok(format!("{}: removed\n", command.line()))
    }

    /// What the stats sockets ring after handing over a command: the main loop waits on it beside
    /// the signals ([`sys::Signals::wait_or`]) and answers at once.
    pub fn doorbell(&self) -> &sys::EventFd {
        &self.bell
    }

    /// Answers the commands that came through the stats sockets.
    pub fn serve_requests(&mut self) {
        while let Ok(Request { command, reply }) = self.requests.try_recv() {
            let answer = self.command(&command);
            match (&command, &mut self.starting) {
                // Started: answered once it serves or has failed (`upgrade_started`).
                (Command::Upgrade { .. }, Some(st)) if matches!(answer, Answer::Ok(_)) => st.replies.push(reply),
                _ => {
                    let _ = reply.send(answer);
                }
            }
        }
    }

    /// Forgets engines that have finished draining; says what each did with its connections.
    pub fn reap(&mut self) -> Vec<Handover> {
        let mut done = Vec::new();
        let mut i = 0;
        while i < self.draining.len() {
            if self.draining[i].0.finished() {
                let (mut e, generation, at) = self.draining.swap_remove(i);
                e.join();
                let total = |f: fn(&crate::stats::WorkerStats) -> u64| e.exited().iter().map(f).sum::<u64>();
                done.push(Handover {
                    generation,
                    after: at.elapsed(),
                    moved: total(|w| w.moved_out),
                    closed: total(|w| w.closed),
                    refused: total(|w| w.move_refused),
                });
            } else {
                i += 1;
            }
        }
        done
    }

    /// Closes the listeners and drains everything, on the way out (shutdown); from now on `show
    /// ready` says so (and [`Supervisor::serve_requests`] must go on answering until
    /// [`Supervisor::finished`]).
    pub fn drain(&mut self) {
        self.stopping.get_or_insert_with(std::time::Instant::now);
        self.current.drain();
    }

    pub fn finished(&self) -> bool {
        self.current.finished() && self.draining.iter().all(|(e, _, _)| e.finished())
    }

    pub fn join(&mut self) {
        self.current.join();
        for (e, _, _) in &mut self.draining {
            e.join();
        }
    }
}

/// The client-side buffer sizes the listening sockets keep once `new` (read from `path`) applies
/// to them, `kept` being what they kept before: those `new` sets, and those it no longer sets but
/// an earlier configuration did. A reload or a binary upgrade keeps the listening sockets, and the
/// kernel keeps a size set on a socket until it closes, so a `tune.rcvbuf_client` /
/// `sndbuf_client` dropped from the file stays in force for new clients: each such size comes
/// with a warning saying so.
fn listener_buffers(path: &Path, kept: &[(String, u32)], new: &config::Config) -> (Vec<(String, u32)>, Vec<String>) {
    let (mut now, mut warnings) = (Vec::new(), Vec::new());
    for (key, set) in new.global.tune.buffer_sizes().into_iter().filter(|(key, _)| key.ends_with("_client")) {
        let size = match (set, kept.iter().find(|(k, _)| k == key)) {
            (Some(bytes), _) => bytes,
            (None, Some(&(_, bytes))) => {
                warnings.push(format!(
                    "{}: warning: tune.{key} is no longer set, but the listening sockets keep its {bytes} bytes for new clients until ringproxy restarts (a reload or an upgrade keeps them); set it to the size wanted instead",
                    path.display()
                ));
                bytes
            }
            (None, None) => continue,
        };
        now.push((key.to_owned(), size));
    }
    (now, warnings)
}
