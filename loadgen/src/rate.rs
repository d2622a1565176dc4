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
//! Invariants: each loop is one slot of the shared [`ClientWorker`], which
//! bumps the slot's generation for every new connection in it (so
//! completions of an earlier connection are dropped) and owns the slots'
//! [`Exchange`] buffers and sockets.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::cli::{ClientArgs, RateArgs};
use crate::client::{ClientWorker, Event, State};
use crate::run::{ClientMode, WorkerPlan};
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

struct Worker<'a> {
    w: ClientWorker<'a, Exchange>,
    retry: VecDeque<(Instant, u32)>,
    draining: bool,
}

impl<'a> Worker<'a> {
    fn new(args: &RateArgs, plan: &'a WorkerPlan, progress: &'a Progress) -> Result<Self> {
        let w = ClientWorker::new("rate", plan, progress, 4096, (), || Exchange::new(args.size as usize))?;
        Ok(Worker { w, retry: VecDeque::new(), draining: false })
    }

    fn run(mut self) -> Result<Measurement> {
        let plan = self.w.plan();
        for slot in 0..plan.conns as u32 {
            self.dial(slot)?;
        }
        while Instant::now() < plan.deadline && !crate::stop::requested() {
            let now = Instant::now();
            while let Some(&(at, slot)) = self.retry.front() {
                if at > now {
                    break;
                }
                self.retry.pop_front();
                self.dial(slot)?;
            }
            let mut wait = plan.deadline.saturating_duration_since(now).min(Duration::from_millis(100));
            if let Some(&(at, _)) = self.retry.front() {
                wait = wait.min(at.saturating_duration_since(now));
            }
            self.poll(wait)?;
        }
        self.draining = true;
        let end = Instant::now() + DRAIN;
        while Instant::now() < end && self.w.slots().any(|s| s.state() != State::Idle) {
            self.poll(Duration::from_millis(20))?;
        }
        self.w.m().window_s = plan.start.elapsed().as_secs_f64();
        let lost = self.w.slots().filter(|s| s.state() == State::Open && s.conn.sent > 0).count() as u64;
        self.w.m().lost += lost;
        self.w.fail_pending_connects();
        let m = self.w.m();
        m.planned = m.attempted;
        Ok(self.w.finish())
    }

    fn poll(&mut self, wait: Duration) -> Result<()> {
        for e in self.w.poll(wait)? {
            match e {
                Event::Connected(slot) => self.w.start_exchange(slot, self.w.plan().first_id + u64::from(slot))?,
                Event::ConnectFailed(slot) => self.retry_later(slot),
                Event::Sent(slot, res) if res <= 0 => self.recycle(slot, Some(Cause::from_result(res, false)))?,
                Event::Sent(slot, res) => self.w.exchange_sent(slot, res as usize)?,
                Event::Received(slot, res) if res <= 0 => self.recycle(slot, Some(Cause::from_result(res, true)))?,
                Event::Received(slot, res) => self.received(slot, res as usize)?,
            }
        }
        Ok(())
    }

    fn dial(&mut self, slot: u32) -> Result<()> {
        if !self.draining && !self.w.dial(slot)? {
            self.retry_later(slot);
        }
        Ok(())
    }

    fn retry_later(&mut self, slot: u32) {
        self.retry.push_back((Instant::now() + RETRY_DELAY, slot));
    }

    /// `n` more bytes of the echo arrived.
    fn received(&mut self, slot: u32, n: usize) -> Result<()> {
        if self.w.exchange_received(slot, n)?.is_none() {
            return Ok(());
        }
        // The exchange's latency runs from the start of its connect.
        let started = self.w.connect_started(slot);
        self.w.m().latency.record_duration(started.elapsed());
        self.recycle(slot, None)
    }

    /// End the slot's connection and start the next one (after
    /// [`RETRY_DELAY`] if it ended early, counted as dropped by `dropped`).
    fn recycle(&mut self, slot: u32, dropped: Option<Cause>) -> Result<()> {
        let Some(cause) = dropped else {
            self.w.close(slot);
            return self.dial(slot);
        };
        self.w.drop_conn(slot, cause);
        Progress::inc(&self.w.progress().failed);
        self.retry_later(slot);
        Ok(())
    }
}
