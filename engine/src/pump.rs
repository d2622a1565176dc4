//! Moving bytes: readiness, the splice pair, short writes, half-close. One direction of one
//! connection at a time, driven by completions.
//!
//! Invariants: a flow has at most one chunk in flight (a hard-linked splice pair, or the rest of a
//! short write); it holds a pipe only while that chunk is in flight or bytes remain in the pipe;
//! `readable` is cleared only by an `EAGAIN` that no newer poll event contradicts (`ready_seq`), so
//! no readiness edge is lost; an EOF is forwarded as shutdown(SHUT_WR) only once the pipe is empty.

use crate::conn::{CloseReason, Dir, NO_SLOT, POLLIN_EVENTS, POLLOUT_EVENTS, State};
use crate::pipes::NO_PIPE;
use crate::worker::Worker;
use crate::worker::token::Op;

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

    /// Moves bytes in direction `dir` as far as readiness, pipes and the destination allow.
    pub(crate) fn pump(&mut self, idx: u32, dir: Dir) {
        let c = self.conns.at(idx);
        if c.state != State::Established || c.has(dir.splice_in()) || c.has(dir.splice_out()) || c.has(dir.poll_out()) {
            return;
        }
        let (src, dst) = match dir {
            Dir::ClientToServer => (c.client_slot, c.server_slot),
            Dir::ServerToClient => (c.server_slot, c.client_slot),
        };
        let f = *c.flow(dir);
        if f.in_pipe > 0 {
            let (rd, _) = self.pipes.fds(f.pipe);
            let t = self.token(idx, dir.splice_out());
            self.ring.splice_out(rd, dst, f.in_pipe, t);
            return;
        }
        if f.eof || !f.readable {
            if f.pipe != NO_PIPE {
                self.pipes.release(f.pipe);
                self.conns.at(idx).flow(dir).pipe = NO_PIPE;
            }
            if f.eof && !f.shut {
                self.conns.at(idx).flow(dir).shut = true;
                let t = self.token(idx, dir.shutdown());
                self.ring.shutdown_write(dst, t);
            }
            return;
        }
        let pipe = if f.pipe != NO_PIPE {
            f.pipe
        } else {
            match self.pipes.acquire() {
                Ok(Some(p)) => p,
                Ok(None) | Err(_) => {
                    if !f.waiting_pipe {
                        self.conns.at(idx).flow(dir).waiting_pipe = true;
                        let generation = self.conns.at(idx).generation;
                        self.pipe_waiters.push_back((idx, generation, dir));
                        self.stats.pipe_waits += 1;
                    }
                    return;
                }
            }
        };
        let f = self.conns.at(idx).flow(dir);
        f.pipe = pipe;
        f.waiting_pipe = false;
        f.seq_at_submit = f.ready_seq;
        let t_in = self.token(idx, dir.splice_in());
        let t_out = self.token(idx, dir.splice_out());
        let size = self.pipes.effective_size;
        self.ring.splice_pair(src, self.pipes.fds(pipe), dst, size, t_in, t_out);
        self.stats.splices += 1;
    }

    pub(crate) fn on_splice_in(&mut self, idx: u32, dir: Dir, result: i32) {
        let now = self.now;
        let c = self.conns.at(idx);
        match result {
            n if n > 0 => {
                match dir {
                    Dir::ClientToServer => c.last_client = now,
                    Dir::ServerToClient => c.last_server = now,
                }
                c.flow(dir).in_pipe += n as u32;
                match dir {
                    Dir::ClientToServer => {
                        c.bytes_in += n as u64;
                        self.stats.bytes_client_to_server += n as u64;
                    }
                    Dir::ServerToClient => {
                        c.bytes_out += n as u64;
                        self.stats.bytes_server_to_client += n as u64;
                    }
                }
            }
            0 => c.flow(dir).eof = true,
            e if e == -libc::EAGAIN => {
                let f = c.flow(dir);
                if f.ready_seq == f.seq_at_submit {
                    f.readable = false;
                }
            }
            e if e == -libc::ECANCELED => {}
            _ => {
                let reason =
                    if dir == Dir::ClientToServer { CloseReason::ClientReset } else { CloseReason::ServerReset };
                self.close(idx, reason);
                return;
            }
        }
        self.after_splice(idx, dir);
    }

    pub(crate) fn on_splice_out(&mut self, idx: u32, dir: Dir, result: i32) {
        let now = self.now;
        let c = self.conns.at(idx);
        match result {
            n if n > 0 => {
                match dir {
                    Dir::ClientToServer => c.last_server = now,
                    Dir::ServerToClient => c.last_client = now,
                }
                let f = c.flow(dir);
                f.in_pipe = f.in_pipe.saturating_sub(n as u32);
            }
            e if e == -libc::EAGAIN || e == -libc::ECANCELED || e == 0 => {}
            _ => {
                let reason =
                    if dir == Dir::ClientToServer { CloseReason::ServerReset } else { CloseReason::ClientReset };
                self.close(idx, reason);
                return;
            }
        }
        self.after_splice(idx, dir);
    }

    /// Once both splices of a chunk completed: wait for the destination, or go on.
    pub(crate) fn after_splice(&mut self, idx: u32, dir: Dir) {
        let c = self.conns.at(idx);
        if c.has(dir.splice_in()) || c.has(dir.splice_out()) {
            return;
        }
        let f = *c.flow(dir);
        if f.in_pipe > 0 {
            // The destination took less than we had: wait until it can take more.
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

    /// Gives freed pipes to flows that were waiting for one (once per loop turn).
    pub(crate) fn serve_pipe_waiters(&mut self) {
        while self.pipes.in_use < self.pipes_max {
            let Some((idx, generation, dir)) = self.pipe_waiters.pop_front() else {
                break;
            };
            if let Some(c) = self.conns.get(idx, generation & crate::worker::token::GENERATION_MASK)
                && c.flow(dir).waiting_pipe
            {
                c.flow(dir).waiting_pipe = false;
                self.pump(idx, dir);
            }
        }
    }
}
