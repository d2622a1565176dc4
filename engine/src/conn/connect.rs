//! Getting a connection to a server: pick one (balance.rs), take the backend and server shares,
//! pick a source from this worker's shard, run the connect chain, and on failure try again on
//! another server up to `retries` times; then send our PROXY header (`send_proxy`) and start
//! moving bytes. With every eligible server at its maxconn the connection waits in the backend's
//! queue (FIFO) until a slot frees or `timeout queue` passes.
//!
//! Resources and who holds them: the backend/server shares and the source port from `connect`
//! until `release_server` (on a failed attempt or at close); the server slot from `connect` until
//! the connection's close (or the failed attempt's close); the connect chain's CONNECT and
//! LINK_TIMEOUT are in flight as `Step::Connect`, and its SKIP_SUCCESS steps hold nothing.

use std::os::fd::OwnedFd;

use super::{Admission, CloseReason, Ctx, Dir, NO_INDEX, POLLIN_EVENTS, State, Step};
use crate::config::ProxyVersion;
use crate::proxy_protocol;
use crate::worker::ring::HeaderBuf;
use crate::worker::token::{Op, Token};

/// At most one "out of source ports" line per server and worker per this interval.
const PORTS_LOG_MS: u64 = 10_000;

/// What happened when a connection looked for a server.
enum Outcome {
    Connecting,
    /// Every eligible server (or the backend) is at its maxconn, or no server slot is free.
    Full,
    /// No server can take it at all (all tried, weight 0, or out of ports).
    Failed,
}

impl Ctx<'_> {
    /// Sends a connection that has no server yet to one, or queues it.
    pub(super) fn dispatch(&mut self) {
        let b = self.c.backend as usize;
        if !self.up.backends[b].queue.is_empty() {
            // First come, first served: do not overtake queued connections.
            return self.enqueue();
        }
        match self.try_connect() {
            Outcome::Connecting => {}
            Outcome::Full => self.enqueue(),
            Outcome::Failed => self.close(CloseReason::ConnectFailed),
        }
    }

    /// A queued connection's turn: `false` when every server is still full (it stays first in the
    /// queue); `true` when it left the queue (connecting, or closed because nobody can take it).
    pub(crate) fn try_dequeue(&mut self) -> bool {
        match self.try_connect() {
            Outcome::Connecting => true,
            Outcome::Full => false,
            Outcome::Failed => {
                self.close(CloseReason::ConnectFailed);
                true
            }
        }
    }

    /// Picks a server with room and starts connecting to it.
    fn try_connect(&mut self) -> Outcome {
        let b = self.c.backend as usize;
        let (tried, client) = (self.c.tried, self.c.client_addr.map(|a| a.ip()));
        let up = &mut *self.up;
        if let Some(l) = up.backends[b].limit
            && !up.shares.has_room(l)
        {
            self.stats.frontends[self.c.frontend as usize].limit_hits.backend += 1;
            up.shares.want(l, &mut up.outbox);
            return Outcome::Full;
        }
        if up.server_slots.is_empty() {
            // Every server-socket slot belongs to a connection still closing: wait a moment (the
            // queues are served again as soon as one is free).
            return Outcome::Full;
        }
        let shares = &up.shares;
        let be = &mut up.backends[b];
        if be.ramping > 0 {
            be.ramp(self.now.ms, &self.cfg.backends[b]);
        }
        let servers = &be.servers;
        let cfg_servers = &self.cfg.backends[b].servers;
        // Backup servers serve only while no normal server is available (UP and not set to drain
        // or maint), whatever its weight or maxconn.
        let backups_serve = !(0..servers.len()).any(|i| !cfg_servers[i].backup && servers[i].available());
        let free = |i: usize| servers[i].limit.is_none_or(|l| shares.has_room(l));
        let usable = |i: usize| {
            servers[i].available()
                && (backups_serve || !cfg_servers[i].backup)
                && tried & (1 << (i % 64)) == 0
                && servers[i].sources.remaining_or_any()
        };
        let (ramping, picks, algo) = (be.ramping > 0, be.picks, be.balancer.algo());
        let capped = |i: usize| ramping && crate::worker::upstream::ramp_capped(servers, picks, algo, i);
        let mut pick = be.balancer.pick(|i| servers[i].active, client, |i| usable(i) && free(i) && !capped(i));
        if pick.is_none() && ramping {
            // Only a ramping server can take it: it does (the ramp shapes the share, never refuses).
            pick = be.balancer.pick(|i| servers[i].active, client, |i| usable(i) && free(i));
        }
        let Some(s) = pick else {
            // Nobody free: is it because of maxconn (wait) or because nobody is left (fail)?
            let full: Vec<usize> =
                (0..servers.len()).filter(|&i| usable(i) && !free(i) && be.balancer.weight(i) > 0).collect();
            if !full.is_empty() {
                self.stats.frontends[self.c.frontend as usize].limit_hits.server += 1;
                for i in full {
                    if let Some(l) = up.backends[b].servers[i].limit {
                        up.shares.want(l, &mut up.outbox);
                    }
                }
                return Outcome::Full;
            }
            if tried != 0 && u32::from(self.c.attempts) <= self.cfg.backends[b].retries {
                // Every server was tried once; allow another round within the retries.
                self.c.tried = 0;
                return self.try_connect();
            }
            return Outcome::Failed;
        };
        self.connect(s);
        Outcome::Connecting
    }

    /// Takes the shares, a source and a server slot, and pushes the connect chain to server `s`.
    fn connect(&mut self, s: usize) {
        let b = self.c.backend as usize;
        let up = &mut *self.up;
        let mut ids = [0u32; 2];
        let mut n = 0;
        for l in [up.backends[b].limit, up.backends[b].servers[s].limit].into_iter().flatten() {
            ids[n] = l;
            n += 1;
        }
        let taken = up.shares.take_all(&ids[..n]);
        debug_assert!(taken, "room was checked by try_connect");
        let timeout = up.backends[b].connect_timeout;
        up.backends[b].picks += 1;
        let srv = &mut up.backends[b].servers[s];
        if srv.ramp_from.is_some() {
            srv.ramp_picks += 1;
        }
        let source = if srv.sources.is_empty() { None } else { srv.sources.pick() };
        let source_addr = source.map(|i| crate::sources::ServerAddrs::source(srv.addrs, i));
        srv.active += 1;
        srv.total += 1;
        srv.refs += 1;
        let dest = crate::sources::ServerAddrs::dest(srv.addrs);
        let slot = up.server_slots.take();
        let c = &mut *self.c;
        let before = std::mem::replace(&mut c.server, s as u16);
        if before != NO_INDEX {
            // A retry: the server tried before is no longer named.
            up.backends[b].servers[before as usize].unnamed();
        }
        c.source = source.map_or(NO_INDEX, |i| i as u16);
        c.server_shares = true;
        c.tried |= 1 << (s % 64);
        c.attempts = c.attempts.saturating_add(1);
        c.connect_result = 0;
        c.connect_timed_out = false;
        c.connect_after_us = (self.now.us.saturating_sub(c.t_accept_us)).min(u64::from(u32::MAX)) as u32;
        self.enter(State::Connecting);
        let Some(slot) = slot else {
            // try_connect checked there was one; fail this attempt rather than panic.
            self.c.connect_result = -libc::EMFILE;
            return self.on_connect_done();
        };
        let (idx, generation) = (self.idx, self.c.generation);
        self.ring.connect_chain(&slot, dest, source_addr, timeout, |op| Token::conn(op, idx, generation));
        self.c.server_slot = Some(slot);
        self.c.step = Step::Connect { connect: true, timeout: true };
    }

    /// The whole connect chain has completed: established, or try again elsewhere.
    pub(super) fn on_connect_done(&mut self) {
        let c = &mut *self.c;
        let (result, timed_out, b, s) = (c.connect_result, c.connect_timed_out, c.backend as usize, c.server as usize);
        let took = self.now.us.saturating_sub(c.t_accept_us + u64::from(c.connect_after_us));
        c.connect_took_us = took.min(u64::from(u32::MAX)) as u32;
        if result == 0 && !timed_out {
            let k = self.up.server_index[b] + s;
            self.up.connect_latency[k].record(took);
            return match self.cfg.backends[b].servers[s].send_proxy {
                Some(v) => self.begin_send_proxy(v),
                None => self.establish(),
            };
        }
        let errors = &mut self.stats.connect_errors;
        match -result {
            _ if timed_out => errors.timeout += 1,
            libc::ETIMEDOUT | libc::ECANCELED => errors.timeout += 1,
            libc::ECONNREFUSED => errors.refused += 1,
            libc::EADDRNOTAVAIL | libc::EADDRINUSE => {
                errors.port_exhausted += 1;
                self.ports_ran_out(b, s);
            }
            libc::ENETUNREACH | libc::EHOSTUNREACH => errors.unreachable += 1,
            _ => errors.other += 1,
        }
        self.up.backends[b].servers[s].errors += 1;
        if let Some(slot) = self.c.server_slot.take() {
            self.ring.close_server(slot, false);
        }
        self.release_server();
        if u32::from(self.c.attempts) <= self.cfg.backends[b].retries {
            self.stats.retries += 1;
            match self.try_connect() {
                Outcome::Connecting => {}
                Outcome::Full => self.enqueue(),
                Outcome::Failed => self.close(CloseReason::ConnectFailed),
            }
        } else {
            self.close(CloseReason::ConnectFailed);
        }
    }

    /// A connect to server `s` of backend `b` found no free source port: counted, and said in a
    /// log line at most every `PORTS_LOG_MS` per server and worker, with the fix.
    fn ports_ran_out(&mut self, b: usize, s: usize) {
        let source = self.up.source_ip(self.c);
        let srv = &mut self.up.backends[b].servers[s];
        let now = self.now.ms;
        if srv.ports_logged_at.is_some_and(|t| now < t.saturating_add(PORTS_LOG_MS)) {
            srv.ports_unlogged += 1;
            return;
        }
        let (be, cfg) = (&self.cfg.backends[b], &self.cfg.backends[b].servers[s]);
        let from = source.map_or("its address".to_string(), |ip| format!("source {ip}"));
        let more = match srv.ports_unlogged {
            0 => String::new(),
            n => format!(" ({n} more since the last report)"),
        };
        eprintln!(
            "ringproxy: worker {}: no free port from {from} to server {}/{} ({}): the connect failed{more}; \
             each source address has {} ports toward one server. Add source addresses (servers[].source) \
             or widen net.ipv4.ip_local_port_range",
            self.worker, be.name, cfg.name, cfg.address, srv.sources.capacity
        );
        srv.ports_logged_at = Some(now);
        srv.ports_unlogged = 0;
    }

    /// Connected to a `send_proxy` server: tell it who the client is before anything else.
    fn begin_send_proxy(&mut self, version: ProxyVersion) {
        self.enter(State::SendingProxy);
        if self.c.dest.is_none() {
            let l = self.listeners[self.c.listener as usize];
            if l.addr.ip().is_unspecified() && self.ring.io().fd_install {
                // A wildcard listener: ask the kernel which local address the client reached.
                // (Without FIXED_FD_INSTALL the plain-accept fallback read it at accept.)
                let t = self.token(Op::LocalAddr);
                let Some(client) = &self.c.client else { unreachable!("a live connection has its client") };
                self.ring.install_fd(client.sock(), t);
                self.c.step = Step::LocalAddr;
                return;
            }
            self.c.dest = (!l.addr.ip().is_unspecified()).then_some(l.addr);
        }
        self.send_proxy(version);
    }

    pub(super) fn on_local_addr(&mut self, fd: Option<OwnedFd>) {
        if let Some(fd) = &fd {
            let sock = socket2::SockRef::from(fd);
            self.c.dest = sock.local_addr().ok().and_then(|a| a.as_socket());
        }
        drop(fd);
        let (b, s) = (self.c.backend as usize, self.c.server as usize);
        let version = self.cfg.backends[b].servers[s].send_proxy.unwrap_or(ProxyVersion::V1);
        self.send_proxy(version);
    }

    fn send_proxy(&mut self, version: ProxyVersion) {
        let Some(mut buf) = self.ring.header_buf() else {
            return self.close(CloseReason::ConnectFailed);
        };
        let header = write_header(version, self.c.client_addr, self.c.dest);
        let len = self.ring.fill_header(&mut buf, &header);
        let t = self.token(Op::ProxySend);
        let Some(server) = &self.c.server_slot else { unreachable!("connected: the server slot is held") };
        // SAFETY: `buf` moves into `Step::ProxySend` right below; only this op's completion takes
        // it out.
        unsafe { self.ring.send_header(server.sock(), &buf, len, t) };
        self.c.step = Step::ProxySend(buf);
    }

    pub(super) fn on_proxy_sent(&mut self, buf: HeaderBuf, res: i32) {
        self.ring.give_header(buf);
        if res > 0 {
            self.stats.proxy_headers_sent += 1;
            self.establish();
        } else {
            self.close(CloseReason::ServerReset);
        }
    }

    /// Connected (and any PROXY header sent): watch the server, start moving bytes.
    fn establish(&mut self) {
        self.enter(State::Established);
        // Bytes received so far came from the client before the server was there (`received`
        // counts the server's from now on).
        let c = &*self.c;
        if let Some(s) = self.up.backends[c.backend as usize].servers.get_mut(c.server as usize) {
            s.bytes_in += c.bytes_in;
            s.bytes_out += c.bytes_out;
        }
        self.c.last_server = self.now.ms;
        if self.ring_mode() {
            // The multishot receives watch both sockets from now on: the client's poll goes (when
            // the client's receive could not be armed at accept), and what that receive queued
            // meanwhile is sent.
            if self.c.client_poll {
                self.cancel(Op::ClientPoll);
            }
            self.send_early();
        } else {
            let t = self.token(Op::ServerPoll);
            let Some(server) = &self.c.server_slot else { unreachable!("connected: the server slot is held") };
            self.ring.poll_multi(server.sock(), POLLIN_EVENTS, t);
            self.c.server_poll = true;
        }
        for dir in Dir::BOTH {
            self.pump(dir);
        }
        // (Once the receives are armed: while one may be swapped for a poll, its idle point is
        // a deadline too.)
        self.ensure_timer();
    }

    /// The entry is about to be freed: the server it names (if any) is no longer named by it.
    pub(super) fn unname_server(&mut self) {
        let c = &mut *self.c;
        if c.server == NO_INDEX {
            return;
        }
        self.up.backends[c.backend as usize].servers[c.server as usize].unnamed();
        c.server = NO_INDEX;
    }

    /// Gives back the server's and the backend's shares and the source port of this connection.
    pub(super) fn release_server(&mut self) {
        let c = &mut *self.c;
        if !c.server_shares {
            return;
        }
        c.server_shares = false;
        // `server` and `source` stay recorded: the connection log names them.
        let (b, s, src) = (c.backend as usize, c.server as usize, c.source);
        let up = &mut *self.up;
        let srv = &mut up.backends[b].servers[s];
        srv.active = srv.active.saturating_sub(1);
        if src != NO_INDEX {
            srv.sources.release(src as usize);
        }
        for l in [srv.limit, up.backends[b].limit].into_iter().flatten() {
            up.shares.release(l, &mut up.outbox);
        }
        self.follow.queue(b as u16);
    }

    /// Gives back the shares this connection was admitted with (maxconn, or a PROXY-header slot).
    pub(super) fn release_admission(&mut self) {
        let a = std::mem::take(&mut self.c.admission);
        if a == Admission::None {
            return;
        }
        self.count_admission(a, false);
        self.up.release(self.c.frontend as usize, a);
        self.follow.admission = true;
    }

    fn enqueue(&mut self) {
        if self.c.state != State::Queued {
            self.enter(State::Queued);
            self.c.queued_at = self.now.ms;
        }
        let b = self.c.backend as usize;
        self.up.backends[b].queue.push_back((self.idx, self.c.generation));
        self.ensure_timer();
    }
}

/// The header for `client` → `dest`; without both addresses, the "unknown source" form of the
/// version (v1 `UNKNOWN`, v2 `LOCAL`), which servers accept and treat as the proxy itself.
fn write_header(
    version: ProxyVersion,
    client: Option<std::net::SocketAddr>,
    dest: Option<std::net::SocketAddr>,
) -> Vec<u8> {
    let mut v = Vec::with_capacity(64);
    match (version, client, dest) {
        (ProxyVersion::V1, Some(c), Some(d)) => {
            proxy_protocol::write_v1(c, d, &mut v);
        }
        (ProxyVersion::V2, Some(c), Some(d)) => {
            proxy_protocol::write_v2(c, d, &mut v);
        }
        (ProxyVersion::V1, _, _) => v.extend_from_slice(b"PROXY UNKNOWN\r\n"),
        (ProxyVersion::V2, _, _) => {
            v.extend_from_slice(&[0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]);
            v.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        }
    }
    v
}
