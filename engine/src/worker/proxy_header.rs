//! The PROXY protocol steps of a connection: reading the header a client sends (`accept_proxy`)
//! before choosing a server, and sending ours to the server (`send_proxy`) before any client byte.
//!
//! Reading peeks at what the client sent (nothing is consumed until a whole header is there), then
//! consumes exactly the header's length, so the first payload byte is the first byte spliced to the
//! server. A malformed or oversized header, or none within `timeout proxy_header`, closes that one
//! connection and counts in `proxy_header_errors`. Both steps use a buffer from the ring's header
//! pool, held only during the step.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};

use crate::config::ProxyVersion;
use crate::conn::{CloseReason, NO_TICKET, State};
use crate::proxy_protocol::{self, MAX_HEADER, Parsed};
use crate::worker::Worker;
use crate::worker::ring::BufTicket;
use crate::worker::token::Op;

impl Worker {
    /// After the peer lookup on an `accept_proxy` frontend: wait for the header.
    pub(crate) fn begin_proxy_header(&mut self, idx: u32) {
        self.conns.at(idx).state = State::ProxyHeader;
        self.ensure_timer(idx);
        self.peek_proxy_header(idx);
    }

    /// Peeks at the client's bytes if it may have sent more since the last look.
    pub(crate) fn peek_proxy_header(&mut self, idx: u32) {
        let c = self.conns.at(idx);
        let busy = c.inflight & (Op::HeaderPeek.bit() | Op::HeaderRead.bit()) != 0;
        if c.state != State::ProxyHeader || busy || !c.c2s.readable {
            return;
        }
        let ticket = if c.ticket != NO_TICKET {
            BufTicket(c.ticket)
        } else {
            match self.ring.header_buf() {
                Some(t) => t,
                None => {
                    // Thousands of handshakes at once on one worker: shed this one.
                    self.close(idx, CloseReason::BadProxyHeader);
                    return;
                }
            }
        };
        let c = self.conns.at(idx);
        c.ticket = ticket.0;
        c.c2s.seq_at_submit = c.c2s.ready_seq;
        let slot = c.client_slot;
        let t = self.token(idx, Op::HeaderPeek);
        self.ring.peek(slot, ticket, t);
    }

    pub(crate) fn on_header_peek(&mut self, idx: u32, result: i32) {
        let ticket = BufTicket(self.conns.at(idx).ticket);
        match result {
            n if n > 0 => match proxy_protocol::parse(&self.ring.header(ticket)[..n as usize]) {
                Ok(Parsed::Done(h)) => {
                    let slot = self.conns.at(idx).client_slot;
                    let t = self.token(idx, Op::HeaderRead);
                    self.ring.consume(slot, ticket, h.len as u32, t);
                }
                Ok(Parsed::Incomplete) if (n as usize) < MAX_HEADER => self.wait_for_more(idx),
                Ok(Parsed::Incomplete) | Err(_) => self.close(idx, CloseReason::BadProxyHeader),
            },
            // EOF before a whole header.
            0 => self.close(idx, CloseReason::BadProxyHeader),
            e if e == -libc::EAGAIN => self.wait_for_more(idx),
            _ => self.close(idx, CloseReason::ClientReset),
        }
    }

    /// The header is not all there: look again when the client sends more.
    fn wait_for_more(&mut self, idx: u32) {
        let f = &mut self.conns.at(idx).c2s;
        if f.ready_seq == f.seq_at_submit {
            f.readable = false;
        }
        self.peek_proxy_header(idx);
    }

    pub(crate) fn on_header_read(&mut self, idx: u32, result: i32) {
        let ticket = BufTicket(self.conns.at(idx).ticket);
        let parsed = (result > 0).then(|| proxy_protocol::parse(&self.ring.header(ticket)[..result as usize]));
        self.conns.at(idx).ticket = NO_TICKET;
        self.ring.release_header(ticket);
        match parsed {
            Some(Ok(Parsed::Done(h))) if h.len == result as usize => {
                let c = self.conns.at(idx);
                if h.source.is_some() {
                    c.client = h.source;
                }
                c.dest = h.dest;
                c.state = State::PeerName;
                self.dispatch(idx);
            }
            _ => self.close(idx, CloseReason::BadProxyHeader),
        }
    }

    /// Connected to a `send_proxy` server: tell it who the client is before anything else.
    pub(crate) fn begin_send_proxy(&mut self, idx: u32, version: ProxyVersion) {
        let c = self.conns.at(idx);
        c.state = State::SendingProxy;
        if c.dest.is_none() {
            let l = &self.listeners[c.listener as usize];
            if l.addr.ip().is_unspecified() {
                // A wildcard listener: ask the kernel which local address the client reached.
                let slot = c.client_slot;
                let t = self.token(idx, Op::LocalAddr);
                self.ring.install_fd(slot, t);
                return;
            }
            c.dest = Some(l.addr);
        }
        self.send_proxy(idx, version);
    }

    pub(crate) fn on_local_addr(&mut self, idx: u32, result: i32) {
        if result >= 0 {
            // SAFETY: FIXED_FD_INSTALL returned a new descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(result) };
            let sock = socket2::SockRef::from(&fd);
            self.conns.at(idx).dest = sock.local_addr().ok().and_then(|a| a.as_socket());
        }
        let c = self.conns.at(idx);
        let (b, s) = (c.backend as usize, c.server as usize);
        let version = self.cfg.backends[b].servers[s].send_proxy.unwrap_or(ProxyVersion::V1);
        self.send_proxy(idx, version);
    }

    fn send_proxy(&mut self, idx: u32, version: ProxyVersion) {
        let Some(ticket) = self.ring.header_buf() else {
            self.close(idx, CloseReason::ConnectFailed);
            return;
        };
        let c = self.conns.at(idx);
        let mut header = Vec::with_capacity(64);
        write_header(version, c.client, c.dest, &mut header);
        c.ticket = ticket.0;
        let slot = c.server_slot;
        let t = self.token(idx, Op::ProxySend);
        self.ring.send_header(slot, ticket, &header, t);
    }

    pub(crate) fn on_proxy_sent(&mut self, idx: u32, result: i32) {
        let c = self.conns.at(idx);
        let ticket = BufTicket(c.ticket);
        c.ticket = NO_TICKET;
        self.ring.release_header(ticket);
        if result > 0 {
            self.stats.proxy_headers_sent += 1;
            self.establish(idx);
        } else {
            self.close(idx, CloseReason::ServerReset);
        }
    }
}

/// The header for `client` → `dest`; without both addresses, the "unknown source" form of the
/// version (v1 `UNKNOWN`, v2 `LOCAL`), which servers accept and treat as the proxy itself.
fn write_header(version: ProxyVersion, client: Option<SocketAddr>, dest: Option<SocketAddr>, out: &mut Vec<u8>) {
    match (version, client, dest) {
        (ProxyVersion::V1, Some(c), Some(d)) => {
            proxy_protocol::write_v1(c, d, out);
        }
        (ProxyVersion::V2, Some(c), Some(d)) => {
            proxy_protocol::write_v2(c, d, out);
        }
        (ProxyVersion::V1, _, _) => out.extend_from_slice(b"PROXY UNKNOWN\r\n"),
        (ProxyVersion::V2, _, _) => {
            out.extend_from_slice(&[0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]);
            out.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        }
    }
}
