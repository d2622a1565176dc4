//! Admission: an accepted socket is admitted against this worker's share of the global and
//! frontend maxconn (limits.rs). Without a share the socket is parked (accepted, not proxied), the
//! worker stops accepting, so further clients wait in the kernel backlog, and asks the other
//! workers for share; parked sockets are admitted in order as share comes back. A worker keeps
//! accepting right up to the first socket it must park, because that socket is what tells it
//! there is demand.

use super::Worker;
use super::ring::ClientSlot;

impl Worker {
    /// Admits a freshly accepted socket, or parks it.
    pub(super) fn admit(&mut self, listener: u16, slot: ClientSlot) {
        let fe = self.infos[listener as usize].frontend as usize;
        if self.up.take_admission(fe) {
            self.open(listener, slot);
        } else {
            self.park(listener, slot);
        }
    }

    /// Opens a connection on an admitted socket.
    fn open(&mut self, listener: u16, slot: ClientSlot) {
        let idx = self.conns.insert();
        self.with_conn(idx, |cx| cx.open(listener, slot));
        self.follow_up();
    }

    /// Holds an accepted socket that cannot be admitted yet and stops the listeners concerned.
    pub(super) fn park(&mut self, listener: u16, slot: ClientSlot) {
        let fe = self.infos[listener as usize].frontend as usize;
        let global = self.plan.limits.global;
        let up = &mut self.up;
        for id in up.admission[fe].into_iter().flatten() {
            if !up.shares.has_room(id) {
                if id == global {
                    self.stats.limit_hits.global += 1;
                } else {
                    self.stats.limit_hits.frontend += 1;
                }
                up.shares.want(id, &mut up.outbox);
            }
        }
        self.parked.push_back((listener, slot));
        self.stats.parked = self.parked.len() as u64;
        self.update_listeners();
    }

    /// Admits parked sockets while shares allow; then lets the listeners accept again.
    pub(super) fn admit_parked(&mut self) {
        while let Some(&(listener, _)) = self.parked.front() {
            let fe = self.infos[listener as usize].frontend as usize;
            if !self.up.take_admission(fe) {
                break;
            }
            let Some((listener, slot)) = self.parked.pop_front() else { break };
            self.stats.parked = self.parked.len() as u64;
            self.open(listener, slot);
        }
        self.stats.parked = self.parked.len() as u64;
        if self.parked.is_empty() {
            let global = self.plan.limits.global;
            self.up.shares.satisfied(global);
            for f in self.plan.limits.frontend.iter().flatten() {
                self.up.shares.satisfied(*f);
            }
        }
        self.update_listeners();
    }

    /// A connection gave its admission share back: a parked socket may go in, or accepts resume.
    pub(super) fn admission_freed(&mut self) {
        if !self.parked.is_empty() {
            self.admit_parked();
        } else if self.listeners.iter().any(|l| l.idle()) {
            self.update_listeners();
        }
    }
}
