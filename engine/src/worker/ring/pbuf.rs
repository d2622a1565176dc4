//! The worker's provided-buffer ring (IORING_REGISTER_PBUF_RING): the buffers a multishot
//! receive picks from, one shared by all of a worker's connections, so a connection holds a
//! buffer only while bytes it received wait to be sent on.
//!
//! The kernel takes buffers from the ring's head; we add them at its tail. A receive's completion
//! names the buffer it filled (`IORING_CQE_F_BUFFER`): from then on that buffer is ours, as a
//! [`RingBuf`] handle (not `Copy`, made only from such a completion), until we give it back —
//! after the send that forwards its bytes has completed.
//!
//! Only as many buffers are in the ring as it takes to keep the receives fed (`low` to `high`,
//! refilled from a LIFO free list as completions consume them), and buffers are created on first
//! use up to `max`: a worker that only sees small messages cycles a few dozen buffers, so its
//! memory does not grow with the number of connections; bulk transfers grow the set up to `max`.
//! The kernel fills buffers for every socket with data in one go (task work): when more sockets
//! had data at once than the ring offered, some receives end with ENOBUFS and must be re-armed.
//! Each time that happens the ring offers twice as many (up to `WIDEST`), so a worker settles at
//! what its bursts need: many connections with periodic messages need more offered than one
//! bulk flow does.
//!
//! Invariants: a buffer is in exactly one place — the ring (the kernel may fill it), a
//! `RingBuf` (ours), or the free list; the ring's memory and every buffer are freed only when no
//! request can use them (the owning `Ring`'s `Drop`).

use std::io;
use std::mem::ManuallyDrop;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::IoUring;

/// Buffers offered at first, and at most (after widening on ENOBUFS).
const NARROWEST: u32 = 64;
const WIDEST: u32 = 2048;
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
    /// Each buffer its own allocation (so it keeps its address while the Vec grows), created on
    /// first use: `bufs[bid]`.
    bufs: Vec<Box<[u8]>>,
    size: usize,
    max: usize,
    /// Buffers neither in the ring nor out: the last given back first.
    free: Vec<u16>,
    /// Buffers in the ring now (provided, not yet consumed by a completion).
    in_ring: u32,
    /// Keep at least `low` buffers in the ring; refill up to `high`.
    low: u32,
    high: u32,
    /// Buffers out (`RingBuf`s alive).
    pub(super) out: u32,
}

// SAFETY: the descriptor mapping and the buffers are owned by this BufRing alone (no other
// handle to them exists on our side), so moving it to another thread moves them with it; the
// kernel's access goes through the io_uring instance, which is moved together with it.
unsafe impl Send for BufRing {}

impl BufRing {
    /// Registers a ring for buffers of `size` bytes, at most `max` of them (at most 65,536: a
    /// buffer id is 16 bits), as buffer group `bgid`. The ring holds only the `high` buffers
    /// offered at a time, so its descriptors are few whatever `max` is.
    pub(super) fn new(uring: &IoUring, bgid: u16, size: usize, max: usize) -> io::Result<BufRing> {
        debug_assert!((1..=1 << 16).contains(&max));
        let high = NARROWEST.min(max as u32);
        let low = high / 4;
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
        let mut r = BufRing {
            ring,
            ring_bytes,
            entries,
            tail: 0,
            bgid,
            bufs: Vec::new(),
            size,
            max,
            free: Vec::new(),
            in_ring: 0,
            low,
            high,
            out: 0,
        };
        r.refill();
        Ok(r)
    }

    /// Tops the ring up to `high` buffers when it holds fewer than `low`: from the free list
    /// first (the most recently used), then new buffers up to `max`.
    pub(super) fn refill(&mut self) {
        if self.in_ring >= self.low {
            return;
        }
        let mut added = false;
        while self.in_ring < self.high {
            let bid = match self.free.pop() {
                Some(bid) => bid,
                None if self.bufs.len() < self.max => {
                    self.bufs.push(vec![0u8; self.size].into_boxed_slice());
                    (self.bufs.len() - 1) as u16
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
        let buf = &mut self.bufs[usize::from(bid)];
        // SAFETY: `slot` < `entries`, so the descriptor lies in the mapping; the kernel reads only
        // descriptors between its head and the published tail, and this one is past the tail.
        let e = unsafe { &mut *self.ring.as_ptr().add(slot) };
        e.set_addr(buf.as_mut_ptr() as u64);
        e.set_len(self.size as u32);
        e.set_bid(bid);
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

    /// A receive completion consumed buffer `bid` (named by its CQE): it is ours now.
    pub(super) fn taken(&mut self, bid: u16) -> RingBuf {
        self.in_ring -= 1;
        self.out += 1;
        self.refill();
        RingBuf { bid }
    }

    /// The bytes of a buffer we hold.
    pub(super) fn bytes(&self, b: &RingBuf) -> &[u8] {
        &self.bufs[usize::from(b.bid)]
    }

    /// A pointer into a buffer we hold, for a send (stable: each buffer is its own allocation).
    pub(super) fn ptr(&mut self, b: &RingBuf, off: usize) -> *const u8 {
        self.bufs[usize::from(b.bid)][off.min(self.size)..].as_ptr()
    }

    /// Gives a buffer back: onto the free list, and into the ring if it runs low.
    pub(super) fn give_back(&mut self, b: RingBuf) {
        self.out -= 1;
        self.free.push(b.into_bid());
        self.refill();
    }

    /// Buffers created so far.
    pub(super) fn created(&self) -> usize {
        self.bufs.len()
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
        let widest = WIDEST.min(self.max as u32).min(u32::from(self.entries));
        if self.high < widest {
            self.high = (self.high * 2).min(widest);
            self.low = self.high / 4;
        }
        self.refill();
    }

    /// Unregisters and unmaps the ring (the owning `Ring` calls this once nothing can use it).
    pub(super) fn release(&mut self, uring: &IoUring) {
        let _ = uring.submitter().unregister_buf_ring(self.bgid);
        // SAFETY: unregistered: the kernel holds no reference to the mapping any more.
        unsafe { super::register::unmap(self.ring.cast(), self.ring_bytes) };
    }
}
