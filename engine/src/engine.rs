//! The running engine: start (size, bind, spawn workers), observe (stats), stop (drain).
//!
//! Start-up does everything that can fail before any worker runs, in two halves. [`Engine::prepare`]
//! starts no thread: raise RLIMIT_NOFILE, size the workers to the host (plan.rs), check that source
//! addresses are local, bind every listener, drop privileges (privileges.rs). [`Prepared::launch`]
//! opens the connection log with the rights that are left, starts the helper threads (health
//! checks, log writer) under a [`Watch`], then the workers: each builds its own ring and reports
//! ready; if one cannot, the others are stopped and the error is returned. The engine is a library
//! object so tests can run it in-process; the binary adds signal handling around it.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, unbounded};

use crate::config::{BatchWait, Config};
use crate::control::{Control, Peer};
use crate::host;
use crate::listener::{self, Bound, ListenError, ListenerGroup};
use crate::log;
use crate::plan::{self, Plan};
use crate::privileges::{self, PrivilegeError};
use crate::sources;
use crate::stats::{Detail, EngineStats, ROWS_PER_TURN, WorkerStats, prometheus, socket};
use crate::sys::EventFd;
use crate::watch::Watch;
use crate::worker::{self, WorkerSetup};

/// Why an engine did not start. Nothing it had set up is left running.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot read RLIMIT_NOFILE: {0}")]
    Nofile(io::Error),
    #[error(
        "source {ip} cannot be used: {source}. Assign it to an interface first, e.g. `ip addr add {ip}/32 dev lo` \
         (or the interface facing the servers)"
    )]
    SourceNotLocal { ip: IpAddr, source: io::Error },
    #[error(transparent)]
    Privileges(#[from] PrivilegeError),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    ConnectionLog(#[from] log::OpenError),
    #[error(transparent)]
    StatsSocket(#[from] socket::ServeError),
    #[error("Prometheus endpoint {addr}: {source}")]
    Prometheus { addr: SocketAddr, source: io::Error },
    #[error("eventfd: {0}")]
    EventFd(io::Error),
    #[error("cannot start worker thread {id}: {source}")]
    Thread { id: usize, source: io::Error },
    #[error("cannot start the {name} thread: {source}")]
    Helper { name: &'static str, source: io::Error },
    #[error("a worker did not start within 30s")]
    WorkerTimeout,
    /// A worker could not set up its ring (the text says which worker and why).
    #[error("{0}")]
    Worker(String),
    #[error("probing io_uring's features: {0}")]
    IoFeatures(io::Error),
}

/// Collects snapshots from the workers; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct StatsSource {
    config: Arc<Config>,
    plan: Arc<Plan>,
    peers: Arc<Vec<Peer>>,
    started: std::time::Instant,
    /// Health-check results, when any server is checked.
    health: Option<Arc<std::sync::Mutex<Vec<crate::health::ServerHealth>>>>,
}

impl StatsSource {
    /// A snapshot of every worker's counters, server and source rows included (workers answer
    /// between two loop turns).
    pub fn collect(&self) -> EngineStats {
        self.collect_with(Detail::Full)
    }

    /// A snapshot of every worker's counters, with the server rows or without ([`Detail`]).
    pub fn collect_with(&self, detail: Detail) -> EngineStats {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut workers = self.snapshots(detail, deadline);
        // A server added while the rows were being copied moves the rows after it, and for a
        // moment some workers have it and some not (rows are merged by position): copy them
        // again until every worker gave all its rows and all have as many (`add server` is rare),
        // or the deadline has passed (then the rows as they came).
        let whole = |ws: &[WorkerStats]| {
            ws.iter()
                .all(|w| w.servers.len() == w.server_rows && ws.first().is_some_and(|f| f.server_rows == w.server_rows))
        };
        while detail != Detail::Totals && !whole(&workers) && std::time::Instant::now() < deadline {
            workers = self.snapshots(detail, deadline);
        }
        workers.sort_by_key(|w| w.worker);
        let mut stats = EngineStats {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            workers,
            configured_maxconn: self.plan.configured_maxconn,
            effective_maxconn: self.plan.maxconn,
            nofile: self.plan.nofile,
            ..EngineStats::default()
        };
        stats.aggregate(&self.config);
        if let Some(h) = &self.health {
            stats.health = h.lock().map(|v| v.clone()).unwrap_or_default();
        }
        stats
    }

    /// Every worker's snapshot; with [`Detail::Servers`] or [`Detail::Full`], its server rows (and
    /// with `Full` their sources) asked for one slice at a
    /// time (all workers at once), each slice a loop turn of its own ([`ROWS_PER_TURN`]). A worker
    /// whose row count changed between slices (a server added) is left with fewer rows than it
    /// counts, for the caller to ask again.
    fn snapshots(&self, detail: Detail, deadline: std::time::Instant) -> Vec<WorkerStats> {
        let first = match detail {
            Detail::Totals => 0..0,
            Detail::Servers | Detail::Full => 0..ROWS_PER_TURN,
        };
        let sources = detail == Detail::Full;
        let (_, mut workers) = crate::control::ask(self.peers.iter(), deadline, |reply| Control::Snapshot {
            rows: first.clone(),
            sources_from: 0,
            sources,
            reply,
        });
        if detail == Detail::Totals {
            return workers;
        }
        // Whether a worker has more to send: server rows, or the sources of its last one.
        let more = |w: &WorkerStats| w.servers.len() < w.server_rows || w.sources_next > 0;
        let mut open: Vec<usize> = (0..workers.len()).filter(|&i| more(&workers[i])).collect();
        while !open.is_empty() {
            let (tx, rx) = unbounded();
            let asked = open
                .iter()
                .filter(|&&i| {
                    let w = &workers[i];
                    // Inside a server's sources: that server's row again, from its next source.
                    let from = w.servers.len() - usize::from(w.sources_next > 0);
                    let rows = from..from + ROWS_PER_TURN;
                    let ask = Control::Snapshot { rows, sources_from: w.sources_next, sources, reply: tx.clone() };
                    self.peers.get(w.worker).is_some_and(|p| p.send(ask))
                })
                .count();
            drop(tx);
            open.clear();
            for slice in (0..asked).map_while(|_| rx.recv_deadline(deadline).ok()) {
                let Some(i) = workers.iter().position(|w| w.worker == slice.worker) else { continue };
                let w = &mut workers[i];
                if slice.server_rows != w.server_rows || (slice.servers.is_empty() && slice.sources.is_empty()) {
                    w.sources_next = 0;
                    continue; // (Rows moved: this worker's rows stop here.)
                }
                w.servers.extend(slice.servers);
                w.sources.extend(slice.sources);
                w.connect_latency.extend(slice.connect_latency);
                w.sources_next = slice.sources_next;
                if more(w) {
                    open.push(i);
                }
            }
        }
        for w in &mut workers {
            w.name_sources();
        }
        workers
    }
}

/// How to start an engine beyond its configuration.
#[derive(Default)]
pub struct StartOptions<'a> {
    /// Listening sockets of a previous engine, reused for addresses still configured (reload).
    pub inherit: &'a [ListenerGroup],
    /// Leave the stats socket and Prometheus endpoint to the caller (the supervisor keeps them
    /// across reloads).
    pub external_stats: bool,
}

pub struct Engine {
    config: Arc<Config>,
    listeners: Vec<ListenerGroup>,
    plan: Arc<Plan>,
    peers: Arc<Vec<Peer>>,
    threads: Vec<JoinHandle<Option<crate::stats::WorkerStats>>>,
    /// The workers' counters as they exited (filled by [`Engine::join`]).
    exited: Vec<crate::stats::WorkerStats>,
    bound: Vec<Bound>,
    source: StatsSource,
    stats_socket: Option<socket::Server>,
    metrics: Option<prometheus::Endpoint>,
    log_thread: Option<JoinHandle<()>>,
    health: Option<crate::health::HealthChecker>,
    /// A duplicate of each worker's ring descriptor, in worker order (the targets of a move).
    rings: Vec<Arc<std::os::fd::OwnedFd>>,
}

impl Engine {
    /// Starts the engine for a validated configuration. Returns once every worker accepts.
    pub fn start(config: Config) -> Result<Engine, StartError> {
        Engine::start_with(config, StartOptions::default())
    }

    /// Starts with options: inherited listeners (reload), stats served by the caller; helper
    /// threads report failures only to stderr (see [`Engine::prepare`] and [`Prepared::launch`]
    /// for a watched start).
    pub fn start_with(config: Config, opts: StartOptions) -> Result<Engine, StartError> {
        Engine::prepare(config, opts)?.launch(&Watch::detached())
    }

    /// The first half of a start, everything that may need privileges and starts no thread: raise
    /// RLIMIT_NOFILE, plan, check the sources, bind every listener; then drop privileges
    /// (`global.user`/`group`, capabilities: see privileges.rs).
    pub fn prepare(config: Config, opts: StartOptions) -> Result<Prepared, StartError> {
        let limit = host::raise_nofile().map_err(StartError::Nofile)?;
        let ports = host::ephemeral_ports().unwrap_or(28_232);
        let mut plan = plan::plan(&config, limit.soft, &host::usable_cpus(), ports);
        (plan.io, plan.io_chosen) =
            crate::features::effective(config.global.tune.io_features).map_err(StartError::IoFeatures)?;
        if !plan.io.min_wait {
            // `auto` (the default) becomes off quietly: only a window asked for is worth a warning.
            if let BatchWait::Every(_) = plan.batch_wait {
                plan.warnings.push(
                    "tune.batch_wait needs io_uring's min_wait_usec (Linux 6.12), which this io_uring feature set \
                     lacks: not applied, every event wakes its worker"
                        .to_owned(),
                );
            }
            plan.batch_wait = BatchWait::Off;
        }
        sources::verify_local(config.backends.iter().flat_map(|b| b.servers.iter().flat_map(|s| s.sources.clone())))
            .map_err(|(ip, source)| StartError::SourceNotLocal { ip, source })?;
        let ids = match &config.global.user {
            Some(user) => Some(privileges::resolve(user, config.global.group.as_deref())?),
            None => None,
        };
        let (listeners, bound, groups) = listener::bind_all(&config, plan.workers, opts.inherit)?;
        privileges::drop_after_binding(ids)?;
        Ok(Prepared { config, plan, ids, listeners, bound, groups, external_stats: opts.external_stats })
    }
}

/// An engine bound and without privileges, not yet running: [`Engine::prepare`], then
/// [`Prepared::launch`]. Dropping it closes the listeners it bound.
pub struct Prepared {
    config: Config,
    plan: Plan,
    ids: Option<privileges::Ids>,
    listeners: Vec<Vec<crate::worker::Listener>>,
    bound: Vec<Bound>,
    groups: Vec<ListenerGroup>,
    external_stats: bool,
}

impl Prepared {
    /// The second half: opens the connection log (with the rights the engine now has), starts the
    /// helper threads under `watch`, then the workers. Returns once every worker accepts.
    pub fn launch(self, watch: &Watch) -> Result<Engine, StartError> {
        let Prepared { config, plan, ids, listeners, bound, groups, external_stats } = self;
        let (log_sink, log_thread) = match &config.global.connection_log {
            Some(target) => {
                let out = log::open(target)?;
                let (sink, thread) =
                    log::spawn(out, watch).map_err(|source| StartError::Helper { name: "ringproxy-log", source })?;
                (Some(sink), Some(thread))
            }
            None => (None, None),
        };

        let config = Arc::new(config);
        let plan = Arc::new(plan);
        let mut receivers = Vec::new();
        let mut peers = Vec::new();
        for _ in 0..plan.workers {
            let (tx, rx) = unbounded();
            let wake = Arc::new(EventFd::new().map_err(StartError::EventFd)?);
            peers.push(Peer { tx, wake });
            receivers.push(rx);
        }
        let peers = Arc::new(peers);
        // Checks may report before the workers run: their messages wait in the channels.
        let health = crate::health::spawn(&config, peers.clone(), watch)
            .map_err(|source| StartError::Helper { name: "ringproxy-health", source })?;
        let source = StatsSource {
            config: config.clone(),
            plan: plan.clone(),
            peers: peers.clone(),
            started: std::time::Instant::now(),
            health: health.as_ref().map(|h| h.status.clone()),
        };
        let stats_socket = match &config.global.stats.socket {
            Some(_) if external_stats => None,
            Some(path) => {
                let src = source.clone();
                let mode = config.global.stats.mode;
                Some(socket::serve(
                    path,
                    mode,
                    move |detail| src.collect_with(detail),
                    None,
                    socket::Level::Read,
                    ids,
                    watch,
                )?)
            }
            None => None,
        };
        let metrics = match config.global.stats.prometheus {
            Some(_) if external_stats => None,
            Some(addr) => {
                let src = source.clone();
                Some(
                    prometheus::serve(addr, move || src.collect(), watch)
                        .map_err(|source| StartError::Prometheus { addr, source })?,
                )
            }
            None => None,
        };
        let (ready_tx, ready_rx) = bounded(plan.workers);
        let mut threads = Vec::new();
        for (id, (rx, listeners)) in receivers.into_iter().zip(listeners).enumerate() {
            let setup = WorkerSetup {
                id,
                config: config.clone(),
                plan: plan.clone(),
                listeners,
                rx,
                wake: peers[id].wake.clone(),
                peers: peers.clone(),
                log: log_sink.clone(),
            };
            let ready = ready_tx.clone();
            let t = std::thread::Builder::new()
                .name(format!("ringproxy-w{id}"))
                .spawn(move || worker::run(setup, ready))
                .map_err(|source| StartError::Thread { id, source })?;
            threads.push(t);
        }
        drop(log_sink);
        let mut engine = Engine {
            config,
            listeners: groups,
            plan,
            peers,
            threads,
            bound,
            source,
            stats_socket,
            metrics,
            log_thread,
            health,
            rings: Vec::new(),
            exited: Vec::new(),
        };
        let mut rings = Vec::with_capacity(engine.plan.workers);
        for _ in 0..engine.plan.workers {
            let started = match ready_rx.recv_timeout(Duration::from_secs(30)) {
                Ok(reported) => reported.map_err(StartError::Worker),
                Err(_) => Err(StartError::WorkerTimeout),
            };
            match started {
                Ok(ring) => rings.push(ring),
                Err(e) => {
                    engine.drain();
                    engine.join();
                    return Err(e);
                }
            }
        }
        rings.sort_by_key(|(id, _)| *id);
        engine.rings = rings.into_iter().map(|(_, fd)| Arc::new(fd)).collect();
        Ok(engine)
    }
}

impl Engine {
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The configuration as loaded (shared).
    pub fn config_arc(&self) -> Arc<Config> {
        self.config.clone()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The addresses the engine listens on (with real ports where the configuration said 0).
    pub fn bound(&self) -> &[Bound] {
        &self.bound
    }

    /// The listening addresses of one frontend.
    pub fn addrs(&self, frontend: &str) -> Vec<std::net::SocketAddr> {
        self.bound.iter().filter(|b| b.frontend == frontend).map(|b| b.addr).collect()
    }

    /// A snapshot of every worker's counters (workers answer between two loop turns).
    pub fn stats(&self) -> EngineStats {
        self.source.collect()
    }

    /// A snapshot with the server rows or without ([`Detail`]).
    pub fn stats_with(&self, detail: Detail) -> EngineStats {
        self.source.collect_with(detail)
    }

    /// A handle for collecting stats from another thread.
    pub fn stats_source(&self) -> StatsSource {
        self.source.clone()
    }

    /// Where the Prometheus endpoint listens, if configured.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(|m| m.addr())
    }

    /// This engine's listening sockets, for a successor to share (reload). The workers keep
    /// accepting on them until this engine is drained.
    pub fn listeners(&self) -> &[ListenerGroup] {
        &self.listeners
    }

    /// Stops accepting everywhere; workers exit once their connections are done or the drain
    /// timeout passed. Listening sockets not handed to a successor close with the workers' copies.
    pub fn drain(&mut self) {
        self.listeners.clear();
        for p in self.peers.iter() {
            p.send(Control::Drain);
        }
    }

    /// Where this engine's connections can move: its configuration, and per worker its control
    /// channel and ring (worker/moving.rs).
    pub fn move_plan(&self) -> Arc<crate::worker::MovePlan> {
        let targets = self
            .peers
            .iter()
            .zip(&self.rings)
            .map(|(peer, ring)| crate::worker::MoveTarget { peer: peer.clone(), ring: ring.clone() })
            .collect();
        Arc::new(crate::worker::MovePlan { config: self.config.clone(), targets })
    }

    /// A reload: stops accepting (as [`Engine::drain`]) and moves the established connections to
    /// `next`, the engine that replaces this one, instead of closing them at the end of the drain.
    /// Those that cannot move (their server is gone from `next`'s configuration, or `next` has no
    /// room) stay until they end or the drain ends. Also for an engine already draining: what it
    /// has left moves to `next`.
    pub fn move_to(&mut self, next: &Engine) {
        self.listeners.clear();
        let plan = next.move_plan();
        for p in self.peers.iter() {
            p.send(Control::MoveTo(plan.clone()));
        }
    }

    /// A binary upgrade: stops accepting and hands the established connections to `plan`'s
    /// courier (upgrade.rs). The listening sockets stay in this engine's hands until it is
    /// dropped, so that a failed upgrade can start a fresh engine on them.
    pub fn export_to(&self, plan: Arc<crate::worker::ExportPlan>) {
        for p in self.peers.iter() {
            p.send(Control::ExportTo(plan.clone()));
        }
    }

    /// The workers' control channels.
    pub fn peers(&self) -> Arc<Vec<Peer>> {
        self.peers.clone()
    }

    /// Makes every worker cancel and re-arm its accepts (after a predecessor stopped accepting on
    /// the same sockets): re-arming accepts whatever waits in the backlogs.
    pub fn rearm_accepts(&self) {
        for p in self.peers.iter() {
            p.send(Control::RearmAccepts);
        }
    }

    /// Applies a runtime-API change to server `server` of backend `backend` on every worker, and
    /// returns once each has applied it (at its next loop turn), or says which did not within 10 s.
    pub fn server_op(&self, backend: usize, server: usize, op: crate::admin::ServerOp) -> Result<(), String> {
        self.ask_every_worker("applied it", |done| Control::Server { backend, server, op, done })
    }

    /// `add server`: hands every worker `config` (the running one with the new server as server
    /// `server` of backend `backend`: appended, or in the place of a deleted server no connection
    /// names any more) and returns once each has set the server up, or says which did not within
    /// 10 s.
    pub fn add_server(&self, backend: usize, server: usize, config: Arc<Config>) -> Result<(), String> {
        let srv = config.backends.get(backend).and_then(|b| b.servers.get(server)).ok_or("no server to add")?;
        // Each worker's block of addresses and source shard are made here, not in its loop: with a
        // /16 of sources that is 32,768 addresses per worker (14 ms on a worker, measured).
        let (workers, ports) = (self.plan.workers, self.plan.ephemeral_ports);
        let mut made = (0..self.peers.len())
            .map(|w| Box::new(crate::sources::ServerAddrs::new(srv.address, &srv.sources, w, workers, ports)));
        self.ask_every_worker("added it", |done| Control::AddServer {
            backend,
            server,
            config: config.clone(),
            addrs: made.next().unwrap_or_else(|| unreachable!("one per worker")),
            done,
        })
    }

    /// A change every worker must acknowledge: `Err` says how many did (`did` what).
    fn ask_every_worker(
        &self,
        did: &str,
        make: impl FnMut(crossbeam_channel::Sender<()>) -> Control,
    ) -> Result<(), String> {
        let n = self.peers.len();
        let (asked, answers) = crate::control::ask_all(&self.peers, Duration::from_secs(10), make);
        if asked < n || answers.len() < asked {
            return Err(format!(
                "{} of {n} workers {did} ({} have exited, the others did not answer within 10s)",
                answers.len(),
                n - asked
            ));
        }
        Ok(())
    }

    /// Tells the health checker (when the engine has one) of a server added at run time.
    pub fn health_change(&self, change: crate::health::Change) {
        if let Some(h) = &self.health {
            h.change(change);
        }
    }

    /// Tells the health checker (when the engine has one) that server `server` of backend
    /// `backend` was deleted, and waits until it has stopped checking it (the change wakes it):
    /// false if it did not say so within 2 s. Until it has, a result of the server's last
    /// check may still reach the workers, and its index must not be given to another server.
    pub fn health_remove(&self, backend: usize, server: usize) -> bool {
        let Some(h) = &self.health else { return true };
        let (done, heard) = crossbeam_channel::bounded(1);
        h.change(crate::health::Change::Remove { backend, server, done });
        heard.recv_timeout(Duration::from_secs(2)).is_ok()
    }

    /// Up to `limit` connections (those `filter` matches), from all workers: worker 0's first.
    /// Each worker lists its connections a slice per loop turn ([`crate::control::CONNS_SCANNED_PER_TURN`]),
    /// all workers at once, so the list is not one instant's: a connection that opens or closes
    /// meanwhile may be in it or not, and none is in it twice.
    pub fn list_conns(&self, filter: crate::admin::ConnMatch, limit: usize) -> Vec<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let n = self.peers.len();
        let mut lines: Vec<Vec<String>> = vec![Vec::new(); n];
        // Where each worker's next slice starts in its connection table; `None`: it is done.
        let mut next: Vec<Option<u32>> = vec![Some(0); n];
        loop {
            // Those with more to look at that still count: fewer than `limit` lines, and fewer
            // than `limit` before them (worker 0's are listed first).
            let mut before = 0;
            let mut open = Vec::new();
            for w in 0..n {
                if next[w].is_some() && before < limit && lines[w].len() < limit {
                    open.push(w);
                }
                before += lines[w].len();
            }
            if open.is_empty() || std::time::Instant::now() >= deadline {
                break;
            }
            let (tx, rx) = unbounded();
            let mut asked = 0;
            for w in open {
                let ask = Control::ListConns {
                    filter,
                    from: next[w].unwrap_or_default(),
                    limit: limit - lines[w].len(),
                    reply: tx.clone(),
                };
                if self.peers[w].send(ask) {
                    asked += 1;
                } else {
                    next[w] = None; // (Exited.)
                }
            }
            drop(tx);
            for (w, mut got, more) in (0..asked).map_while(|_| rx.recv_deadline(deadline).ok()) {
                lines[w].append(&mut got);
                next[w] = more;
            }
        }
        lines.into_iter().flatten().take(limit).collect()
    }

    /// Whether every worker has exited.
    pub fn finished(&self) -> bool {
        self.threads.iter().all(|t| t.is_finished())
    }

    /// Waits for every worker to exit, then for the connection log to be written out.
    pub fn join(&mut self) {
        for t in self.threads.drain(..) {
            if let Ok(Some(stats)) = t.join() {
                self.exited.push(stats);
            }
        }
        if let Some(t) = self.log_thread.take() {
            let _ = t.join();
        }
        self.stats_socket = None;
        self.metrics = None;
        self.health = None;
        self.rings.clear();
    }

    /// The workers' counters as they exited (after [`Engine::join`]): what a drained engine did.
    pub fn exited(&self) -> &[crate::stats::WorkerStats] {
        &self.exited
    }

    /// Drain, then wait.
    pub fn shutdown(mut self) {
        self.drain();
        self.join();
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.drain();
        }
        self.join();
    }
}
