//! The first steps of a connection: opening it on an accepted socket, learning the client's
//! address, and reading the PROXY protocol header a client sends (`accept_proxy`) before a server
//! is chosen.
//!
//! The header is peeked at (nothing is consumed until a whole header is there), then exactly its
//! length is consumed, so the first payload byte is the first byte forwarded to the server. A
//! malformed or oversized header, or none within `timeout proxy_header`, closes that one
//! connection and counts in `proxy_header_errors`. A header buffer is held only while a peek or
//! the read is in flight: between peeks the connection holds nothing.

use std::net::SocketAddr;

use super::{Admission, CloseReason, Ctx, POLLIN_EVENTS, State, Step};
use crate::proxy_protocol::{self, MAX_HEADER, Parsed};
use crate::sourcelimits::Refusal;
use crate::worker::ring::{ClientSlot, HeaderBuf};
use crate::worker::token::Op;

/// What a connection needs to know about the listener that accepted it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ListenerInfo {
    pub frontend: u16,
    /// The socket's family (SO_PEERNAME wants the exact address length).
    pub ipv6: bool,
    /// The bound address (a wildcard IP for `0.0.0.0` / `[::]` binds).
    pub addr: SocketAddr,
    /// Whether a connection needs its client's address looked up (balance source, connection
    /// logs, PROXY protocol either way); without, it goes straight to a server.
    pub needs_peer: bool,
}

/// Addresses of an accepted socket read before it moved into its direct slot (the plain-accept
/// fallback, features.rs): then the connection does not look its client's address up.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Known {
    pub looked_up: bool,
    pub peer: Option<SocketAddr>,
    /// The local address, read only where a wildcard listener's PROXY header may need it.
    pub local: Option<SocketAddr>,
}

impl Ctx<'_> {
    /// A new admitted connection on `client`, accepted by listener `listener`: watch the client,
    /// ask for its address (or go straight to a server).
    pub(crate) fn open(&mut self, listener: u16, client: ClientSlot, admission: Admission, known: Known) {
        debug_assert!(!self.c.is_live());
        let l = self.listeners[listener as usize];
        let fe = l.frontend as usize;
        let bulk = self.cfg.frontend_splice(fe) == crate::config::SpliceMode::Always;
        let c = &mut *self.c;
        c.listener = listener;
        c.frontend = l.frontend;
        c.backend = self.cfg.frontends[fe].backend as u16;
        c.server = super::NO_INDEX;
        c.source = super::NO_INDEX;
        c.admission = admission;
        c.last_client = self.now.ms;
        c.last_server = self.now.ms;
        // A new connection's first messages are busy ones (`tune.batch_wait: auto`): churn.
        c.rx_ms = [self.now.ms as u16; 2];
        c.t_accept_us = self.now.us;
        // Connections accepted in one loop turn share their accept time: the slab index sets them
        // apart (and the generation, a reused entry).
        c.jitter = (self.idx.wrapping_mul(0x9e37) ^ c.generation.rotate_left(8)) as u16;
        c.c2s.bulk = bulk;
        c.s2c.bulk = bulk;
        self.enter(State::PeerName);
        debug_assert!(admission != Admission::None, "a connection opened without a share");
        self.fe_stats().accepted += 1;
        self.count_admission(admission, true);
        if self.ring_mode()
            && !self.cfg.frontends[fe].accept_proxy
            && self.ring.ring_bufs_available()
            && self.stats.early_receives < self.early_receives_max()
        {
            // The receive-buffer path: the multishot receive that will carry the client's bytes
            // watches the client from now on (a reset or an end while connecting), and what it
            // receives before the server is there waits in the flow's queue. One op for the
            // connection's life, instead of a poll now and its cancellation once connected. Not
            // for more than a quarter of the worker's buffers' worth of connections at once (a
            // connect storm, a server that answers no SYN): what they hold until connected would
            // starve the worker's other flows (docs/architecture.md, *Bytes before the server*).
            let t = self.token(Op::ClientRecv);
            self.ring.recv_multi(client.sock(), t);
            self.c.client_recv = true;
            self.c.early_recv = true;
            self.stats.early_receives += 1;
        } else {
            let t = self.token(Op::ClientPoll);
            self.ring.poll_multi(client.sock(), POLLIN_EVENTS, t);
            self.c.client_poll = true;
        }
        self.c.client = Some(client);
        self.ensure_timer();
        if known.looked_up {
            self.c.dest = known.local;
            return self.on_peer_name(known.peer);
        }
        if !l.needs_peer {
            return self.dispatch();
        }
        match self.ring.peer_slot() {
            Some(peer) => {
                let t = self.token(Op::PeerName);
                let Some(client) = &self.c.client else { unreachable!("set above") };
                // SAFETY: `peer` moves into `Step::PeerName` right below, which only this op's
                // completion takes apart (`Conn::settle`).
                unsafe { self.ring.peername(client.sock(), l.ipv6, &peer, t) };
                self.c.step = Step::PeerName(peer);
            }
            // Every peer-address slot is in flight (thousands of accepts in one batch): go on
            // without the address rather than wait. A PROXY header still has to be read first.
            None => self.after_peer_name(),
        }
    }

    pub(super) fn on_peer_name(&mut self, addr: Option<SocketAddr>) {
        self.c.client_addr = addr;
        self.after_peer_name();
    }

    /// The client's address is known (or cannot be): read its PROXY header, or find a server.
    fn after_peer_name(&mut self) {
        let fe = &self.cfg.frontends[self.c.frontend as usize];
        if let Some(acl) = &fe.acl {
            // The socket's peer (before any PROXY header). Unknown (every address lookup was in
            // flight in a burst): refused, as an access list must fail closed.
            if !self.c.client_addr.is_some_and(|a| acl.permits(a.ip())) {
                return self.close(CloseReason::Denied);
            }
        }
        if let Some(table) = self.up.per_source[self.c.frontend as usize].as_mut() {
            // Unknown address (every lookup was in flight in a burst): refused, as by the access
            // list (a limit that anyone could pass by arriving in a burst would be none).
            let admitted = match self.c.client_addr {
                Some(a) => table.admit(table.limits().key(a.ip()), self.now.ms),
                None => Err(Refusal::Maxconn),
            };
            match admitted {
                Ok(()) => self.c.source_counted = true,
                Err(why) => {
                    let refused = &mut self.stats.frontends[self.c.frontend as usize].source_refused;
                    match why {
                        Refusal::Maxconn => refused.maxconn += 1,
                        Refusal::Rate => refused.rate += 1,
                        Refusal::TableFull => refused.table_full += 1,
                    }
                    return self.close(CloseReason::SourceLimit);
                }
            }
        }
        if fe.accept_proxy {
            self.enter(State::ProxyHeader);
            self.ensure_timer();
            self.peek_proxy_header();
        } else {
            self.dispatch();
        }
    }

    /// Gives back the connection's count in its frontend's per-source table.
    pub(super) fn release_source(&mut self) {
        if !std::mem::take(&mut self.c.source_counted) {
            return;
        }
        if let (Some(table), Some(a)) = (self.up.per_source[self.c.frontend as usize].as_mut(), self.c.client_addr) {
            table.release(table.limits().key(a.ip()));
        }
    }

    /// Peeks at the client's bytes if it may have sent more since the last look.
    pub(super) fn peek_proxy_header(&mut self) {
        if self.c.state != State::ProxyHeader || !matches!(self.c.step, Step::Idle) || !self.c.c2s.readable {
            return;
        }
        let Some(buf) = self.ring.header_buf() else {
            // Thousands of handshakes at once on one worker: shed this one.
            return self.close(CloseReason::BadProxyHeader);
        };
        self.c.c2s.seq_at_submit = self.c.c2s.ready_seq;
        self.stats.proxy_header_peeks += 1;
        let t = self.token(Op::HeaderPeek);
        let Some(client) = &self.c.client else { unreachable!("a live connection has its client") };
        // SAFETY: `buf` moves into `Step::HeaderPeek` right below; only this op's completion takes
        // it out.
        unsafe { self.ring.peek(client.sock(), &buf, t) };
        self.c.step = Step::HeaderPeek(buf);
    }

    pub(super) fn on_header_peek(&mut self, buf: HeaderBuf, res: i32) {
        let parsed = (res > 0).then(|| proxy_protocol::parse(&self.ring.header(&buf)[..res as usize]));
        match (res, parsed) {
            (_, Some(Ok(Parsed::Done(_)))) if !self.admit_after_header() => {
                // No maxconn share yet: wait for one with the header left in the socket.
                self.ring.give_header(buf);
            }
            (_, Some(Ok(Parsed::Done(h)))) => {
                let t = self.token(Op::HeaderRead);
                let Some(client) = &self.c.client else { unreachable!("a live connection has its client") };
                // SAFETY: `buf` moves into `Step::HeaderRead` right below; only this op's
                // completion takes it out.
                unsafe { self.ring.consume(client.sock(), &buf, h.len as u32, t) };
                self.c.step = Step::HeaderRead(buf);
            }
            // Not all there yet, and the client may still send the rest.
            (n, Some(Ok(Parsed::Incomplete))) if (n as usize) < MAX_HEADER && !self.c.c2s.hup => {
                self.ring.give_header(buf);
                self.wait_for_more();
            }
            // Too long, malformed, or the client ended (FIN, reset) before the end of its header.
            (_, Some(Ok(Parsed::Incomplete) | Err(_))) => {
                self.ring.give_header(buf);
                self.close(CloseReason::BadProxyHeader);
            }
            // EOF before a whole header.
            (0, None) => {
                self.ring.give_header(buf);
                self.close(CloseReason::BadProxyHeader);
            }
            (e, None) if e == -libc::EAGAIN => {
                self.ring.give_header(buf);
                self.wait_for_more();
            }
            (_, None) => {
                self.ring.give_header(buf);
                self.close(CloseReason::ClientReset);
            }
        }
    }

    /// The client's header is all there: trade its PROXY-header slot for the maxconn shares.
    /// `false` when there are none: the connection waits in the worker's admission FIFO.
    fn admit_after_header(&mut self) -> bool {
        if self.c.admission != Admission::Handshake {
            return true;
        }
        let fe = self.c.frontend as usize;
        if self.up.take(fe, Admission::Admitted) {
            self.up.release(fe, Admission::Handshake);
            self.follow.admission = true;
            self.c.admission = Admission::Admitted;
            self.count_admission(Admission::Handshake, false);
            self.count_admission(Admission::Admitted, true);
            return true;
        }
        self.up.want(fe, Admission::Admitted);
        self.fe_stats().limit_hits.global += 1;
        self.enter(State::Admitting);
        self.timers.cancel(self.idx, self.links);
        self.admitting.push_back((self.idx, self.c.generation));
        false
    }

    /// A share came back for this waiting connection (`State::Admitting`): take it and read the
    /// header. `false` if there is still none (it stays first in the FIFO).
    pub(crate) fn resume_admission(&mut self) -> bool {
        let fe = self.c.frontend as usize;
        if !self.up.take(fe, Admission::Admitted) {
            return false;
        }
        self.up.release(fe, Admission::Handshake);
        self.follow.admission = true;
        self.c.admission = Admission::Admitted;
        self.count_admission(Admission::Handshake, false);
        self.count_admission(Admission::Admitted, true);
        self.enter(State::ProxyHeader);
        self.ensure_timer();
        // The header is still in the socket: look at it again (and now read it).
        self.c.c2s.readable = true;
        self.peek_proxy_header();
        true
    }

    /// The header is not all there: look again when the client sends more.
    fn wait_for_more(&mut self) {
        let f = &mut self.c.c2s;
        if f.ready_seq == f.seq_at_submit {
            f.readable = false;
        }
        self.peek_proxy_header();
    }

    pub(super) fn on_header_read(&mut self, buf: HeaderBuf, res: i32) {
        let parsed = (res > 0).then(|| proxy_protocol::parse(&self.ring.header(&buf)[..res as usize]));
        self.ring.give_header(buf);
        match parsed {
            Some(Ok(Parsed::Done(h))) if h.len == res as usize => {
                if h.source.is_some() {
                    self.c.client_addr = h.source;
                }
                self.c.dest = h.dest;
                self.dispatch();
            }
            _ => self.close(CloseReason::BadProxyHeader),
        }
    }
}
