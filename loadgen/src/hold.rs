//! `ringload hold`: open N connections at a paced ramp, keep them, and every
//! heartbeat interval send each one a small sequenced message and check its
//! echo. This is the many-connections mode (300k and beyond, with
//! `--sources` and the multi-process split).
//!
//! Per connection at most one heartbeat is outstanding: the first is sent as
//! soon as the connection is established, the next ones on the connection's
//! phase (`--phase`): with `spread` (the default) connection `i` of `N`
//! heartbeats at `start + i/N × interval + k × interval` (to the millisecond),
//! whenever it was established, so the run's heartbeats come at an even rate
//! and a burst of connects (a ramp that stalled, a reconnect storm) does not
//! become a burst of heartbeats every interval after; with `connect` one
//! interval after the previous one, so connections established together
//! heartbeat together. If the previous echo is still
//! missing when the next is due, no new one is sent until it arrives, and
//! when it does it is counted **late** (or late in the warm-up, if it was
//! sent before `--latency-after`: the ramp's accepts delay every path, and a
//! run asks for the steady state); it is checked for corruption and its
//! round trip recorded like any other. At the end the worker waits up to
//! [`DRAIN`] for outstanding echoes; those still missing are **lost**.
//!
//! With `--reconnect D`, a connection that ends (the other side closed or
//! reset it) or whose dial failed is dialed again in its slot D later, as a
//! real client does after a server went away; its heartbeats start over on
//! the new connection (a heartbeat in flight when it ended is not counted
//! lost: the connection is counted dropped). The run then passes when every
//! planned connection is open at the end.
//!
//! Invariants: slot `i` of a worker is connection `first_id + i`, dialed
//! in order (and again only with `--reconnect`). A heartbeat's message stays in
//! its slot's `sbuf`, unchanged until its echo is back. The shared
//! [`ClientWorker`] owns the slots, their buffers and sockets.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::cli::{HoldArgs, Phase};
use crate::client::{ClientWorker, Event, State};
use crate::dial::Pacer;
use crate::run::{ClientMode, WorkerPlan};
use crate::stats::{Cause, Measurement, Progress};
use crate::wire::{self, HEADER};

/// How long the end of the run waits for outstanding heartbeat echoes.
pub const DRAIN: Duration = Duration::from_secs(2);

impl ClientMode for HoldArgs {
    fn name(&self) -> &'static str {
        "hold"
    }
    fn client(&self) -> &crate::cli::ClientArgs {
        &self.client
    }
    fn conns(&self) -> u64 {
        self.conns
    }
    fn default_duration(&self) -> Duration {
        Duration::from_secs(60)
    }
    fn validate(&self) -> Result<()> {
        anyhow::ensure!(self.conns > 0, "--conns must be at least 1");
        anyhow::ensure!(self.heartbeat >= Duration::from_millis(10), "--heartbeat must be at least 10ms");
        Ok(())
    }
    fn run_worker(&self, plan: &WorkerPlan, progress: &Progress) -> Result<Measurement> {
        Worker::new(self, plan, progress)?.run()
    }
}

/// A held connection's heartbeat.
struct Conn {
    /// Which connection of the slot this is (bumped on each reconnect): a heartbeat timer of an
    /// earlier one is ignored.
    chain: u32,
    /// The slot is being dialed again (`--reconnect`).
    redial: bool,
    seq: u64,
    /// When the outstanding heartbeat was sent; `None` if none is outstanding.
    sent_at: Option<Instant>,
    /// The outstanding heartbeat's next was due before its echo came.
    late: bool,
    send_busy: bool,
    sent: usize,
    sbuf: [u8; HEADER],
    rbuf: [u8; HEADER],
    rlen: usize,
}

struct Worker<'a> {
    w: ClientWorker<'a, Conn>,
    /// Heartbeat timers: (due, slot, chain), earliest first.
    timers: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    /// `--reconnect`: slots to dial again, (due, slot), in due order.
    redials: VecDeque<(Instant, u32)>,
    reconnect: Option<Duration>,
    heartbeat: Duration,
    phase: Phase,
    /// The whole run's connections (`--conns`): connection `first_id + slot` of them.
    total: u64,
    ramp: f64,
    /// Planned connections whose dial has resolved (established or failed).
    resolved: u64,
    /// Heartbeats sent from then on have their round trip recorded (`--latency-after`).
    record_from: Instant,
}

impl<'a> Worker<'a> {
    fn new(args: &HoldArgs, plan: &'a WorkerPlan, progress: &'a Progress) -> Result<Self> {
        let w = ClientWorker::new("hold", plan, progress, 4096, (), || Conn {
            chain: 0,
            redial: false,
            seq: 0,
            sent_at: None,
            late: false,
            send_busy: false,
            sent: 0,
            sbuf: [0; HEADER],
            rbuf: [0; HEADER],
            rlen: 0,
        })?;
        let record_from = plan.start + args.latency_after;
        Ok(Worker {
            w,
            timers: BinaryHeap::new(),
            redials: VecDeque::new(),
            reconnect: args.reconnect,
            heartbeat: args.heartbeat,
            phase: args.phase,
            total: args.conns,
            ramp: args.ramp,
            resolved: 0,
            record_from,
        })
    }

    fn run(mut self) -> Result<Measurement> {
        let plan = self.w.plan();
        let mut pacer = Pacer::new(self.ramp * plan.share, plan.start);
        let mut dialed = 0u64;
        let n = plan.conns;
        while Instant::now() < plan.deadline && !crate::stop::requested() {
            let now = Instant::now();
            let k = pacer.allowance(now, n - dialed);
            for _ in 0..k {
                if !self.w.dial(dialed as u32)? {
                    self.resolve();
                    self.redial_later(dialed as u32, now);
                }
                dialed += 1;
            }
            while let Some(&(due, slot)) = self.redials.front() {
                if due > now {
                    break;
                }
                self.redials.pop_front();
                if self.w.state(slot) == State::Idle {
                    self.w.conn_mut(slot).0.redial = true;
                    if !self.w.dial(slot)? {
                        self.redial_later(slot, now);
                    }
                }
            }
            while let Some(&Reverse((due, slot, chain))) = self.timers.peek() {
                if due > now {
                    break;
                }
                self.timers.pop();
                if self.w.conn(slot).chain == chain {
                    self.beat(slot, due, now)?;
                }
            }
            let mut wait = plan.deadline.saturating_duration_since(now);
            wait = wait.min(Duration::from_millis(100));
            if dialed < n {
                wait = wait.min(pacer.next_in(now).max(Duration::from_micros(200)));
            }
            if let Some(&Reverse((due, _, _))) = self.timers.peek() {
                wait = wait.min(due.saturating_duration_since(now));
            }
            if let Some(&(due, _)) = self.redials.front() {
                wait = wait.min(due.saturating_duration_since(now));
            }
            self.poll(wait)?;
        }
        // Drain: no new dials or heartbeats; wait for echoes and connects in flight.
        let drain_end = Instant::now() + DRAIN;
        while Instant::now() < drain_end && self.w.slots().any(|s| s.state() == State::Connecting || awaited(s)) {
            self.poll(Duration::from_millis(20))?;
        }
        self.finish()
    }

    fn poll(&mut self, wait: Duration) -> Result<()> {
        for e in self.w.poll(wait)? {
            match e {
                Event::Connected(slot) => {
                    let now = Instant::now();
                    let (c, m) = self.w.conn_mut(slot);
                    if std::mem::take(&mut c.redial) {
                        m.reconnects += 1;
                    } else {
                        self.resolve();
                    }
                    // A fresh connection in the slot: its own heartbeats, from the first.
                    let c = self.w.conn_mut(slot).0;
                    c.chain = c.chain.wrapping_add(1);
                    (c.seq, c.sent_at, c.late, c.send_busy, c.sent, c.rlen) = (0, None, false, false, 0, 0);
                    self.arm_recv(slot)?;
                    self.beat(slot, now, now)?;
                }
                Event::ConnectFailed(slot) => {
                    if !self.w.conn(slot).redial {
                        self.resolve();
                    }
                    self.redial_later(slot, Instant::now());
                }
                Event::Sent(slot, res) => self.on_send(slot, res)?,
                Event::Received(slot, res) => self.on_recv(slot, res)?,
            }
        }
        Ok(())
    }

    /// `--reconnect`: dial `slot` again after the delay.
    fn redial_later(&mut self, slot: u32, now: Instant) {
        if let Some(d) = self.reconnect {
            self.redials.push_back((now + d, slot));
        }
    }

    /// A held connection ended early: counted dropped; dialed again with `--reconnect`.
    fn ended(&mut self, slot: u32, cause: Cause) {
        self.w.drop_conn(slot, cause);
        self.redial_later(slot, Instant::now());
    }

    fn resolve(&mut self) {
        self.resolved += 1;
        let plan = self.w.plan();
        if self.resolved == plan.conns {
            self.w.m().ramp_time_s = Some(plan.start.elapsed().as_secs_f64());
        }
    }

    fn arm_recv(&mut self, slot: u32) -> Result<()> {
        // SAFETY: `rbuf` is the slot's, at most one recv per slot is armed,
        // and it is read (on_recv) only after this recv completed.
        unsafe { self.w.recv(slot, |c, _| &mut c.rbuf[c.rlen..]) }
    }

    fn push_send(&mut self, slot: u32) -> Result<()> {
        self.w.conn_mut(slot).0.send_busy = true;
        // SAFETY: `sbuf` is rewritten only by `beat`, which skips the slot
        // while this send is in flight (`send_busy`) and until the echo is back.
        unsafe { self.w.send(slot, |c, _| &c.sbuf[c.sent..]) }
    }

    /// A heartbeat is due on `slot` (scheduled for `due`).
    fn beat(&mut self, slot: u32, due: Instant, now: Instant) -> Result<()> {
        if self.w.state(slot) != State::Open {
            return Ok(());
        }
        let next = self.next_beat(slot, due, now);
        let chain = self.w.conn(slot).chain;
        self.timers.push(Reverse((next, slot, chain)));
        let id = self.w.plan().first_id + u64::from(slot);
        let progress = self.w.progress();
        let (c, m) = self.w.conn_mut(slot);
        if c.sent_at.is_some() || c.send_busy {
            if !c.late {
                c.late = true;
                Progress::inc(&progress.late);
            }
            return Ok(());
        }
        c.seq += 1;
        wire::fill(&mut c.sbuf, id, c.seq);
        c.sent = 0;
        c.sent_at = Some(now);
        m.msgs_sent += 1;
        self.push_send(slot)
    }

    /// When the heartbeat after the one due at `due` (sent at `now`) is due.
    fn next_beat(&self, slot: u32, due: Instant, now: Instant) -> Instant {
        let hb = self.heartbeat;
        match self.phase {
            // One interval on; a heartbeat a whole interval late starts the count again.
            Phase::Connect => {
                if due + hb > now {
                    due + hb
                } else {
                    now + hb
                }
            }
            // The connection's first point after half an interval on: an interval after one on
            // time, between a half and one and a half after the first (sent at the connect).
            Phase::Spread => {
                let id = u128::from(self.w.plan().first_id + u64::from(slot));
                let offset_ms = id * hb.as_millis() / u128::from(self.total.max(1));
                let origin = self.w.plan().start + Duration::from_millis(offset_ms as u64);
                grid_after(origin, hb, due.max(now) + hb / 2)
            }
        }
    }

    fn on_send(&mut self, slot: u32, res: i32) -> Result<()> {
        let c = self.w.conn_mut(slot).0;
        c.send_busy = false;
        if res <= 0 {
            self.ended(slot, Cause::from_result(res, false));
            return Ok(());
        }
        c.sent += res as usize;
        if c.sent < HEADER {
            return self.push_send(slot);
        }
        Ok(())
    }

    fn on_recv(&mut self, slot: u32, res: i32) -> Result<()> {
        if res <= 0 {
            self.ended(slot, Cause::from_result(res, true));
            return Ok(());
        }
        let progress = self.w.progress();
        let record_from = self.record_from;
        let (c, m) = self.w.conn_mut(slot);
        c.rlen += res as usize;
        if c.rlen == HEADER {
            c.rlen = 0;
            match c.sent_at.take() {
                Some(at) if wire::matches(&c.sbuf, &c.rbuf) => {
                    m.msgs_ok += 1;
                    Progress::inc(&progress.completed);
                    if at >= record_from {
                        m.latency.record_duration(at.elapsed());
                        m.late += u64::from(c.late);
                    } else {
                        m.late_in_warmup += u64::from(c.late);
                    }
                }
                _ => {
                    m.corrupted += 1;
                    Progress::inc(&progress.corrupted);
                }
            }
            c.late = false;
        }
        self.arm_recv(slot)
    }

    fn finish(mut self) -> Result<Measurement> {
        let progress = self.w.progress();
        let lost = self.w.slots().filter(|s| awaited(s)).count() as u64;
        self.w.m().lost += lost;
        Progress::add(&progress.lost, lost);
        let cut_short = self.w.fail_pending_connects();
        Progress::add(&progress.failed, cut_short);
        let open = self.w.open();
        let reconnecting = self.reconnect.is_some();
        let m = self.w.m();
        m.open_at_end = open;
        m.reconnecting = reconnecting;
        self.w.drain();
        self.w.m().window_s = self.w.plan().start.elapsed().as_secs_f64();
        Ok(self.w.finish())
    }
}

/// The first of `origin + k × every` (k = 0, 1, ...) at or after `at`.
fn grid_after(origin: Instant, every: Duration, at: Instant) -> Instant {
    let since = at.saturating_duration_since(origin).as_nanos();
    let k = since.div_ceil(every.as_nanos().max(1));
    origin + Duration::from_nanos((k * every.as_nanos()) as u64)
}

/// An Open connection whose heartbeat's echo has not come yet.
fn awaited(s: &crate::client::Slot<Conn>) -> bool {
    s.state() == State::Open && s.conn.sent_at.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_after_is_the_first_point_at_or_after() {
        let o = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(grid_after(o, ms(100), o), o);
        assert_eq!(grid_after(o, ms(100), o - ms(30)), o, "before the origin: the origin");
        assert_eq!(grid_after(o, ms(100), o + ms(1)), o + ms(100));
        assert_eq!(grid_after(o, ms(100), o + ms(100)), o + ms(100));
        assert_eq!(grid_after(o, ms(100), o + ms(250)), o + ms(300));
    }
}
