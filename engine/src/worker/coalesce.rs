//! `tune.batch_wait`: whether the worker's next wait lets completions gather, and for how long.
//!
//! A worker that fell asleep on many mostly idle connections wakes once per message — most of what
//! a heartbeat costs the proxy that the proxy can change. A window (io_uring's `min_wait_usec`)
//! lets the messages of a window wake it once, at up to a window of latency per pass through the
//! worker. That is a good trade only for some traffic, and `auto` (the default) takes it only
//! there:
//!
//! - **Quiet flows.** Each message received is *quiet* when its direction of its connection had
//!   none for [`QUIET_MS`] before it (a heartbeat, a push, a keep-alive probe of a client that
//!   otherwise says nothing) and *busy* otherwise: a flow sending ten or more messages a second, a
//!   request/response loop, a bulk transfer, and the first messages of a new connection (its flows
//!   count from its accept), so churn is busy. A message a second on each of thousands of
//!   connections is all quiet; a window costs none of them more than a few thousandths of the time
//!   between two of its messages.
//! - **Enough of them.** A window gathers several messages only when quiet messages come at
//!   [`MIN_QUIET_PER_WINDOW`] a window or more; below that it would add latency and save nothing.
//! - **Busy traffic turns it off at once.** Counted over epochs of [`EPOCH_MS`]: windows for the
//!   next epoch when the last one had enough quiet messages and at most one busy message in
//!   [`BUSY_SHARE`]; while windows are on, more busy messages than that (plus [`BUSY_SLACK`], a few
//!   reconnecting clients) in the current epoch turn them off before the next wait. So a closed
//!   loop, a fixed-rate request stream, bulk flows or a burst of new connections pay at most a few
//!   windows before every event wakes the worker again; windows come back after a second of
//!   quiet traffic alone.
//! - **Quiet traffic that starts mid-epoch turns it on within [`GLANCE_MS`].** Keep-alives come
//!   in bursts when their clients connected together (after a reconnect storm, a restart, or a
//!   ramp): each client's every period, all of them within a fraction of it. Judged by epochs
//!   alone, such a burst starts in an epoch that follows a quiet one, and has windows only from
//!   the next epoch on, if it lasts that long — with a 5 s period and clients connected within a
//!   second, most of each burst had none. So the counts are also read every [`GLANCE_MS`]: a
//!   glance with enough quiet messages at the busy share turns windows on at once (unless the
//!   epoch's busy messages have already turned them off), and the epoch that ends during such
//!   traffic keeps them.
//!
//! - **The answers come back in a short window.** A message through the proxy passes the worker
//!   twice: to the server, and the server's answer back (a heartbeat's echo, an MQTT `PINGRESP`;
//!   or a push to a client and its ack). The worker forwards what a window gathered when the
//!   window ends, and the answers come back a fraction of a millisecond later — at the start of
//!   the next window, so they waited nearly a whole one: a heartbeat's round trip through the
//!   proxy paid 1 ms on its way out and 1.9 on its way back on average. So after a window in
//!   which the worker forwarded messages, `auto` waits [`REPLY_US`] only, and then a whole
//!   window again: one more wakeup a window, and the way back costs a short window. (Not after a
//!   wait that a full batch of completions ended early: such traffic fills batches anyway.)
//!
//! The counts are the worker's `quiet_messages` and `busy_messages` (stats), so an operator sees
//! why; `batching` says whether the worker is in windows now, `ring.batched_waits` how many waits
//! had one and `ring.reply_waits` how many of them were short ones for answers. `off` never
//! batches, a duration always does, on the clock's grid only (the operator's choice of latency
//! for CPU). `auto W` (`auto 1ms`) is `auto` with windows of W: the operator's latency for the
//! quiet messages, taken where a window of W gathers [`MIN_QUIET_PER_WINDOW`] of them.

use std::time::Duration;

use crate::config::{BATCH_EVENTS, BatchWait};

/// A message on a flow quiet for at least this long before it is a quiet one.
pub const QUIET_MS: u16 = 100;
/// How often `auto` decides from the last epoch's counts: long enough that heartbeats sent in
/// bursts (each client's once a second, the clients started together) count at their rate over
/// the second, not as a busy epoch and empty ones.
pub const EPOCH_MS: u64 = 1000;
/// Quiet messages a window would gather below which it saves too little to be worth its latency:
/// at `auto`'s 2 ms windows, quiet messages at 2 a millisecond; at `auto 1ms`, 4.
pub const MIN_QUIET_PER_WINDOW: u64 = 4;
/// At most one busy message in this many quiet ones keeps the windows.
pub const BUSY_SHARE: u64 = 16;
/// Busy messages an epoch may have on top of its share before the windows end at once (a few
/// clients reconnecting).
pub const BUSY_SLACK: u64 = 32;
/// How often the counts are also read within an epoch, to turn windows on for quiet traffic that
/// started since: how late a burst of keep-alives gets its windows at most.
pub const GLANCE_MS: u64 = 100;
/// `auto`: after a window in which the worker forwarded messages, the next one is this short
/// (µs), to catch the answers to them.
pub const REPLY_US: u32 = 300;

/// The worker's choice of window, wait by wait.
#[derive(Debug)]
pub struct Coalesce {
    mode: BatchWait,
    /// `auto`: in windows now.
    on: bool,
    /// Where the epoch began.
    epoch: Mark,
    /// Where the glance began, and whether the last whole glance had enough.
    glance: Mark,
    glance_enough: bool,
    /// `auto`: the last wait's window was a short one, for the answers to what the worker forwarded
    /// before it (the next is a whole one).
    replying: bool,
}

/// A start (worker clock, ms) and the worker's counts of quiet and busy messages then.
#[derive(Clone, Copy, Debug, Default)]
struct Mark {
    ms: u64,
    quiet: u64,
    busy: u64,
}

impl Mark {
    /// The time and the quiet and busy messages since the mark.
    fn since(&self, now_ms: u64, quiet: u64, busy: u64) -> (u64, u64, u64) {
        (now_ms.saturating_sub(self.ms), quiet - self.quiet, busy - self.busy)
    }
}

impl Coalesce {
    /// `mode` as the engine applies it (`Off` where the kernel lacks `min_wait_usec`).
    pub fn new(mode: BatchWait) -> Coalesce {
        Coalesce {
            mode,
            on: false,
            epoch: Mark::default(),
            glance: Mark::default(),
            glance_enough: false,
            replying: false,
        }
    }

    /// The window of the next wait, µs (`None`: every event wakes the worker), given the clock,
    /// the worker's counts of quiet and busy messages since it started, and whether flows wait for
    /// a receive buffer or a pipe (`stalled`): then no window, whatever the mode, so that they are
    /// re-armed every turn rather than every window (a backlog of them, left by a burst such as
    /// 18,000 connections' first heartbeats, drained a window at a time made some wait over a
    /// second).
    pub fn window(&mut self, now_ms: u64, quiet: u64, busy: u64, stalled: bool) -> Option<u32> {
        let window = self.decide(now_ms, quiet, busy);
        if stalled { None } else { window }
    }

    /// How long the next wait gathers completions (µs; `None`: every event wakes the worker),
    /// given its `window` (from [`Coalesce::window`]), the clock (µs), whether the worker
    /// received (and so forwarded) messages since the last wait, and how many completions that
    /// wait brought. A window ends on the next multiple of its length on the monotonic clock, not
    /// a whole window from now, so that what comes in at a random time waits half a window on
    /// average for the same wakeups; and with `auto`, the wait after one in which the worker
    /// forwarded messages is a short one ([`REPLY_US`]): the answers to them (the server's echo
    /// of a heartbeat, a client's ack of a push) come back within it rather than a whole window
    /// later, for one more wakeup a window. Not after a wait that [`BATCH_EVENTS`] completions
    /// ended before its window did: traffic that dense fills the next batch within a window.
    pub fn min_wait(&mut self, window: Option<u32>, now_us: u64, forwarded: bool, drained: usize) -> Option<u32> {
        let was_reply = std::mem::take(&mut self.replying);
        let w = window?;
        if forwarded && !was_reply && drained < BATCH_EVENTS && matches!(self.mode, BatchWait::Auto(_)) {
            self.replying = true;
            return Some(REPLY_US.min(w));
        }
        Some(w - (now_us % u64::from(w)) as u32)
    }

    fn decide(&mut self, now_ms: u64, quiet: u64, busy: u64) -> Option<u32> {
        match self.mode {
            BatchWait::Off => None,
            BatchWait::Every(d) => Some(micros(d)),
            BatchWait::Auto(window) => {
                let window = micros(window);
                let now = Mark { ms: now_ms, quiet, busy };
                let (glanced, q, b) = self.glance.since(now_ms, quiet, busy);
                if glanced >= GLANCE_MS {
                    self.glance_enough = enough(q, b, glanced, window);
                    self.glance = now;
                }
                let (elapsed, q, b) = self.epoch.since(now_ms, quiet, busy);
                if elapsed >= EPOCH_MS {
                    self.on = enough(q, b, elapsed, window) || self.glance_enough;
                    self.epoch = now;
                } else if b > BUSY_SLACK + q / BUSY_SHARE {
                    self.on = false;
                } else if self.glance_enough {
                    self.on = true;
                }
                self.on.then_some(window)
            }
        }
    }

    /// Whether the next wait's window is the short one (as [`Coalesce::min_wait`] last said).
    pub fn replying(&self) -> bool {
        self.replying
    }

    /// Whether the next wait has a window (as last decided): the `batching` gauge.
    pub fn batching(&self) -> bool {
        match self.mode {
            BatchWait::Off => false,
            BatchWait::Every(_) => true,
            BatchWait::Auto(_) => self.on,
        }
    }
}

/// Whether `quiet` and `busy` messages over `ms` make windows of `window_us` worth it: enough
/// quiet ones to gather [`MIN_QUIET_PER_WINDOW`] a window, and busy ones at most at their share.
fn enough(quiet: u64, busy: u64, ms: u64, window_us: u32) -> bool {
    quiet * u64::from(window_us) >= MIN_QUIET_PER_WINDOW * ms * 1000 && busy * BUSY_SHARE <= quiet
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives `auto` through epochs of `per_epoch` (quiet, busy) messages: whether each epoch's
    /// last wait had a window (decided at the epoch's end from its counts).
    fn epochs(c: &mut Coalesce, per_epoch: &[(u64, u64)]) -> Vec<bool> {
        let (mut now, mut q, mut b) = (1_000, 0, 0);
        c.window(now, q, b, false);
        per_epoch
            .iter()
            .map(|&(dq, db)| {
                // Ten turns an epoch, the messages spread over them.
                let mut last = None;
                for _ in 0..10 {
                    now += EPOCH_MS / 10;
                    q += dq / 10;
                    b += db / 10;
                    last = c.window(now, q, b, false);
                }
                last.is_some()
            })
            .collect()
    }

    #[test]
    fn auto_windows_many_quiet_messages_and_stops_for_busy_ones() {
        let mut c = Coalesce::new(BatchWait::default());
        // 4,500 heartbeats a second and their echoes: windows.
        let hb = (9_000, 0);
        // Clients reconnecting among them: still windows.
        let reconnects = (9_000, 200);
        // A closed loop starts: off within the epoch, and stays off while it runs; once it ends,
        // the next epoch of heartbeats alone brings the windows back.
        let closed_loop = (9_000, 50_000);
        // Too few quiet messages for a window to gather several.
        let sparse = (1_000, 0);
        let got = epochs(&mut c, &[hb, hb, reconnects, closed_loop, closed_loop, hb, hb, sparse, sparse]);
        assert_eq!(got, [true, true, true, false, false, true, true, false, false]);
    }

    #[test]
    fn auto_with_a_shorter_window_takes_it_and_wants_as_many_messages_a_window() {
        // `auto 1ms`: 1 ms windows, and 4 quiet messages a millisecond to take them (2 a ms for
        // the default's 2 ms): 4,500 heartbeats a second and their echoes (9 a ms) are enough,
        // 1,500 and theirs (3 a ms) are not, where the default takes windows for both.
        let mut short = Coalesce::new(BatchWait::Auto(Duration::from_millis(1)));
        let mut default = Coalesce::new(BatchWait::default());
        let (hb, fewer) = ((9_000, 0), (3_000, 0));
        assert_eq!(epochs(&mut short, &[hb, hb, fewer, fewer]), [true, true, false, false]);
        assert_eq!(epochs(&mut default, &[hb, hb, fewer, fewer]), [true, true, true, true]);
        let mut short = Coalesce::new(BatchWait::Auto(Duration::from_millis(1)));
        epochs(&mut short, &[hb]);
        let w = short.window(2_000, 9_000, 0, false);
        assert_eq!(w, Some(1_000));
        // On the clock's 1 ms grid; after a window that forwarded messages, the short one.
        assert_eq!(short.min_wait(w, 20_250, false, 10), Some(750));
        assert_eq!(short.min_wait(w, 20_250, true, 10), Some(REPLY_US));
    }

    #[test]
    fn a_closed_loop_ends_the_windows_before_the_epoch_does() {
        let mut c = Coalesce::new(BatchWait::default());
        epochs(&mut c, &[(9_000, 0), (9_000, 0)]);
        assert!(c.batching());
        // Within the epoch: busy messages past the slack end it at the next wait.
        let (now, q, b) = (10_000, 0, 0);
        let mut c = Coalesce::new(BatchWait::default());
        c.window(now, q, b, false);
        assert_eq!(c.window(now + EPOCH_MS, q + 3_000, b, false), Some(2_000));
        assert_eq!(c.window(now + EPOCH_MS + 1, q + 3_000, b + BUSY_SLACK, false), Some(2_000), "within the slack");
        assert_eq!(c.window(now + EPOCH_MS + 2, q + 3_010, b + BUSY_SLACK + 20, false), None, "past it");
        assert!(!c.batching());
    }

    #[test]
    fn keep_alives_in_bursts_get_windows_within_a_glance() {
        // 9,000 clients connected within 0.9 s, a keep-alive every 2 s: each period a burst of 10
        // messages a millisecond for 900 ms, then 1.1 s of nothing. Judged by epochs alone (here
        // in step with the bursts) every burst fell in an epoch after a quiet one, and no message
        // had a window.
        let mut c = Coalesce::new(BatchWait::default());
        let (mut quiet, mut windowed, mut total) = (0, 0, 0);
        c.window(0, 0, 0, false);
        for now in (10..10_000).step_by(10) {
            let window = c.window(now, quiet, 0, false);
            if now % 2_000 < 900 {
                // The messages of the next 10 ms: woken by them with or without a window.
                quiet += 100;
                total += 100;
                if window.is_some() {
                    windowed += 100;
                }
            }
        }
        // Each burst but its first glance (100 ms of 900) has windows.
        assert!(windowed * 100 >= total * 85, "{windowed} of {total} messages had a window");
        // A busy epoch keeps them off whatever the glances say, until it ends.
        let mut c = Coalesce::new(BatchWait::default());
        c.window(0, 0, 0, false);
        assert_eq!(c.window(150, 1_000, 0, false), Some(2_000));
        assert_eq!(c.window(300, 2_000, 500, false), None, "busy past the slack");
        assert_eq!(c.window(450, 5_000, 500, false), None, "the glance alone does not bring them back");
        assert_eq!(c.window(1_100, 10_000, 500, false), Some(2_000), "the next epoch does");
    }

    #[test]
    fn a_window_ends_on_the_clock_s_grid_and_after_one_that_forwarded_a_short_one_takes_the_answers() {
        let mut c = Coalesce::new(BatchWait::default());
        epochs(&mut c, &[(9_000, 0)]);
        let w = c.window(2_000, 9_000, 0, false);
        assert_eq!(w, Some(2_000));
        // On the grid: 1,400 µs left at 10,600 µs.
        assert_eq!(c.min_wait(w, 10_600, false, 10), Some(1_400));
        assert!(!c.replying());
        // The turn that window ended forwarded messages: the next wait is short, for their
        // answers; the one after goes back to the grid, whether that turn forwarded any or not.
        assert_eq!(c.min_wait(w, 12_000, true, 10), Some(REPLY_US));
        assert!(c.replying());
        assert_eq!(c.min_wait(w, 12_300, true, 10), Some(1_700));
        assert_eq!(c.min_wait(w, 14_000, true, 10), Some(REPLY_US));
        assert_eq!(c.min_wait(w, 14_300, false, 10), Some(1_700));
        assert_eq!(c.min_wait(w, 16_000, false, 10), Some(2_000), "on a multiple: a whole window");
        // No window: none (and the next window is judged afresh).
        assert_eq!(c.min_wait(None, 16_010, true, 10), None);
        assert!(!c.replying());
        assert_eq!(c.min_wait(w, 16_500, true, 10), Some(REPLY_US));
        assert_eq!(c.min_wait(w, 16_800, true, 10), Some(1_200));
        // A wait that a full batch ended early: the next batch fills within a window anyway.
        assert_eq!(c.min_wait(w, 17_000, true, BATCH_EVENTS), Some(1_000));
        assert!(!c.replying());
        // An operator's duration is the window of latency it chose: on the grid only.
        let mut every = Coalesce::new(BatchWait::Every(Duration::from_millis(2)));
        let w = every.window(0, 0, 0, false);
        assert_eq!(every.min_wait(w, 12_000, true, 10), Some(2_000));
        assert_eq!(every.min_wait(w, 12_500, true, 10), Some(1_500));
        assert!(!every.replying());
    }

    #[test]
    fn off_never_and_a_duration_always() {
        let mut off = Coalesce::new(BatchWait::Off);
        let mut every = Coalesce::new(BatchWait::Every(Duration::from_micros(500)));
        for (now, q, b) in [(0, 0, 0), (1_000, 10_000, 0), (2_000, 10_000, 50_000)] {
            assert_eq!(off.window(now, q, b, false), None);
            assert_eq!(every.window(now, q, b, false), Some(500));
        }
        assert!(!off.batching() && every.batching());
    }

    #[test]
    fn flows_waiting_for_buffers_get_every_turn_in_any_mode() {
        let mut every = Coalesce::new(BatchWait::Every(Duration::from_millis(2)));
        assert_eq!(every.window(0, 0, 0, true), None);
        assert_eq!(every.window(1, 0, 0, false), Some(2_000));
        let mut auto = Coalesce::new(BatchWait::default());
        epochs(&mut auto, &[(9_000, 0)]);
        assert_eq!(auto.window(2_001, 9_000, 0, true), None, "stalled");
        assert_eq!(auto.window(2_002, 9_000, 0, false), Some(2_000), "the choice itself unchanged");
    }

    #[test]
    fn a_long_sleep_counts_as_a_long_epoch() {
        // 2,500 quiet messages over ten seconds of sleep are 0.25 a millisecond: no window.
        let mut c = Coalesce::new(BatchWait::default());
        c.window(0, 0, 0, false);
        assert_eq!(c.window(10_000, 2_500, 0, false), None);
        // The same in one second: windows.
        assert_eq!(c.window(11_000, 5_000, 0, false), Some(2_000));
    }
}
