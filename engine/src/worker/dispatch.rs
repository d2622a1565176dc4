//! Getting a connection to a server: pick one (balance.rs), take the backend and server shares,
//! pick a source from this worker's shard, run the connect chain, and on failure try again on
//! another server up to `retries` times. With every eligible server at its maxconn the connection
//! waits in the backend's queue (FIFO) until a slot frees or `timeout queue` passes.

use super::Worker;
use crate::conn::{CloseReason, Dir, NO_INDEX, NO_SLOT, State};
use crate::worker::token::Op;

/// What happened when a connection looked for a server.
enum Outcome {
    Connecting,
    /// Every eligible server (or the backend) is at its maxconn.
    Full,
    /// No server can take it at all (all tried, weight 0, or out of ports).
    Failed,
}

impl Worker {
    /// Sends a connection that has no server yet to one, or queues it.
    pub(crate) fn dispatch(&mut self, idx: u32) {
        let b = self.conns.at(idx).backend as usize;
        if !self.backends[b].queue.is_empty() {
            // First come, first served: do not overtake queued connections.
            self.enqueue(idx);
            return;
        }
        match self.try_connect(idx) {
            Outcome::Connecting => {}
            Outcome::Full => self.enqueue(idx),
            Outcome::Failed => self.close(idx, CloseReason::ConnectFailed),
        }
    }

    fn try_connect(&mut self, idx: u32) -> Outcome {
        let c = self.conns.at(idx);
        let b = c.backend as usize;
        let (tried, client) = (c.tried, c.client.map(|a| a.ip()));
        if let Some(l) = self.backends[b].limit
            && !self.shares.has_room(l)
        {
            self.stats.limit_hits.backend += 1;
            self.shares.want(l, &mut self.outbox);
            return Outcome::Full;
        }
        if self.server_slots.is_empty() {
            // Every server-socket slot belongs to a connection still closing: wait a moment (the
            // queue is served again as soon as one is free).
            return Outcome::Full;
        }
        let shares = &self.shares;
        let be = &mut self.backends[b];
        let servers = &be.servers;
        let free = |i: usize| servers[i].limit.is_none_or(|l| shares.has_room(l));
        let usable = |i: usize| servers[i].up && tried & (1 << (i % 64)) == 0 && servers[i].sources.remaining_or_any();
        let pick = be.balancer.pick(|i| servers[i].active, client, |i| usable(i) && free(i));
        let Some(s) = pick else {
            // Nobody free: is it because of maxconn (wait) or because nobody is left (fail)?
            let full: Vec<usize> = (0..servers.len())
                .filter(|&i| usable(i) && !free(i) && self.cfg.backends[b].servers[i].weight > 0)
                .collect();
            if !full.is_empty() {
                self.stats.limit_hits.server += 1;
                for i in full {
                    if let Some(l) = self.backends[b].servers[i].limit {
                        self.shares.want(l, &mut self.outbox);
                    }
                }
                return Outcome::Full;
            }
            if tried != 0 && self.conns.at(idx).attempts <= self.cfg.backends[b].retries as u8 {
                // Every server was tried once; allow another round within the retries.
                self.conns.at(idx).tried = 0;
                return self.try_connect(idx);
            }
            return Outcome::Failed;
        };
        self.connect(idx, s);
        Outcome::Connecting
    }

    /// Takes the shares and a source and pushes the connect chain toward server `s`.
    fn connect(&mut self, idx: u32, s: usize) {
        let b = self.conns.at(idx).backend as usize;
        let be = &mut self.backends[b];
        let mut ids = [0u32; 2];
        let mut n = 0;
        for l in [be.limit, be.servers[s].limit].into_iter().flatten() {
            ids[n] = l;
            n += 1;
        }
        let taken = self.shares.take_all(&ids[..n]);
        debug_assert!(taken, "room was checked by try_connect");
        let srv = &mut self.backends[b].servers[s];
        let source = if srv.sources.is_empty() { None } else { srv.sources.pick() };
        let source_addr = source.map(|i| srv.sources.addrs[i]);
        srv.active += 1;
        srv.total += 1;
        let (dest, timeout) = (srv.dest, self.backends[b].connect_timeout);
        let slot = self.server_slots.pop().unwrap_or(NO_SLOT);
        let c = self.conns.at(idx);
        c.server = s as u16;
        c.source = source.map_or(NO_INDEX, |i| i as u16);
        c.server_shares = true;
        c.tried |= 1 << (s % 64);
        c.attempts += 1;
        c.connect_result = 0;
        c.connect_timed_out = false;
        c.state = State::Connecting;
        c.connect_after_us = (self.now_us.saturating_sub(c.t_accept_us)).min(u64::from(u32::MAX)) as u32;
        if slot == NO_SLOT {
            // Cannot happen with the plan's table sizes; fail this attempt rather than panic.
            c.connect_result = -libc::EMFILE;
            self.on_connect_done(idx);
            return;
        }
        c.server_slot = slot;
        let generation = c.generation;
        let ops = self.ring.connect_chain(slot, dest, source_addr, timeout, |op| {
            crate::worker::token::Token::conn(op, idx, generation)
        });
        let c = self.conns.at(idx);
        for op in ops {
            c.inflight |= op.bit();
        }
    }

    /// The whole connect chain has completed: established, or try again elsewhere.
    pub(crate) fn on_connect_done(&mut self, idx: u32) {
        let c = self.conns.at(idx);
        let (result, timed_out, b, s) = (c.connect_result, c.connect_timed_out, c.backend as usize, c.server as usize);
        let took = self.now_us.saturating_sub(c.t_accept_us + u64::from(c.connect_after_us));
        c.connect_took_us = took.min(u64::from(u32::MAX)) as u32;
        if result == 0 && !timed_out {
            let k = self.server_index[b] + s;
            let _ = self.connect_latency[k].record(took.max(1));
            match self.cfg.backends[b].servers[s].send_proxy {
                Some(v) => self.begin_send_proxy(idx, v),
                None => self.establish(idx),
            }
            return;
        }
        let errors = &mut self.stats.connect_errors;
        match -result {
            _ if timed_out => errors.timeout += 1,
            libc::ETIMEDOUT | libc::ECANCELED => errors.timeout += 1,
            libc::ECONNREFUSED => errors.refused += 1,
            libc::EADDRNOTAVAIL | libc::EADDRINUSE => errors.port_exhausted += 1,
            libc::ENETUNREACH | libc::EHOSTUNREACH => errors.unreachable += 1,
            _ => errors.other += 1,
        }
        self.backends[b].servers[s].errors += 1;
        let slot = c.server_slot;
        c.server_slot = NO_SLOT;
        if slot != NO_SLOT {
            self.ring.close_fixed(slot, crate::worker::token::Token::worker(Op::CloseFixed, slot));
        }
        self.release_server(idx);
        let retries = self.cfg.backends[b].retries;
        let c = self.conns.at(idx);
        if u32::from(c.attempts) <= retries {
            self.stats.retries += 1;
            match self.try_connect(idx) {
                Outcome::Connecting => {}
                Outcome::Full => self.enqueue(idx),
                Outcome::Failed => self.close(idx, CloseReason::ConnectFailed),
            }
        } else {
            self.close(idx, CloseReason::ConnectFailed);
        }
    }

    /// Connected (and any PROXY header sent): watch the server, start moving bytes.
    pub(crate) fn establish(&mut self, idx: u32) {
        let now = self.now;
        let c = self.conns.at(idx);
        c.state = State::Established;
        c.last_server = now;
        let slot = c.server_slot;
        let t = self.token(idx, Op::ServerPoll);
        self.ring.poll_multi(slot, crate::conn::POLLIN_EVENTS, t);
        self.ensure_timer(idx);
        for dir in Dir::BOTH {
            self.pump(idx, dir);
        }
    }

    /// Gives back the server's and backend's shares and the source port of this connection.
    pub(crate) fn release_server(&mut self, idx: u32) {
        let c = self.conns.at(idx);
        if !c.server_shares {
            return;
        }
        c.server_shares = false;
        // `server` and `source` stay recorded: the connection log names them.
        let (b, s, src) = (c.backend as usize, c.server as usize, c.source);
        let srv = &mut self.backends[b].servers[s];
        srv.active = srv.active.saturating_sub(1);
        if src != NO_INDEX {
            srv.sources.release(src as usize);
        }
        let ids = [srv.limit, self.backends[b].limit];
        for l in ids.into_iter().flatten() {
            self.shares.release(l, &mut self.outbox);
        }
        if !self.backends[b].queue.is_empty() {
            self.drain_queue(b);
        }
    }

    fn enqueue(&mut self, idx: u32) {
        let now = self.now;
        let c = self.conns.at(idx);
        if c.state != State::Queued {
            c.state = State::Queued;
            c.queued_at = now;
            self.stats.queued += 1;
            self.stats.queued_total += 1;
        }
        let (b, generation) = (c.backend as usize, c.generation);
        self.backends[b].queue.push_back((idx, generation));
        self.ensure_timer(idx);
    }

    /// Serves queued connections of every backend (after share arrived from another worker).
    pub(crate) fn drain_queues(&mut self) {
        for b in 0..self.backends.len() {
            self.drain_queue(b);
        }
    }

    /// Serves backend `b`'s queue in order while servers have room.
    pub(crate) fn drain_queue(&mut self, b: usize) {
        while let Some(&(idx, generation)) = self.backends[b].queue.front() {
            let live = self
                .conns
                .get(idx, generation & crate::worker::token::GENERATION_MASK)
                .is_some_and(|c| c.state == State::Queued);
            if !live {
                self.backends[b].queue.pop_front();
                continue;
            }
            match self.try_connect(idx) {
                Outcome::Connecting => {
                    self.backends[b].queue.pop_front();
                    self.stats.queued -= 1;
                }
                Outcome::Full => break,
                Outcome::Failed => {
                    self.backends[b].queue.pop_front();
                    self.stats.queued -= 1;
                    self.conns.at(idx).state = State::Connecting;
                    self.close(idx, CloseReason::ConnectFailed);
                }
            }
        }
    }
}
