//! Send queues of the receive-buffer path (`splice: never`): what one direction of a connection
//! received and has not sent on yet, and the `sendmsg` that sends it.
//!
//! A direction's multishot receive hands it filled buffers from the worker's ring, possibly
//! several per loop turn; they wait here, in order, and one `sendmsg` at a time sends as many of
//! them as are queued (one iovec each), so a fast source is forwarded in a few large writes and a
//! TCP stream's order is kept (two sends in flight on one socket could pass each other). A queue
//! is lent to a direction while it holds buffers — a [`QueueLease`], not `Copy` — so an idle
//! connection holds none; leases are pooled per worker.
//!
//! Invariants: a queue with buffers always has a `sendmsg` in flight (it is issued as soon as
//! there is something to send and the previous one completed), so "nothing in flight" still means
//! "nothing held"; the in-flight `sendmsg` reads only `msg`, `iov[..sending]` and the buffers of
//! its first `sending` entries, which are neither moved nor given back before its completion;
//! new buffers are appended behind them, and bytes are copied only into a buffer no send in
//! flight carries. A zero-copy send (`tune.send_zerocopy`) reads its buffers until the kernel's
//! notification, which may come after its completion: the ring's record of it holds them, and a
//! buffer given back before goes back to the ring only then (ring/zerocopy.rs); bytes appended
//! to a buffer it read part of lie past what it reads.

use std::collections::VecDeque;
use std::mem::ManuallyDrop;

use crate::worker::ring::{Ring, RingBuf};
use crate::worker::token::Token;

/// Most buffers one `sendmsg` carries.
const MAX_IOV: usize = 64;

/// Where a queued entry's bytes are.
enum Data {
    /// In a receive buffer of the worker's ring.
    Ring(RingBuf),
    /// Copied out of the ring, the buffer given back: the destination stopped taking bytes while
    /// the worker ran short of buffers ([`SendQueues::spill`]).
    Heap(Box<[u8]>),
}

/// One queued entry: `len` bytes at `off` of its data.
struct Queued {
    buf: Data,
    off: u32,
    len: u32,
}

/// One direction's queue (boxed: `msg` and `iov` keep their address during a `sendmsg`).
struct Queue {
    bufs: VecDeque<Queued>,
    /// Bytes queued (sent ones excluded).
    bytes: u64,
    /// Entries the `sendmsg` in flight carries (from the front); 0: none in flight.
    sending: usize,
    /// The bytes it carries.
    sending_bytes: u64,
    /// Bytes of entries copied out of the ring (`Data::Heap`).
    spilled: u64,
    /// The token of the `sendmsg` in flight when it is zero-copy (its record in the ring:
    /// ring/zerocopy.rs).
    zc: Option<Token>,
    iov: Vec<libc::iovec>,
    msg: libc::msghdr,
}

/// A queue lent to one direction of one connection.
#[must_use = "a send queue must be given back"]
#[derive(Debug, PartialEq, Eq)]
pub struct QueueLease {
    index: u32,
}

impl QueueLease {
    fn into_index(self) -> u32 {
        ManuallyDrop::new(self).index
    }
}

impl Drop for QueueLease {
    fn drop(&mut self) {
        debug_assert!(std::thread::panicking(), "send queue {} dropped instead of given back", self.index);
    }
}

/// The worker's send queues.
#[derive(Default)]
pub struct SendQueues {
    #[expect(clippy::vec_box, reason = "a queue's msghdr must keep its address while the Vec grows")]
    queues: Vec<Box<Queue>>,
    free: Vec<u32>,
    /// Leases out now.
    pub in_use: u32,
    /// Bytes copied out of the ring in every queue (the sum of their `spilled`).
    spilled: u64,
}

impl SendQueues {
    /// Lends an empty queue.
    pub fn lend(&mut self) -> QueueLease {
        self.in_use += 1;
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                // SAFETY: msghdr is plain old data; all-zero is an empty message.
                let msg: libc::msghdr = unsafe { std::mem::zeroed() };
                let q = Queue {
                    bufs: VecDeque::new(),
                    bytes: 0,
                    sending: 0,
                    sending_bytes: 0,
                    spilled: 0,
                    zc: None,
                    iov: Vec::with_capacity(MAX_IOV),
                    msg,
                };
                self.queues.push(Box::new(q));
                self.queues.len() as u32 - 1
            }
        };
        QueueLease { index }
    }

    /// Appends `len` bytes a receive put at the start of `buf`. If they fit behind the bytes of
    /// the last buffer queued and no `sendmsg` in flight carries that one, they are copied there
    /// and `buf` goes back to the ring at once (returns true): a flow whose destination is behind
    /// holds about as many buffers as its bytes fill, not one per receive however small, so its
    /// pause mark bounds its bytes and the completions that still come after it paused add little.
    pub fn push(&mut self, l: &QueueLease, buf: RingBuf, len: u32, ring: &mut Ring) -> bool {
        let size = ring.recv_buf_size() as u32;
        let q = &mut self.queues[l.index as usize];
        q.bytes += u64::from(len);
        if q.bufs.len() > q.sending
            && let Some(tail) = q.bufs.back_mut()
            && let Data::Ring(tail_buf) = &tail.buf
            && tail.off + tail.len + len <= size
        {
            ring.append_ring_buf(tail_buf, (tail.off + tail.len) as usize, &buf, len as usize);
            tail.len += len;
            ring.give_ring_buf(buf);
            return true;
        }
        q.bufs.push_back(Queued { buf: Data::Ring(buf), off: 0, len });
        false
    }

    /// Copies every queued byte still in a receive buffer into memory of the queue's own, and
    /// gives those buffers back to the ring: for a direction whose destination stopped taking
    /// bytes (a POLLOUT waits for room) while the worker ran short of buffers, so that it does
    /// not keep them from the worker's other flows for as long as its destination is stuck.
    /// Nothing may be in flight. Not if the worker's queues would then hold more than `cap`
    /// bytes copied out (their memory stays bounded: the queue keeps its buffers). Returns the
    /// bytes copied.
    pub fn spill(&mut self, l: &QueueLease, ring: &mut Ring, cap: u64) -> u64 {
        let q = &mut self.queues[l.index as usize];
        debug_assert_eq!(q.sending, 0, "no entry is spilled while a sendmsg reads it");
        let in_ring: u64 = q.bufs.iter().filter(|e| matches!(e.buf, Data::Ring(_))).map(|e| u64::from(e.len)).sum();
        if self.spilled + in_ring > cap {
            return 0;
        }
        let mut copied = 0;
        for e in q.bufs.iter_mut() {
            if let Data::Ring(b) = &e.buf {
                let bytes: Box<[u8]> = ring.ring_buf(b)[e.off as usize..(e.off + e.len) as usize].into();
                let Data::Ring(b) = std::mem::replace(&mut e.buf, Data::Heap(bytes)) else {
                    unreachable!("matched above")
                };
                ring.give_ring_buf(b);
                e.off = 0;
                copied += u64::from(e.len);
            }
        }
        q.spilled += copied;
        self.spilled += copied;
        copied
    }

    /// Bytes of every queue lent out that were copied out of the ring ([`SendQueues::spill`]).
    pub fn spilled_bytes(&self) -> u64 {
        self.spilled
    }

    /// Whether some queued bytes are not in receive buffers.
    pub fn has_spilled(&self, l: &QueueLease) -> bool {
        self.queues[l.index as usize].spilled > 0
    }

    /// Bytes queued in every queue lent out (received, not sent yet; a queue given back holds none).
    pub fn queued_bytes(&self) -> u64 {
        self.queues.iter().map(|q| q.bytes).sum()
    }

    /// Buffers queued (each holds one receive buffer of the worker's ring).
    pub fn held(&self, l: &QueueLease) -> usize {
        self.queues[l.index as usize].bufs.len()
    }

    /// Whether a `sendmsg` of this queue is in flight.
    pub fn sending(&self, l: &QueueLease) -> bool {
        self.queues[l.index as usize].sending > 0
    }

    pub fn is_empty(&self, l: &QueueLease) -> bool {
        self.queues[l.index as usize].bufs.is_empty()
    }

    /// Builds the message for a `sendmsg` of every queued buffer (at most `MAX_IOV`) and returns a
    /// pointer to it, stable until [`SendQueues::sent`], and the bytes it carries. Nothing may be
    /// in flight.
    pub fn prepare(&mut self, l: &QueueLease, ring: &mut Ring) -> (*const libc::msghdr, u64) {
        let q = &mut self.queues[l.index as usize];
        debug_assert_eq!(q.sending, 0, "one sendmsg at a time per queue");
        q.iov.clear();
        let mut bytes = 0;
        for e in q.bufs.iter().take(MAX_IOV) {
            let base = match &e.buf {
                Data::Ring(b) => ring.ring_buf_ptr(b, e.off as usize),
                Data::Heap(h) => h[e.off as usize..].as_ptr(),
            };
            q.iov.push(libc::iovec { iov_base: base as *mut libc::c_void, iov_len: e.len as usize });
            bytes += u64::from(e.len);
        }
        q.sending = q.iov.len();
        q.sending_bytes = bytes;
        q.msg.msg_iov = q.iov.as_mut_ptr();
        q.msg.msg_iovlen = q.iov.len();
        (&raw const q.msg, bytes)
    }

    /// The prepared `sendmsg` goes zero-copy: its token, naming the ring's record of it, which
    /// holds the buffers it reads from until the kernel's notification (given back before, they
    /// wait for it).
    pub fn zerocopy(&mut self, l: &QueueLease, ring: &mut Ring, conn: Token) -> Token {
        debug_assert!(!self.has_spilled(l), "a zero-copy send reads ring buffers only");
        let q = &mut self.queues[l.index as usize];
        let bufs = q.bufs.iter().take(q.sending).filter_map(|e| match &e.buf {
            Data::Ring(b) => Some(b),
            Data::Heap(_) => None,
        });
        let send = ring.zc_begin(conn, bufs);
        q.zc = Some(send);
        send
    }

    /// The token of the zero-copy `sendmsg` in flight, if it is one (a cancel names it).
    pub fn zerocopy_in_flight(&self, l: &QueueLease) -> Option<Token> {
        let q = &self.queues[l.index as usize];
        q.zc.filter(|_| q.sending > 0)
    }

    /// The `sendmsg` in flight completed having sent `n` bytes: the buffers it sent whole go back
    /// to the ring; a buffer it sent part of keeps the rest, in front. Whether it sent less than
    /// it carried (its destination had no room for the rest).
    pub fn sent(&mut self, l: &QueueLease, n: u64, ring: &mut Ring) -> bool {
        let q = &mut self.queues[l.index as usize];
        let spilled = q.spilled;
        let sending = std::mem::take(&mut q.sending);
        let short = n < std::mem::take(&mut q.sending_bytes);
        q.zc = None;
        let mut left = n;
        for _ in 0..sending {
            let Some(front) = q.bufs.front_mut() else { break };
            if left >= u64::from(front.len) {
                left -= u64::from(front.len);
                q.bytes -= u64::from(front.len);
                if let Some(e) = q.bufs.pop_front() {
                    release(q, e.buf, e.len, ring);
                }
            } else {
                front.off += left as u32;
                front.len -= left as u32;
                q.bytes -= left;
                if matches!(front.buf, Data::Heap(_)) {
                    q.spilled -= left;
                }
                break;
            }
        }
        self.spilled -= spilled - q.spilled;
        short
    }

    /// Gives a lease back, and every buffer still in it to the ring. Nothing may be in flight.
    pub fn give_back(&mut self, l: QueueLease, ring: &mut Ring) {
        let index = l.into_index();
        let q = &mut self.queues[index as usize];
        self.spilled -= q.spilled;
        q.sending = 0;
        q.sending_bytes = 0;
        q.zc = None;
        q.bytes = 0;
        while let Some(e) = q.bufs.pop_front() {
            release(q, e.buf, e.len, ring);
        }
        debug_assert_eq!(q.spilled, 0, "every spilled byte was counted out");
        self.in_use -= 1;
        self.free.push(index);
    }
}

/// An entry's data is done with: a receive buffer goes back to the ring, copied bytes are freed
/// (`len` of them were still counted as spilled).
fn release(q: &mut Queue, data: Data, len: u32, ring: &mut Ring) {
    match data {
        Data::Ring(b) => ring.give_ring_buf(b),
        Data::Heap(_) => q.spilled -= u64::from(len),
    }
}
