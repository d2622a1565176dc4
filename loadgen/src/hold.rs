//! `ringload hold`: open N connections at a paced ramp, keep them, and every
//! heartbeat interval send each one a small sequenced message and check its
//! echo. This is the many-connections mode (300k and beyond, with
//! `--sources` and the multi-process split).
//!
//! Per connection at most one heartbeat is outstanding: the first is sent as
//! soon as the connection is established, the next when the interval has
//! passed and the previous echo is back. If the previous echo is still
//! missing when the next is due, that heartbeat is counted lost (once) and
//! no new one is sent until it arrives (a late echo is still checked for
//! corruption but gives no RTT sample). At the end the worker waits up to
//! [`DRAIN`] for outstanding echoes; those still missing are lost.
//!
//! Invariants: slot `i` of a worker is connection `first_id + i`; slots are
//! never reused, so a completion for a slot that is no longer `Open` is
//! stale and ignored. Each slot's send/recv buffers live in `conns`, a Vec
//! allocated once and never resized, which is freed only after the ring has
//! no operation in flight (or leaked if the kernel does not let go in time).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use io_uring::{opcode, types};

use crate::cli::HoldArgs;
use crate::dial::{self, Endpoints, Pacer};
use crate::ring::{Completion, Op, Ring, Tag, errno};
use crate::run::{ClientMode, WorkerPlan, drain_ring};
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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Idle,
    Connecting,
    Open,
    Done,
}

struct Conn {
    fd: Option<OwnedFd>,
    state: State,
    target: usize,
    started: Instant,
    seq: u64,
    /// When the outstanding heartbeat was sent; `None` if none is outstanding.
    sent_at: Option<Instant>,
    lost_marked: bool,
    send_busy: bool,
    sent: usize,
    sbuf: [u8; HEADER],
    rbuf: [u8; HEADER],
    rlen: usize,
}

struct Worker<'a> {
    // Field order matters: the ring is dropped before the buffers it may use.
    ring: Ring,
    conns: Vec<Conn>,
    endpoints: &'a Endpoints,
    timeout: types::Timespec,
    timers: VecDeque<(Instant, u32)>,
    heartbeat: Duration,
    ramp: f64,
    plan: &'a WorkerPlan,
    progress: &'a Progress,
    m: Measurement,
    resolved: u64,
    open: u64,
}

impl<'a> Worker<'a> {
    fn new(args: &HoldArgs, plan: &'a WorkerPlan, progress: &'a Progress) -> Result<Self> {
        let ring = Ring::new(4096).context("creating the io_uring for a hold worker")?;
        let now = Instant::now();
        let conns = (0..plan.conns)
            .map(|_| Conn {
                fd: None,
                state: State::Idle,
                target: 0,
                started: now,
                seq: 0,
                sent_at: None,
                lost_marked: false,
                send_busy: false,
                sent: 0,
                sbuf: [0; HEADER],
                rbuf: [0; HEADER],
                rlen: 0,
            })
            .collect();
        Ok(Worker {
            ring,
            conns,
            endpoints: &plan.endpoints,
            timeout: types::Timespec::from(plan.connect_timeout),
            timers: VecDeque::new(),
            heartbeat: args.heartbeat,
            ramp: args.ramp,
            plan,
            progress,
            m: Measurement { planned: plan.conns, ..Default::default() },
            resolved: 0,
            open: 0,
        })
    }

    fn run(mut self) -> Result<Measurement> {
        let mut pacer = Pacer::new(self.ramp * self.plan.share, self.plan.start);
        let mut dialed = 0u64;
        let n = self.plan.conns;
        while Instant::now() < self.plan.deadline && !crate::stop::requested() {
            let now = Instant::now();
            let k = pacer.allowance(now, n - dialed);
            for _ in 0..k {
                self.dial(dialed as u32, now)?;
                dialed += 1;
            }
            while let Some(&(due, slot)) = self.timers.front() {
                if due > now {
                    break;
                }
                self.timers.pop_front();
                self.beat(slot, due, now)?;
            }
            let mut wait = self.plan.deadline.saturating_duration_since(now);
            wait = wait.min(Duration::from_millis(100));
            if dialed < n {
                wait = wait.min(pacer.next_in(now).max(Duration::from_micros(200)));
            }
            if let Some(&(due, _)) = self.timers.front() {
                wait = wait.min(due.saturating_duration_since(now));
            }
            self.poll(wait)?;
        }
        self.m.attempted = dialed;
        // Drain: no new dials or heartbeats; wait for echoes and connects in flight.
        let drain_end = Instant::now() + DRAIN;
        while Instant::now() < drain_end {
            let waiting = self.conns.iter().any(|c| {
                c.state == State::Connecting || (c.state == State::Open && c.sent_at.is_some() && !c.lost_marked)
            });
            if !waiting {
                break;
            }
            self.poll(Duration::from_millis(20))?;
        }
        self.finish()
    }

    fn poll(&mut self, wait: Duration) -> Result<()> {
        let cs: Vec<Completion> = self.ring.wait(1, wait)?.to_vec();
        for c in cs {
            self.complete(c)?;
        }
        Ok(())
    }

    fn dial(&mut self, slot: u32, now: Instant) -> Result<()> {
        Progress::inc(&self.progress.attempted);
        let (src, t) = self.endpoints.pick(self.plan.local_first + u64::from(slot));
        match dial::open_socket(src, &self.endpoints.targets[t]) {
            Err(e) => {
                self.fail(slot, Cause::from_errno(e));
                Ok(())
            }
            Ok(fd) => {
                let c = &mut self.conns[slot as usize];
                c.state = State::Connecting;
                c.target = t;
                c.started = now;
                // SAFETY: the target sockaddr lives in `self.endpoints`
                // (borrowed for the worker's whole life, never modified), the
                // timespec in `self.timeout` (same), and the fd is stored in
                // the slot and only closed after the connect completion.
                unsafe {
                    dial::push_connect(&mut self.ring, &fd, &self.endpoints.target_addrs[t], &self.timeout, slot, 0)?
                };
                c.fd = Some(fd);
                Ok(())
            }
        }
    }

    fn fail(&mut self, slot: u32, cause: Cause) {
        self.m.failed.add(cause);
        Progress::inc(&self.progress.failed);
        let c = &mut self.conns[slot as usize];
        c.state = State::Done;
        c.fd = None;
        self.resolve();
    }

    fn resolve(&mut self) {
        self.resolved += 1;
        if self.resolved == self.plan.conns {
            self.m.ramp_time_s = Some(self.plan.start.elapsed().as_secs_f64());
        }
    }

    fn drop_conn(&mut self, slot: u32, cause: Cause) {
        let c = &mut self.conns[slot as usize];
        if c.state != State::Open {
            return;
        }
        c.state = State::Done;
        // Closing is safe with ops in flight: they hold their own file
        // reference and their buffers stay in `conns` until the end.
        c.fd = None;
        self.m.dropped.add(cause);
        self.open -= 1;
        Progress::dec(&self.progress.open);
    }

    fn complete(&mut self, c: Completion) -> Result<()> {
        let slot = c.tag.slot;
        if slot as usize >= self.conns.len() {
            return Ok(());
        }
        match c.tag.op {
            Op::Connect => {
                if self.conns[slot as usize].state != State::Connecting {
                    return Ok(());
                }
                if c.result < 0 {
                    self.fail(slot, Cause::from_errno(errno(c.result)));
                    return Ok(());
                }
                let now = Instant::now();
                let conn = &mut self.conns[slot as usize];
                conn.state = State::Open;
                self.m.connect_latency.record_duration(now - conn.started);
                self.m.established += 1;
                self.open += 1;
                self.m.peak_open = self.m.peak_open.max(self.open);
                Progress::inc(&self.progress.established);
                Progress::inc(&self.progress.open);
                self.resolve();
                self.arm_recv(slot)?;
                self.beat(slot, now, now)?;
            }
            Op::Recv => self.on_recv(slot, c.result)?,
            Op::Send => self.on_send(slot, c.result)?,
            _ => {}
        }
        Ok(())
    }

    fn arm_recv(&mut self, slot: u32) -> Result<()> {
        let c = &mut self.conns[slot as usize];
        let Some(fd) = c.fd.as_ref() else {
            return Ok(());
        };
        let len = (HEADER - c.rlen) as u32;
        let e = opcode::Recv::new(types::Fd(fd.as_raw_fd()), c.rbuf[c.rlen..].as_mut_ptr(), len)
            .build()
            .user_data(Tag::new(slot, 0, Op::Recv).encode());
        // SAFETY: `rbuf` lives in `self.conns`, which is never resized and
        // outlives every operation in flight (see module invariants); at
        // most one recv per slot is armed, so nothing else writes there.
        unsafe { self.ring.push(&e)? };
        Ok(())
    }

    fn push_send(&mut self, slot: u32) -> Result<()> {
        let c = &mut self.conns[slot as usize];
        let Some(fd) = c.fd.as_ref() else {
            return Ok(());
        };
        c.send_busy = true;
        let e = opcode::Send::new(types::Fd(fd.as_raw_fd()), c.sbuf[c.sent..].as_ptr(), (HEADER - c.sent) as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(Tag::new(slot, 0, Op::Send).encode());
        // SAFETY: `sbuf` lives in `self.conns` (never resized, outlives the
        // ring's operations) and is not rewritten until its echo has arrived,
        // which is after this send completed.
        unsafe { self.ring.push(&e)? };
        Ok(())
    }

    /// A heartbeat is due on `slot` (scheduled for `due`).
    fn beat(&mut self, slot: u32, due: Instant, now: Instant) -> Result<()> {
        let id = self.plan.first_id + u64::from(slot);
        let hb = self.heartbeat;
        let c = &mut self.conns[slot as usize];
        if c.state != State::Open {
            return Ok(());
        }
        let next = if due + hb > now { due + hb } else { now + hb };
        self.timers.push_back((next, slot));
        if c.sent_at.is_some() || c.send_busy {
            if !c.lost_marked {
                c.lost_marked = true;
                self.m.lost += 1;
                Progress::inc(&self.progress.lost);
            }
            return Ok(());
        }
        c.seq += 1;
        wire::fill(&mut c.sbuf, id, c.seq);
        c.sent = 0;
        c.sent_at = Some(now);
        self.m.msgs_sent += 1;
        self.push_send(slot)
    }

    fn on_send(&mut self, slot: u32, res: i32) -> Result<()> {
        let c = &mut self.conns[slot as usize];
        c.send_busy = false;
        if c.state != State::Open {
            return Ok(());
        }
        if res <= 0 {
            let cause = if res == 0 { Cause::Other } else { Cause::from_errno(errno(res)) };
            self.drop_conn(slot, cause);
            return Ok(());
        }
        c.sent += res as usize;
        if c.sent < HEADER {
            return self.push_send(slot);
        }
        Ok(())
    }

    fn on_recv(&mut self, slot: u32, res: i32) -> Result<()> {
        if self.conns[slot as usize].state != State::Open {
            return Ok(());
        }
        if res <= 0 {
            let cause = if res == 0 { Cause::PeerClosed } else { Cause::from_errno(errno(res)) };
            self.drop_conn(slot, cause);
            return Ok(());
        }
        let c = &mut self.conns[slot as usize];
        c.rlen += res as usize;
        if c.rlen == HEADER {
            c.rlen = 0;
            match c.sent_at.take() {
                Some(at) if wire::matches(&c.sbuf, &c.rbuf) => {
                    self.m.msgs_ok += 1;
                    Progress::inc(&self.progress.completed);
                    if !c.lost_marked {
                        self.m.latency.record_duration(at.elapsed());
                    }
                }
                _ => {
                    self.m.corrupted += 1;
                    Progress::inc(&self.progress.corrupted);
                }
            }
            c.lost_marked = false;
        }
        self.arm_recv(slot)
    }

    fn finish(mut self) -> Result<Measurement> {
        for c in &mut self.conns {
            match c.state {
                State::Open if c.sent_at.is_some() && !c.lost_marked => {
                    self.m.lost += 1;
                    Progress::inc(&self.progress.lost);
                }
                State::Connecting => {
                    self.m.failed.add(Cause::Timeout);
                    Progress::inc(&self.progress.failed);
                }
                _ => {}
            }
        }
        let fds = self.conns.iter().filter_map(|c| c.fd.as_ref().map(|f| f.as_raw_fd()));
        let drained = drain_ring(&mut self.ring, fds);
        self.m.window_s = self.plan.start.elapsed().as_secs_f64();
        let m = std::mem::take(&mut self.m);
        self.progress.open.fetch_sub(self.open, std::sync::atomic::Ordering::Relaxed);
        if !drained {
            // The kernel still holds operations pointing into `conns`: leak
            // the buffers rather than free memory it may write to.
            std::mem::forget(std::mem::take(&mut self.conns));
        }
        Ok(m)
    }
}
