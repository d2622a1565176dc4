//! maxconn as per-worker shares that always add up to the configured limit.
//!
//! Every limit (global, per frontend, per backend, per server) is split between the workers at start.
//! A worker admits a connection only against its own share: no atomics or locks on the data path, and
//! the sum of what the workers admit never exceeds the limit. A worker whose share runs out asks the
//! others, over the control channels, to lend spare share: the request travels worker to worker
//! until one has spare (and grants half of it) or it comes back empty; every worker that had none
//! remembers the asker and grants it the next slot it frees while it has no demand of its own. Share
//! in transit is held by nobody, so the invariant `sum(held) <= limit` holds at every instant.
//! All of this is the slow path: it runs only when a worker is at its share.

/// Index of a limit in the [`LimitTable`].
pub type LimitId = u32;

/// Every limit of the configuration, with its effective total.
#[derive(Clone, Debug, Default)]
pub struct LimitTable {
    pub totals: Vec<u32>,
    pub names: Vec<String>,
    pub global: LimitId,
    /// Per frontend: its limit, when it has one below the global one.
    pub frontend: Vec<Option<LimitId>>,
    /// Per frontend with `accept_proxy`: the connections reading their PROXY header (held instead
    /// of the global and frontend limits until the header is all there).
    pub proxy_header: Vec<Option<LimitId>>,
    pub backend: Vec<Option<LimitId>>,
    /// Per backend, per server.
    pub server: Vec<Vec<Option<LimitId>>>,
}

impl LimitTable {
    pub fn add(&mut self, name: String, total: u32) -> LimitId {
        self.totals.push(total);
        self.names.push(name);
        (self.totals.len() - 1) as LimitId
    }
}

/// Worker `w`'s initial part of `total` split `workers` ways (the parts add up to `total`).
pub fn initial_share(total: u32, workers: usize, w: usize) -> u32 {
    // (A part is at most `total`: it fits.)
    split(u64::from(total), workers, w) as u32
}

/// Worker `w`'s part of `total` split `workers` ways: the first `total % workers` workers get one
/// more, so the parts add up to `total` (maxconn shares, `rate_limit` shares).
pub fn split(total: u64, workers: usize, w: usize) -> u64 {
    let n = workers as u64;
    total / n + u64::from((w as u64) < total % n)
}

/// A message of the lending protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShareMsg {
    /// `from` needs share of `limit` and can hold `room` more; `hops` workers have been asked.
    Borrow { limit: LimitId, from: u16, room: u32, hops: u16 },
    /// Share handed to the receiver (0: nobody had spare; the asker is on the waiter lists).
    Grant { limit: LimitId, amount: u32 },
}

/// One worker's view of every limit.
pub struct Shares {
    me: u16,
    workers: u16,
    held: Vec<u32>,
    used: Vec<u32>,
    cap: Vec<u32>,
    asking: Vec<bool>,
    /// This worker has demand it could not admit (paused accept, queued connections).
    blocked: Vec<bool>,
    /// Workers that asked while this one had nothing to spare, oldest first.
    waiters: Vec<Vec<u16>>,
    /// Share lent to other workers since start (for stats).
    pub lent: u64,
    pub borrowed: u64,
    /// Limits of deleted servers ([`Shares::retire`]): their messages are dropped, and the next
    /// [`Shares::push`] takes the first of them again.
    dead: Vec<bool>,
    retired: std::collections::VecDeque<LimitId>,
}

impl Shares {
    /// `caps[i]`: the most of limit `i` this worker may ever hold.
    pub fn new(table: &LimitTable, me: usize, workers: usize, caps: Vec<u32>) -> Shares {
        let n = table.totals.len();
        let held = table.totals.iter().zip(&caps).map(|(&t, &c)| initial_share(t, workers, me).min(c)).collect();
        Shares {
            me: me as u16,
            workers: workers as u16,
            held,
            used: vec![0; n],
            cap: caps,
            asking: vec![false; n],
            blocked: vec![false; n],
            waiters: vec![Vec::new(); n],
            lent: 0,
            borrowed: 0,
            dead: vec![false; n],
            retired: std::collections::VecDeque::new(),
        }
    }

    /// A limit added at run time (`add server ... maxconn N`): every worker adds (and retires) the
    /// same limits in the same order, so they get the same id; this worker starts with its initial
    /// part of `total` (at most `cap`). The id is that of the limit retired first, if any (so
    /// servers added and deleted all day grow no table), else a new one.
    pub fn push(&mut self, total: u32, cap: u32) -> LimitId {
        let share = initial_share(total, self.workers as usize, self.me as usize).min(cap);
        if let Some(id) = self.retired.pop_front() {
            let i = id as usize;
            (self.held[i], self.used[i], self.cap[i], self.dead[i]) = (share, 0, cap, false);
            return id;
        }
        self.held.push(share);
        self.used.push(0);
        self.cap.push(cap);
        self.asking.push(false);
        self.blocked.push(false);
        self.waiters.push(Vec::new());
        self.dead.push(false);
        (self.held.len() - 1) as LimitId
    }

    /// The limit of a deleted server whose index `add server` takes again, which no connection
    /// holds or can take any more (the supervisor checked every worker, and no engine replaced by
    /// a reload moves connections in): forgotten, with whatever of it is queued in `out`; a
    /// message for it that arrives later is dropped. Every worker retires it while handling that
    /// command, so once all have, every message about its old use still on its way is queued
    /// ahead of the next command, whose [`Shares::push`] may take its id again and find nothing
    /// of the old use.
    pub fn retire(&mut self, id: LimitId, out: &mut Vec<(u16, ShareMsg)>) {
        let i = id as usize;
        if self.dead[i] {
            return;
        }
        debug_assert_eq!(self.used[i], 0, "a retired limit is held by no connection");
        (self.held[i], self.used[i], self.asking[i], self.blocked[i], self.dead[i]) = (0, 0, false, false, true);
        self.waiters[i].clear();
        out.retain(
            |(_, m)| !matches!(*m, ShareMsg::Borrow { limit, .. } | ShareMsg::Grant { limit, .. } if limit == id),
        );
        self.retired.push_back(id);
    }

    pub fn held(&self, id: LimitId) -> u32 {
        self.held[id as usize]
    }

    pub fn used(&self, id: LimitId) -> u32 {
        self.used[id as usize]
    }

    pub fn has_room(&self, id: LimitId) -> bool {
        self.used[id as usize] < self.held[id as usize]
    }

    /// Takes one unit of every limit in `ids`, or none of them.
    pub fn take_all(&mut self, ids: &[LimitId]) -> bool {
        if ids.iter().all(|&id| self.has_room(id)) {
            for &id in ids {
                self.used[id as usize] += 1;
            }
            true
        } else {
            false
        }
    }

    /// Returns one unit of `id`. A worker with no demand of its own hands freed share to a waiter.
    pub fn release(&mut self, id: LimitId, out: &mut Vec<(u16, ShareMsg)>) {
        let i = id as usize;
        debug_assert!(self.used[i] > 0);
        self.used[i] = self.used[i].saturating_sub(1);
        if !self.blocked[i] && self.held[i] > self.used[i] && !self.waiters[i].is_empty() {
            let to = self.waiters[i].remove(0);
            self.held[i] -= 1;
            self.lent += 1;
            out.push((to, ShareMsg::Grant { limit: id, amount: 1 }));
        }
    }

    /// Records demand this worker cannot admit and asks the others for share (once at a time).
    pub fn want(&mut self, id: LimitId, out: &mut Vec<(u16, ShareMsg)>) {
        let i = id as usize;
        self.blocked[i] = true;
        let room = self.cap[i].saturating_sub(self.held[i]);
        if self.workers > 1 && !self.asking[i] && room > 0 {
            self.asking[i] = true;
            let next = (self.me + 1) % self.workers;
            out.push((next, ShareMsg::Borrow { limit: id, from: self.me, room, hops: 1 }));
        }
    }

    /// The demand recorded by [`Shares::want`] is gone (admitted, or no longer there). Spare share
    /// goes to the workers that asked meanwhile (this one turned them down while it was blocked):
    /// half of what is spare to each in turn, as a borrow would have got.
    pub fn satisfied(&mut self, id: LimitId, out: &mut Vec<(u16, ShareMsg)>) {
        let i = id as usize;
        self.blocked[i] = false;
        while !self.waiters[i].is_empty() {
            let spare = self.held[i].saturating_sub(self.used[i]);
            if spare == 0 {
                break;
            }
            let give = (spare / 2).max(1);
            let to = self.waiters[i].remove(0);
            self.held[i] -= give;
            self.lent += u64::from(give);
            out.push((to, ShareMsg::Grant { limit: id, amount: give }));
        }
    }

    pub fn is_blocked(&self, id: LimitId) -> bool {
        self.blocked[id as usize]
    }

    /// Handles a protocol message; returns true when this worker received share.
    pub fn on_message(&mut self, msg: ShareMsg, out: &mut Vec<(u16, ShareMsg)>) -> bool {
        let (ShareMsg::Borrow { limit, .. } | ShareMsg::Grant { limit, .. }) = msg;
        if self.dead[limit as usize] {
            return false; // (A deleted server's: sent before its sender retired it.)
        }
        match msg {
            ShareMsg::Borrow { limit, from, room, hops } => {
                let i = limit as usize;
                let spare = self.held[i] - self.used[i].min(self.held[i]);
                if spare > 0 && !self.blocked[i] {
                    let give = (spare / 2).max(1).min(room);
                    self.held[i] -= give;
                    self.lent += u64::from(give);
                    out.push((from, ShareMsg::Grant { limit, amount: give }));
                } else {
                    if !self.waiters[i].contains(&from) {
                        self.waiters[i].push(from);
                    }
                    let next = (self.me + 1) % self.workers;
                    if next == from || hops + 1 >= self.workers {
                        out.push((from, ShareMsg::Grant { limit, amount: 0 }));
                    } else {
                        out.push((next, ShareMsg::Borrow { limit, from, room, hops: hops + 1 }));
                    }
                }
                false
            }
            ShareMsg::Grant { limit, amount } => {
                let i = limit as usize;
                self.asking[i] = false;
                self.held[i] += amount;
                self.borrowed += u64::from(amount);
                // Share beyond this worker's cap (it shrank its demand meanwhile) goes to a waiter.
                if self.held[i] > self.cap[i] {
                    let extra = self.held[i] - self.cap[i];
                    if let Some(to) = self.waiters[i].first().copied() {
                        self.waiters[i].remove(0);
                        self.held[i] -= extra;
                        self.lent += u64::from(extra);
                        out.push((to, ShareMsg::Grant { limit, amount: extra }));
                    }
                }
                amount > 0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(total: u32) -> LimitTable {
        let mut t = LimitTable::default();
        t.global = t.add("global".into(), total);
        t
    }

    /// Delivers messages between simulated workers until quiet.
    fn run(workers: &mut [Shares], mut mail: Vec<(u16, ShareMsg)>) {
        while !mail.is_empty() {
            let mut next = Vec::new();
            for (to, msg) in mail {
                workers[to as usize].on_message(msg, &mut next);
            }
            mail = next;
        }
    }

    #[test]
    fn shares_add_up() {
        for total in [1, 2, 99, 100, 101, 2_000_000] {
            for n in 1..=7 {
                let sum: u32 = (0..n).map(|w| initial_share(total, n, w)).sum();
                assert_eq!(sum, total);
            }
        }
    }

    #[test]
    fn uneven_demand_reaches_the_limit_exactly() {
        let t = table(100);
        let mut ws: Vec<Shares> = (0..2).map(|w| Shares::new(&t, w, 2, vec![100])).collect();
        // Worker 0 sees 30 clients, worker 1 sees 120.
        let mut admitted = [0u32; 2];
        for _ in 0..30 {
            assert!(ws[0].take_all(&[0]));
            admitted[0] += 1;
        }
        let mut mail = Vec::new();
        for _ in 0..120 {
            if ws[1].take_all(&[0]) {
                admitted[1] += 1;
            } else {
                ws[1].want(0, &mut mail);
                run(&mut ws, std::mem::take(&mut mail));
                if ws[1].take_all(&[0]) {
                    admitted[1] += 1;
                }
            }
        }
        assert_eq!(admitted[0] + admitted[1], 100, "{admitted:?}");
        assert_eq!(ws[0].held(0) + ws[1].held(0), 100);
    }

    /// A deleted server's limit, retired by every worker, is taken again by the next limit pushed
    /// after that (not by one pushed in the same command): fresh shares that add up to the new
    /// total, whatever of the old use was lent, queued or still on its way (dropped).
    #[test]
    fn a_retired_limit_is_taken_again_with_nothing_of_its_old_use() {
        let t = table(100);
        let mut ws: Vec<Shares> = (0..2).map(|w| Shares::new(&t, w, 2, vec![100])).collect();
        let old: Vec<LimitId> = ws.iter_mut().map(|w| w.push(10, 10)).collect();
        assert_eq!(old, [1, 1], "the same id on every worker");
        // Worker 1 borrows all of worker 0's spare, then gives its connections back.
        while ws[1].take_all(&[1]) {}
        let mut mail = Vec::new();
        ws[1].want(1, &mut mail);
        run(&mut ws, mail);
        assert_eq!((ws[0].held(1), ws[1].held(1)), (3, 7), "lent: half of the spare");
        while ws[1].take_all(&[1]) {}
        // A grant of the old use on its way (worker 0 had one queued when it retired the limit;
        // another was sent before and arrives after).
        let mut out = vec![(1u16, ShareMsg::Grant { limit: 1, amount: 1 })];
        for _ in 0..7 {
            ws[1].release(1, &mut out);
        }
        ws[0].retire(1, &mut out);
        assert!(out.is_empty(), "what was queued for it goes: {out:?}");
        ws[1].retire(1, &mut out);
        let mut late = Vec::new();
        assert!(!ws[1].on_message(ShareMsg::Grant { limit: 1, amount: 3 }, &mut late), "dropped");
        assert!(late.is_empty());
        // The next limit pushed (a server added with maxconn 6) takes id 1, fresh.
        let new: Vec<LimitId> = ws.iter_mut().map(|w| w.push(6, 6)).collect();
        assert_eq!(new, [1, 1]);
        assert_eq!(ws[0].held(1) + ws[1].held(1), 6, "the new total, nothing of the old");
        assert_eq!((ws[0].used(1), ws[1].used(1)), (0, 0));
        while ws[0].take_all(&[1]) {}
        let mut mail = Vec::new();
        ws[0].want(1, &mut mail);
        run(&mut ws, mail);
        while ws[0].take_all(&[1]) {}
        while ws[1].take_all(&[1]) {}
        assert_eq!((ws[0].used(1), ws[1].used(1)), (4, 2), "the new limit lends");
        assert_eq!(ws[0].held(1) + ws[1].held(1), 6, "and admits exactly its total");
        // One pushed while nothing is retired is new.
        assert_eq!(ws[0].push(5, 5), 2);
    }

    #[test]
    fn freed_slots_go_to_a_waiting_worker() {
        let t = table(10);
        let mut ws: Vec<Shares> = (0..3).map(|w| Shares::new(&t, w, 3, vec![10])).collect();
        for w in ws.iter_mut() {
            while w.take_all(&[0]) {}
        }
        let mut mail = Vec::new();
        ws[2].want(0, &mut mail);
        run(&mut ws, std::mem::take(&mut mail));
        assert!(!ws[2].has_room(0), "nobody had spare");
        // Worker 0 frees a slot and has no demand of its own: it goes to worker 2.
        ws[0].release(0, &mut mail);
        run(&mut ws, std::mem::take(&mut mail));
        assert!(ws[2].has_room(0));
        let total: u32 = ws.iter().map(|w| w.held(0)).sum();
        assert_eq!(total, 10);
        // Worker 1 also remembered worker 2 as a waiter; its release may hand worker 2 a second
        // unit it no longer needs. Share only moves: the total stays the limit.
        ws[1].release(0, &mut mail);
        run(&mut ws, std::mem::take(&mut mail));
        let total: u32 = ws.iter().map(|w| w.held(0)).sum();
        assert_eq!(total, 10);
    }

    #[test]
    fn a_blocked_worker_keeps_what_it_frees() {
        let t = table(4);
        let mut ws: Vec<Shares> = (0..2).map(|w| Shares::new(&t, w, 2, vec![4])).collect();
        for w in ws.iter_mut() {
            while w.take_all(&[0]) {}
        }
        let mut mail = Vec::new();
        ws[0].want(0, &mut mail);
        ws[1].want(0, &mut mail);
        run(&mut ws, std::mem::take(&mut mail));
        ws[1].release(0, &mut mail);
        assert!(mail.is_empty(), "worker 1 has demand itself");
        assert!(ws[1].has_room(0));
    }

    #[test]
    fn a_worker_that_turned_askers_down_while_blocked_lends_once_satisfied() {
        let t = table(10);
        let mut ws: Vec<Shares> = (0..2).map(|w| Shares::new(&t, w, 2, vec![10])).collect();
        // Worker 0 is blocked (its demand waits for something else) with 3 of its 5 spare.
        for _ in 0..2 {
            assert!(ws[0].take_all(&[0]));
        }
        let mut mail = Vec::new();
        ws[0].blocked[0] = true;
        while ws[1].take_all(&[0]) {}
        ws[1].want(0, &mut mail);
        run(&mut ws, std::mem::take(&mut mail));
        assert!(!ws[1].has_room(0), "turned down while blocked");
        // Its demand gone, it lends the asker half of its spare without being asked again.
        ws[0].satisfied(0, &mut mail);
        run(&mut ws, std::mem::take(&mut mail));
        assert_eq!(ws[1].held(0), 6);
        assert_eq!(ws[0].held(0) + ws[1].held(0), 10);
    }

    #[test]
    fn grants_respect_the_askers_cap() {
        let t = table(100);
        let mut ws = vec![Shares::new(&t, 0, 2, vec![52]), Shares::new(&t, 1, 2, vec![100])];
        while ws[0].take_all(&[0]) {}
        let mut mail = Vec::new();
        ws[0].want(0, &mut mail);
        run(&mut ws, mail);
        assert_eq!(ws[0].held(0), 52);
        assert_eq!(ws[0].held(0) + ws[1].held(0), 100);
    }
}
