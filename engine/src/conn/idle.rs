//! Idle connections hold less kernel memory: `tune.idle_poll_after`.
//!
//! A multishot receive armed on a socket with nothing to read keeps, besides its request, the
//! kernel's async message header and poll record (on 6.18 a kmalloc-512 and a kmalloc-96 object:
//! ~600 B per socket, measured with /proc/slabinfo, docs/benchmarks.md), where a one-shot
//! `POLL_ADD` keeps its request only. So once an established connection on the receive-buffer
//! path (`splice: auto` or `never`) has moved no byte either way for `idle_poll_after`, each of its
//! directions whose receive is armed and which holds nothing swaps it: the receive is cancelled,
//! and its last completion arms a one-shot poll of the source instead (`arm_recv`, `rearm_poll`). The poll's
//! event (bytes, a FIN, an error) ends the swap and arms the receive again, which finds the bytes
//! at once; bytes the cancelled receive still brought end it too. The cost is one poll
//! completion and a receive armed per swapped direction when traffic resumes, and a cancel and a
//! poll when it stops again: nothing for flows busier than `idle_poll_after`. Most of a swap's
//! CPU (~9 µs per direction with 9,000 receives armed per ring) is the kernel's lookup of the
//! receive to cancel, in a cancel hash of at most 256 buckets (docs/architecture.md, *What a swap
//! costs*).
//!
//! The timer wheel says when: while a direction may swap, an established connection's deadline
//! is the earlier of its timeouts and its last traffic plus its idle span (`Ctx::deadline`).
//!
//! A swap pays when the socket then stays swapped at least twice as long as the span it took to
//! get there. A connection whose traffic came back sooner — less than three spans after its last:
//! periodic just above the span, a heartbeat every 12 s against 10 s, which would pay a swap on
//! every message — has its span doubled (`Conn::idle_shift`, up to [`MAX_SHIFT`]: 8 × the setting),
//! so it soon stops swapping; one quiet for a minute or more keeps swapping once per silence.
//!
//! Invariants: a direction is swapped (`Flow::idle_poll`) only while its connection is
//! established, live and not moving; the worker's `idle_polled` gauge counts swapped directions,
//! and every way out (an event on the poll, bytes from the cancelled receive, a close, a move)
//! goes through [`Ctx::end_idle_poll`], so the gauge is 0 when no connection is open.

use super::{Ctx, Dir, FlowIo, Half, State};
use crate::worker::token::Op;

/// The most a connection's idle span doubles: 8 × `idle_poll_after`.
pub(super) const MAX_SHIFT: u8 = 3;

impl Ctx<'_> {
    /// When this connection swaps its receives for polls (worker clock, ms): its last traffic
    /// plus its span, while a direction of it may; `None` otherwise.
    pub(super) fn idle_poll_at(&self) -> Option<u64> {
        let span = self.idle_span()?;
        if !Dir::BOTH.into_iter().any(|dir| self.may_idle_poll(dir)) {
            return None;
        }
        Some(self.c.last_traffic().saturating_add(span))
    }

    /// How long this connection is silent before it swaps (ms): `idle_poll_after`, doubled for
    /// each time its traffic came back soon after a swap.
    fn idle_span(&self) -> Option<u64> {
        let after = self.cfg.global.tune.idle_poll_after?;
        Some((after.as_millis() as u64) << self.c.idle_shift.min(MAX_SHIFT))
    }

    /// Whether `dir` can swap its receive now: established on the receive-buffer path, its
    /// receive armed and running (not paused, not splicing), nothing held or in flight.
    fn may_idle_poll(&self, dir: Dir) -> bool {
        let c = &*self.c;
        let (f, armed) = match dir {
            Dir::ClientToServer => (&c.c2s, c.client_recv),
            Dir::ServerToClient => (&c.s2c, c.server_recv),
        };
        armed
            && c.state == State::Established
            && !c.moving
            && f.half == Half::Open
            && !f.paused
            && !f.bulk
            && !f.idle_poll
            && matches!(f.io, FlowIo::Idle)
            && self.ring_mode()
    }

    /// The connection has been idle for `idle_poll_after`: each direction that can swaps its
    /// receive for a poll (the poll is armed by the receive's last completion: `arm_recv`).
    pub(super) fn start_idle_poll(&mut self) {
        for dir in Dir::BOTH {
            if !self.may_idle_poll(dir) {
                continue;
            }
            self.c.flow(dir).idle_poll = true;
            self.stats.idle_polled += 1;
            self.stats.idle_poll_swaps += 1;
            self.cancel(if dir == Dir::ClientToServer { Op::ClientRecv } else { Op::ServerRecv });
        }
    }

    /// Ends `dir`'s swap, if it had one: its receive may be armed again. Whether it had.
    pub(super) fn end_idle_poll(&mut self, dir: Dir) -> bool {
        let f = self.c.flow(dir);
        if !f.idle_poll {
            return false;
        }
        f.idle_poll = false;
        self.stats.idle_polled -= 1;
        true
    }

    /// The poll of a swapped direction reported its source readable (or its FIN, or an error):
    /// traffic again. Its receive is armed and finds what is there; the next idle point is
    /// filed.
    pub(super) fn wake_from_idle_poll(&mut self, dir: Dir) {
        if !self.end_idle_poll(dir) {
            return;
        }
        // Back within three spans of its last traffic: swapped for less than twice what it took
        // to get there, so each of its messages would pay a swap; it waits twice as long before
        // the next. (A silence shorter than a span is the other direction of the same exchange,
        // woken after the first: no new evidence.)
        let silence = self.now.ms.saturating_sub(self.c.last_traffic());
        if self.idle_span().is_some_and(|span| (span..3 * span).contains(&silence)) && self.c.idle_shift < MAX_SHIFT {
            self.c.idle_shift += 1;
        }
        // (What the receive is about to bring; counted as traffic now so that the connection's
        // next idle point is a span from here, not already past.)
        match dir {
            Dir::ClientToServer => self.c.last_client = self.now.ms,
            Dir::ServerToClient => self.c.last_server = self.now.ms,
        }
        self.arm_recv(dir);
        self.ensure_timer();
    }
}
