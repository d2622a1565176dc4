//! A hashed timer wheel for connection deadlines (client/server idle, queue, PROXY header).
//!
//! Each connection is in the wheel at most once, through a [`TimerLink`] stored in its own slab
//! entry (an intrusive doubly linked list per slot), so the wheel itself is a fixed array of list
//! heads: no allocation when filing, O(1) unlinking when a connection closes, and no entry left
//! behind by a closed connection. Deadlines are milliseconds on the worker's clock. Rescheduling is
//! lazy: traffic only moves a connection's activity time; when its entry fires, the caller sees the
//! real deadline and files it again. Deadlines beyond the horizon are filed in the last slot and
//! re-filed when reached. Timers fire on the first tick at or after their deadline, never before.
//! A bitmap of the slots that hold entries tells the event loop how long it may sleep: until the
//! next tick with something filed for it, not the next tick (a worker holding only connections
//! whose deadlines are far away wakes for them, not a hundred times a second).

/// Wheel resolution.
pub const TICK_MS: u64 = 10;
const SLOTS: u64 = 4096;
const WORDS: usize = (SLOTS / 64) as usize;
/// "No connection" / "not filed".
pub const NIL: u32 = u32::MAX;

/// A connection's place in the wheel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerLink {
    pub prev: u32,
    pub next: u32,
    /// Slot the entry is filed in, or `NIL`.
    pub slot: u32,
    pub deadline: u64,
}

impl Default for TimerLink {
    fn default() -> TimerLink {
        TimerLink { prev: NIL, next: NIL, slot: NIL, deadline: 0 }
    }
}

impl TimerLink {
    pub fn is_filed(&self) -> bool {
        self.slot != NIL
    }
}

/// Where the links live (the connection slab).
pub trait Links {
    fn link(&mut self, index: u32) -> &mut TimerLink;
}

pub struct TimerWheel {
    heads: Vec<u32>,
    /// The last tick whose entries were handed out.
    cursor: u64,
    len: usize,
    /// The slots whose list is not empty: bit `slot % 64` of word `slot / 64`.
    occupied: [u64; WORDS],
}

impl TimerWheel {
    pub fn new(now_ms: u64) -> TimerWheel {
        TimerWheel { heads: vec![NIL; SLOTS as usize], cursor: now_ms / TICK_MS, len: 0, occupied: [0; WORDS] }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Files `index` for `deadline`, moving it if it was filed already.
    pub fn schedule(&mut self, index: u32, deadline: u64, links: &mut impl Links) {
        self.cancel(index, links);
        let tick = deadline.div_ceil(TICK_MS).clamp(self.cursor + 1, self.cursor + SLOTS - 1);
        let slot = (tick % SLOTS) as u32;
        let head = self.heads[slot as usize];
        if head != NIL {
            links.link(head).prev = index;
        }
        *links.link(index) = TimerLink { prev: NIL, next: head, slot, deadline };
        self.heads[slot as usize] = index;
        self.occupied[slot as usize / 64] |= 1 << (slot % 64);
        self.len += 1;
    }

    /// Takes `index` out of the wheel if it is filed.
    pub fn cancel(&mut self, index: u32, links: &mut impl Links) {
        let l = *links.link(index);
        if !l.is_filed() {
            return;
        }
        if l.prev != NIL {
            links.link(l.prev).next = l.next;
        } else {
            self.heads[l.slot as usize] = l.next;
            if l.next == NIL {
                self.occupied[l.slot as usize / 64] &= !(1 << (l.slot % 64));
            }
        }
        if l.next != NIL {
            links.link(l.next).prev = l.prev;
        }
        *links.link(index) = TimerLink::default();
        self.len -= 1;
    }

    /// Unfiles every entry whose deadline is at or before `now_ms` and puts its index in `out`;
    /// entries reached early (beyond the horizon when filed) are filed again.
    pub fn expire(&mut self, now_ms: u64, links: &mut impl Links, out: &mut Vec<u32>) {
        let now_tick = now_ms / TICK_MS;
        while self.cursor < now_tick && self.len > 0 {
            self.cursor += 1;
            let slot = (self.cursor % SLOTS) as usize;
            let mut i = std::mem::replace(&mut self.heads[slot], NIL);
            self.occupied[slot / 64] &= !(1 << (slot % 64));
            while i != NIL {
                let l = *links.link(i);
                *links.link(i) = TimerLink::default();
                self.len -= 1;
                if l.deadline <= now_ms {
                    out.push(i);
                } else {
                    // `schedule` files at cursor + 1 or later: never into the slot being walked.
                    self.schedule(i, l.deadline, links);
                }
                i = l.next;
            }
        }
        self.cursor = self.cursor.max(now_tick);
    }

    /// How long the event loop may sleep before the next tick with entries filed for it is due
    /// (at most `cap_ms`): until then `expire` would find nothing.
    pub fn sleep_ms(&self, now_ms: u64, cap_ms: u64) -> u64 {
        match self.next_filed_tick() {
            Some(tick) => (tick * TICK_MS).saturating_sub(now_ms).min(cap_ms),
            None => cap_ms,
        }
    }

    /// The first tick after the cursor whose slot holds entries (due then, or to be filed again
    /// then if beyond the horizon).
    fn next_filed_tick(&self) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        let from = self.cursor + 1;
        let start = (from % SLOTS) as usize;
        // The start word from the start slot on, the other words, then the start word's slots
        // below the start (the wheel wraps).
        for k in 0..=WORDS {
            let w = (start / 64 + k) % WORDS;
            let mut bits = self.occupied[w];
            if k == 0 {
                bits &= !0u64 << (start % 64);
            } else if k == WORDS {
                bits &= (1u64 << (start % 64)) - 1;
            }
            if bits != 0 {
                let slot = w * 64 + bits.trailing_zeros() as usize;
                return Some(from + ((slot + SLOTS as usize - start) % SLOTS as usize) as u64);
            }
        }
        debug_assert!(false, "{} entries filed but no slot marked", self.len);
        Some(from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Table(Vec<TimerLink>);

    impl Links for Table {
        fn link(&mut self, index: u32) -> &mut TimerLink {
            &mut self.0[index as usize]
        }
    }

    fn table(n: usize) -> Table {
        Table(vec![TimerLink::default(); n])
    }

    #[test]
    fn fires_in_order_of_ticks_and_not_early() {
        let (mut w, mut t) = (TimerWheel::new(0), table(4));
        w.schedule(1, 25, &mut t);
        w.schedule(2, 5, &mut t);
        w.schedule(3, 1000, &mut t);
        let mut out = Vec::new();
        w.expire(4, &mut t, &mut out);
        assert!(out.is_empty());
        w.expire(30, &mut t, &mut out);
        assert_eq!(out, vec![2, 1]);
        out.clear();
        w.expire(999, &mut t, &mut out);
        assert!(out.is_empty());
        w.expire(1000, &mut t, &mut out);
        assert_eq!(out, vec![3]);
        assert!(w.is_empty());
        assert!(t.0.iter().all(|l| !l.is_filed()));
    }

    #[test]
    fn beyond_the_horizon_is_refiled_not_lost() {
        let (mut w, mut t) = (TimerWheel::new(0), table(1));
        let far = SLOTS * TICK_MS * 3 + 7;
        w.schedule(0, far, &mut t);
        let mut out = Vec::new();
        let mut now = 0;
        while now < far {
            now += 997;
            w.expire(now.min(far - 1), &mut t, &mut out);
            assert!(out.is_empty(), "fired early at {now}");
        }
        w.expire(far + TICK_MS, &mut t, &mut out);
        assert_eq!(out, vec![0]);
    }

    #[test]
    fn cancel_and_reschedule_unlink_in_place() {
        let (mut w, mut t) = (TimerWheel::new(0), table(5));
        for i in 0..5 {
            w.schedule(i, 100, &mut t); // all in one slot: a list of five
        }
        w.cancel(2, &mut t); // middle
        w.cancel(4, &mut t); // head
        w.cancel(0, &mut t); // tail
        w.schedule(3, 500, &mut t); // moved to another slot
        assert_eq!(w.len(), 2);
        let mut out = Vec::new();
        w.expire(200, &mut t, &mut out);
        assert_eq!(out, vec![1]);
        w.expire(600, &mut t, &mut out);
        assert_eq!(out, vec![1, 3]);
        assert!(w.is_empty());
    }

    #[test]
    fn memory_does_not_grow_with_churn() {
        // A million connections filed and cancelled: the wheel stays its fixed array of heads.
        let (mut w, mut t) = (TimerWheel::new(0), table(1000));
        for round in 0..1000u64 {
            for i in 0..1000u32 {
                w.schedule(i, round * 7 + u64::from(i), &mut t);
            }
            for i in 0..1000u32 {
                w.cancel(i, &mut t);
            }
        }
        assert!(w.is_empty());
        assert_eq!(w.heads.len(), SLOTS as usize);
    }

    #[test]
    fn sleeps_until_the_next_tick_with_entries() {
        let (mut w, mut t) = (TimerWheel::new(1_000), table(4));
        assert_eq!(w.sleep_ms(1_003, 1_000), 1_000, "nothing filed");
        w.schedule(0, 51_000, &mut t);
        // Far away: the cap, not the next tick.
        assert_eq!(w.sleep_ms(1_003, 1_000), 1_000);
        w.schedule(1, 1_234, &mut t);
        assert_eq!(w.sleep_ms(1_003, 1_000), 237, "until the tick of 1,240");
        let mut out = Vec::new();
        w.expire(1_240, &mut t, &mut out);
        assert_eq!(out, vec![1]);
        // Cancelling the last entry of a slot clears it; one past the end of the wheel's turn
        // (its slot lies before the cursor's) is found across the wrap.
        w.schedule(2, 2_000, &mut t);
        w.cancel(2, &mut t);
        w.cancel(0, &mut t);
        w.schedule(3, 1_240 + SLOTS * TICK_MS - 30, &mut t);
        assert_eq!(w.sleep_ms(1_240, u64::MAX), SLOTS * TICK_MS - 30);
        // Beyond the horizon: filed in the wheel's last slot, the wake there files it again.
        w.schedule(3, 10 * SLOTS * TICK_MS, &mut t);
        assert_eq!(w.sleep_ms(1_240, u64::MAX), (SLOTS - 1) * TICK_MS);
        w.expire(1_240 + (SLOTS - 1) * TICK_MS, &mut t, &mut out);
        assert_eq!((out.len(), w.len()), (1, 1), "refiled, not fired");
        assert!(w.sleep_ms(1_240 + (SLOTS - 1) * TICK_MS, u64::MAX) > 0);
    }

    #[test]
    fn past_deadlines_fire_on_the_next_expiry() {
        let (mut w, mut t) = (TimerWheel::new(1000), table(1));
        w.schedule(0, 10, &mut t);
        let mut out = Vec::new();
        w.expire(1011, &mut t, &mut out);
        assert_eq!(out, vec![0]);
        assert_eq!(w.sleep_ms(1011, 500), 500);
    }
}
