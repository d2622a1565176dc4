//! `ringload throughput`: bulk transfer over `--streams` TCP connections.
//! `up` sends a constant pattern as fast as the socket takes it (pair with
//! `serve --mode sink`), `down` only reads (pair with `serve --mode
//! source`), `both` does both (pair with `source`, or `echo`). Every stream
//! always reads, so an echoing backend never stalls; bytes read count as
//! `down`. Gbit/s = bytes × 8 / measured seconds, per direction.
//!
//! Invariants: one send and one recv at most in flight per stream, from
//! per-worker buffers (a read-only pattern and a discard buffer) that live
//! until the ring has nothing in flight; streams are not reconnected, a
//! stream that ends early counts as dropped.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use io_uring::{opcode, types};

use crate::cli::{ClientArgs, Direction, ThroughputArgs};
use crate::dial;
use crate::rate::cause_of;
use crate::ring::{Completion, Op, Ring, Tag, errno};
use crate::run::{ClientMode, WorkerPlan, drain_ring};
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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Connecting,
    Open,
    Done,
}

struct Stream {
    fd: Option<OwnedFd>,
    state: State,
    started: Instant,
}

struct Worker<'a> {
    // Field order matters: the ring is dropped before the buffers it may use.
    ring: Ring,
    pattern: Box<[u8]>,
    scratch: Box<[u8]>,
    streams: Vec<Stream>,
    timeout: types::Timespec,
    send: bool,
    plan: &'a WorkerPlan,
    progress: &'a Progress,
    m: Measurement,
    open: u64,
}

impl<'a> Worker<'a> {
    fn new(args: &ThroughputArgs, plan: &'a WorkerPlan, progress: &'a Progress) -> Result<Self> {
        let chunk = args.chunk as usize;
        let pattern: Box<[u8]> = (0..chunk).map(|i| (i % 251) as u8).collect();
        let now = Instant::now();
        Ok(Worker {
            ring: Ring::new(1024).context("creating the io_uring for a throughput worker")?,
            pattern,
            scratch: vec![0u8; chunk].into_boxed_slice(),
            streams: (0..plan.conns).map(|_| Stream { fd: None, state: State::Done, started: now }).collect(),
            timeout: types::Timespec::from(plan.connect_timeout),
            send: args.direction != Direction::Down,
            plan,
            progress,
            m: Measurement { planned: plan.conns, ..Default::default() },
            open: 0,
        })
    }

    fn run(mut self) -> Result<Measurement> {
        for i in 0..self.streams.len() as u32 {
            self.dial(i)?;
        }
        while Instant::now() < self.plan.deadline && !crate::stop::requested() {
            let wait = self.plan.deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(100));
            let cs: Vec<Completion> = self.ring.wait(1, wait)?.to_vec();
            for c in cs {
                self.complete(c)?;
            }
        }
        self.m.window_s = self.plan.start.elapsed().as_secs_f64();
        for s in &mut self.streams {
            if s.state == State::Connecting {
                self.m.failed.add(Cause::Timeout);
            }
            s.state = State::Done;
        }
        let fds: Vec<_> = self.streams.iter().filter_map(|s| s.fd.as_ref().map(|f| f.as_raw_fd())).collect();
        let drained = drain_ring(&mut self.ring, fds.into_iter());
        self.progress.open.fetch_sub(self.open, std::sync::atomic::Ordering::Relaxed);
        let m = std::mem::take(&mut self.m);
        if !drained {
            // The kernel may still use the buffers: leak them.
            std::mem::forget(std::mem::take(&mut self.pattern));
            std::mem::forget(std::mem::take(&mut self.scratch));
        }
        Ok(m)
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
                let s = &mut self.streams[i as usize];
                s.state = State::Connecting;
                s.started = Instant::now();
                // SAFETY: sockaddr in `self.plan.endpoints` and timespec in
                // `self.timeout` live, unmodified, for the worker's life; the
                // fd is kept in the stream until the ring is drained.
                unsafe {
                    dial::push_connect(&mut self.ring, &fd, &self.plan.endpoints.target_addrs[t], &self.timeout, i, 0)?
                };
                s.fd = Some(fd);
            }
        }
        Ok(())
    }

    fn complete(&mut self, c: Completion) -> Result<()> {
        let i = c.tag.slot;
        let Some(s) = self.streams.get(i as usize) else {
            return Ok(());
        };
        match (c.tag.op, s.state) {
            (Op::Connect, State::Connecting) => {
                if c.result < 0 {
                    self.m.failed.add(Cause::from_errno(errno(c.result)));
                    Progress::inc(&self.progress.failed);
                    self.streams[i as usize].state = State::Done;
                    return Ok(());
                }
                self.m.connect_latency.record_duration(s.started.elapsed());
                self.streams[i as usize].state = State::Open;
                self.m.established += 1;
                self.open += 1;
                self.m.peak_open = self.m.peak_open.max(self.open);
                Progress::inc(&self.progress.established);
                Progress::inc(&self.progress.open);
                if self.send {
                    self.push_send(i)?;
                }
                self.push_recv(i)
            }
            (Op::Send, State::Open) => {
                if c.result <= 0 {
                    return self.end(i, cause_of(c.result, false));
                }
                self.m.up_bytes += c.result as u64;
                Progress::add(&self.progress.up_bytes, c.result as u64);
                self.push_send(i)
            }
            (Op::Recv, State::Open) => {
                if c.result <= 0 {
                    return self.end(i, cause_of(c.result, true));
                }
                self.m.down_bytes += c.result as u64;
                Progress::add(&self.progress.down_bytes, c.result as u64);
                self.push_recv(i)
            }
            _ => Ok(()),
        }
    }

    fn end(&mut self, i: u32, cause: Cause) -> Result<()> {
        self.streams[i as usize].state = State::Done;
        self.m.dropped.add(cause);
        self.open -= 1;
        Progress::dec(&self.progress.open);
        Progress::inc(&self.progress.failed);
        Ok(())
    }

    fn push_send(&mut self, i: u32) -> Result<()> {
        let Some(fd) = self.streams[i as usize].fd.as_ref() else {
            return Ok(());
        };
        let e = opcode::Send::new(types::Fd(fd.as_raw_fd()), self.pattern.as_ptr(), self.pattern.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(Tag::new(i, 0, Op::Send).encode());
        // SAFETY: `pattern` is read-only and lives until the ring is drained.
        unsafe { self.ring.push(&e)? };
        Ok(())
    }

    fn push_recv(&mut self, i: u32) -> Result<()> {
        let Some(fd) = self.streams[i as usize].fd.as_ref() else {
            return Ok(());
        };
        let e = opcode::Recv::new(types::Fd(fd.as_raw_fd()), self.scratch.as_mut_ptr(), self.scratch.len() as u32)
            .build()
            .user_data(Tag::new(i, 0, Op::Recv).encode());
        // SAFETY: `scratch` is a discard buffer that lives until the ring is
        // drained; concurrent writes from several streams are harmless since
        // nothing reads it.
        unsafe { self.ring.push(&e)? };
        Ok(())
    }
}
