//! What a connection has in flight, and what each in-flight operation owns.
//!
//! A connection has at most one operation of each kind in flight (so `(connection, Op)` names it
//! for a cancel), grouped in records: the two multishot polls, one setup [`Step`] at a time
//! (peer lookup, PROXY header, connect, local address, PROXY header out), and per direction one
//! [`FlowIo`] (the chunk on its way and the operation moving it). Each record's variant owns what
//! its operation lent the kernel — a peer slot, a header or chunk buffer, a pipe — as a
//! non-`Copy` handle, and [`Conn::settle`](super::Conn::settle) is the only code that takes it
//! out: when that operation's completion arrives. Steps submitted with CQE_SKIP_SUCCESS (the
//! connect chain's setup) hold nothing and have no record. Nothing is held between operations:
//! bytes not yet written wait inside the record of the `POLLOUT` that waits for room.
//!
//! Closing is then "cancel what is in flight; free when nothing is" ([`Conn::idle`]).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::sendq::QueueLease;
use crate::pipes::PipeLease;
use crate::worker::ring::{ChunkBuf, HeaderBuf, PeerSlot};
use crate::worker::token::Op;

use super::Dir;

/// The setup step in flight (steps run one after another).
#[derive(Debug, Default)]
pub enum Step {
    #[default]
    Idle,
    /// getsockopt(SO_PEERNAME) into this slot.
    PeerName(PeerSlot),
    /// recv(MSG_PEEK) of the client's PROXY header into this buffer.
    HeaderPeek(HeaderBuf),
    /// recv of exactly the header's length (consuming it) into this buffer.
    HeaderRead(HeaderBuf),
    /// The connect chain: CONNECT and its LINK_TIMEOUT each post one completion; `true` while it
    /// is still to come. The SKIP_SUCCESS steps before CONNECT hold nothing.
    Connect { connect: bool, timeout: bool },
    /// FIXED_FD_INSTALL of the client socket (its result is a descriptor: `settle` owns it at once).
    LocalAddr,
    /// send of our PROXY header from this buffer.
    ProxySend(HeaderBuf),
    /// The two MSG_RINGs handing the client and the server socket to another engine's ring (a
    /// move on reload): `true` while each is still to come; `failed` once one has failed; `slot`:
    /// the client's MSG_RING result once it succeeded (the slot the kernel picked, or 0 for a
    /// named one), else `u32::MAX`.
    Move { client: bool, server: bool, failed: bool, slot: u32 },
    /// The two FIXED_FD_INSTALLs making process descriptors of both sockets, to hand to a new
    /// process (binary upgrade): `true` while each is still to come. (Each descriptor is owned by
    /// its completion, as for `LocalAddr`.)
    Export { client: bool, server: bool },
    /// The two FIXED_FD_INSTALLs making process descriptors of both sockets for splicing on the
    /// worker's thread (a bulk flow, once established): `true` while each is still to come. Each
    /// descriptor is owned by its completion and kept in [`SpliceFds`].
    SpliceFds { client: bool, server: bool },
}

impl Step {
    /// The op to cancel when the connection closes, if cancelling helps (a peer lookup and a
    /// descriptor install complete inline: there is nothing to cancel).
    pub fn cancel_target(&self) -> Option<Op> {
        match self {
            // (A MSG_RING completes at once, or once the target ring's thread has installed it.)
            Step::Idle
            | Step::PeerName(_)
            | Step::LocalAddr
            | Step::Move { .. }
            | Step::Export { .. }
            | Step::SpliceFds { .. } => None,
            Step::HeaderPeek(_) => Some(Op::HeaderPeek),
            Step::HeaderRead(_) => Some(Op::HeaderRead),
            Step::Connect { connect: true, .. } => Some(Op::Connect),
            // CONNECT is in; its linked timeout is being disarmed by the kernel.
            Step::Connect { connect: false, .. } => None,
            Step::ProxySend(_) => Some(Op::ProxySend),
        }
    }
}

/// Bytes read and not yet written, waiting for the destination to take them.
#[derive(Debug)]
pub enum Held {
    /// `len` bytes at `off` in a chunk buffer.
    Buf { buf: ChunkBuf, off: u16, len: u16 },
    /// `pending` bytes in a pipe.
    Pipe { pipe: PipeLease, pending: u32 },
}

/// One direction's chunk in flight and the operation moving it.
#[derive(Debug, Default)]
pub enum FlowIo {
    /// Nothing in flight, nothing held.
    #[default]
    Idle,
    /// In the worker's FIFO, waiting for a pipe or a buffer (nothing in flight).
    Waiting,
    /// recv into this buffer.
    Recv(ChunkBuf),
    /// send of `len` bytes at `off` of this buffer.
    Send { buf: ChunkBuf, off: u16, len: u16 },
    /// The hard-linked pair socket → pipe → socket; `out` says the second half is still to come
    /// (the first always completes first). `pending`: bytes in the pipe so far.
    Splice { pipe: PipeLease, pending: u32, first: bool },
    /// pipe → socket for the rest of a short write.
    SpliceOut { pipe: PipeLease, pending: u32 },
    /// POLLOUT on the destination, holding `len` unsent bytes at `off` of this buffer (a
    /// [`Held::Buf`], stored flat so the record stays small).
    PollOutBuf { buf: ChunkBuf, off: u16, len: u16 },
    /// POLLOUT on the destination, holding `pending` bytes in this pipe (a [`Held::Pipe`]).
    PollOutPipe { pipe: PipeLease, pending: u32 },
    /// shutdown(SHUT_WR) of the destination (forwarding the source's EOF): `via_fd`, the
    /// FIXED_FD_INSTALL whose descriptor will do it by a system call; otherwise a SHUTDOWN op.
    Shutdown { via_fd: bool },
    /// Receive buffers queued for the destination (`splice: never`), a `sendmsg` of them in
    /// flight (a queue with buffers always has one: sendq.rs).
    Ring(QueueLease),
    /// Receive-buffer path: the destination took part of a `sendmsg` of the queue and had no room
    /// for the rest; a one-shot POLLOUT on it waits for room (no `sendmsg` in flight), since
    /// `since` (the worker clock's ms, wrapping every 65 s). Sent on when it fires.
    RingPollOut { lease: QueueLease, since: u16 },
    /// A bulk flow splicing on the worker's thread moved its share for this loop turn; the
    /// completion the worker posted itself (`Op::Again*`, no SQE: it cannot be cancelled and
    /// arrives with the next turn's completions) lets it go on. Holds nothing.
    Again,
}

impl FlowIo {
    /// The record of a receive-buffer queue: waiting for room in its destination since `waiting`
    /// (a POLLOUT armed), or not (`Ring`).
    pub fn ring(lease: QueueLease, waiting: Option<u16>) -> FlowIo {
        match waiting {
            Some(since) => FlowIo::RingPollOut { lease, since },
            None => FlowIo::Ring(lease),
        }
    }

    /// The record of a POLLOUT holding `held`.
    pub fn poll_out(held: Held) -> FlowIo {
        match held {
            Held::Buf { buf, off, len } => FlowIo::PollOutBuf { buf, off, len },
            Held::Pipe { pipe, pending } => FlowIo::PollOutPipe { pipe, pending },
        }
    }

    /// Whether an operation of this flow is in flight.
    pub fn busy(&self) -> bool {
        !matches!(self, FlowIo::Idle | FlowIo::Waiting)
    }

    /// The ops to cancel when the connection closes.
    pub fn cancel_targets(&self, dir: Dir) -> [Option<Op>; 2] {
        match self {
            FlowIo::Idle | FlowIo::Waiting => [None, None],
            FlowIo::Recv(_) => [Some(dir.recv()), None],
            FlowIo::Send { .. } => [Some(dir.send()), None],
            FlowIo::Splice { first: true, .. } => [Some(dir.splice_in()), Some(dir.splice_out())],
            FlowIo::Splice { first: false, .. } | FlowIo::SpliceOut { .. } => [Some(dir.splice_out()), None],
            FlowIo::PollOutBuf { .. } | FlowIo::PollOutPipe { .. } => [Some(dir.poll_out()), None],
            FlowIo::Shutdown { via_fd } => [Some(dir.shutdown(*via_fd)), None],
            FlowIo::Ring(_) => [Some(dir.send()), None],
            FlowIo::RingPollOut { .. } => [Some(dir.poll_out()), None],
            FlowIo::Again => [None, None],
        }
    }
}

/// A connection's sockets as process descriptors (made by FIXED_FD_INSTALL from its direct
/// ones), with which the worker splices by system calls on its own thread: io_uring runs every
/// SPLICE on an io-wq thread, two thread hand-offs per chunk. Made for a flow that moves bulk
/// data, kept for the connection's life (in the worker's table, `SpliceTable`), closed as it is
/// dropped; the direct descriptors stay the sockets' owners.
#[derive(Debug, Default)]
pub struct SpliceFds {
    pub client: Option<OwnedFd>,
    pub server: Option<OwnedFd>,
}

impl SpliceFds {
    /// (source, destination) of `dir`, once both descriptors are there.
    pub fn ends(&self, dir: Dir) -> Option<(RawFd, RawFd)> {
        let (c, s) = (self.client.as_ref()?.as_raw_fd(), self.server.as_ref()?.as_raw_fd());
        Some(match dir {
            Dir::ClientToServer => (c, s),
            Dir::ServerToClient => (s, c),
        })
    }

    /// Descriptors held (for the worker's gauge).
    pub fn count(&self) -> u64 {
        u64::from(self.client.is_some()) + u64::from(self.server.is_some())
    }
}

/// How far one direction's end-of-stream has got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Half {
    /// The source may send more.
    #[default]
    Open,
    /// The source sent its EOF; not yet forwarded.
    EofSeen,
    /// The EOF was forwarded (shutdown(SHUT_WR) of the destination sent, or in flight).
    Shut,
}

/// One direction of a connection (client → server or server → client).
#[derive(Debug, Default)]
pub struct Flow {
    pub io: FlowIo,
    pub half: Half,
    /// Move the next chunk with splice (a large transfer) rather than through a buffer.
    pub bulk: bool,
    /// The source socket may have data (edge-triggered: set by poll, cleared by a read that found
    /// it empty with no newer poll event).
    pub readable: bool,
    /// A poll event on the source reported its peer's FIN, a hangup or an error: read on to the
    /// EOF (or the error) instead of taking a short read as "drained".
    pub hup: bool,
    /// `splice: never`: the source's multishot receive is stopped — its send queue is long
    /// (backpressure) or the worker ran out of receive buffers — and is re-armed when that ends.
    pub paused: bool,
    /// The connection was idle: the source's multishot receive is swapped for a one-shot poll,
    /// whose event arms it again (`tune.idle_poll_after`, conn/idle.rs).
    pub idle_poll: bool,
    /// Poll events seen on the source, and their count when the last read was submitted: a read
    /// that finds the socket empty clears `readable` only if no event came in between.
    pub ready_seq: u8,
    pub seq_at_submit: u8,
}

impl Flow {
    /// Everything this direction had to do is done: EOF forwarded, nothing in flight.
    pub fn finished(&self) -> bool {
        self.half == Half::Shut && !self.io.busy()
    }

    /// No byte of this direction is left to move: its EOF is forwarded, or its shutdown is in
    /// flight (which a close of the connection waits for rather than cancels).
    pub fn drained(&self) -> bool {
        self.half == Half::Shut && matches!(self.io, FlowIo::Idle | FlowIo::Waiting | FlowIo::Shutdown { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_stay_small() {
        // Two flows and a step are inside every connection's slab entry.
        assert!(std::mem::size_of::<Flow>() <= 20, "Flow is {} bytes", std::mem::size_of::<Flow>());
        assert!(std::mem::size_of::<Step>() <= 8, "Step is {} bytes", std::mem::size_of::<Step>());
    }

    #[test]
    fn a_flow_is_finished_only_once_its_eof_is_forwarded_and_nothing_is_in_flight() {
        let mut f = Flow::default();
        assert!(!f.finished());
        f.half = Half::EofSeen;
        assert!(!f.finished());
        f.half = Half::Shut;
        f.io = FlowIo::Shutdown { via_fd: true };
        assert!(!f.finished(), "the shutdown is still in flight");
        assert!(f.drained(), "but no byte is left to move");
        f.io = FlowIo::Idle;
        assert!(f.finished());
        f.io = FlowIo::Waiting;
        assert!(f.finished(), "waiting for a pipe holds nothing");
    }

    #[test]
    fn cancel_targets_name_every_op_in_flight() {
        let d = Dir::ClientToServer;
        assert_eq!(FlowIo::Shutdown { via_fd: false }.cancel_targets(d), [Some(Op::ShutdownServer), None]);
        assert_eq!(FlowIo::Shutdown { via_fd: true }.cancel_targets(d), [Some(Op::ShutdownFdServer), None]);
        assert_eq!(FlowIo::Idle.cancel_targets(d), [None, None]);
        assert_eq!(Step::Connect { connect: true, timeout: true }.cancel_target(), Some(Op::Connect));
        assert_eq!(Step::Connect { connect: false, timeout: true }.cancel_target(), None);
        assert_eq!(Step::LocalAddr.cancel_target(), None);
    }
}
