//! The worker's control plane: messages from other threads (share lending, stats snapshots,
//! drain, server health), the drain itself, and the snapshot of this worker's counters.
//! All of it runs between two loop turns, never inside a connection's transition.

use super::Worker;
use crate::admin::ServerOp;
use crate::conn::{CloseReason, Conn, State};
use crate::control::Control;
use crate::stats::{ROWS_PER_TURN, ServerState, SourceStats, WorkerStats};
use crate::worker::token::GENERATION_MASK;

/// How long past its drain's deadline a worker waits for the notifications of its zero-copy sends.
const ZC_GRACE_MS: u64 = 2000;

impl Worker {
    pub(super) fn on_control(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                Control::Share(m) => {
                    if self.up.shares.on_message(m, &mut self.up.outbox) {
                        self.share_arrived();
                        self.drain_queues();
                    }
                }
                Control::Rate(m) => self.on_rate(m),
                Control::Snapshot { rows, sources_from, sources, reply } => {
                    let _ = reply.send(self.snapshot(rows, sources_from, sources));
                }
                Control::Drain => self.start_drain(),
                Control::RearmAccepts => self.rearm_accepts(),
                Control::ServerState { backend, server, up } => {
                    let state = if up { ServerState::Up } else { ServerState::Down };
                    self.set_server_state(backend, server, state);
                }
                Control::Server { backend, server, op, done } => {
                    self.server_op(backend, server, op);
                    let _ = done.send(());
                }
                Control::AddServer { backend, server, config, addrs, done } => {
                    self.add_server(backend, server, config, *addrs);
                    let _ = done.send(());
                }
                Control::ListConns { filter, from, limit, reply } => {
                    let (lines, next) = self.list_conns(filter, from, limit);
                    let _ = reply.send((self.id, lines, next));
                }
                Control::MoveTo(plan) => self.move_to(plan),
                Control::MoveOffer { from, reply, items } => self.on_move_offer(from, reply, items),
                Control::MoveGrant { items, .. } => self.on_move_grant(items),
                Control::MoveArrive { from, conns } => self.on_move_arrive(from, conns),
                Control::MoveCancel { from, keys } => self.on_move_cancel(from, keys),
                Control::ExportTo(plan) => self.export_to(plan),
                Control::ExportAck { key, taken } => self.on_export_ack(key, taken),
            }
        }
    }

    /// A health check marked a server up or down.
    fn set_server_state(&mut self, b: usize, s: usize, state: ServerState) {
        let Some(srv) = self.up.backends.get(b).and_then(|be| be.servers.get(s)) else { return };
        let was = srv.available();
        self.up.backends[b].servers[s].state = state;
        if let Some(row) = self.stats.servers.get_mut(self.up.server_index[b] + s) {
            row.state = state;
        }
        self.availability_changed(b, s, was);
        if !state.is_up() && self.cfg.backends[b].on_down == crate::config::OnDown::ShutdownSessions {
            self.shut_down(b, s, CloseReason::ServerReset);
        }
    }

    /// The runtime API changes server `s` of backend `b`.
    fn server_op(&mut self, b: usize, s: usize, op: ServerOp) {
        let Some(srv) = self.up.backends.get(b).and_then(|be| be.servers.get(s)) else { return };
        let was = srv.available();
        match op {
            ServerOp::State(admin) => self.up.backends[b].servers[s].admin = admin,
            ServerOp::Weight(w) => {
                let be = &mut self.up.backends[b];
                be.servers[s].weight = w;
                if be.servers[s].ramp_from.is_some() {
                    be.ramp(self.now.ms, &self.cfg.backends[b]);
                } else {
                    be.balancer.set_weight(s, w.saturating_mul(crate::balance::WEIGHT_SCALE));
                }
            }
            ServerOp::Shutdown => self.shut_down(b, s, CloseReason::Killed),
            ServerOp::Remove => {
                let be = &mut self.up.backends[b];
                be.servers[s].removed = true;
                be.servers[s].weight = 0;
                be.balancer.set_weight(s, 0);
            }
        }
        self.availability_changed(b, s, was);
    }

    /// `add server`: `cfg` is the running configuration with the new server as server `s` of
    /// backend `b`; this worker takes it and sets the server up as it does at start: `addrs` (its
    /// address and this worker's share of its sources, made by the sender) become a block of the
    /// ring's table, its maxconn a new limit; its stats row. Nothing here is proportional to its
    /// sources. `s` is the next index, or that of a deleted server no connection names any more
    /// (the supervisor checked every worker's rows): its block of addresses, row, latency
    /// histogram and place in the balancer are the new server's.
    fn add_server(
        &mut self,
        b: usize,
        s: usize,
        cfg: std::sync::Arc<crate::config::Config>,
        addrs: crate::sources::ServerAddrs,
    ) {
        let servers = self.up.backends[b].servers.len();
        let reused = s < servers;
        if s > servers || reused && !self.up.backends[b].servers[s].removed {
            return; // (Neither the next index nor a deleted server's: cannot happen; nothing changes.)
        }
        self.cfg = cfg;
        let srv = &self.cfg.backends[b].servers[s];
        let limit = srv.maxconn.map(|m| self.up.shares.push(m, m.min(self.plan.conns_per_worker)));
        let (key, row) =
            (crate::balance::server_key(&srv.name), crate::stats::ServerStats::new(&self.cfg.backends[b].name, srv));
        let at = self.up.server_index[b] + s;
        if reused {
            let old = &self.up.backends[b].servers[s];
            // No connection names the deleted server (checked by the supervisor, and nothing can
            // name a deleted server again): no connect chain points at its addresses, and no log
            // line or connection list will name the new one in its place. Were one to, the old
            // block stays (it goes at the next reload) and the new one is added beside it.
            let (block, refs, old_limit) = (old.addrs, old.refs, old.limit);
            let block = if refs == 0 {
                self.ring.replace_addrs(block, addrs.block);
                // Its maxconn limit, held by nobody, goes to the next server added with one (not
                // this one: `push` above took an id retired by an earlier command, which every
                // worker has handled, so no message about the old use is still on its way).
                if let Some(l) = old_limit {
                    self.up.shares.retire(l, &mut self.up.outbox);
                }
                block
            } else {
                self.ring.add_addrs(addrs.block)
            };
            let be = &mut self.up.backends[b];
            be.stop_ramp(s);
            be.servers[s] = crate::worker::upstream::Server::new(block, addrs.sources, srv.weight, limit);
            // (What still names the old one is counted on, so that its end balances.)
            be.servers[s].refs = refs;
            be.balancer.replace_server(s, srv.weight, key);
            self.stats.servers[at] = row;
            self.up.connect_latency[at] = crate::stats::latency_histogram();
        } else {
            let block = self.ring.add_addrs(addrs.block);
            let be = &mut self.up.backends[b];
            be.servers.push(crate::worker::upstream::Server::new(block, addrs.sources, srv.weight, limit));
            be.balancer.add_server(srv.weight, key);
            // Its row and latency histogram go after the backend's last server: the flattened
            // tables of the backends after it move up by one (on every worker alike).
            self.stats.servers.insert(at, row);
            self.up.connect_latency.insert(at, crate::stats::latency_histogram());
            for i in &mut self.up.server_index[b + 1..] {
                *i += 1;
            }
        }
        // Added with a slowstart: it ramps up from now.
        self.up.backends[b].start_ramp(s, self.now.ms, &self.cfg.backends[b]);
        self.drain_queue(b);
        self.follow_up();
    }

    /// After a change to server `s`: coming back, it ramps up (`slowstart`) and takes the queued
    /// connections; going away, a ramp in progress ends.
    fn availability_changed(&mut self, b: usize, s: usize, was: bool) {
        let now = self.up.backends[b].servers[s].available();
        self.up.backends[b].balancer.set_available(s, now);
        if now && !was {
            self.up.backends[b].start_ramp(s, self.now.ms, &self.cfg.backends[b]);
            self.drain_queue(b);
            self.follow_up();
        } else if !now && was {
            self.up.backends[b].stop_ramp(s);
        }
    }

    /// Closes every connection this worker has to server `s` of backend `b`: at once, or at an
    /// even pace over the backend's `close_spread`.
    fn shut_down(&mut self, b: usize, s: usize, reason: CloseReason) {
        let window = self.cfg.backends[b].close_spread.map(|w| w.as_millis() as u64);
        self.close_spread(b, Some(s), reason, window);
    }

    /// Closes the connections of backend `b` (to server `s`, or all of them when `None`): over
    /// `window` ms, at an even pace, or at once.
    pub(super) fn close_spread(&mut self, b: usize, s: Option<usize>, reason: CloseReason, window: Option<u64>) {
        let victims: Vec<(u32, u32)> = self
            .conns
            .live_indices()
            .into_iter()
            .filter_map(|idx| {
                let c = self.conns.entry(idx);
                closes(c, b, s).then_some((idx, c.generation & GENERATION_MASK))
            })
            .collect();
        let spread = Spread { backend: b, server: s, reason, from: self.now.ms, victims, done: 0 };
        match window {
            Some(window) if !spread.victims.is_empty() => {
                self.spreads.push((spread, window.max(1)));
                self.run_spreads();
            }
            _ => {
                self.close_victims(&spread.victims, b, s, reason);
                self.follow_up();
            }
        }
    }

    fn close_victims(&mut self, victims: &[(u32, u32)], b: usize, s: Option<usize>, reason: CloseReason) {
        for &(idx, generation) in victims {
            if self.conns.get(idx, generation).is_some_and(|c| closes(c, b, s)) {
                self.with_conn(idx, |cx| cx.close(reason));
            }
        }
    }

    /// Closes what is due of each spread shutdown: by now, `victims × elapsed / window` of them.
    pub(super) fn run_spreads(&mut self) {
        let mut spreads = std::mem::take(&mut self.spreads);
        for (sp, window) in &mut spreads {
            let elapsed = self.now.ms.saturating_sub(sp.from);
            let due = if elapsed >= *window {
                sp.victims.len()
            } else {
                (sp.victims.len() as u64 * elapsed / *window) as usize
            };
            if due > sp.done {
                let batch = sp.victims[sp.done..due].to_vec();
                sp.done = due;
                self.close_victims(&batch, sp.backend, sp.server, sp.reason);
            }
        }
        spreads.retain(|(sp, _)| sp.done < sp.victims.len());
        // (A shutdown started while these ran went to `self.spreads`: keep both.)
        spreads.append(&mut self.spreads);
        self.spreads = spreads;
        self.follow_up();
    }

    /// Brings every slowstart ramp up to date (before a pick does it), so the stats show where it
    /// is and it ends on time even when no connection comes.
    pub(super) fn advance_ramps(&mut self) {
        for (b, be) in self.up.backends.iter_mut().enumerate() {
            if be.ramping > 0 {
                be.ramp(self.now.ms, &self.cfg.backends[b]);
            }
        }
    }

    /// A slice of `show conns`: from slab entry `from`, at most [`CONNS_SCANNED_PER_TURN`]
    /// entries looked at and `limit` (at most [`CONNS_LISTED_PER_TURN`]) lines, one per connection
    /// that `filter` matches; and the entry the next slice goes on from, if any is left.
    fn list_conns(&self, filter: crate::admin::ConnMatch, from: u32, limit: usize) -> (Vec<String>, Option<u32>) {
        use crate::control::{CONNS_LISTED_PER_TURN, CONNS_SCANNED_PER_TURN};
        let limit = limit.min(CONNS_LISTED_PER_TURN);
        let slots = self.conns.slots();
        let end = (from as usize).saturating_add(CONNS_SCANNED_PER_TURN).min(slots);
        let mut out = Vec::new();
        for idx in from..end as u32 {
            if out.len() >= limit {
                return (out, Some(idx));
            }
            let c = self.conns.entry(idx);
            if !c.is_live() {
                continue;
            }
            let to_server = c.server != crate::conn::NO_INDEX;
            if let Some((b, s)) = filter.server
                && !(to_server && c.backend as usize == b && c.server as usize == s)
            {
                continue;
            }
            if filter.frontend.is_some_and(|f| c.frontend as usize != f)
                || filter.client.is_some_and(|m| !m.matches(c.client_addr))
            {
                continue;
            }
            let fe = self.cfg.frontends.get(c.frontend as usize).map_or("-", |f| f.name.as_str());
            let target = match self.cfg.backends.get(c.backend as usize) {
                Some(be) if to_server => {
                    format!("{}/{}", be.name, be.servers.get(c.server as usize).map_or("-", |s| s.name.as_str()))
                }
                Some(be) => format!("{}/-", be.name),
                None => "-".into(),
            };
            let client = c.client_addr.map_or("-".into(), |a| a.to_string());
            let source = self.up.source_ip(c).map_or("-".into(), |ip| ip.to_string());
            let age = self.now.us.saturating_sub(c.t_accept_us) / 1000;
            let idle = self.now.ms.saturating_sub(c.last_traffic());
            // How each direction moves its next bytes: spliced, or through buffers.
            let path = |f: &crate::conn::Flow| if f.bulk { "splice" } else { "buffers" };
            let mut line = format!(
                "worker={} frontend={fe} client={client} server={target} source={source} state={} age_ms={age} \
                 idle_ms={idle} bytes_in={} bytes_out={} path_in={} path_out={}",
                self.id,
                c.state.name(),
                c.bytes_in,
                c.bytes_out,
                path(&c.c2s),
                path(&c.s2c)
            );
            if let Some(end) = c.end_of_life(&self.cfg) {
                line.push_str(&format!(" ends_in_ms={}", end.saturating_sub(self.now.ms)));
            }
            out.push(line);
        }
        (out, (end < slots).then_some(end as u32))
    }

    pub(super) fn flush_outbox(&mut self) {
        for (to, msg) in self.up.outbox.drain(..) {
            if let Some(peer) = self.peers.get(to as usize) {
                peer.send(Control::Share(msg));
            }
        }
    }

    pub(super) fn start_drain(&mut self) {
        if self.draining.is_some() {
            return;
        }
        // Parked connections stay: they are admitted as slots free, until the drain deadline.
        self.draining = Some(self.now.ms.saturating_add(self.cfg.global.drain_timeout.as_millis() as u64));
        self.update_listeners();
    }

    /// During a drain: close listeners once their accept is gone; force-close at the deadline.
    pub(super) fn check_drain(&mut self) {
        let Some(deadline) = self.draining else { return };
        self.close_idle_listeners();
        // Backends with a close_spread close what is left of their connections at an even pace
        // over the window that ends at the deadline (or over what is left of the drain, when it is
        // shorter), not all at the deadline.
        for b in 0..self.cfg.backends.len() {
            let Some(w) = self.cfg.backends[b].close_spread.map(|w| w.as_millis() as u64) else { continue };
            if !self.drain_spread[b] && self.now.ms + w >= deadline {
                self.drain_spread[b] = true;
                let window = deadline.saturating_sub(self.now.ms);
                self.close_spread(b, None, CloseReason::Shutdown, Some(window));
            }
        }
        if self.now.ms >= deadline {
            // Parked sockets first: a share given back by a closing connection must not let one
            // in after the deadline.
            while let Some((_, slot, _)) = self.parked.pop_front() {
                self.ring.close_client(slot, false);
            }
            self.stats.parked = 0;
            for idx in self.conns.live_indices() {
                self.with_conn(idx, |cx| cx.close(CloseReason::Shutdown));
            }
            self.drop_landings();
            self.follow_up();
        }
    }

    /// How long until the drain has something to do at a time of its own (None: not draining,
    /// or nothing left to time): a backend's `close_spread` window starting, the deadline, and
    /// the zero-copy grace after it. Everything else a drain waits for is a completion.
    pub(super) fn drain_wake_in(&self) -> Option<u64> {
        let deadline = self.draining?;
        let spreads = self.cfg.backends.iter().enumerate().filter_map(|(b, be)| {
            let w = be.close_spread?.as_millis() as u64;
            (!self.drain_spread[b]).then(|| deadline.saturating_sub(w))
        });
        let grace = (self.ring.zc_live() > 0).then_some(deadline + ZC_GRACE_MS);
        // (What is already past was done by `check_drain` at this turn.)
        spreads.chain([deadline]).chain(grace).filter(|&t| t > self.now.ms).min().map(|t| t - self.now.ms)
    }

    /// Drained: no connection, no parked socket, every listener closed, no grant of a move
    /// outstanding, nothing left to tell the engine moved to, and no zero-copy send's
    /// notification to come (the buffers it holds go back with it) — unless the drain's deadline
    /// passed `ZC_GRACE_MS` ago: a peer that never acknowledges keeps its bytes' notification
    /// from coming, and the kernel holds the pages it reads from whatever we do.
    pub(super) fn finished(&self) -> bool {
        self.draining.is_some_and(|deadline| self.ring.zc_live() == 0 || self.now.ms >= deadline + ZC_GRACE_MS)
            && self.conns.live == 0
            && self.landing.is_empty()
            && self.mover.as_ref().is_none_or(|m| !m.has_mail())
            && self.parked.is_empty()
            && self.listeners.iter().all(|l| l.accept == super::accept::Accept::Closed)
    }

    /// This worker's counters, with the server rows `rows` (clamped to those there are), their
    /// sources and their latency buckets: the rest of the server rows are not copied. The slice
    /// ends once it holds [`ROWS_PER_TURN`] source rows, inside a server's sources if need be
    /// (`sources_next` says where the next slice goes on: `sources_from`, with `rows` starting at
    /// that server again, whose row it does not copy twice). No source row unless `with_sources`.
    fn snapshot(&mut self, rows: std::ops::Range<usize>, sources_from: usize, with_sources: bool) -> WorkerStats {
        self.advance_ramps();
        let all = std::mem::take(&mut self.stats.servers);
        let mut s = self.stats.clone();
        self.stats.servers = all;
        s.server_rows = self.stats.servers.len();
        s.servers = Vec::with_capacity(rows.len().min(s.server_rows));
        s.pipes_in_use = u64::from(self.pipes.in_use);
        s.pipes_pooled = u64::from(self.pipes.pooled());
        s.buffers_in_use = u64::from(self.ring.buffers_in_use());
        s.buffers_pooled = u64::from(self.ring.buffers_pooled());
        s.ring_queued_bytes = self.sendq.queued_bytes();
        s.ring_spilled_bytes = self.sendq.spilled_bytes();
        s.zerocopy_pending = u64::from(self.ring.zc_live());
        s.recv_buffers_resident = self.ring.recv_bufs_resident();
        s.global_share = u64::from(self.up.shares.held(self.plan.limits.global));
        s.share_lent = self.up.shares.lent;
        s.share_borrowed = self.up.shares.borrowed;
        s.ring = self.ring.counters;
        s.batching = u64::from(self.coalesce.batching());
        // (`never`: bulk flows never splice, whatever the unused chooser holds.)
        s.bulk_splicing = u64::from(self.cfg.splices() && self.bulk.splice);
        s.bulk_path_switches = self.bulk.switches;
        [s.bulk_cost_copy_ps, s.bulk_cost_splice_ps] = self.bulk.cost_ps;
        s.uptime_ms = self.now.ms.saturating_sub(self.started_ms);
        s.longest_turn_us = self.longest_turn_ns[0].max(self.longest_turn_ns[1]) / 1000;
        s.listening = self.listeners.iter().filter(|l| l.fd.is_some()).count() as u64;
        s.sources_tracked = self.up.per_source.iter().flatten().map(|t| t.len() as u64).sum();
        // (A queue may still hold entries of connections that closed while waiting: skipped.)
        let conns = &self.conns;
        s.queued_by_backend = self
            .up
            .backends
            .iter()
            .map(|b| {
                b.queue.iter().filter(|&&(i, g)| conns.peek(i, g).is_some_and(|c| c.state == State::Queued)).count()
                    as u64
            })
            .collect();
        for (f, row) in s.frontends.iter_mut().enumerate() {
            row.rate_share = self.rate[f].as_ref().map_or(0.0, |b| b.share() as f64 / 1000.0);
            row.share = self.up.admission[f][1].map_or(0, |l| u64::from(self.up.shares.held(l)));
        }
        for &(listener, _, _) in &self.parked {
            s.frontends[self.infos[listener as usize].frontend as usize].parked += 1;
        }
        s.sum_frontends();
        s.sources.clear();
        s.sources_next = 0;
        'rows: for (b, be) in self.up.backends.iter().enumerate() {
            // The backend's servers among the rows asked for (rows are flattened in backend order).
            let first = self.up.server_index[b];
            let from = rows.start.saturating_sub(first).min(be.servers.len());
            let to = rows.end.saturating_sub(first).min(be.servers.len());
            for (i, srv) in be.servers.iter().enumerate().take(to).skip(from) {
                let k = first + i;
                // Going on inside this server's sources: its row came with the slice before.
                let resumed = k == rows.start && sources_from > 0;
                if !resumed {
                    // The slice also ends once it holds `ROWS_PER_TURN` source rows.
                    if s.sources.len() >= ROWS_PER_TURN {
                        break 'rows;
                    }
                    self.server_row(&mut s, b, i, k);
                }
                // (A removed server's sources leave the stats with it. Their names are filled in
                // by the stats thread from the server's row, `k` in the whole snapshot: no
                // allocation here.)
                let ips = if srv.removed || !with_sources { &[][..] } else { &srv.sources.ips[..] };
                for (j, &ip) in ips.iter().enumerate().skip(if resumed { sources_from } else { 0 }) {
                    if s.sources.len() >= ROWS_PER_TURN {
                        s.sources_next = j;
                        break 'rows;
                    }
                    s.sources.push(SourceStats {
                        backend: String::new(),
                        server: String::new(),
                        ip,
                        active: u64::from(srv.sources.active[j]),
                        capacity: u64::from(srv.sources.capacity),
                        server_row: k as u32,
                    });
                }
            }
        }
        s
    }

    /// Copies the row of server `i` of backend `b` (`k` among all rows) into `s`, with its latency
    /// buckets.
    fn server_row(&self, s: &mut WorkerStats, b: usize, i: usize, k: usize) {
        let (be, srv) = (&self.up.backends[b], &self.up.backends[b].servers[i]);
        s.servers.push(self.stats.servers[k].clone());
        let row = s.servers.last_mut().expect("just pushed");
        row.active = u64::from(srv.active);
        row.lingering = u64::from(srv.refs.saturating_sub(srv.active));
        row.total = srv.total;
        row.connect_errors = srv.errors;
        row.bytes_in = srv.bytes_in;
        row.bytes_out = srv.bytes_out;
        row.share = srv.limit.map_or(0, |l| u64::from(self.up.shares.held(l)));
        row.admin = srv.admin;
        row.removed = srv.removed;
        // The weight in use, in the configuration's units (rounded up while ramping), and how far
        // a ramp has got.
        let scaled = u64::from(be.balancer.weight(i));
        let scale = u64::from(crate::balance::WEIGHT_SCALE);
        row.weight = scaled.div_ceil(scale);
        row.ramp_pct = match u64::from(srv.weight) * scale {
            0 => 100,
            full => (scaled * 100 / full).min(100),
        };
        // Percentiles for this worker's rows, buckets for merging across workers.
        let latency = &self.up.connect_latency[k];
        row.connect_latency_us = latency.latency();
        latency.export(k as u32, &mut s.connect_latency);
    }
}

/// A shutdown of one server's connections (or a backend's, at the end of a drain), paced over a
/// window (`close_spread`).
pub(super) struct Spread {
    backend: usize,
    server: Option<usize>,
    reason: CloseReason,
    /// When it began (worker clock, ms).
    from: u64,
    /// The connections it closes (index, generation), in the order they are closed.
    victims: Vec<(u32, u32)>,
    /// How many of them are behind it.
    done: usize,
}

/// Whether connection `c` is one a shutdown closes: for server `s` of backend `b`, those that hold
/// a connection to it (connecting or established); for the whole backend (`None`, a drain), every
/// one of the backend's that is not closing already.
fn closes(c: &Conn, b: usize, s: Option<usize>) -> bool {
    match s {
        Some(s) => {
            c.backend as usize == b
                && c.server as usize == s
                && c.server_shares
                && matches!(c.state, State::Connecting | State::SendingProxy | State::Established)
        }
        None => c.backend as usize == b && c.is_live() && !c.is_closing(),
    }
}
