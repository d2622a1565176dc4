//! The proxied connection: its state machine, from accept to close.
//!
//! A connection is a client socket and (once connected) a server socket, both io_uring direct
//! descriptors, and two [`Flow`]s (client→server, server→client) whose byte movement lives in
//! `pump.rs`. This module owns the connection table, routes every completion to its handler, and
//! closes: cancelling what is in flight and freeing the entry only when nothing is.
//!
//! Invariants:
//! - At most one op of each kind is in flight per connection; `inflight` has its bit set from push to
//!   final completion. A slot's descriptors are closed and the entry freed only when `inflight` is 0,
//!   so no op ever acts on a descriptor number that was reused.
//! - EOF read from one side becomes shutdown(SHUT_WR) on the other once the pipe is drained; the
//!   other direction keeps flowing. Both directions finished → graceful close.
//! - Any error on a socket (reset, broken pipe) closes both sides with RST.

use std::net::SocketAddr;

use crate::pipes::{NO_PIPE, PipeId};
use crate::worker::Worker;
use crate::worker::ring::PeerTicket;
use crate::worker::timer::{Links, TimerLink};
use crate::worker::token::{CONNECT_CHAIN, Op, Token};

pub const NO_SLOT: u32 = u32::MAX;
pub const NO_TICKET: u32 = u32::MAX;
pub const NO_BUF: u32 = u32::MAX;
pub const NO_INDEX: u16 = u16::MAX;

pub(crate) const POLLIN_EVENTS: u32 = (libc::POLLIN | libc::POLLRDHUP) as u32;
pub(crate) const POLLOUT_EVENTS: u32 = libc::POLLOUT as u32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Slab entry not in use.
    Free,
    /// Accepted; waiting for the client's address (needed by `balance source` and logs).
    PeerName,
    /// Reading the client's PROXY protocol header (`accept_proxy`).
    ProxyHeader,
    /// Connected to the server; sending it our PROXY protocol header (`send_proxy`).
    SendingProxy,
    /// Waiting in the backend queue for a server slot.
    Queued,
    /// The connect chain to a server is in flight.
    Connecting,
    /// Both sockets open; bytes flow.
    Established,
    /// Cancelling what is in flight; the entry is freed when nothing is.
    Closing,
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
    /// Every op that moves this direction's bytes: while one is in flight, the flow is busy.
    pub(crate) fn busy(self) -> u32 {
        self.splice_in().bit() | self.splice_out().bit() | self.poll_out().bit() | self.recv().bit() | self.send().bit()
    }
    /// The opposite direction.
    pub(crate) fn other(self) -> Dir {
        match self {
            Dir::ClientToServer => Dir::ServerToClient,
            Dir::ServerToClient => Dir::ClientToServer,
        }
    }
    pub(crate) fn shutdown(self) -> Op {
        match self {
            Dir::ClientToServer => Op::ShutdownServer,
            Dir::ServerToClient => Op::ShutdownClient,
        }
    }
}

/// One direction of a connection.
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    /// The pipe holding this flow's chunk (splice mode), or `NO_PIPE`.
    pub pipe: PipeId,
    /// The chunk buffer holding it (small-transfer mode), or `NO_BUF`.
    pub buf: u32,
    /// Offset in `buf` of the next byte to send.
    pub buf_off: u32,
    /// Bytes read and not yet written out (in the pipe or the buffer).
    pub pending: u32,
    /// Move the next chunk with splice (a large transfer) rather than through a buffer.
    pub bulk: bool,
    /// The source socket may have data (edge-triggered: set by poll, cleared by EAGAIN).
    pub readable: bool,
    /// The source sent EOF.
    pub eof: bool,
    /// shutdown(SHUT_WR) has been sent to the destination.
    pub shut: bool,
    /// Waiting in the worker's queue for a pipe or a buffer.
    pub waiting: bool,
    /// A poll event on the source reported its peer's FIN, a hangup or an error: read on to the
    /// EOF (or the error) instead of taking a short read as "drained".
    pub hup: bool,
    /// Poll events seen on the source, to tell an EAGAIN that raced with new data.
    pub ready_seq: u8,
    pub seq_at_submit: u8,
}

impl Default for Flow {
    fn default() -> Flow {
        Flow {
            pipe: NO_PIPE,
            buf: NO_BUF,
            buf_off: 0,
            pending: 0,
            bulk: false,
            readable: false,
            eof: false,
            shut: false,
            waiting: false,
            hup: false,
            ready_seq: 0,
            seq_at_submit: 0,
        }
    }
}

impl Flow {
    pub fn finished(&self) -> bool {
        self.eof && self.shut && self.pending == 0
    }
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
        }
    }

    /// Whether both sides are closed with RST (the other side of a reset learns of it as a reset).
    fn abortive(self) -> bool {
        matches!(self, CloseReason::ClientReset | CloseReason::ServerReset)
    }
}

/// A proxied connection's slab entry (kept small: it is most of the user-space cost of an idle
/// connection; see docs/architecture.md).
#[derive(Clone, Debug)]
pub struct Conn {
    pub generation: u32,
    pub state: State,
    /// Bit per `Op` in flight.
    pub inflight: u32,
    pub frontend: u16,
    pub backend: u16,
    pub server: u16,
    pub source: u16,
    pub listener: u16,
    pub attempts: u8,
    /// Holds a global (and frontend) share.
    pub admitted: bool,
    /// Holds backend and server shares.
    pub server_shares: bool,
    pub client_slot: u32,
    pub server_slot: u32,
    pub ticket: u32,
    /// Result of the connect chain: first error, or 0.
    pub connect_result: i32,
    pub connect_timed_out: bool,
    /// Servers already tried by this connection (bit `i % 64`).
    pub tried: u64,
    pub client: Option<SocketAddr>,
    /// The address the client connected to, when known (from its PROXY header, or looked up for
    /// `send_proxy`).
    pub dest: Option<SocketAddr>,
    pub c2s: Flow,
    pub s2c: Flow,
    /// When the client was accepted (µs on the worker clock).
    pub t_accept_us: u64,
    /// From accept to the start of the last connect attempt, and that attempt's duration (µs).
    pub connect_after_us: u32,
    pub connect_took_us: u32,
    /// Bytes forwarded client→server and server→client.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub close_reason: Option<CloseReason>,
    /// Milliseconds on the worker clock.
    pub last_client: u64,
    pub last_server: u64,
    pub queued_at: u64,
    /// This connection's entry in the timer wheel.
    pub timer: TimerLink,
}

impl Default for Conn {
    fn default() -> Conn {
        Conn {
            generation: 0,
            state: State::Free,
            inflight: 0,
            frontend: 0,
            backend: 0,
            server: NO_INDEX,
            source: NO_INDEX,
            listener: 0,
            attempts: 0,
            admitted: false,
            server_shares: false,
            client_slot: NO_SLOT,
            server_slot: NO_SLOT,
            ticket: NO_TICKET,
            connect_result: 0,
            connect_timed_out: false,
            tried: 0,
            client: None,
            dest: None,
            c2s: Flow::default(),
            s2c: Flow::default(),
            t_accept_us: 0,
            connect_after_us: 0,
            connect_took_us: 0,
            bytes_in: 0,
            bytes_out: 0,
            close_reason: None,
            last_client: 0,
            last_server: 0,
            queued_at: 0,
            timer: TimerLink::default(),
        }
    }
}

impl Conn {
    pub fn flow(&mut self, dir: Dir) -> &mut Flow {
        match dir {
            Dir::ClientToServer => &mut self.c2s,
            Dir::ServerToClient => &mut self.s2c,
        }
    }

    pub(crate) fn has(&self, op: Op) -> bool {
        self.inflight & op.bit() != 0
    }
}

impl Links for Slab {
    fn link(&mut self, index: u32) -> &mut TimerLink {
        &mut self.entries[index as usize].timer
    }
}

/// The connection table: a slab with generations, so stale completions are recognised.
#[derive(Default)]
pub struct Slab {
    entries: Vec<Conn>,
    free: Vec<u32>,
    pub live: usize,
}

impl Slab {
    pub fn with_capacity(n: usize) -> Slab {
        Slab { entries: Vec::with_capacity(n), free: Vec::new(), live: 0 }
    }

    pub fn insert(&mut self) -> u32 {
        self.live += 1;
        match self.free.pop() {
            Some(i) => i,
            None => {
                self.entries.push(Conn::default());
                (self.entries.len() - 1) as u32
            }
        }
    }

    /// The entry at `index` if it is live and of `generation` (24-bit compare).
    pub fn get(&mut self, index: u32, generation: u32) -> Option<&mut Conn> {
        let c = self.entries.get_mut(index as usize)?;
        (c.state != State::Free && c.generation & crate::worker::token::GENERATION_MASK == generation).then_some(c)
    }

    pub fn at(&mut self, index: u32) -> &mut Conn {
        &mut self.entries[index as usize]
    }

    /// Frees an entry. Its timer must already be cancelled (`close` does that).
    pub fn remove(&mut self, index: u32) {
        let c = &mut self.entries[index as usize];
        debug_assert!(!c.timer.is_filed(), "freeing a connection still in the timer wheel");
        let generation = c.generation.wrapping_add(1);
        *c = Conn { generation, ..Conn::default() };
        self.free.push(index);
        self.live -= 1;
    }

    /// Indices of live entries (slow path: drain and shutdown).
    pub fn live_indices(&self) -> Vec<u32> {
        (0..self.entries.len() as u32).filter(|&i| self.entries[i as usize].state != State::Free).collect()
    }
}

impl Worker {
    pub(crate) fn token(&mut self, index: u32, op: Op) -> Token {
        let c = self.conns.at(index);
        c.inflight |= op.bit();
        Token::conn(op, index, c.generation)
    }

    /// A new admitted connection on fixed slot `slot`: ask for the peer address, watch the client.
    pub(crate) fn open_conn(&mut self, listener: u16, slot: u32) {
        let idx = self.conns.insert();
        let frontend = self.listeners[listener as usize].frontend;
        let ipv6 = self.listeners[listener as usize].ipv6;
        let now = self.now;
        let backend = self.cfg.frontends[frontend].backend as u16;
        {
            let c = self.conns.at(idx);
            c.state = State::PeerName;
            c.listener = listener;
            c.frontend = frontend as u16;
            c.backend = backend;
            c.admitted = true;
            c.client_slot = slot;
            c.last_client = now;
            c.last_server = now;
            c.t_accept_us = self.now_us;
            let bulk = self.cfg.global.tune.splice == crate::config::SpliceMode::Always;
            c.c2s.bulk = bulk;
            c.s2c.bulk = bulk;
        }
        self.stats.accepted += 1;
        self.stats.active += 1;
        let t = self.token(idx, Op::ClientPoll);
        self.ring.poll_multi(slot, POLLIN_EVENTS, t);
        if !self.needs_peer[frontend] {
            // Nothing will use the client's address: go straight to a server.
            self.dispatch(idx);
        } else {
            let t = self.token(idx, Op::PeerName);
            match self.ring.peername(slot, ipv6, t) {
                Some(ticket) => self.conns.at(idx).ticket = ticket.0,
                None => {
                    // Every peer-address slot is in flight (thousands of accepts in one batch): go
                    // on without the address rather than wait.
                    self.conns.at(idx).inflight &= !Op::PeerName.bit();
                    self.dispatch(idx);
                }
            }
        }
        self.ensure_timer(idx);
    }

    /// A completion for a connection op.
    pub(crate) fn on_conn_completion(&mut self, t: Token, result: i32, more: bool) {
        let Some(c) = self.conns.get(t.index, t.generation) else {
            self.stale_completions += 1;
            return;
        };
        let multishot = matches!(t.op, Op::ClientPoll | Op::ServerPoll);
        if !(multishot && more) {
            c.inflight &= !t.op.bit();
        }
        let idx = t.index;
        if t.op == Op::PeerName {
            let ticket = PeerTicket(c.ticket);
            c.ticket = NO_TICKET;
            let addr = self.ring.take_peer(ticket, result);
            let c = self.conns.at(idx);
            c.client = addr;
            if c.state == State::PeerName {
                if self.cfg.frontends[c.frontend as usize].accept_proxy {
                    self.begin_proxy_header(idx);
                } else {
                    self.dispatch(idx);
                }
            } else {
                self.maybe_finish(idx);
            }
            return;
        }
        if self.conns.at(idx).state == State::Closing {
            // Bytes a splice moved still count: a pipe is pooled again only if it is really empty.
            match t.op {
                Op::SpliceInC2S if result > 0 => self.conns.at(idx).c2s.pending += result as u32,
                Op::SpliceInS2C if result > 0 => self.conns.at(idx).s2c.pending += result as u32,
                Op::SpliceOutC2S if result > 0 => {
                    let f = &mut self.conns.at(idx).c2s;
                    f.pending = f.pending.saturating_sub(result as u32);
                }
                Op::SpliceOutS2C if result > 0 => {
                    let f = &mut self.conns.at(idx).s2c;
                    f.pending = f.pending.saturating_sub(result as u32);
                }
                _ => {}
            }
            self.maybe_finish(idx);
            return;
        }
        match t.op {
            Op::ClientPoll | Op::ServerPoll => self.on_poll(idx, t.op, result, more),
            Op::ClientPollOut | Op::ServerPollOut => {
                let dir = if t.op == Op::ServerPollOut { Dir::ClientToServer } else { Dir::ServerToClient };
                if result < 0 && result != -libc::ECANCELED {
                    let reason =
                        if dir == Dir::ClientToServer { CloseReason::ServerReset } else { CloseReason::ClientReset };
                    self.close(idx, reason);
                } else {
                    self.pump(idx, dir);
                }
            }
            Op::Socket | Op::NoDelay | Op::BindNoPort | Op::Bind | Op::Connect | Op::ConnectTimeout => {
                self.on_connect_step(idx, t.op, result)
            }
            Op::SpliceInC2S => self.on_splice_in(idx, Dir::ClientToServer, result),
            Op::SpliceInS2C => self.on_splice_in(idx, Dir::ServerToClient, result),
            Op::SpliceOutC2S => self.on_splice_out(idx, Dir::ClientToServer, result),
            Op::SpliceOutS2C => self.on_splice_out(idx, Dir::ServerToClient, result),
            Op::RecvC2S => self.on_recv(idx, Dir::ClientToServer, result),
            Op::RecvS2C => self.on_recv(idx, Dir::ServerToClient, result),
            Op::SendC2S => self.on_send(idx, Dir::ClientToServer, result),
            Op::SendS2C => self.on_send(idx, Dir::ServerToClient, result),
            Op::ShutdownServer | Op::ShutdownClient => self.check_done(idx),
            Op::HeaderPeek => self.on_header_peek(idx, result),
            Op::HeaderRead => self.on_header_read(idx, result),
            Op::ProxySend => self.on_proxy_sent(idx, result),
            Op::LocalAddr => self.on_local_addr(idx, result),
            Op::LingerClient | Op::LingerServer | Op::PeerName => {}
            Op::Cancel | Op::Accept | Op::AcceptCancel | Op::Wake | Op::CloseFixed => {
                unreachable!("worker op {:?} routed to a connection", t.op)
            }
        }
    }

    /// Starts closing: gives back shares and sources, cancels what is in flight.
    pub(crate) fn close(&mut self, idx: u32, reason: CloseReason) {
        let c = self.conns.at(idx);
        if c.state == State::Closing || c.state == State::Free {
            return;
        }
        let was_queued = c.state == State::Queued;
        let was_established = c.state == State::Established;
        c.state = State::Closing;
        c.close_reason = Some(reason);
        self.timers.cancel(idx, &mut self.conns);
        let c = self.conns.at(idx);
        // No longer active: its shares go back right now (below); `closing` counts it until its
        // sockets are closed.
        self.stats.active -= 1;
        self.stats.closed += 1;
        self.stats.closing += 1;
        let (client_slot, server_slot) = (c.client_slot, c.server_slot);
        match reason {
            CloseReason::ClientReset => self.stats.resets_from_client += 1,
            CloseReason::ServerReset => self.stats.resets_from_server += 1,
            CloseReason::ClientTimeout => self.stats.timeouts.client += 1,
            CloseReason::ServerTimeout => self.stats.timeouts.server += 1,
            CloseReason::QueueTimeout => self.stats.timeouts.queue += 1,
            CloseReason::ConnectFailed => self.stats.failed += 1,
            CloseReason::BadProxyHeader => self.stats.proxy_header_errors += 1,
            CloseReason::Done | CloseReason::Shutdown => {}
        }
        if was_queued {
            self.stats.queued -= 1;
        }
        self.release_server(idx);
        self.release_admission(idx);
        if reason.abortive() {
            let t = self.token(idx, Op::LingerClient);
            self.ring.linger_rst(client_slot, t);
            if server_slot != NO_SLOT && was_established {
                let t = self.token(idx, Op::LingerServer);
                self.ring.linger_rst(server_slot, t);
            }
        }
        let c = self.conns.at(idx);
        let generation = c.generation;
        let inflight = c.inflight;
        for bit in 0..32u8 {
            if inflight & (1 << bit) != 0 {
                // SAFETY of the protocol, not memory: the target op completes (cancelled or not)
                // before the entry is freed, because its bit is cleared only by its completion.
                let target = Token::conn(op_from_bit(bit), idx, generation);
                if !matches!(target.op, Op::LingerClient | Op::LingerServer | Op::PeerName) {
                    self.ring.cancel(target, Token::worker(Op::Cancel, idx));
                }
            }
        }
        self.maybe_finish(idx);
    }

    /// Frees the entry once nothing is in flight: closes both sockets and returns the pipes.
    pub(crate) fn maybe_finish(&mut self, idx: u32) {
        let c = self.conns.at(idx);
        if c.state != State::Closing || c.inflight != 0 {
            return;
        }
        let (client_slot, server_slot) = (c.client_slot, c.server_slot);
        if c.ticket != NO_TICKET {
            // Nothing is in flight, so the PeerName ticket was taken back: this is a header buffer.
            let t = crate::worker::ring::BufTicket(c.ticket);
            c.ticket = NO_TICKET;
            self.ring.release_header(t);
        }
        let c = self.conns.at(idx);
        let held = [(c.c2s.pipe, c.c2s.buf, c.c2s.pending), (c.s2c.pipe, c.s2c.buf, c.s2c.pending)];
        for (pipe, buf, left) in held {
            if pipe != NO_PIPE {
                if left == 0 {
                    self.pipes.release(pipe);
                } else {
                    self.pipes.discard(pipe);
                }
            }
            if buf != NO_BUF {
                // A buffer is ours: unsent bytes in it are simply dropped with the connection.
                self.ring.release_chunk(crate::worker::ring::BufTicket(buf));
            }
        }
        self.ring.close_fixed(client_slot, Token::worker(Op::CloseFixed, client_slot));
        if server_slot != NO_SLOT {
            self.ring.close_fixed(server_slot, Token::worker(Op::CloseFixed, server_slot));
        }
        if self.log.is_some() {
            self.log_connection(idx);
        }
        self.conns.remove(idx);
        self.stats.closing -= 1;
    }

    /// Makes sure the connection's earliest deadline is in the timer wheel.
    pub(crate) fn ensure_timer(&mut self, idx: u32) {
        let Some(deadline) = self.deadline(idx) else {
            return;
        };
        let t = self.conns.at(idx).timer;
        if !t.is_filed() || deadline < t.deadline {
            self.timers.schedule(idx, deadline, &mut self.conns);
        }
    }

    /// The connection's next deadline, by state.
    fn deadline(&mut self, idx: u32) -> Option<u64> {
        let c = self.conns.at(idx);
        let fe = &self.cfg.frontends[c.frontend as usize];
        let be = &self.cfg.backends[c.backend as usize];
        let client = c.last_client + fe.client_timeout.as_millis() as u64;
        match c.state {
            State::PeerName | State::Connecting | State::SendingProxy => Some(client),
            State::ProxyHeader => Some(c.t_accept_us / 1000 + fe.proxy_header_timeout.as_millis() as u64),
            State::Queued => Some(c.queued_at + be.queue_timeout.as_millis() as u64),
            State::Established => Some(client.min(c.last_server + be.server_timeout.as_millis() as u64)),
            State::Closing | State::Free => None,
        }
    }

    /// The connection's timer entry fired (the wheel has already unfiled it).
    pub(crate) fn on_timer(&mut self, idx: u32) {
        let Some(deadline) = self.deadline(idx) else {
            return;
        };
        if deadline > self.now {
            // Activity moved the deadline since the entry was filed.
            self.ensure_timer(idx);
            return;
        }
        let c = self.conns.at(idx);
        let fe = &self.cfg.frontends[c.frontend as usize];
        let reason = match c.state {
            State::Queued => CloseReason::QueueTimeout,
            State::ProxyHeader => CloseReason::BadProxyHeader,
            State::Established if c.last_client + (fe.client_timeout.as_millis() as u64) <= self.now => {
                CloseReason::ClientTimeout
            }
            State::Established => CloseReason::ServerTimeout,
            _ => CloseReason::ClientTimeout,
        };
        self.close(idx, reason);
    }

    /// The connect chain's ops complete one by one; act when the last one has.
    fn on_connect_step(&mut self, idx: u32, op: Op, result: i32) {
        let c = self.conns.at(idx);
        if op == Op::Connect {
            // The setup steps before CONNECT post a completion only on failure; by the time CONNECT
            // completes, each of them has.
            c.inflight &= !(Op::Socket.bit() | Op::NoDelay.bit() | Op::BindNoPort.bit() | Op::Bind.bit());
        }
        match op {
            Op::ConnectTimeout => {
                if result == -libc::ETIME {
                    c.connect_timed_out = true;
                }
            }
            _ => {
                if result < 0 && c.connect_result == 0 && result != -libc::ECANCELED {
                    c.connect_result = result;
                } else if result == -libc::ECANCELED && op == Op::Connect && c.connect_result == 0 {
                    c.connect_result = -libc::ETIMEDOUT;
                }
            }
        }
        if c.inflight & CONNECT_CHAIN == 0 {
            self.on_connect_done(idx);
        }
    }
}

fn op_from_bit(bit: u8) -> Op {
    crate::worker::token::Token::decode(u64::from(bit))
        .map(|t| t.op)
        .unwrap_or_else(|| unreachable!("inflight bit {bit} has no op"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_connection_entry_is_small() {
        // The slab entry is the bulk of an idle connection's user-space memory (architecture.md).
        assert!(std::mem::size_of::<Conn>() <= 240, "Conn is {} bytes", std::mem::size_of::<Conn>());
    }

    #[test]
    fn slab_generations_reject_stale_tokens() {
        let mut s = Slab::with_capacity(4);
        let a = s.insert();
        s.at(a).state = State::PeerName;
        let g = s.at(a).generation;
        assert!(s.get(a, g).is_some());
        s.remove(a);
        let b = s.insert();
        assert_eq!(a, b, "slot reused");
        s.at(b).state = State::PeerName;
        assert!(s.get(b, g).is_none(), "old generation is stale");
        assert_eq!(s.live, 1);
    }
}
