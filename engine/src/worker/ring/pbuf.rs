//! The worker's provided-buffer ring (IORING_REGISTER_PBUF_RING): the buffers a multishot
//! receive picks from, one shared by all of a worker's connections, so a connection holds a
//! buffer only while bytes it received wait to be sent on.
//!
//! The kernel takes buffers from the ring's head; we add them at its tail. A receive's completion
//! names the buffer it filled (`IORING_CQE_F_BUFFER`): from then on that buffer is ours, as a
//! [`RingBuf`] handle (not `Copy`, made only from such a completion), until we give it back —
//! after the send that forwards its bytes has completed. A bundled receive (6.10+) fills several:
//! its completion names the first, and the others are the ones offered right after it in the
//! ring (the kernel takes consecutive descriptors from its head), each full but the last; we
//! remember the slot each buffer was offered in to find them.
//!
//! Only as many buffers are in the ring as it takes to keep the receives fed (`high`, topped
//! up from a LIFO free list as completions consume them), and buffers are created on first
//! use up to `max`. All of them lie in one lazy mapping (`max × size` of address space): a page
//! becomes memory only when a receive writes into it, so a 16-byte message costs one page of its
//! buffer (`tune.recv_buffer_size`), and a worker that only sees small messages holds about
//! `high` pages whatever its number of connections; bulk transfers fill whole buffers, up to
//! `max` of them.
//! The kernel fills buffers for every socket with data in one go (task work): when more sockets
//! had data at once than the ring offered, some receives end with ENOBUFS and must be re-armed.
//! Each time that happens the ring offers twice as many (up to `WIDEST`), so a worker settles at
//! what its bursts need: many connections with periodic messages need more offered than one
//! bulk flow does. Once a second ([`BufRing::trim`]) the offer falls to a quarter if no receive
//! ran short since, and the free buffers that sat unused all that time, or lie below what the
//! ring can take, give their pages back to the kernel: after a burst, memory returns to what the
//! traffic uses as it goes on. Buffers still in the ring cannot be taken back, but those offered
//! past the narrowed offer that no receive reached for a second give their pages back too, where
//! the kernel tells the ring's head (PBUF_STATUS, 6.8+): with DEFER_TASKRUN a receive fills a
//! buffer only within this thread's io_uring_enter, so between two of them the slots from the
//! head on are untouched, and a receive that takes one later writes into fresh pages. (Before
//! 6.8 they keep their pages until receives take them.)
//!
//! Invariants: a buffer is in exactly one place — the ring (the kernel may fill it), a
//! `RingBuf` (ours), the list of a bundle's buffers not yet handed out, or the free list; the
//! ring's memory and every buffer are freed only when no request can use them (the owning
//! `Ring`'s `Drop`). A consumed descriptor is not overwritten before its completion is taken:
//! the kernel posts each completion as it takes the buffers, so completions come in the order
//! the descriptors were consumed; until its completion is taken a buffer counts as in the ring,
//! and at most `high` <= `entries` are, so the tail cannot come round to its slot. (Were it
//! otherwise, `taken` finds a buffer that is not where it was offered and stops there.)

use std::collections::VecDeque;
use std::io;
use std::mem::ManuallyDrop;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::IoUring;

/// Buffers offered at first, and at most (after widening on ENOBUFS).
const NARROWEST: u32 = 64;
const WIDEST: u32 = 2048;
/// `slot_of` for a buffer not in the ring.
const NOT_OFFERED: u16 = u16::MAX;
use io_uring::types::BufRingEntry;

/// A buffer a receive filled, ours until given back to the ring.
#[must_use = "a ring buffer must be given back"]
#[derive(Debug, PartialEq, Eq)]
pub struct RingBuf {
    bid: u16,
}

impl RingBuf {
    fn into_bid(self) -> u16 {
        ManuallyDrop::new(self).bid
    }
}

impl Drop for RingBuf {
    fn drop(&mut self) {
        debug_assert!(std::thread::panicking(), "ring buffer {} dropped instead of given back", self.bid);
    }
}

pub(super) struct BufRing {
    /// The ring of descriptors (page-aligned, `entries` long), shared with the kernel.
    ring: NonNull<BufRingEntry>,
    ring_bytes: usize,
    entries: u16,
    /// Our copy of the tail (the kernel reads the one in the ring).
    tail: u16,
    pub(super) bgid: u16,
    /// The buffers: buffer `bid` is `size` bytes at `bid × size` of this lazy mapping of
    /// `max × size` bytes (unmapped by `release`).
    region: NonNull<u8>,
    size: usize,
    max: usize,
    /// Buffers handed out so far (ids `0..created`).
    created: usize,
    /// Buffers neither in the ring nor out: the last given back first.
    free: Vec<u16>,
    /// The fewest entries `free` had since the last trim: `free[..cold]` were not used since.
    cold: usize,
    /// `free[..discarded]` hold no memory (their pages were given back and not written since).
    discarded: usize,
    /// A receive ran short (ENOBUFS) since the last trim.
    short: bool,
    /// Whether the kernel tells the ring's head (PBUF_STATUS, 6.8+): cleared on its first refusal.
    status: bool,
    /// The kernel's head and our tail at the last trim (with `status`).
    last: Option<(u16, u16)>,
    /// By buffer id: offered, and its pages given back by a trim since (cleared when offered
    /// again after use).
    bare: Vec<bool>,
    /// Buffers in the ring now (provided, not yet consumed by a completion).
    in_ring: u32,
    /// Buffers the ring offers: kept in it, widened on ENOBUFS, narrowed by `trim`.
    high: u32,
    /// Buffers out (`RingBuf`s alive, and `more`).
    pub(super) out: u32,
    /// The ring slot each buffer was last offered in, by buffer id (`NOT_OFFERED` once taken).
    slot_of: Vec<u16>,
    /// The buffers after the first of the last bundle taken, in order, until handed out.
    more: VecDeque<u16>,
    /// By buffer id: zero-copy sends whose notification has not come that read from it (empty
    /// until the first such send).
    zc_refs: Vec<u32>,
    /// By buffer id: given back while a zero-copy send still read from it; it goes back once
    /// the last of them is done (counted in `out` until then).
    zc_parked: Vec<bool>,
}

// SAFETY: the descriptor mapping and the buffers are owned by this BufRing alone (no other
// handle to them exists on our side), so moving it to another thread moves them with it; the
// kernel's access goes through the io_uring instance, which is moved together with it.
unsafe impl Send for BufRing {}

impl BufRing {
    /// Registers a ring for buffers of `size` bytes, at most `max` of them (at most 65,536: a
    /// buffer id is 16 bits), as buffer group `bgid`. The ring holds only the `high` buffers
    /// offered at a time, so its descriptors are few whatever `max` is.
    /// `status`: whether to ask the kernel for the ring's head (PBUF_STATUS: see [`BufRing::trim`]).
    pub(super) fn new(uring: &IoUring, bgid: u16, size: usize, max: usize, status: bool) -> io::Result<BufRing> {
        debug_assert!((1..=1 << 16).contains(&max));
        let high = NARROWEST.min(max as u32);
        let entries = (WIDEST.min(max as u32) as u16).next_power_of_two();
        let ring_bytes = usize::from(entries) * std::mem::size_of::<BufRingEntry>();
        let ring = super::register::map_anonymous(ring_bytes)?.cast::<BufRingEntry>();
        // SAFETY: `ring` is a fresh, zeroed, page-aligned mapping of `entries` descriptors that
        // stays mapped until this BufRing is dropped, which unregisters it first.
        let registered =
            unsafe { uring.submitter().register_buf_ring_with_flags(ring.as_ptr() as u64, entries, bgid, 0) };
        if let Err(e) = registered {
            // SAFETY: the mapping made above, not registered, used by nobody.
            unsafe { super::register::unmap(ring.cast(), ring_bytes) };
            return Err(e);
        }
        let region = match super::register::map_lazy(max * size) {
            Ok(region) => region,
            Err(e) => {
                let _ = uring.submitter().unregister_buf_ring(bgid);
                // SAFETY: unregistered: the kernel holds no reference to the mapping any more.
                unsafe { super::register::unmap(ring.cast(), ring_bytes) };
                return Err(e);
            }
        };
        let mut r = BufRing {
            ring,
            ring_bytes,
            entries,
            tail: 0,
            bgid,
            region,
            size,
            max,
            created: 0,
            free: Vec::new(),
            cold: 0,
            discarded: 0,
            short: false,
            status,
            last: None,
            bare: Vec::new(),
            in_ring: 0,
            high,
            out: 0,
            slot_of: Vec::new(),
            more: VecDeque::with_capacity(usize::from(entries)),
            zc_refs: Vec::new(),
            zc_parked: Vec::new(),
        };
        r.refill();
        Ok(r)
    }

    /// Tops the ring up to `high` buffers (every buffer a completion takes is replaced before the
    /// next wait, so a burst finds `high` offered): from the free list
    /// first (the most recently used), then new buffers up to `max`.
    pub(super) fn refill(&mut self) {
        if self.in_ring >= self.high {
            return;
        }
        let mut added = false;
        while self.in_ring < self.high {
            let bid = match self.free.pop() {
                Some(bid) => {
                    self.cold = self.cold.min(self.free.len());
                    self.discarded = self.discarded.min(self.free.len());
                    bid
                }
                None if self.created < self.max => {
                    self.created += 1;
                    self.slot_of.push(NOT_OFFERED);
                    self.bare.push(false);
                    (self.created - 1) as u16
                }
                None => break,
            };
            self.push(bid);
            added = true;
        }
        if added {
            self.publish();
        }
    }

    /// Writes buffer `bid`'s descriptor at the tail (not yet visible to the kernel).
    fn push(&mut self, bid: u16) {
        let slot = usize::from(self.tail & (self.entries - 1));
        let addr = self.buf_ptr(bid);
        // SAFETY: `slot` < `entries`, so the descriptor lies in the mapping; the kernel reads only
        // descriptors between its head and the published tail, and this one is past the tail.
        let e = unsafe { &mut *self.ring.as_ptr().add(slot) };
        // The buffer stays mapped until `release`, which runs only once no request can use it.
        e.set_addr(addr as u64);
        e.set_len(self.size as u32);
        e.set_bid(bid);
        self.slot_of[usize::from(bid)] = slot as u16;
        self.bare[usize::from(bid)] = false;
        self.tail = self.tail.wrapping_add(1);
        self.in_ring += 1;
    }

    /// Makes the descriptors written so far visible to the kernel (a release store of the tail).
    fn publish(&mut self) {
        // SAFETY: the ring's first descriptor is initialised memory of the mapping; the tail field
        // overlays its `resv` and is only ever accessed atomically by us and the kernel.
        let tail = unsafe { &*BufRingEntry::tail(self.ring.as_ptr()).cast::<AtomicU16>() };
        tail.store(self.tail, Ordering::Release);
    }

    /// A receive completion consumed `count` buffers from `bid` on (named by its CQE; more than
    /// one for a bundle): they are ours now. Returns the first; [`BufRing::take_more`] hands out
    /// the others, in order.
    pub(super) fn taken(&mut self, bid: u16, count: usize) -> RingBuf {
        while let Some(stale) = self.more.pop_front() {
            // Cannot happen: every bundle is taken apart before the next completion.
            debug_assert!(false, "buffer {stale} of an earlier bundle was never handed out");
            self.give_back(RingBuf { bid: stale });
        }
        let first = self.slot_of.get_mut(usize::from(bid)).map_or(NOT_OFFERED, |s| std::mem::replace(s, NOT_OFFERED));
        let mut taken = 1;
        for k in 1..count {
            let slot = first.wrapping_add(k as u16) & (self.entries - 1);
            // SAFETY: `slot` < `entries`: the descriptor lies in the mapping; the kernel only
            // reads descriptors, and this one stays as `push` wrote it until we offer it again.
            let next = unsafe { (*self.ring.as_ptr().add(usize::from(slot))).bid() };
            if first == NOT_OFFERED || self.slot_of.get(usize::from(next)) != Some(&slot) {
                // The bundle's buffers are not where they were offered: hand out what is known
                // rather than a buffer that may be elsewhere (the connection then closes).
                debug_assert!(false, "bundle from buffer {bid}: slot {slot} holds buffer {next}");
                break;
            }
            self.slot_of[usize::from(next)] = NOT_OFFERED;
            self.more.push_back(next);
            taken += 1;
        }
        self.in_ring = self.in_ring.saturating_sub(taken);
        self.out += taken;
        self.refill();
        RingBuf { bid }
    }

    /// The next buffer of the last bundle taken, in the order the kernel filled them.
    pub(super) fn take_more(&mut self) -> Option<RingBuf> {
        self.more.pop_front().map(|bid| RingBuf { bid })
    }

    /// The size of every buffer.
    pub(super) fn size(&self) -> usize {
        self.size
    }

    /// Where buffer `bid` starts.
    fn buf_ptr(&self, bid: u16) -> *mut u8 {
        debug_assert!(usize::from(bid) < self.created);
        // SAFETY: `bid` < `created` <= `max`, so the buffer lies inside the region's mapping.
        unsafe { self.region.as_ptr().add(usize::from(bid) * self.size) }
    }

    /// The bytes of a buffer we hold.
    pub(super) fn bytes(&self, b: &RingBuf) -> &[u8] {
        // SAFETY: a `RingBuf` is ours (the kernel filled it and writes no more into it until it
        // is given back and offered again), mapped until `release`, `size` bytes long.
        unsafe { std::slice::from_raw_parts(self.buf_ptr(b.bid), self.size) }
    }

    /// A pointer into a buffer we hold, for a send (stable: the region never moves).
    pub(super) fn ptr(&mut self, b: &RingBuf, off: usize) -> *const u8 {
        // SAFETY: within the buffer (`off` is clamped to its size), which is in the mapping.
        unsafe { self.buf_ptr(b.bid).add(off.min(self.size)) }
    }

    /// Copies the first `len` bytes of `src` to byte `at` of `dst`, past what `dst` holds.
    pub(super) fn append(&mut self, dst: &RingBuf, at: usize, src: &RingBuf, len: usize) {
        assert!(dst.bid != src.bid && at + len <= self.size, "append {len} B at {at} of a {} B buffer", self.size);
        // SAFETY: both buffers are ours (`RingBuf`s: the kernel writes into neither until they are
        // given back and offered again), distinct, and in the mapping; `at + len` is within the
        // buffer. No send reads `dst` past its queued bytes, where this writes (sendq.rs).
        unsafe { std::ptr::copy_nonoverlapping(self.buf_ptr(src.bid), self.buf_ptr(dst.bid).add(at), len) }
    }

    /// Gives a buffer back: onto the free list, and into the ring if it runs low. A buffer a
    /// zero-copy send still reads from waits for that send's notification ([`BufRing::zc_done`]).
    pub(super) fn give_back(&mut self, b: RingBuf) {
        let bid = b.into_bid();
        if self.zc_refs.get(bid as usize).is_some_and(|&n| n > 0) {
            self.zc_parked[bid as usize] = true;
            return;
        }
        self.put_back(bid);
    }

    /// Buffer `bid`, out until now, onto the free list, and into the ring if it runs low.
    fn put_back(&mut self, bid: u16) {
        self.out -= 1;
        self.free.push(bid);
        self.refill();
    }

    /// A zero-copy send is about to read from `b` (until its notification): its id.
    pub(super) fn zc_hold(&mut self, b: &RingBuf) -> u16 {
        if self.zc_refs.is_empty() {
            self.zc_refs = vec![0; self.max];
            self.zc_parked = vec![false; self.max];
        }
        self.zc_refs[b.bid as usize] += 1;
        b.bid
    }

    /// A zero-copy send that read from buffer `bid` is done with it: if it was given back
    /// meanwhile and no other such send reads it, it goes back now.
    pub(super) fn zc_done(&mut self, bid: u16) {
        let i = bid as usize;
        self.zc_refs[i] -= 1;
        if self.zc_refs[i] == 0 && std::mem::take(&mut self.zc_parked[i]) {
            self.put_back(bid);
        }
    }

    /// The most buffers this ring creates.
    pub(super) fn max(&self) -> usize {
        self.max
    }

    /// Buffers created so far.
    pub(super) fn created(&self) -> usize {
        self.created
    }

    /// Whether the ring has run dry (a multishot receive then ends with ENOBUFS).
    pub(super) fn is_empty(&self) -> bool {
        self.in_ring == 0
    }

    /// Buffers in the ring now, as far as the completions seen so far tell.
    pub(super) fn offered(&self) -> u32 {
        self.in_ring
    }

    /// A receive found the ring empty: offer twice as many from now on (up to `WIDEST`, and
    /// `max`), and top the ring up.
    pub(super) fn widen(&mut self) {
        self.short = true;
        let widest = WIDEST.min(self.max as u32).min(u32::from(self.entries));
        if self.high < widest {
            self.high = (self.high * 2).min(widest);
        }
        self.refill();
    }

    /// The slow path, once a second: offers a quarter as many buffers if no receive ran short
    /// since the last call (down to `NARROWEST`), and gives back to the kernel the pages of the
    /// free buffers that sat unused since then or lie below the `high` most recently used, and
    /// of the buffers still offered past the first `high` that no receive reached since (given
    /// the kernel's `head` of the ring: [`BufRing::kernel_head`]). Returns how many buffers it
    /// discarded.
    pub(super) fn trim(&mut self, head: Option<u16>) -> usize {
        let narrowest = NARROWEST.min(self.max as u32);
        if !self.short && self.high > narrowest {
            // A quiet second: a quarter of the offer (a burst widens it again in a few doublings).
            self.high = (self.high / 4).max(narrowest);
        }
        self.short = false;
        // The bottom of the free list: what sat unused for the whole second, and everything below
        // the `high` most recently used (more than the ring can take before the next trim).
        let upto = self.cold.max(self.free.len().saturating_sub(self.high as usize)).min(self.free.len());
        let from = self.discarded.min(upto);
        for &bid in &self.free[from..upto] {
            // SAFETY: a buffer in the free list is neither in the ring nor out: nothing reads or
            // writes it until it is offered again, and it lies in the lazy region.
            unsafe { super::register::discard(self.buf_ptr(bid), self.size) };
        }
        self.discarded = upto;
        self.cold = self.free.len();
        upto - from + head.map_or(0, |h| self.discard_offered(h))
    }

    /// The kernel's head of this ring (PBUF_STATUS, 6.8+): the next slot a receive consumes. None
    /// where the kernel does not tell (then what stays offered keeps its pages).
    pub(super) fn kernel_head(&mut self, uring: &IoUring) -> Option<u16> {
        if !self.status {
            return None;
        }
        let head = super::register::pbuf_head(uring, self.bgid).ok();
        self.status = head.is_some();
        head
    }

    /// After a burst the ring holds more buffers than it offers now (`high`): a narrowed offer
    /// is not replaced as receives take them, but those not taken yet keep the pages the burst
    /// wrote. Gives back the pages of those that lie past the first `high` from the kernel's
    /// `head` and were offered at the last trim already (no receive reached them for a whole
    /// second). Returns how many.
    fn discard_offered(&mut self, head: u16) -> usize {
        let Some((last_head, last_tail)) = self.last.replace((head, self.tail)) else { return 0 };
        // Slots `head..last_tail` were offered at the last trim and are not consumed yet.
        let (span, consumed) = (last_tail.wrapping_sub(last_head), head.wrapping_sub(last_head));
        if span > self.entries || consumed >= span {
            return 0;
        }
        // Never past our tail: `last` is in 16-bit positions, and with 65,536 receives or more
        // between two trims it can name slots that are not offered any more (a slot past the tail
        // has the index of one before the head: consumed, its completion perhaps not taken yet).
        let cold = (span - consumed).min(self.tail.wrapping_sub(head));
        let keep = self.high.min(u32::from(cold)) as u16;
        let mut n = 0;
        for k in keep..cold {
            let slot = head.wrapping_add(k) & (self.entries - 1);
            // SAFETY: `slot` < `entries`: the descriptor lies in the mapping, as `push` wrote it.
            let bid = unsafe { (*self.ring.as_ptr().add(usize::from(slot))).bid() };
            if self.slot_of.get(usize::from(bid)) != Some(&slot) {
                // Cannot happen: an unconsumed slot holds the buffer last offered there.
                debug_assert!(false, "slot {slot} holds buffer {bid}, offered elsewhere");
                continue;
            }
            if std::mem::replace(&mut self.bare[usize::from(bid)], true) {
                continue;
            }
            // SAFETY: the buffer is offered and not consumed (its slot lies at or past the head
            // the kernel just reported): nothing of ours reads or writes it, and the kernel
            // writes into provided buffers only while a receive runs, which with DEFER_TASKRUN
            // is within this thread's io_uring_enter, not now. A receive that takes it later
            // writes into fresh zeroed pages, as into a new buffer. It lies in the lazy region.
            unsafe { super::register::discard(self.buf_ptr(bid), self.size) };
            n += 1;
        }
        n
    }

    /// Bytes of the buffers' pages that are resident now (mincore: the slow path only).
    pub(super) fn resident(&self) -> usize {
        super::register::resident(self.region.as_ptr(), self.created * self.size)
    }

    /// Unregisters and unmaps the ring and the buffers (the owning `Ring` calls this once nothing
    /// can use them).
    pub(super) fn release(&mut self, uring: &IoUring) {
        let _ = uring.submitter().unregister_buf_ring(self.bgid);
        // SAFETY: unregistered: the kernel holds no reference to the mappings any more, and the
        // owner calls this only when no buffer is out.
        unsafe {
            super::register::unmap(self.ring.cast(), self.ring_bytes);
            super::register::unmap(self.region, self.max * self.size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the kernel does when a receive fills the buffer at the ring's head: the buffers come
    /// out in the order they were offered.
    fn take_next(r: &mut BufRing, next: &mut u16) -> RingBuf {
        let slot = usize::from(*next & (r.entries - 1));
        // SAFETY: the descriptor lies in the ring's mapping and was written by `push`.
        let bid = unsafe { (*r.ring.as_ptr().add(slot)).bid() };
        *next = next.wrapping_add(1);
        r.taken(bid, 1)
    }

    #[test]
    fn a_burst_widens_the_offer_and_quiet_seconds_shrink_it_and_give_the_memory_back() {
        let uring = IoUring::new(8).expect("an io_uring");
        let mut r = BufRing::new(&uring, 7, 4096, 1024, false).expect("a buffer ring");
        let mut head = 0u16;
        assert_eq!((r.offered(), r.created()), (64, 64), "64 offered at first, created as offered");

        // A burst: every offered buffer taken, twice over, with ENOBUFS twice.
        let mut held: Vec<RingBuf> = (0..128).map(|_| take_next(&mut r, &mut head)).collect();
        r.widen();
        r.widen();
        assert_eq!(r.offered(), 256, "each ENOBUFS doubles the offer");
        for b in &held {
            // The bytes a receive wrote.
            // SAFETY: a buffer we hold, inside the mapping.
            unsafe { r.buf_ptr(b.bid).write_bytes(0xab, 4096) };
        }
        let written = held[0].bid;
        for b in held.drain(..) {
            r.give_back(b);
        }
        assert_eq!(r.out, 0);

        // The first second after the burst: still short, so the offer stays; nothing is cold yet.
        assert_eq!(r.trim(None), 0);
        assert_eq!(r.high, 256);
        // A quiet second: the offer falls to a quarter, and the buffers nobody used give their
        // pages back.
        let discarded = r.trim(None);
        assert_eq!(r.high, 64);
        assert_eq!(discarded, r.free.len(), "every free buffer sat unused for a second");
        assert!(r.free.contains(&written));
        let b = RingBuf { bid: written };
        assert!(r.bytes(&b).iter().all(|&x| x == 0), "a discarded buffer reads as zeros: its page went back");
        std::mem::forget(b);
        assert_eq!(r.trim(None), 0, "a discarded buffer is not discarded again");
        r.trim(None);
        assert_eq!(r.high, 64, "down to the narrowest offer, not below");

        // A buffer used again is hot: taken from the free list, it is not counted as cold.
        let b = take_next(&mut r, &mut head);
        r.give_back(b);
        r.release(&uring);
    }

    #[test]
    fn a_buffer_given_back_while_zero_copy_sends_read_it_goes_back_after_the_last_of_them() {
        let uring = IoUring::new(8).expect("an io_uring");
        let mut r = BufRing::new(&uring, 9, 4096, 256, false).expect("a buffer ring");
        let mut head = 0u16;
        let (a, b) = (take_next(&mut r, &mut head), take_next(&mut r, &mut head));
        let (bid_a, bid_b) = (a.bid, b.bid);
        // Two sends read `a` (the second its rest after a short send), one reads `b`.
        r.zc_hold(&a);
        r.zc_hold(&a);
        r.zc_hold(&b);
        let free = r.free.len();
        r.give_back(a);
        r.give_back(b);
        assert_eq!((r.out, r.free.len()), (2, free), "both wait for their sends' notifications");
        r.zc_done(bid_b);
        assert_eq!(r.out, 1, "b's only send is done: b is back");
        assert!(r.free.contains(&bid_b) || r.slot_of[bid_b as usize] != NOT_OFFERED);
        r.zc_done(bid_a);
        assert_eq!(r.out, 1, "a second send still reads a");
        r.zc_done(bid_a);
        assert_eq!(r.out, 0, "the last one done: a is back");
        // A buffer held by a send and done before it is given back goes back at once.
        let c = take_next(&mut r, &mut head);
        let bid_c = r.zc_hold(&c);
        r.zc_done(bid_c);
        r.give_back(c);
        assert_eq!(r.out, 0);
        r.release(&uring);
    }

    #[test]
    fn buffers_left_offered_after_a_burst_give_their_pages_back_once_no_receive_reached_them_for_a_second() {
        let uring = IoUring::new(8).expect("an io_uring");
        let mut r = BufRing::new(&uring, 7, 4096, 1024, false).expect("a buffer ring");
        // A burst widened the offer to all 1,024 buffers, and receives wrote each (its page is
        // resident) before it came back and was offered again.
        for _ in 0..4 {
            r.widen();
        }
        assert_eq!(r.offered(), 1024);
        for bid in 0..1024 {
            // SAFETY: an offered buffer inside the region; no receive runs in this test.
            unsafe { r.buf_ptr(bid).write(1) };
        }
        assert_eq!(r.resident(), 1024 * 4096);
        // The kernel's head stands where the burst left it. The first trim only records it (and,
        // a receive having run short, keeps the offer); each quiet second after narrows the offer
        // to a quarter and gives back the pages of what lies past it from the head.
        let mut head = 0u16;
        assert_eq!(r.trim(Some(head)), 0);
        assert_eq!(r.trim(Some(head)), 768);
        assert_eq!((r.high, r.resident()), (256, 256 * 4096), "the 256 next in line keep their pages");
        assert_eq!(r.trim(Some(head)), 192);
        assert_eq!((r.high, r.resident()), (64, 64 * 4096));
        assert_eq!(r.trim(Some(head)), 0, "a buffer whose pages went back is not discarded again");
        // Receives take 10 (not replaced: the ring holds more than it offers); the 64 next in
        // line now reach past what kept its pages, which is not discarded again either.
        let taken: Vec<RingBuf> = (0..10).map(|_| take_next(&mut r, &mut head)).collect();
        assert_eq!(r.trim(Some(head)), 0);
        assert_eq!(r.resident(), 64 * 4096, "the 10 taken and the 54 after them");
        for b in taken {
            r.give_back(b);
        }
        // A receive that takes a buffer discarded while offered finds fresh zeroed pages.
        let later: Vec<RingBuf> = (0..61).map(|_| take_next(&mut r, &mut head)).collect();
        let last = later.last().unwrap();
        assert!(r.bytes(last).iter().all(|&x| x == 0), "discarded while offered: reads as zeros");
        assert!(r.bytes(&later[0])[0] == 1, "kept while offered: as written");
        // Used and given back, it is offered again as a buffer with pages, not a discarded one.
        for b in later {
            r.give_back(b);
        }
        r.release(&uring);
    }

    #[test]
    fn the_trim_never_discards_past_the_tail_even_when_the_last_trims_positions_wrapped() {
        let uring = IoUring::new(8).expect("an io_uring");
        let mut r = BufRing::new(&uring, 7, 4096, 256, false).expect("a buffer ring");
        r.widen();
        r.widen();
        assert_eq!((r.offered(), r.entries, r.tail), (256, 256, 256), "every slot offered");
        for bid in 0..256 {
            // SAFETY: an offered buffer inside the region; no receive runs in this test.
            unsafe { r.buf_ptr(bid).write(1) };
        }
        // The kernel has filled the first 10 (its head is 10) and their completions are not taken
        // yet; the last trim's positions, 16-bit, came round to (10, 266) after 65,536 receives:
        // slots 256..266 lie past the tail, with the indices of the 10 just filled.
        let filled: Vec<u16> = (0..10u16)
            // SAFETY: the descriptor lies in the ring's mapping and was written by `push`.
            .map(|slot| unsafe { (*r.ring.as_ptr().add(usize::from(slot))).bid() })
            .collect();
        r.last = Some((10, 266));
        r.short = false;
        // The offer narrows to 64; what lies past the first 64 from the head, up to the tail, goes.
        assert_eq!(r.trim(Some(10)), 256 - 10 - 64);
        for bid in filled {
            let b = r.taken(bid, 1);
            assert_eq!(r.bytes(&b)[0], 1, "a filled buffer not yet taken keeps its bytes");
            r.give_back(b);
        }
        r.release(&uring);
    }

    #[test]
    fn a_bundle_is_the_buffers_offered_after_its_first_in_ring_order() {
        let uring = IoUring::new(8).expect("an io_uring");
        let mut r = BufRing::new(&uring, 7, 4096, 1024, false).expect("a buffer ring");
        let mut head = 0u16;
        // Buffers come back in another order than they were taken: the free list (LIFO) offers
        // them again in an order unrelated to their ids.
        let mut held: Vec<RingBuf> = (0..64).map(|_| take_next(&mut r, &mut head)).collect();
        held.sort_by_key(|b| (b.bid % 3, b.bid));
        for b in held {
            r.give_back(b);
        }
        // The buffers created meanwhile go; the ring is refilled from the free list.
        let later: Vec<RingBuf> = (0..64).map(|_| take_next(&mut r, &mut head)).collect();
        // What the kernel does with a bundle of three: the descriptors at its head, in order.
        let at = |r: &BufRing, k: u16| {
            // SAFETY: the descriptor lies in the ring's mapping and was written by `push`.
            unsafe { (*r.ring.as_ptr().add(usize::from(k & (r.entries - 1)))).bid() }
        };
        let want = [at(&r, head), at(&r, head + 1), at(&r, head + 2)];
        assert!(want.windows(2).any(|w| w[1] != w[0] + 1), "offered out of id order: {want:?}");
        let (offered, out) = (r.offered(), r.out);
        let first = r.taken(want[0], 3);
        head += 3;
        let got = [first.into_bid(), r.take_more().unwrap().into_bid(), r.take_more().unwrap().into_bid()];
        assert_eq!(got, want, "the bundle's buffers in the order they were offered");
        assert!(r.take_more().is_none(), "three, no more");
        assert_eq!(r.out, out + 3);
        assert_eq!(r.offered(), offered, "all three replaced in the ring at once");
        // Given back, each is offered (and found) again.
        for bid in got {
            r.give_back(RingBuf { bid });
        }
        let next = at(&r, head);
        let b = r.taken(next, 1);
        assert!(r.take_more().is_none());
        r.give_back(b);
        for b in later {
            r.give_back(b);
        }
        assert_eq!(r.out, 0);
        r.release(&uring);
    }
}
