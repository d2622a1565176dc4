//! A hashed timer wheel for connection deadlines (client/server idle, queue).
//!
//! Deadlines are milliseconds on the worker's clock. Scheduling is O(1); expiry walks only the ticks
//! that passed. Rescheduling is lazy: a connection whose deadline moved later keeps its old entry,
//! and when that entry fires the caller sees the new deadline and schedules again. Entries carry
//! (slot, generation, deadline) so an entry for a freed or rescheduled connection is recognised as
//! stale. Deadlines beyond the wheel's horizon are parked in the last slot and re-filed when reached.

/// Wheel resolution.
pub const TICK_MS: u64 = 10;
const SLOTS: u64 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerEntry {
    pub index: u32,
    pub generation: u32,
    pub deadline: u64,
}

pub struct TimerWheel {
    slots: Vec<Vec<TimerEntry>>,
    /// The last tick whose entries were handed out.
    cursor: u64,
    len: usize,
}

impl TimerWheel {
    pub fn new(now_ms: u64) -> TimerWheel {
        TimerWheel { slots: (0..SLOTS).map(|_| Vec::new()).collect(), cursor: now_ms / TICK_MS, len: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn schedule(&mut self, entry: TimerEntry) {
        let tick = (entry.deadline.div_ceil(TICK_MS)).clamp(self.cursor + 1, self.cursor + SLOTS - 1);
        self.slots[(tick % SLOTS) as usize].push(entry);
        self.len += 1;
    }

    /// Moves every entry whose deadline is at or before `now_ms` into `out`; entries reached early
    /// (beyond the horizon when filed) are filed again.
    pub fn expire(&mut self, now_ms: u64, out: &mut Vec<TimerEntry>) {
        let now_tick = now_ms / TICK_MS;
        let mut refile = Vec::new();
        while self.cursor < now_tick && self.len > 0 {
            self.cursor += 1;
            let slot = &mut self.slots[(self.cursor % SLOTS) as usize];
            self.len -= slot.len();
            for e in slot.drain(..) {
                if e.deadline <= now_ms {
                    out.push(e);
                } else {
                    refile.push(e);
                }
            }
        }
        self.cursor = self.cursor.max(now_tick);
        for e in refile {
            self.schedule(e);
        }
    }

    /// How long the event loop may sleep before the next tick with entries is due (at most `cap_ms`).
    pub fn sleep_ms(&self, now_ms: u64, cap_ms: u64) -> u64 {
        if self.len == 0 {
            return cap_ms;
        }
        let next_tick_ms = (now_ms / TICK_MS + 1) * TICK_MS;
        (next_tick_ms - now_ms).min(cap_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(index: u32, deadline: u64) -> TimerEntry {
        TimerEntry { index, generation: 0, deadline }
    }

    #[test]
    fn fires_in_order_of_ticks_and_not_early() {
        let mut w = TimerWheel::new(0);
        w.schedule(e(1, 25));
        w.schedule(e(2, 5));
        w.schedule(e(3, 1000));
        let mut out = Vec::new();
        w.expire(4, &mut out);
        assert!(out.is_empty());
        w.expire(30, &mut out);
        assert_eq!(out.iter().map(|t| t.index).collect::<Vec<_>>(), vec![2, 1]);
        out.clear();
        w.expire(999, &mut out);
        assert!(out.is_empty());
        w.expire(1000, &mut out);
        assert_eq!(out, vec![e(3, 1000)]);
        assert_eq!(w.len(), 0);
    }

    #[test]
    fn beyond_the_horizon_is_refiled_not_lost() {
        let mut w = TimerWheel::new(0);
        let far = SLOTS * TICK_MS * 3 + 7;
        w.schedule(e(9, far));
        let mut out = Vec::new();
        let mut now = 0;
        while now < far {
            now += 997;
            w.expire(now.min(far - 1), &mut out);
            assert!(out.is_empty(), "fired early at {now}");
        }
        // Timers fire on the first tick at or after their deadline, never before it.
        w.expire(far + TICK_MS, &mut out);
        assert_eq!(out, vec![e(9, far)]);
    }

    #[test]
    fn past_deadlines_fire_on_the_next_expiry() {
        let mut w = TimerWheel::new(1000);
        w.schedule(e(1, 10));
        let mut out = Vec::new();
        w.expire(1011, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(w.sleep_ms(1011, 500), 500);
    }
}
