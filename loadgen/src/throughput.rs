//! `ringload throughput`: bulk transfer over `--streams` TCP connections.
//! `up` sends a constant pattern as fast as the socket takes it (pair with
//! `serve --mode sink`), `down` only reads (pair with `serve --mode
//! source`), `both` does both (pair with `source`, or `echo`). Every stream
//! always reads, so an echoing backend never stalls; bytes read count as
//! `down`. Gbit/s = bytes × 8 / measured seconds, per direction.
//!
//! Invariants: one send and one recv at most in flight per stream, from
//! per-worker buffers (a read-only pattern and a discard buffer) that the
//! shared [`ClientWorker`] owns with the streams' sockets; streams are not
//! reconnected, a stream that ends early counts as dropped.

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::cli::{ClientArgs, Direction, ThroughputArgs};
use crate::client::{ClientWorker, Event, State};
use crate::run::{ClientMode, WorkerPlan};
use crate::stats::{Cause, Measurement, Progress};

impl ClientMode for ThroughputArgs {
    fn name(&self) -> &'static str {
        "throughput"
    }
    fn client(&self) -> &ClientArgs {
        &self.client
    }
    fn conns(&self) -> u64 {
        self.streams
    }
    fn validate(&self) -> Result<()> {
        anyhow::ensure!(self.streams > 0, "--streams must be at least 1");
        Ok(())
    }
    fn run_worker(&self, plan: &WorkerPlan, progress: &Progress) -> Result<Measurement> {
        Worker::new(self, plan, progress)?.run()
    }
}

/// Every stream's buffers: what it sends and where what it reads goes.
struct Buffers {
    /// Never written after creation.
    pattern: Box<[u8]>,
    /// Never read: received bytes are only counted.
    scratch: Box<[u8]>,
}

/// One stream: whether a send of it is in flight (the kernel may still be sending when the window
/// closes).
#[derive(Default)]
struct Stream {
    sending: bool,
}

struct Worker<'a> {
    w: ClientWorker<'a, Stream, Buffers>,
    send: bool,
}

/// How long the end of a run waits for the sends in flight to complete (and be counted).
const LAST_SENDS: Duration = Duration::from_secs(2);

impl<'a> Worker<'a> {
    fn new(args: &ThroughputArgs, plan: &'a WorkerPlan, progress: &'a Progress) -> Result<Self> {
        let chunk = args.chunk as usize;
        let buffers = Buffers {
            pattern: (0..chunk).map(|i| (i % 251) as u8).collect(),
            scratch: vec![0u8; chunk].into_boxed_slice(),
        };
        let w = ClientWorker::new("throughput", plan, progress, 1024, buffers, Stream::default)?;
        Ok(Worker { w, send: args.direction != Direction::Down })
    }

    fn run(mut self) -> Result<Measurement> {
        let plan = self.w.plan();
        for i in 0..plan.conns as u32 {
            self.w.dial(i)?;
        }
        while Instant::now() < plan.deadline && !crate::stop::requested() {
            let wait = plan.deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(100));
            for e in self.w.poll(wait)? {
                self.on(e)?;
            }
        }
        self.w.m().window_s = plan.start.elapsed().as_secs_f64();
        self.w.fail_pending_connects();
        // A send in flight may already have handed its bytes to the kernel, which delivers them:
        // count it when it completes (no new one starts), so what was sent equals what the other
        // end reads — at most one chunk per stream beyond the window. Meanwhile the streams go on
        // reading (what they read is no longer counted): a client that stopped reading here would
        // leave the far end, and any proxy between, with streams whose destination is stuck for
        // the last moments of every run (which a proxy rightly treats as such: on 2026-12-07,
        // most of what ringproxy copied out of its receive buffers with 1,000 flows was copied
        // then).
        self.send = false;
        let until = Instant::now() + LAST_SENDS;
        let sending =
            |w: &ClientWorker<'_, Stream, Buffers>| w.slots().any(|s| s.state() == State::Open && s.conn.sending);
        while sending(&self.w) && Instant::now() < until {
            for e in self.w.poll(Duration::from_millis(50))? {
                match e {
                    Event::Sent(..) => self.on(e)?,
                    // (An end here is the run's own end: not counted as a drop.)
                    Event::Received(i, res) if res > 0 => self.push_recv(i)?,
                    _ => {}
                }
            }
        }
        Ok(self.w.finish())
    }

    fn on(&mut self, e: Event) -> Result<()> {
        let progress = self.w.progress();
        match e {
            Event::Connected(i) => {
                if self.send {
                    self.push_send(i)?;
                }
                self.push_recv(i)
            }
            Event::ConnectFailed(_) => Ok(()),
            Event::Sent(i, res) if res <= 0 => {
                self.w.conn_mut(i).0.sending = false;
                self.end(i, Cause::from_result(res, false))
            }
            Event::Sent(i, res) => {
                self.w.conn_mut(i).0.sending = false;
                self.w.m().up_bytes += res as u64;
                Progress::add(&progress.up_bytes, res as u64);
                if self.send { self.push_send(i) } else { Ok(()) }
            }
            Event::Received(i, res) if res <= 0 => self.end(i, Cause::from_result(res, true)),
            Event::Received(i, res) => {
                self.w.m().down_bytes += res as u64;
                Progress::add(&progress.down_bytes, res as u64);
                self.push_recv(i)
            }
        }
    }

    /// The stream ended early: dropped (and shown among the failures).
    fn end(&mut self, i: u32, cause: Cause) -> Result<()> {
        self.w.drop_conn(i, cause);
        Progress::inc(&self.w.progress().failed);
        Ok(())
    }

    fn push_send(&mut self, i: u32) -> Result<()> {
        self.w.conn_mut(i).0.sending = true;
        // SAFETY: `pattern` is never written.
        unsafe { self.w.send(i, |_, b| &b.pattern[..]) }
    }

    fn push_recv(&mut self, i: u32) -> Result<()> {
        // SAFETY: `scratch` is a discard buffer: receives of several streams
        // may write it at once, and nothing ever reads it.
        unsafe { self.w.recv(i, |_, b| &mut b.scratch[..]) }
    }
}
