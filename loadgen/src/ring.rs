//! The small io_uring wrapper every ringload event loop runs on, and the one
//! place where SQE `user_data` is encoded.
//!
//! Each worker thread owns one [`Ring`]; rings are never shared between
//! threads. [`Ring::push`] never fails because the submission queue is full
//! (it submits and retries), and it counts operations in flight so a worker
//! can drain every outstanding operation before it frees the buffers the
//! kernel may still write into ([`Ring::in_flight`]). [`Owned`] ties a ring
//! to the memory its operations use, so that memory is freed only once the
//! ring has nothing in flight, and leaked if the kernel does not let go.
//!
//! `user_data` layout (see [`Tag`]): bits 0..8 are the operation
//! ([`Op`]), bits 8..32 the slot generation (24 bits, wrapping), bits 32..64
//! the connection slot index. A worker bumps a slot's generation whenever the
//! slot is given to a new connection, so a completion that arrives for a
//! connection that no longer lives in that slot is recognised as stale and
//! ignored.

use std::io;
use std::mem::ManuallyDrop;
use std::time::Duration;

use io_uring::{IoUring, cqueue, squeue, types};

/// The kind of operation an SQE carries, stored in the low byte of `user_data`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    Connect = 1,
    /// The `IORING_OP_LINK_TIMEOUT` linked behind a connect; its completion is ignored.
    ConnectTimeout = 2,
    Send = 3,
    Recv = 4,
    Close = 5,
    Accept = 6,
    /// Anything the worker submits for housekeeping and ignores (e.g. cancellation).
    Other = 7,
}

impl Op {
    fn from_u8(v: u8) -> Op {
        match v {
            1 => Op::Connect,
            2 => Op::ConnectTimeout,
            3 => Op::Send,
            4 => Op::Recv,
            5 => Op::Close,
            6 => Op::Accept,
            _ => Op::Other,
        }
    }
}

/// Generation counters wrap at 24 bits.
pub const GEN_MASK: u32 = 0x00ff_ffff;

/// A decoded `user_data`: which slot, which incarnation of that slot, which op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag {
    pub slot: u32,
    pub generation: u32,
    pub op: Op,
}

impl Tag {
    pub fn new(slot: u32, generation: u32, op: Op) -> Tag {
        Tag { slot, generation: generation & GEN_MASK, op }
    }

    /// `slot << 32 | (generation & 0xffffff) << 8 | op`.
    pub fn encode(self) -> u64 {
        (u64::from(self.slot) << 32) | (u64::from(self.generation & GEN_MASK) << 8) | self.op as u64
    }

    pub fn decode(user_data: u64) -> Tag {
        Tag {
            slot: (user_data >> 32) as u32,
            generation: ((user_data >> 8) as u32) & GEN_MASK,
            op: Op::from_u8(user_data as u8),
        }
    }
}

/// Next generation for a slot (wrapping inside the 24 bits `user_data` holds).
pub fn next_generation(g: u32) -> u32 {
    g.wrapping_add(1) & GEN_MASK
}

/// One completion, copied out of the completion queue so handlers may push
/// new SQEs while iterating.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    pub tag: Tag,
    pub result: i32,
    pub flags: u32,
}

impl Completion {
    /// True if a multishot operation will post more completions.
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }
}

pub struct Ring {
    ring: IoUring,
    in_flight: usize,
    /// SQEs queued since the ring was created (see [`Ring::submitted`]).
    pushed: u64,
    completions: Vec<Completion>,
    /// Completions reaped while pushing (CQ backed up), not yet handed out.
    backlog: Vec<Completion>,
}

impl Ring {
    /// A ring with `entries` submission slots and a completion queue four
    /// times larger (multishot accept and bursts of connects post many CQEs).
    pub fn new(entries: u32) -> io::Result<Ring> {
        let ring = IoUring::builder()
            .setup_cqsize(entries.saturating_mul(4))
            .setup_single_issuer()
            .setup_coop_taskrun()
            .build(entries)
            .map_err(|e| io::Error::new(e.kind(), format!("io_uring_setup failed: {e}")))?;
        Ok(Ring {
            ring,
            in_flight: 0,
            pushed: 0,
            completions: Vec::with_capacity(entries as usize * 4),
            backlog: Vec::new(),
        })
    }

    /// Register a sparse table of `n` direct descriptors (used by `serve`).
    pub fn register_sparse_files(&self, n: u32) -> io::Result<()> {
        self.ring.submitter().register_files_sparse(n)
    }

    /// Operations submitted whose final completion has not been reaped yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// SQEs queued since the ring was created.
    pub fn pushed(&self) -> u64 {
        self.pushed
    }

    /// SQEs the kernel has taken from the submission queue. An SQE names its
    /// file by fd number, which the kernel resolves when it takes the SQE:
    /// once `submitted() >= n`, the first `n` SQEs no longer depend on
    /// their fd numbers.
    pub fn submitted(&mut self) -> u64 {
        self.pushed - self.ring.submission().len() as u64
    }

    /// Queue an SQE, submitting first if the submission queue is full.
    ///
    /// # Safety
    /// Every buffer, address or descriptor the entry points to must stay valid
    /// and untouched by the caller until the completion carrying the entry's
    /// `user_data` is reaped (for multishot ops: the one without `F_MORE`).
    pub unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: forwarded from this function's contract.
            let pushed = unsafe { self.ring.submission().push(entry) };
            if pushed.is_ok() {
                self.in_flight += 1;
                self.pushed += 1;
                return Ok(());
            }
            self.submit_for_room()?;
        }
    }

    /// Queue two SQEs that must stay adjacent (a linked pair).
    ///
    /// # Safety
    /// As for [`Ring::push`], for both entries.
    pub unsafe fn push_pair(&mut self, a: &squeue::Entry, b: &squeue::Entry) -> io::Result<()> {
        let pair = [a.clone(), b.clone()];
        loop {
            // SAFETY: forwarded from this function's contract; `push_multiple`
            // pushes both or neither, so the linked pair stays adjacent.
            let res = unsafe { self.ring.submission().push_multiple(&pair) };
            if res.is_ok() {
                self.in_flight += 2;
                self.pushed += 2;
                return Ok(());
            }
            self.submit_for_room()?;
        }
    }

    /// The submission queue is full: hand it to the kernel.
    fn submit_for_room(&mut self) -> io::Result<()> {
        match self.ring.submit() {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                // The completion queue is backed up: reap into the backlog
                // (handed out by the next `wait`) so the kernel can go on.
                self.reap(true);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Copy ready completions out of the completion queue, into the backlog
    /// or the batch `wait` returns.
    fn reap(&mut self, to_backlog: bool) {
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            let c = Completion { tag: Tag::decode(cqe.user_data()), result: cqe.result(), flags: cqe.flags() };
            if !c.more() {
                self.in_flight = self.in_flight.saturating_sub(1);
            }
            if to_backlog {
                self.backlog.push(c);
            } else {
                self.completions.push(c);
            }
        }
    }

    /// Submit everything queued and wait until at least `want` completions
    /// are ready or `timeout` passes, then copy all ready completions out.
    pub fn wait(&mut self, want: usize, timeout: Duration) -> io::Result<&[Completion]> {
        let want = if self.backlog.is_empty() { want } else { 0 };
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(want, &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)) => {}
            Err(e) => return Err(e),
        }
        self.completions.clear();
        self.completions.append(&mut self.backlog);
        self.reap(false);
        Ok(&self.completions)
    }
}

impl Ring {
    /// Ask the kernel to cancel every operation in flight, then reap
    /// completions until none is left or `timeout` passes. Returns true if
    /// nothing is in flight any more (buffers may then be freed).
    pub fn cancel_all_and_drain(&mut self, timeout: Duration) -> bool {
        if self.in_flight == 0 {
            return true;
        }
        let e = io_uring::opcode::AsyncCancel2::new(types::CancelBuilder::any().all())
            .build()
            .user_data(Tag::new(u32::MAX, 0, Op::Other).encode());
        // SAFETY: a cancel request points to no memory.
        if unsafe { self.push(&e) }.is_err() {
            return self.in_flight == 0;
        }
        let end = std::time::Instant::now() + timeout;
        while self.in_flight > 0 && std::time::Instant::now() < end {
            if self.wait(1, Duration::from_millis(20)).is_err() {
                break;
            }
        }
        self.in_flight == 0
    }
}

/// How long dropping an [`Owned`] waits for the kernel to finish or cancel
/// what is in flight before it leaks the memory instead.
pub const DRAIN: Duration = Duration::from_secs(2);

/// A ring and everything its operations may read or write (`T`: buffers,
/// sockaddrs, timespecs, descriptors). Dropping it drains the ring first:
/// `T` is freed only when nothing is in flight, and leaked on purpose if
/// the kernel has not let go within [`DRAIN`]. So no return path, an early
/// `?` included, can free memory the kernel still writes to.
pub struct Owned<T> {
    ring: Ring,
    held: ManuallyDrop<T>,
}

impl<T> Owned<T> {
    pub fn new(ring: Ring, held: T) -> Owned<T> {
        Owned { ring, held: ManuallyDrop::new(held) }
    }

    pub fn ring(&mut self) -> &mut Ring {
        &mut self.ring
    }

    pub fn held(&self) -> &T {
        &self.held
    }

    pub fn held_mut(&mut self) -> &mut T {
        &mut self.held
    }

    /// The ring and the memory at once (to point an SQE into the memory).
    pub fn parts(&mut self) -> (&mut Ring, &mut T) {
        (&mut self.ring, &mut self.held)
    }
}

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        if self.ring.cancel_all_and_drain(DRAIN) {
            // SAFETY: `held` is dropped exactly once, here, and never used
            // again (the ring, dropped right after, no longer points into it:
            // nothing is in flight). Otherwise it is leaked, never dropped.
            unsafe { ManuallyDrop::drop(&mut self.held) };
        }
    }
}

/// Turn a negative CQE result into an errno value.
pub fn errno(result: i32) -> i32 {
    -result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_roundtrip() {
        for (slot, generation, op) in
            [(0u32, 0u32, Op::Connect), (u32::MAX, GEN_MASK, Op::Recv), (12345, 0x1234_5678, Op::Send)]
        {
            let t = Tag::new(slot, generation, op);
            let d = Tag::decode(t.encode());
            assert_eq!(d.slot, slot);
            assert_eq!(d.generation, generation & GEN_MASK);
            assert_eq!(d.op, op);
        }
    }

    #[test]
    fn generation_wraps_in_24_bits() {
        assert_eq!(next_generation(GEN_MASK), 0);
        assert_eq!(next_generation(5), 6);
    }
}
