//! A frontend's `rate_limit`, split between the workers and lent where the demand is.
//!
//! Each worker applies its share of the rate as a token bucket: a rate-limited listener accepts
//! one connection at a time, and only while its bucket has a token; meanwhile its clients wait in
//! the listen backlog (they are not refused). The shares start equal and always add up to the
//! frontend's rate, so the workers together never accept faster than it.
//!
//! Demand is not always spread: with per-source steering every connection of one address goes to
//! one worker, and a few busy clients may hash unevenly. So shares move, as maxconn shares do
//! (limits.rs), on a slow path over the control channels. A worker out of tokens while a client
//! waits in its backlog asks every other worker, at most once per [`WINDOW_MS`], saying what
//! share it holds. A worker that did not use all of its share over its last window gives half of
//! what it left unused; one that holds more than the asker gives half the difference (two workers
//! short at once end up with equal shares). A share is taken off the giver before it travels: in
//! transit it is nobody's, so the shares held never add up to more than the rate.

use std::os::fd::RawFd;

use super::Worker;
use crate::control::Control;

/// How often a short worker may ask, and the window over which a worker counts what it used.
pub(crate) const WINDOW_MS: u64 = 250;

/// A message about one frontend's `rate_limit` shares (thousandths of a connection per second).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateMsg {
    /// Worker `from` is out of tokens with a client waiting, and holds `share`.
    Ask { frontend: u16, from: u16, share: u64 },
    /// Share handed over to the receiver.
    Give { frontend: u16, amount: u64 },
}

/// What a bucket did over one window.
#[derive(Clone, Copy, Debug, Default)]
struct Window {
    /// Connections accepted.
    taken: u64,
    /// A client waited in the backlog for a token.
    short: bool,
}

/// One worker's token bucket for a frontend's `rate_limit`.
pub(crate) struct Bucket {
    /// This worker's share of the rate, in thousandths of a connection per second.
    share: u64,
    /// Tokens added per millisecond (the share).
    per_ms: f64,
    tokens: f64,
    /// At most this many tokens saved up (a tenth of a second's worth of the share, at least one).
    cap: f64,
    /// When the tokens were last counted (worker clock, ms).
    at: u64,
    /// Where the current window began, this window's and the last one's counts.
    window_at: u64,
    cur: Window,
    last: Window,
    /// When this worker last asked for share.
    asked_at: Option<u64>,
}

impl Bucket {
    /// Worker `me`'s first share of `rate` per second among `workers` (the shares add up to it).
    pub fn new(rate: u32, workers: usize, me: usize, now: u64) -> Bucket {
        let share = crate::limits::split(u64::from(rate) * 1000, workers.max(1), me);
        let mut b = Bucket {
            share: 0,
            per_ms: 0.0,
            tokens: 0.0,
            cap: 1.0,
            at: now,
            window_at: now,
            cur: Window::default(),
            last: Window::default(),
            asked_at: None,
        };
        b.set_share(share, now);
        b.tokens = b.cap;
        b
    }

    /// This worker's share now, in thousandths of a connection per second.
    pub fn share(&self) -> u64 {
        self.share
    }

    fn set_share(&mut self, share: u64, now: u64) {
        self.refill(now);
        self.share = share;
        self.per_ms = share as f64 / 1e6;
        self.cap = (share as f64 / 1e4).max(1.0);
        self.tokens = self.tokens.min(self.cap);
    }

    fn refill(&mut self, now: u64) {
        self.tokens = (self.tokens + (now.saturating_sub(self.at)) as f64 * self.per_ms).min(self.cap);
        self.at = now;
    }

    /// Starts a new window once the current one is over (a window with nothing in it counts as
    /// an empty last window).
    fn roll(&mut self, now: u64) {
        let over = now.saturating_sub(self.window_at);
        if over < WINDOW_MS {
            return;
        }
        self.last = if over < 2 * WINDOW_MS { self.cur } else { Window::default() };
        self.cur = Window::default();
        self.window_at = now - over % WINDOW_MS;
    }

    /// Whether a connection may be accepted now; if not, in how many ms one may (at most a
    /// window: a share lent away to nothing comes back by asking).
    pub fn wait_ms(&mut self, now: u64) -> Option<u64> {
        self.refill(now);
        if self.tokens >= 1.0 {
            return None;
        }
        let wait = if self.per_ms > 0.0 { ((1.0 - self.tokens) / self.per_ms).ceil() } else { f64::INFINITY };
        Some((wait.min(WINDOW_MS as f64) as u64).max(1))
    }

    /// A connection was accepted (several single accepts may complete on one token: the debt is
    /// paid before the next).
    pub fn take(&mut self, now: u64) {
        self.refill(now);
        self.roll(now);
        self.tokens -= 1.0;
        self.cur.taken += 1;
    }

    /// Whether this worker may ask for share now (once per window).
    fn may_ask(&self, now: u64) -> bool {
        self.asked_at.is_none_or(|t| now >= t + WINDOW_MS)
    }

    /// Out of tokens with a client waiting: asks, saying the share it holds.
    fn short(&mut self, now: u64) -> u64 {
        self.roll(now);
        self.cur.short = true;
        self.asked_at = Some(now);
        self.share
    }

    /// What to give a worker that asks and holds `theirs`: half of what this one left unused over
    /// its last window (unless it is short itself), or half of what it holds above the asker's,
    /// whichever is more. Taken off this worker's share at once.
    fn give(&mut self, theirs: u64, now: u64) -> u64 {
        self.roll(now);
        let used = self.last.taken * 1_000_000 / WINDOW_MS;
        let spare = if self.last.short || self.cur.short { 0 } else { self.share.saturating_sub(used) / 2 };
        let above = self.share.saturating_sub(theirs) / 2;
        let amount = spare.max(above);
        if amount > 0 {
            self.set_share(self.share - amount, now);
        }
        amount
    }

    fn receive(&mut self, amount: u64, now: u64) {
        self.set_share(self.share + amount, now);
    }
}

/// Whether a connection waits in the backlog of listening socket `fd`.
fn backlog_waiting(fd: RawFd) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd on the stack, for a zero timeout; `fd` is a listening socket this worker
    // owns (nothing is handed to the kernel beyond the call).
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & libc::POLLIN != 0
}

impl Worker {
    /// Listener `i`'s bucket has no token: if a client waits in its backlog, ask the other
    /// workers for share (at most once per window).
    pub(super) fn rate_short(&mut self, i: usize) {
        let now = self.now.ms;
        let l = &self.listeners[i];
        let Some(fd) = l.fd.as_ref().map(std::os::fd::AsRawFd::as_raw_fd) else { return };
        let frontend = l.frontend;
        let Some(b) = self.rate[frontend].as_mut() else { return };
        // (The backlog is looked at only when an ask may follow: once per window.)
        if self.peers.len() < 2 || !b.may_ask(now) || !backlog_waiting(fd) {
            return;
        }
        let share = b.short(now);
        let ask = RateMsg::Ask { frontend: frontend as u16, from: self.id as u16, share };
        for (w, peer) in self.peers.iter().enumerate() {
            if w != self.id {
                peer.send(Control::Rate(ask));
            }
        }
    }

    pub(super) fn on_rate(&mut self, msg: RateMsg) {
        let now = self.now.ms;
        match msg {
            RateMsg::Ask { frontend, from, share } => {
                let Some(b) = self.rate.get_mut(frontend as usize).and_then(Option::as_mut) else { return };
                let amount = b.give(share, now);
                if amount > 0
                    && let Some(peer) = self.peers.get(from as usize)
                {
                    peer.send(Control::Rate(RateMsg::Give { frontend, amount }));
                }
            }
            RateMsg::Give { frontend, amount } => {
                let fe = frontend as usize;
                let Some(b) = self.rate.get_mut(fe).and_then(Option::as_mut) else { return };
                b.receive(amount, now);
                // Listeners waiting for a token count their wait again, at the new rate.
                for l in self.listeners.iter_mut().filter(|l| l.frontend == fe && l.retry_at > now) {
                    l.retry_at = now;
                }
                self.update_listeners();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_shares_add_up_to_the_rate() {
        for (rate, workers) in [(20, 2), (7, 3), (1, 4), (10_000_000, 7)] {
            let sum: u64 = (0..workers).map(|w| Bucket::new(rate, workers, w, 0).share()).sum();
            assert_eq!(sum, u64::from(rate) * 1000, "{rate}/s over {workers}");
        }
    }

    #[test]
    fn an_idle_worker_gives_half_its_share_and_a_busy_one_evens_out() {
        let mut idle = Bucket::new(40, 2, 1, 0);
        assert_eq!(idle.give(20_000, 600), 10_000, "nothing used: half of it");
        assert_eq!(idle.share(), 10_000);
        assert!(idle.cap >= 1.0 && idle.tokens <= idle.cap);
        // Short itself and holding no more than the asker: nothing.
        let mut busy = Bucket::new(40, 2, 0, 0);
        assert!(busy.may_ask(10));
        assert_eq!(busy.short(10), 20_000);
        assert!(!busy.may_ask(20) && busy.may_ask(10 + WINDOW_MS), "asks once per window");
        assert_eq!(busy.give(20_000, 30), 0);
        // Short, but holding more: half the difference.
        busy.receive(10_000, 40);
        assert_eq!(busy.give(10_000, 50), 10_000);
        assert_eq!(busy.share(), 20_000);
        // Used all it holds over its last window: nothing spare.
        let mut used = Bucket::new(8, 1, 0, 0);
        for t in 0..2 {
            used.take(300 + t);
        }
        assert_eq!(used.give(8_000, 600), 0, "2 in 250 ms is its whole 8/s");
    }

    #[test]
    fn a_share_lent_away_to_nothing_waits_at_most_a_window() {
        let mut b = Bucket::new(1, 2, 1, 0);
        assert_eq!(b.give(0, 1000), 500 / 2);
        let all = b.share();
        assert_eq!(b.give(all * 4, 2000), all / 2, "holding less than the asker, but none of it used: half");
        let mut zero = Bucket::new(1, 2, 1, 0);
        zero.set_share(0, 0);
        zero.tokens = 0.0;
        assert_eq!(zero.wait_ms(10), Some(WINDOW_MS));
    }
}
