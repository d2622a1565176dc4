//! The client worker every client mode (`hold`, `rate`, `throughput`,
//! `latency`) runs on: one io_uring, a fixed table of connection slots, the
//! dialing, and the connection-level accounting the modes share (attempted,
//! established, failed and dropped by cause, open and peak open, connect
//! latency). A mode keeps only its own logic on top: what to send, what to
//! expect back, and when.
//!
//! Invariants:
//! - Everything the kernel may read or write for an operation in flight is
//!   in [`Held`], owned by the ring's [`ring::Owned`]: the slots with each mode's
//!   per-connection buffers, the worker-wide buffers, the target sockaddrs,
//!   the connect timeout and the sockets. It is freed only when the ring has
//!   nothing in flight; a worker dropped early (an error returned with `?`)
//!   first shuts its sockets down and drains, and leaks it all if the kernel
//!   does not let go in time.
//! - The kernel resolves an SQE's fd number when it takes the SQE from the
//!   submission queue, not when the SQE is queued. So a socket is never
//!   closed while an SQE queued before the close may still be waiting there:
//!   [`ClientWorker::close`] keeps the fd open until the ring has submitted
//!   everything queued before it, and meanwhile no new socket can be given
//!   that fd number.
//! - A slot's generation is bumped on every dial and every SQE carries it,
//!   so completions of an earlier connection in the slot are dropped here
//!   and never reach the mode; so are sends and receives of a slot that is
//!   no longer [`State::Open`].

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use io_uring::{opcode, squeue, types};

use crate::dial::{self, Endpoints};
use crate::ring::{self, Completion, Op, Ring, Tag, errno, next_generation};
use crate::run::WorkerPlan;
use crate::stats::{Cause, Measurement, Progress};

/// Where a slot's connection is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum State {
    /// No connection: not dialed yet, or ended (failed, dropped or closed).
    Idle,
    /// Socket open, connect in flight.
    Connecting,
    /// Established: the mode sends and receives.
    Open,
}

/// One connection slot: its socket and where it is, plus the mode's own
/// per-connection data.
pub struct Slot<C> {
    /// `Some` while Connecting or Open.
    fd: Option<OwnedFd>,
    generation: u32,
    state: State,
    /// When the current connect started.
    started: Instant,
    /// The mode's data for this connection, its buffers included.
    pub conn: C,
}

impl<C> Slot<C> {
    pub fn state(&self) -> State {
        self.state
    }
}

/// What the kernel may use while operations are in flight.
pub struct Held<C, B> {
    /// Allocated once, never resized: pointers into a slot stay valid.
    slots: Vec<Slot<C>>,
    /// Worker-wide buffers of the mode (throughput's pattern and discard buffer).
    shared: B,
    /// Connect targets (sockaddrs) and source addresses.
    endpoints: Endpoints,
    /// The connect timeout, linked behind every connect.
    timeout: Box<types::Timespec>,
    /// Closed sockets, each with the ring's push count at its close, kept
    /// open until the ring has submitted that many SQEs.
    closing: Vec<(u64, OwnedFd)>,
}

/// What a completion meant for a live connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The connect succeeded: the slot is Open and counted as established.
    Connected(u32),
    /// The connect failed: counted as failed by cause, socket closed, slot Idle.
    ConnectFailed(u32),
    /// A send on an Open slot completed with this result.
    Sent(u32, i32),
    /// A receive on an Open slot completed with this result.
    Received(u32, i32),
}

/// A mode's connections on one io_uring (see the module doc). `C` is the
/// mode's per-connection data, `B` its worker-wide buffers.
pub struct ClientWorker<'a, C, B = ()> {
    io: ring::Owned<Held<C, B>>,
    plan: &'a WorkerPlan,
    progress: &'a Progress,
    m: Measurement,
    /// Connections Open now.
    open: u64,
    /// Dials so far (picks each dial's source × target pair).
    dials: u64,
}

impl<'a, C, B> ClientWorker<'a, C, B> {
    /// A worker for `plan.conns` slots, each starting Idle with `conn()`,
    /// on a ring of `entries` submission slots.
    pub fn new(
        mode: &str,
        plan: &'a WorkerPlan,
        progress: &'a Progress,
        entries: u32,
        shared: B,
        conn: impl FnMut() -> C,
    ) -> Result<Self> {
        let ring = Ring::new(entries).with_context(|| format!("creating the io_uring for a {mode} worker"))?;
        let now = Instant::now();
        let slots = std::iter::repeat_with(conn)
            .take(plan.conns as usize)
            .map(|conn| Slot { fd: None, generation: 0, state: State::Idle, started: now, conn })
            .collect();
        let held = Held {
            slots,
            shared,
            endpoints: plan.endpoints.clone(),
            timeout: Box::new(types::Timespec::from(plan.connect_timeout)),
            closing: Vec::new(),
        };
        Ok(ClientWorker {
            io: ring::Owned::new(ring, held),
            plan,
            progress,
            m: Measurement { planned: plan.conns, ..Default::default() },
            open: 0,
            dials: 0,
        })
    }

    pub fn plan(&self) -> &'a WorkerPlan {
        self.plan
    }

    pub fn progress(&self) -> &'a Progress {
        self.progress
    }

    /// What this worker measured so far; the mode adds its own figures.
    pub fn m(&mut self) -> &mut Measurement {
        &mut self.m
    }

    pub fn slots(&self) -> impl Iterator<Item = &Slot<C>> {
        self.io.held().slots.iter()
    }

    /// Connections open now.
    pub fn open(&self) -> u64 {
        self.open
    }

    pub fn state(&self, slot: u32) -> State {
        self.io.held().slots[slot as usize].state
    }

    /// When the slot's current connection started connecting.
    pub fn connect_started(&self, slot: u32) -> Instant {
        self.io.held().slots[slot as usize].started
    }

    pub fn conn(&self, slot: u32) -> &C {
        &self.io.held().slots[slot as usize].conn
    }

    /// The slot's connection data and the measurement, borrowed together.
    pub fn conn_mut(&mut self, slot: u32) -> (&mut C, &mut Measurement) {
        (&mut self.io.held_mut().slots[slot as usize].conn, &mut self.m)
    }

    /// Start connection number `dials` (which picks its source and target)
    /// in `slot`, which must be Idle. Returns false if no socket could be
    /// made: that is counted as failed by cause and the slot stays Idle.
    pub fn dial(&mut self, slot: u32) -> Result<bool> {
        let n = self.plan.local_first + self.dials;
        self.dials += 1;
        self.m.attempted += 1;
        Progress::inc(&self.progress.attempted);
        let (ring, held) = self.io.parts();
        let (src, t) = held.endpoints.pick(n);
        let fd = match dial::open_socket(src, &held.endpoints.targets[t]) {
            Ok(fd) => fd,
            Err(e) => {
                self.failed(slot, Cause::from_errno(e));
                return Ok(false);
            }
        };
        let s = &mut held.slots[slot as usize];
        debug_assert!(s.state == State::Idle && s.fd.is_none(), "dial into a busy slot");
        s.generation = next_generation(s.generation);
        s.state = State::Connecting;
        s.started = Instant::now();
        // SAFETY: the sockaddr lives in `held.endpoints` and the timespec in
        // `held.timeout`, both unmodified for the worker's life and owned by
        // `self.io`, which frees them only once the ring is empty (or leaks
        // them); the fd is stored in the slot right below and closed only
        // through `close`, after this SQE has been submitted.
        unsafe { dial::push_connect(ring, &fd, &held.endpoints.target_addrs[t], &held.timeout, slot, s.generation)? };
        s.fd = Some(fd);
        Ok(true)
    }

    /// Queue a send on `slot`'s socket of the bytes `buf` picks from the
    /// slot's data or the shared buffers (nothing if the slot has no socket).
    ///
    /// # Safety
    /// The caller must not modify those bytes until this send's completion
    /// has been reaped. (The worker keeps them allocated until then.)
    pub unsafe fn send(&mut self, slot: u32, buf: impl for<'x> FnOnce(&'x mut C, &'x mut B) -> &'x [u8]) -> Result<()> {
        let entry = |fd, c: &mut C, b: &mut B| {
            let bytes = buf(c, b);
            opcode::Send::new(fd, bytes.as_ptr(), len_u32(bytes.len())).flags(libc::MSG_NOSIGNAL).build()
        };
        // SAFETY: the entry points into `buf`'s bytes only; forwarded from
        // this function's contract.
        unsafe { self.push_on(slot, Op::Send, entry) }
    }

    /// Queue a receive on `slot`'s socket into the bytes `buf` picks from
    /// the slot's data or the shared buffers (nothing if it has no socket).
    ///
    /// # Safety
    /// The caller must not read or write those bytes until this receive's
    /// completion has been reaped, nor point another operation at them,
    /// unless nothing ever reads them (a discard buffer).
    pub unsafe fn recv(
        &mut self,
        slot: u32,
        buf: impl for<'x> FnOnce(&'x mut C, &'x mut B) -> &'x mut [u8],
    ) -> Result<()> {
        let entry = |fd, c: &mut C, b: &mut B| {
            let bytes = buf(c, b);
            opcode::Recv::new(fd, bytes.as_mut_ptr(), len_u32(bytes.len())).build()
        };
        // SAFETY: the entry points into `buf`'s bytes only; forwarded from
        // this function's contract.
        unsafe { self.push_on(slot, Op::Recv, entry) }
    }

    /// Queue the SQE `entry` builds for `slot`'s socket (nothing if it has
    /// none), tagged `op` with the slot's generation.
    ///
    /// # Safety
    /// The SQE may point only into the slot's data or the shared buffers it
    /// is given, and the caller must leave that memory as `send` or `recv`
    /// says until the completion has been reaped.
    unsafe fn push_on(
        &mut self,
        slot: u32,
        op: Op,
        entry: impl FnOnce(types::Fd, &mut C, &mut B) -> squeue::Entry,
    ) -> Result<()> {
        let (ring, held) = self.io.parts();
        let s = &mut held.slots[slot as usize];
        let Some(fd) = s.fd.as_ref().map(|f| types::Fd(f.as_raw_fd())) else {
            return Ok(());
        };
        let e = entry(fd, &mut s.conn, &mut held.shared).user_data(Tag::new(slot, s.generation, op).encode());
        // SAFETY: the memory is in `held`, which `self.io` frees only once
        // the ring is empty (or leaks); the caller leaves it alone until the
        // completion (this function's contract); the fd stays open until the
        // SQE has been submitted (`close`).
        unsafe { ring.push(&e)? };
        Ok(())
    }

    /// Submit what is queued, wait up to `wait` for completions, and return
    /// what they mean for live connections (connects already accounted).
    pub fn poll(&mut self, wait: Duration) -> Result<Vec<Event>> {
        let cs: Vec<Completion> = self.io.ring().wait(1, wait)?.to_vec();
        self.release_closed();
        Ok(cs.into_iter().filter_map(|c| self.event(c)).collect())
    }

    fn event(&mut self, c: Completion) -> Option<Event> {
        let slot = c.tag.slot;
        let s = self.io.held().slots.get(slot as usize)?;
        if s.generation != c.tag.generation {
            return None;
        }
        match (c.tag.op, s.state) {
            (Op::Connect, State::Connecting) if c.result < 0 => {
                self.failed(slot, Cause::from_errno(errno(c.result)));
                Some(Event::ConnectFailed(slot))
            }
            (Op::Connect, State::Connecting) => {
                self.connected(slot);
                Some(Event::Connected(slot))
            }
            (Op::Send, State::Open) => Some(Event::Sent(slot, c.result)),
            (Op::Recv, State::Open) => Some(Event::Received(slot, c.result)),
            _ => None,
        }
    }

    fn connected(&mut self, slot: u32) {
        let s = &mut self.io.held_mut().slots[slot as usize];
        s.state = State::Open;
        self.m.connect_latency.record_duration(s.started.elapsed());
        self.m.established += 1;
        self.open += 1;
        self.m.peak_open = self.m.peak_open.max(self.open);
        Progress::inc(&self.progress.established);
        Progress::inc(&self.progress.open);
    }

    /// A connect (or the socket for it) failed: count it, close the socket.
    fn failed(&mut self, slot: u32, cause: Cause) {
        self.m.failed.add(cause);
        Progress::inc(&self.progress.failed);
        self.close(slot);
    }

    /// End an Open connection early (the peer closed, an error): counted as
    /// dropped by `cause`, socket closed, slot Idle. Nothing if not Open.
    pub fn drop_conn(&mut self, slot: u32, cause: Cause) {
        if self.state(slot) == State::Open {
            self.m.dropped.add(cause);
            self.close(slot);
        }
    }

    /// Close the slot's connection (no counting but the open figures): the
    /// slot becomes Idle. Operations already submitted on the socket keep
    /// their own reference to it; their completions are dropped as stale.
    pub fn close(&mut self, slot: u32) {
        let s = &mut self.io.held_mut().slots[slot as usize];
        if s.state == State::Open {
            self.open -= 1;
            Progress::dec(&self.progress.open);
        }
        s.state = State::Idle;
        let Some(fd) = s.fd.take() else {
            return;
        };
        let mark = self.io.ring().pushed();
        if self.io.ring().submitted() < mark {
            self.io.held_mut().closing.push((mark, fd));
        }
    }

    /// Close the sockets whose queued SQEs have all been submitted.
    fn release_closed(&mut self) {
        let done = self.io.ring().submitted();
        self.io.held_mut().closing.retain(|(mark, _)| *mark > done);
    }

    /// At the end of the run: count every connect still in flight as failed
    /// by timeout (the run ended before it resolved). Returns how many.
    pub fn fail_pending_connects(&mut self) -> u64 {
        let n = self.slots().filter(|s| s.state == State::Connecting).count() as u64;
        self.m.failed.timeout += n;
        n
    }

    /// Stop every operation: shut every socket down (pending receives
    /// complete, connects abort), cancel what is left, and reap until
    /// nothing is in flight or [`ring::DRAIN`] passes. True if the ring is
    /// empty. Dropping the worker does this too.
    pub fn drain(&mut self) -> bool {
        let (ring, held) = self.io.parts();
        if ring.in_flight() == 0 {
            return true;
        }
        for fd in held.slots.iter().filter_map(|s| s.fd.as_ref()) {
            // SAFETY: shutdown(2) on a socket the slot owns; no memory involved.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
        }
        ring.cancel_all_and_drain(ring::DRAIN)
    }

    /// The measurement; the worker is dropped (drained, see [`Self::drain`]).
    pub fn finish(mut self) -> Measurement {
        std::mem::take(&mut self.m)
    }
}

impl<C, B> Drop for ClientWorker<'_, C, B> {
    fn drop(&mut self) {
        // Shut the sockets down before `self.io` cancels and drains the rest.
        self.drain();
        self.progress.open.fetch_sub(self.open, std::sync::atomic::Ordering::Relaxed);
    }
}

/// An SQE length: buffers are far below 4 GiB, a larger one is sent in part.
fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    fn plan(target: std::net::SocketAddr, conns: u64) -> WorkerPlan {
        let now = Instant::now();
        WorkerPlan {
            conns,
            local_first: 0,
            first_id: 0,
            share: 1.0,
            endpoints: Endpoints::new(vec![target], Vec::new()),
            start: now,
            deadline: now + Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
        }
    }

    fn poll_until(w: &mut ClientWorker<'_, Vec<u8>>, want: impl Fn(&Event) -> bool) -> Event {
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Some(e) = w.poll(Duration::from_millis(50)).unwrap().into_iter().find(|e| want(e)) {
                return e;
            }
        }
        panic!("no such event within 5 s");
    }

    #[test]
    fn a_socket_closed_with_an_unsubmitted_send_keeps_its_number_until_submitted() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let plan = plan(l.local_addr().unwrap(), 2);
        let progress = Progress::default();
        let mut w = ClientWorker::new("test", &plan, &progress, 64, (), || vec![7u8; 16]).unwrap();
        assert!(w.dial(0).unwrap());
        assert_eq!(poll_until(&mut w, |e| matches!(e, Event::Connected(_))), Event::Connected(0));
        let old = w.io.held().slots[0].fd.as_ref().unwrap().as_raw_fd();
        // SAFETY: the slot's buffer is never modified in this test.
        unsafe { w.send(0, |c, _| &c[..]).unwrap() };
        w.close(0);
        assert!(w.dial(1).unwrap());
        let new = w.io.held().slots[1].fd.as_ref().unwrap().as_raw_fd();
        assert_ne!(new, old, "a new socket took the number a queued send still names");
        assert_eq!(w.io.held().closing.len(), 1);
        w.poll(Duration::ZERO).unwrap();
        assert!(w.io.held().closing.is_empty(), "closed once submitted");
    }

    #[test]
    fn dropping_a_worker_with_receives_in_flight_drains_them() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let plan = plan(l.local_addr().unwrap(), 3);
        let progress = Progress::default();
        let mut w = ClientWorker::new("test", &plan, &progress, 64, (), || vec![0u8; 16]).unwrap();
        for slot in 0..3 {
            assert!(w.dial(slot).unwrap());
        }
        let end = Instant::now() + Duration::from_secs(5);
        let mut open = 0;
        while open < 3 && Instant::now() < end {
            for e in w.poll(Duration::from_millis(50)).unwrap() {
                let Event::Connected(slot) = e else { continue };
                // SAFETY: nothing touches the buffer until the worker is gone.
                unsafe { w.recv(slot, |c, _| &mut c[..]).unwrap() };
                open += 1;
            }
        }
        w.poll(Duration::ZERO).unwrap();
        assert_eq!(progress.open.load(std::sync::atomic::Ordering::Relaxed), 3);
        // The peer never sends: only the drain ends these receives.
        assert!(w.drain(), "every receive completed or was cancelled");
        assert_eq!(w.io.ring().in_flight(), 0);
        drop(w);
        assert_eq!(progress.open.load(std::sync::atomic::Ordering::Relaxed), 0);
    }
}
