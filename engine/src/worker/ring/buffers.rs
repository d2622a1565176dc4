//! Memory the ring lends to the kernel: chunk buffers (small transfers), header buffers (PROXY
//! protocol headers in and out) and peer-address slots (getsockopt(SO_PEERNAME) results).
//!
//! Each pool hands out a handle — [`ChunkBuf`], [`HeaderBuf`], [`PeerSlot`] — that is not `Copy`,
//! not `Clone` and cannot be made outside this module: holding one is owning that piece of memory.
//! An operation that aims the kernel at a buffer keeps the handle in its in-flight record until its
//! completion has been reaped (the ring's buffer operations are `unsafe fn`s that say so), and the
//! only way back into a pool is to give the handle itself back. So a buffer can never be lent twice
//! or re-lent while the kernel still writes to it.
//!
//! Invariants: every buffer is its own heap allocation that never moves and is never freed while
//! the ring lives (pools only grow, up to their maximum); `in_use` counts the handles outside the
//! pool. A handle that is dropped instead of given back is a bug: debug builds panic on the spot
//! (outside an unwind), release builds leak that one buffer — never memory the kernel may still use.

use std::mem::ManuallyDrop;

/// Bytes per chunk buffer (small reads go through one, larger ones switch to splice).
pub const CHUNK: usize = 16 * 1024;

/// Bytes per header buffer: the longest PROXY header we accept or send.
pub const HEADER_BUF: usize = crate::proxy_protocol::MAX_HEADER;

/// Most header buffers (PROXY handshakes in flight at once per worker).
pub const HEADER_SLOTS: usize = 4096;

macro_rules! handle {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[must_use = "a pool handle must be given back to its pool"]
        #[derive(Debug, PartialEq, Eq)]
        pub struct $name {
            index: u32,
        }

        impl $name {
            /// Takes the index out without running the leak check (the handle is being given back).
            fn into_index(self) -> u32 {
                ManuallyDrop::new(self).index
            }
        }

        impl Drop for $name {
            fn drop(&mut self) {
                // Not given back: in release the buffer is simply never lent again.
                debug_assert!(std::thread::panicking(), concat!($what, " {} dropped instead of given back"), self.index);
            }
        }
    };
}

handle!(
    /// A chunk buffer (`CHUNK` bytes) lent out of the pool.
    ChunkBuf,
    "chunk buffer"
);
handle!(
    /// A header buffer (`HEADER_BUF` bytes) lent out of the pool.
    HeaderBuf,
    "header buffer"
);
handle!(
    /// A peer-address slot (a `sockaddr_in6` the kernel writes into) lent out of the pool.
    PeerSlot,
    "peer slot"
);

/// A pool of fixed-size buffers created on demand up to `max`, each boxed so that growing the
/// pool never moves a buffer the kernel may be using.
pub(super) struct Pool<T> {
    /// Each item boxed: its address must not change while the `Vec` grows.
    items: Vec<Box<T>>,
    free: Vec<u32>,
    max: usize,
    pub(super) in_use: u32,
}

impl<T> Pool<T> {
    pub(super) fn new(max: usize) -> Pool<T> {
        Pool { items: Vec::new(), free: Vec::new(), max, in_use: 0 }
    }

    /// An index to lend: a pooled item, or a new one made by `make`; `None` at the maximum.
    fn lend(&mut self, make: impl FnOnce() -> Box<T>) -> Option<u32> {
        let i = match self.free.pop() {
            Some(i) => i,
            None if self.items.len() < self.max => {
                self.items.push(make());
                self.items.len() as u32 - 1
            }
            None => return None,
        };
        self.in_use += 1;
        Some(i)
    }

    fn give_back(&mut self, index: u32) {
        debug_assert!(!self.free.contains(&index), "index {index} given back twice");
        self.in_use -= 1;
        self.free.push(index);
    }

    /// Items created and not lent.
    pub(super) fn pooled(&self) -> u32 {
        self.free.len() as u32
    }

    pub(super) fn get(&self, index: u32) -> &T {
        &self.items[index as usize]
    }

    /// A raw pointer to item `index`, stable for the pool's life.
    pub(super) fn ptr(&mut self, index: u32) -> *mut T {
        &raw mut *self.items[index as usize]
    }
}

/// The three pools of one ring.
pub(super) struct Buffers {
    pub(super) chunks: Pool<[u8; CHUNK]>,
    pub(super) headers: Pool<[u8; HEADER_BUF]>,
    pub(super) peers: Pool<libc::sockaddr_in6>,
}

impl Buffers {
    pub(super) fn new(max_chunks: usize, peer_slots: usize) -> Buffers {
        Buffers { chunks: Pool::new(max_chunks), headers: Pool::new(HEADER_SLOTS), peers: Pool::new(peer_slots) }
    }

    pub(super) fn chunk(&mut self) -> Option<ChunkBuf> {
        self.chunks.lend(|| Box::new([0u8; CHUNK])).map(|index| ChunkBuf { index })
    }

    pub(super) fn header(&mut self) -> Option<HeaderBuf> {
        self.headers.lend(|| Box::new([0u8; HEADER_BUF])).map(|index| HeaderBuf { index })
    }

    pub(super) fn peer(&mut self) -> Option<PeerSlot> {
        self.peers.lend(|| Box::new(empty_sockaddr_in6())).map(|index| PeerSlot { index })
    }

    pub(super) fn give_chunk(&mut self, b: ChunkBuf) {
        self.chunks.give_back(b.into_index());
    }

    pub(super) fn give_header(&mut self, b: HeaderBuf) {
        self.headers.give_back(b.into_index());
    }

    /// Gives a peer slot back and returns the address the kernel wrote into it.
    pub(super) fn give_peer(&mut self, p: PeerSlot) -> libc::sockaddr_in6 {
        let i = p.into_index();
        let raw = *self.peers.get(i);
        self.peers.give_back(i);
        raw
    }

    /// Whether every handle of every pool is back (checked when a worker ends normally).
    pub(super) fn all_back(&self) -> bool {
        self.chunks.in_use == 0 && self.headers.in_use == 0 && self.peers.in_use == 0
    }
}

impl ChunkBuf {
    pub(super) fn index(&self) -> u32 {
        self.index
    }
}

impl HeaderBuf {
    pub(super) fn index(&self) -> u32 {
        self.index
    }
}

impl PeerSlot {
    pub(super) fn index(&self) -> u32 {
        self.index
    }
}

/// An all-zero `sockaddr_in6` (AF_UNSPEC).
pub(super) fn empty_sockaddr_in6() -> libc::sockaddr_in6 {
    // SAFETY: sockaddr_in6 is plain old data; all-zero is a valid (AF_UNSPEC) value.
    unsafe { std::mem::zeroed() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_go_back_and_are_reused_up_to_the_maximum() {
        let mut b = Buffers::new(2, 1);
        let x = b.chunk().unwrap();
        let y = b.chunk().unwrap();
        assert!(b.chunk().is_none(), "two at most");
        assert_eq!(b.chunks.in_use, 2);
        let xi = x.index();
        b.give_chunk(x);
        let z = b.chunk().unwrap();
        assert_eq!(z.index(), xi, "a pooled buffer is lent again");
        b.give_chunk(y);
        b.give_chunk(z);
        assert!(b.all_back());
        assert_eq!(b.chunks.pooled(), 2);
    }

    #[test]
    fn buffers_never_move_while_the_pool_grows() {
        let mut b = Buffers::new(64, 1);
        let first = b.header().unwrap();
        let p = b.headers.ptr(first.index());
        let more: Vec<_> = (0..63).map(|_| b.header().unwrap()).collect();
        assert_eq!(b.headers.ptr(first.index()), p);
        b.give_header(first);
        more.into_iter().for_each(|h| b.give_header(h));
        assert!(b.all_back());
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "dropped instead of given back")]
    fn a_dropped_handle_is_caught_in_debug_builds() {
        let mut b = Buffers::new(1, 1);
        let x = b.chunk().unwrap();
        drop(x);
    }
}
