//! Moving bytes: readiness, receive buffers, splice, short writes, half-close. One direction of
//! one connection at a time, driven by completions. A connection's mode is its backend's `splice`
//! (`tune.splice` unless the backend sets its own): one worker may run all three.
//!
//! `tune.splice: auto` (the default) and `never`: each direction keeps a multishot receive into
//! the worker's ring of provided buffers armed on its source, and sends what came in (a send
//! queue, one `sendmsg` in flight): all inline on the worker's thread, what request/response
//! traffic, heartbeats and churn need. With `auto`, a receive that fills a whole buffer means the
//! flow is moving bulk data: its receive stops, its queue is sent, and from then on it splices
//! (socket → pipe → socket, pages moved by reference, no copy) by splice(2) system calls on the
//! worker's own thread, through process descriptors FIXED_FD_INSTALL made of the two sockets (an
//! io_uring SPLICE always runs on an io-wq thread: two thread hand-offs per chunk); a poll of
//! the source says when. A splice that moves little sends the flow back to its receive, and so
//! does the worker's finding that its receive buffers carry bulk data better on this host
//! (`splice_bulk` false, worker/bulkpath.rs): then a full buffer no longer starts a splice.
//!
//! `tune.splice: always` is poll-driven: every chunk by splice — by system calls where the
//! sockets have process descriptors, else a hard-linked io_uring splice pair (io-wq) — with a
//! chunk through a buffer (`recv`/`send`) while the descriptors are being made.
//!
//! Invariants: a flow has at most one chunk in flight, and its `FlowIo` record owns the buffer,
//! queue or pipe holding it — a recv/send, a send queue, a hard-linked splice pair, the rest of a
//! short write, or the POLLOUT that waits for room with the unsent bytes; between chunks a flow
//! holds nothing (a splice on the worker's thread completes before it returns, and gives its
//! pipe back unless bytes wait in it for room). A flow splices only while idle, so no spliced
//! byte passes a queued one. `readable` is cleared only by an `EAGAIN` or a short recv (one that
//! emptied the receive queue, with no FIN seen) that no newer poll event contradicts
//! (`ready_seq`), so no readiness edge is lost; an EOF is forwarded as shutdown(SHUT_WR) only once
//! nothing is pending.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::{CloseReason, Ctx, Dir, FlowIo, Half, Held, POLLOUT_EVENTS, QueueLease, State, Step};
use crate::config::SpliceMode;
use crate::pipes::PipeLease;
use crate::worker::ring::{CHUNK, ChunkBuf, RingBuf, Sock};
use crate::worker::token::Op;

/// A splice that moves less than this means the flow carries small messages again.
const SMALL: usize = 2048;

/// Most bytes a flow splices on the worker's thread in one go; then it goes on in the next loop
/// turn, after the other connections' events (`FlowIo::Again`).
const TURN_BYTES: u32 = 1 << 20;

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
    /// An event (or the end) of a POLLIN on the client's or the server's socket: multishot, or the
    /// one-shot of an idle connection's swapped direction (conn/idle.rs).
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
        // An idle connection's source has something again: its receive reads it (and watches the
        // socket from now on, so no poll is armed again below).
        self.wake_from_idle_poll(dir);
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

    /// Arms the POLLIN of the client's or the server's socket unless it is armed: multishot, or
    /// one-shot for an idle connection's swapped direction once its cancelled receive's last
    /// completion is in (the socket has one or the other, never both; conn/idle.rs).
    fn rearm_poll(&mut self, client: bool) {
        let armed = if client { self.c.client_poll } else { self.c.server_poll };
        if armed || self.c.is_closing() || !self.c.is_live() || self.c.moving {
            return;
        }
        let dir = if client { Dir::ClientToServer } else { Dir::ServerToClient };
        let (swapped, bulk) = (self.c.flow(dir).idle_poll, self.c.flow(dir).bulk);
        if self.ring_mode() && self.c.state == State::Established && !bulk && !swapped {
            // Established, this mode watches the sockets with its receives instead (but for a
            // bulk flow, which splices: its source's poll says when to).
            return;
        }
        if swapped && if client { self.c.client_recv } else { self.c.server_recv } {
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
        if swapped {
            self.ring.poll_once(sock, super::POLLIN_EVENTS, t);
        } else {
            self.ring.poll_multi(sock, super::POLLIN_EVENTS, t);
        }
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
                // The multishot receive brings the bytes; nothing to do but make sure it runs. A
                // bulk flow's poll says when it may splice (once its queue is sent: the flow is
                // idle, so no byte can pass another).
                self.arm_recv(dir);
                let f = self.c.flow(dir);
                if f.bulk
                    && f.readable
                    && let Some(ends) = self.splice_ends(dir)
                {
                    return self.splice_here(dir, ends);
                }
                return;
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
        // that fills buffers switches to splice: zero copy, by system calls on this thread once
        // the sockets have process descriptors (`splice_here`), through io_uring (an io-wq
        // thread) where they cannot have them.
        if f.bulk {
            if let Some(ends) = self.splice_ends(dir) {
                return self.splice_here(dir, ends);
            }
            self.make_fds();
        }
        // (While the descriptors are being made, a chunk goes through a buffer.)
        let making = matches!(self.c.step, Step::SpliceFds { .. });
        if (!self.c.flow(dir).bulk || making)
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
        let Some(pipe) = self.lend_pipe(dir) else { return };
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

    /// A pipe for the next chunk of `dir`, or `None` with the flow queued in the worker's FIFO of
    /// waiters (every pipe is lent, or none could be made): it tries again when one comes back.
    fn lend_pipe(&mut self, dir: Dir) -> Option<PipeLease> {
        match self.pipes.acquire() {
            Ok(Some(p)) => Some(p),
            Ok(None) | Err(_) => {
                self.c.flow(dir).io = FlowIo::Waiting;
                self.waiters.push_back((self.idx, self.c.generation, dir));
                self.stats.pipe_waits += 1;
                None
            }
        }
    }

    /// Bytes came in from the source of `dir` (by splice or recv): count them, in the
    /// connection's, its frontend's and, once it has reached it, its server's counters, and the
    /// message as quiet or busy (`tune.batch_wait: auto`).
    fn received(&mut self, dir: Dir, n: u32) {
        let now = self.now.ms;
        let n = u64::from(n);
        let rx = &mut self.c.rx_ms[dir as usize];
        let quiet = (now as u16).wrapping_sub(*rx) >= crate::worker::QUIET_MS;
        *rx = now as u16;
        if quiet {
            self.stats.quiet_messages += 1;
        } else {
            self.stats.busy_messages += 1;
        }
        let c = &mut *self.c;
        let fe = &mut self.stats.frontends[c.frontend as usize];
        // (What a client sends before its connection is established is counted for the server
        // when it is: `establish`.)
        let server = match c.state {
            State::Established => self.up.backends[c.backend as usize].servers.get_mut(c.server as usize),
            _ => None,
        };
        match dir {
            Dir::ClientToServer => {
                c.last_client = now;
                c.bytes_in += n;
                fe.bytes_in += n;
                if let Some(s) = server {
                    s.bytes_in += n;
                }
            }
            Dir::ServerToClient => {
                c.last_server = now;
                c.bytes_out += n;
                fe.bytes_out += n;
                if let Some(s) = server {
                    s.bytes_out += n;
                }
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
                if let Some((_, dst)) = self.splice_ends(dir) {
                    let (rd, _) = self.pipes.fds(&pipe);
                    return match self.pipe_out(dir, rd, dst, pending) {
                        Err(left) => {
                            self.pipes.give_back(pipe, left);
                            self.close(dir.destination_reset())
                        }
                        Ok(0) => {
                            self.pipes.give_back(pipe, 0);
                            self.pump(dir);
                            self.check_done()
                        }
                        Ok(left) => self.wait_for_room(dir, Held::Pipe { pipe, pending: left }),
                    };
                }
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
                if (n as usize) < SMALL && self.splice_mode() == SpliceMode::Auto {
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

    /// Splices `dir` on this thread, by system calls on the sockets' process descriptors `src`
    /// and `dst` through a pipe: socket → pipe → socket, pages moved by reference, with no
    /// io-wq hand-off (io_uring runs every SPLICE op on an io-wq thread). Goes on until the
    /// source is empty (EAGAIN: readable again at its next poll event) or at its end, the
    /// destination is full (the rest waits in the pipe for POLLOUT), or `TURN_BYTES` moved (it
    /// goes on next loop turn). Runs only while the flow is idle, so nothing of it is in flight.
    fn splice_here(&mut self, dir: Dir, (src, dst): (RawFd, RawFd)) {
        if !self.splice_bulk && self.splice_mode() == SpliceMode::Auto {
            // The worker found its receive buffers cheaper: between two splices, the flow goes
            // back to its receive.
            return self.back_to_ring(dir);
        }
        let Some(pipe) = self.lend_pipe(dir) else { return };
        let (rd, wr) = self.pipes.fds(&pipe);
        let size = self.pipes.effective_size;
        let mut moved = 0u32;
        loop {
            let n = match crate::sys::splice(src, wr, size) {
                Ok(0) => {
                    self.pipes.give_back(pipe, 0);
                    self.c.flow(dir).half = Half::EofSeen;
                    return self.pump(dir);
                }
                Ok(n) => n,
                Err(libc::EAGAIN) => {
                    // Nothing was read, and no poll event can have come in meanwhile (this
                    // thread reaps them): the next one says there is more.
                    self.pipes.give_back(pipe, 0);
                    self.c.flow(dir).readable = false;
                    return;
                }
                Err(libc::EINTR) => continue,
                Err(_) => {
                    self.pipes.give_back(pipe, 0);
                    return self.close(dir.source_reset());
                }
            };
            self.received(dir, n);
            self.stats.splices += 1;
            self.stats.inline_splices += 1;
            match self.pipe_out(dir, rd, dst, n) {
                Ok(0) => {}
                Ok(left) => return self.wait_for_room(dir, Held::Pipe { pipe, pending: left }),
                Err(left) => {
                    self.pipes.give_back(pipe, left);
                    return self.close(dir.destination_reset());
                }
            }
            moved += n;
            if (n as usize) < SMALL && self.splice_mode() == SpliceMode::Auto {
                // Small messages again: back to the multishot receive (its poll goes).
                self.pipes.give_back(pipe, 0);
                return self.back_to_ring(dir);
            }
            if moved >= TURN_BYTES {
                self.pipes.give_back(pipe, 0);
                let t = self.token(dir.again());
                self.ring.post(t, 0);
                self.c.flow(dir).io = FlowIo::Again;
                return;
            }
        }
    }

    /// Writes `pending` bytes from the pipe read end `rd` to `dst` (splice(2) on this thread)
    /// until they are out or the destination is full: `Ok` with the bytes left in the pipe, or
    /// `Err` with them if the destination failed.
    fn pipe_out(&mut self, dir: Dir, rd: RawFd, dst: RawFd, pending: u32) -> Result<u32, u32> {
        let mut left = pending;
        while left > 0 {
            match crate::sys::splice(rd, dst, left) {
                Ok(0) | Err(libc::EAGAIN) => break,
                Ok(m) => left -= m.min(left),
                Err(libc::EINTR) => {}
                Err(_) => return Err(left),
            }
        }
        if left < pending {
            self.sent(dir);
        }
        Ok(left)
    }

    /// Asks for process descriptors of both sockets (FIXED_FD_INSTALL), to splice with on this
    /// thread, if this connection has none and may have them: the kernel has the op, nothing else
    /// of the connection's setup is in flight, and the worker holds fewer than its share of
    /// RLIMIT_NOFILE (as many connections as pipes: plan.rs). Otherwise its bulk flows splice
    /// through io_uring.
    fn make_fds(&mut self) {
        if !self.may_make_fds() {
            return;
        }
        let (tc, ts) = (self.token(Op::SpliceFdClient), self.token(Op::SpliceFdServer));
        let (Some(c), Some(s)) = (&self.c.client, &self.c.server_slot) else { return };
        self.ring.install_fd(c.sock(), tc);
        self.ring.install_fd(s.sock(), ts);
        self.c.step = Step::SpliceFds { client: true, server: true };
        // Counted from now (each install's completion settles its own), so that installs in
        // flight count against the share too.
        self.stats.splice_fds += 2;
    }

    /// A descriptor for splicing came (or its install failed: no room in the process's table;
    /// the connection then splices through io_uring, and gives up the one it may have got).
    pub(super) fn on_splice_fd(&mut self, client: bool, fd: Option<OwnedFd>) {
        let Some(fd) = fd else {
            self.stats.splice_fds -= 1;
            self.c.fds_failed = true;
            self.release_fds();
            if self.ring_mode() {
                // Bulk flows waiting for them go on with receive buffers.
                for dir in Dir::BOTH {
                    if self.c.flow(dir).bulk {
                        self.back_to_ring(dir);
                    }
                }
            }
            return;
        };
        if self.c.fds_failed {
            self.stats.splice_fds -= 1;
            return drop(fd);
        }
        let fds = self.fds.entry(self.idx).or_default();
        if client {
            fds.client = Some(fd);
        } else {
            fds.server = Some(fd);
        }
        if matches!(self.c.step, Step::Idle) {
            // Both are here: a flow that waited for them goes on.
            for dir in Dir::BOTH {
                self.pump(dir);
            }
            self.check_done();
        }
    }

    /// (source, destination) of `dir` as process descriptors, if this connection has them.
    fn splice_ends(&self, dir: Dir) -> Option<(RawFd, RawFd)> {
        self.fds.get(&self.idx)?.ends(dir)
    }

    /// Whether this connection has, or may have, descriptors to splice with on this thread.
    fn may_splice_here(&self) -> bool {
        self.fds.contains_key(&self.idx) || matches!(self.c.step, Step::SpliceFds { .. }) || self.may_make_fds()
    }

    /// Whether `make_fds` would ask for descriptors now (see there).
    fn may_make_fds(&self) -> bool {
        !self.fds.contains_key(&self.idx)
            && !self.c.fds_failed
            && matches!(self.c.step, Step::Idle)
            && self.ring.io().fd_install
            && self.stats.splice_fds + 2 <= 2 * u64::from(self.pipes.max())
    }

    /// `splice: auto`: a flow whose receive filled a whole buffer is moving bulk data: it stops
    /// its multishot receive (what that still brings is queued and sent first), and once its
    /// queue is sent it splices on this thread, watched by a poll of its source.
    fn start_splicing(&mut self, dir: Dir) {
        self.c.flow(dir).bulk = true;
        self.make_fds();
        self.pause(dir);
    }

    /// Back from splicing to the multishot receive (small chunks again, or no descriptors).
    fn back_to_ring(&mut self, dir: Dir) {
        self.c.flow(dir).bulk = false;
        let (armed, op) = match dir {
            Dir::ClientToServer => (self.c.client_poll, Op::ClientPoll),
            Dir::ServerToClient => (self.c.server_poll, Op::ServerPoll),
        };
        if armed {
            self.cancel(op);
        }
        let f = self.c.flow(dir);
        if f.paused && !matches!(f.io, FlowIo::Ring(_) | FlowIo::RingPollOut { .. }) {
            f.paused = false;
        }
        self.pump(dir);
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
        if matches!(self.c.flow(dir).io, FlowIo::Waiting) {
            // A pipe (or a chunk buffer) may be there now.
            self.c.flow(dir).io = FlowIo::Idle;
            return self.pump(dir);
        }
        if self.ring_mode() {
            // Waiting for receive buffers: re-arm (or queue up again) if still paused.
            let f = self.c.flow(dir);
            if f.paused && !matches!(f.io, FlowIo::Ring(_) | FlowIo::RingPollOut { .. }) {
                f.paused = false;
                self.arm_recv(dir);
            }
        }
    }
}

fn other(dir: Dir) -> Dir {
    match dir {
        Dir::ClientToServer => Dir::ServerToClient,
        Dir::ServerToClient => Dir::ClientToServer,
    }
}

/// The ring of receive buffers: a send queue holding this many bytes of receive buffers stops its
/// source's receive (backpressure), until it holds fewer than half. A flow's share of its
/// worker's buffers is thus bounded (a few more may arrive from receives already completed when
/// it pauses), so a destination that stops reading holds about this much, not the worker's
/// whole set. That is while the worker has buffers to spare; see [`Ctx::pause_at`].
const PAUSE_BYTES: usize = 1 << 20;

/// How long a send queue waits for room in its destination, while the worker's receives wait
/// for buffers, before its bytes are copied out of the ring (`spill_stalled`): a destination
/// that is merely full has room again well within it; one that stopped reading does not.
pub(crate) const STALL_MS: u16 = 200;

/// The most receive buffers a connection holds before its server is there (a client that sends
/// more than two buffers' worth first pauses until then; one small message, merged, holds one).
const EARLY_BUFFERS: usize = 2;

impl Ctx<'_> {
    /// How this connection moves its bytes: its backend's `splice` (else `tune.splice`).
    pub(super) fn splice_mode(&self) -> SpliceMode {
        self.cfg.backends[usize::from(self.c.backend)].splice
    }

    /// Whether this connection moves bytes through the worker's ring of receive buffers (`splice:
    /// auto`, bulk flows aside, and `never`).
    pub(super) fn ring_mode(&self) -> bool {
        self.splice_mode().uses_ring()
    }

    /// Arms the multishot receive on the source of `dir`, unless it is armed, paused, or the
    /// source has ended.
    pub(super) fn arm_recv(&mut self, dir: Dir) {
        let f = self.c.flow(dir);
        if f.half != Half::Open || f.paused || !self.c.is_live() || self.c.is_closing() || self.c.moving {
            return;
        }
        let client = dir == Dir::ClientToServer;
        if self.c.flow(dir).bulk {
            // A bulk flow splices; its source's poll says when.
            return self.rearm_poll(client);
        }
        if self.c.flow(dir).idle_poll {
            // Idle: a one-shot poll instead of the receive (conn/idle.rs).
            return self.rearm_poll(client);
        }
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
            (n, Some(buf)) if n > 0 => {
                // (Bytes from a receive being swapped for a poll: traffic again, it stays.)
                self.end_idle_poll(dir);
                self.forward(dir, buf, n as u32)
            }
            (n, buf) => {
                if let Some(b) = buf {
                    self.ring.give_filled(b);
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

    /// Queues `n` bytes received into `buf` (and with a bundle, the buffers after it) for the
    /// destination of `dir`, and sends them now if no send of this direction is in flight.
    fn forward(&mut self, dir: Dir, buf: RingBuf, n: u32) {
        self.received(dir, n);
        self.stats.ring_recvs += 1;
        let io = std::mem::take(&mut self.c.flow(dir).io);
        // `waiting`: its destination has no room; a POLLOUT says when it has.
        let (lease, waiting) = match io {
            FlowIo::Ring(lease) => (lease, None),
            FlowIo::RingPollOut { lease, since } => (lease, Some(since)),
            FlowIo::Idle => (self.sendq.lend(), None),
            other => {
                // Cannot happen: in this mode a flow is idle, or its queue is.
                debug_assert!(false, "a receive buffer for a flow in {other:?}");
                self.c.flow(dir).io = other;
                return self.ring.give_filled(buf);
            }
        };
        // Each buffer of a bundle is full but the last.
        let size = self.ring.recv_buf_size() as u32;
        let first = n.min(size);
        if self.sendq.push(&lease, buf, first, self.ring) {
            self.stats.ring_recv_merged += 1;
        }
        let mut left = n - first;
        let mut bufs = 1;
        while left > 0
            && let Some(b) = self.ring.take_more()
        {
            // (Full but the last: these are not copied.)
            let len = left.min(size);
            self.sendq.push(&lease, b, len, self.ring);
            left -= len;
            bufs += 1;
        }
        self.stats.ring_recv_bufs += bufs;
        if left > 0 {
            // Cannot happen (pbuf.rs found the bundle's buffers elsewhere than offered): bytes
            // this direction received are not in hand, so its stream cannot go on intact.
            debug_assert!(false, "a bundle of {n} bytes came with {bufs} buffers");
            self.c.flow(dir).io = FlowIo::ring(lease, waiting);
            return self.close(dir.source_reset());
        }
        if n >= size
            && self.splice_mode() == SpliceMode::Auto
            && self.splice_bulk
            && self.c.state == State::Established
            && !self.c.flow(dir).bulk
            && self.may_splice_here()
        {
            // A whole buffer at once: bulk data. It splices from the next bytes on (these
            // buffers and what the receive still brings are sent first).
            self.start_splicing(dir);
        }
        // Before the server is connected (and its PROXY header sent), the bytes wait in the
        // queue: `establish` sends them. Behind a destination with no room they wait for its
        // POLLOUT (out of the ring if the queue was copied out before: `spill_more`).
        if waiting.is_some() {
            self.spill_more(&lease);
        } else if !self.sendq.sending(&lease) && self.c.state == State::Established {
            self.send_queue(dir, &lease);
        }
        // (A queue copied out of the ring has a stuck destination: its source stops at once.)
        let mark = if self.sendq.has_spilled(&lease) { 1 } else { self.pause_at() };
        if self.sendq.held(&lease) >= mark {
            self.pause(dir);
        }
        self.c.flow(dir).io = FlowIo::ring(lease, waiting);
    }

    /// Whether the worker is short of receive buffers: a quarter of them are out (where
    /// [`Ctx::pause_at`] starts to shorten the queues).
    fn buffers_short(&self) -> bool {
        let (out, max) = self.ring.ring_bufs_out_of();
        out * 4 >= max
    }

    /// The most bytes the worker's queues hold copied out of the ring: what its receive buffers
    /// can hold (so the two together stay within 2 × `recv_buffers` × `recv_buffer_size`; past
    /// it, a stuck destination's queue keeps its buffers).
    fn spill_cap(&self) -> u64 {
        self.ring.ring_bufs_out_of().1 as u64 * self.ring.recv_buf_size() as u64
    }

    /// Copies a queue's bytes that are in receive buffers out of the ring (`SendQueues::spill`).
    fn spill(&mut self, lease: &QueueLease) {
        let cap = self.spill_cap();
        if self.sendq.spill(lease, self.ring, cap) > 0 {
            self.stats.ring_spills += 1;
        }
    }

    /// A queue that was copied out of the ring already (its destination is stuck) takes what it
    /// receives out of the ring too.
    fn spill_more(&mut self, lease: &QueueLease) {
        if self.sendq.has_spilled(lease) {
            self.spill(lease);
        }
    }

    /// `dir`'s queue has waited for room in its destination for [`STALL_MS`] or more while the
    /// worker's receives wait for buffers (worker/mod.rs, `spill_stalled`): its bytes leave the
    /// ring. (From then on what it receives leaves the ring too, until the copied bytes are
    /// sent: `spill_more`.)
    pub(crate) fn spill_stalled(&mut self, dir: Dir) {
        let cap = self.spill_cap();
        let now = self.now.ms as u16;
        let FlowIo::RingPollOut { lease, since } = &self.c.flow(dir).io else { return };
        if now.wrapping_sub(*since) >= STALL_MS && self.sendq.spill(lease, self.ring, cap) > 0 {
            self.stats.ring_spills += 1;
        }
    }

    /// The destination of `dir` took only part of the queue: wait for room (a one-shot POLLOUT).
    /// If it still waits [`STALL_MS`] later while the worker runs out of buffers, the queue is
    /// copied out of the ring (`spill_stalled`); one copied before stays out.
    fn ring_wait_for_room(&mut self, dir: Dir, lease: QueueLease) {
        self.spill_more(&lease);
        let t = self.token(dir.poll_out());
        let Some((_, dst)) = self.c.ends(dir) else { unreachable!("established: both sockets exist") };
        self.ring.poll_once(dst, POLLOUT_EVENTS, t);
        self.c.flow(dir).io = FlowIo::RingPollOut { lease, since: self.now.ms as u16 };
    }

    /// The POLLOUT a queue waited on fired: send on.
    pub(super) fn on_ring_poll_out(&mut self, dir: Dir, lease: QueueLease, res: i32) {
        if res < 0 && res != -libc::ECANCELED {
            self.sendq.give_back(lease, self.ring);
            return self.close(dir.destination_reset());
        }
        self.send_queue(dir, &lease);
        self.c.flow(dir).io = FlowIo::Ring(lease);
    }

    /// How many receive buffers a direction may hold before its receive pauses: `PAUSE_BYTES` of
    /// them while fewer than a quarter of the worker's buffers are out, a quarter of that while
    /// fewer than half are, then 1. One fast flow gets deep queues; a thousand busy flows share
    /// the buffers instead of the first few hundred holding them all (and the memory they cost)
    /// while the rest wait for one.
    ///
    /// Before the server is there, at most [`EARLY_BUFFERS`]: those buffers are held until it
    /// is, however long its connect takes.
    fn pause_at(&self) -> usize {
        let (out, max) = self.ring.ring_bufs_out_of();
        let deep = PAUSE_BYTES / self.cfg.global.tune.recv_buffer_size as usize;
        let at = if out * 4 < max {
            deep.max(1)
        } else if out * 2 < max {
            (deep / 4).max(1)
        } else {
            1
        };
        if self.c.state == State::Established { at } else { at.min(EARLY_BUFFERS) }
    }

    /// How many connections not yet connected may have their client's receive armed at once: a
    /// quarter of the worker's receive buffers (each holds at most [`EARLY_BUFFERS`]: together at
    /// most half of them, whatever the connects do; the rest stay for established flows).
    pub(super) fn early_receives_max(&self) -> u64 {
        (self.ring.ring_bufs_out_of().1 as u64 / 4).max(1)
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
        let (msg, bytes) = self.sendq.prepare(lease, self.ring);
        let t = self.token(dir.send());
        self.stats.ring_sends += 1;
        let Some((_, dst)) = self.c.ends(dir) else { unreachable!("established: both sockets exist") };
        if self.cfg.global.tune.send_zerocopy.is_some_and(|min| bytes >= u64::from(min))
            && !self.sendq.has_spilled(lease)
        {
            let send = self.sendq.zerocopy(lease, self.ring, t);
            self.stats.zerocopy_sends += 1;
            // SAFETY: the message and its iovecs belong to the queue, which stays in
            // `FlowIo::Ring` until this op's first completion; the buffers they point into are
            // held by the ring's record of `send` until its notification (a buffer the queue
            // gives back before waits for it: BufRing::give_back).
            unsafe { self.ring.sendmsg_zc(dst, msg, send) };
            return;
        }
        // Short of buffers: what the destination takes now, so that a destination with no room
        // leaves the queue with us (`on_ring_sent`: a POLLOUT, the queue out of the ring) rather
        // than in a send that holds its buffers until it has.
        let nowait = self.buffers_short();
        // SAFETY: the message, its iovecs and the buffers (or copied bytes) they point into belong
        // to the queue, which stays in `FlowIo::Ring` (sendq.rs keeps them in place: nothing is
        // spilled while a send is in flight) until this op's completion.
        unsafe { self.ring.sendmsg(dst, msg, nowait, t) };
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
            self.cancel(op);
        }
    }

    /// A `sendmsg` of `dir`'s queue completed.
    pub(super) fn on_ring_sent(&mut self, dir: Dir, lease: QueueLease, res: i32) {
        // -EAGAIN: nothing was sent (io_uring reports the bytes of a partial send instead). It
        // can reach us when a send that waited for room found none again after its poll fired
        // and io_uring retried it on an io-wq thread, where the non-blocking socket answers
        // EAGAIN (seen about once per 1,000 connections in the integrity test when receives page
        // fault); and it answers a send that did not wait for room (`MSG_DONTWAIT`, buffers short)
        // and found none. Either way the queue is unchanged and waits for room.
        let res = if res == -libc::EAGAIN { 0 } else { res };
        if res < 0 && res != -libc::ECANCELED {
            self.sendq.give_back(lease, self.ring);
            return self.close(dir.destination_reset());
        }
        let short = self.sendq.sent(&lease, res.max(0) as u64, self.ring);
        if res > 0 {
            self.sent(dir);
        }
        if self.sendq.is_empty(&lease) {
            self.sendq.give_back(lease, self.ring);
        } else if short {
            // The destination had no room for the rest (a send that did not wait for it).
            self.ring_wait_for_room(dir, lease);
        } else {
            self.send_queue(dir, &lease);
            self.c.flow(dir).io = FlowIo::Ring(lease);
        }
        let resume_below = self.pause_at().div_ceil(2);
        let f = self.c.flow(dir);
        let drained = match &f.io {
            FlowIo::Ring(l) | FlowIo::RingPollOut { lease: l, .. } => self.sendq.held(l) < resume_below,
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
