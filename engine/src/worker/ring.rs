//! The worker's io_uring: the only place that builds SQEs and the only `unsafe` on the data path.
//!
//! Everything above this module speaks in typed operations (`splice_pair`, `connect_chain`, ...) and
//! [`Token`]s. Memory the kernel reads or writes after submission belongs to the `Ring` itself and
//! lives as long as it does: socket addresses and connect timeouts are fixed tables built before the
//! first SQE, peer-address results go to a pool of slots that are recycled only when their completion
//! has been reaped, option values are `static`.
//!
//! Descriptor rules the callers keep (and SAFETY comments below rely on): a fixed-file slot is closed
//! only after every op of the connection that used it has completed (conn.rs), and a pipe is neither
//! closed nor lent again while a splice on it is in flight (pipes.rs). A broken rule cannot corrupt
//! memory: the kernel would act on a closed or reused descriptor, never on freed user memory.

use std::io;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::squeue::{Entry, Flags};
use io_uring::types::{DestinationSlot, Fd, Fixed, SubmitArgs, Timespec};
use io_uring::{IoUring, opcode};
use socket2::SockAddr;

use super::token::{Op, Token};

/// Index of a socket address in the ring's address table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrId(pub u32);

/// Index of a duration in the ring's timeout table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeoutId(pub u32);

/// A slot in the peer-address pool, held from `peername` until `take_peer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerTicket(pub u32);

/// A slot in the header-buffer pool (PROXY protocol headers in and out), held until released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufTicket(pub u32);

/// Bytes per chunk buffer (small reads go through one, larger ones switch to splice).
pub const CHUNK: usize = 16 * 1024;

/// Bytes per header buffer: the longest PROXY header we accept or send.
pub const HEADER_BUF: usize = crate::proxy_protocol::MAX_HEADER;
const HEADER_SLOTS: usize = 4096;

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
    pub sq_full: u64,
    pub cq_overflow: u64,
    pub enter_calls: u64,
}

const PEER_SLOTS: usize = 4096;
const SQE_NONBLOCK: u32 = libc::SPLICE_F_NONBLOCK;

static ONE: libc::c_int = 1;
static LINGER_RST: libc::linger = libc::linger { l_onoff: 1, l_linger: 0 };

pub struct Ring {
    // Dropped first: the ring goes away before any memory it may point into.
    ring: IoUring,
    addrs: Box<[SockAddr]>,
    timeouts: Box<[Timespec]>,
    peers: Box<[libc::sockaddr_in6]>,
    free_peers: Vec<u32>,
    /// Header buffers, created on demand up to HEADER_SLOTS; each is its own heap allocation, so
    /// growing the Vec never moves a buffer the kernel may be using.
    #[expect(clippy::vec_box, reason = "each buffer must keep its address while the Vec grows")]
    headers: Vec<Box<[u8; HEADER_BUF]>>,
    free_headers: Vec<u32>,
    /// Chunk buffers for small transfers, created on demand up to `max_chunks`, same rules.
    chunks: Vec<Box<[u8; CHUNK]>>,
    free_chunks: Vec<u32>,
    max_chunks: usize,
    pub chunks_in_use: u32,
    wake_buf: Box<u64>,
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
        register_file_alloc_range(&ring, 0, setup.accept_slots)?;
        let mut max = [0, setup.iowq_workers];
        ring.submitter().register_iowq_max_workers(&mut max).map_err(|e| with_context(e, "limiting io-wq workers"))?;
        if let Some(cpu) = setup.cpu {
            // SAFETY: cpu_set_t is plain data; zeroed is the empty set, CPU_SET only writes into it.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            unsafe { libc::CPU_SET(cpu, &mut set) };
            // Affinity is an optimisation; a refusal (e.g. in a restricted cpuset) is not fatal.
            let _ = ring.submitter().register_iowq_aff(&set);
        }
        let peers = vec![unsafe_zeroed_sockaddr(); PEER_SLOTS].into_boxed_slice();
        Ok(Ring {
            ring,
            addrs: setup.addrs.into_iter().map(SockAddr::from).collect(),
            timeouts: setup
                .timeouts
                .into_iter()
                .map(|d| Timespec::new().sec(d.as_secs()).nsec(d.subsec_nanos()))
                .collect(),
            peers,
            free_peers: (0..PEER_SLOTS as u32).rev().collect(),
            headers: Vec::new(),
            free_headers: Vec::new(),
            chunks: Vec::new(),
            free_chunks: Vec::new(),
            max_chunks: setup.max_chunks,
            chunks_in_use: 0,
            wake_buf: Box::new(0),
            counters: RingCounters::default(),
        })
    }

    /// Makes room for `n` SQEs, flushing the queue to the kernel if needed, so that a link chain is
    /// never split across submissions.
    fn reserve(&mut self, n: usize) {
        let free = {
            let sq = self.ring.submission();
            sq.capacity() - sq.len()
        };
        if free < n {
            self.counters.sq_full += 1;
            // Flush to make room. A failure surfaces again on the next submit; nothing is lost here.
            let _ = self.ring.submit();
        }
    }

    /// Pushes one SQE; the caller reserved room.
    fn push_reserved(&mut self, entry: &Entry) {
        // SAFETY: every entry built in this module points only into `self`'s tables (addresses,
        // timespecs, peer buffers, the wake buffer), into header buffers, or into statics. The tables
        // are boxed slices built before the first SQE and never resized; header buffers are separate
        // boxes that are never freed while the ring lives and are handed out again only after the
        // op using them completed (callers release a ticket only then). `ring` is declared first so
        // it is dropped (and its requests cancelled) before all of them. Descriptor validity is the
        // callers' rule, see the module docs.
        let pushed = unsafe { self.ring.submission().push(entry) };
        if pushed.is_err() {
            unreachable!("reserve() made room for this entry");
        }
        self.counters.submitted += 1;
    }

    fn push(&mut self, entry: Entry) {
        self.reserve(1);
        self.push_reserved(&entry);
    }

    /// Multishot accept into kernel-chosen fixed slots; non-blocking sockets. (SOCK_CLOEXEC is
    /// refused with direct descriptors, which are never inherited anyway.)
    pub fn accept_multi(&mut self, listener: RawFd, token: Token) {
        let e = opcode::AcceptMulti::new(Fd(listener))
            .allocate_file_index(true)
            .flags(libc::SOCK_NONBLOCK)
            .build()
            .user_data(token.encode());
        self.push(e);
    }

    /// One accept into a kernel-chosen fixed slot (used near capacity, where a multishot accept
    /// could take more connections than there are slots).
    pub fn accept_once(&mut self, listener: RawFd, token: Token) {
        let e = opcode::Accept::new(Fd(listener), std::ptr::null_mut(), std::ptr::null_mut())
            .file_index(Some(DestinationSlot::auto_target()))
            .flags(libc::SOCK_NONBLOCK)
            .build()
            .user_data(token.encode());
        self.push(e);
    }

    /// Cancels the request carrying `target`. A successful cancel posts no completion of its own
    /// (the cancelled request still completes, with -ECANCELED).
    pub fn cancel(&mut self, target: Token, token: Token) {
        let e = opcode::AsyncCancel::new(target.encode()).build().flags(Flags::SKIP_SUCCESS);
        self.push(e.user_data(token.encode()));
    }

    /// Multishot poll on a fixed socket.
    pub fn poll_multi(&mut self, slot: u32, events: u32, token: Token) {
        let e = opcode::PollAdd::new(Fixed(slot), events).multi(true).build().user_data(token.encode());
        self.push(e);
    }

    /// One-shot poll on a fixed socket (level-checked when armed).
    pub fn poll_once(&mut self, slot: u32, events: u32, token: Token) {
        self.push(opcode::PollAdd::new(Fixed(slot), events).build().user_data(token.encode()));
    }

    /// Asks for the peer address of a fixed socket; `None` if every pool slot is in flight.
    /// `ipv6` is the socket's family: SO_PEERNAME refuses a buffer longer than the address.
    pub fn peername(&mut self, slot: u32, ipv6: bool, token: Token) -> Option<PeerTicket> {
        let idx = self.free_peers.pop()?;
        let buf: *mut libc::sockaddr_in6 = &mut self.peers[idx as usize];
        let len =
            if ipv6 { std::mem::size_of::<libc::sockaddr_in6>() } else { std::mem::size_of::<libc::sockaddr_in>() }
                as u32;
        let e =
            opcode::GetSockOpt::new(Fixed(slot), libc::SOL_SOCKET as u32, libc::SO_PEERNAME as u32, buf.cast(), len)
                .build()
                .user_data(token.encode());
        self.push(e);
        Some(PeerTicket(idx))
    }

    /// Returns the pool slot of a completed `peername` and the address it holds, if it succeeded.
    pub fn take_peer(&mut self, ticket: PeerTicket, result: i32) -> Option<SocketAddr> {
        let raw = self.peers[ticket.0 as usize];
        self.free_peers.push(ticket.0);
        if result < 0 {
            return None;
        }
        decode_sockaddr(&raw)
    }

    /// Takes a header buffer from the pool (`None` when every one is in use).
    pub fn header_buf(&mut self) -> Option<BufTicket> {
        if let Some(t) = self.free_headers.pop() {
            return Some(BufTicket(t));
        }
        if self.headers.len() >= HEADER_SLOTS {
            return None;
        }
        self.headers.push(Box::new([0u8; HEADER_BUF]));
        Some(BufTicket(self.headers.len() as u32 - 1))
    }

    /// The bytes of a header buffer (valid while the ticket is held and no op writes to it).
    pub fn header(&self, t: BufTicket) -> &[u8; HEADER_BUF] {
        &self.headers[t.0 as usize]
    }

    /// Gives a header buffer back. The caller holds no op on it in flight.
    pub fn release_header(&mut self, t: BufTicket) {
        self.free_headers.push(t.0);
    }

    /// Takes a chunk buffer (`None` when `max_chunks` are in flight).
    pub fn chunk_buf(&mut self) -> Option<BufTicket> {
        let t = match self.free_chunks.pop() {
            Some(t) => t,
            None if self.chunks.len() < self.max_chunks => {
                self.chunks.push(Box::new([0u8; CHUNK]));
                self.chunks.len() as u32 - 1
            }
            None => return None,
        };
        self.chunks_in_use += 1;
        Some(BufTicket(t))
    }

    /// Gives a chunk buffer back. The caller holds no op on it in flight.
    pub fn release_chunk(&mut self, t: BufTicket) {
        self.chunks_in_use -= 1;
        self.free_chunks.push(t.0);
    }

    /// Chunk buffers created and not lent.
    pub fn chunks_pooled(&self) -> u32 {
        self.free_chunks.len() as u32
    }

    /// recv of up to a chunk into a chunk buffer (non-blocking: EAGAIN when the socket is empty).
    pub fn recv_chunk(&mut self, slot: u32, buf: BufTicket, token: Token) {
        let p: *mut u8 = self.chunks[buf.0 as usize].as_mut_ptr();
        let e = opcode::Recv::new(Fixed(slot), p, CHUNK as u32).flags(libc::MSG_DONTWAIT).build();
        self.push(e.user_data(token.encode()));
    }

    /// send of `len` bytes from offset `off` of a chunk buffer (non-blocking: may be short).
    pub fn send_chunk(&mut self, slot: u32, buf: BufTicket, off: u32, len: u32, token: Token) {
        let off = (off as usize).min(CHUNK);
        let len = (len as usize).min(CHUNK - off);
        let p: *const u8 = self.chunks[buf.0 as usize][off..].as_ptr();
        let e = opcode::Send::new(Fixed(slot), p, len as u32).flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL).build();
        self.push(e.user_data(token.encode()));
    }

    /// recv(MSG_PEEK) into a header buffer: looks at what the client sent without consuming it.
    pub fn peek(&mut self, slot: u32, buf: BufTicket, token: Token) {
        let p: *mut u8 = self.headers[buf.0 as usize].as_mut_ptr();
        let e = opcode::Recv::new(Fixed(slot), p, HEADER_BUF as u32)
            .flags(libc::MSG_PEEK | libc::MSG_DONTWAIT)
            .build()
            .user_data(token.encode());
        self.push(e);
    }

    /// recv(MSG_WAITALL) of exactly `len` bytes into a header buffer: consumes a header already peeked.
    pub fn consume(&mut self, slot: u32, buf: BufTicket, len: u32, token: Token) {
        let p: *mut u8 = self.headers[buf.0 as usize].as_mut_ptr();
        let len = len.min(HEADER_BUF as u32);
        let e = opcode::Recv::new(Fixed(slot), p, len).flags(libc::MSG_WAITALL).build().user_data(token.encode());
        self.push(e);
    }

    /// Copies `bytes` into a header buffer and sends them whole (MSG_WAITALL).
    pub fn send_header(&mut self, slot: u32, buf: BufTicket, bytes: &[u8], token: Token) {
        let n = bytes.len().min(HEADER_BUF);
        self.headers[buf.0 as usize][..n].copy_from_slice(&bytes[..n]);
        let p: *const u8 = self.headers[buf.0 as usize].as_ptr();
        let e = opcode::Send::new(Fixed(slot), p, n as u32)
            .flags(libc::MSG_WAITALL | libc::MSG_NOSIGNAL)
            .build()
            .user_data(token.encode());
        self.push(e);
    }

    /// Installs a direct descriptor into the process table (the result is the new fd), for the one
    /// thing io_uring cannot do on a direct socket here: getsockname().
    pub fn install_fd(&mut self, slot: u32, token: Token) {
        self.push(opcode::FixedFdInstall::new(Fixed(slot), 0).build().user_data(token.encode()));
    }

    /// The chain that opens a server connection on fixed slot `slot`:
    /// SOCKET → TCP_NODELAY → [IP_BIND_ADDRESS_NO_PORT → BIND source] → CONNECT → LINK_TIMEOUT.
    /// Returns the ops pushed, in order. The steps before CONNECT post a completion only when they
    /// fail (CQE_SKIP_SUCCESS); CONNECT and LINK_TIMEOUT always do, after every earlier step.
    pub fn connect_chain(
        &mut self,
        slot: u32,
        dest: AddrId,
        source: Option<AddrId>,
        timeout: TimeoutId,
        mk: impl Fn(Op) -> Token,
    ) -> &'static [Op] {
        let dst = &self.addrs[dest.0 as usize];
        let domain = if dst.is_ipv6() { libc::AF_INET6 } else { libc::AF_INET };
        let dst_ptr = dst.as_ptr();
        let dst_len = dst.len();
        let target = DestinationSlot::try_from_slot_target(slot)
            .unwrap_or_else(|_| unreachable!("slot {slot} is below the table size"));
        let ts: *const Timespec = &self.timeouts[timeout.0 as usize];
        let socket = opcode::Socket::new(domain, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0)
            .file_index(Some(target))
            .build()
            .flags(Flags::IO_LINK | Flags::SKIP_SUCCESS)
            .user_data(mk(Op::Socket).encode());
        let nodelay = opcode::SetSockOpt::new(
            Fixed(slot),
            libc::IPPROTO_TCP as u32,
            libc::TCP_NODELAY as u32,
            (&raw const ONE).cast(),
            4,
        )
        .build()
        .flags(Flags::IO_LINK | Flags::SKIP_SUCCESS)
        .user_data(mk(Op::NoDelay).encode());
        let connect = opcode::Connect::new(Fixed(slot), dst_ptr.cast(), dst_len)
            .build()
            .flags(Flags::IO_LINK)
            .user_data(mk(Op::Connect).encode());
        let link_timeout = opcode::LinkTimeout::new(ts).build().user_data(mk(Op::ConnectTimeout).encode());
        match source {
            Some(src) => {
                let src = &self.addrs[src.0 as usize];
                let no_port = opcode::SetSockOpt::new(
                    Fixed(slot),
                    libc::IPPROTO_IP as u32,
                    libc::IP_BIND_ADDRESS_NO_PORT as u32,
                    (&raw const ONE).cast(),
                    4,
                )
                .build()
                .flags(Flags::IO_LINK | Flags::SKIP_SUCCESS)
                .user_data(mk(Op::BindNoPort).encode());
                let bind = opcode::Bind::new(Fixed(slot), src.as_ptr().cast(), src.len())
                    .build()
                    .flags(Flags::IO_LINK | Flags::SKIP_SUCCESS)
                    .user_data(mk(Op::Bind).encode());
                self.reserve(6);
                for e in [&socket, &nodelay, &no_port, &bind, &connect, &link_timeout] {
                    self.push_reserved(e);
                }
                &[Op::Socket, Op::NoDelay, Op::BindNoPort, Op::Bind, Op::Connect, Op::ConnectTimeout]
            }
            None => {
                self.reserve(4);
                for e in [&socket, &nodelay, &connect, &link_timeout] {
                    self.push_reserved(e);
                }
                &[Op::Socket, Op::NoDelay, Op::Connect, Op::ConnectTimeout]
            }
        }
    }

    /// socket → pipe, hard-linked to pipe → socket: one io-wq trip moves a chunk end to end. The
    /// hard link runs the second splice even when the first is short or fails.
    pub fn splice_pair(&mut self, src: u32, pipe: (RawFd, RawFd), dst: u32, len: u32, t_in: Token, t_out: Token) {
        let (rd, wr) = pipe;
        let e_in = opcode::Splice::new(Fixed(src), -1, Fd(wr), -1, len)
            .flags(SQE_NONBLOCK)
            .build()
            .flags(Flags::IO_HARDLINK)
            .user_data(t_in.encode());
        let e_out =
            opcode::Splice::new(Fd(rd), -1, Fixed(dst), -1, len).flags(SQE_NONBLOCK).build().user_data(t_out.encode());
        self.reserve(2);
        self.push_reserved(&e_in);
        self.push_reserved(&e_out);
    }

    /// pipe → socket, for data left in the pipe by a short write.
    pub fn splice_out(&mut self, pipe_rd: RawFd, dst: u32, len: u32, token: Token) {
        let e = opcode::Splice::new(Fd(pipe_rd), -1, Fixed(dst), -1, len)
            .flags(SQE_NONBLOCK)
            .build()
            .user_data(token.encode());
        self.push(e);
    }

    /// shutdown(SHUT_WR) on a fixed socket: forwards an EOF.
    pub fn shutdown_write(&mut self, slot: u32, token: Token) {
        self.push(opcode::Shutdown::new(Fixed(slot), libc::SHUT_WR).build().user_data(token.encode()));
    }

    /// SO_LINGER {1, 0}: the socket's close will send RST.
    pub fn linger_rst(&mut self, slot: u32, token: Token) {
        let e = opcode::SetSockOpt::new(
            Fixed(slot),
            libc::SOL_SOCKET as u32,
            libc::SO_LINGER as u32,
            (&raw const LINGER_RST).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
        .build()
        .user_data(token.encode());
        self.push(e);
    }

    /// Closes a fixed-file slot.
    pub fn close_fixed(&mut self, slot: u32, token: Token) {
        self.push(opcode::Close::new(Fixed(slot)).build().user_data(token.encode()));
    }

    /// Reads the control eventfd (completes when another thread signals it).
    pub fn read_wake(&mut self, eventfd: RawFd, token: Token) {
        let buf: *mut u64 = &mut *self.wake_buf;
        self.push(opcode::Read::new(Fd(eventfd), buf.cast(), 8).build().user_data(token.encode()));
    }

    /// Submits what is queued and waits for at least one completion or `timeout`.
    pub fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.counters.enter_calls += 1;
        let r = match timeout {
            Some(d) => {
                let ts = Timespec::new().sec(d.as_secs()).nsec(d.subsec_nanos());
                let args = SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submit_and_wait(1),
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
        match self.ring.submit() {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Moves every available completion into `out`.
    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        let mut cq = self.ring.completion();
        let before = out.len();
        out.extend(cq.by_ref().map(|c| Completion { user_data: c.user_data(), result: c.result(), flags: c.flags() }));
        self.counters.cq_overflow = u64::from(cq.overflow());
        self.counters.completions += (out.len() - before) as u64;
    }

    /// Submission entries queued but not yet handed to the kernel.
    pub fn pending(&mut self) -> usize {
        self.ring.submission().len()
    }
}

fn register_file_alloc_range(ring: &IoUring, off: u32, len: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Range {
        off: u32,
        len: u32,
        resv: u64,
    }
    let range = Range { off, len, resv: 0 };
    const IORING_REGISTER_FILE_ALLOC_RANGE: libc::c_long = 25;
    // SAFETY: `range` is a valid io_uring_file_index_range that the kernel only reads during the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            ring.as_raw_fd(),
            IORING_REGISTER_FILE_ALLOC_RANGE,
            &range as *const Range,
            0,
        )
    };
    if r < 0 {
        return Err(with_context(io::Error::last_os_error(), "setting the accept slot range"));
    }
    Ok(())
}

fn with_context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn unsafe_zeroed_sockaddr() -> libc::sockaddr_in6 {
    // SAFETY: sockaddr_in6 is plain old data; all-zero is a valid (AF_UNSPEC) value.
    unsafe { std::mem::zeroed() }
}

/// Decodes an AF_INET / AF_INET6 address written by the kernel.
fn decode_sockaddr(raw: &libc::sockaddr_in6) -> Option<SocketAddr> {
    match raw.sin6_family as i32 {
        libc::AF_INET6 => {
            let ip = std::net::Ipv6Addr::from(raw.sin6_addr.s6_addr);
            let v6 = SocketAddrV6::new(ip, u16::from_be(raw.sin6_port), raw.sin6_flowinfo, raw.sin6_scope_id);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
                None => SocketAddr::V6(v6),
            })
        }
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in at the start of this (larger) buffer.
            let v4: &libc::sockaddr_in = unsafe { &*(raw as *const libc::sockaddr_in6).cast() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(v4.sin_port))))
        }
        _ => None,
    }
}
