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
mod pbuf;
mod register;
mod slots;
mod zerocopy;

use std::collections::VecDeque;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::RawFd;
use std::time::Duration;

use crate::config::BATCH_EVENTS;
use io_uring::IoUring;
use io_uring::squeue::Entry;
use io_uring::types::{SubmitArgs, Timespec};
use socket2::SockAddr;

pub use buffers::{CHUNK, ChunkBuf, HEADER_BUF, HeaderBuf, PeerSlot};
pub use pbuf::RingBuf;
pub use slots::{ClientSlot, ServerSlot, ServerSlots, Sock};
pub use zerocopy::{SEND_ZC_REPORT_USAGE, ZcCompletion};

use buffers::Buffers;

/// Where a socket address is in the ring's address table: which block (one per server, see
/// [`crate::sources::ServerAddrs`]) and where in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrId {
    pub block: u32,
    pub index: u32,
}

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

/// `IORING_CQE_F_MORE`: more completions of the request follow.
pub const CQE_F_MORE: u32 = 1 << 1;

impl Completion {
    /// Whether a multishot request stays armed after this completion.
    pub fn more(&self) -> bool {
        io_uring::cqueue::more(self.flags)
    }
}

/// Whether the kernel answers IORING_REGISTER_PBUF_STATUS (6.8+): asked about a buffer group
/// `ring` has not registered, it says ENOENT; a kernel without the call says EINVAL.
pub fn pbuf_status_known(ring: &IoUring) -> bool {
    register::pbuf_head(ring, u16::MAX).is_err_and(|e| e.raw_os_error() == Some(libc::ENOENT))
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
    /// Every address a connect chain may use (servers and sources), in blocks: one per server.
    pub addrs: Vec<Box<[SockAddr]>>,
    /// Every connect timeout a chain may use (one per backend).
    pub timeouts: Vec<Duration>,
    /// Beside each timeout, the keepalive (TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT) its backend's
    /// server sockets get, if any.
    pub keepalives: Vec<Option<[i32; 3]>>,
    /// The options every server socket gets (`tune.rcvbuf_server`, `sndbuf_server`,
    /// `notsent_lowat`).
    pub server_opts: Vec<crate::config::SockOpt>,
    /// Most chunk buffers (small transfers in flight) at once.
    pub max_chunks: usize,
    /// Most peer-address lookups in flight at once.
    pub peer_slots: usize,
    /// The provided-buffer ring multishot receives pick from (`splice: never`): (buffer size,
    /// most buffers). `None`: no ring.
    pub recv_bufs: Option<(usize, usize)>,
    /// The operations above the 6.1 floor this ring may use (features.rs).
    pub io: crate::features::IoFeatures,
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
    /// Waits that let completions gather (`tune.batch_wait`: a window was asked for).
    #[serde(default)]
    pub batched_waits: u64,
    /// Of them, the short ones after a window in which the worker forwarded messages (`auto`):
    /// for the answers to them (worker/coalesce.rs).
    #[serde(default)]
    pub reply_waits: u64,
}

/// The buffer group id of the ring of receive buffers.
const RECV_GROUP: u16 = 1;

/// How long dropping a ring waits for its requests to be cancelled.
const CANCEL_WAIT: Duration = Duration::from_secs(2);

pub struct Ring {
    ring: IoUring,
    /// Entries the submission queue could not take yet, each link chain as one unit, in order.
    backlog: VecDeque<Vec<Entry>>,
    /// Server and source addresses the connect chains point at, a block per server. A block is
    /// never resized and its addresses stay where they are when blocks are added at run time
    /// (`add server`), so no chain in flight is left pointing at moved memory. A block is dropped
    /// only when it is replaced by that of a server taking a deleted one's index, which the
    /// worker does only once no connection names the deleted server: none has a chain in flight.
    addrs: Vec<Box<[SockAddr]>>,
    timeouts: Box<[Timespec]>,
    /// Indexed like `timeouts`: the option values the connect chains point at.
    keepalives: Box<[Option<[i32; 3]>]>,
    /// The options set on every server socket: the values the connect chains point at (boxed
    /// once, never resized).
    server_opts: Box<[crate::config::SockOpt]>,
    /// Scratch space for building a connect chain.
    chain: Vec<Entry>,
    /// Freed by `Drop` only once every request is known to be cancelled.
    buffers: ManuallyDrop<Buffers>,
    /// Unregistered and freed by `Drop` likewise (only if every buffer came back).
    recv_bufs: Option<ManuallyDrop<pbuf::BufRing>>,
    wake_buf: ManuallyDrop<Box<u64>>,
    io: crate::features::IoFeatures,
    /// Completions of steps a fallback ran as system calls instead of in the ring (a server socket
    /// made with socket/bind that failed, and the chain it cancels): handed out by the next
    /// `drain` as if the kernel had posted them, so each step is still settled exactly once.
    injected: Vec<Completion>,
    /// Zero-copy sends whose completions have not all come (zerocopy.rs).
    zc: zerocopy::ZcSends,
    pub counters: RingCounters,
}

impl Ring {
    /// Adds a block of addresses for connect chains to point at (`add server`), made beforehand:
    /// its number. (A move of the box, whatever the number of addresses.)
    pub fn add_addrs(&mut self, block: Box<[SockAddr]>) -> u32 {
        self.addrs.push(block);
        self.addrs.len() as u32 - 1
    }

    /// Puts `block` in place of block `at`, which is dropped: `add server` taking the index of a
    /// deleted server none of whose connection chains is in flight (no connection names it:
    /// [`crate::worker::upstream::Server::refs`] is 0), so nothing the kernel may still read is
    /// freed.
    pub fn replace_addrs(&mut self, at: u32, block: Box<[SockAddr]>) {
        self.addrs[at as usize] = block;
    }

    /// The address `id` names.
    fn addr(&self, id: AddrId) -> &SockAddr {
        &self.addrs[id.block as usize][id.index as usize]
    }

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
        register::file_alloc_range(&ring, 0, setup.accept_slots)
            .map_err(|e| with_context(e, "setting the accept slot range"))?;
        let mut max = [0, setup.iowq_workers];
        ring.submitter().register_iowq_max_workers(&mut max).map_err(|e| with_context(e, "limiting io-wq workers"))?;
        if let Some(cpu) = setup.cpu {
            // Affinity is an optimisation; a refusal (e.g. in a restricted cpuset) is not fatal.
            let _ = ring.submitter().register_iowq_aff(&cpu_set_of(cpu));
        }
        let recv_bufs = match setup.recv_bufs {
            Some((size, max)) => {
                let r = pbuf::BufRing::new(&ring, RECV_GROUP, size, max, setup.io.pbuf_status)
                    .map_err(|e| with_context(e, "registering the ring of receive buffers"))?;
                Some(ManuallyDrop::new(r))
            }
            None => None,
        };
        Ok(Ring {
            ring,
            recv_bufs,
            backlog: VecDeque::new(),
            addrs: setup.addrs,
            timeouts: setup
                .timeouts
                .into_iter()
                .map(|d| Timespec::new().sec(d.as_secs()).nsec(d.subsec_nanos()))
                .collect(),
            keepalives: setup.keepalives.into_boxed_slice(),
            server_opts: setup.server_opts.into_boxed_slice(),
            chain: Vec::with_capacity(13),
            buffers: ManuallyDrop::new(Buffers::new(setup.max_chunks, setup.peer_slots)),
            wake_buf: ManuallyDrop::new(Box::new(0)),
            io: setup.io,
            injected: Vec::new(),
            zc: zerocopy::ZcSends::default(),
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
    /// while entries are still in the backlog). With a window of `window_us` µs (the worker's
    /// `tune.batch_wait`, worker/coalesce.rs, which says where it ends) it waits that long for
    /// [`BATCH_EVENTS`] completions before it returns with fewer, and a completion that comes
    /// after that point returns at once (the kernel's `min_wait_usec`, counted from the start of
    /// the wait; the caller asks for a window only where the kernel has it). A `timeout` shorter
    /// than the window is stretched to it (io_uring/wait.c: the minimum wait ends first): timers
    /// may fire up to a window late. `short`: the window is the short one for answers (counted).
    pub fn submit_and_wait(
        &mut self,
        timeout: Option<Duration>,
        window_us: Option<u32>,
        short: bool,
    ) -> io::Result<()> {
        self.flush_backlog()?;
        self.counters.enter_calls += 1;
        let want = usize::from(self.backlog.is_empty() && self.injected.is_empty());
        let r = match timeout {
            Some(d) => {
                let ts = Timespec::new().sec(d.as_secs()).nsec(d.subsec_nanos());
                let args = SubmitArgs::new().timespec(&ts);
                match window_us {
                    Some(w) if want == 1 => {
                        self.counters.batched_waits += 1;
                        self.counters.reply_waits += u64::from(short);
                        self.ring.submitter().submit_with_args(BATCH_EVENTS, &args.min_wait_usec(w))
                    }
                    _ => self.ring.submitter().submit_with_args(want, &args),
                }
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
        out.append(&mut self.injected);
        out.extend(cq.by_ref().map(|c| Completion { user_data: c.user_data(), result: c.result(), flags: c.flags() }));
        self.counters.cq_overflow = u64::from(cq.overflow());
        self.counters.completions += (out.len() - before) as u64;
    }

    /// Entries queued (in the SQ or the backlog) but not yet handed to the kernel.
    pub fn pending(&mut self) -> usize {
        self.ring.submission().len() + self.backlog.iter().map(Vec::len).sum::<usize>()
    }

    /// The operations above the 6.1 floor this ring uses.
    /// The ring's own descriptor, for other rings to address (MSG_RING). Valid while the ring is.
    pub fn ring_fd(&self) -> RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.ring)
    }

    pub fn io(&self) -> crate::features::IoFeatures {
        self.io
    }

    /// Moves a plain socket into direct slot `index` (the table takes its own reference; the
    /// caller closes `fd` afterwards): the fallbacks' way into the table (features.rs).
    pub fn install_in_slot(&mut self, index: u32, fd: RawFd) -> io::Result<()> {
        match self.ring.submitter().register_files_update(index, &[fd]) {
            Ok(1) => Ok(()),
            Ok(_) => Err(io::Error::other("the file table took no descriptor")),
            Err(e) => Err(e),
        }
    }

    /// Chunk, header and receive buffers lent out now.
    pub fn buffers_in_use(&self) -> u32 {
        self.buffers.chunks.in_use + self.buffers.headers.in_use + self.recv_bufs.as_ref().map_or(0, |r| r.out)
    }

    /// Chunk, header and receive buffers created and not lent (a receive buffer in the
    /// provided-buffer ring counts as pooled: the kernel may fill it, no connection holds it).
    pub fn buffers_pooled(&self) -> u32 {
        let recv = self.recv_bufs.as_ref().map_or(0, |r| r.created() as u32 - r.out);
        self.buffers.chunks.pooled() + self.buffers.headers.pooled() + recv
    }

    /// Whether every buffer and peer slot has been given back (a worker that ends normally holds
    /// none: it checks this in debug builds).
    pub fn all_buffers_back(&self) -> bool {
        self.buffers.all_back() && self.recv_bufs.as_ref().is_none_or(|r| r.out == 0)
    }
}

impl Ring {
    /// Cancels every request and waits until none is left: true once the kernel finds nothing
    /// more to cancel, false if some request still runs after `CANCEL_WAIT`.
    ///
    /// One IORING_REGISTER_SYNC_CANCEL matching any request does not wait for those already
    /// running in an io-wq thread (it only interrupts them, and answers how many it found), and
    /// does not see a request whose hand-over to io-wq is still deferred task work; so this runs
    /// the task work, cancels, and repeats until the cancel finds nothing.
    fn cancel_everything(&mut self) -> bool {
        let deadline = std::time::Instant::now() + CANCEL_WAIT;
        let mut pause = Timespec::new();
        loop {
            // Run the deferred task work first (DEFER_TASKRUN: only an enter with GETEVENTS does):
            // a request may still have to be handed to an io-wq thread there, where the cancel
            // below can find it. Completions are reaped and ignored.
            let _ = self.ring.submitter().submit_with_args(1, &SubmitArgs::new().timespec(&pause));
            self.ring.completion().for_each(drop);
            match register::sync_cancel_any(&self.ring, Duration::from_millis(50)) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
                Err(e) => {
                    eprintln!("ringproxy: cancelling io_uring requests: {e}");
                    return false;
                }
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            // Found some: they complete (or finish being interrupted) in a moment.
            pause = Timespec::new().nsec(1_000_000);
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Entries never submitted are simply forgotten (the kernel never saw them).
        self.backlog.clear();
        let _ = self.ring.submitter().submit();
        let cancelled = self.cancel_everything();
        if let Some(r) = self.recv_bufs.as_mut() {
            if cancelled && r.out == 0 {
                r.release(&self.ring);
                // SAFETY: unregistered, and every buffer is back: nothing can use them; once.
                unsafe { ManuallyDrop::drop(r) };
            } else {
                eprintln!("ringproxy: a ring went away with receive buffers possibly in use; leaking them");
            }
        }
        if cancelled && self.buffers.all_back() {
            // SAFETY: every buffer handle is back, so no operation can name one (only an op that
            // holds a handle points into the pools); dropped once, here.
            unsafe { ManuallyDrop::drop(&mut self.buffers) };
        } else {
            // A handle still out means an op may still use its buffer (a worker whose ring failed
            // abandons its connections): the pools stay allocated for the life of the process.
            eprintln!("ringproxy: a ring went away with buffers possibly in use by the kernel; leaking them");
        }
        if cancelled {
            // SAFETY: the only op using it is the eventfd read, poll-driven, which the synchronous
            // cancel has removed; dropped once, here.
            unsafe { ManuallyDrop::drop(&mut self.wake_buf) };
        }
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

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use io_uring::opcode;
    use io_uring::types::Fd;

    use super::*;
    use crate::worker::token::{Op, Token};

    fn small_ring() -> Ring {
        Ring::new(RingSetup {
            entries: 8,
            files: 16,
            accept_slots: 8,
            iowq_workers: 2,
            cpu: None,
            addrs: Vec::new(),
            timeouts: Vec::new(),
            keepalives: Vec::new(),
            server_opts: Vec::new(),
            max_chunks: 1,
            peer_slots: 1,
            recv_bufs: None,
            io: crate::features::IoFeatures::ALL,
        })
        .expect("an io_uring")
    }

    /// The connect chain of the 6.1 feature set (features.rs): the socket is made and bound by
    /// system calls and moved into its slot; CONNECT and LINK_TIMEOUT run in the ring. A step that
    /// fails is reported exactly as the kernel reports a failed chain step: its error, then
    /// CONNECT and LINK_TIMEOUT cancelled — one completion each.
    #[test]
    fn the_fallback_connect_chain_binds_its_source_and_reports_a_failed_step_like_the_kernel() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dest = listener.local_addr().unwrap();
        let mut ring = Ring::new(RingSetup {
            entries: 8,
            files: 16,
            accept_slots: 8,
            iowq_workers: 2,
            cpu: None,
            addrs: vec![[dest, "127.0.9.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()].map(SockAddr::from).into()],
            timeouts: vec![Duration::from_secs(5)],
            keepalives: vec![Some([30, 5, 3])],
            server_opts: vec![
                (libc::SOL_SOCKET, libc::SO_RCVBUF, 16 << 10),
                (libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, 1 << 17),
            ],
            max_chunks: 1,
            peer_slots: 1,
            recv_bufs: None,
            io: crate::features::IoFeatures::of_kernel((6, 1)),
        })
        .expect("an io_uring");
        let mut slots = slots::ServerSlots::new(8, 16);
        let at = |index| AddrId { block: 0, index };
        let mk = |op| Token::conn(op, 3, 1);
        let run = |ring: &mut Ring, want: usize| {
            let mut got = Vec::new();
            while got.len() < want {
                ring.submit_and_wait(Some(Duration::from_secs(5)), None, false).unwrap();
                ring.drain(&mut got);
            }
            got.iter().map(|c| (Token::decode(c.user_data).unwrap().op, c.result)).collect::<Vec<_>>()
        };
        // From 127.0.9.1: connected, the server sees that source.
        let slot = slots.take().unwrap();
        ring.connect_chain(&slot, at(0), Some(at(1)), TimeoutId(0), mk);
        assert_eq!(run(&mut ring, 2), vec![(Op::Connect, 0), (Op::ConnectTimeout, -libc::ECANCELED)]);
        assert_eq!(listener.accept().unwrap().1.ip().to_string(), "127.0.9.1");
        ring.close_server(slot, false);
        assert_eq!(run(&mut ring, 1), vec![(Op::CloseFixed, 0)]);
        // An IPv6 source for an IPv4 server: the bind fails, the chain is cancelled behind it.
        let slot = slots.take().unwrap();
        ring.connect_chain(&slot, at(0), Some(at(2)), TimeoutId(0), mk);
        let got = run(&mut ring, 3);
        assert_eq!(got[0].0, Op::Bind);
        assert!(got[0].1 < 0);
        assert_eq!(&got[1..], &[(Op::Connect, -libc::ECANCELED), (Op::ConnectTimeout, -libc::ECANCELED)]);
        ring.close_server(slot, false);
        assert_eq!(run(&mut ring, 1).len(), 1, "the close of a slot the failed chain left empty completes");
    }

    /// A pipe with blocking ends: (read, write).
    fn blocking_pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both are new descriptors owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn bytes_in(pipe_rd: &OwnedFd) -> i32 {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int into `n`.
        assert_eq!(unsafe { libc::ioctl(pipe_rd.as_raw_fd(), libc::FIONREAD, &mut n) }, 0);
        n
    }

    /// Review defect 4 (code-review-7b9477c §1.4): a flush of a full submission queue that the
    /// kernel refuses reached `unreachable!` in `push_reserved`. Here the kernel refuses every
    /// submit (a SINGLE_ISSUER ring used from another thread gets EEXIST): entries wait in the
    /// backlog, whole chains together, and go in once the owner submits.
    #[test]
    fn a_full_submission_queue_that_cannot_be_flushed_keeps_its_entries() {
        let ring = small_ring();
        let ring = std::thread::spawn(move || {
            let mut ring = ring;
            for i in 0..100u32 {
                ring.cancel(Token::worker(Op::Accept, 1_000 + i), Token::worker(Op::Cancel, i));
            }
            assert!(ring.submit().is_err(), "another thread may not submit to a SINGLE_ISSUER ring");
            ring
        })
        .join()
        .expect("pushing onto a full queue must not panic");
        let mut ring = ring;
        assert_eq!(ring.pending(), 100, "nothing was lost");
        assert!(ring.counters.backlogged > 0 && ring.counters.sq_full > 0);
        // Back on the owner's thread, everything goes in (each cancel finds nothing: -ENOENT).
        let mut done = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while done.len() < 100 && std::time::Instant::now() < deadline {
            ring.submit_and_wait(Some(Duration::from_millis(10)), None, false).unwrap();
            ring.drain(&mut done);
        }
        assert_eq!(done.len(), 100);
        assert!(done.iter().all(|c| c.result == -libc::ENOENT));
        assert_eq!(ring.pending(), 0);
    }

    /// Review defect 5 (code-review-7b9477c §1.5): dropping a `Ring` closed its descriptor, which
    /// only starts an asynchronous teardown, and freed the pools right away, while a request could
    /// still be running and writing into a buffer. Here a read runs in an io-wq thread (forced
    /// async, blocked on an empty pipe) into a chunk buffer whose handle its record still holds
    /// (as a worker whose ring failed leaves it): after the drop, whatever that read does must
    /// never land in memory that was freed and lent to someone else.
    #[test]
    fn dropping_a_ring_never_frees_a_buffer_an_op_may_still_write() {
        for round in 0..10 {
            let (a_rd, a_wr) = blocking_pipe();
            let mut ring = small_ring();
            let buf = ring.chunk_buf().unwrap();
            let p = ring.buffers.chunks.ptr(buf.index()).cast::<u8>();
            let e = opcode::Read::new(Fd(a_rd.as_raw_fd()), p, CHUNK as u32)
                .build()
                .flags(io_uring::squeue::Flags::ASYNC)
                .user_data(Token::worker(Op::Wake, 0).encode());
            // SAFETY: `p` is a pool buffer whose handle is never given back (forgotten below, as
            // an abandoned connection's are); the pipe outlives the ring.
            unsafe { ring.push(e) };
            ring.submit().unwrap();
            std::thread::sleep(Duration::from_millis(5));
            std::mem::forget(buf);
            drop(ring);
            // Memory of the same size as a chunk buffer: what a freed buffer would be lent as.
            let probes: Vec<Box<[u8; CHUNK]>> = (0..64).map(|_| Box::new([0u8; CHUNK])).collect();
            let data = [0xAAu8; 4096];
            // SAFETY: writes from a live buffer.
            assert_eq!(unsafe { libc::write(a_wr.as_raw_fd(), data.as_ptr().cast(), data.len()) }, 4096);
            std::thread::sleep(Duration::from_millis(20));
            assert!(
                probes.iter().all(|b| b.iter().all(|&x| x == 0)),
                "round {round}: a request of the dropped ring wrote into freed memory"
            );
            assert_eq!(bytes_in(&a_rd), 4096, "round {round}: a request of the dropped ring still ran");
        }
    }
}
