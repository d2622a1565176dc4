//! The proxied connection, from accept to close.
//!
//! A connection is a client socket, a server socket once connected, and two [`Flow`]s (client →
//! server, server → client). Its life is a [`State`]; what it has in flight is a set of records
//! (`inflight.rs`) whose variants own what each operation lent the kernel. Every completion of a
//! connection's operation comes to one function, [`Ctx::on_completion`]: first the operation's
//! record gives back what it held ([`Conn::settle`], in every state), then the connection reacts
//! to what happened, by state. The code works on a [`Ctx`]: the connection's own entry plus the
//! per-worker pools it draws from, split-borrowed from the worker — never other connections.
//!
//! | state | holds | in flight | leaves for |
//! |---|---|---|---|
//! | `PeerName` | client slot, admission share (a PROXY-header slot with `accept_proxy`) | client poll; `Step::PeerName(PeerSlot)` | `ProxyHeader`, `Connecting`, `Queued` |
//! | `ProxyHeader` | client slot, a PROXY-header slot (the admission share once the header is all there) | client poll; `Step::HeaderPeek/HeaderRead(HeaderBuf)` or nothing (waiting for bytes) | `Admitting`, `Connecting`, `Queued` |
//! | `Admitting` | client slot, a PROXY-header slot, a place in the admission FIFO | client poll | `ProxyHeader` (admitted: the header is read) |
//! | `Queued` | client slot, admission share, a place in the backend's queue | client poll | `Connecting` |
//! | `Connecting` | + server slot, server/backend shares, a source port | client poll; `Step::Connect` (CONNECT, LINK_TIMEOUT) | `SendingProxy`, `Established`, `Connecting` (retry), `Queued` |
//! | `SendingProxy` | as `Connecting` | client poll; `Step::LocalAddr` or `Step::ProxySend(HeaderBuf)` | `Established` |
//! | `Established` | as `Connecting` | both polls; per flow one `FlowIo` (its buffer or pipe) | `Closing` |
//! | `Closing` | client slot, server slot (shares given back at once) | whatever was in flight, cancelled | free |
//!
//! Any state leaves for `Closing` (timeouts, resets, `shutdown_sessions`, drain deadline).
//! Invariants: an op's record is set when it is pushed and cleared only by its completion, so
//! "nothing in flight" ([`Conn::idle`]) means no completion will ever name this entry again; the
//! sockets are closed and the entry freed only then, so no op acts on a reused slot number, and
//! no buffer or pipe is given back while the kernel may use it. EOF read from one side becomes
//! shutdown(SHUT_WR) of the other once nothing is pending; an error on a socket closes both sides
//! with RST.

mod accept;
mod connect;
mod idle;
mod inflight;
mod moving;
mod pump;
mod sendq;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};

pub use inflight::{Flow, FlowIo, Half, Held, SpliceFds, Step};
pub use moving::{Moved, MovedState};
pub use sendq::{QueueLease, SendQueues};

use crate::config::Config;
use crate::log::ConnLog;
use crate::pipes::{PipeLease, PipePool};
use crate::stats::{FrontendStats, WorkerStats};
use crate::worker::ring::{ChunkBuf, ClientSlot, HeaderBuf, PeerSlot, Ring, ServerSlot};
use crate::worker::timer::{Links, TimerLink, TimerWheel};
use crate::worker::token::{GENERATION_MASK, Op, Token};
use crate::worker::upstream::Upstream;

pub(crate) use accept::{Known, ListenerInfo};
pub(crate) use pump::STALL_MS;

/// "No server / no source chosen" in the compact `u16` indices of a [`Conn`].
pub const NO_INDEX: u16 = u16::MAX;

pub(crate) const POLLIN_EVENTS: u32 = (libc::POLLIN | libc::POLLRDHUP) as u32;
pub(crate) const POLLOUT_EVENTS: u32 = libc::POLLOUT as u32;

/// Where a connection is in its life (the table in the module docs says what each state holds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum State {
    /// Slab entry not in use.
    #[default]
    Free,
    /// Accepted; looking up the client's address (needed by `balance source`, logs, PROXY).
    PeerName,
    /// Reading the client's PROXY protocol header (`accept_proxy`).
    ProxyHeader,
    /// Its PROXY header is all there (peeked, not consumed); waiting for a global or frontend
    /// maxconn share, in the worker's admission FIFO. No timer runs (as for a parked socket).
    Admitting,
    /// Waiting in the backend's queue for a server slot.
    Queued,
    /// The connect chain to a server is in flight.
    Connecting,
    /// Connected; sending the server our PROXY protocol header (`send_proxy`).
    SendingProxy,
    /// Both sockets open; bytes flow.
    Established,
    /// Cancelling what is in flight; the entry is freed when nothing is.
    Closing(CloseReason),
}

impl State {
    /// The state as `show conns` names it.
    pub fn name(self) -> &'static str {
        match self {
            State::Free => "free",
            State::PeerName => "peer_name",
            State::ProxyHeader => "proxy_header",
            State::Admitting => "admitting",
            State::Queued => "queued",
            State::Connecting => "connecting",
            State::SendingProxy => "sending_proxy",
            State::Established => "established",
            State::Closing(_) => "closing",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    ClientToServer,
    ServerToClient,
}

impl Dir {
    pub const BOTH: [Dir; 2] = [Dir::ClientToServer, Dir::ServerToClient];

    pub(crate) fn splice_in(self) -> Op {
        match self {
            Dir::ClientToServer => Op::SpliceInC2S,
            Dir::ServerToClient => Op::SpliceInS2C,
        }
    }
    pub(crate) fn splice_out(self) -> Op {
        match self {
            Dir::ClientToServer => Op::SpliceOutC2S,
            Dir::ServerToClient => Op::SpliceOutS2C,
        }
    }
    /// The poll that says the destination can take more.
    pub(crate) fn poll_out(self) -> Op {
        match self {
            Dir::ClientToServer => Op::ServerPollOut,
            Dir::ServerToClient => Op::ClientPollOut,
        }
    }
    pub(crate) fn recv(self) -> Op {
        match self {
            Dir::ClientToServer => Op::RecvC2S,
            Dir::ServerToClient => Op::RecvS2C,
        }
    }
    pub(crate) fn send(self) -> Op {
        match self {
            Dir::ClientToServer => Op::SendC2S,
            Dir::ServerToClient => Op::SendS2C,
        }
    }
    /// The completion a bulk flow posts itself to go on in the next loop turn.
    pub(crate) fn again(self) -> Op {
        match self {
            Dir::ClientToServer => Op::AgainC2S,
            Dir::ServerToClient => Op::AgainS2C,
        }
    }
    /// The op that forwards this direction's EOF: the descriptor install that precedes a
    /// shutdown by system call (`via_fd`), or a SHUTDOWN.
    pub(crate) fn shutdown(self, via_fd: bool) -> Op {
        match (self, via_fd) {
            (Dir::ClientToServer, false) => Op::ShutdownServer,
            (Dir::ServerToClient, false) => Op::ShutdownClient,
            (Dir::ClientToServer, true) => Op::ShutdownFdServer,
            (Dir::ServerToClient, true) => Op::ShutdownFdClient,
        }
    }
    /// The reset a failure to read this direction's source means.
    fn source_reset(self) -> CloseReason {
        match self {
            Dir::ClientToServer => CloseReason::ClientReset,
            Dir::ServerToClient => CloseReason::ServerReset,
        }
    }
    /// The reset a failure to write this direction's destination means.
    fn destination_reset(self) -> CloseReason {
        match self {
            Dir::ClientToServer => CloseReason::ServerReset,
            Dir::ServerToClient => CloseReason::ClientReset,
        }
    }
}

/// What an open connection holds of the limits checked at accept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Admission {
    /// Nothing (not open, or given back at close).
    #[default]
    None,
    /// A PROXY-header slot of its frontend (`accept_proxy`, until the header is all there):
    /// counted in `handshakes`, not in `active`.
    Handshake,
    /// The global (and frontend) maxconn shares: counted in `active`.
    Admitted,
}

/// Why a connection ends; decides graceful close versus RST and which counter moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseReason {
    /// Both directions finished.
    Done,
    ClientReset,
    ServerReset,
    ClientTimeout,
    ServerTimeout,
    QueueTimeout,
    /// No server could be reached within the retries.
    ConnectFailed,
    /// Engine shutdown after the drain timeout.
    Shutdown,
    /// The client's PROXY protocol header was malformed, oversized, or late.
    BadProxyHeader,
    /// The frontend's access list (`allow` / `deny`) refuses the client's address.
    Denied,
    /// Closed by the operator (`shutdown sessions server`, runtime API).
    Killed,
    /// Reached its frontend's `timeout.lifetime`.
    Lifetime,
    /// Refused at accept by its frontend's `maxconn_per_source` or `rate_per_source`.
    SourceLimit,
}

impl CloseReason {
    /// The termination cause as written in connection logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Done => "done",
            CloseReason::ClientReset => "client_reset",
            CloseReason::ServerReset => "server_reset",
            CloseReason::ClientTimeout => "client_timeout",
            CloseReason::ServerTimeout => "server_timeout",
            CloseReason::QueueTimeout => "queue_timeout",
            CloseReason::ConnectFailed => "connect_failed",
            CloseReason::Shutdown => "shutdown",
            CloseReason::BadProxyHeader => "bad_proxy_header",
            CloseReason::Denied => "denied",
            CloseReason::Killed => "killed",
            CloseReason::Lifetime => "lifetime",
            CloseReason::SourceLimit => "source_limit",
        }
    }

    /// Whether both sides are closed with RST (the other side of a reset learns of it as a reset).
    fn abortive(self) -> bool {
        matches!(self, CloseReason::ClientReset | CloseReason::ServerReset)
    }
}

/// A proxied connection's slab entry (kept small: with its timer link it is most of the
/// user-space cost of an idle connection; see docs/architecture.md).
#[derive(Debug, Default)]
pub struct Conn {
    pub generation: u32,
    pub state: State,
    /// The multishot POLLIN on each socket is armed.
    pub client_poll: bool,
    pub server_poll: bool,
    /// The multishot receive into the ring of receive buffers on each socket is armed
    /// (`splice: never`, once established).
    pub client_recv: bool,
    pub server_recv: bool,
    /// The client's receive was armed at accept, before a server was there: counted in the
    /// worker's `early_receives` until the connection is established or closes.
    pub early_recv: bool,
    /// On its way to another engine (reload): nothing new is armed; once nothing is in flight it
    /// is offered to the new engine's worker (worker/moving.rs).
    pub moving: bool,
    pub step: Step,
    pub c2s: Flow,
    pub s2c: Flow,
    pub client: Option<ClientSlot>,
    pub server_slot: Option<ServerSlot>,
    pub listener: u16,
    pub frontend: u16,
    pub backend: u16,
    pub server: u16,
    pub source: u16,
    /// Drawn at accept, it picks the connection's point in its frontend's `lifetime_jitter` (and
    /// moves with it on reload, so its end of life stays where it was).
    pub jitter: u16,
    /// When each direction's source last brought bytes (or the connection was accepted or moved
    /// in), client → server then server → client: the worker clock's ms, wrapping every 65 s. A
    /// message after [`crate::worker::QUIET_MS`] of nothing is a quiet one (`tune.batch_wait:
    /// auto`; one taken for busy after a silence of a multiple of 65 s only ends a window early).
    pub rx_ms: [u16; 2],
    pub attempts: u8,
    /// Its span of silence before it swaps its receives for polls is `idle_poll_after` times 2 to
    /// this (conn/idle.rs).
    pub idle_shift: u8,
    /// What it holds of the accept-time limits.
    pub admission: Admission,
    /// Making process descriptors of its sockets for splicing failed (the process's table is
    /// full): its bulk flows go on through receive buffers (`splice: auto`) or splice through
    /// io_uring (`always`). (The descriptors it has are in the worker's [`SpliceTable`].)
    pub fds_failed: bool,
    /// Holds backend and server shares and a source port.
    pub server_shares: bool,
    /// Counted in its frontend's per-source table (released when it closes).
    pub source_counted: bool,
    pub connect_timed_out: bool,
    /// Result of the connect chain: its first error, or 0.
    pub connect_result: i32,
    /// Servers already tried by this connection (bit `i % 64`).
    pub tried: u64,
    pub client_addr: Option<SocketAddr>,
    /// The address the client connected to, when known (from its PROXY header, or looked up for
    /// `send_proxy`).
    pub dest: Option<SocketAddr>,
    /// When the client was accepted (µs on the worker clock).
    pub t_accept_us: u64,
    /// From accept to the start of the last connect attempt, and that attempt's duration (µs).
    pub connect_after_us: u32,
    pub connect_took_us: u32,
    /// Bytes forwarded client→server and server→client.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Milliseconds on the worker clock: last traffic from each side, entry into the queue.
    pub last_client: u64,
    pub last_server: u64,
    pub queued_at: u64,
}

/// A completion, with what its operation held given back.
#[derive(Debug)]
pub(crate) enum Done {
    /// An event (or the end, `!more`) of a multishot POLLIN; `client` says which socket.
    Poll {
        client: bool,
        res: i32,
        more: bool,
    },
    PeerName {
        peer: PeerSlot,
        res: i32,
    },
    HeaderPeek {
        buf: HeaderBuf,
        res: i32,
    },
    HeaderRead {
        buf: HeaderBuf,
        res: i32,
    },
    /// A step of the connect chain failed (its result is recorded), or CONNECT / LINK_TIMEOUT
    /// completed with the other still to come: nothing to do yet.
    ConnectStep,
    /// CONNECT and LINK_TIMEOUT are both in: the chain is over (result in `connect_result`).
    Connected,
    LocalAddr {
        fd: Option<OwnedFd>,
    },
    ProxySent {
        buf: HeaderBuf,
        res: i32,
    },
    Recv {
        dir: Dir,
        buf: ChunkBuf,
        res: i32,
    },
    Send {
        dir: Dir,
        buf: ChunkBuf,
        off: u16,
        len: u16,
        res: i32,
    },
    /// The first half of a splice pair (the pipe stays in the record for the second).
    SpliceIn {
        dir: Dir,
        res: i32,
    },
    /// The last splice of a chunk: the pipe comes back with the bytes still in it.
    SpliceOut {
        dir: Dir,
        pipe: PipeLease,
        pending: u32,
        res: i32,
    },
    PollOut {
        dir: Dir,
        held: Held,
        res: i32,
    },
    /// The EOF of `dir` was forwarded: shutdown(SHUT_WR) completed (its result does not matter:
    /// a peer that reset is seen by the reads), or the descriptor it is to be done with was
    /// installed (`fd`), or that install failed (`retry`: forward it with a SHUTDOWN op).
    Shutdown {
        dir: Dir,
        fd: Option<OwnedFd>,
        retry: bool,
    },
    /// A completion of a multishot receive into the ring of receive buffers (`client` says which
    /// socket); the buffer it filled, if any, is taken from the ring by `on_completion`.
    Recvd {
        client: bool,
        res: i32,
        more: bool,
    },
    /// A `sendmsg` of a send queue completed: the queue comes back.
    RingSent {
        dir: Dir,
        lease: QueueLease,
        res: i32,
    },
    /// The POLLOUT a send queue waited on fired: the queue comes back.
    RingPollOut {
        dir: Dir,
        lease: QueueLease,
        res: i32,
    },
    /// A FIXED_FD_INSTALL for splicing completed (`client` says which socket): its descriptor,
    /// or `None` if it failed.
    SpliceFd {
        client: bool,
        fd: Option<OwnedFd>,
    },
    /// The completion a bulk flow posted itself to go on (`FlowIo::Again`).
    Again {
        dir: Dir,
    },
    /// A FIXED_FD_INSTALL of an export completed (`client` says which socket): its descriptor.
    Exported {
        client: bool,
        fd: Option<OwnedFd>,
    },
    /// Both MSG_RINGs of a move are in: `ok` when both sockets are in the other ring's table;
    /// `client`: the client's MSG_RING result when it succeeded.
    Moved {
        ok: bool,
        client: Option<u32>,
    },
}

impl Conn {
    pub fn flow(&mut self, dir: Dir) -> &mut Flow {
        match dir {
            Dir::ClientToServer => &mut self.c2s,
            Dir::ServerToClient => &mut self.s2c,
        }
    }

    /// When the connection reaches its frontend's `timeout.lifetime` (worker clock, ms), if it has
    /// one: its accept time plus the lifetime less this connection's part of the jitter.
    pub fn end_of_life(&self, cfg: &Config) -> Option<u64> {
        let life = cfg.frontends.get(self.frontend as usize)?.lifetime?;
        let key = self.t_accept_us ^ (u64::from(self.jitter) << 40);
        Some((self.t_accept_us / 1000).saturating_add(life.of(key)))
    }

    pub fn is_closing(&self) -> bool {
        matches!(self.state, State::Closing(_))
    }

    /// Its last traffic from either side (worker clock, ms).
    pub fn last_traffic(&self) -> u64 {
        self.last_client.max(self.last_server)
    }

    pub fn is_live(&self) -> bool {
        self.state != State::Free
    }

    /// Nothing in flight: no completion will name this connection again.
    pub fn idle(&self) -> bool {
        !self.client_poll
            && !self.server_poll
            && !self.client_recv
            && !self.server_recv
            && matches!(self.step, Step::Idle)
            && !self.c2s.io.busy()
            && !self.s2c.io.busy()
    }

    /// The operations to cancel when closing: one per record that has one in flight (9 at most).
    fn cancel_targets(&self) -> impl Iterator<Item = Op> {
        let watchers = [
            self.client_poll.then_some(Op::ClientPoll),
            self.server_poll.then_some(Op::ServerPoll),
            self.client_recv.then_some(Op::ClientRecv),
            self.server_recv.then_some(Op::ServerRecv),
        ];
        let [a, b] = self.c2s.io.cancel_targets(Dir::ClientToServer);
        let [c, d] = self.s2c.io.cancel_targets(Dir::ServerToClient);
        watchers.into_iter().chain([self.step.cancel_target(), a, b, c, d]).flatten()
    }

    /// Takes the completion of `op` out of its record: the record is cleared (or, for the first
    /// half of a splice pair or one of CONNECT / LINK_TIMEOUT, advanced) and what it owned comes
    /// back in the [`Done`]. `None`: nothing of this kind was in flight (a kernel or programming
    /// error; the caller counts it).
    pub(crate) fn settle(&mut self, op: Op, res: i32, more: bool) -> Option<Done> {
        // The descriptor FIXED_FD_INSTALL made is ours the moment it exists, whatever happens next.
        if matches!(op, Op::ShutdownFdServer | Op::ShutdownFdClient) {
            // SAFETY: as below.
            let fd = (res >= 0).then(|| unsafe { OwnedFd::from_raw_fd(res) });
            let dir = if op == Op::ShutdownFdServer { Dir::ClientToServer } else { Dir::ServerToClient };
            // (A record that is not this install's cannot happen; the descriptor is closed as it
            // is dropped.)
            return self.take_flow(dir, |io| match io {
                FlowIo::Shutdown { via_fd: true } => Ok(Done::Shutdown { dir, retry: fd.is_none(), fd }),
                io => Err(io),
            });
        }
        if matches!(op, Op::ExportClient | Op::ExportServer | Op::SpliceFdClient | Op::SpliceFdServer) {
            // SAFETY: as below.
            let fd = (res >= 0).then(|| unsafe { OwnedFd::from_raw_fd(res) });
            let export = matches!(op, Op::ExportClient | Op::ExportServer);
            let client = matches!(op, Op::ExportClient | Op::SpliceFdClient);
            // The step of this pair of installs, with the flag of this one.
            let mine = match &mut self.step {
                Step::Export { client: c, server: s } if export => {
                    if client {
                        c
                    } else {
                        s
                    }
                }
                Step::SpliceFds { client: c, server: s } if !export => {
                    if client {
                        c
                    } else {
                        s
                    }
                }
                _ => return None,
            };
            if !*mine {
                // (Cannot happen; the descriptor is closed as it is dropped.)
                return None;
            }
            *mine = false;
            if matches!(
                self.step,
                Step::Export { client: false, server: false } | Step::SpliceFds { client: false, server: false }
            ) {
                self.step = Step::Idle;
            }
            return Some(if export { Done::Exported { client, fd } } else { Done::SpliceFd { client, fd } });
        }
        if op == Op::LocalAddr {
            // SAFETY: a non-negative result of FIXED_FD_INSTALL is a new descriptor nothing else owns.
            let fd = (res >= 0).then(|| unsafe { OwnedFd::from_raw_fd(res) });
            return match std::mem::take(&mut self.step) {
                Step::LocalAddr => Some(Done::LocalAddr { fd }),
                other => {
                    self.step = other;
                    None
                }
            };
        }
        let dir = match op {
            Op::RecvC2S
            | Op::SendC2S
            | Op::SpliceInC2S
            | Op::SpliceOutC2S
            | Op::ServerPollOut
            | Op::ShutdownServer
            | Op::AgainC2S => Dir::ClientToServer,
            _ => Dir::ServerToClient,
        };
        match op {
            Op::ClientPoll | Op::ServerPoll => {
                let client = op == Op::ClientPoll;
                let armed = if client { &mut self.client_poll } else { &mut self.server_poll };
                if !*armed {
                    return None;
                }
                *armed = more;
                Some(Done::Poll { client, res, more })
            }
            Op::PeerName => self.take_step(|s| match s {
                Step::PeerName(peer) => Ok(Done::PeerName { peer, res }),
                s => Err(s),
            }),
            Op::HeaderPeek => self.take_step(|s| match s {
                Step::HeaderPeek(buf) => Ok(Done::HeaderPeek { buf, res }),
                s => Err(s),
            }),
            Op::HeaderRead => self.take_step(|s| match s {
                Step::HeaderRead(buf) => Ok(Done::HeaderRead { buf, res }),
                s => Err(s),
            }),
            Op::ProxySend => self.take_step(|s| match s {
                Step::ProxySend(buf) => Ok(Done::ProxySent { buf, res }),
                s => Err(s),
            }),
            Op::Socket | Op::NoDelay | Op::BindNoPort | Op::Bind => {
                // A SKIP_SUCCESS step posts only a failure, always before CONNECT's completion.
                if !matches!(self.step, Step::Connect { connect: true, .. }) {
                    return None;
                }
                self.record_connect_error(res);
                Some(Done::ConnectStep)
            }
            Op::Connect | Op::ConnectTimeout => {
                let Step::Connect { connect, timeout } = &mut self.step else { return None };
                let mine = if op == Op::Connect { connect } else { timeout };
                if !*mine {
                    return None;
                }
                *mine = false;
                if op == Op::ConnectTimeout {
                    self.connect_timed_out |= res == -libc::ETIME;
                } else if res == -libc::ECANCELED && self.connect_result == 0 {
                    // Cancelled by its link timeout (or by a close): it did not connect.
                    self.connect_result = -libc::ETIMEDOUT;
                } else {
                    self.record_connect_error(res);
                }
                if matches!(self.step, Step::Connect { connect: false, timeout: false }) {
                    self.step = Step::Idle;
                    Some(Done::Connected)
                } else {
                    Some(Done::ConnectStep)
                }
            }
            Op::RecvC2S | Op::RecvS2C => self.take_flow(dir, |io| match io {
                FlowIo::Recv(buf) => Ok(Done::Recv { dir, buf, res }),
                io => Err(io),
            }),
            Op::SendC2S | Op::SendS2C => self.take_flow(dir, |io| match io {
                FlowIo::Send { buf, off, len } => Ok(Done::Send { dir, buf, off, len, res }),
                FlowIo::Ring(lease) => Ok(Done::RingSent { dir, lease, res }),
                io => Err(io),
            }),
            Op::ClientRecv | Op::ServerRecv => {
                let client = op == Op::ClientRecv;
                let armed = if client { &mut self.client_recv } else { &mut self.server_recv };
                if !*armed {
                    return None;
                }
                *armed = more;
                Some(Done::Recvd { client, res, more })
            }
            Op::SpliceInC2S | Op::SpliceInS2C => {
                let FlowIo::Splice { pending, first, .. } = &mut self.flow(dir).io else { return None };
                if !*first {
                    return None;
                }
                *first = false;
                *pending += res.max(0) as u32;
                Some(Done::SpliceIn { dir, res })
            }
            Op::SpliceOutC2S | Op::SpliceOutS2C => self.take_flow(dir, |io| match io {
                FlowIo::Splice { pipe, pending, first: false } | FlowIo::SpliceOut { pipe, pending } => {
                    let pending = pending.saturating_sub(res.max(0) as u32);
                    Ok(Done::SpliceOut { dir, pipe, pending, res })
                }
                io => Err(io),
            }),
            Op::ClientPollOut | Op::ServerPollOut => self.take_flow(dir, |io| match io {
                FlowIo::PollOutBuf { buf, off, len } => {
                    Ok(Done::PollOut { dir, held: Held::Buf { buf, off, len }, res })
                }
                FlowIo::PollOutPipe { pipe, pending } => {
                    Ok(Done::PollOut { dir, held: Held::Pipe { pipe, pending }, res })
                }
                FlowIo::RingPollOut { lease, .. } => Ok(Done::RingPollOut { dir, lease, res }),
                io => Err(io),
            }),
            Op::ShutdownServer | Op::ShutdownClient => self.take_flow(dir, |io| match io {
                FlowIo::Shutdown { via_fd: false } => Ok(Done::Shutdown { dir, fd: None, retry: false }),
                io => Err(io),
            }),
            Op::MoveClient | Op::MoveServer => {
                let Step::Move { client, server, failed, slot } = &mut self.step else { return None };
                let mine = if op == Op::MoveClient { client } else { server };
                if !*mine {
                    return None;
                }
                *mine = false;
                *failed |= res < 0;
                if op == Op::MoveClient && res >= 0 {
                    *slot = res as u32;
                }
                if let Step::Move { client: false, server: false, failed, slot } = self.step {
                    self.step = Step::Idle;
                    Some(Done::Moved { ok: !failed, client: (slot != u32::MAX).then_some(slot) })
                } else {
                    Some(Done::ConnectStep)
                }
            }
            Op::AgainC2S | Op::AgainS2C => self.take_flow(dir, |io| match io {
                FlowIo::Again => Ok(Done::Again { dir }),
                io => Err(io),
            }),
            Op::LocalAddr
            | Op::ExportClient
            | Op::ExportServer
            | Op::ShutdownFdServer
            | Op::ShutdownFdClient
            | Op::SpliceFdClient
            | Op::SpliceFdServer => {
                unreachable!("handled above")
            }
            Op::Cancel | Op::Accept | Op::AcceptCancel | Op::Wake | Op::CloseFixed | Op::Linger | Op::SendZc => None,
        }
    }

    fn take_step(&mut self, f: impl FnOnce(Step) -> Result<Done, Step>) -> Option<Done> {
        match f(std::mem::take(&mut self.step)) {
            Ok(done) => Some(done),
            Err(step) => {
                self.step = step;
                None
            }
        }
    }

    fn take_flow(&mut self, dir: Dir, f: impl FnOnce(FlowIo) -> Result<Done, FlowIo>) -> Option<Done> {
        let io = &mut self.flow(dir).io;
        match f(std::mem::take(io)) {
            Ok(done) => Some(done),
            Err(back) => {
                *io = back;
                None
            }
        }
    }

    fn record_connect_error(&mut self, res: i32) {
        if res < 0 && res != -libc::ECANCELED && self.connect_result == 0 {
            self.connect_result = res;
        }
    }
}

/// The sockets of the connections that splice on the worker's thread, as process descriptors, by
/// slab index: beside the entries (most connections never have them, and an idle connection's
/// entry is kept small). An entry goes when its connection closes or leaves (`release_fds`).
pub type SpliceTable = std::collections::HashMap<u32, SpliceFds>;

/// The connections' timer links, beside (not inside) the entries, so a connection's context can
/// hold its own entry and the wheel's links at once.
#[derive(Default)]
pub struct LinkTable(Vec<TimerLink>);

impl Links for LinkTable {
    fn link(&mut self, index: u32) -> &mut TimerLink {
        &mut self.0[index as usize]
    }
}

/// The connection table: a slab with generations, so stale completions are recognised.
#[derive(Default)]
pub struct Slab {
    entries: Vec<Conn>,
    links: LinkTable,
    free: Vec<u32>,
    pub live: usize,
}

impl Slab {
    pub fn with_capacity(n: usize) -> Slab {
        Slab { entries: Vec::with_capacity(n), links: LinkTable(Vec::with_capacity(n)), free: Vec::new(), live: 0 }
    }

    /// A free entry's index (its state is still `Free`: the caller opens it).
    pub fn insert(&mut self) -> u32 {
        self.live += 1;
        match self.free.pop() {
            Some(i) => i,
            None => {
                self.entries.push(Conn::default());
                self.links.0.push(TimerLink::default());
                (self.entries.len() - 1) as u32
            }
        }
    }

    /// The entry at `index` if it is live and of `generation` (24-bit compare).
    pub fn get(&mut self, index: u32, generation: u32) -> Option<&mut Conn> {
        let c = self.entries.get_mut(index as usize)?;
        (c.is_live() && c.generation & GENERATION_MASK == generation).then_some(c)
    }

    /// As [`Slab::get`], read-only.
    pub fn peek(&self, index: u32, generation: u32) -> Option<&Conn> {
        let c = self.entries.get(index as usize)?;
        (c.is_live() && c.generation & GENERATION_MASK == generation & GENERATION_MASK).then_some(c)
    }

    pub fn at(&mut self, index: u32) -> &mut Conn {
        &mut self.entries[index as usize]
    }

    /// The entry at `index`, read-only, whatever its state.
    pub fn entry(&self, index: u32) -> &Conn {
        &self.entries[index as usize]
    }

    /// The entry and the timer links, borrowed together.
    pub(crate) fn split(&mut self, index: u32) -> (&mut Conn, &mut LinkTable) {
        (&mut self.entries[index as usize], &mut self.links)
    }

    pub(crate) fn links(&mut self) -> &mut LinkTable {
        &mut self.links
    }

    /// Takes back entry `index` if its connection finished since it had `generation` (finishing
    /// moves the entry to the next generation).
    pub(crate) fn reclaim_if_finished(&mut self, index: u32, generation: u32) {
        if self.entries[index as usize].generation != generation {
            debug_assert!(!self.entries[index as usize].is_live());
            debug_assert!(!self.links.0[index as usize].is_filed(), "a freed connection is still in the timer wheel");
            self.free.push(index);
            self.live -= 1;
        }
    }

    /// Entries, live or free (indices `0..slots`).
    pub fn slots(&self) -> usize {
        self.entries.len()
    }

    /// Indices of live entries (slow path: drain and shutdown).
    pub fn live_indices(&self) -> Vec<u32> {
        (0..self.entries.len() as u32).filter(|&i| self.entries[i as usize].is_live()).collect()
    }

    /// The worker is going away after its ring failed: entries still live hold handles the
    /// kernel may still use; they are forgotten (leaked), never dropped into a pool.
    pub(crate) fn abandon(&mut self) {
        for c in self.entries.drain(..) {
            if c.is_live() {
                std::mem::forget(c);
            }
        }
    }
}

/// Work a connection's transition leaves for the worker, because it concerns other connections
/// (run by the worker right after the transition, in the same loop turn).
#[derive(Default)]
pub(crate) struct Followups {
    /// Backends where a server slot, share or source was given back: serve their queues.
    pub queues: Vec<u16>,
    /// A global or frontend share was given back: admit parked sockets, re-arm accepts.
    pub admission: bool,
    /// A move's MSG_RINGs are in: `true` when both sockets reached the other ring and the
    /// connection is still open (the move completes), `false` otherwise (it is called off); and
    /// the client MSG_RING's result when it succeeded.
    pub moved: Option<(bool, Option<u32>)>,
    /// An export's FIXED_FD_INSTALL completed: which socket, and its descriptor (`None`: it
    /// failed, or the connection is closing).
    pub exported: Option<(bool, Option<OwnedFd>)>,
}

impl Followups {
    fn queue(&mut self, backend: u16) {
        if !self.queues.contains(&backend) {
            self.queues.push(backend);
        }
    }
}

/// The workers' clock: CLOCK_MONOTONIC (time since boot), the same in every worker of every
/// engine and process, so a connection's times (accept, last traffic, queue entry) stay right
/// when it moves to another engine's worker.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Clock {
    pub ms: u64,
    pub us: u64,
}

impl Clock {
    pub fn now() -> Clock {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid timespec the call writes; CLOCK_MONOTONIC always exists.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let us = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000;
        Clock { ms: us / 1000, us }
    }
}

/// One connection's context: its entry and what its transitions may touch, split-borrowed from
/// the worker for the length of one transition.
pub(crate) struct Ctx<'w> {
    pub idx: u32,
    pub c: &'w mut Conn,
    pub links: &'w mut LinkTable,
    pub timers: &'w mut TimerWheel,
    pub ring: &'w mut Ring,
    pub pipes: &'w mut PipePool,
    /// Send queues of the receive-buffer path (`splice: never`).
    pub sendq: &'w mut SendQueues,
    /// The process descriptors of connections that splice on the worker's thread.
    pub fds: &'w mut SpliceTable,
    /// Flows waiting for a pipe or a buffer: (index, generation, direction).
    pub waiters: &'w mut VecDeque<(u32, u32, Dir)>,
    pub up: &'w mut Upstream,
    /// Connections waiting for an admission share once their PROXY header is there (FIFO).
    pub admitting: &'w mut VecDeque<(u32, u32)>,
    pub stats: &'w mut WorkerStats,
    pub cfg: &'w Config,
    pub listeners: &'w [ListenerInfo],
    pub log: Option<&'w mut ConnLog>,
    pub worker: usize,
    pub now: Clock,
    pub follow: &'w mut Followups,
    /// `splice: auto`: the worker's bulk flows splice now (else they stay on the receive
    /// buffers; worker/bulkpath.rs measures which costs less).
    pub splice_bulk: bool,
}

impl Ctx<'_> {
    /// The counters of this connection's frontend (the worker's totals are their sum).
    fn fe_stats(&mut self) -> &mut FrontendStats {
        &mut self.stats.frontends[self.c.frontend as usize]
    }

    /// Counts this connection in (`true`) or out of the gauge its admission `a` stands for:
    /// its frontend's `active` (maxconn shares) or `handshakes` (a PROXY-header slot).
    fn count_admission(&mut self, a: Admission, into: bool) {
        let f = self.fe_stats();
        let gauge = match a {
            Admission::None => return,
            Admission::Handshake => &mut f.handshakes,
            Admission::Admitted => &mut f.active,
        };
        if into {
            *gauge += 1;
        } else {
            *gauge -= 1;
        }
    }

    /// A token for an op of this connection.
    fn token(&self, op: Op) -> Token {
        debug_assert!(self.c.is_live(), "an op pushed for a freed connection");
        Token::conn(op, self.idx, self.c.generation)
    }

    /// Cancels this connection's op `op` (in flight: its own completion still comes).
    fn cancel(&mut self, op: Op) {
        let target = self.in_flight_token(op);
        self.ring.cancel(target, Token::worker(Op::Cancel, self.idx));
    }

    /// The `user_data` op `op` of this connection went with: its token, or for a zero-copy
    /// send that of the ring's record of it (ring/zerocopy.rs).
    fn in_flight_token(&mut self, op: Op) -> Token {
        let dir = match op {
            Op::SendC2S => Dir::ClientToServer,
            Op::SendS2C => Dir::ServerToClient,
            _ => return self.token(op),
        };
        match &self.c.flow(dir).io {
            FlowIo::Ring(l) => match self.sendq.zerocopy_in_flight(l) {
                Some(send) => send,
                None => self.token(op),
            },
            _ => self.token(op),
        }
    }

    /// Moves to `next`, keeping the gauges that count states (`queued`, `closing`); `active` and
    /// `handshakes` follow what the connection holds (`Admission`).
    fn enter(&mut self, next: State) {
        let prev = self.c.state;
        if prev == next {
            return;
        }
        if prev == State::Queued {
            self.stats.queued -= 1;
        }
        if next == State::Queued {
            self.stats.queued += 1;
            self.stats.queued_total += 1;
        }
        match (prev, next) {
            (State::Closing(_), State::Free) => self.stats.closing -= 1,
            (_, State::Closing(_)) => self.stats.closing += 1,
            _ => {}
        }
        if matches!(next, State::Established | State::Closing(_) | State::Free)
            && std::mem::take(&mut self.c.early_recv)
        {
            self.stats.early_receives -= 1;
        }
        self.c.state = next;
    }

    /// Every completion of this connection's operations: the one transition function.
    pub(crate) fn on_completion(&mut self, op: Op, res: i32, more: bool, flags: u32) {
        // A receive into the ring of receive buffers hands a buffer (a bundle: several) over with
        // its completion, whatever else happens: ours from here.
        let filled = if matches!(op, Op::ClientRecv | Op::ServerRecv) { self.ring.received(flags, res) } else { None };
        let Some(done) = self.c.settle(op, res, more) else {
            if let Some(b) = filled {
                self.ring.give_filled(b);
            }
            self.stats.unexpected_completions += 1;
            return;
        };
        if self.c.is_closing() {
            if let Some(b) = filled {
                self.ring.give_filled(b);
            }
            self.absorb(done);
            self.finish_if_idle();
            return;
        }
        match done {
            Done::Poll { client, res, more } => self.on_poll(client, res, more),
            Done::PeerName { peer, res } => {
                let addr = self.ring.take_peer(peer, res);
                self.on_peer_name(addr);
            }
            Done::HeaderPeek { buf, res } => self.on_header_peek(buf, res),
            Done::HeaderRead { buf, res } => self.on_header_read(buf, res),
            Done::ConnectStep => {}
            Done::Connected => self.on_connect_done(),
            Done::LocalAddr { fd } => self.on_local_addr(fd),
            Done::ProxySent { buf, res } => self.on_proxy_sent(buf, res),
            Done::Recv { dir, buf, res } => self.on_recv(dir, buf, res),
            Done::Send { dir, buf, off, len, res } => self.on_send(dir, buf, off, len, res),
            Done::SpliceIn { dir, res } => self.on_splice_in(dir, res),
            Done::SpliceOut { dir, pipe, pending, res } => self.on_splice_out(dir, pipe, pending, res),
            Done::PollOut { dir, held, res } => self.on_poll_out(dir, held, res),
            Done::Shutdown { dir, fd, retry } => self.on_shutdown(dir, fd, retry),
            Done::Recvd { client, res, more } => self.on_recvd(client, res, more, filled),
            Done::RingSent { dir, lease, res } => self.on_ring_sent(dir, lease, res),
            Done::RingPollOut { dir, lease, res } => self.on_ring_poll_out(dir, lease, res),
            Done::SpliceFd { client, fd } => self.on_splice_fd(client, fd),
            Done::Again { dir } => {
                self.pump(dir);
                self.check_done();
            }
            Done::Moved { ok, client } => self.follow.moved = Some((ok, client)),
            Done::Exported { client, fd } => self.follow.exported = Some((client, fd)),
        }
    }

    /// A completion that arrived while closing: give back what its op held.
    fn absorb(&mut self, done: Done) {
        match done {
            Done::PeerName { peer, res } => {
                self.c.client_addr = self.ring.take_peer(peer, res).or(self.c.client_addr);
            }
            Done::HeaderPeek { buf, .. } | Done::HeaderRead { buf, .. } | Done::ProxySent { buf, .. } => {
                self.ring.give_header(buf)
            }
            Done::Recv { buf, .. } | Done::Send { buf, .. } => self.ring.give_chunk(buf),
            Done::SpliceOut { pipe, pending, .. } => self.pipes.give_back(pipe, pending),
            Done::PollOut { held, .. } => self.give_back_held(held),
            Done::RingSent { lease, .. } | Done::RingPollOut { lease, .. } => self.sendq.give_back(lease, self.ring),
            // The descriptor is closed here, as it is dropped.
            Done::LocalAddr { fd } => drop(fd),
            // Closing while moving: whatever reached the other ring is taken back there.
            Done::Moved { client, .. } => self.follow.moved = Some((false, client)),
            // Closing while exporting: the descriptor is closed as it is dropped; the worker calls
            // the export off.
            Done::Exported { client, fd } => {
                drop(fd);
                self.follow.exported = Some((client, None));
            }
            // Closing: the close of the socket sends the FIN (or the RST) the shutdown was for;
            // the installed descriptor is closed as it is dropped, before that close.
            Done::Shutdown { fd, .. } => drop(fd),
            // Closing: a descriptor for splicing is given up (closed as dropped; the others
            // were at the close).
            Done::SpliceFd { fd, .. } => {
                drop(fd);
                self.stats.splice_fds -= 1;
            }
            Done::Poll { .. }
            | Done::ConnectStep
            | Done::Connected
            | Done::SpliceIn { .. }
            | Done::Recvd { .. }
            | Done::Again { .. } => {}
        }
    }

    fn give_back_held(&mut self, held: Held) {
        match held {
            Held::Buf { buf, .. } => self.ring.give_chunk(buf),
            Held::Pipe { pipe, pending } => self.pipes.give_back(pipe, pending),
        }
    }

    /// Starts closing: gives back shares and the source port, cancels what is in flight; the
    /// entry is freed once nothing is.
    pub(crate) fn close(&mut self, reason: CloseReason) {
        if !self.c.is_live() || self.c.is_closing() {
            return;
        }
        self.enter(State::Closing(reason));
        self.timers.cancel(self.idx, self.links);
        let f = self.fe_stats();
        f.closed += 1;
        match reason {
            CloseReason::ClientReset => f.resets_from_client += 1,
            CloseReason::ServerReset => f.resets_from_server += 1,
            CloseReason::ClientTimeout => f.timeouts.client += 1,
            CloseReason::ServerTimeout => f.timeouts.server += 1,
            CloseReason::QueueTimeout => f.timeouts.queue += 1,
            CloseReason::ConnectFailed => f.failed += 1,
            CloseReason::BadProxyHeader => f.proxy_header_errors += 1,
            CloseReason::Denied => f.denied += 1,
            CloseReason::Killed => f.killed += 1,
            CloseReason::Lifetime => f.lifetime_ends += 1,
            CloseReason::SourceLimit => {}
            CloseReason::Done | CloseReason::Shutdown => {}
        }
        self.release_server();
        self.release_admission();
        self.release_source();
        // Only this thread's system calls use them, and none will now.
        self.release_fds();
        for dir in Dir::BOTH {
            // (A swapped receive's poll is cancelled below with the rest.)
            self.end_idle_poll(dir);
            // A flow waiting for a pipe holds nothing; its place in the FIFO goes stale.
            if matches!(self.c.flow(dir).io, FlowIo::Waiting) {
                self.c.flow(dir).io = FlowIo::Idle;
            }
        }
        self.drop_unsent();
        // (Copied out: the cancels below borrow the connection.)
        let mut targets = [None; 9];
        for (slot, op) in targets.iter_mut().zip(self.c.cancel_targets()) {
            *slot = Some(op);
        }
        for op in targets.into_iter().flatten() {
            if reason == CloseReason::Done
                && matches!(op, Op::ShutdownServer | Op::ShutdownClient | Op::ShutdownFdServer | Op::ShutdownFdClient)
            {
                // A graceful end waits for the FIN it is sending rather than race it.
                continue;
            }
            self.cancel(op);
        }
        self.finish_if_idle();
    }

    /// Frees a closing connection once nothing is in flight: closes both sockets (RST for a
    /// reset), writes its log line, and marks the entry free for the slab.
    fn finish_if_idle(&mut self) {
        let State::Closing(reason) = self.c.state else { return };
        if !self.c.idle() {
            return;
        }
        let rst = reason.abortive();
        if let Some(client) = self.c.client.take() {
            self.ring.close_client(client, rst);
        }
        if let Some(server) = self.c.server_slot.take() {
            // (On a socket that never connected, SO_LINGER changes nothing.)
            self.ring.close_server(server, rst);
        }
        if let Some(log) = self.log.as_deref_mut() {
            let source = self.up.source_ip(self.c);
            log.line(self.worker, self.cfg, self.c, reason, source, self.now.us, self.now.ms);
        }
        self.unname_server();
        self.enter(State::Free);
        debug_assert!(!self.fds.contains_key(&self.idx), "descriptors for splicing outlive their connection's close");
        let generation = self.c.generation.wrapping_add(1);
        *self.c = Conn { generation, ..Conn::default() };
    }

    /// Closes the descriptors made for splicing, if any (the sockets stay open by their direct
    /// descriptors).
    pub(crate) fn release_fds(&mut self) {
        if let Some(fds) = self.fds.remove(&self.idx) {
            self.stats.splice_fds -= fds.count();
        }
    }

    /// Makes sure the connection's earliest deadline is in the timer wheel.
    pub(crate) fn ensure_timer(&mut self) {
        let Some(deadline) = self.deadline() else { return };
        let t = *self.links.link(self.idx);
        if !t.is_filed() || deadline < t.deadline {
            self.timers.schedule(self.idx, deadline, self.links);
        }
    }

    /// The connection's next deadline, by state.
    fn deadline(&self) -> Option<u64> {
        let c = &*self.c;
        let fe = &self.cfg.frontends[c.frontend as usize];
        let be = &self.cfg.backends[c.backend as usize];
        let client = c.last_client.saturating_add(fe.client_timeout.as_millis() as u64);
        match c.state {
            State::PeerName | State::Connecting | State::SendingProxy => Some(client),
            // Admitted after waiting (`Admitting`): the header is all there, only being read.
            State::ProxyHeader if c.admission == Admission::Admitted => Some(client),
            State::ProxyHeader => {
                Some((c.t_accept_us / 1000).saturating_add(fe.proxy_header_timeout.as_millis() as u64))
            }
            State::Queued => Some(c.queued_at.saturating_add(be.queue_timeout.as_millis() as u64)),
            State::Established => {
                let idle = client.min(c.last_server.saturating_add(be.server_timeout.as_millis() as u64));
                let idle = self.idle_poll_at().map_or(idle, |at| idle.min(at));
                Some(self.end_of_life().map_or(idle, |end| idle.min(end)))
            }
            State::Admitting | State::Closing(_) | State::Free => None,
        }
    }

    fn end_of_life(&self) -> Option<u64> {
        self.c.end_of_life(self.cfg)
    }

    /// The connection's timer entry fired (the wheel has already unfiled it).
    pub(crate) fn on_timer(&mut self) {
        if self.idle_poll_at().is_some_and(|at| at <= self.now.ms) {
            self.start_idle_poll();
        }
        let Some(deadline) = self.deadline() else { return };
        if deadline > self.now.ms {
            // Activity moved the deadline since the entry was filed.
            self.ensure_timer();
            return;
        }
        let c = &*self.c;
        let client_timeout = self.cfg.frontends[c.frontend as usize].client_timeout.as_millis() as u64;
        let reason = match c.state {
            State::Queued => CloseReason::QueueTimeout,
            State::ProxyHeader => CloseReason::BadProxyHeader,
            State::Established if self.end_of_life().is_some_and(|end| end <= self.now.ms) => CloseReason::Lifetime,
            State::Established if c.last_client.saturating_add(client_timeout) <= self.now.ms => {
                CloseReason::ClientTimeout
            }
            State::Established => CloseReason::ServerTimeout,
            _ => CloseReason::ClientTimeout,
        };
        self.close(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_connection_entry_is_small() {
        // The slab entry (and its timer link) is the bulk of an idle connection's user-space
        // memory (docs/architecture.md).
        let entry = std::mem::size_of::<Conn>() + std::mem::size_of::<TimerLink>();
        assert!(entry <= 248, "Conn is {} bytes + a {}-byte timer link", std::mem::size_of::<Conn>(), 24);
    }

    #[test]
    fn slab_generations_reject_stale_tokens() {
        let mut s = Slab::with_capacity(4);
        let a = s.insert();
        s.at(a).state = State::PeerName;
        let g = s.at(a).generation;
        assert!(s.get(a, g).is_some());
        let c = s.at(a);
        *c = Conn { generation: g + 1, ..Conn::default() };
        s.reclaim_if_finished(a, g);
        let b = s.insert();
        assert_eq!(a, b, "slot reused");
        s.at(b).state = State::PeerName;
        assert!(s.get(b, g).is_none(), "old generation is stale");
        assert_eq!(s.live, 1);
    }

    #[test]
    fn a_connect_chain_settles_only_when_connect_and_its_timeout_are_both_in() {
        let mut c =
            Conn { state: State::Connecting, step: Step::Connect { connect: true, timeout: true }, ..Conn::default() };
        // A failed setup step (SKIP_SUCCESS) comes first and holds nothing.
        assert!(matches!(c.settle(Op::Bind, -libc::EADDRNOTAVAIL, false), Some(Done::ConnectStep)));
        assert!(matches!(c.settle(Op::Connect, -libc::ECANCELED, false), Some(Done::ConnectStep)));
        assert!(c.settle(Op::Connect, 0, false).is_none(), "CONNECT completes once");
        assert!(matches!(c.settle(Op::ConnectTimeout, -libc::ECANCELED, false), Some(Done::Connected)));
        assert!(c.idle());
        assert_eq!(c.connect_result, -libc::EADDRNOTAVAIL, "the first error is the one that counts");
        assert!(c.settle(Op::Socket, -libc::EMFILE, false).is_none(), "no chain in flight any more");
    }

    #[test]
    fn a_multishot_poll_stays_in_flight_until_its_last_completion() {
        let mut c = Conn { state: State::Established, client_poll: true, ..Conn::default() };
        assert!(matches!(c.settle(Op::ClientPoll, 1, true), Some(Done::Poll { client: true, more: true, .. })));
        assert!(!c.idle());
        assert!(matches!(c.settle(Op::ClientPoll, -libc::ECANCELED, false), Some(Done::Poll { more: false, .. })));
        assert!(c.idle());
        assert!(c.settle(Op::ClientPoll, 1, false).is_none());
    }

    /// Review defect 2 (code-review-7b9477c §1.2): the descriptor FIXED_FD_INSTALL made leaked
    /// when its completion found the connection closing. Now the completion owns it first,
    /// whatever the state, and dropping it closes it.
    #[test]
    fn an_installed_descriptor_is_owned_whatever_the_state() {
        // SAFETY: dup has no pointer argument; the new descriptor is handed to `settle` below.
        let fd = unsafe { libc::dup(0) };
        assert!(fd >= 0);
        let mut c = Conn { state: State::Closing(CloseReason::Shutdown), step: Step::LocalAddr, ..Conn::default() };
        let Some(Done::LocalAddr { fd: Some(owned) }) = c.settle(Op::LocalAddr, fd, false) else { panic!() };
        drop(owned);
        // SAFETY: fcntl on a number; EBADF proves the descriptor was closed by the drop.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_GETFD) }, -1);
        assert!(c.idle());
    }

    /// The EOF forwarded by a descriptor: the install's completion owns the descriptor whatever
    /// the record says, and a failed install asks for a SHUTDOWN op instead.
    #[test]
    fn an_eof_forwarded_by_descriptor_owns_it_and_falls_back_when_the_install_fails() {
        // SAFETY: dup has no pointer argument; the new descriptor is handed to `settle` below.
        let fd = unsafe { libc::dup(0) };
        assert!(fd >= 0);
        let shut = || Flow { half: Half::Shut, io: FlowIo::Shutdown { via_fd: true }, ..Flow::default() };
        let mut c = Conn { state: State::Established, c2s: shut(), ..Conn::default() };
        let Some(Done::Shutdown { dir: Dir::ClientToServer, fd: Some(owned), retry: false }) =
            c.settle(Op::ShutdownFdServer, fd, false)
        else {
            panic!()
        };
        assert!(c.idle());
        drop(owned);
        // SAFETY: fcntl on a number; EBADF proves the descriptor was closed by the drop.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_GETFD) }, -1);
        assert!(c.settle(Op::ShutdownFdServer, -libc::EMFILE, false).is_none(), "it completes once");

        let mut c = Conn { state: State::Established, s2c: shut(), ..Conn::default() };
        let Some(Done::Shutdown { dir: Dir::ServerToClient, fd: None, retry: true }) =
            c.settle(Op::ShutdownFdClient, -libc::EMFILE, false)
        else {
            panic!()
        };
        // The SHUTDOWN op that follows is another record.
        c.s2c.io = FlowIo::Shutdown { via_fd: false };
        let Some(Done::Shutdown { fd: None, retry: false, .. }) = c.settle(Op::ShutdownClient, 0, false) else {
            panic!()
        };
        assert!(c.idle());
    }

    #[test]
    fn cancel_targets_cover_every_record() {
        let c = Conn {
            client_poll: true,
            server_poll: true,
            step: Step::Connect { connect: true, timeout: true },
            s2c: Flow { io: FlowIo::Shutdown { via_fd: false }, ..Flow::default() },
            ..Conn::default()
        };
        let ops: Vec<Op> = c.cancel_targets().collect();
        assert_eq!(ops, vec![Op::ClientPoll, Op::ServerPoll, Op::Connect, Op::ShutdownClient]);
    }
}
