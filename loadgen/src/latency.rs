//! `ringload latency`: fixed-rate request/response over persistent
//! connections, with percentiles corrected for coordinated omission the way
//! wrk2 does it: every request has an intended send time on a fixed
//! schedule (connection `i` of `C` sends at `t0 + (i/C + k) × C/R`), and its
//! latency is measured from that intended time, not from when it actually
//! went out. A slow response therefore also charges the requests it
//! delayed. The uncorrected latency (from the actual send) is reported too.
//!
//! One request is outstanding per connection (no pipelining, like wrk2); a
//! request due while the previous one is outstanding is sent as soon as the
//! response arrives. At the end no request is started; outstanding ones get
//! up to [`DRAIN`] and then count as lost. Connections are not reconnected;
//! one that fails counts as dropped.
//!
//! Invariants: timers are keyed by slot and the slot's generation; each
//! slot's [`Exchange`] buffers and the endpoints' sockaddrs live until the
//! ring has nothing in flight.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use io_uring::{opcode, types};

use crate::cli::{ClientArgs, LatencyArgs};
use crate::dial;
use crate::rate::cause_of;
use crate::ring::{Completion, Op, Ring, Tag, errno};
use crate::run::{ClientMode, WorkerPlan, drain_ring};
use crate::stats::{Cause, Measurement, Progress};
use crate::wire::{Exchange, HEADER};

pub const DRAIN: Duration = Duration::from_secs(2);

impl ClientMode for LatencyArgs {
    fn name(&self) -> &'static str {
        "latency"
    }
    fn client(&self) -> &ClientArgs {
        &self.client
    }
    fn conns(&self) -> u64 {
        self.conns
    }
    fn validate(&self) -> Result<()> {
        anyhow::ensure!(self.conns > 0, "--conns must be at least 1");
        anyhow::ensure!(self.size >= HEADER as u64, "--size must be at least {HEADER} bytes (the message header)");
        anyhow::ensure!(
            self.rate / self.conns as f64 <= 1e6,
            "--rate {} over {} connections is more than 1M requests/s per connection; add --conns",
            self.rate,
            self.conns
        );
        Ok(())
    }
    fn run_worker(&self, plan: &WorkerPlan, progress: &Progress) -> Result<Measurement> {
        Worker::new(self, plan, progress)?.run()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Connecting,
    Open,
    Done,
}

struct Conn {
    fd: Option<OwnedFd>,
    state: State,
    started: Instant,
    /// Schedule origin: intended time of request `k` is `base + k × interval`.
    base: Instant,
    /// Requests sent so far (the next one is number `next`).
    next: u64,
    outstanding: bool,
    sent_at: Instant,
    intended: Instant,
    x: Exchange,
}

struct Worker<'a> {
    // Field order matters: the ring is dropped before the buffers it may use.
    ring: Ring,
    conns: Vec<Conn>,
    timeout: types::Timespec,
    timers: BinaryHeap<Reverse<(Instant, u32)>>,
    interval: Duration,
    total_conns: u64,
    plan: &'a WorkerPlan,
    progress: &'a Progress,
    m: Measurement,
    open: u64,
    stopping: bool,
}

impl<'a> Worker<'a> {
    fn new(args: &LatencyArgs, plan: &'a WorkerPlan, progress: &'a Progress) -> Result<Self> {
        let now = Instant::now();
        Ok(Worker {
            ring: Ring::new(4096).context("creating the io_uring for a latency worker")?,
            conns: (0..plan.conns)
                .map(|_| Conn {
                    fd: None,
                    state: State::Done,
                    started: now,
                    base: now,
                    next: 0,
                    outstanding: false,
                    sent_at: now,
                    intended: now,
                    x: Exchange::new(args.size as usize),
                })
                .collect(),
            timeout: types::Timespec::from(plan.connect_timeout),
            timers: BinaryHeap::new(),
            // Each connection sends every C/R seconds, so all C send R/s.
            interval: Duration::from_secs_f64(args.conns as f64 / args.rate),
            total_conns: args.conns,
            plan,
            progress,
            m: Measurement { planned: plan.conns, ..Default::default() },
            open: 0,
            stopping: false,
        })
    }

    fn run(mut self) -> Result<Measurement> {
        for i in 0..self.conns.len() as u32 {
            self.dial(i)?;
        }
        while Instant::now() < self.plan.deadline && !crate::stop::requested() {
            let now = Instant::now();
            while let Some(&Reverse((at, slot))) = self.timers.peek() {
                if at > now {
                    break;
                }
                self.timers.pop();
                self.send_due(slot, now)?;
            }
            let mut wait = self.plan.deadline.saturating_duration_since(now).min(Duration::from_millis(100));
            if let Some(&Reverse((at, _))) = self.timers.peek() {
                wait = wait.min(at.saturating_duration_since(now));
            }
            self.poll(wait)?;
        }
        self.stopping = true;
        let window_end = Instant::now();
        let end = window_end + DRAIN;
        while Instant::now() < end
            && self.conns.iter().any(|c| c.state == State::Connecting || (c.state == State::Open && c.outstanding))
        {
            self.poll(Duration::from_millis(20))?;
        }
        self.m.window_s = (window_end - self.plan.start).as_secs_f64();
        for c in &self.conns {
            match c.state {
                State::Open if c.outstanding => {
                    self.m.lost += 1;
                    Progress::inc(&self.progress.lost);
                }
                State::Connecting => self.m.failed.add(Cause::Timeout),
                _ => {}
            }
        }
        let fds: Vec<_> = self.conns.iter().filter_map(|c| c.fd.as_ref().map(|f| f.as_raw_fd())).collect();
        let drained = drain_ring(&mut self.ring, fds.into_iter());
        self.progress.open.fetch_sub(self.open, std::sync::atomic::Ordering::Relaxed);
        let m = std::mem::take(&mut self.m);
        if !drained {
            // The kernel still holds operations pointing into the buffers: leak them.
            std::mem::forget(std::mem::take(&mut self.conns));
        }
        Ok(m)
    }

    fn poll(&mut self, wait: Duration) -> Result<()> {
        let cs: Vec<Completion> = self.ring.wait(1, wait)?.to_vec();
        for c in cs {
            self.complete(c)?;
        }
        Ok(())
    }

    fn dial(&mut self, i: u32) -> Result<()> {
        self.m.attempted += 1;
        Progress::inc(&self.progress.attempted);
        let (src, t) = self.plan.endpoints.pick(self.plan.local_first + u64::from(i));
        match dial::open_socket(src, &self.plan.endpoints.targets[t]) {
            Err(e) => {
                self.m.failed.add(Cause::from_errno(e));
                Progress::inc(&self.progress.failed);
            }
            Ok(fd) => {
                let c = &mut self.conns[i as usize];
                c.state = State::Connecting;
                c.started = Instant::now();
                // SAFETY: sockaddr in `self.plan.endpoints` and timespec in
                // `self.timeout` live, unmodified, for the worker's life; the
                // fd is kept in the slot until the ring is drained.
                unsafe {
                    dial::push_connect(&mut self.ring, &fd, &self.plan.endpoints.target_addrs[t], &self.timeout, i, 0)?
                };
                c.fd = Some(fd);
            }
        }
        Ok(())
    }

    fn intended(&self, c: &Conn) -> Instant {
        c.base + self.interval.mul_f64(c.next as f64)
    }

    /// The timer of `slot` fired: send its next request if none is outstanding.
    fn send_due(&mut self, slot: u32, now: Instant) -> Result<()> {
        let c = &self.conns[slot as usize];
        if c.state != State::Open || c.outstanding || self.stopping {
            return Ok(());
        }
        let intended = self.intended(c);
        if intended > now {
            self.timers.push(Reverse((intended, slot)));
            return Ok(());
        }
        let id = self.plan.first_id + u64::from(slot);
        let c = &mut self.conns[slot as usize];
        c.next += 1;
        c.outstanding = true;
        c.intended = intended;
        c.sent_at = now;
        c.x.prepare(id, c.next);
        self.m.msgs_sent += 1;
        self.push_send(slot)?;
        self.push_recv(slot)
    }

    fn complete(&mut self, cq: Completion) -> Result<()> {
        let slot = cq.tag.slot;
        let Some(c) = self.conns.get(slot as usize) else {
            return Ok(());
        };
        match (cq.tag.op, c.state) {
            (Op::Connect, State::Connecting) => {
                if cq.result < 0 {
                    self.m.failed.add(Cause::from_errno(errno(cq.result)));
                    Progress::inc(&self.progress.failed);
                    self.conns[slot as usize].state = State::Done;
                    return Ok(());
                }
                let now = Instant::now();
                self.m.connect_latency.record_duration(now - c.started);
                // Spread connections over the interval: i/C of a period.
                let global = self.plan.first_id + u64::from(slot);
                let phase = self.interval.mul_f64((global % self.total_conns) as f64 / self.total_conns as f64);
                let c = &mut self.conns[slot as usize];
                c.state = State::Open;
                c.base = now + phase;
                self.m.established += 1;
                self.open += 1;
                self.m.peak_open = self.m.peak_open.max(self.open);
                Progress::inc(&self.progress.established);
                Progress::inc(&self.progress.open);
                let at = c.base;
                self.timers.push(Reverse((at, slot)));
                Ok(())
            }
            (Op::Send, State::Open) => {
                if cq.result <= 0 {
                    return self.end(slot, cause_of(cq.result, false));
                }
                if !self.conns[slot as usize].x.sent_bytes(cq.result as usize) {
                    return self.push_send(slot);
                }
                Ok(())
            }
            (Op::Recv, State::Open) => {
                if cq.result <= 0 {
                    return self.end(slot, cause_of(cq.result, true));
                }
                let c = &mut self.conns[slot as usize];
                match c.x.received(cq.result as usize) {
                    None => self.push_recv(slot),
                    Some(ok) => {
                        let now = Instant::now();
                        c.outstanding = false;
                        if ok {
                            self.m.msgs_ok += 1;
                        } else {
                            self.m.corrupted += 1;
                            Progress::inc(&self.progress.corrupted);
                        }
                        self.m.latency.record_duration(now - c.intended);
                        self.m.latency_uncorrected.record_duration(now - c.sent_at);
                        self.m.completed += 1;
                        Progress::inc(&self.progress.completed);
                        let next = self.intended(&self.conns[slot as usize]);
                        if next <= now {
                            self.send_due(slot, now)
                        } else {
                            self.timers.push(Reverse((next, slot)));
                            Ok(())
                        }
                    }
                }
            }
            _ => Ok(()),
        }
    }

    fn end(&mut self, slot: u32, cause: Cause) -> Result<()> {
        let c = &mut self.conns[slot as usize];
        c.state = State::Done;
        c.outstanding = false;
        self.m.dropped.add(cause);
        self.open -= 1;
        Progress::dec(&self.progress.open);
        Progress::inc(&self.progress.failed);
        Ok(())
    }

    fn push_send(&mut self, slot: u32) -> Result<()> {
        let c = &self.conns[slot as usize];
        let Some(fd) = c.fd.as_ref() else {
            return Ok(());
        };
        let (ptr, len) = c.x.send_window();
        let e = opcode::Send::new(types::Fd(fd.as_raw_fd()), ptr, len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(Tag::new(slot, 0, Op::Send).encode());
        // SAFETY: the request lives in the slot's Exchange (allocated once,
        // kept until the ring is drained) and is only rewritten for the next
        // request, after this one's echo arrived (so after this send completed).
        unsafe { self.ring.push(&e)? };
        Ok(())
    }

    fn push_recv(&mut self, slot: u32) -> Result<()> {
        let c = &mut self.conns[slot as usize];
        let Some(fd) = c.fd.as_ref().map(|f| f.as_raw_fd()) else {
            return Ok(());
        };
        let (ptr, len) = c.x.recv_window();
        let e = opcode::Recv::new(types::Fd(fd), ptr, len).build().user_data(Tag::new(slot, 0, Op::Recv).encode());
        // SAFETY: the echo buffer lives in the slot's Exchange (allocated
        // once, kept until the ring is drained); one recv per slot at a time.
        unsafe { self.ring.push(&e)? };
        Ok(())
    }
}
