//! A connection moving to another engine's worker on reload: the connection's side (the workers'
//! side — plan, offers, grants, hand-over messages — is worker/moving.rs).
//!
//! [`Ctx::begin_move`] arms nothing new and cancels the watches in flight (polls, multishot
//! receives); bytes already received are still sent, an EOF already read stays to be forwarded.
//! Once nothing is in flight ([`Conn::ready_to_move`]: nothing of it is in any pool, no completion
//! will name it) the worker offers it to the new worker. Granted two slots there,
//! [`Ctx::send_away`] installs both sockets in them (two MSG_RINGs, a [`Step::Move`] record); when
//! both are in, [`Ctx::leave`] gives back what the connection held in this engine and frees the
//! entry, closing only this table's references to the sockets, while the new worker opens an entry
//! on its slots with the same times, counters and half-closes ([`Ctx::arrive`]). Refused, or a
//! MSG_RING failed: [`Ctx::resume`], and it goes on here. Bytes that arrive meanwhile wait in the
//! kernel's socket buffers and are read by whichever worker arms the next receive.

use std::net::{IpAddr, SocketAddr};

use super::{Admission, Conn, Ctx, Dir, FlowIo, Half, NO_INDEX, POLLIN_EVENTS, State, Step};
use crate::worker::ring::{ClientSlot, ServerSlot};
use crate::worker::token::Op;

/// What a moving connection carries besides its two sockets. Times are on the workers' shared
/// clock (`Clock`), so they mean the same in the new worker.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MovedState {
    /// The address of the listener that accepted it.
    pub listener_addr: SocketAddr,
    /// The source address its server socket is bound to, when it has one of the server's.
    pub source_ip: Option<IpAddr>,
    pub attempts: u8,
    pub tried: u64,
    pub jitter: u16,
    pub client_addr: Option<SocketAddr>,
    pub dest: Option<SocketAddr>,
    pub t_accept_us: u64,
    pub connect_after_us: u32,
    pub connect_took_us: u32,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub last_client: u64,
    pub last_server: u64,
    /// Client → server, server → client.
    pub halves: [Half; 2],
}

/// A connection handed over: the key its offer named (slab index, generation in the old worker),
/// the slot of the new ring holding its client socket, and its state.
#[derive(Debug)]
pub struct Moved {
    pub key: (u32, u32),
    pub client_slot: u32,
    pub state: MovedState,
}

impl Conn {
    /// Moving, and nothing of it is in flight: it can be offered (or handed over).
    pub fn ready_to_move(&self) -> bool {
        self.moving && self.state == State::Established && self.idle()
    }
}

impl Ctx<'_> {
    /// Starts moving an established connection: nothing new is armed, and the watches in flight
    /// are cancelled (their last completions still come, and bytes they bring are sent on).
    pub(crate) fn begin_move(&mut self) {
        if self.c.state != State::Established || self.c.moving {
            return;
        }
        self.c.moving = true;
        let watches = [
            (self.c.client_poll, Op::ClientPoll),
            (self.c.server_poll, Op::ServerPoll),
            (self.c.client_recv, Op::ClientRecv),
            (self.c.server_recv, Op::ServerRecv),
        ];
        for (armed, op) in watches {
            if armed {
                self.cancel(op);
            }
        }
        for dir in Dir::BOTH {
            // (A swapped receive's poll is among the watches cancelled: the worker it moves to
            // arms a receive.)
            self.end_idle_poll(dir);
            // A flow waiting for a pipe or receive buffers holds nothing: its place in the FIFO
            // goes stale.
            let f = self.c.flow(dir);
            if matches!(f.io, FlowIo::Waiting) {
                f.io = FlowIo::Idle;
            }
        }
    }

    /// Granted slot `server` (and `client`, or one the kernel picks) of the ring `target`: hands
    /// both sockets over.
    pub(crate) fn send_away(&mut self, target: std::os::fd::RawFd, client: Option<u32>, server: u32) {
        debug_assert!(self.c.ready_to_move());
        let (tc, ts) = (self.token(Op::MoveClient), self.token(Op::MoveServer));
        let (Some(c), Some(s)) = (&self.c.client, &self.c.server_slot) else {
            unreachable!("established: both sockets exist")
        };
        self.ring.send_slot(c.sock(), target, client, tc);
        self.ring.send_slot(s.sock(), target, Some(server), ts);
        self.c.step = Step::Move { client: true, server: true, failed: false, slot: u32::MAX };
    }

    /// Makes process descriptors of both sockets (FIXED_FD_INSTALL), to hand to a new process.
    pub(crate) fn export(&mut self) {
        debug_assert!(self.c.ready_to_move());
        let (tc, ts) = (self.token(Op::ExportClient), self.token(Op::ExportServer));
        let (Some(c), Some(s)) = (&self.c.client, &self.c.server_slot) else {
            unreachable!("established: both sockets exist")
        };
        self.ring.install_fd(c.sock(), tc);
        self.ring.install_fd(s.sock(), ts);
        self.c.step = Step::Export { client: true, server: true };
    }

    /// The move is off (refused, or a MSG_RING failed): the connection goes on here.
    pub(crate) fn resume(&mut self) {
        if !self.c.moving || self.c.is_closing() || !self.c.is_live() {
            return;
        }
        self.c.moving = false;
        self.rearm_after_move();
    }

    /// What the connection carries to the new worker.
    pub(crate) fn moved_state(&self) -> MovedState {
        let c = &*self.c;
        MovedState {
            listener_addr: self.listeners[c.listener as usize].addr,
            source_ip: self.up.source_ip(c),
            attempts: c.attempts,
            tried: c.tried,
            jitter: c.jitter,
            client_addr: c.client_addr,
            dest: c.dest,
            t_accept_us: c.t_accept_us,
            connect_after_us: c.connect_after_us,
            connect_took_us: c.connect_took_us,
            bytes_in: c.bytes_in,
            bytes_out: c.bytes_out,
            last_client: c.last_client,
            last_server: c.last_server,
            halves: [c.c2s.half, c.s2c.half],
        }
    }

    /// Both sockets are in the new ring's table: gives back what the connection held here (its
    /// shares, source port, per-source count, timer) and frees the entry. Closing this table's
    /// slots drops only their references: the sockets stay open in the other table.
    pub(crate) fn leave(&mut self) {
        debug_assert!(self.c.ready_to_move());
        self.timers.cancel(self.idx, self.links);
        self.release_server();
        self.release_admission();
        self.release_source();
        if let Some(client) = self.c.client.take() {
            self.ring.close_client(client, false);
        }
        if let Some(server) = self.c.server_slot.take() {
            self.ring.close_server(server, false);
        }
        self.unname_server();
        self.stats.moved_out += 1;
        self.enter(State::Free);
        self.release_fds();
        let generation = self.c.generation.wrapping_add(1);
        *self.c = Conn { generation, ..Conn::default() };
    }

    /// Opens this (free) entry for a connection moved in from another engine: its sockets in
    /// `client` and `server`, its maxconn shares already taken and its server's counts already
    /// raised (by the grant), to server `s` of backend `b` through listener `listener` of
    /// frontend `fe`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn arrive(
        &mut self,
        listener: u16,
        (fe, b, s): (u16, u16, u16),
        client: ClientSlot,
        server: ServerSlot,
        st: MovedState,
    ) {
        debug_assert!(!self.c.is_live());
        let bulk = self.cfg.backends[usize::from(b)].splice == crate::config::SpliceMode::Always;
        let c = &mut *self.c;
        c.listener = listener;
        c.frontend = fe;
        c.backend = b;
        c.server = s;
        c.attempts = st.attempts;
        c.tried = st.tried;
        c.jitter = st.jitter;
        c.client_addr = st.client_addr;
        c.dest = st.dest;
        c.t_accept_us = st.t_accept_us;
        c.connect_after_us = st.connect_after_us;
        c.connect_took_us = st.connect_took_us;
        c.bytes_in = st.bytes_in;
        c.bytes_out = st.bytes_out;
        c.last_client = st.last_client;
        c.last_server = st.last_server;
        // An established connection: its next messages are quiet ones unless more follow.
        c.rx_ms = [(self.now.ms as u16).wrapping_sub(crate::worker::QUIET_MS); 2];
        c.c2s.half = st.halves[0];
        c.s2c.half = st.halves[1];
        c.c2s.bulk = bulk;
        c.s2c.bulk = bulk;
        c.client = Some(client);
        c.server_slot = Some(server);
        c.admission = Admission::Admitted;
        c.server_shares = true;
        // (It counts on its server since it was granted its place: `land`.)
        let srv = &mut self.up.backends[b as usize].servers[s as usize];
        c.source = st.source_ip.and_then(|ip| srv.sources.adopt(ip)).map_or(NO_INDEX, |j| j as u16);
        if let (Some(table), Some(a)) = (self.up.per_source[fe as usize].as_mut(), c.client_addr) {
            c.source_counted = table.adopt(table.limits().key(a.ip()));
        }
        self.count_admission(Admission::Admitted, true);
        self.stats.moved_in += 1;
        self.enter(State::Established);
        self.rearm_after_move();
    }

    /// Watches both sockets again and moves what is waiting, as `establish` does.
    fn rearm_after_move(&mut self) {
        if self.ring_mode() {
            for dir in Dir::BOTH {
                // (Paused for a long queue or for buffers: the queue is empty now.)
                self.c.flow(dir).paused = false;
                self.arm_recv(dir);
            }
        } else {
            // Both polls, as from accept and establish on (they also see an error on a socket
            // whose reading is done).
            if let (false, Some(c)) = (self.c.client_poll, &self.c.client) {
                let t = self.token(Op::ClientPoll);
                self.ring.poll_multi(c.sock(), POLLIN_EVENTS, t);
                self.c.client_poll = true;
            }
            if let (false, Some(s)) = (self.c.server_poll, &self.c.server_slot) {
                let t = self.token(Op::ServerPoll);
                self.ring.poll_multi(s.sock(), POLLIN_EVENTS, t);
                self.c.server_poll = true;
            }
        }
        for dir in Dir::BOTH {
            self.pump(dir);
        }
        // (Once the receives are armed, as `establish` does.)
        self.ensure_timer();
        self.check_done();
    }
}
