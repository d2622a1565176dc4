//! Admission: an accepted socket is admitted against this worker's share of the global and
//! frontend maxconn (limits.rs) — or, on an `accept_proxy` frontend, against its share of the
//! frontend's PROXY-header limit, the maxconn shares coming once the header is all there (so
//! clients slow to send their header never hold the slots served clients need).
//!
//! Without a share the socket is parked (accepted, not proxied), the worker stops accepting, so
//! further clients wait in the kernel backlog, and asks the other workers for share; parked sockets
//! are admitted in order as share comes back. A worker keeps accepting right up to the first socket
//! it must park, because that socket is what tells it there is demand. Connections whose header is
//! there but that find no maxconn share wait in their own FIFO (`State::Admitting`), served before
//! parked sockets (they came first).

use super::Worker;
use super::ring::ClientSlot;
use crate::conn::{Admission, Known, State};
use crate::worker::token::GENERATION_MASK;

impl Worker {
    /// Admits a freshly accepted socket, or parks it.
    pub(super) fn admit(&mut self, listener: u16, slot: ClientSlot, known: Known) {
        let fe = self.infos[listener as usize].frontend as usize;
        let a = self.up.on_accept(fe);
        if self.up.take(fe, a) {
            self.open(listener, slot, a, known);
        } else {
            self.park(listener, slot, known);
        }
    }

    /// Opens a connection on an admitted socket.
    fn open(&mut self, listener: u16, slot: ClientSlot, a: Admission, known: Known) {
        let idx = self.conns.insert();
        self.with_conn(idx, |cx| cx.open(listener, slot, a, known));
        self.follow_up();
    }

    /// Holds an accepted socket that cannot be admitted yet and stops the listeners concerned.
    pub(super) fn park(&mut self, listener: u16, slot: ClientSlot, known: Known) {
        let fe = self.infos[listener as usize].frontend as usize;
        let a = self.up.on_accept(fe);
        let global = self.plan.limits.global;
        for id in self.up.limits(fe, a).into_iter().flatten() {
            if !self.up.shares.has_room(id) {
                let hits = &mut self.stats.frontends[fe].limit_hits;
                if id == global {
                    hits.global += 1;
                } else {
                    hits.frontend += 1;
                }
            }
        }
        self.up.want(fe, a);
        self.parked.push_back((listener, slot, known));
        self.stats.parked = self.parked.len() as u64;
        self.update_listeners();
    }

    /// Admits waiting connections, then parked sockets, while shares allow; then lets the
    /// listeners accept again.
    pub(super) fn admit_parked(&mut self) {
        while let Some(&(idx, generation)) = self.admitting.front() {
            let waiting =
                self.conns.peek(idx, generation & GENERATION_MASK).is_some_and(|c| c.state == State::Admitting);
            if waiting && !self.with_conn(idx, |cx| cx.resume_admission()) {
                break;
            }
            self.admitting.pop_front();
            self.follow_up();
        }
        while let Some(&(listener, _, _)) = self.parked.front() {
            let fe = self.infos[listener as usize].frontend as usize;
            let a = self.up.on_accept(fe);
            if !self.up.take(fe, a) {
                break;
            }
            let Some((listener, slot, known)) = self.parked.pop_front() else { break };
            self.stats.parked = self.parked.len() as u64;
            self.open(listener, slot, a, known);
        }
        self.stats.parked = self.parked.len() as u64;
        if self.parked.is_empty() && self.admitting.is_empty() {
            let global = self.plan.limits.global;
            self.up.shares.satisfied(global, &mut self.up.outbox);
            let lists = [&self.plan.limits.frontend, &self.plan.limits.proxy_header];
            for f in lists.into_iter().flatten().flatten() {
                self.up.shares.satisfied(*f, &mut self.up.outbox);
            }
        }
        self.update_listeners();
    }

    /// Share came from another worker: admit what waits, and if that was not enough, ask again. A
    /// worker with parked sockets does not accept, so no new socket would make it ask; without
    /// this, what waits here (and in its listeners' backlog) would wait until some connection
    /// closes, while other workers have room. An ask that comes back empty is not repeated: the
    /// asker is then on every worker's list of waiters and gets the next share that frees.
    pub(super) fn share_arrived(&mut self) {
        self.admit_parked();
        if self.parked.is_empty() && self.admitting.is_empty() {
            return;
        }
        if let Some(&(idx, generation)) = self.admitting.front()
            && let Some(c) = self.conns.peek(idx, generation & GENERATION_MASK)
        {
            self.up.want(c.frontend as usize, Admission::Admitted);
        }
        if let Some(&(listener, _, _)) = self.parked.front() {
            let fe = self.infos[listener as usize].frontend as usize;
            let a = self.up.on_accept(fe);
            self.up.want(fe, a);
        }
    }

    /// A connection gave a share back: a waiting connection or a parked socket may go in, or
    /// accepts resume.
    pub(super) fn admission_freed(&mut self) {
        if !self.parked.is_empty() || !self.admitting.is_empty() {
            self.admit_parked();
        } else if self.listeners.iter().any(|l| l.idle()) {
            self.update_listeners();
        }
    }
}
