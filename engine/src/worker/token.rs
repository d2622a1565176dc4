//! The one place that says what a completion is for: every SQE's `user_data` is a [`Token`].
//!
//! Layout (64 bits): `index:32 | generation:24 | op:8`. For connection operations `index` is the
//! connection's slab slot and `generation` its generation when the SQE was pushed, so a completion
//! that arrives after the slot was freed and reused is recognised as stale and dropped. For worker
//! operations (`Op::is_worker_op`) `index` names the listener or the fixed-file slot concerned and
//! the generation is zero, but for a record of a table whose records are reused (a zero-copy
//! send's, `Op::SendZc`): there the generation tells this use of the record from earlier ones.

/// What an SQE does. A connection has at most one op of each kind in flight, so a connection's
/// slot, generation and op name one request (for a cancel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    // --- connection operations (at most one of each in flight per connection) ---
    /// Multishot POLLIN|POLLRDHUP on the client socket, armed for the connection's life.
    ClientPoll = 0,
    /// Multishot POLLIN|POLLRDHUP on the server socket, armed once connected.
    ServerPoll,
    /// One-shot POLLOUT on the client socket while server→client data waits in a pipe.
    ClientPollOut,
    /// One-shot POLLOUT on the server socket while client→server data waits in a pipe.
    ServerPollOut,
    /// getsockopt(SO_PEERNAME) on the accepted socket: the client's address.
    PeerName,
    /// The linked connect chain: SOCKET → TCP_NODELAY → [IP_BIND_ADDRESS_NO_PORT → BIND] → CONNECT
    /// → LINK_TIMEOUT.
    Socket,
    NoDelay,
    BindNoPort,
    Bind,
    Connect,
    ConnectTimeout,
    /// client socket → pipe, hard-linked to `SpliceOutC2S`.
    SpliceInC2S,
    /// pipe → server socket.
    SpliceOutC2S,
    /// server socket → pipe, hard-linked to `SpliceOutS2C`.
    SpliceInS2C,
    /// pipe → client socket.
    SpliceOutS2C,
    /// shutdown(SHUT_WR) toward the server after the client's EOF.
    ShutdownServer,
    /// shutdown(SHUT_WR) toward the client after the server's EOF.
    ShutdownClient,
    /// recv(MSG_PEEK) of the client's PROXY protocol header.
    HeaderPeek,
    /// recv of exactly the header's length, consuming it.
    HeaderRead,
    /// send of our PROXY protocol header to the server.
    ProxySend,
    /// FIXED_FD_INSTALL of the client socket, to read its local address.
    LocalAddr,
    /// recv of a small chunk into a worker buffer (client→server), and its send.
    RecvC2S,
    SendC2S,
    /// The same, server→client.
    RecvS2C,
    SendS2C,
    /// Multishot recv into the worker's provided-buffer ring on the client socket (`splice:
    /// never`, once established), and on the server socket.
    ClientRecv,
    ServerRecv,
    /// MSG_RING of the client socket, then of the server socket, into another ring's table (a
    /// connection moving to a new engine on reload).
    MoveClient,
    MoveServer,
    /// FIXED_FD_INSTALL of the client socket, then of the server socket: descriptors to hand to
    /// a new process (binary upgrade).
    ExportClient,
    ExportServer,
    /// FIXED_FD_INSTALL of the server socket, whose descriptor then forwards the client's EOF by
    /// shutdown(SHUT_WR) in this thread and is closed (io_uring runs a SHUTDOWN on an io-wq
    /// thread); `ShutdownServer` only if the install fails.
    ShutdownFdServer,
    /// The same toward the client, after the server's EOF.
    ShutdownFdClient,
    /// FIXED_FD_INSTALL of the client socket, then of the server socket: descriptors the worker
    /// splices with by system calls on its own thread (a bulk flow; io_uring runs every SPLICE on
    /// an io-wq thread). They live as long as the connection's entry.
    SpliceFdClient,
    SpliceFdServer,
    /// A completion the worker posts to itself (no SQE): a bulk flow that moved its share of
    /// bytes in one go goes on in the next loop turn, after the other connections' events.
    AgainC2S,
    AgainS2C,

    // --- worker operations ---
    /// Cancellation of one in-flight op (result ignored; the cancelled op completes on its own).
    Cancel = 40,
    /// Multishot accept on listener `index`.
    Accept,
    /// Cancel of the multishot accept on listener `index`.
    AcceptCancel,
    /// Read of the worker's control eventfd.
    Wake,
    /// Close of fixed-file slot `index`.
    CloseFixed,
    /// SO_LINGER {1, 0}, or a connect to `AF_UNSPEC` (before 6.7), hard-linked before the close
    /// of slot `index` (posts a completion only if it fails; ignored: that close then sends FIN
    /// instead of RST).
    Linger,
    /// A `SENDMSG_ZC` of a connection's send queue (`tune.send_zerocopy`), `index` naming its
    /// record in the ring (ring/zerocopy.rs): its first completion is the connection's send
    /// completion (`SendC2S` / `SendS2C`); its notification, which may come after the
    /// connection is gone, gives back the buffers the kernel read from.
    SendZc,
}

impl Op {
    const ALL: [Op; 44] = [
        Op::ClientPoll,
        Op::ServerPoll,
        Op::ClientPollOut,
        Op::ServerPollOut,
        Op::PeerName,
        Op::Socket,
        Op::NoDelay,
        Op::BindNoPort,
        Op::Bind,
        Op::Connect,
        Op::ConnectTimeout,
        Op::SpliceInC2S,
        Op::SpliceOutC2S,
        Op::SpliceInS2C,
        Op::SpliceOutS2C,
        Op::ShutdownServer,
        Op::ShutdownClient,
        Op::HeaderPeek,
        Op::HeaderRead,
        Op::ProxySend,
        Op::LocalAddr,
        Op::RecvC2S,
        Op::SendC2S,
        Op::RecvS2C,
        Op::SendS2C,
        Op::ClientRecv,
        Op::ServerRecv,
        Op::MoveClient,
        Op::MoveServer,
        Op::ExportClient,
        Op::ExportServer,
        Op::ShutdownFdServer,
        Op::ShutdownFdClient,
        Op::SpliceFdClient,
        Op::SpliceFdServer,
        Op::AgainC2S,
        Op::AgainS2C,
        Op::Cancel,
        Op::Accept,
        Op::AcceptCancel,
        Op::Wake,
        Op::CloseFixed,
        Op::Linger,
        Op::SendZc,
    ];

    fn from_u8(v: u8) -> Option<Op> {
        Op::ALL.iter().copied().find(|op| *op as u8 == v)
    }

    /// Ops that belong to the worker rather than to one connection.
    pub fn is_worker_op(self) -> bool {
        self as u8 >= Op::Cancel as u8
    }
}

/// A decoded `user_data`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    pub op: Op,
    pub index: u32,
    pub generation: u32,
}

/// Generations wrap at 24 bits.
pub const GENERATION_MASK: u32 = (1 << 24) - 1;

impl Token {
    pub fn conn(op: Op, index: u32, generation: u32) -> Token {
        Token { op, index, generation: generation & GENERATION_MASK }
    }

    pub fn worker(op: Op, index: u32) -> Token {
        Token { op, index, generation: 0 }
    }

    /// A worker op on record `index` of a reused table, in its use `generation` (wraps at 24 bits).
    pub fn record(op: Op, index: u32, generation: u32) -> Token {
        Token { op, index, generation: generation & GENERATION_MASK }
    }

    pub fn encode(self) -> u64 {
        (u64::from(self.index) << 32) | (u64::from(self.generation & GENERATION_MASK) << 8) | self.op as u64
    }

    /// `None` for a value no SQE of ours carries (a kernel or programming error, counted and ignored).
    pub fn decode(user_data: u64) -> Option<Token> {
        Some(Token {
            op: Op::from_u8(user_data as u8)?,
            index: (user_data >> 32) as u32,
            generation: ((user_data >> 8) as u32) & GENERATION_MASK,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for op in Op::ALL {
            let t = Token { op, index: 0xdead_beef, generation: 0x00ab_cdef };
            assert_eq!(Token::decode(t.encode()), Some(t));
        }
        let t = Token::conn(Op::Connect, 7, 0x1ff_ffff);
        assert_eq!(t.generation, 0xff_ffff, "generation wraps at 24 bits");
        assert_eq!(Token::decode(0xff), None);
    }

    #[test]
    fn worker_ops_are_told_from_connection_ops() {
        assert!(Op::Accept.is_worker_op() && Op::Cancel.is_worker_op() && Op::Linger.is_worker_op());
        assert!(!Op::SendS2C.is_worker_op() && !Op::ClientPoll.is_worker_op());
    }
}
