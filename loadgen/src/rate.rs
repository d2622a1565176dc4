//! `ringload rate`: connection rate. Each of `--concurrency` loops connects,
//! sends one sequenced message, reads the whole echo, checks it, closes, and
//! starts over until the run ends. Reports completed connections per second
//! and the latency of the whole exchange (connect start to last echo byte).
//!
//! A failed connect is counted by cause and retried after [`RETRY_DELAY`];
//! a connection that errors or is closed before the echo is complete counts
//! as dropped. At the end no new connection starts; exchanges in flight get
//! up to [`DRAIN`] to finish, then those whose message was sent but not
//! fully echoed count as lost.
//!
//! Invariants: a slot's generation is bumped for every new connection in it,
//! so completions of an earlier connection are ignored; each slot's
//! [`Exchange`] buffers and the endpoints' sockaddrs are allocated before the
//! ring starts and freed only after it has nothing in flight.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use io_uring::{opcode, types};

use crate::cli::{ClientArgs, RateArgs};
use crate::dial;
use crate::ring::{Completion, Op, Ring, Tag, errno, next_generation};
use crate::run::{ClientMode, WorkerPlan, drain_ring};
use crate::stats::{Cause, Measurement, Progress};
use crate::wire::{Exchange, HEADER};

pub const RETRY_DELAY: Duration = Duration::from_millis(10);
pub const DRAIN: Duration = Duration::from_secs(2);

impl ClientMode for RateArgs {
    fn name(&self) -> &'static str {
        "rate"
    }
    fn client(&self) -> &ClientArgs {
        &self.client
    }
    fn conns(&self) -> u64 {
        self.concurrency
    }
    fn validate(&self) -> Result<()> {
        anyhow::ensure!(self.concurrency > 0, "--concurrency must be at least 1");
        anyhow::ensure!(self.size >= HEADER as u64, "--size must be at least {HEADER} bytes (the message header)");
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
}

struct Slot {
    fd: Option<OwnedFd>,
    generation: u32,
    state: State,
    started: Instant,
    seq: u64,
    x: Exchange,
}

struct Worker<'a> {
    // Field order matters: the ring is dropped before the buffers it may use.
    ring: Ring,
    slots: Vec<Slot>,
    timeout: types::Timespec,
    retry: VecDeque<(Instant, u32)>,
    plan: &'a WorkerPlan,
    progress: &'a Progress,
    m: Measurement,
    dials: u64,
    open: u64,
    draining: bool,
}

impl<'a> Worker<'a> {
    fn new(args: &RateArgs, plan: &'a WorkerPlan, progress: &'a Progress) -> Result<Self> {
        let now = Instant::now();
        Ok(Worker {
            ring: Ring::new(4096).context("creating the io_uring for a rate worker")?,
            slots: (0..plan.conns)
                .map(|_| Slot {
                    fd: None,
                    generation: 0,
                    state: State::Idle,
                    started: now,
                    seq: 0,
                    x: Exchange::new(args.size as usize),
                })
                .collect(),
            timeout: types::Timespec::from(plan.connect_timeout),
            retry: VecDeque::new(),
            plan,
            progress,
            m: Measurement::default(),
            dials: 0,
            open: 0,
            draining: false,
        })
    }

    fn run(mut self) -> Result<Measurement> {
        for slot in 0..self.slots.len() as u32 {
            self.dial(slot)?;
        }
        while Instant::now() < self.plan.deadline && !crate::stop::requested() {
            let now = Instant::now();
            while let Some(&(at, slot)) = self.retry.front() {
                if at > now {
                    break;
                }
                self.retry.pop_front();
                self.dial(slot)?;
            }
            let mut wait = self.plan.deadline.saturating_duration_since(now).min(Duration::from_millis(100));
            if let Some(&(at, _)) = self.retry.front() {
                wait = wait.min(at.saturating_duration_since(now));
            }
            self.poll(wait)?;
        }
        self.draining = true;
        let end = Instant::now() + DRAIN;
        while Instant::now() < end && self.slots.iter().any(|s| s.state != State::Idle) {
            self.poll(Duration::from_millis(20))?;
        }
        self.m.window_s = self.plan.start.elapsed().as_secs_f64();
        for s in &self.slots {
            match s.state {
                State::Open if s.x.sent > 0 => self.m.lost += 1,
                State::Connecting => self.m.failed.add(Cause::Timeout),
                _ => {}
            }
        }
        self.m.planned = self.m.attempted;
        let fds: Vec<_> = self.slots.iter().filter_map(|s| s.fd.as_ref().map(|f| f.as_raw_fd())).collect();
        let drained = drain_ring(&mut self.ring, fds.into_iter());
        self.progress.open.fetch_sub(self.open, std::sync::atomic::Ordering::Relaxed);
        let m = std::mem::take(&mut self.m);
        if !drained {
            // The kernel still holds operations pointing into the slots: leak them.
            std::mem::forget(std::mem::take(&mut self.slots));
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

    fn dial(&mut self, slot: u32) -> Result<()> {
        if self.draining {
            return Ok(());
        }
        let n = self.plan.local_first + self.dials;
        self.dials += 1;
        self.m.attempted += 1;
        Progress::inc(&self.progress.attempted);
        let (src, t) = self.plan.endpoints.pick(n);
        match dial::open_socket(src, &self.plan.endpoints.targets[t]) {
            Err(e) => self.failed(slot, Cause::from_errno(e)),
            Ok(fd) => {
                let s = &mut self.slots[slot as usize];
                s.generation = next_generation(s.generation);
                s.state = State::Connecting;
                s.started = Instant::now();
                // SAFETY: the sockaddr lives in `self.plan.endpoints` and the
                // timespec in `self.timeout`, both unmodified for the worker's
                // life; the fd is kept in the slot until the connect completes
                // or the worker has drained the ring.
                unsafe {
                    dial::push_connect(
                        &mut self.ring,
                        &fd,
                        &self.plan.endpoints.target_addrs[t],
                        &self.timeout,
                        slot,
                        s.generation,
                    )?
                };
                s.fd = Some(fd);
                Ok(())
            }
        }
    }

    fn failed(&mut self, slot: u32, cause: Cause) -> Result<()> {
        self.m.failed.add(cause);
        Progress::inc(&self.progress.failed);
        let s = &mut self.slots[slot as usize];
        s.fd = None;
        s.state = State::Idle;
        self.retry.push_back((Instant::now() + RETRY_DELAY, slot));
        Ok(())
    }

    /// End the slot's connection (closing the fd) and start the next one.
    fn recycle(&mut self, slot: u32, dropped: Option<Cause>) -> Result<()> {
        let s = &mut self.slots[slot as usize];
        if s.state == State::Open {
            self.open -= 1;
            Progress::dec(&self.progress.open);
        }
        s.state = State::Idle;
        // Ops still in flight on this fd keep their own file reference and
        // their buffers stay in `self.slots`; their completions are stale.
        s.fd = None;
        if let Some(c) = dropped {
            self.m.dropped.add(c);
            Progress::inc(&self.progress.failed);
            self.retry.push_back((Instant::now() + RETRY_DELAY, slot));
            return Ok(());
        }
        self.dial(slot)
    }

    fn complete(&mut self, c: Completion) -> Result<()> {
        let slot = c.tag.slot;
        let Some(s) = self.slots.get(slot as usize) else {
            return Ok(());
        };
        if s.generation != c.tag.generation || s.state == State::Idle {
            return Ok(());
        }
        match c.tag.op {
            Op::Connect if s.state == State::Connecting => {
                if c.result < 0 {
                    return self.failed(slot, Cause::from_errno(errno(c.result)));
                }
                let id = self.plan.first_id + u64::from(slot);
                let s = &mut self.slots[slot as usize];
                s.state = State::Open;
                s.seq += 1;
                s.x.prepare(id, s.seq);
                self.m.connect_latency.record_duration(s.started.elapsed());
                self.m.established += 1;
                self.m.msgs_sent += 1;
                self.open += 1;
                self.m.peak_open = self.m.peak_open.max(self.open);
                Progress::inc(&self.progress.established);
                Progress::inc(&self.progress.open);
                self.push_send(slot)?;
                self.push_recv(slot)
            }
            Op::Send if s.state == State::Open => {
                if c.result <= 0 {
                    return self.recycle(slot, Some(cause_of(c.result, false)));
                }
                if !self.slots[slot as usize].x.sent_bytes(c.result as usize) {
                    return self.push_send(slot);
                }
                Ok(())
            }
            Op::Recv if s.state == State::Open => {
                if c.result <= 0 {
                    return self.recycle(slot, Some(cause_of(c.result, true)));
                }
                match self.slots[slot as usize].x.received(c.result as usize) {
                    None => self.push_recv(slot),
                    Some(ok) => {
                        if ok {
                            self.m.msgs_ok += 1;
                        } else {
                            self.m.corrupted += 1;
                            Progress::inc(&self.progress.corrupted);
                        }
                        self.m.completed += 1;
                        Progress::inc(&self.progress.completed);
                        let started = self.slots[slot as usize].started;
                        self.m.latency.record_duration(started.elapsed());
                        self.recycle(slot, None)
                    }
                }
            }
            _ => Ok(()),
        }
    }

    fn push_send(&mut self, slot: u32) -> Result<()> {
        let s = &self.slots[slot as usize];
        let Some(fd) = s.fd.as_ref() else {
            return Ok(());
        };
        let (ptr, len) = s.x.send_window();
        let e = opcode::Send::new(types::Fd(fd.as_raw_fd()), ptr, len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(Tag::new(slot, s.generation, Op::Send).encode());
        // SAFETY: the message lives in the slot's Exchange (allocated once,
        // kept until the ring is drained) and is not rewritten before the
        // next connection in this slot, after this exchange completed.
        unsafe { self.ring.push(&e)? };
        Ok(())
    }

    fn push_recv(&mut self, slot: u32) -> Result<()> {
        let s = &mut self.slots[slot as usize];
        let generation = s.generation;
        let Some(fd) = s.fd.as_ref().map(|f| f.as_raw_fd()) else {
            return Ok(());
        };
        let (ptr, len) = s.x.recv_window();
        let e =
            opcode::Recv::new(types::Fd(fd), ptr, len).build().user_data(Tag::new(slot, generation, Op::Recv).encode());
        // SAFETY: the echo buffer lives in the slot's Exchange (allocated
        // once, kept until the ring is drained); one recv per slot at a time.
        unsafe { self.ring.push(&e)? };
        Ok(())
    }
}

/// Cause for a send/recv result `<= 0` (0 on recv means the peer closed).
pub fn cause_of(result: i32, recv: bool) -> Cause {
    match result {
        0 if recv => Cause::PeerClosed,
        0 => Cause::Other,
        r => Cause::from_errno(errno(r)),
    }
}
