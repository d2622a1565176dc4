//! Moving bytes: readiness, small chunks through a buffer, large ones by splice, short writes,
//! half-close. One direction of one connection at a time, driven by completions.
//!
//! Two ways to move a chunk, chosen per flow (`tune.splice: auto`): a small chunk is `recv`ed into
//! a worker buffer and `send` back out — both complete inline on the worker's thread, which is what
//! request/response traffic and connection churn need; once a read fills a whole buffer the flow
//! is moving bulk data and switches to splice (socket → pipe → socket, zero copy, one io-wq trip
//! per chunk), and back to buffers when chunks get small again. `tune.splice: always` splices
//! everything.
//!
//! Invariants: a flow has at most one chunk in flight, and its `FlowIo` record owns the buffer or
//! pipe holding it — a recv/send, a hard-linked splice pair, the rest of a short write, or the
//! POLLOUT that waits for room with the unsent bytes; between chunks a flow holds nothing.
//! `readable` is cleared only by an `EAGAIN` or a short recv (one that emptied the receive queue,
//! with no FIN seen) that no newer poll event contradicts (`ready_seq`), so no readiness edge is
//! lost; an EOF is forwarded as shutdown(SHUT_WR) only once nothing is pending.

use std::os::fd::{AsRawFd, OwnedFd};

use super::{CloseReason, Ctx, Dir, FlowIo, Half, Held, POLLOUT_EVENTS, QueueLease, State};
use crate::config::SpliceMode;
use crate::pipes::PipeLease;
use crate::worker::ring::{CHUNK, ChunkBuf, RingBuf, Sock};
use crate::worker::token::{Op, Token};

/// A splice that moves less than this means the flow carries small messages again.
const SMALL: usize = 2048;

impl super::Conn {
    /// The (source, destination) sockets of `dir`; `None` before both exist.
    fn ends(&self, dir: Dir) -> Option<(Sock<'_>, Sock<'_>)> {
        let (client, server) = (self.client.as_ref()?.sock(), self.server_slot.as_ref()?.sock());
        Some(match dir {
            Dir::ClientToServer => (client, server),
            Dir::ServerToClient => (server, client),
        })
    }
}

impl Ctx<'_> {
    /// An event (or the end) of a multishot POLLIN on the client's or the server's socket.
    pub(super) fn on_poll(&mut self, client: bool, res: i32, more: bool) {
        let dir = if client { Dir::ClientToServer } else { Dir::ServerToClient };
        if res < 0 {
            if res != -libc::ECANCELED {
                return self.close(dir.source_reset());
            }
            // Ended without an event (cancelled by the kernel, e.g. on overflow): watch again.
            return self.rearm_poll(client);
        }
        let mask = res as u32;
        let f = self.c.flow(dir);
        f.readable = true;
        f.ready_seq = f.ready_seq.wrapping_add(1);
        if mask & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) as u32 != 0 {
            f.hup = true;
        }
        let reading_done = f.half != Half::Open;
        if !more {
            self.rearm_poll(client);
        }
        match self.c.state {
            State::ProxyHeader => return self.peek_proxy_header(),
            State::Established => {}
            // Not connected yet: a client that resets (rather than half-closes) is gone for good.
            _ if mask & (libc::POLLERR | libc::POLLHUP) as u32 != 0 => return self.close(CloseReason::ClientReset),
            _ => return,
        }
        if mask & libc::POLLERR as u32 != 0 && reading_done {
            // Nothing more will be read from this side, so no read would notice the error.
            return self.close(dir.source_reset());
        }
        self.pump(dir);
    }

    fn rearm_poll(&mut self, client: bool) {
        let armed = if client { self.c.client_poll } else { self.c.server_poll };
        if armed || self.c.is_closing() || !self.c.is_live() || self.c.moving {
            return;
        }
        if self.ring_mode() && self.c.state == State::Established {
            // Established, this mode watches the sockets with its receives instead.
            return;
        }
        let op = if client { Op::ClientPoll } else { Op::ServerPoll };
        let t = self.token(op);
        let sock = if client {
            self.c.client.as_ref().map(|s| s.sock())
        } else {
            self.c.server_slot.as_ref().map(|s| s.sock())
        };
        let Some(sock) = sock else { return };
        self.ring.poll_multi(sock, super::POLLIN_EVENTS, t);
        if client {
            self.c.client_poll = true;
        } else {
            self.c.server_poll = true;
        }
    }

    /// Moves bytes in direction `dir` as far as readiness, resources and the destination allow.
    pub(crate) fn pump(&mut self, dir: Dir) {
        // (Moving: nothing new starts; the worker it moves to goes on.)
        if self.c.state != State::Established || !matches!(self.c.flow(dir).io, FlowIo::Idle) || self.c.moving {
            return;
        }
        let ring = self.ring_mode();
        let f = self.c.flow(dir);
        if f.half != Half::Open || !f.readable || ring {
            if ring && f.half == Half::Open {
                // The multishot receive brings the bytes; nothing to do but make sure it runs.
                return self.arm_recv(dir);
            }
            if f.half == Half::EofSeen {
                f.half = Half::Shut;
                if self.c.flow(other(dir)).drained() {
                    // The other direction is done too (its shutdown may still be in flight: the
                    // close waits for it): closing both sockets forwards this EOF as a FIN just
                    // as shutdown would (both receive queues were read to their EOF, so the close
                    // is graceful and what was sent is still delivered), and it saves a
                    // shutdown (`forward_eof`).
                    return self.close(CloseReason::Done);
                }
                return self.forward_eof(dir, self.ring.io().fd_install);
            }
            return;
        }
        // A small chunk goes through a buffer: recv and send run inline on this thread. A flow
        // that fills buffers switches to splice: zero copy, in an io-wq thread.
        if !f.bulk
            && let Some(buf) = self.ring.chunk_buf()
        {
            let f = self.c.flow(dir);
            f.seq_at_submit = f.ready_seq;
            let t = self.token(dir.recv());
            let Some((src, _)) = self.c.ends(dir) else { unreachable!("established: both sockets exist") };
            // SAFETY: `buf` moves into `FlowIo::Recv` right below; only this op's completion
            // takes it out.
            unsafe { self.ring.recv_chunk(src, &buf, t) };
            self.c.flow(dir).io = FlowIo::Recv(buf);
            return;
        }
        let pipe = match self.pipes.acquire() {
            Ok(Some(p)) => p,
            Ok(None) | Err(_) => {
                self.c.flow(dir).io = FlowIo::Waiting;
                self.waiters.push_back((self.idx, self.c.generation, dir));
                self.stats.pipe_waits += 1;
                return;
            }
        };
        let f = self.c.flow(dir);
        f.seq_at_submit = f.ready_seq;
        let (t_in, t_out) = (self.token(dir.splice_in()), self.token(dir.splice_out()));
        let size = self.pipes.effective_size;
        let fds = self.pipes.fds(&pipe);
        let Some((src, dst)) = self.c.ends(dir) else { unreachable!("established: both sockets exist") };
        self.ring.splice_pair(src, fds, dst, size, t_in, t_out);
        self.c.flow(dir).io = FlowIo::Splice { pipe, pending: 0, first: true };
        self.stats.splices += 1;
    }

    /// Bytes came in from the source of `dir` (by splice or recv): count them.
    fn received(&mut self, dir: Dir, n: u32) {
        let now = self.now.ms;
        let c = &mut *self.c;
        match dir {
            Dir::ClientToServer => {
                c.last_client = now;
                c.bytes_in += u64::from(n);
                self.stats.bytes_client_to_server += u64::from(n);
            }
            Dir::ServerToClient => {
                c.last_server = now;
                c.bytes_out += u64::from(n);
                self.stats.bytes_server_to_client += u64::from(n);
            }
        }
    }

    /// Bytes went out to the destination of `dir`.
    fn sent(&mut self, dir: Dir) {
        match dir {
            Dir::ClientToServer => self.c.last_server = self.now.ms,
            Dir::ServerToClient => self.c.last_client = self.now.ms,
        }
    }

    /// A read found the source empty: it is not readable unless a poll event came in meanwhile.
    fn drained(&mut self, dir: Dir) {
        let f = self.c.flow(dir);
        if f.ready_seq == f.seq_at_submit {
            f.readable = false;
        }
    }

    pub(super) fn on_recv(&mut self, dir: Dir, buf: ChunkBuf, res: i32) {
        match res {
            n if n > 0 => {
                self.received(dir, n as u32);
                let f = self.c.flow(dir);
                if n as usize == CHUNK {
                    // The source has more than a buffer's worth: splice from the next chunk on.
                    f.bulk = true;
                } else if !f.hup {
                    // A short read emptied the socket's receive queue: data that comes later wakes
                    // the poll (a new `ready_seq`), so the next read would only find EAGAIN. A FIN
                    // already seen is the exception: it is read as the EOF by the next recv.
                    self.drained(dir);
                }
                // Whatever came in is sent right away.
                return self.send_held(dir, Held::Buf { buf, off: 0, len: n as u16 });
            }
            0 => self.c.flow(dir).half = Half::EofSeen,
            e if e == -libc::EAGAIN => self.drained(dir),
            e if e == -libc::ECANCELED => {}
            _ => {
                self.ring.give_chunk(buf);
                return self.close(dir.source_reset());
            }
        }
        self.ring.give_chunk(buf);
        self.pump(dir);
        self.check_done();
    }

    /// Writes held bytes to the destination of `dir`.
    fn send_held(&mut self, dir: Dir, held: Held) {
        let Some((_, dst)) = self.c.ends(dir) else { unreachable!("established: both sockets exist") };
        match held {
            Held::Buf { buf, off, len } => {
                let t = self.token(dir.send());
                // SAFETY: `buf` moves into `FlowIo::Send` right below; only this op's completion
                // takes it out.
                unsafe { self.ring.send_chunk(dst, &buf, u32::from(off), u32::from(len), t) };
                self.c.flow(dir).io = FlowIo::Send { buf, off, len };
            }
            Held::Pipe { pipe, pending } => {
                let t = self.token(dir.splice_out());
                let (rd, _) = self.pipes.fds(&pipe);
                self.ring.splice_out(rd, dst, pending, t);
                self.c.flow(dir).io = FlowIo::SpliceOut { pipe, pending };
            }
        }
    }

    pub(super) fn on_send(&mut self, dir: Dir, buf: ChunkBuf, off: u16, len: u16, res: i32) {
        let n = match res {
            n if n > 0 => {
                self.sent(dir);
                (n as u16).min(len)
            }
            e if e == -libc::EAGAIN || e == -libc::ECANCELED => 0,
            _ => {
                self.ring.give_chunk(buf);
                return self.close(dir.destination_reset());
            }
        };
        if n < len {
            // The destination took less than we had: wait until it can take more.
            return self.wait_for_room(dir, Held::Buf { buf, off: off + n, len: len - n });
        }
        self.ring.give_chunk(buf);
        self.pump(dir);
        self.check_done();
    }

    pub(super) fn on_splice_in(&mut self, dir: Dir, res: i32) {
        match res {
            n if n > 0 => {
                self.received(dir, n as u32);
                if (n as usize) < SMALL && self.cfg.global.tune.splice == SpliceMode::Auto {
                    // Small messages again (not just a slow moment of a bulk transfer): back to
                    // buffers once this chunk is out.
                    self.c.flow(dir).bulk = false;
                }
            }
            0 => self.c.flow(dir).half = Half::EofSeen,
            e if e == -libc::EAGAIN => self.drained(dir),
            e if e == -libc::ECANCELED => {}
            _ => self.close(dir.source_reset()),
        }
    }

    pub(super) fn on_splice_out(&mut self, dir: Dir, pipe: PipeLease, pending: u32, res: i32) {
        match res {
            n if n > 0 => self.sent(dir),
            e if e == -libc::EAGAIN || e == -libc::ECANCELED || e == 0 => {}
            _ => {
                self.pipes.give_back(pipe, pending);
                return self.close(dir.destination_reset());
            }
        }
        if pending > 0 {
            return self.wait_for_room(dir, Held::Pipe { pipe, pending });
        }
        self.pipes.give_back(pipe, 0);
        self.pump(dir);
        self.check_done();
    }

    /// Arms a one-shot POLLOUT on the destination of `dir`, holding what it could not take yet.
    fn wait_for_room(&mut self, dir: Dir, held: Held) {
        let t = self.token(dir.poll_out());
        let Some((_, dst)) = self.c.ends(dir) else { unreachable!("established: both sockets exist") };
        self.ring.poll_once(dst, POLLOUT_EVENTS, t);
        self.c.flow(dir).io = FlowIo::poll_out(held);
    }

    pub(super) fn on_poll_out(&mut self, dir: Dir, held: Held, res: i32) {
        if res < 0 && res != -libc::ECANCELED {
            self.give_back_held(held);
            return self.close(dir.destination_reset());
        }
        self.send_held(dir, held);
    }

    /// Sends the destination of `dir` a FIN (shutdown(SHUT_WR)). io_uring runs a SHUTDOWN op on an
    /// io-wq thread (io_uring/net.c sets REQ_F_FORCE_ASYNC): a wakeup of another thread and two
    /// context switches per connection, 17% of the CPU of a connect-echo-close churn. Where the
    /// kernel has FIXED_FD_INSTALL (6.8) the direct socket gets a descriptor instead (inline, no
    /// io-wq), and the completion shuts it down by a system call and closes it (`on_shutdown`).
    fn forward_eof(&mut self, dir: Dir, via_fd: bool) {
        let t = self.token(dir.shutdown(via_fd));
        let Some((_, dst)) = self.c.ends(dir) else { return };
        if via_fd {
            self.ring.install_fd(dst, t);
        } else {
            self.ring.shutdown_write(dst, t);
        }
        self.c.flow(dir).io = FlowIo::Shutdown { via_fd };
    }

    /// The EOF of `dir` is forwarded, or its descriptor is here to forward it with, or the install
    /// failed (no room in the process's descriptor table: a SHUTDOWN op does it instead).
    pub(super) fn on_shutdown(&mut self, dir: Dir, fd: Option<OwnedFd>, retry: bool) {
        if let Some(fd) = fd {
            // SAFETY: shutdown takes no pointer; `fd` is ours until it is dropped (closed) below.
            // Its result does not matter: a peer that reset is seen by the reads.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) };
            drop(fd);
        } else if retry {
            if self.c.moving {
                // Nothing new starts while moving: the worker it moves to forwards the EOF.
                self.c.flow(dir).half = Half::EofSeen;
                return;
            }
            return self.forward_eof(dir, false);
        }
        self.check_done();
    }

    /// Closes gracefully once both directions have forwarded their EOF.
    pub(super) fn check_done(&mut self) {
        if self.c.state == State::Established && self.c.c2s.finished() && self.c.s2c.finished() {
            self.close(CloseReason::Done);
        }
    }

    /// A flow that waited for a pipe or a buffer may try again (one was given back).
    pub(crate) fn resume_waiting(&mut self, dir: Dir) {
        if self.ring_mode() {
            // Waiting for receive buffers: re-arm (or queue up again) if still paused.
            let f = self.c.flow(dir);
            if f.paused && !matches!(f.io, FlowIo::Ring(_)) {
                f.paused = false;
                self.arm_recv(dir);
            }
            return;
        }
        if matches!(self.c.flow(dir).io, FlowIo::Waiting) {
            self.c.flow(dir).io = FlowIo::Idle;
            self.pump(dir);
        }
    }
}

fn other(dir: Dir) -> Dir {
    match dir {
        Dir::ClientToServer => Dir::ServerToClient,
        Dir::ServerToClient => Dir::ClientToServer,
    }
}

/// `splice: never`: a send queue holding this many receive buffers stops its source's receive
/// (backpressure), until it holds fewer than half. A flow's share of its worker's buffers is
/// thus bounded (a few more may arrive from receives already completed when it pauses), so a
/// destination that stops reading holds at most this many (1 MiB of 64 KiB buffers), not the
/// worker's whole set. That is while the worker has buffers to spare; see [`Ctx::pause_at`].
const PAUSE_BUFS: usize = 16;

impl Ctx<'_> {
    /// Whether this worker moves bytes through its ring of receive buffers (`splice: never`).
    pub(super) fn ring_mode(&self) -> bool {
        self.cfg.global.tune.splice == SpliceMode::Never
    }

    /// Arms the multishot receive on the source of `dir`, unless it is armed, paused, or the
    /// source has ended.
    pub(super) fn arm_recv(&mut self, dir: Dir) {
        let f = self.c.flow(dir);
        if f.half != Half::Open || f.paused || !self.c.is_live() || self.c.is_closing() || self.c.moving {
            return;
        }
        let client = dir == Dir::ClientToServer;
        if if client { self.c.client_recv } else { self.c.server_recv } {
            return;
        }
        if !self.ring.ring_bufs_available() {
            // The worker's receive buffers are all out: wait for some to come back.
            return self.starve(dir);
        }
        let op = if client { Op::ClientRecv } else { Op::ServerRecv };
        let t = self.token(op);
        let src = if client {
            self.c.client.as_ref().map(|s| s.sock())
        } else {
            self.c.server_slot.as_ref().filter(|_| self.c.state == State::Established).map(|s| s.sock())
        };
        let Some(src) = src else { return };
        self.ring.recv_multi(src, t);
        if client {
            self.c.client_recv = true;
        } else {
            self.c.server_recv = true;
        }
    }

    /// The receive of `dir` stops until receive buffers come back (the worker's FIFO of waiters).
    fn starve(&mut self, dir: Dir) {
        let f = self.c.flow(dir);
        if !f.paused {
            f.paused = true;
            self.waiters.push_back((self.idx, self.c.generation, dir));
            self.stats.buffer_waits += 1;
        }
    }

    /// A completion of the multishot receive on the client's (`client`) or the server's socket,
    /// with the buffer it filled.
    pub(super) fn on_recvd(&mut self, client: bool, res: i32, more: bool, buf: Option<RingBuf>) {
        let dir = if client { Dir::ClientToServer } else { Dir::ServerToClient };
        match (res, buf) {
            (n, Some(buf)) if n > 0 => self.forward(dir, buf, n as u32),
            (n, buf) => {
                if let Some(b) = buf {
                    self.ring.give_ring_buf(b);
                }
                match n {
                    0 => self.c.flow(dir).half = Half::EofSeen,
                    e if e == -libc::ENOBUFS => {
                        self.ring.ring_bufs_short();
                        self.starve(dir);
                    }
                    // Cancelled (a pause), or found nothing after all: re-armed below.
                    e if e == -libc::ECANCELED || e == -libc::EAGAIN => {}
                    _ => return self.close(dir.source_reset()),
                }
            }
        }
        if !more && self.c.is_live() && !self.c.is_closing() {
            // Ended (EOF, out of buffers, paused, or the kernel's own reasons): go on if it may
            // (before the server is there too: the client's receive is armed at accept).
            self.arm_recv(dir);
        }
        self.pump(dir);
        self.check_done();
    }

    /// Queues `n` bytes received into `buf` for the destination of `dir`, and sends them now if
    /// no send of this direction is in flight.
    fn forward(&mut self, dir: Dir, buf: RingBuf, n: u32) {
        self.received(dir, n);
        self.stats.ring_recvs += 1;
        let io = std::mem::take(&mut self.c.flow(dir).io);
        let lease = match io {
            FlowIo::Ring(lease) => lease,
            FlowIo::Idle => self.sendq.lend(),
            other => {
                // Cannot happen: in this mode a flow is idle, or its queue is.
                debug_assert!(false, "a receive buffer for a flow in {other:?}");
                self.c.flow(dir).io = other;
                return self.ring.give_ring_buf(buf);
            }
        };
        self.sendq.push(&lease, buf, n);
        // Before the server is connected (and its PROXY header sent), the bytes wait in the
        // queue: `establish` sends them.
        if !self.sendq.sending(&lease) && self.c.state == State::Established {
            self.send_queue(dir, &lease);
        }
        if self.sendq.held(&lease) >= self.pause_at() {
            self.pause(dir);
        }
        self.c.flow(dir).io = FlowIo::Ring(lease);
    }

    /// How many receive buffers a direction may hold before its receive pauses: 16 while fewer
    /// than a quarter of the worker's buffers are out, 4 while fewer than half are, then 1. One
    /// fast flow gets deep queues; a thousand busy flows share the buffers instead of the first
    /// few hundred holding them all (and the memory they cost) while the rest wait for one.
    fn pause_at(&self) -> usize {
        let (out, max) = self.ring.ring_bufs_out_of();
        if out * 4 < max {
            PAUSE_BUFS
        } else if out * 2 < max {
            4
        } else {
            1
        }
    }

    /// Connected: sends what the client's receive queued while the server was not there.
    pub(super) fn send_early(&mut self) {
        let dir = Dir::ClientToServer;
        let unsent = matches!(&self.c.flow(dir).io, FlowIo::Ring(lease) if !self.sendq.sending(lease));
        if unsent && let FlowIo::Ring(lease) = std::mem::take(&mut self.c.flow(dir).io) {
            self.send_queue(dir, &lease);
            self.c.flow(dir).io = FlowIo::Ring(lease);
        }
    }

    /// Closing before the server was there: a queue of received bytes with no send in flight
    /// goes back at once (no completion will come for it).
    pub(super) fn drop_unsent(&mut self) {
        for dir in Dir::BOTH {
            let unsent = matches!(&self.c.flow(dir).io, FlowIo::Ring(lease) if !self.sendq.sending(lease));
            if unsent && let FlowIo::Ring(lease) = std::mem::take(&mut self.c.flow(dir).io) {
                self.sendq.give_back(lease, self.ring);
            }
        }
    }

    /// A `sendmsg` of everything queued (the queue's record is `FlowIo::Ring`).
    fn send_queue(&mut self, dir: Dir, lease: &QueueLease) {
        let msg = self.sendq.prepare(lease, self.ring);
        let t = self.token(dir.send());
        self.stats.ring_sends += 1;
        let Some((_, dst)) = self.c.ends(dir) else { unreachable!("established: both sockets exist") };
        // SAFETY: the message, its iovecs and the buffers they point into belong to the queue,
        // which stays in `FlowIo::Ring` (sendq.rs keeps them in place) until this op's completion.
        unsafe { self.ring.sendmsg(dst, msg, t) };
    }

    /// Backpressure: the destination of `dir` is slower than its source; stop receiving.
    fn pause(&mut self, dir: Dir) {
        let f = self.c.flow(dir);
        if f.paused {
            return;
        }
        f.paused = true;
        let (armed, op) = match dir {
            Dir::ClientToServer => (self.c.client_recv, Op::ClientRecv),
            Dir::ServerToClient => (self.c.server_recv, Op::ServerRecv),
        };
        if armed {
            let target = self.token(op);
            self.ring.cancel(target, Token::worker(Op::Cancel, self.idx));
        }
    }

    /// A `sendmsg` of `dir`'s queue completed.
    pub(super) fn on_ring_sent(&mut self, dir: Dir, lease: QueueLease, res: i32) {
        // -EAGAIN: nothing was sent (io_uring reports the bytes of a partial send instead). It
        // can reach us when a send that waited for room found none again after its poll fired
        // and io_uring retried it on an io-wq thread, where the non-blocking socket answers
        // EAGAIN (seen about once per 1,000 connections in the integrity test when receives page
        // fault). Sending again arms a fresh poll; the queue is unchanged.
        let res = if res == -libc::EAGAIN { 0 } else { res };
        if res < 0 && res != -libc::ECANCELED {
            self.sendq.give_back(lease, self.ring);
            return self.close(dir.destination_reset());
        }
        self.sendq.sent(&lease, res.max(0) as u64, self.ring);
        if res > 0 {
            self.sent(dir);
        }
        if self.sendq.is_empty(&lease) {
            self.sendq.give_back(lease, self.ring);
        } else {
            self.send_queue(dir, &lease);
            self.c.flow(dir).io = FlowIo::Ring(lease);
        }
        let resume_below = self.pause_at().div_ceil(2);
        let f = self.c.flow(dir);
        let drained = match &f.io {
            FlowIo::Ring(l) => self.sendq.held(l) < resume_below,
            _ => true,
        };
        if f.paused && drained {
            // Resume the source: buffers permitting (else it waits for them).
            self.c.flow(dir).paused = false;
            self.arm_recv(dir);
        }
        self.pump(dir);
        self.check_done();
    }
}
