//! The typed operations: each builds its SQE(s) and queues them. Memory the kernel uses after
//! submission is either the ring's own (address and timeout tables, the wake buffer, `static`
//! option values), alive until `Ring`'s `Drop` has cancelled everything, or a pool buffer named by
//! a handle, in which case the operation is an `unsafe fn`: the caller keeps that handle in the
//! operation's in-flight record until the completion is reaped.

use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

use io_uring::opcode;
use io_uring::squeue::Flags;
use io_uring::types::{CancelBuilder, DestinationSlot, Fd, Fixed, Timespec};

use super::buffers::{CHUNK, ChunkBuf, HEADER_BUF, HeaderBuf, PeerSlot};
use super::pbuf::RingBuf;
use super::slots::{ClientSlot, ServerSlot, Sock};
use super::{AddrId, Ring, TimeoutId};
use crate::worker::token::{Op, Token};

static ONE: libc::c_int = 1;
static LINGER_RST: libc::linger = libc::linger { l_onoff: 1, l_linger: 0 };
/// connect(2) to an `AF_UNSPEC` address disconnects a TCP socket: `tcp_disconnect`, what a close
/// with SO_LINGER {1, 0} runs, sends RST from every state a close would send FIN from.
static DISCONNECT: libc::sockaddr =
    libc::sockaddr { sa_family: libc::AF_UNSPEC as libc::sa_family_t, sa_data: [0; 14] };

/// Splices never block an io-wq thread on an empty socket or a full pipe.
const SPLICE_NONBLOCK: u32 = libc::SPLICE_F_NONBLOCK;

/// IORING_MSG_RING_CQE_SKIP: the target ring of a MSG_RING posts no completion.
const MSG_RING_CQE_SKIP: u32 = 1;

impl Ring {
    // --- listeners and the worker ---

    /// Multishot accept into kernel-chosen fixed slots; non-blocking sockets. (SOCK_CLOEXEC is
    /// refused with direct descriptors, which are never inherited anyway.)
    ///
    /// Without uring_cmd socket options or FIXED_FD_INSTALL (features.rs) the accepted sockets are
    /// plain descriptors (non-blocking, close-on-exec): the worker reads their addresses and moves
    /// them into direct slots itself.
    pub fn accept_multi(&mut self, listener: RawFd, token: Token) {
        let direct = self.io.direct_accept();
        let flags = if direct { libc::SOCK_NONBLOCK } else { libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC };
        let e = opcode::AcceptMulti::new(Fd(listener))
            .allocate_file_index(direct)
            .flags(flags)
            .build()
            .user_data(token.encode());
        // SAFETY: no pointer; the listener descriptor is kept open by the worker while armed.
        unsafe { self.push(e) };
    }

    /// One accept into a kernel-chosen fixed slot (used near capacity, where a multishot accept
    /// could take more connections than there are slots).
    pub fn accept_once(&mut self, listener: RawFd, token: Token) {
        let direct = self.io.direct_accept();
        let e = opcode::Accept::new(Fd(listener), std::ptr::null_mut(), std::ptr::null_mut())
            .file_index(direct.then(DestinationSlot::auto_target))
            .flags(if direct { libc::SOCK_NONBLOCK } else { libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC })
            .build()
            .user_data(token.encode());
        // SAFETY: null address pointers (the peer address is not asked for); descriptor as above.
        unsafe { self.push(e) };
    }

    /// Cancels the request carrying `target`. A successful cancel posts no completion of its own
    /// (the cancelled request still completes, with -ECANCELED); a failed one (nothing found,
    /// already running) posts one with `token`, which callers ignore.
    pub fn cancel(&mut self, target: Token, token: Token) {
        let e = opcode::AsyncCancel::new(target.encode()).build().flags(Flags::SKIP_SUCCESS);
        // SAFETY: no pointer, no descriptor.
        unsafe { self.push(e.user_data(token.encode())) };
    }

    /// Cancels every request carrying `target` (a listener's accepts); as [`Ring::cancel`], a
    /// completion with `token` comes only when none was found.
    pub fn cancel_all(&mut self, target: Token, token: Token) {
        let e = opcode::AsyncCancel2::new(CancelBuilder::user_data(target.encode()).all())
            .build()
            .flags(Flags::SKIP_SUCCESS);
        // SAFETY: no pointer, no descriptor.
        unsafe { self.push(e.user_data(token.encode())) };
    }

    /// Reads the control eventfd (completes when another thread signals it).
    pub fn read_wake(&mut self, eventfd: RawFd, token: Token) {
        let buf: *mut u64 = &raw mut **self.wake_buf;
        // SAFETY: `wake_buf` is the ring's own box, freed only after `Drop` cancelled every
        // request; only this read writes it, and one read is armed at a time (the worker re-arms
        // on its completion). The eventfd outlives the worker.
        unsafe { self.push(opcode::Read::new(Fd(eventfd), buf.cast(), 8).build().user_data(token.encode())) };
    }

    /// Installs the socket in direct slot `src` into another ring's table (IORING_OP_MSG_RING with
    /// IORING_MSG_SEND_FD, Linux 6.0+; the target posts no completion): into slot `dest`, or, with
    /// `None`, into a free slot of the target's allocation range, which the kernel picks (race-free
    /// with the target's own direct accepts) and this op's completion names. Both tables then hold
    /// the socket: the source slot still has to be closed, which closes nothing of the socket while
    /// the other table holds it. Completes once the socket is in the other table (for a ring with
    /// DEFER_TASKRUN, once its thread has run the install).
    pub fn send_slot(&mut self, src: Sock<'_>, target_ring: RawFd, dest: Option<u32>, token: Token) {
        let slot = match dest {
            None => Ok(DestinationSlot::auto_target()),
            Some(d) => DestinationSlot::try_from_slot_target(d),
        };
        let Ok(slot) = slot else {
            // (A slot number that cannot be named cannot have been granted: fail this op alone.)
            self.post(token, -libc::EINVAL);
            return;
        };
        let e = opcode::MsgRingSendFd::new(Fd(target_ring), Fixed(src.index()), slot, 0)
            .opcode_flags(MSG_RING_CQE_SKIP)
            .build()
            .user_data(token.encode());
        // SAFETY: no pointer. The target ring's descriptor is a duplicate held by the move plan
        // (`Arc<OwnedFd>`) for as long as this worker may submit to it; the source slot is held
        // by the connection, which closes it only after this op's completion.
        unsafe { self.push(e) };
    }

    /// Closes a client socket's slot; with `rst`, SO_LINGER {1, 0} (or a disconnect) first, so
    /// that the peer gets RST.
    pub fn close_client(&mut self, slot: ClientSlot, rst: bool) {
        let index = slot.into_index();
        self.close_index(index, rst, Token::worker(Op::CloseFixed, index));
    }

    /// Closes a server socket's slot (open or not); the slot is free again when the close
    /// completes (`Op::CloseFixed` with the slot's index).
    pub fn close_server(&mut self, slot: ServerSlot, rst: bool) {
        let index = slot.into_index();
        self.close_index(index, rst, Token::worker(Op::CloseFixed, index));
    }

    fn close_index(&mut self, index: u32, rst: bool, token: Token) {
        let close = opcode::Close::new(Fixed(index)).build().user_data(token.encode());
        if !rst {
            // SAFETY: no pointer; the caller gave up the slot's handle, nothing else uses it.
            unsafe { self.push(close) };
            return;
        }
        // SO_LINGER {1, 0}, or, without uring_cmd socket options (before 6.7: it cannot be set on
        // a direct socket), a connect to `AF_UNSPEC`: either way `tcp_disconnect` sends the RST.
        // Hard-linked, so the close runs whatever it returned; it posts a completion only if it
        // fails (`Op::Linger`, ignored: the close then sends FIN).
        let reset = if self.io.sockopt {
            opcode::SetSockOpt::new(
                Fixed(index),
                libc::SOL_SOCKET as u32,
                libc::SO_LINGER as u32,
                (&raw const LINGER_RST).cast(),
                std::mem::size_of::<libc::linger>() as u32,
            )
            .build()
        } else {
            opcode::Connect::new(
                Fixed(index),
                &raw const DISCONNECT,
                std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
            )
            .build()
        };
        let reset =
            reset.flags(Flags::IO_HARDLINK | Flags::SKIP_SUCCESS).user_data(Token::worker(Op::Linger, index).encode());
        // SAFETY: the option value and the address are `static`s; the slot as above.
        unsafe { self.push_chain(&[reset, close]) };
    }

    // --- connections ---

    /// Multishot poll on a socket.
    pub fn poll_multi(&mut self, sock: Sock<'_>, events: u32, token: Token) {
        let e = opcode::PollAdd::new(Fixed(sock.index()), events).multi(true).build().user_data(token.encode());
        // SAFETY: no pointer; the slot stays open until every op on it completed (module docs).
        unsafe { self.push(e) };
    }

    /// One-shot poll on a socket (level-checked when armed).
    pub fn poll_once(&mut self, sock: Sock<'_>, events: u32, token: Token) {
        // SAFETY: as for `poll_multi`.
        unsafe { self.push(opcode::PollAdd::new(Fixed(sock.index()), events).build().user_data(token.encode())) };
    }

    /// A peer-address slot, or `None` when every one is in flight.
    pub fn peer_slot(&mut self) -> Option<PeerSlot> {
        self.buffers.peer()
    }

    /// Asks for the peer address of a socket into `peer`. `ipv6` is the socket's family:
    /// SO_PEERNAME refuses a buffer longer than the address.
    ///
    /// # Safety
    /// `peer` is kept (not given back with [`Ring::take_peer`]) until this op's completion.
    pub unsafe fn peername(&mut self, sock: Sock<'_>, ipv6: bool, peer: &PeerSlot, token: Token) {
        let buf = self.buffers.peers.ptr(peer.index());
        let len =
            if ipv6 { std::mem::size_of::<libc::sockaddr_in6>() } else { std::mem::size_of::<libc::sockaddr_in>() };
        let e = opcode::GetSockOpt::new(
            Fixed(sock.index()),
            libc::SOL_SOCKET as u32,
            libc::SO_PEERNAME as u32,
            buf.cast(),
            len as u32,
        )
        .build()
        .user_data(token.encode());
        // SAFETY: `buf` is a pool slot that never moves; the caller keeps its handle until the
        // completion, so the slot is not lent again meanwhile.
        unsafe { self.push(e) };
    }

    /// Gives back the slot of a completed `peername` and returns the address it holds, if the
    /// lookup succeeded.
    pub fn take_peer(&mut self, peer: PeerSlot, result: i32) -> Option<SocketAddr> {
        let raw = self.buffers.give_peer(peer);
        if result < 0 { None } else { decode_sockaddr(&raw) }
    }

    /// A chunk buffer, or `None` when `max_chunks` are lent.
    pub fn chunk_buf(&mut self) -> Option<ChunkBuf> {
        self.buffers.chunk()
    }

    pub fn give_chunk(&mut self, b: ChunkBuf) {
        self.buffers.give_chunk(b);
    }

    /// A header buffer, or `None` when every one is lent.
    pub fn header_buf(&mut self) -> Option<HeaderBuf> {
        self.buffers.header()
    }

    pub fn give_header(&mut self, b: HeaderBuf) {
        self.buffers.give_header(b);
    }

    /// The bytes of a header buffer. Holding the handle outside an in-flight record means no
    /// operation writes to it.
    pub fn header(&self, b: &HeaderBuf) -> &[u8; HEADER_BUF] {
        self.buffers.headers.get(b.index())
    }

    /// Copies `bytes` (at most `HEADER_BUF`) into a header buffer; returns how many.
    pub fn fill_header(&mut self, b: &mut HeaderBuf, bytes: &[u8]) -> u32 {
        let n = bytes.len().min(HEADER_BUF);
        // SAFETY: the buffer is held through `b` (taken by `&mut`, so no op of ours names it
        // while we write), and it lives as long as the pool.
        let dst = unsafe { &mut *self.buffers.headers.ptr(b.index()) };
        dst[..n].copy_from_slice(&bytes[..n]);
        n as u32
    }

    /// recv of up to a chunk into a chunk buffer (non-blocking: EAGAIN when the socket is empty).
    ///
    /// # Safety
    /// `buf` stays in this op's in-flight record until its completion.
    pub unsafe fn recv_chunk(&mut self, sock: Sock<'_>, buf: &ChunkBuf, token: Token) {
        let p = self.buffers.chunks.ptr(buf.index()).cast::<u8>();
        let e = opcode::Recv::new(Fixed(sock.index()), p, CHUNK as u32).flags(libc::MSG_DONTWAIT).build();
        // SAFETY: `p` is a pool buffer that never moves, held by the caller until the completion.
        unsafe { self.push(e.user_data(token.encode())) };
    }

    /// send of `len` bytes from offset `off` of a chunk buffer (non-blocking: may be short).
    ///
    /// # Safety
    /// As for [`Ring::recv_chunk`].
    pub unsafe fn send_chunk(&mut self, sock: Sock<'_>, buf: &ChunkBuf, off: u32, len: u32, token: Token) {
        let off = (off as usize).min(CHUNK);
        let len = (len as usize).min(CHUNK - off);
        // SAFETY: `off <= CHUNK`, so the pointer stays inside (or one past) the buffer.
        let p = unsafe { self.buffers.chunks.ptr(buf.index()).cast::<u8>().add(off) };
        let e = opcode::Send::new(Fixed(sock.index()), p, len as u32).flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
        // SAFETY: `p..p+len` lies in a pool buffer held by the caller until the completion.
        unsafe { self.push(e.build().user_data(token.encode())) };
    }

    /// recv(MSG_PEEK) into a header buffer: looks at what the client sent without consuming it.
    ///
    /// # Safety
    /// As for [`Ring::recv_chunk`].
    pub unsafe fn peek(&mut self, sock: Sock<'_>, buf: &HeaderBuf, token: Token) {
        let p = self.buffers.headers.ptr(buf.index()).cast::<u8>();
        let e = opcode::Recv::new(Fixed(sock.index()), p, HEADER_BUF as u32).flags(libc::MSG_PEEK | libc::MSG_DONTWAIT);
        // SAFETY: a pool buffer held by the caller until the completion.
        unsafe { self.push(e.build().user_data(token.encode())) };
    }

    /// recv(MSG_WAITALL) of exactly `len` bytes into a header buffer: consumes a header already
    /// peeked.
    ///
    /// # Safety
    /// As for [`Ring::recv_chunk`].
    pub unsafe fn consume(&mut self, sock: Sock<'_>, buf: &HeaderBuf, len: u32, token: Token) {
        let p = self.buffers.headers.ptr(buf.index()).cast::<u8>();
        let len = len.min(HEADER_BUF as u32);
        let e = opcode::Recv::new(Fixed(sock.index()), p, len).flags(libc::MSG_WAITALL);
        // SAFETY: as for `peek`.
        unsafe { self.push(e.build().user_data(token.encode())) };
    }

    /// Sends the first `len` bytes of a header buffer, whole (MSG_WAITALL).
    ///
    /// # Safety
    /// As for [`Ring::recv_chunk`].
    pub unsafe fn send_header(&mut self, sock: Sock<'_>, buf: &HeaderBuf, len: u32, token: Token) {
        let p = self.buffers.headers.ptr(buf.index()).cast::<u8>();
        let len = len.min(HEADER_BUF as u32);
        let e = opcode::Send::new(Fixed(sock.index()), p, len).flags(libc::MSG_WAITALL | libc::MSG_NOSIGNAL);
        // SAFETY: as for `peek`.
        unsafe { self.push(e.build().user_data(token.encode())) };
    }

    /// A completion for `token` with `result`, delivered by the next [`Ring::drain`] without any
    /// SQE (and the next wait does not block): an op that fails before it reaches the kernel, or
    /// work a connection resumes after the other connections' events of this loop turn.
    pub fn post(&mut self, token: Token, result: i32) {
        self.injected.push(super::Completion { user_data: token.encode(), result, flags: 0 });
    }

    /// Installs a direct socket into the process table (the result is the new fd, which the
    /// completion's handler must own), for what io_uring cannot do on a direct socket, or only
    /// on an io-wq thread: getsockname(), shutdown().
    pub fn install_fd(&mut self, sock: Sock<'_>, token: Token) {
        // SAFETY: no pointer; the slot as for `poll_multi`.
        unsafe { self.push(opcode::FixedFdInstall::new(Fixed(sock.index()), 0).build().user_data(token.encode())) };
    }

    /// The chain that opens a server connection in `slot`: SOCKET → TCP_NODELAY → [SO_KEEPALIVE,
    /// TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT] → [SO_RCVBUF] → [SO_SNDBUF] →
    /// [TCP_NOTSENT_LOWAT] → [IP_BIND_ADDRESS_NO_PORT → BIND source] → CONNECT → LINK_TIMEOUT.
    /// (The keepalive, buffer and low-mark steps post failures as `Op::NoDelay`: a socket option
    /// step.)
    /// The steps before CONNECT post a completion only when they fail (CQE_SKIP_SUCCESS), always
    /// before CONNECT's; CONNECT and LINK_TIMEOUT each post exactly one.
    pub fn connect_chain(
        &mut self,
        slot: &ServerSlot,
        dest: AddrId,
        source: Option<AddrId>,
        timeout: TimeoutId,
        mk: impl Fn(Op) -> Token,
    ) {
        let index = slot.index();
        let dst = self.addr(dest);
        let domain = if dst.is_ipv6() { libc::AF_INET6 } else { libc::AF_INET };
        let (dst_ptr, dst_len) = (dst.as_ptr(), dst.len());
        let target = DestinationSlot::try_from_slot_target(index)
            .unwrap_or_else(|_| unreachable!("slot {index} is below the table size"));
        let ts: *const Timespec = &self.timeouts[timeout.0 as usize];
        let step = Flags::IO_LINK | Flags::SKIP_SUCCESS;
        let socket = opcode::Socket::new(domain, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0)
            .file_index(Some(target))
            .build()
            .flags(step)
            .user_data(mk(Op::Socket).encode());
        let nodelay =
            opt_one(index, libc::IPPROTO_TCP, libc::TCP_NODELAY).flags(step).user_data(mk(Op::NoDelay).encode());
        let connect = opcode::Connect::new(Fixed(index), dst_ptr.cast(), dst_len)
            .build()
            .flags(Flags::IO_LINK)
            .user_data(mk(Op::Connect).encode());
        let link_timeout = opcode::LinkTimeout::new(ts).build().user_data(mk(Op::ConnectTimeout).encode());
        if !self.io.chained_connect() {
            // No BIND or no uring_cmd setsockopt (features.rs): make the socket with system calls,
            // move it into the slot, and run only CONNECT and its timeout in the ring. A step that
            // fails is reported as the chain would report it: its own error, then CONNECT and
            // LINK_TIMEOUT cancelled.
            let src = source.map(|s| self.addr(s).clone());
            let dst = self.addr(dest).clone();
            let keepalive = self.keepalives.get(timeout.0 as usize).copied().flatten();
            match made_socket(&dst, src.as_ref(), keepalive, &self.server_opts).and_then(|sock| {
                self.install_in_slot(index, std::os::fd::AsRawFd::as_raw_fd(&sock)).map_err(|e| (Op::Socket, e))
            }) {
                // SAFETY: as for the full chain below: ring tables and a held slot.
                Ok(()) => unsafe { self.push_chain(&[connect, link_timeout]) },
                Err((op, e)) => {
                    let errno = e.raw_os_error().unwrap_or(libc::EIO);
                    for (op, res) in
                        [(op, -errno), (Op::Connect, -libc::ECANCELED), (Op::ConnectTimeout, -libc::ECANCELED)]
                    {
                        self.post(mk(op), res);
                    }
                }
            }
            return;
        }
        // Every pointer in the chain is into the ring's own tables (addresses, the timespec, the
        // values of the keepalive and the other options), alive until `Drop` cancelled every
        // request, or a `static` option value; the slot is held by the caller's connection until
        // its close. (A block of addresses is replaced only once no connection names its server,
        // and a connection names it until its chain's last completion: `Ring::replace_addrs`.)
        // A scratch list the ring keeps: no allocation per connection.
        let mut chain = std::mem::take(&mut self.chain);
        chain.clear();
        chain.extend([socket, nodelay]);
        let opt = |level: libc::c_int, name: libc::c_int, value: *const i32| {
            opcode::SetSockOpt::new(Fixed(index), level as u32, name as u32, value.cast(), 4)
                .build()
                .flags(step)
                .user_data(mk(Op::NoDelay).encode())
        };
        if let Some(k) = self.keepalives.get(timeout.0 as usize).and_then(Option::as_ref) {
            chain.push(
                opt_one(index, libc::SOL_SOCKET, libc::SO_KEEPALIVE).flags(step).user_data(mk(Op::NoDelay).encode()),
            );
            chain.push(opt(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, &k[0]));
            chain.push(opt(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, &k[1]));
            chain.push(opt(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, &k[2]));
        }
        for (level, name, value) in self.server_opts.iter() {
            chain.push(opt(*level, *name, value));
        }
        if let Some(src) = source {
            let src = self.addr(src);
            chain.push(
                opt_one(index, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT)
                    .flags(step)
                    .user_data(mk(Op::BindNoPort).encode()),
            );
            chain.push(
                opcode::Bind::new(Fixed(index), src.as_ptr().cast(), src.len())
                    .build()
                    .flags(step)
                    .user_data(mk(Op::Bind).encode()),
            );
        }
        chain.extend([connect, link_timeout]);
        // SAFETY: see above: ring tables, statics, a held slot.
        unsafe { self.push_chain(&chain) };
        self.chain = chain;
    }

    /// socket → pipe, hard-linked to pipe → socket: one io-wq trip moves a chunk end to end. The
    /// hard link runs the second splice even when the first is short or fails. The pipe's
    /// descriptors are the caller's lease, held until both complete.
    pub fn splice_pair(
        &mut self,
        src: Sock<'_>,
        pipe: (RawFd, RawFd),
        dst: Sock<'_>,
        len: u32,
        t_in: Token,
        t_out: Token,
    ) {
        let (rd, wr) = pipe;
        let e_in = opcode::Splice::new(Fixed(src.index()), -1, Fd(wr), -1, len)
            .flags(SPLICE_NONBLOCK)
            .build()
            .flags(Flags::IO_HARDLINK)
            .user_data(t_in.encode());
        let e_out = opcode::Splice::new(Fd(rd), -1, Fixed(dst.index()), -1, len)
            .flags(SPLICE_NONBLOCK)
            .build()
            .user_data(t_out.encode());
        // SAFETY: no pointer; the sockets and the pipe stay open until both complete.
        unsafe { self.push_chain(&[e_in, e_out]) };
    }

    /// pipe → socket, for data left in the pipe by a short write.
    pub fn splice_out(&mut self, pipe_rd: RawFd, dst: Sock<'_>, len: u32, token: Token) {
        let e = opcode::Splice::new(Fd(pipe_rd), -1, Fixed(dst.index()), -1, len).flags(SPLICE_NONBLOCK).build();
        // SAFETY: as for `splice_pair`.
        unsafe { self.push(e.user_data(token.encode())) };
    }

    /// Multishot recv on a socket into the ring of receive buffers: one completion per chunk that
    /// came in, each naming the buffer it filled ([`Ring::received`]), until EOF, an error, a
    /// cancel, or the ring runs dry (-ENOBUFS).
    pub fn recv_multi(&mut self, sock: Sock<'_>, token: Token) {
        let Some(bufs) = &self.recv_bufs else { unreachable!("recv_multi without a ring of receive buffers") };
        let e = if self.io.bundle {
            // One completion for as many buffers as the data fills.
            opcode::RecvMultiBundle::new(Fixed(sock.index()), bufs.bgid).build()
        } else {
            opcode::RecvMulti::new(Fixed(sock.index()), bufs.bgid).build()
        };
        let e = e.user_data(token.encode());
        // SAFETY: no pointer: the kernel picks buffers from the registered ring, whose memory
        // lives until `Drop` (freed only once every buffer is back).
        unsafe { self.push(e) };
    }

    /// The first receive buffer a completion with `flags` and result `res` filled, now ours
    /// (with a bundle, the others follow from [`Ring::take_more`]); `None` if it names none.
    pub fn received(&mut self, flags: u32, res: i32) -> Option<RingBuf> {
        let bid = io_uring::cqueue::buffer_select(flags)?;
        let r = self.recv_bufs.as_mut()?;
        // Each buffer of a bundle is full but the last.
        let count = if res > 0 { (res as usize).div_ceil(r.size()) } else { 1 };
        Some(r.taken(bid, count))
    }

    /// The next buffer of the bundle the last [`Ring::received`] named, in order.
    pub fn take_more(&mut self) -> Option<RingBuf> {
        self.recv_bufs.as_mut().and_then(|r| r.take_more())
    }

    /// Gives back a completion's buffers: `first` and the rest of its bundle.
    pub fn give_filled(&mut self, first: RingBuf) {
        self.give_ring_buf(first);
        while let Some(b) = self.take_more() {
            self.give_ring_buf(b);
        }
    }

    /// The size of each receive buffer (0 without a ring of them).
    pub fn recv_buf_size(&self) -> usize {
        self.recv_bufs.as_ref().map_or(0, |r| r.size())
    }

    /// The bytes of a receive buffer we hold.
    pub fn ring_buf(&self, b: &RingBuf) -> &[u8] {
        match &self.recv_bufs {
            Some(r) => r.bytes(b),
            None => unreachable!("a RingBuf comes from the ring of receive buffers"),
        }
    }

    /// A pointer to byte `off` of a receive buffer we hold (for an iovec).
    pub fn ring_buf_ptr(&mut self, b: &RingBuf, off: usize) -> *const u8 {
        match &mut self.recv_bufs {
            Some(r) => r.ptr(b, off),
            None => unreachable!("a RingBuf comes from the ring of receive buffers"),
        }
    }

    /// Copies the first `len` bytes of receive buffer `src` to byte `at` of `dst` (both ours).
    pub fn append_ring_buf(&mut self, dst: &RingBuf, at: usize, src: &RingBuf, len: usize) {
        match &mut self.recv_bufs {
            Some(r) => r.append(dst, at, src, len),
            None => unreachable!("a RingBuf comes from the ring of receive buffers"),
        }
    }

    /// Gives a receive buffer back to the ring.
    pub fn give_ring_buf(&mut self, b: RingBuf) {
        if let Some(r) = self.recv_bufs.as_mut() {
            r.give_back(b);
        }
    }

    /// Whether the ring of receive buffers has buffers for a receive to take.
    pub fn ring_bufs_available(&self) -> bool {
        self.recv_bufs.as_ref().is_some_and(|r| !r.is_empty())
    }

    /// Receive buffers out (held by flows) and the most the worker may create.
    pub fn ring_bufs_out_of(&self) -> (usize, usize) {
        self.recv_bufs.as_ref().map_or((0, 1), |r| (r.out as usize, r.max()))
    }

    /// Receive buffers offered to the kernel now (as the completions seen so far tell).
    pub fn ring_bufs_offered(&self) -> u32 {
        self.recv_bufs.as_ref().map_or(0, |r| r.offered())
    }

    /// The receive buffers' slow path (once a second): see `BufRing::trim`.
    pub fn trim_recv_bufs(&mut self) {
        if let Some(r) = self.recv_bufs.as_mut() {
            // (Read here, in the worker's thread between two io_uring_enter: see `discard_offered`.)
            let head = r.kernel_head(&self.ring);
            r.trim(head);
        }
    }

    /// Bytes of the receive buffers' pages resident now (0 without a ring of them).
    pub fn recv_bufs_resident(&self) -> u64 {
        self.recv_bufs.as_ref().map_or(0, |r| r.resident() as u64)
    }

    /// A receive ended for want of a buffer (ENOBUFS): the ring offers more from now on.
    pub fn ring_bufs_short(&mut self) {
        if let Some(r) = self.recv_bufs.as_mut() {
            r.widen();
        }
    }

    /// sendmsg of the iovecs `msg` names, whole (MSG_WAITALL: the kernel waits for room, polling,
    /// without an io-wq thread); with `nowait`, what the socket takes now (MSG_DONTWAIT: io_uring
    /// completes it at once with the bytes sent, or -EAGAIN for none, instead of polling).
    ///
    /// # Safety
    /// `msg`, its iovec array and every buffer the iovecs point into stay valid and unchanged
    /// until this op's completion (the caller keeps them in the op's in-flight record).
    pub unsafe fn sendmsg(&mut self, sock: Sock<'_>, msg: *const libc::msghdr, nowait: bool, token: Token) {
        let how = if nowait { libc::MSG_DONTWAIT } else { libc::MSG_WAITALL };
        let e = opcode::SendMsg::new(Fixed(sock.index()), msg)
            .flags(how as u32 | libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(token.encode());
        // SAFETY: forwarded to the caller.
        unsafe { self.push(e) };
    }

    /// shutdown(SHUT_WR) on a socket: forwards an EOF.
    pub fn shutdown_write(&mut self, sock: Sock<'_>, token: Token) {
        // SAFETY: no pointer; the slot as for `poll_multi`.
        unsafe {
            self.push(opcode::Shutdown::new(Fixed(sock.index()), libc::SHUT_WR).build().user_data(token.encode()))
        };
    }
}

/// setsockopt(level, name, 1) on a direct socket.
fn opt_one(index: u32, level: libc::c_int, name: libc::c_int) -> io_uring::squeue::Entry {
    opcode::SetSockOpt::new(Fixed(index), level as u32, name as u32, (&raw const ONE).cast(), 4).build()
}

/// Decodes an AF_INET / AF_INET6 address written by the kernel (IPv4-mapped IPv6 as IPv4).
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
            // SAFETY: the kernel wrote a sockaddr_in at the start of this (larger, aligned) buffer.
            let v4: &libc::sockaddr_in = unsafe { &*(raw as *const libc::sockaddr_in6).cast() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(v4.sin_port))))
        }
        _ => None,
    }
}

/// The fallback's server socket: non-blocking, TCP_NODELAY, the backend's keepalive, the
/// `options` of `tune` (buffer sizes, TCP_NOTSENT_LOWAT), bound to `src` (with
/// IP_BIND_ADDRESS_NO_PORT, so the port is picked at connect time, per destination).
/// On failure, the chain step that would have failed and the error.
fn made_socket(
    dst: &socket2::SockAddr,
    src: Option<&socket2::SockAddr>,
    keepalive: Option<[i32; 3]>,
    options: &[crate::config::SockOpt],
) -> Result<socket2::Socket, (Op, std::io::Error)> {
    use socket2::{Domain, Socket, TcpKeepalive, Type};
    let domain = if dst.is_ipv6() { Domain::IPV6 } else { Domain::IPV4 };
    let sock = Socket::new(domain, Type::STREAM.nonblocking().cloexec(), None).map_err(|e| (Op::Socket, e))?;
    sock.set_tcp_nodelay(true).map_err(|e| (Op::NoDelay, e))?;
    if let Some([idle, interval, count]) = keepalive {
        let secs = |s: i32| std::time::Duration::from_secs(s as u64);
        let k = TcpKeepalive::new().with_time(secs(idle)).with_interval(secs(interval)).with_retries(count as u32);
        sock.set_tcp_keepalive(&k).map_err(|e| (Op::NoDelay, e))?;
    }
    for &(level, name, value) in options {
        crate::sys::set_int_option(&sock, level, name, value).map_err(|e| (Op::NoDelay, e))?;
    }
    if let Some(src) = src {
        crate::sys::set_bind_address_no_port(&sock).map_err(|e| (Op::BindNoPort, e))?;
        sock.bind(src).map_err(|e| (Op::Bind, e))?;
    }
    Ok(sock)
}
