//! The worker's control plane: messages from other threads (share lending, stats snapshots,
//! drain, server health), the drain itself, and the snapshot of this worker's counters.
//! All of it runs between two loop turns, never inside a connection's transition.

use super::Worker;
use crate::conn::{CloseReason, State};
use crate::control::Control;
use crate::stats::{ServerState, SourceStats, WorkerStats};

impl Worker {
    pub(super) fn on_control(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                Control::Share(m) => {
                    if self.up.shares.on_message(m, &mut self.up.outbox) {
                        self.admit_parked();
                        self.drain_queues();
                    }
                }
                Control::Snapshot(reply) => {
                    let _ = reply.send(self.snapshot());
                }
                Control::Drain => self.start_drain(),
                Control::RearmAccepts => self.rearm_accepts(),
                Control::ServerState { backend, server, up } => {
                    let state = if up { ServerState::Up } else { ServerState::Down };
                    self.set_server_state(backend, server, state);
                }
            }
        }
    }

    /// A health check marked a server up or down.
    fn set_server_state(&mut self, b: usize, s: usize, state: ServerState) {
        let Some(srv) = self.up.backends.get_mut(b).and_then(|be| be.servers.get_mut(s)) else { return };
        srv.state = state;
        if let Some(row) = self.stats.servers.get_mut(self.up.server_index[b] + s) {
            row.state = state;
        }
        if state.is_up() {
            self.drain_queue(b);
            self.follow_up();
        } else if self.cfg.backends[b].on_down == crate::config::OnDown::ShutdownSessions {
            for idx in self.conns.live_indices() {
                let c = self.conns.at(idx);
                let on_it = c.backend as usize == b && c.server as usize == s && c.server_shares;
                if on_it && matches!(c.state, State::Connecting | State::SendingProxy | State::Established) {
                    self.with_conn(idx, |cx| cx.close(CloseReason::ServerReset));
                }
            }
            self.follow_up();
        }
    }

    pub(super) fn flush_outbox(&mut self) {
        for (to, msg) in self.up.outbox.drain(..) {
            if let Some(peer) = self.peers.get(to as usize) {
                peer.send(Control::Share(msg));
            }
        }
    }

    fn start_drain(&mut self) {
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
            self.follow_up();
        }
    }

    /// Drained: no connection, no parked socket, every listener closed.
    pub(super) fn finished(&self) -> bool {
        self.draining.is_some()
            && self.conns.live == 0
            && self.parked.is_empty()
            && self.listeners.iter().all(|l| l.accept == super::accept::Accept::Closed)
    }

    fn snapshot(&mut self) -> WorkerStats {
        let mut s = self.stats.clone();
        s.pipes_in_use = u64::from(self.pipes.in_use);
        s.pipes_pooled = u64::from(self.pipes.pooled());
        s.buffers_in_use = u64::from(self.ring.buffers_in_use());
        s.buffers_pooled = u64::from(self.ring.buffers_pooled());
        s.global_share = u64::from(self.up.shares.held(self.plan.limits.global));
        s.share_lent = self.up.shares.lent;
        s.share_borrowed = self.up.shares.borrowed;
        s.ring = self.ring.counters;
        s.uptime_ms = self.now.ms;
        s.listening = self.listeners.iter().filter(|l| l.fd.is_some()).count() as u64;
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
        let mut k = 0;
        s.sources.clear();
        for (b, be) in self.up.backends.iter().enumerate() {
            for (i, srv) in be.servers.iter().enumerate() {
                let row = &mut s.servers[k];
                row.active = u64::from(srv.active);
                row.total = srv.total;
                row.connect_errors = srv.errors;
                row.share = srv.limit.map_or(0, |l| u64::from(self.up.shares.held(l)));
                // Percentiles for this worker's rows, buckets for merging across workers.
                let latency = &self.up.connect_latency[k];
                row.connect_latency_us = latency.latency();
                latency.export(k as u32, &mut s.connect_latency);
                k += 1;
                for (j, ip) in srv.sources.ips.iter().enumerate() {
                    s.sources.push(SourceStats {
                        backend: self.cfg.backends[b].name.clone(),
                        server: self.cfg.backends[b].servers[i].name.clone(),
                        ip: *ip,
                        active: u64::from(srv.sources.active[j]),
                        capacity: u64::from(srv.sources.capacity),
                    });
                }
            }
        }
        s
    }
}
