//! One worker per core: its ring, its listeners, its connections, its counters. Shares nothing.
//!
//! The event loop: submit everything queued and wait for a completion or the next timer tick, copy
//! the completions out, handle each (which queues new SQEs), fire due timers, send control messages
//! to other workers. Completions are routed by their [`token::Token`]: worker ops here, connection
//! ops to conn.rs. Nothing in the loop blocks, locks or allocates per byte.
//!
//! Admission: an accepted socket is admitted against this worker's share of the global and frontend
//! maxconn (limits.rs). Without a share the socket is parked (accepted, not proxied), the worker
//! stops accepting, so further clients wait in the kernel backlog, and asks the other workers for
//! share; it resumes when a parked socket could be admitted. A worker keeps accepting right up to
//! the first socket it must park, because that socket is what tells it there is demand.

pub mod dispatch;
pub mod proxy_header;
pub mod ring;
pub mod timer;
pub mod token;

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::balance::Balancer;
use crate::config::Config;
use crate::conn::{CloseReason, Dir, Slab};
use crate::control::{Control, EventFd, Peer};
use crate::limits::{LimitId, ShareMsg, Shares};
use crate::log::{ConnLog, LogSink};
use crate::pipes::PipePool;
use crate::plan::Plan;
use crate::sources::{self, SourceShard};
use crate::stats::{Latency, ServerStats, SourceStats, WorkerStats, latency_histogram};
use hdrhistogram::Histogram;
use ring::{AddrId, Completion, Ring, RingSetup, TimeoutId};
use timer::TimerWheel;
use token::{Op, Token};

/// A listening socket owned by one worker.
pub struct Listener {
    pub frontend: usize,
    pub fd: OwnedFd,
    pub ipv6: bool,
    /// The bound address (a wildcard IP for `0.0.0.0` / `[::]` binds).
    pub addr: std::net::SocketAddr,
}

pub(crate) struct ListenerState {
    pub frontend: usize,
    /// `None` once closed (drain); the kernel socket lives on while another engine holds it.
    pub fd: Option<OwnedFd>,
    pub ipv6: bool,
    pub addr: std::net::SocketAddr,
    /// An accept is in flight (multishot, or a single one when `single`).
    pub armed: bool,
    pub single: bool,
    /// A cancel of that accept is in flight.
    pub cancelling: bool,
    /// Closed after drain.
    pub closed: bool,
    /// After an unexpected accept error, do not re-arm before this time (worker clock, ms).
    pub retry_at: u64,
    /// When the last accept error was logged, and how many were not logged since.
    pub logged_at: Option<u64>,
    pub unlogged: u64,
}

/// Back-off after an unexpected accept error, so a persistent one cannot spin the loop.
const ACCEPT_RETRY_MS: u64 = 100;
/// At most one log line per listener per this interval for repeated accept errors.
const ACCEPT_LOG_MS: u64 = 10_000;

pub(crate) struct ServerState {
    /// Takes new connections (health checks may say otherwise).
    pub up: bool,
    pub dest: AddrId,
    pub sources: SourceShard,
    pub active: u32,
    pub total: u64,
    pub errors: u64,
    pub limit: Option<LimitId>,
}

pub(crate) struct BackendState {
    pub balancer: Balancer,
    pub servers: Vec<ServerState>,
    /// Connections waiting for a server slot: (index, generation).
    pub queue: VecDeque<(u32, u32)>,
    pub limit: Option<LimitId>,
    pub connect_timeout: TimeoutId,
}

/// Everything a worker thread starts from.
pub struct WorkerSetup {
    pub id: usize,
    pub config: Arc<Config>,
    pub plan: Arc<Plan>,
    pub listeners: Vec<Listener>,
    pub rx: Receiver<Control>,
    pub wake: Arc<EventFd>,
    pub peers: Arc<Vec<Peer>>,
    /// Where connection log lines go (None: not logging).
    pub log: Option<LogSink>,
}

pub struct Worker {
    pub(crate) id: usize,
    pub(crate) cfg: Arc<Config>,
    pub(crate) plan: Arc<Plan>,
    pub(crate) ring: Ring,
    pub(crate) conns: Slab,
    pub(crate) listeners: Vec<ListenerState>,
    /// Accepted sockets waiting for a global/frontend share: (listener, fixed slot).
    pub(crate) parked: VecDeque<(u16, u32)>,
    pub(crate) backends: Vec<BackendState>,
    pub(crate) shares: Shares,
    pub(crate) pipes: PipePool,
    pub(crate) pipe_waiters: VecDeque<(u32, u32, Dir)>,
    pub(crate) timers: TimerWheel,
    /// Free fixed-file slots for server sockets.
    pub(crate) server_slots: Vec<u32>,
    /// Accept-range slots holding a client socket (open, parked, or closing) or reserved by a
    /// single accept in flight.
    pub(crate) client_slots: u32,
    pub(crate) outbox: Vec<(u16, ShareMsg)>,
    pub(crate) stats: WorkerStats,
    pub(crate) stale_completions: u64,
    /// Worker clock: milliseconds and microseconds since the worker started.
    pub(crate) now: u64,
    pub(crate) now_us: u64,
    /// Index of each backend's first server in the flattened per-server tables.
    pub(crate) server_index: Vec<usize>,
    pub(crate) connect_latency: Vec<Histogram<u64>>,
    pub(crate) log: Option<ConnLog>,
    /// Per frontend: whether a connection needs its client address looked up (balance source,
    /// connection logs, PROXY protocol); without, it goes straight to a server.
    pub(crate) needs_peer: Vec<bool>,
    started: Instant,
    rx: Receiver<Control>,
    wake: Arc<EventFd>,
    peers: Arc<Vec<Peer>>,
    /// Drain deadline (worker clock, ms) once a drain began.
    draining: Option<u64>,
}

/// Asks the kernel to cancel listener `i`'s accept; its final completion clears `armed`.
fn cancel_accept(ring: &mut Ring, l: &mut ListenerState, i: usize) {
    l.cancelling = true;
    ring.cancel(Token::worker(Op::Accept, i as u32), Token::worker(Op::AcceptCancel, i as u32));
}

/// Runs a worker on the current thread until it has drained. `ready` gets `Ok` once the ring is up
/// and the listeners accept, or the reason it could not start.
pub fn run(setup: WorkerSetup, ready: Sender<Result<(), String>>) {
    let id = setup.id;
    let mut worker = match Worker::new(setup) {
        Ok(w) => w,
        Err(e) => {
            let _ = ready.send(Err(format!("worker {id}: {e}")));
            return;
        }
    };
    worker.update_listeners();
    if let Err(e) = worker.ring.submit() {
        let _ = ready.send(Err(format!("worker {id}: first submit: {e}")));
        return;
    }
    let _ = ready.send(Ok(()));
    if let Err(e) = worker.event_loop() {
        eprintln!("ringproxy: worker {id}: io_uring failed: {e}; its connections are closed");
    }
}

impl Worker {
    fn new(setup: WorkerSetup) -> std::io::Result<Worker> {
        let WorkerSetup { id, config, plan, listeners, rx, wake, peers, log } = setup;
        let cpu = plan.cpus[id];
        if let Some(cpu) = cpu {
            core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
        }
        // Address and timeout tables for the connect chains: every server, this worker's sources.
        let mut addrs = Vec::new();
        let mut timeouts = Vec::new();
        let mut backends = Vec::with_capacity(config.backends.len());
        for (b, be) in config.backends.iter().enumerate() {
            let connect_timeout = TimeoutId(timeouts.len() as u32);
            timeouts.push(be.connect_timeout);
            let mut servers = Vec::with_capacity(be.servers.len());
            for (s, srv) in be.servers.iter().enumerate() {
                let dest = AddrId(addrs.len() as u32);
                addrs.push(srv.address);
                let picked = sources::shard(srv.sources.len(), id, plan.workers);
                let ips: Vec<_> = picked.iter().map(|&i| srv.sources[i]).collect();
                let ids = ips
                    .iter()
                    .map(|ip| {
                        addrs.push(std::net::SocketAddr::new(*ip, 0));
                        AddrId(addrs.len() as u32 - 1)
                    })
                    .collect();
                servers.push(ServerState {
                    up: true,
                    dest,
                    sources: SourceShard::new(ips, ids, plan.ephemeral_ports),
                    active: 0,
                    total: 0,
                    errors: 0,
                    limit: plan.limits.server[b][s],
                });
            }
            let weights = be.servers.iter().map(|s| s.weight).collect();
            backends.push(BackendState {
                balancer: Balancer::new(be.balance, weights, id),
                servers,
                queue: VecDeque::new(),
                limit: plan.limits.backend[b],
                connect_timeout,
            });
        }
        let ring = Ring::new(RingSetup {
            entries: config.global.tune.ring_entries,
            files: plan.table_slots,
            accept_slots: plan.accept_slots,
            iowq_workers: config.global.tune.iowq_workers,
            cpu,
            addrs,
            timeouts,
            max_chunks: plan.pipes_per_worker as usize,
        })?;
        let caps = plan.limits.totals.iter().map(|&t| t.min(plan.conns_per_worker)).collect();
        let shares = Shares::new(&plan.limits, id, plan.workers, caps);
        let stats = WorkerStats {
            worker: id,
            cpu,
            servers: config
                .backends
                .iter()
                .flat_map(|b| {
                    b.servers.iter().map(|s| ServerStats {
                        backend: b.name.clone(),
                        server: s.name.clone(),
                        address: s.address.to_string(),
                        state: "UP".into(),
                        maxconn: u64::from(s.maxconn.unwrap_or(0)),
                        ..ServerStats::default()
                    })
                })
                .collect(),
            ..WorkerStats::default()
        };
        let started = Instant::now();
        let mut server_index = Vec::with_capacity(config.backends.len());
        let mut n = 0;
        for b in &config.backends {
            server_index.push(n);
            n += b.servers.len();
        }
        let mut w = Worker {
            id,
            cfg: config.clone(),
            ring,
            conns: Slab::with_capacity(plan.conns_per_worker as usize),
            listeners: listeners
                .into_iter()
                .map(|l| ListenerState {
                    frontend: l.frontend,
                    fd: Some(l.fd),
                    ipv6: l.ipv6,
                    addr: l.addr,
                    armed: false,
                    single: false,
                    cancelling: false,
                    closed: false,
                    retry_at: 0,
                    logged_at: None,
                    unlogged: 0,
                })
                .collect(),
            parked: VecDeque::new(),
            backends,
            shares,
            pipes: PipePool::new(plan.pipes_per_worker, config.global.tune.pipe_size),
            pipe_waiters: VecDeque::new(),
            timers: TimerWheel::new(0),
            server_slots: (plan.accept_slots..plan.table_slots).rev().collect(),
            client_slots: 0,
            outbox: Vec::new(),
            stats,
            stale_completions: 0,
            now: 0,
            now_us: 0,
            server_index,
            connect_latency: (0..n).map(|_| latency_histogram()).collect(),
            needs_peer: config
                .frontends
                .iter()
                .map(|f| {
                    let be = &config.backends[f.backend];
                    f.accept_proxy
                        || config.global.connection_log.is_some()
                        || be.balance == crate::config::Balance::Source
                        || be.servers.iter().any(|s| s.send_proxy.is_some())
                })
                .collect(),
            log: log.map(ConnLog::new),
            started,
            rx,
            wake,
            peers,
            draining: None,
            plan,
        };
        let fd = w.wake.fd();
        w.ring.read_wake(fd, Token::worker(Op::Wake, 0));
        Ok(w)
    }

    fn event_loop(&mut self) -> std::io::Result<()> {
        let mut completions: Vec<Completion> = Vec::with_capacity(4096);
        let mut expired: Vec<u32> = Vec::new();
        loop {
            let mut sleep = self.timers.sleep_ms(self.now, 1000);
            for l in self.listeners.iter().filter(|l| !l.armed && !l.closed && l.retry_at > self.now) {
                sleep = sleep.min(l.retry_at - self.now);
            }
            self.ring.submit_and_wait(Some(Duration::from_millis(sleep)))?;
            let woke = Instant::now();
            self.now_us = woke.duration_since(self.started).as_micros() as u64;
            self.now = self.now_us / 1000;
            self.ring.drain(&mut completions);
            for c in completions.drain(..) {
                self.on_completion(c);
            }
            if !self.pipe_waiters.is_empty() {
                self.serve_pipe_waiters();
            }
            self.timers.expire(self.now, &mut self.conns, &mut expired);
            for idx in expired.drain(..) {
                self.on_timer(idx);
            }
            self.check_drain();
            if self.listeners.iter().any(|l| !l.armed && !l.closed && l.retry_at != 0 && l.retry_at <= self.now) {
                self.update_listeners();
            }
            self.flush_outbox();
            if let Some(log) = &mut self.log {
                log.maybe_flush(self.now, false);
            }
            self.stats.loop_iterations += 1;
            self.stats.busy_ns += woke.elapsed().as_nanos() as u64;
            if self.finished() {
                if let Some(log) = &mut self.log {
                    log.maybe_flush(self.now, true);
                }
                self.ring.submit()?;
                return Ok(());
            }
        }
    }

    fn on_completion(&mut self, c: Completion) {
        let Some(t) = Token::decode(c.user_data) else {
            self.stale_completions += 1;
            return;
        };
        if !t.op.is_worker_op() {
            self.on_conn_completion(t, c.result, c.more());
            return;
        }
        match t.op {
            Op::Accept => self.on_accept(t.index as u16, c),
            Op::AcceptCancel | Op::Cancel => {}
            Op::Wake => {
                let fd = self.wake.fd();
                self.ring.read_wake(fd, Token::worker(Op::Wake, 0));
                self.on_control();
            }
            Op::CloseFixed => {
                if t.index >= self.plan.accept_slots && t.index < self.plan.table_slots {
                    self.server_slots.push(t.index);
                    if self.server_slots.len() == 1 {
                        // Connections may be waiting for a server slot.
                        self.drain_queues();
                    }
                } else if t.index < self.plan.accept_slots {
                    self.client_slots = self.client_slots.saturating_sub(1);
                    if self.listeners.iter().any(|l| !l.armed && !l.closed) {
                        self.update_listeners();
                    }
                }
            }
            _ => unreachable!("connection op {:?} routed to the worker", t.op),
        }
    }

    fn on_accept(&mut self, listener: u16, c: Completion) {
        let l = &mut self.listeners[listener as usize];
        if l.single {
            // The slot reserved for this accept is either used now (counted below) or not at all.
            self.client_slots = self.client_slots.saturating_sub(1);
        }
        let l = &mut self.listeners[listener as usize];
        if !c.more() {
            l.armed = false;
            l.single = false;
            l.cancelling = false;
        }
        if c.result < 0 {
            match -c.result {
                libc::ECANCELED => {}
                // The accept range of the file table is full: wait for a close to free a slot.
                libc::ENFILE | libc::EMFILE => {
                    self.stats.limit_hits.global += 1;
                    l.retry_at = self.now + ACCEPT_RETRY_MS;
                }
                e => {
                    l.retry_at = self.now + ACCEPT_RETRY_MS;
                    if l.logged_at.is_none_or(|t| self.now >= t + ACCEPT_LOG_MS) {
                        eprintln!(
                            "ringproxy: worker {}: accept on frontend \"{}\" failed: {} ({} more since the last report); retrying",
                            self.id,
                            self.cfg.frontends[l.frontend].name,
                            std::io::Error::from_raw_os_error(e),
                            l.unlogged
                        );
                        l.logged_at = Some(self.now);
                        l.unlogged = 0;
                    } else {
                        l.unlogged += 1;
                    }
                }
            }
            self.update_listeners();
            return;
        }
        let slot = c.result as u32;
        self.client_slots += 1;
        // A connection the kernel handed over is served even when a drain has begun (the accept
        // was cancelled, but completions already on their way still arrive).
        if !self.parked.is_empty() {
            self.park(listener, slot);
        } else {
            self.admit(listener, slot);
        }
        if !c.more() {
            self.update_listeners();
        }
    }

    /// The limits a connection on `frontend` is admitted against.
    fn admission_limits(&self, frontend: usize) -> ([LimitId; 2], usize) {
        match self.plan.limits.frontend[frontend] {
            Some(f) => ([self.plan.limits.global, f], 2),
            None => ([self.plan.limits.global, 0], 1),
        }
    }

    fn admit(&mut self, listener: u16, slot: u32) {
        let frontend = self.listeners[listener as usize].frontend;
        let (ids, n) = self.admission_limits(frontend);
        if self.shares.take_all(&ids[..n]) {
            self.open_conn(listener, slot);
        } else {
            self.park(listener, slot);
        }
    }

    /// Holds an accepted socket that cannot be admitted yet and stops the listeners concerned.
    fn park(&mut self, listener: u16, slot: u32) {
        let frontend = self.listeners[listener as usize].frontend;
        let (ids, n) = self.admission_limits(frontend);
        for &id in &ids[..n] {
            if !self.shares.has_room(id) {
                if id == self.plan.limits.global {
                    self.stats.limit_hits.global += 1;
                } else {
                    self.stats.limit_hits.frontend += 1;
                }
                self.shares.want(id, &mut self.outbox);
            }
        }
        self.parked.push_back((listener, slot));
        self.stats.parked = self.parked.len() as u64;
        self.update_listeners();
    }

    /// Admits parked sockets while shares allow; then lets the listeners accept again.
    pub(crate) fn admit_parked(&mut self) {
        while let Some(&(listener, slot)) = self.parked.front() {
            let frontend = self.listeners[listener as usize].frontend;
            let (ids, n) = self.admission_limits(frontend);
            if !self.shares.take_all(&ids[..n]) {
                break;
            }
            self.parked.pop_front();
            self.open_conn(listener, slot);
        }
        self.stats.parked = self.parked.len() as u64;
        if self.parked.is_empty() {
            let global = self.plan.limits.global;
            self.shares.satisfied(global);
            for f in self.plan.limits.frontend.iter().flatten() {
                self.shares.satisfied(*f);
            }
        }
        self.update_listeners();
    }

    /// Arms the accept of every listener that may take connections, cancels the others.
    pub(crate) fn update_listeners(&mut self) {
        // Slots promised in this pass to the multishot accepts of earlier listeners.
        let mut reserved: u32 = 0;
        for i in 0..self.listeners.len() {
            // Accept until a connection has to be parked: that parked connection is the demand that
            // makes the worker borrow share (clients waiting in the kernel backlog are invisible).
            let should = self.draining.is_none() && self.parked.is_empty();
            let now = self.now;
            let free = self.plan.accept_slots.saturating_sub(self.client_slots);
            let l = &mut self.listeners[i];
            let Some(fd) = l.fd.as_ref().map(|f| f.as_raw_fd()) else { continue };
            if l.closed {
                continue;
            }
            // A multishot accept may take its listener's whole backlog at once; the kernel drops a
            // connection it has no slot for. Listeners whose margin does not fit in what the earlier
            // ones left accept one connection at a time instead.
            let margin = self.plan.multishot_margin[l.frontend];
            let roomy = free.saturating_sub(reserved) >= margin;
            if roomy {
                reserved += margin;
            }
            if should && !l.armed && l.retry_at <= now && free > 0 {
                l.retry_at = 0;
                l.armed = true;
                if roomy {
                    self.ring.accept_multi(fd, Token::worker(Op::Accept, i as u32));
                } else {
                    l.single = true;
                    self.client_slots += 1;
                    self.ring.accept_once(fd, Token::worker(Op::Accept, i as u32));
                }
            } else if l.armed && !l.cancelling && (!should || (!l.single && !roomy)) {
                // A drain or a parked connection cancels any accept; a multishot one also goes when
                // slots run short (a single accept already holds the slot it will use).
                cancel_accept(&mut self.ring, l, i);
            }
        }
    }

    /// Cancels every armed accept; each re-arms when its cancellation completes (`on_accept`), and a
    /// fresh accept takes whatever already waits in the backlog.
    fn rearm_accepts(&mut self) {
        for (i, l) in self.listeners.iter_mut().enumerate() {
            if l.armed && !l.cancelling && !l.closed {
                cancel_accept(&mut self.ring, l, i);
            }
        }
    }

    /// Gives back the global/frontend share of a closing connection and lets a parked one in.
    pub(crate) fn release_admission(&mut self, idx: u32) {
        let c = self.conns.at(idx);
        if !c.admitted {
            return;
        }
        c.admitted = false;
        let frontend = c.frontend as usize;
        let (ids, n) = self.admission_limits(frontend);
        for &id in &ids[..n] {
            self.shares.release(id, &mut self.outbox);
        }
        if !self.parked.is_empty() {
            self.admit_parked();
        } else if self.listeners.iter().any(|l| !l.armed && !l.closed) {
            self.update_listeners();
        }
    }

    fn on_control(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                Control::Share(m) => {
                    if self.shares.on_message(m, &mut self.outbox) {
                        self.admit_parked();
                        self.drain_queues();
                    }
                }
                Control::Snapshot(reply) => {
                    let _ = reply.send(self.snapshot());
                }
                Control::Drain => self.start_drain(),
                Control::RearmAccepts => self.rearm_accepts(),
                Control::ServerState { backend, server, up } => self.set_server_state(backend, server, up),
            }
        }
    }

    /// A health check marked a server up or down.
    fn set_server_state(&mut self, b: usize, s: usize, up: bool) {
        let Some(srv) = self.backends.get_mut(b).and_then(|be| be.servers.get_mut(s)) else { return };
        srv.up = up;
        if let Some(row) = self.stats.servers.get_mut(self.server_index[b] + s) {
            row.state = if up { "UP" } else { "DOWN" }.into();
        }
        if up {
            self.drain_queue(b);
        } else if self.cfg.backends[b].on_down == crate::config::OnDown::ShutdownSessions {
            for idx in self.conns.live_indices() {
                let c = self.conns.at(idx);
                let on_it = c.backend as usize == b && c.server as usize == s && c.server_shares;
                if on_it && matches!(c.state, crate::conn::State::Established | crate::conn::State::Connecting) {
                    self.close(idx, CloseReason::ServerReset);
                }
            }
        }
    }

    fn flush_outbox(&mut self) {
        for (to, msg) in self.outbox.drain(..) {
            if let Some(peer) = self.peers.get(to as usize) {
                peer.send(Control::Share(msg));
            }
        }
    }

    fn start_drain(&mut self) {
        if self.draining.is_some() {
            return;
        }
        // Parked connections stay: they are admitted as slots free, until the drain deadline.
        self.draining = Some(self.now + self.cfg.global.drain_timeout.as_millis() as u64);
        self.update_listeners();
    }

    /// During a drain: close listeners once their accept is gone; force-close at the deadline.
    fn check_drain(&mut self) {
        let Some(deadline) = self.draining else {
            return;
        };
        for l in &mut self.listeners {
            if !l.armed && !l.closed {
                l.closed = true;
                // Close this worker's descriptor (the multishot accept is gone, so nothing holds the
                // socket through it). The socket itself closes, refusing new SYNs, only when the
                // engine's copy is gone too — or lives on in the engine that replaces this one.
                l.fd = None;
            }
        }
        if self.now >= deadline {
            for idx in self.conns.live_indices() {
                self.close(idx, CloseReason::Shutdown);
            }
            while let Some((_, slot)) = self.parked.pop_front() {
                self.ring.close_fixed(slot, Token::worker(Op::CloseFixed, slot));
            }
            self.stats.parked = 0;
        }
    }

    fn finished(&self) -> bool {
        self.draining.is_some()
            && self.conns.live == 0
            && self.parked.is_empty()
            && self.listeners.iter().all(|l| l.closed)
    }

    fn snapshot(&mut self) -> WorkerStats {
        let mut s = self.stats.clone();
        s.pipes_in_use = u64::from(self.pipes.in_use);
        s.pipes_pooled = u64::from(self.pipes.pooled());
        s.buffers_in_use = u64::from(self.ring.chunks_in_use);
        s.buffers_pooled = u64::from(self.ring.chunks_pooled());
        s.global_share = u64::from(self.shares.held(self.plan.limits.global));
        s.share_lent = self.shares.lent;
        s.share_borrowed = self.shares.borrowed;
        s.queued = self.backends.iter().map(|b| b.queue.len() as u64).sum::<u64>().min(s.queued);
        s.ring = self.ring.counters;
        s.uptime_ms = self.now;
        s.listening = self.listeners.iter().filter(|l| !l.closed).count() as u64;
        s.queued_by_backend = self.backends.iter().map(|b| b.queue.len() as u64).collect();
        s.connect_latency = self.connect_latency.clone();
        let mut k = 0;
        s.sources.clear();
        for (b, be) in self.backends.iter().enumerate() {
            for (i, srv) in be.servers.iter().enumerate() {
                let row = &mut s.servers[k];
                row.active = u64::from(srv.active);
                row.total = srv.total;
                row.connect_errors = srv.errors;
                row.share = srv.limit.map_or(0, |l| u64::from(self.shares.held(l)));
                row.connect_latency_us = Latency::of(&self.connect_latency[k]);
                k += 1;
                for (j, ip) in srv.sources.ips.iter().enumerate() {
                    s.sources.push(SourceStats {
                        backend: self.cfg.backends[b].name.clone(),
                        server: self.cfg.backends[b].servers[i].name.clone(),
                        ip: *ip,
                        active: u64::from(srv.sources.active[j]),
                        capacity: u64::from(srv.sources.capacity),
                    });
                }
            }
        }
        s
    }
}
