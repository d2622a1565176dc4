//! The worker's io_uring: the one door to the kernel ring. Every SQE is built here (`ops.rs`);
//! everything above speaks in typed operations and [`Token`]s.
//!
//! What the kernel reads or writes after submission, and who keeps it alive until the completion:
//! - tables owned by the `Ring` and built before the first SQE, never resized: socket addresses and
//!   connect timeouts (`AddrId`, `TimeoutId`), the wake buffer, option values (`static`s);
//! - buffers lent from the pools in `buffers.rs` as non-`Copy` handles ([`ChunkBuf`],
//!   [`HeaderBuf`], [`PeerSlot`]): the operations that use one are `unsafe fn`s whose contract is
//!   that the caller keeps the handle in the operation's in-flight record until its completion
//!   has been reaped (conn/ does, in its `Step` and `FlowIo` records);
//! - descriptors: direct-table slots as non-`Copy` [`ClientSlot`]/[`ServerSlot`] handles that only
//!   a close gives up, and pipes as leases (pipes.rs); conn/ closes a slot and returns a pipe only
//!   when no operation of its connection is in flight, so no operation acts on a reused number.
//!
//! Dropping a `Ring` first cancels every request synchronously (IORING_REGISTER_SYNC_CANCEL, which
//! waits for the cancelled requests to complete) and frees the buffers only if that succeeded;
//! closing a ring's descriptor alone only *starts* an asynchronous teardown. A full submission
//! queue never panics or drops an entry: what does not fit waits in a backlog, whole link chains
//! together, and goes in at the next submit.

mod buffers;
mod ops;
mod slots;

use std::collections::VecDeque;
use std::io;
use std::mem::ManuallyDrop;
use std::net::SocketAddr;
use std::time::Duration;

use io_uring::IoUring;
use io_uring::squeue::Entry;
use io_uring::types::{CancelBuilder, SubmitArgs, Timespec};
use socket2::SockAddr;

pub use buffers::{CHUNK, ChunkBuf, HEADER_BUF, HeaderBuf, PeerSlot};
pub use slots::{ClientSlot, ServerSlot, ServerSlots, Sock};

use buffers::Buffers;

/// Index of a socket address in the ring's address table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrId(pub u32);

/// Index of a duration in the ring's timeout table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeoutId(pub u32);

/// A completion copied out of the CQ, so handlers may push new SQEs while processing it.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    pub user_data: u64,
    pub result: i32,
    pub flags: u32,
}

impl Completion {
    /// Whether a multishot request stays armed after this completion.
    pub fn more(&self) -> bool {
        io_uring::cqueue::more(self.flags)
    }
}

/// How to build a worker's ring.
pub struct RingSetup {
    /// Submission queue entries (the CQ gets four times as many).
    pub entries: u32,
    /// Size of the registered (direct) file table.
    pub files: u32,
    /// Slots `[0, accept_slots)` are left to the kernel for multishot accept; the rest are ours.
    pub accept_slots: u32,
    /// Most unbound io-wq threads (splice runs there).
    pub iowq_workers: u32,
    /// Pin io-wq threads to this CPU.
    pub cpu: Option<usize>,
    /// Every address a connect chain may use (servers and sources).
    pub addrs: Vec<SocketAddr>,
    /// Every connect timeout a chain may use.
    pub timeouts: Vec<Duration>,
    /// Most chunk buffers (small transfers in flight) at once.
    pub max_chunks: usize,
}

/// Counters the ring keeps about itself.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RingCounters {
    pub submitted: u64,
    pub completions: u64,
    /// Times an entry found the submission queue full (it was flushed to make room).
    pub sq_full: u64,
    /// Entries that had to wait in the backlog because the kernel would not take more yet.
    #[serde(default)]
    pub backlogged: u64,
    pub cq_overflow: u64,
    pub enter_calls: u64,
}

/// How long dropping a ring waits for its requests to be cancelled.
const CANCEL_WAIT: Duration = Duration::from_secs(2);

pub struct Ring {
    ring: IoUring,
    /// Entries the submission queue could not take yet, each link chain as one unit, in order.
    backlog: VecDeque<Vec<Entry>>,
    addrs: Box<[SockAddr]>,
    timeouts: Box<[Timespec]>,
    /// Freed by `Drop` only once every request is known to be cancelled.
    buffers: ManuallyDrop<Buffers>,
    wake_buf: ManuallyDrop<Box<u64>>,
    pub counters: RingCounters,
}

impl Ring {
    pub fn new(setup: RingSetup) -> io::Result<Ring> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_submit_all()
            .setup_cqsize(setup.entries * 4)
            .build(setup.entries)
            .map_err(|e| with_context(e, "io_uring_setup"))?;
        ring.submitter()
            .register_files_sparse(setup.files)
            .map_err(|e| with_context(e, &format!("registering {} direct descriptors", setup.files)))?;
        slots::register_file_alloc_range(&ring, 0, setup.accept_slots)
            .map_err(|e| with_context(e, "setting the accept slot range"))?;
        let mut max = [0, setup.iowq_workers];
        ring.submitter().register_iowq_max_workers(&mut max).map_err(|e| with_context(e, "limiting io-wq workers"))?;
        if let Some(cpu) = setup.cpu {
            // Affinity is an optimisation; a refusal (e.g. in a restricted cpuset) is not fatal.
            let _ = ring.submitter().register_iowq_aff(&cpu_set_of(cpu));
        }
        Ok(Ring {
            ring,
            backlog: VecDeque::new(),
            addrs: setup.addrs.into_iter().map(SockAddr::from).collect(),
            timeouts: setup
                .timeouts
                .into_iter()
                .map(|d| Timespec::new().sec(d.as_secs()).nsec(d.subsec_nanos()))
                .collect(),
            buffers: ManuallyDrop::new(Buffers::new(setup.max_chunks)),
            wake_buf: ManuallyDrop::new(Box::new(0)),
            counters: RingCounters::default(),
        })
    }

    /// Queues one entry.
    ///
    /// # Safety
    /// Every pointer in `entry` stays valid until its completion has been reaped, and every
    /// descriptor it names stays open that long (see the module docs for who guarantees what).
    unsafe fn push(&mut self, entry: Entry) {
        // SAFETY: forwarded to the caller.
        unsafe { self.push_chain(&[entry]) };
    }

    /// Queues a link chain (or one entry) as a unit: it goes into one submission, never split.
    ///
    /// # Safety
    /// As for [`Ring::push`], for every entry.
    unsafe fn push_chain(&mut self, chain: &[Entry]) {
        self.counters.submitted += chain.len() as u64;
        if self.backlog.is_empty() {
            // SAFETY: the caller's contract covers every entry.
            if unsafe { self.try_push(chain) } {
                return;
            }
            self.counters.sq_full += 1;
            // Flush what is queued to make room. A refusal (EBUSY: too many completions not yet
            // reaped) is not an error here: the chain waits in the backlog for the next submit.
            let _ = self.ring.submit();
            // SAFETY: as above.
            if unsafe { self.try_push(chain) } {
                return;
            }
        }
        // The slow path (the kernel takes no more for now): the only allocation of a push.
        self.counters.backlogged += chain.len() as u64;
        self.backlog.push_back(chain.to_vec());
    }

    /// Pushes all of `chain` into the SQ, or nothing.
    ///
    /// # Safety
    /// As for [`Ring::push`].
    unsafe fn try_push(&mut self, chain: &[Entry]) -> bool {
        // SAFETY: the caller guarantees every pointer and descriptor in the entries outlives them.
        unsafe { self.ring.submission().push_multiple(chain).is_ok() }
    }

    /// Moves the backlog into the SQ as far as the kernel takes it.
    fn flush_backlog(&mut self) -> io::Result<()> {
        while let Some(chain) = self.backlog.front() {
            // SAFETY: backlogged entries were pushed under `push`'s contract, which holds until
            // their completion; waiting in the backlog only delays it.
            if unsafe { self.ring.submission().push_multiple(chain).is_ok() } {
                self.backlog.pop_front();
                continue;
            }
            let before = self.ring.submission().len();
            self.submit_queued()?;
            if self.ring.submission().len() == before {
                break; // the kernel takes nothing more for now
            }
        }
        Ok(())
    }

    fn submit_queued(&mut self) -> io::Result<()> {
        match self.ring.submit() {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Submits what is queued and waits for at least one completion or `timeout` (without waiting
    /// while entries are still in the backlog).
    pub fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.flush_backlog()?;
        self.counters.enter_calls += 1;
        let want = usize::from(self.backlog.is_empty());
        let r = match timeout {
            Some(d) => {
                let ts = Timespec::new().sec(d.as_secs()).nsec(d.subsec_nanos());
                let args = SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(want, &args)
            }
            None => self.ring.submit_and_wait(want),
        };
        match r {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)) => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Submits queued SQEs without waiting.
    pub fn submit(&mut self) -> io::Result<()> {
        self.flush_backlog()?;
        self.submit_queued()
    }

    /// Moves every available completion into `out`.
    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        let mut cq = self.ring.completion();
        let before = out.len();
        out.extend(cq.by_ref().map(|c| Completion { user_data: c.user_data(), result: c.result(), flags: c.flags() }));
        self.counters.cq_overflow = u64::from(cq.overflow());
        self.counters.completions += (out.len() - before) as u64;
    }

    /// Entries queued (in the SQ or the backlog) but not yet handed to the kernel.
    pub fn pending(&mut self) -> usize {
        self.ring.submission().len() + self.backlog.iter().map(Vec::len).sum::<usize>()
    }

    /// Chunk and header buffers lent out now.
    pub fn buffers_in_use(&self) -> u32 {
        self.buffers.chunks.in_use + self.buffers.headers.in_use
    }

    /// Chunk and header buffers created and not lent.
    pub fn buffers_pooled(&self) -> u32 {
        self.buffers.chunks.pooled() + self.buffers.headers.pooled()
    }

    /// Whether every buffer and peer slot has been given back (a worker that ends normally holds
    /// none: it checks this in debug builds).
    pub fn all_buffers_back(&self) -> bool {
        self.buffers.all_back()
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Entries never submitted are simply forgotten (the kernel never saw them).
        self.backlog.clear();
        let _ = self.ring.submitter().submit();
        let ts = Timespec::new().sec(CANCEL_WAIT.as_secs()).nsec(CANCEL_WAIT.subsec_nanos());
        let cancelled = match self.ring.submitter().register_sync_cancel(Some(ts), CancelBuilder::any()) {
            Ok(()) => true,
            // Nothing was in flight.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => {
                eprintln!(
                    "ringproxy: io_uring requests still in flight after {CANCEL_WAIT:?} ({e}); leaking their buffers"
                );
                false
            }
        };
        if cancelled {
            // SAFETY: no request is in flight any more (the synchronous cancel waited for every one
            // to complete), so the kernel holds no pointer into these; each is dropped once, here.
            unsafe {
                ManuallyDrop::drop(&mut self.buffers);
                ManuallyDrop::drop(&mut self.wake_buf);
            }
        }
        // Otherwise both stay allocated for the life of the process: the kernel may still write.
    }
}

fn cpu_set_of(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET only writes bit `cpu` of `set`, which it bounds-checks against the set's size.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set
}

fn with_context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}
