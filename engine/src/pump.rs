//! Moving bytes: readiness, small chunks through a buffer, large ones by splice, short writes,
//! half-close. One direction of one connection at a time, driven by completions.
//!
//! Two ways to move a chunk, chosen per flow (`tune.splice: auto`): a small chunk is `recv`ed into a
//! worker buffer and `send` back out — both complete inline on the worker's thread, which is what
//! request/response traffic and connection churn need; once a read fills a whole buffer the flow is
//! moving bulk data and switches to splice (socket → pipe → socket, zero copy, one io-wq trip per
//! chunk), and back to buffers when chunks get small again. `tune.splice: always` splices everything.
//!
//! Invariants: a flow has at most one chunk in flight (a recv/send, a hard-linked splice pair, or
//! the rest of a short write); it holds a pipe or a buffer only while that chunk is in flight or
//! bytes remain in it; `readable` is cleared only by an `EAGAIN` or a short recv (one that emptied
//! the receive queue, with no FIN seen) that no newer poll event contradicts (`ready_seq`), so no
//! readiness edge is lost; an EOF is forwarded as
//! shutdown(SHUT_WR) only once nothing is pending.

use crate::config::SpliceMode;
use crate::conn::{CloseReason, Dir, NO_BUF, NO_SLOT, POLLIN_EVENTS, POLLOUT_EVENTS, State};
use crate::pipes::NO_PIPE;
use crate::worker::Worker;
use crate::worker::ring::{BufTicket, CHUNK};
use crate::worker::token::Op;

/// A splice that moves less than this means the flow carries small messages again.
const SMALL: usize = 2048;

impl Worker {
    pub(crate) fn on_poll(&mut self, idx: u32, op: Op, result: i32, more: bool) {
        let client_side = op == Op::ClientPoll;
        if result < 0 {
            if result != -libc::ECANCELED {
                let reason = if client_side { CloseReason::ClientReset } else { CloseReason::ServerReset };
                self.close(idx, reason);
            } else if !more {
                self.rearm_poll(idx, op);
            }
            return;
        }
        let mask = result as u32;
        let dir = if client_side { Dir::ClientToServer } else { Dir::ServerToClient };
        let c = self.conns.at(idx);
        let f = c.flow(dir);
        f.readable = true;
        f.ready_seq = f.ready_seq.wrapping_add(1);
        if mask & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) as u32 != 0 {
            f.hup = true;
        }
        let reading_done = f.eof;
        if !more {
            self.rearm_poll(idx, op);
        }
        if self.conns.at(idx).state == State::ProxyHeader {
            self.peek_proxy_header(idx);
            return;
        }
        if mask & libc::POLLERR as u32 != 0 && reading_done {
            // Nothing more will be read from this side, so no splice would notice the error.
            let reason = if client_side { CloseReason::ClientReset } else { CloseReason::ServerReset };
            self.close(idx, reason);
            return;
        }
        self.pump(idx, dir);
    }

    pub(crate) fn rearm_poll(&mut self, idx: u32, op: Op) {
        let c = self.conns.at(idx);
        let slot = if op == Op::ClientPoll { c.client_slot } else { c.server_slot };
        if c.state == State::Closing || slot == NO_SLOT || c.has(op) {
            return;
        }
        let t = self.token(idx, op);
        self.ring.poll_multi(slot, POLLIN_EVENTS, t);
    }

    /// Moves bytes in direction `dir` as far as readiness, resources and the destination allow.
    pub(crate) fn pump(&mut self, idx: u32, dir: Dir) {
        let c = self.conns.at(idx);
        if c.state != State::Established || c.inflight & dir.busy() != 0 {
            return;
        }
        let (src, dst) = match dir {
            Dir::ClientToServer => (c.client_slot, c.server_slot),
            Dir::ServerToClient => (c.server_slot, c.client_slot),
        };
        let f = *c.flow(dir);
        if f.pending > 0 {
            if f.pipe != NO_PIPE {
                let (rd, _) = self.pipes.fds(f.pipe);
                let t = self.token(idx, dir.splice_out());
                self.ring.splice_out(rd, dst, f.pending, t);
            } else {
                let t = self.token(idx, dir.send());
                self.ring.send_chunk(dst, BufTicket(f.buf), f.buf_off, f.pending, t);
            }
            return;
        }
        // Nothing in flight and nothing pending: whatever held the last chunk goes back.
        self.release_chunk_holder(idx, dir);
        if f.eof || !f.readable {
            if f.eof && !f.shut {
                self.conns.at(idx).flow(dir).shut = true;
                if self.conns.at(idx).flow(dir.other()).finished() {
                    // The other direction is done too: closing both sockets forwards this EOF as a
                    // FIN just as shutdown would (both receive queues were read to their EOF, so
                    // the close is graceful and what was sent is still delivered), and it saves
                    // shutdown's trip through an io-wq thread.
                    self.close(idx, CloseReason::Done);
                    return;
                }
                let t = self.token(idx, dir.shutdown());
                self.ring.shutdown_write(dst, t);
            }
            return;
        }
        // A small chunk goes through a buffer: recv and send run inline on this thread. A flow that
        // fills buffers switches to splice: zero copy, in an io-wq thread.
        if !f.bulk
            && let Some(buf) = self.ring.chunk_buf()
        {
            let f = self.conns.at(idx).flow(dir);
            f.buf = buf.0;
            f.buf_off = 0;
            f.waiting = false;
            f.seq_at_submit = f.ready_seq;
            let t = self.token(idx, dir.recv());
            self.ring.recv_chunk(src, buf, t);
            return;
        }
        let pipe = match self.pipes.acquire() {
            Ok(Some(p)) => p,
            Ok(None) | Err(_) => {
                if !f.waiting {
                    self.conns.at(idx).flow(dir).waiting = true;
                    let generation = self.conns.at(idx).generation;
                    self.pipe_waiters.push_back((idx, generation, dir));
                    self.stats.pipe_waits += 1;
                }
                return;
            }
        };
        let f = self.conns.at(idx).flow(dir);
        f.pipe = pipe;
        f.waiting = false;
        f.seq_at_submit = f.ready_seq;
        let t_in = self.token(idx, dir.splice_in());
        let t_out = self.token(idx, dir.splice_out());
        let size = self.pipes.effective_size;
        self.ring.splice_pair(src, self.pipes.fds(pipe), dst, size, t_in, t_out);
        self.stats.splices += 1;
    }

    /// Returns an empty flow's pipe or buffer to its pool.
    fn release_chunk_holder(&mut self, idx: u32, dir: Dir) {
        let f = self.conns.at(idx).flow(dir);
        debug_assert_eq!(f.pending, 0);
        let (pipe, buf) = (f.pipe, f.buf);
        f.pipe = NO_PIPE;
        f.buf = NO_BUF;
        if pipe != NO_PIPE {
            self.pipes.release(pipe);
        }
        if buf != NO_BUF {
            self.ring.release_chunk(BufTicket(buf));
        }
    }

    /// Bytes came in from the source of `dir` (by splice or recv): count them.
    fn received(&mut self, idx: u32, dir: Dir, n: u32) {
        let now = self.now;
        let c = self.conns.at(idx);
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
        c.flow(dir).pending += n;
    }

    /// Bytes went out to the destination of `dir`.
    fn sent(&mut self, idx: u32, dir: Dir, n: u32) {
        let now = self.now;
        let c = self.conns.at(idx);
        match dir {
            Dir::ClientToServer => c.last_server = now,
            Dir::ServerToClient => c.last_client = now,
        }
        let f = c.flow(dir);
        f.pending = f.pending.saturating_sub(n);
        f.buf_off += n;
    }

    /// A read found the source empty: it is not readable unless a poll event came in meanwhile.
    fn drained(&mut self, idx: u32, dir: Dir) {
        let f = self.conns.at(idx).flow(dir);
        if f.ready_seq == f.seq_at_submit {
            f.readable = false;
        }
    }

    /// A read failed: the source side broke.
    fn source_failed(&mut self, idx: u32, dir: Dir) {
        let reason = if dir == Dir::ClientToServer { CloseReason::ClientReset } else { CloseReason::ServerReset };
        self.close(idx, reason);
    }

    /// A write failed: the destination side broke.
    fn destination_failed(&mut self, idx: u32, dir: Dir) {
        let reason = if dir == Dir::ClientToServer { CloseReason::ServerReset } else { CloseReason::ClientReset };
        self.close(idx, reason);
    }

    pub(crate) fn on_recv(&mut self, idx: u32, dir: Dir, result: i32) {
        match result {
            n if n > 0 => {
                self.received(idx, dir, n as u32);
                let f = self.conns.at(idx).flow(dir);
                f.buf_off = 0;
                if n as usize == CHUNK {
                    // The source has more than a buffer's worth: splice from the next chunk on.
                    f.bulk = true;
                } else if !f.hup {
                    // A short read emptied the socket's receive queue: data that comes later wakes
                    // the poll (a new `ready_seq`), so the next read would only find EAGAIN. A FIN
                    // already seen is the exception: it is read as the EOF by the next recv.
                    self.drained(idx, dir);
                }
            }
            0 => self.conns.at(idx).flow(dir).eof = true,
            e if e == -libc::EAGAIN => self.drained(idx, dir),
            e if e == -libc::ECANCELED => {}
            _ => return self.source_failed(idx, dir),
        }
        // Whatever came in is sent right away.
        self.pump(idx, dir);
        self.check_done(idx);
    }

    pub(crate) fn on_send(&mut self, idx: u32, dir: Dir, result: i32) {
        match result {
            n if n > 0 => self.sent(idx, dir, n as u32),
            e if e == -libc::EAGAIN || e == -libc::ECANCELED => {}
            _ => return self.destination_failed(idx, dir),
        }
        self.after_write(idx, dir);
    }

    pub(crate) fn on_splice_in(&mut self, idx: u32, dir: Dir, result: i32) {
        match result {
            n if n > 0 => {
                self.received(idx, dir, n as u32);
                if (n as usize) < SMALL && self.cfg.global.tune.splice == SpliceMode::Auto {
                    // Small messages again (not just a slow moment of a bulk transfer): back to
                    // buffers once this chunk is out.
                    self.conns.at(idx).flow(dir).bulk = false;
                }
            }
            0 => self.conns.at(idx).flow(dir).eof = true,
            e if e == -libc::EAGAIN => self.drained(idx, dir),
            e if e == -libc::ECANCELED => {}
            _ => return self.source_failed(idx, dir),
        }
        self.after_write(idx, dir);
    }

    pub(crate) fn on_splice_out(&mut self, idx: u32, dir: Dir, result: i32) {
        match result {
            n if n > 0 => self.sent(idx, dir, n as u32),
            e if e == -libc::EAGAIN || e == -libc::ECANCELED || e == 0 => {}
            _ => return self.destination_failed(idx, dir),
        }
        self.after_write(idx, dir);
    }

    /// After a write (or a splice pair) completed: if the destination took less than we had, wait
    /// until it can take more; otherwise go on.
    fn after_write(&mut self, idx: u32, dir: Dir) {
        let c = self.conns.at(idx);
        if c.state != State::Established || c.inflight & dir.busy() != 0 {
            return;
        }
        if c.flow(dir).pending > 0 {
            let dst = match dir {
                Dir::ClientToServer => c.server_slot,
                Dir::ServerToClient => c.client_slot,
            };
            let t = self.token(idx, dir.poll_out());
            self.ring.poll_once(dst, POLLOUT_EVENTS, t);
            return;
        }
        self.pump(idx, dir);
        self.check_done(idx);
    }

    /// Closes gracefully once both directions have forwarded their EOF.
    pub(crate) fn check_done(&mut self, idx: u32) {
        let c = self.conns.at(idx);
        if c.state == State::Established
            && c.c2s.finished()
            && c.s2c.finished()
            && !c.has(Op::ShutdownServer)
            && !c.has(Op::ShutdownClient)
        {
            self.close(idx, CloseReason::Done);
        }
    }

    /// Gives freed pipes and buffers to flows that were waiting for one (once per loop turn).
    pub(crate) fn serve_pipe_waiters(&mut self) {
        // Each waiter gets one try; one that still finds nothing queues itself again (at the back).
        for _ in 0..self.pipe_waiters.len() {
            let Some((idx, generation, dir)) = self.pipe_waiters.pop_front() else {
                break;
            };
            if let Some(c) = self.conns.get(idx, generation & crate::worker::token::GENERATION_MASK)
                && c.flow(dir).waiting
            {
                c.flow(dir).waiting = false;
                self.pump(idx, dir);
            }
        }
    }
}
