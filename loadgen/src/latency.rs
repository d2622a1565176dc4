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
//! Invariants: timers are keyed by slot; a connection is dialed once and
//! never reconnected, so a slot is one connection for the whole run. A
//! request stays in its slot's [`Exchange`], unchanged until its echo is
//! back. The shared [`ClientWorker`] owns the slots, buffers and sockets.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::cli::{ClientArgs, LatencyArgs};
use crate::client::{ClientWorker, Event, State};
use crate::exchange::HasExchange;
use crate::run::{ClientMode, WorkerPlan};
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

/// A connection's request schedule and its exchange.
struct Conn {
    /// Schedule origin: intended time of request `k` (counted from 0) is
    /// `base + k × interval`; `x.seq` requests were sent so far.
    base: Instant,
    outstanding: bool,
    sent_at: Instant,
    intended: Instant,
    x: Exchange,
}

impl HasExchange for Conn {
    fn exchange(&mut self) -> &mut Exchange {
        &mut self.x
    }
}

struct Worker<'a> {
    w: ClientWorker<'a, Conn>,
    timers: BinaryHeap<Reverse<(Instant, u32)>>,
    interval: Duration,
    total_conns: u64,
    stopping: bool,
}

impl<'a> Worker<'a> {
    fn new(args: &LatencyArgs, plan: &'a WorkerPlan, progress: &'a Progress) -> Result<Self> {
        let now = Instant::now();
        let w = ClientWorker::new("latency", plan, progress, 4096, (), || Conn {
            base: now,
            outstanding: false,
            sent_at: now,
            intended: now,
            x: Exchange::new(args.size as usize),
        })?;
        Ok(Worker {
            w,
            timers: BinaryHeap::new(),
            // Each connection sends every C/R seconds, so all C send R/s.
            interval: Duration::from_secs_f64(args.conns as f64 / args.rate),
            total_conns: args.conns,
            stopping: false,
        })
    }

    fn run(mut self) -> Result<Measurement> {
        let plan = self.w.plan();
        for i in 0..plan.conns as u32 {
            self.w.dial(i)?;
        }
        while Instant::now() < plan.deadline && !crate::stop::requested() {
            let now = Instant::now();
            while let Some(&Reverse((at, slot))) = self.timers.peek() {
                if at > now {
                    break;
                }
                self.timers.pop();
                self.send_due(slot, now)?;
            }
            let mut wait = plan.deadline.saturating_duration_since(now).min(Duration::from_millis(100));
            if let Some(&Reverse((at, _))) = self.timers.peek() {
                wait = wait.min(at.saturating_duration_since(now));
            }
            self.poll(wait)?;
        }
        self.stopping = true;
        let window_end = Instant::now();
        let end = window_end + DRAIN;
        while Instant::now() < end && self.w.slots().any(|s| s.state() == State::Connecting || awaited(s)) {
            self.poll(Duration::from_millis(20))?;
        }
        self.w.m().window_s = (window_end - plan.start).as_secs_f64();
        let lost = self.w.slots().filter(|s| awaited(s)).count() as u64;
        self.w.m().lost += lost;
        Progress::add(&self.w.progress().lost, lost);
        self.w.fail_pending_connects();
        Ok(self.w.finish())
    }

    fn poll(&mut self, wait: Duration) -> Result<()> {
        for e in self.w.poll(wait)? {
            match e {
                Event::Connected(slot) => self.connected(slot),
                Event::ConnectFailed(_) => {}
                Event::Sent(slot, res) if res <= 0 => self.end(slot, Cause::from_result(res, false)),
                Event::Sent(slot, res) => self.w.exchange_sent(slot, res as usize)?,
                Event::Received(slot, res) if res <= 0 => self.end(slot, Cause::from_result(res, true)),
                Event::Received(slot, res) => self.received(slot, res as usize)?,
            }
        }
        Ok(())
    }

    fn intended(&self, c: &Conn) -> Instant {
        c.base + self.interval.mul_f64(c.x.seq as f64)
    }

    /// Spread connections over the interval (connection i of C starts i/C
    /// of a period late) and schedule the first request.
    fn connected(&mut self, slot: u32) {
        let global = self.w.plan().first_id + u64::from(slot);
        let phase = self.interval.mul_f64((global % self.total_conns) as f64 / self.total_conns as f64);
        let c = self.w.conn_mut(slot).0;
        c.base = Instant::now() + phase;
        let at = c.base;
        self.timers.push(Reverse((at, slot)));
    }

    /// The timer of `slot` fired: send its next request if none is outstanding.
    fn send_due(&mut self, slot: u32, now: Instant) -> Result<()> {
        let c = self.w.conn(slot);
        if self.w.state(slot) != State::Open || c.outstanding || self.stopping {
            return Ok(());
        }
        let intended = self.intended(c);
        if intended > now {
            self.timers.push(Reverse((intended, slot)));
            return Ok(());
        }
        let id = self.w.plan().first_id + u64::from(slot);
        let c = self.w.conn_mut(slot).0;
        c.outstanding = true;
        c.intended = intended;
        c.sent_at = now;
        self.w.start_exchange(slot, id)
    }

    /// `n` more bytes of the echo arrived.
    fn received(&mut self, slot: u32, n: usize) -> Result<()> {
        if self.w.exchange_received(slot, n)?.is_none() {
            return Ok(());
        }
        let now = Instant::now();
        let (c, m) = self.w.conn_mut(slot);
        c.outstanding = false;
        m.latency.record_duration(now - c.intended);
        m.latency_uncorrected.record_duration(now - c.sent_at);
        let next = self.intended(self.w.conn(slot));
        if next <= now {
            self.send_due(slot, now)
        } else {
            self.timers.push(Reverse((next, slot)));
            Ok(())
        }
    }

    fn end(&mut self, slot: u32, cause: Cause) {
        self.w.conn_mut(slot).0.outstanding = false;
        self.w.drop_conn(slot, cause);
        Progress::inc(&self.w.progress().failed);
    }
}

/// An Open connection with a request whose response is due.
fn awaited(s: &crate::client::Slot<Conn>) -> bool {
    s.state() == State::Open && s.conn.outstanding
}
