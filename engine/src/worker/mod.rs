//! One worker per core: its ring, its listeners, its connections, its counters. Shares nothing.
//!
//! The event loop: submit everything queued and wait for a completion or the next timer tick, copy
//! the completions out, handle each (which queues new SQEs), fire due timers, send control messages
//! to other workers. Completions are routed by their [`token::Token`]: worker ops (accepts, the
//! control doorbell, slot closes) here, connection ops to the connection's one transition function
//! (`conn::Ctx::on_completion`) on a context split-borrowed from the worker ([`Worker::with_conn`]).
//! What a connection's transition leaves for others (a queue to serve, a share to hand to a parked
//! socket) is done right after it ([`Worker::follow_up`]). Nothing in the loop blocks, locks or
//! allocates per byte.
//!
//! The rest of the worker lives beside this file: `setup.rs` (building it), `accept.rs` (listeners),
//! `admission.rs` (maxconn shares at accept, parking), `control.rs` (messages, drain, stats).

mod accept;
mod admission;
mod bulkpath;
mod coalesce;
mod control;
mod moving;
mod rate;
pub mod ring;
mod setup;
pub mod timer;
pub mod token;
pub(crate) mod upstream;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::config::Config;
use crate::conn::{Clock, Ctx, Dir, Followups, Known, ListenerInfo, Slab};
use crate::control::{Control, Peer};
use crate::log::{ConnLog, LogSink};
use crate::pipes::PipePool;
use crate::plan::Plan;
use crate::stats::WorkerStats;
use crate::sys::EventFd;
use accept::ListenerState;
use ring::{ClientSlot, Completion, Ring, ZcCompletion};
use timer::TimerWheel;
use token::{GENERATION_MASK, Op, Token};
use upstream::Upstream;

pub use accept::Listener;
pub use coalesce::QUIET_MS;
pub use moving::{CallOff, ExportPlan, Exported, Grant, MoveOffer, MovePlan, MoveTarget, pick_target, place_by_name};
pub use rate::RateMsg;
pub use setup::next_uid;

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
    id: usize,
    /// Unique among every worker this process starts (moves name their sender by it).
    uid: u64,
    cfg: Arc<Config>,
    plan: Arc<Plan>,
    ring: Ring,
    conns: Slab,
    timers: TimerWheel,
    pipes: PipePool,
    sendq: crate::conn::SendQueues,
    splice_fds: crate::conn::SpliceTable,
    /// Flows waiting for a pipe or a buffer: (index, generation, direction), oldest first.
    waiters: VecDeque<(u32, u32, Dir)>,
    up: Upstream,
    stats: WorkerStats,
    now: Clock,
    log: Option<ConnLog>,
    /// What a connection needs to know of each listener (same order as `listeners`).
    infos: Vec<ListenerInfo>,
    listeners: Vec<ListenerState>,
    /// Accepted sockets waiting for a share (global/frontend, or a PROXY-header slot): (listener,
    /// slot).
    parked: VecDeque<(u16, ClientSlot, Known)>,
    /// Connections whose PROXY header is there, waiting for a global/frontend share: (index,
    /// generation), oldest first.
    admitting: VecDeque<(u32, u32)>,
    /// Accept-range slots holding a client socket (open, parked, or closing) or reserved by a
    /// single accept in flight.
    client_slots: u32,
    /// Free accept slots, when accepted sockets are plain descriptors the worker moves into the
    /// table itself (features.rs); empty when the kernel picks them (direct accept).
    free_client_slots: Vec<u32>,
    follow: Followups,
    /// When the worker started (worker clock, ms).
    started_ms: u64,
    rx: Receiver<Control>,
    wake: Arc<EventFd>,
    peers: Arc<Vec<Peer>>,
    /// Drain deadline (worker clock, ms) once a drain began.
    draining: Option<u64>,
    /// When the receive buffers are next trimmed (worker clock, ms).
    next_trim: u64,
    /// When the send queues waiting for room may next be copied out of the ring (`spill_stalled`).
    next_stall_review: u64,
    /// The longest loop turn (ns) of this second and of the one before (rolled with `next_trim`).
    longest_turn_ns: [u64; 2],
    /// `splice: auto`: whether bulk flows splice or go through the receive buffers (measured).
    bulk: bulkpath::BulkPath,
    /// `tune.batch_wait`: the window of the next wait, if any.
    coalesce: coalesce::Coalesce,
    /// Shutdowns of a server's connections paced over `close_spread`, with their window (ms).
    spreads: Vec<(control::Spread, u64)>,
    /// Per backend: a drain has started its close_spread.
    drain_spread: Vec<bool>,
    /// Per frontend, its `rate_limit` bucket (this worker's share).
    rate: Vec<Option<rate::Bucket>>,
    /// Moving this engine's connections to the one a reload started.
    mover: Option<moving::Mover>,
    /// Slots granted to connections moving in: (sender's uid, key) → what they hold.
    landing: std::collections::HashMap<(u64, (u32, u32)), moving::Landing>,
}

/// Runs a worker on the current thread until it has drained. `ready` gets `Ok` once the ring is up
/// and the listeners accept — with the worker's id and a duplicate of its ring's descriptor, by
/// which an older engine's workers move connections into it on reload — or the reason it could
/// not start.
///
/// Returns the worker's counters as it exits (the report of a reload says what the old engine
/// moved on and closed), or `None` if it never started.
pub fn run(setup: WorkerSetup, ready: Sender<Result<(usize, std::os::fd::OwnedFd), String>>) -> Option<WorkerStats> {
    let id = setup.id;
    let mut worker = match Worker::new(setup) {
        Ok(w) => w,
        Err(e) => {
            let _ = ready.send(Err(format!("worker {id}: {e}")));
            return None;
        }
    };
    worker.update_listeners();
    if let Err(e) = worker.ring.submit() {
        let _ = ready.send(Err(format!("worker {id}: first submit: {e}")));
        return None;
    }
    // SAFETY: dup has no pointer argument; the ring's descriptor is open (the ring is alive).
    let dup = unsafe { libc::fcntl(worker.ring.ring_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        let _ = ready
            .send(Err(format!("worker {id}: duplicating its ring's descriptor: {}", std::io::Error::last_os_error())));
        return None;
    }
    // SAFETY: a new descriptor nothing else owns.
    let _ = ready.send(Ok((id, unsafe { std::os::fd::FromRawFd::from_raw_fd(dup) })));
    match worker.event_loop() {
        // (A zero-copy send whose notification did not come by the end holds its buffers.)
        Ok(()) => debug_assert!(
            worker.ring.all_buffers_back() || worker.ring.zc_live() > 0,
            "worker {id} ended holding pool buffers"
        ),
        Err(e) => {
            eprintln!("ringproxy: worker {id}: io_uring failed: {e}; its connections are closed");
            // The ring is torn down (cancelling everything) when the worker is dropped; what the
            // live connections hold must not go back to pools the kernel may still write into.
            worker.conns.abandon();
            worker.parked.drain(..).for_each(std::mem::forget);
        }
    }
    // (The worker's totals of its frontends' counters are set when asked for, as in a snapshot.)
    let mut stats = worker.stats.clone();
    stats.sum_frontends();
    Some(stats)
}

impl Worker {
    fn event_loop(&mut self) -> std::io::Result<()> {
        let mut completions: Vec<Completion> = Vec::with_capacity(4096);
        let mut expired: Vec<u32> = Vec::new();
        let (mut messages_before, mut drained) = (0, 0);
        loop {
            let sleep = self
                .listeners
                .iter()
                .filter_map(|l| l.retry_in(self.now.ms))
                .fold(self.timers.sleep_ms(self.now.ms, 1000), u64::min)
                .min(self.drain_wake_in().unwrap_or(u64::MAX))
                .min(self.log.as_ref().and_then(|l| l.flush_in(self.now.ms)).unwrap_or(u64::MAX))
                .min(if self.spreads.is_empty() { u64::MAX } else { timer::TICK_MS })
                .min(self.mover.as_ref().map_or(u64::MAX, |m| m.wake_in(self.now.ms)));
            let (quiet, busy, stalled) =
                (self.stats.quiet_messages, self.stats.busy_messages, !self.waiters.is_empty());
            let window = self.coalesce.window(self.now.ms, quiet, busy, stalled);
            // (A turn that received messages forwarded them, or queued them to be.)
            let forwarded = quiet + busy != std::mem::replace(&mut messages_before, quiet + busy);
            // (The clock read only for a window: where on its grid the wait begins.)
            let now_us = if window.is_some() { Clock::now().us } else { 0 };
            let min_wait = self.coalesce.min_wait(window, now_us, forwarded, drained);
            let short = self.coalesce.replying();
            self.ring.submit_and_wait(Some(Duration::from_millis(sleep)), min_wait, short)?;
            let woke = Instant::now();
            self.now = Clock::now();
            self.ring.drain(&mut completions);
            drained = completions.len();
            for c in completions.drain(..) {
                self.on_completion(c);
            }
            if !self.waiters.is_empty() {
                // Receives wait for buffers: queues stuck behind a destination give theirs up.
                if self.now.ms >= self.next_stall_review {
                    self.spill_stalled();
                }
                self.serve_waiters();
            }
            self.timers.expire(self.now.ms, self.conns.links(), &mut expired);
            for idx in expired.drain(..) {
                self.with_conn(idx, |cx| cx.on_timer());
                self.follow_up();
            }
            if self.bulk.due(self.now.ms) {
                // The bytes of the connections whose path it chooses (their backend's `splice` is
                // `auto`): the others move the same way in every window.
                let bytes = (self.stats.frontends.iter().enumerate())
                    .filter(|&(f, _)| self.cfg.frontend_splice(f) == crate::config::SpliceMode::Auto)
                    .map(|(_, s)| s.bytes_in + s.bytes_out)
                    .sum();
                if let Some(switched) = self.bulk.observe(self.now.ms, crate::sys::thread_cpu_ns(), bytes) {
                    eprintln!("ringproxy: worker {}: {switched}", self.id);
                }
            }
            if self.now.ms >= self.next_trim {
                // Once a second (the loop wakes at least that often): an offer that grew for a
                // burst shrinks back, buffers nobody used since give their memory back, and the
                // longest turn starts a new second.
                self.next_trim = self.now.ms + 1000;
                self.longest_turn_ns = [0, self.longest_turn_ns[0]];
                self.ring.trim_recv_bufs();
                for t in self.up.per_source.iter_mut().flatten() {
                    t.sweep(self.now.ms);
                }
                self.advance_ramps();
            }
            if !self.spreads.is_empty() {
                self.run_spreads();
            }
            if self.mover.is_some() {
                self.sweep_moves();
                self.flush_moves();
            }
            self.check_drain();
            self.retry_listeners();
            self.flush_outbox();
            if let Some(log) = &mut self.log {
                log.maybe_flush(self.now.ms, false);
            }
            self.stats.loop_iterations += 1;
            let turn = woke.elapsed().as_nanos() as u64;
            self.stats.busy_ns += turn;
            self.stats.slow_turns.record(turn);
            self.longest_turn_ns[0] = self.longest_turn_ns[0].max(turn);
            if self.finished() {
                if let Some(log) = &mut self.log {
                    log.maybe_flush(self.now.ms, true);
                }
                self.ring.submit()?;
                return Ok(());
            }
        }
    }

    fn on_completion(&mut self, c: Completion) {
        let Some(t) = Token::decode(c.user_data) else {
            self.stats.unexpected_completions += 1;
            return;
        };
        if !t.op.is_worker_op() {
            return self.conn_completion(t, &c);
        }
        match t.op {
            Op::SendZc => match self.ring.zc_completion(t, c.flags, c.result) {
                // The send's result: the connection's send completion (no more to come of it).
                Some(ZcCompletion::Sent(conn)) => {
                    let flags = c.flags & !ring::CQE_F_MORE;
                    self.conn_completion(conn, &Completion { flags, ..c });
                }
                Some(ZcCompletion::Done { copied }) => self.stats.zerocopy_copied += u64::from(copied),
                None => self.stats.unexpected_completions += 1,
            },
            Op::Accept => self.on_accept(t.index as u16, c),
            // A failed cancel (the op already completed or is completing) or a failed reset
            // before a close (that close sends FIN instead of RST): nothing to do.
            Op::AcceptCancel | Op::Cancel | Op::Linger => {}
            Op::Wake => {
                let fd = self.wake.fd();
                self.ring.read_wake(fd, Token::worker(Op::Wake, 0));
                self.on_control();
            }
            Op::CloseFixed => self.on_slot_closed(t.index),
            _ => unreachable!("connection op {:?} routed to the worker", t.op),
        }
    }

    /// A completion of connection op `t`.
    fn conn_completion(&mut self, t: Token, c: &Completion) {
        if self.conns.get(t.index, t.generation).is_none() {
            // The connection was freed since (nothing of it was in flight): cannot happen for
            // ops it held; counted for the stats. A receive buffer it names still goes back.
            if let Some(b) = self.ring.received(c.flags, c.result) {
                self.ring.give_filled(b);
            }
            self.stats.unexpected_completions += 1;
            return;
        }
        self.with_conn(t.index, |cx| cx.on_completion(t.op, c.result, c.more(), c.flags));
        self.follow_up();
        if self.mover.is_some() {
            self.after_move_event(t.index, t.generation);
        }
    }

    /// Runs `f` on connection `idx`'s context, and frees the entry if the connection finished.
    fn with_conn<R>(&mut self, idx: u32, f: impl FnOnce(&mut Ctx<'_>) -> R) -> R {
        let (c, links) = self.conns.split(idx);
        let generation = c.generation;
        let mut cx = Ctx {
            idx,
            c,
            links,
            timers: &mut self.timers,
            ring: &mut self.ring,
            pipes: &mut self.pipes,
            sendq: &mut self.sendq,
            fds: &mut self.splice_fds,
            waiters: &mut self.waiters,
            up: &mut self.up,
            admitting: &mut self.admitting,
            stats: &mut self.stats,
            cfg: &self.cfg,
            listeners: &self.infos,
            log: self.log.as_mut(),
            worker: self.id,
            now: self.now,
            follow: &mut self.follow,
            splice_bulk: self.bulk.splice,
        };
        let r = f(&mut cx);
        self.conns.reclaim_if_finished(idx, generation);
        r
    }

    /// Does what connection transitions left for other connections: serve the queues of
    /// backends that got room, admit parked sockets after a share was given back.
    fn follow_up(&mut self) {
        loop {
            if let Some(b) = self.follow.queues.pop() {
                self.drain_queue(b as usize);
            } else if std::mem::take(&mut self.follow.admission) {
                self.admission_freed();
            } else {
                return;
            }
        }
    }

    /// Serves backend `b`'s queue in order while servers have room.
    fn drain_queue(&mut self, b: usize) {
        while let Some(&(idx, generation)) = self.up.backends[b].queue.front() {
            let queued = self
                .conns
                .get(idx, generation & GENERATION_MASK)
                .is_some_and(|c| c.state == crate::conn::State::Queued);
            if !queued {
                self.up.backends[b].queue.pop_front();
                continue;
            }
            let outcome = self.with_conn(idx, |cx| cx.try_dequeue());
            if !outcome {
                break;
            }
            self.up.backends[b].queue.pop_front();
        }
    }

    /// Serves every backend's queue (after share arrived from another worker, or a slot freed).
    fn drain_queues(&mut self) {
        for b in 0..self.up.backends.len() {
            self.drain_queue(b);
        }
        self.follow_up();
    }

    /// Receives wait for buffers: the send queues that have waited for room in their destination
    /// for `STALL_MS` or more give theirs up (their bytes are copied out of the ring), so that a
    /// destination that stopped reading does not stop the worker's other flows. A pass over the
    /// connection table, at most once per `STALL_MS`, only while receives wait.
    fn spill_stalled(&mut self) {
        self.next_stall_review = self.now.ms + u64::from(crate::conn::STALL_MS);
        if !self.cfg.uses_ring() {
            return;
        }
        for idx in 0..self.conns.slots() as u32 {
            let c = self.conns.entry(idx);
            let waiting = |io: &crate::conn::FlowIo| matches!(io, crate::conn::FlowIo::RingPollOut { .. });
            if c.is_live() && (waiting(&c.c2s.io) || waiting(&c.s2c.io)) {
                self.with_conn(idx, |cx| {
                    for dir in crate::conn::Dir::BOTH {
                        cx.spill_stalled(dir);
                    }
                });
            }
        }
    }

    /// Gives freed pipes and buffers to flows that were waiting for one (once per loop turn).
    fn serve_waiters(&mut self) {
        // Each waiter gets one try; one that still finds nothing queues itself again (at the back).
        // Receive-buffer waiters (`splice: never`): no more re-armed than the ring offers buffers
        // (the others would most likely end with ENOBUFS again, a completion each, at once).
        // (At least one, so that a flow waiting for a pipe is not stuck behind them.)
        let tries = if self.cfg.uses_ring() {
            (self.ring.ring_bufs_offered() as usize).clamp(1, self.waiters.len().max(1))
        } else {
            self.waiters.len()
        };
        for _ in 0..tries {
            let Some((idx, generation, dir)) = self.waiters.pop_front() else { break };
            if self.conns.get(idx, generation & GENERATION_MASK).is_some() {
                self.with_conn(idx, |cx| cx.resume_waiting(dir));
                self.follow_up();
            }
        }
    }

    /// A close of direct slot `index` completed: the slot is free again.
    fn on_slot_closed(&mut self, index: u32) {
        if self.up.server_slots.owns(index) {
            self.up.server_slots.closed(index);
            if self.up.server_slots.len() == 1 {
                // Connections may be waiting for a server slot.
                self.drain_queues();
            }
        } else if index < self.plan.accept_slots {
            self.client_slots = self.client_slots.saturating_sub(1);
            if !self.ring.io().direct_accept() {
                self.free_client_slots.push(index);
            }
            if self.listeners.iter().any(ListenerState::idle) {
                self.update_listeners();
            }
        }
    }
}
