//! Moving established connections to the engine a reload started, instead of closing them.
//!
//! The old engine's workers get a [`MovePlan`] (the new configuration, and per new worker its
//! control channel and a duplicate of its ring's descriptor). Each old worker then, in batches:
//!
//! 1. **quiesces** connections whose frontend, backend and server the new configuration still has
//!    (the server by name *and* address): nothing new is armed, watches are cancelled, bytes already
//!    read are still written (conn/moving.rs). A connection the new file removed follows its
//!    backend's `on_removed` (`keep`: stays until it ends or the drain ends; `close`: closed over
//!    the backend's `close_spread`).
//! 2. **offers** the quiet ones to the new worker that will own them — the one its source is steered
//!    to when the frontend has per-source limits, else the one that owns its source address toward
//!    the server, else round robin — in one [`Control::MoveOffer`] per target and loop turn.
//! 3. The new worker **grants** each two free slots of its table and takes its maxconn shares there
//!    (global, frontend, backend, server) — or refuses (no share, no slot, draining itself): the
//!    connection then resumes where it is and is offered again a second later.
//! 4. The old worker **hands over** both sockets (two MSG_RINGs into the granted slots). When both
//!    are in, it gives back what the connection held in the old engine and frees its entry
//!    (closing only its own table's references), and sends the connection's state
//!    ([`Control::MoveArrive`]); the new worker opens an entry on the two slots and arms it. A
//!    failed MSG_RING or a connection that closed meanwhile sends [`Control::MoveCancel`]: the
//!    new worker closes what its slots hold and gives the shares back.
//!
//! Every step runs between two loop turns on both sides; the data path does not change. An offer
//! with no answer within [`OFFER_WAIT_MS`] (a new worker that exited) is withdrawn and the
//! connection resumes. The old worker exits once it holds nothing, as after any drain.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use super::Worker;
use crate::config::{Config, OnRemoved};
use std::collections::HashSet;

use crate::conn::{Admission, CloseReason, Moved, State};
use crate::control::{Control, Peer};
use crate::worker::ring::{ClientSlot, ServerSlot};
use crate::worker::token::GENERATION_MASK;

/// Connections a worker has on their way at once (quiescing, offered, handing over).
const IN_FLIGHT: usize = 2048;
/// The same for a binary upgrade, where each holds two process descriptors until the new process
/// has its own: 256 per worker keeps even 40 workers within a 20,000-descriptor limit.
const IN_FLIGHT_EXPORT: usize = 256;
/// Free server slots a new worker keeps for its own connects when it grants slots.
const SLOT_RESERVE: usize = 64;
/// How long an offer may wait for its answer.
pub(super) const OFFER_WAIT_MS: u64 = 2000;
/// How long a refused connection waits before it is offered again.
const RETRY_MS: u64 = 1000;
/// While connections keep moving, the drain deadline stays at least this far ahead: it cuts only
/// what cannot move (or moves that have stalled), not a large hand-over still under way.
const MOVE_GRACE_MS: u64 = 2000;

/// Where the connections of an engine move on reload: the new engine.
pub struct MovePlan {
    /// The new engine's configuration.
    pub config: Arc<Config>,
    /// Its workers, in order.
    pub targets: Vec<MoveTarget>,
}

/// One worker of the new engine.
pub struct MoveTarget {
    pub peer: Peer,
    /// A duplicate of its ring's descriptor: MSG_RING addresses the ring by it, and the duplicate
    /// keeps it from being closed (and its number reused) while any old worker may still submit.
    pub ring: Arc<OwnedFd>,
}

/// Where a binary upgrade sends the connections of this process (the upgrade's courier, which
/// passes them to the new process; upgrade.rs).
pub struct ExportPlan {
    pub tx: crossbeam_channel::Sender<Exported>,
}

/// A connection leaving for a new process: where it belongs, by name (the new process reads the
/// configuration anew), its state, and its two sockets as process descriptors. The worker keeps
/// it, quiet, until the new process has said whether it took it ([`Control::ExportAck`]).
#[derive(Debug)]
pub struct Exported {
    /// The worker (its index in the engine) and the connection's key there.
    pub worker: usize,
    pub key: (u32, u32),
    pub frontend: String,
    pub backend: String,
    pub server: String,
    pub address: std::net::SocketAddr,
    pub state: crate::conn::MovedState,
    pub client: OwnedFd,
    pub server_fd: OwnedFd,
}

/// The two descriptors of a connection being exported, as their FIXED_FD_INSTALLs complete.
#[derive(Default)]
struct Installing {
    client: Option<OwnedFd>,
    server: Option<OwnedFd>,
    answers: u8,
}

/// A connection offered to a new worker: its key in the old worker (slab index, generation) and
/// where it belongs in the new configuration.
#[derive(Clone, Copy, Debug)]
pub struct MoveOffer {
    pub key: (u32, u32),
    pub frontend: u16,
    pub backend: u16,
    pub server: u16,
}

/// Two slots of the new worker's table granted to an offered connection: one of its server range
/// for the server socket, and for the client socket either a named slot of its accept range (when
/// the worker manages that range itself: the plain-accept fallback) or, `None`, whichever free one
/// the kernel picks there (race-free with the worker's direct accepts).
#[derive(Clone, Copy, Debug)]
pub struct Grant {
    pub client: Option<u32>,
    pub server: u32,
}

/// A grant called off: the connection's key, and the accept slot its client socket reached, if a
/// MSG_RING put it there before the call-off.
pub type CallOff = ((u32, u32), Option<u32>);

/// A grant the new worker made and holds until the connection arrives or is called off.
pub(super) struct Landing {
    server: ServerSlot,
    /// The accept slot it named for the client socket, if it named one.
    client: Option<u32>,
    frontend: u16,
    backend: u16,
    srv: u16,
}

/// What an old worker still has to send a new one about a connection.
enum Out {
    /// Handed over: its state.
    Arrive(Moved),
    /// The grant for this key is called off; the client socket is in this accept slot, if the
    /// kernel installed it before the call-off.
    Cancel((u32, u32), Option<u32>),
}

/// The old worker's side of a move.
pub(super) struct Mover {
    /// The newest plan (a second reload while this engine drains retargets what has not left).
    plan: Arc<MovePlan>,
    /// Per old backend, per old server: (backend, server) in the plan's configuration.
    servers: Vec<Vec<Option<(u16, u16)>>>,
    /// Per old frontend: its index in the plan's configuration.
    frontends: Vec<Option<u16>>,
    /// Connections begun, not yet quiet.
    quiescing: HashSet<(u32, u32)>,
    /// Quiet connections to offer at the end of this loop turn.
    ready: Vec<(u32, u32)>,
    /// Offered, no answer yet: key → (plan, target, when).
    offered: HashMap<(u32, u32), (Arc<MovePlan>, usize, u64)>,
    /// Offers withdrawn for want of an answer: a late grant is called off.
    withdrawn: HashMap<(u32, u32), (Arc<MovePlan>, usize)>,
    /// Granted, handing over: key → (plan, target, grant).
    granted: HashMap<(u32, u32), (Arc<MovePlan>, usize, Grant)>,
    /// Messages for new workers, sent at the end of the loop turn (grouped per worker).
    outbox: Vec<(Arc<MovePlan>, usize, Out)>,
    /// Where the next sweep of the slab starts, and when it is due (worker clock, ms).
    cursor: u32,
    next_sweep: u64,
    /// No connection is offered again before this (after a refusal).
    retry_at: u64,
    rotor: usize,
    /// A binary upgrade: connections leave as descriptors through this courier instead of moving
    /// to another ring.
    export: Option<crossbeam_channel::Sender<Exported>>,
    /// Exporting: the descriptors made so far.
    installing: HashMap<(u32, u32), Installing>,
    /// Handed to the courier, waiting for the new process's answer.
    exported: HashSet<(u32, u32)>,
}

impl Mover {
    /// Nothing on its way yet; the first sweep is due at `now`.
    fn new(
        plan: Arc<MovePlan>,
        servers: Vec<Vec<Option<(u16, u16)>>>,
        frontends: Vec<Option<u16>>,
        rotor: usize,
        now: u64,
        export: Option<crossbeam_channel::Sender<Exported>>,
    ) -> Mover {
        Mover {
            plan,
            servers,
            frontends,
            quiescing: HashSet::new(),
            ready: Vec::new(),
            offered: HashMap::new(),
            withdrawn: HashMap::new(),
            granted: HashMap::new(),
            outbox: Vec::new(),
            cursor: 0,
            next_sweep: now,
            retry_at: 0,
            rotor,
            export,
            installing: HashMap::new(),
            exported: HashSet::new(),
        }
    }

    /// Whether the worker should wake every tick for it.
    pub(super) fn busy(&self) -> bool {
        !self.ready.is_empty()
            || !self.offered.is_empty()
            || !self.granted.is_empty()
            || !self.quiescing.is_empty()
            || !self.installing.is_empty()
    }

    /// How long the worker may sleep before the mover has something to do (ms, at least 1): at
    /// once while a move is under way, else at its next sweep (or retry after a refusal).
    pub(super) fn wake_in(&self, now: u64) -> u64 {
        if self.busy() { 1 } else { self.next_sweep.max(self.retry_at).saturating_sub(now).max(1) }
    }

    /// Messages not sent yet.
    pub(super) fn has_mail(&self) -> bool {
        !self.outbox.is_empty()
    }

    fn in_flight(&self) -> usize {
        self.ready.len()
            + self.offered.len()
            + self.granted.len()
            + self.quiescing.len()
            + self.installing.len()
            + self.exported.len()
    }

    /// The new (frontend, backend, server) of a connection, if the plan's configuration has them.
    fn place(&self, fe: u16, b: u16, s: u16) -> Option<(u16, u16, u16)> {
        let nfe = (*self.frontends.get(fe as usize)?)?;
        let (nb, ns) = (*self.servers.get(b as usize)?.get(s as usize)?)?;
        Some((nfe, nb, ns))
    }
}

impl Worker {
    /// A reload: stop accepting (a drain) and move established connections to `plan`'s engine.
    pub(super) fn move_to(&mut self, plan: Arc<MovePlan>) {
        self.start_drain();
        let new = &plan.config;
        let servers: Vec<Vec<Option<(u16, u16)>>> = self
            .cfg
            .backends
            .iter()
            .enumerate()
            .map(|(b, be)| {
                let nb = new.backends.iter().position(|n| n.name == be.name);
                be.servers
                    .iter()
                    .enumerate()
                    .map(|(s, srv)| {
                        let nb = nb?;
                        let ns = new.backends[nb]
                            .servers
                            .iter()
                            .position(|n| n.name == srv.name && n.address == srv.address)?;
                        let removed = self.up.backends[b].servers.get(s).is_none_or(|x| x.removed);
                        (!removed).then_some((nb as u16, ns as u16))
                    })
                    .collect()
            })
            .collect();
        let frontends = self
            .cfg
            .frontends
            .iter()
            .map(|f| new.frontends.iter().position(|n| n.name == f.name).map(|i| i as u16))
            .collect();
        match &mut self.mover {
            Some(m) => {
                // (After an upgrade that failed: the connections go to the engine that replaces
                // this one in this process instead.)
                m.export = None;
                m.plan = plan;
                m.servers = servers;
                m.frontends = frontends;
                m.next_sweep = self.now.ms;
                m.retry_at = 0;
            }
            None => self.mover = Some(Mover::new(plan, servers, frontends, self.id, self.now.ms, None)),
        }
        self.close_removed();
        self.sweep_moves();
        self.moves_begun();
    }

    /// The first moves have begun: a drain shorter than a move (`timeout.drain: 1ms`) must not
    /// cut them before they could leave, so its deadline goes [`MOVE_GRACE_MS`] ahead (and stays
    /// so while connections move on). A connection the new engine refuses gets that long, not
    /// longer: the drain still bounds how long this engine lives.
    fn moves_begun(&mut self) {
        if self.mover.as_ref().is_some_and(|m| m.in_flight() > 0) {
            self.moved_one();
        }
    }

    /// A binary upgrade: stop accepting (a drain) and hand established connections to `plan`'s
    /// courier as descriptors. Without FIXED_FD_INSTALL (Linux 6.8) a direct socket cannot become
    /// a descriptor: the connections then stay and end with the drain.
    pub(super) fn export_to(&mut self, plan: Arc<ExportPlan>) {
        self.start_drain();
        if !self.ring.io().fd_install || self.mover.is_some() {
            return;
        }
        let servers = self
            .up
            .backends
            .iter()
            .enumerate()
            .map(|(b, be)| {
                (0..be.servers.len()).map(|s| (!be.servers[s].removed).then_some((b as u16, s as u16))).collect()
            })
            .collect();
        let frontends = (0..self.cfg.frontends.len()).map(|f| Some(f as u16)).collect();
        let same = Arc::new(MovePlan { config: self.cfg.clone(), targets: Vec::new() });
        self.mover = Some(Mover::new(same, servers, frontends, self.id, self.now.ms, Some(plan.tx.clone())));
        self.sweep_moves();
        self.moves_begun();
    }

    /// An export's FIXED_FD_INSTALL completed: once both have, the connection goes to the courier
    /// (or, one failed or it closed meanwhile, stays).
    fn export_step(&mut self, key: (u32, u32), client: bool, fd: Option<OwnedFd>) {
        let Some(m) = &mut self.mover else { return };
        let e = m.installing.entry(key).or_default();
        e.answers += 1;
        if client {
            e.client = fd;
        } else {
            e.server = fd;
        }
        if e.answers < 2 {
            return;
        }
        let Some(Installing { client, server, .. }) = m.installing.remove(&key) else { return };
        let Some(tx) = m.export.clone() else {
            // The upgrade was called off meanwhile (a rollback): the connection stays.
            return self.resume_key(key);
        };
        let c = self.conns.peek(key.0, key.1).filter(|c| c.ready_to_move());
        let (Some(c), Some(client), Some(server_fd)) = (c, client, server) else {
            // (The descriptors made are closed as they are dropped.)
            self.stats.move_failed += 1;
            return self.resume_key(key);
        };
        let (fe, be) = (&self.cfg.frontends[c.frontend as usize], &self.cfg.backends[c.backend as usize]);
        let srv = &be.servers[c.server as usize];
        let (frontend, backend, server, address) = (fe.name.clone(), be.name.clone(), srv.name.clone(), srv.address);
        let state = self.with_conn(key.0, |cx| cx.moved_state());
        let out = Exported { worker: self.id, key, frontend, backend, server, address, state, client, server_fd };
        if tx.send(out).is_err() {
            // The courier is gone (the upgrade failed): the connection stays.
            return self.resume_key(key);
        }
        if let Some(m) = &mut self.mover {
            m.exported.insert(key);
        }
    }

    /// The new process's answer for an exported connection: taken (it leaves) or not (it stays).
    pub(super) fn on_export_ack(&mut self, key: (u32, u32), taken: bool) {
        let Some(m) = &mut self.mover else { return };
        if !m.exported.remove(&key) {
            return;
        }
        let quiet = self.conns.peek(key.0, key.1).is_some_and(|c| c.ready_to_move());
        if taken && quiet {
            self.moved_one();
            self.with_conn(key.0, |cx| cx.leave());
            self.follow_up();
        } else {
            if !taken {
                self.stats.move_refused += 1;
                if let Some(m) = &mut self.mover {
                    m.retry_at = self.now.ms + RETRY_MS;
                }
            }
            self.resume_key(key);
        }
    }

    /// A connection moved on: the drain deadline stays [`MOVE_GRACE_MS`] ahead.
    fn moved_one(&mut self) {
        if let Some(d) = self.draining {
            self.draining = Some(d.max(self.now.ms + MOVE_GRACE_MS));
        }
    }

    fn resume_key(&mut self, key: (u32, u32)) {
        if self.conns.peek(key.0, key.1).is_some() {
            self.with_conn(key.0, |cx| cx.resume());
            self.follow_up();
        }
    }

    /// Closes, by their backend's `on_removed: close`, the connections whose server the plan's
    /// configuration no longer has (over the backend's `close_spread`).
    fn close_removed(&mut self) {
        let Some(m) = &self.mover else { return };
        let mut victims = Vec::new();
        for (b, servers) in m.servers.iter().enumerate() {
            let name = &self.cfg.backends[b].name;
            // The new file's backend of that name decides; the old one's when it is gone.
            let rule = m.plan.config.backends.iter().find(|n| &n.name == name).unwrap_or(&self.cfg.backends[b]);
            if rule.on_removed != OnRemoved::Close {
                continue;
            }
            victims.extend(servers.iter().enumerate().filter(|(_, to)| to.is_none()).map(|(s, _)| (b, s)));
        }
        for (b, s) in victims {
            let window = self.cfg.backends[b].close_spread.map(|w| w.as_millis() as u64);
            self.close_spread(b, Some(s), CloseReason::Shutdown, window);
        }
    }

    /// Starts moving the next connections that can (up to [`IN_FLIGHT`] on their way at once),
    /// walking the slab from where the last sweep stopped.
    pub(super) fn sweep_moves(&mut self) {
        let now = self.now.ms;
        let Some(m) = &mut self.mover else { return };
        // Connections that closed while quiescing leave the count; any that became quiet without
        // a completion (nothing was in flight) go to be offered.
        let conns = &self.conns;
        let mut quiet = Vec::new();
        m.quiescing.retain(|&(i, g)| match conns.peek(i, g) {
            Some(c) if c.ready_to_move() => {
                quiet.push((i, g));
                false
            }
            Some(c) => c.moving && !c.is_closing(),
            None => false,
        });
        m.ready.extend(quiet);
        if now < m.next_sweep || now < m.retry_at {
            return;
        }
        let total = self.conns.slots() as u32;
        let cap = if m.export.is_some() { IN_FLIGHT_EXPORT } else { IN_FLIGHT };
        let mut budget = cap.saturating_sub(m.in_flight());
        let mut begun = Vec::new();
        let mut seen = 0;
        while budget > 0 && seen < total {
            let idx = m.cursor % total;
            m.cursor = idx + 1;
            seen += 1;
            let c = self.conns.entry(idx);
            if c.state != State::Established || c.moving || m.place(c.frontend, c.backend, c.server).is_none() {
                continue;
            }
            begun.push((idx, c.generation & GENERATION_MASK));
            budget -= 1;
        }
        // A whole pass with room left found nothing more: look again in a while (connections
        // still connecting, or refused). Else go on at the next loop turn.
        m.next_sweep = if budget > 0 { now + 200 } else { now };
        for (idx, generation) in begun {
            self.with_conn(idx, |cx| cx.begin_move());
            self.follow_up();
            let ready = self.conns.peek(idx, generation).is_some_and(|c| c.ready_to_move());
            let Some(m) = &mut self.mover else { return };
            if ready {
                m.ready.push((idx, generation));
            } else {
                m.quiescing.insert((idx, generation));
            }
        }
    }

    /// After a completion of connection `idx`: a move's hand-over has finished, or the connection
    /// has become quiet enough to offer.
    pub(super) fn after_move_event(&mut self, idx: u32, generation: u32) {
        let key = (idx, generation & GENERATION_MASK);
        if let Some((ok, client)) = self.follow.moved.take() {
            return self.handed_over(key, ok, client);
        }
        if let Some((client, fd)) = self.follow.exported.take() {
            return self.export_step(key, client, fd);
        }
        let Some(m) = &mut self.mover else { return };
        if m.quiescing.is_empty() {
            return;
        }
        match self.conns.peek(key.0, key.1) {
            Some(c) if c.ready_to_move() => {
                if m.quiescing.remove(&key) {
                    m.ready.push(key);
                }
            }
            Some(c) if c.moving && !c.is_closing() => {}
            _ => {
                m.quiescing.remove(&key);
            }
        }
    }

    /// Both MSG_RINGs of `key` are in: `ok`, the sockets are in the new worker's slots and the
    /// connection leaves; otherwise the grant is called off (with the slot the client socket
    /// reached, if it did) and the connection stays.
    fn handed_over(&mut self, key: (u32, u32), ok: bool, client: Option<u32>) {
        let Some(m) = &mut self.mover else { return };
        let Some((plan, target, grant)) = m.granted.remove(&key) else { return };
        // A named slot's MSG_RING completes with 0; one the kernel picked, with its number.
        let client_slot = client.map(|res| grant.client.unwrap_or(res));
        let live = self.conns.peek(key.0, key.1).is_some_and(|c| c.ready_to_move());
        if let (true, true, Some(client_slot)) = (ok, live, client_slot) {
            self.moved_one();
            let state = self.with_conn(key.0, |cx| {
                let st = cx.moved_state();
                cx.leave();
                st
            });
            self.follow_up();
            if let Some(m) = &mut self.mover {
                m.outbox.push((plan, target, Out::Arrive(Moved { key, client_slot, state })));
            }
        } else {
            m.outbox.push((plan, target, Out::Cancel(key, client_slot)));
            if live {
                self.stats.move_failed += 1;
                self.with_conn(key.0, |cx| cx.resume());
                self.follow_up();
            }
        }
    }

    /// The new worker's answers to our offers.
    pub(super) fn on_move_grant(&mut self, items: Vec<((u32, u32), Option<Grant>)>) {
        let now = self.now.ms;
        for (key, grant) in items {
            let Some(m) = &mut self.mover else { return };
            let Some((plan, target, _)) = m.offered.remove(&key) else {
                // Withdrawn (no answer in time): a late grant is called off.
                if let (Some((plan, target)), Some(_)) = (m.withdrawn.remove(&key), grant) {
                    m.outbox.push((plan, target, Out::Cancel(key, None)));
                }
                continue;
            };
            let ready = self.conns.peek(key.0, key.1).is_some_and(|c| c.ready_to_move());
            match grant {
                Some(g) if ready => {
                    let fd = plan.targets[target].ring.as_raw_fd();
                    m.granted.insert(key, (plan, target, g));
                    self.with_conn(key.0, |cx| cx.send_away(fd, g.client, g.server));
                }
                // Closed meanwhile.
                Some(_) => m.outbox.push((plan, target, Out::Cancel(key, None))),
                None => {
                    m.retry_at = now + RETRY_MS;
                    self.stats.move_refused += 1;
                    if ready {
                        self.with_conn(key.0, |cx| cx.resume());
                        self.follow_up();
                    }
                }
            }
        }
    }

    /// End of a loop turn: offers the quiet connections, sends hand-overs and call-offs, withdraws
    /// offers that had no answer in time.
    pub(super) fn flush_moves(&mut self) {
        let now = self.now.ms;
        let Some(m) = &mut self.mover else { return };
        if m.export.is_some() {
            for key in std::mem::take(&mut m.ready) {
                if self.conns.peek(key.0, key.1).is_some_and(|c| c.ready_to_move()) {
                    self.with_conn(key.0, |cx| cx.export());
                    if let Some(m) = &mut self.mover {
                        m.installing.insert(key, Installing::default());
                    }
                }
            }
            return;
        }
        let mut offers: Vec<Vec<MoveOffer>> = vec![Vec::new(); m.plan.targets.len()];
        let mut resume = Vec::new();
        for key in std::mem::take(&mut m.ready) {
            let Some(c) = self.conns.peek(key.0, key.1).filter(|c| c.ready_to_move()) else { continue };
            let Some(m) = &self.mover else { return };
            let Some(place) = m.place(c.frontend, c.backend, c.server) else {
                // (Removed by a newer plan.)
                resume.push(key);
                continue;
            };
            let target = self.target_for(key.0, place);
            let Some(m) = &mut self.mover else { return };
            m.offered.insert(key, (m.plan.clone(), target, now));
            let (frontend, backend, server) = place;
            offers[target].push(MoveOffer { key, frontend, backend, server });
        }
        let Some(m) = &mut self.mover else { return };
        let me = self.peers[self.id].clone();
        for (target, items) in offers.into_iter().enumerate().filter(|(_, v)| !v.is_empty()) {
            let keys: Vec<(u32, u32)> = items.iter().map(|o| o.key).collect();
            let msg = Control::MoveOffer { from: self.uid, reply: me.clone(), items };
            if !m.plan.targets[target].peer.send(msg) {
                // That worker has exited: the connections stay.
                for k in keys {
                    m.offered.remove(&k);
                    resume.push(k);
                }
            }
        }
        let late: Vec<(u32, u32)> = m
            .offered
            .iter()
            .filter(|(_, (_, _, at))| now.saturating_sub(*at) >= OFFER_WAIT_MS)
            .map(|(k, _)| *k)
            .collect();
        for k in late {
            if let Some((plan, target, _)) = m.offered.remove(&k) {
                m.withdrawn.insert(k, (plan, target));
                resume.push(k);
            }
        }
        // Grouped per (plan, worker): one message of each kind.
        let mut out = std::mem::take(&mut m.outbox);
        while let Some((plan, target, first)) = out.pop() {
            let (mut arrive, mut cancel) = (Vec::new(), Vec::new());
            let mut put = |o: Out| match o {
                Out::Arrive(a) => arrive.push(a),
                Out::Cancel(k, slot) => cancel.push((k, slot)),
            };
            put(first);
            let mut rest = Vec::new();
            for (p, t, o) in out.drain(..) {
                if Arc::ptr_eq(&p, &plan) && t == target {
                    put(o);
                } else {
                    rest.push((p, t, o));
                }
            }
            out = rest;
            let peer = &plan.targets[target].peer;
            if !arrive.is_empty() {
                peer.send(Control::MoveArrive { from: self.uid, conns: arrive });
            }
            if !cancel.is_empty() {
                peer.send(Control::MoveCancel { from: self.uid, keys: cancel });
            }
        }
        for key in resume {
            if self.conns.peek(key.0, key.1).is_some() {
                self.with_conn(key.0, |cx| cx.resume());
                self.follow_up();
            }
        }
    }

    /// The new worker a connection goes to ([`pick_target`]).
    fn target_for(&mut self, idx: u32, place: (u16, u16, u16)) -> usize {
        let source_ip = self.up.source_ip(self.conns.entry(idx));
        let client = self.conns.entry(idx).client_addr;
        let Some(m) = &mut self.mover else { return 0 };
        pick_target(&m.plan.config, m.plan.targets.len(), place, source_ip, client, &mut m.rotor)
    }

    // --- the new worker's side ---

    /// Offers from worker `from` of an older engine: grant each two slots and its shares, or
    /// refuse; the answer goes back to `reply`.
    pub(super) fn on_move_offer(&mut self, from: u64, reply: Peer, items: Vec<MoveOffer>) {
        let answers = items.into_iter().map(|o| (o.key, self.land(from, o))).collect();
        reply.send(Control::MoveGrant { worker: self.id, items: answers });
        self.follow_up();
    }

    fn land(&mut self, from: u64, o: MoveOffer) -> Option<Grant> {
        let (fe, b, s) = (o.frontend as usize, o.backend as usize, o.server as usize);
        let direct = self.ring.io().direct_accept();
        let accept_free = self.plan.accept_slots.saturating_sub(self.client_slots) as usize;
        let reserve = |range: u32| (range as usize / 8).min(SLOT_RESERVE);
        if self.draining.is_some()
            || self.landing.contains_key(&(from, o.key))
            || fe >= self.cfg.frontends.len()
            || self.up.server_slots.len() <= reserve(self.plan.table_slots - self.plan.accept_slots)
            || accept_free <= reserve(self.plan.accept_slots)
            || (!direct && self.free_client_slots.is_empty())
        {
            return None;
        }
        let srv = self.up.backends.get(b)?.servers.get(s)?;
        if srv.removed {
            return None;
        }
        let limits: Vec<_> = [srv.limit, self.up.backends[b].limit].into_iter().flatten().collect();
        if !self.up.take(fe, Admission::Admitted) {
            // Ask the other workers for share (lending, limits.rs): the connection is offered
            // again a second later.
            self.up.want(fe, Admission::Admitted);
            return None;
        }
        if !self.up.shares.take_all(&limits) {
            self.up.release(fe, Admission::Admitted);
            self.follow.admission = true;
            return None;
        }
        let server = self.up.server_slots.take()?;
        // The connection counts on its server from now (not from its arrival): a `del server`
        // meanwhile sees it, and refuses, rather than let it arrive on a deleted server.
        let srv = &mut self.up.backends[b].servers[s];
        srv.active += 1;
        srv.refs += 1;
        // The client socket takes an accept slot: counted now, as a single accept in flight
        // reserves its own.
        self.client_slots += 1;
        let client = if direct { None } else { self.free_client_slots.pop() };
        let grant = Grant { client, server: server.index() };
        let landing = Landing { server, client, frontend: o.frontend, backend: o.backend, srv: o.server };
        self.landing.insert((from, o.key), landing);
        Some(grant)
    }

    /// Connections whose sockets are now in the slots granted to them: open them here.
    pub(super) fn on_move_arrive(&mut self, from: u64, conns: Vec<Moved>) {
        for m in conns {
            let Some(l) = self.landing.remove(&(from, m.key)) else {
                self.stats.unexpected_completions += 1;
                continue;
            };
            let fe = l.frontend;
            let listener = self
                .infos
                .iter()
                .position(|i| i.frontend == fe && i.addr == m.state.listener_addr)
                .or_else(|| self.infos.iter().position(|i| i.frontend == fe))
                .unwrap_or(0) as u16;
            let idx = self.conns.insert();
            let client = ClientSlot::accepted(m.client_slot);
            self.with_conn(idx, |cx| cx.arrive(listener, (fe, l.backend, l.srv), client, l.server, m.state));
            self.follow_up();
        }
    }

    /// The drain deadline: grants still outstanding (their sender is gone or stalled) are given
    /// back, so that the worker can finish. A client socket a MSG_RING may have put in the
    /// accept range closes with the ring.
    pub(super) fn drop_landings(&mut self) {
        let keys: Vec<(u64, (u32, u32))> = self.landing.keys().copied().collect();
        for (from, key) in keys {
            self.on_move_cancel(from, vec![(key, None)]);
        }
    }

    /// Grants called off: close what the slots hold (the old worker still has the sockets, or
    /// has closed them) and give the shares back.
    pub(super) fn on_move_cancel(&mut self, from: u64, keys: Vec<CallOff>) {
        for (key, client) in keys {
            let Some(l) = self.landing.remove(&(from, key)) else { continue };
            self.ring.close_server(l.server, false);
            match client {
                // The close gives the accept slot back (`on_slot_closed`).
                Some(i) => self.ring.close_client(ClientSlot::accepted(i), false),
                None => {
                    self.client_slots = self.client_slots.saturating_sub(1);
                    self.free_client_slots.extend(l.client);
                }
            }
            let (b, s) = (l.backend as usize, l.srv as usize);
            let srv = &mut self.up.backends[b].servers[s];
            srv.active = srv.active.saturating_sub(1);
            srv.unnamed();
            let limits = [srv.limit, self.up.backends[b].limit];
            for id in limits.into_iter().flatten() {
                self.up.shares.release(id, &mut self.up.outbox);
            }
            self.up.release(l.frontend as usize, Admission::Admitted);
            self.follow.admission = true;
            self.follow.queues.push(l.backend);
        }
        self.follow_up();
    }
}

/// The worker of an engine (of `cfg`, `workers` of them) a connection moving in goes to: the one its
/// client's source is steered to when its frontend has per-source limits (they count it there),
/// else the one holding its source address toward the server (its port is counted there), else
/// the next in turn (`rotor`).
pub fn pick_target(
    cfg: &Config,
    workers: usize,
    (fe, b, s): (u16, u16, u16),
    source_ip: Option<std::net::IpAddr>,
    client: Option<std::net::SocketAddr>,
    rotor: &mut usize,
) -> usize {
    let n = workers.max(1);
    if let (Some(p), Some(a)) = (cfg.frontends[fe as usize].per_source, client)
        && n > 1
    {
        return crate::listener::steered_worker(p, n, a.ip());
    }
    *rotor = rotor.wrapping_add(1);
    let sources = &cfg.backends[b as usize].servers[s as usize].sources;
    if let Some(j) = source_ip.and_then(|ip| sources.iter().position(|&x| x == ip)) {
        // sources.rs: source j is used by worker j mod n (at least as many sources as workers),
        // else by every worker w with w mod sources = j.
        if sources.len() >= n {
            return j % n;
        }
        let owners: Vec<usize> = (j..n).step_by(sources.len()).collect();
        return owners[*rotor % owners.len()];
    }
    *rotor % n
}

/// A connection's (frontend, backend, server) in `cfg`, found by name (the server by name and
/// address), if `cfg` has them.
pub fn place_by_name(
    cfg: &Config,
    frontend: &str,
    backend: &str,
    server: &str,
    address: std::net::SocketAddr,
) -> Option<(u16, u16, u16)> {
    let fe = cfg.frontends.iter().position(|f| f.name == frontend)?;
    let b = cfg.backends.iter().position(|x| x.name == backend)?;
    let s = cfg.backends[b].servers.iter().position(|x| x.name == server && x.address == address)?;
    Some((fe as u16, b as u16, s as u16))
}
