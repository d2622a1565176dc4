//! What a worker knows of its backends: per server its health, its share of the source IPs and
//! its counters; per backend the balancer and the queue of connections waiting for a server; and
//! the per-worker pools a connect draws from (maxconn shares, server slots of the direct table).
//! conn/connect.rs works on it through a connection's context; the worker reads it for stats.

use std::collections::VecDeque;

use crate::balance::{Balancer, WEIGHT_SCALE};
use crate::conn::Admission;
use crate::limits::{LimitId, ShareMsg, Shares};
use crate::sources::SourceShard;
use crate::stats::{AdminState, LatencyHistogram, ServerState};
use crate::worker::ring::{ServerSlots, TimeoutId};

/// One server, as this worker sees it.
pub(crate) struct Server {
    /// Health as last reported (a server without health checks is always `Up`).
    pub state: ServerState,
    /// As the runtime API set it.
    pub admin: AdminState,
    /// `del server`: gone for good (its index stays taken).
    pub removed: bool,
    /// Its weight: the configured one, or the one the runtime API set. The balancer holds the one
    /// in use, lower while the server ramps up.
    pub weight: u32,
    /// Since when (worker clock, ms) the server ramps up after coming back (`slowstart`).
    pub ramp_from: Option<u64>,
    /// While it ramps: the backend's connects when the ramp began, and this server's since.
    pub ramp_base: u64,
    pub ramp_picks: u64,
    /// How far the ramp has got (the weight in use over the full one).
    pub ramp_progress: f32,
    /// Its block in the ring's address table (its address and its sources': [`crate::sources::ServerAddrs`]).
    pub addrs: u32,
    pub sources: SourceShard,
    pub active: u32,
    /// Connections of this worker that name it, from the pick (or a move in) until their entry
    /// is freed: `active` and those still closing after they gave it back, which may have a
    /// connect chain to its addresses in flight and name it in their log line. A deleted
    /// server's index (and block of addresses) is taken again only once this is 0 on every
    /// worker.
    pub refs: u32,
    pub total: u64,
    pub errors: u64,
    /// Bytes of its established connections: from their clients, and from it.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub limit: Option<LimitId>,
    /// When this worker last said that connects to this server ran out of source ports (worker
    /// clock, ms), and how many such failures it has not reported since.
    pub ports_logged_at: Option<u64>,
    pub ports_unlogged: u64,
}

pub(crate) struct Backend {
    pub balancer: Balancer,
    pub servers: Vec<Server>,
    /// Connections waiting for a server slot: (slab index, generation), oldest first. Entries of
    /// connections that left the queue otherwise (closed) are skipped when reached.
    pub queue: VecDeque<(u32, u32)>,
    pub limit: Option<LimitId>,
    pub connect_timeout: TimeoutId,
    /// Servers ramping up (`ramp_from` set): their weights are brought up to date before a pick.
    pub ramping: u16,
    /// Connects this worker started in this backend.
    pub picks: u64,
}

impl Server {
    /// A server as a worker starts it (at start, or added by `add server`): UP, ready, its
    /// configured weight, no connection yet.
    pub fn new(addrs: u32, sources: SourceShard, weight: u32, limit: Option<LimitId>) -> Server {
        Server {
            state: ServerState::Up,
            admin: AdminState::Ready,
            removed: false,
            weight,
            ramp_from: None,
            ramp_base: 0,
            ramp_picks: 0,
            ramp_progress: 1.0,
            addrs,
            sources,
            active: 0,
            refs: 0,
            total: 0,
            errors: 0,
            bytes_in: 0,
            bytes_out: 0,
            limit,
            ports_logged_at: None,
            ports_unlogged: 0,
        }
    }

    /// One connection no longer names it (see `refs`): freed, retrying elsewhere, or a move in
    /// called off.
    pub fn unnamed(&mut self) {
        debug_assert!(self.refs > 0, "a connection names a server it was not counted on");
        self.refs = self.refs.saturating_sub(1);
    }

    /// Whether it may take new connections (health and the runtime API agree).
    pub fn available(&self) -> bool {
        self.state.is_up() && self.admin == AdminState::Ready && !self.removed
    }
}

/// Whether ramping server `i` of `servers` has had its share of new connections for now, under
/// `leastconn` and `random` (`algo`), which pick by load: an empty server coming back would take
/// every new connection at any weight above 0. Its share of the backend's connects since its ramp
/// began (`picks` now) may be at most its weight's fair share times how far the ramp has got — so
/// its new-connection rate ramps from ~0 to full with its weight. (Under `roundrobin`, `source`
/// and `hash` the weight alone sets the share.)
pub(crate) fn ramp_capped(servers: &[Server], picks: u64, algo: crate::config::Balance, i: usize) -> bool {
    let srv = &servers[i];
    if srv.ramp_from.is_none()
        || srv.ramp_picks == 0
        || !matches!(algo, crate::config::Balance::Leastconn | crate::config::Balance::Random)
    {
        return false;
    }
    let full: u64 = servers.iter().filter(|s| s.available()).map(|s| u64::from(s.weight)).sum();
    if full == 0 || srv.weight == 0 {
        return false;
    }
    let share = f64::from(srv.weight) / full as f64;
    srv.ramp_picks as f64 > f64::from(srv.ramp_progress) * share * picks.saturating_sub(srv.ramp_base) as f64
}

impl Backend {
    /// Brings the weights of ramping servers up to date: `weight × elapsed / slowstart` (at least
    /// 1/256 of a weight while ramping, so the server gets a first few connections), full once the
    /// ramp is over.
    pub fn ramp(&mut self, now_ms: u64, cfg: &crate::config::Backend) {
        for (i, srv) in self.servers.iter_mut().enumerate() {
            let Some(from) = srv.ramp_from else { continue };
            let window = cfg.servers[i].slowstart.map_or(0, |d| d.as_millis() as u64);
            let elapsed = now_ms.saturating_sub(from);
            let full = srv.weight.saturating_mul(WEIGHT_SCALE);
            let w = if elapsed >= window {
                srv.ramp_from = None;
                self.ramping -= 1;
                full
            } else {
                ((u64::from(full) * elapsed / window) as u32).max(1).min(full)
            };
            srv.ramp_progress = if full == 0 { 1.0 } else { w as f32 / full as f32 };
            self.balancer.set_weight(i, w);
        }
    }

    /// Server `s` has just become available: with a `slowstart`, it ramps up from now.
    pub fn start_ramp(&mut self, s: usize, now_ms: u64, cfg: &crate::config::Backend) {
        if cfg.servers[s].slowstart.is_none() || self.servers[s].weight == 0 {
            return;
        }
        if self.servers[s].ramp_from.replace(now_ms).is_none() {
            self.ramping += 1;
        }
        self.servers[s].ramp_base = self.picks;
        self.servers[s].ramp_picks = 0;
        self.ramp(now_ms, cfg);
    }

    /// Server `s` is no longer available: a ramp in progress ends (it starts again when it comes
    /// back).
    pub fn stop_ramp(&mut self, s: usize) {
        if self.servers[s].ramp_from.take().is_some() {
            self.ramping -= 1;
            self.balancer.set_weight(s, self.servers[s].weight.saturating_mul(WEIGHT_SCALE));
        }
    }
}

/// The worker's side of every backend, and the pools a connect draws from.
pub(crate) struct Upstream {
    pub backends: Vec<Backend>,
    /// This worker's maxconn shares (global, frontends, backends, servers).
    pub shares: Shares,
    /// Share messages to other workers, sent at the end of the loop turn: (worker, message).
    pub outbox: Vec<(u16, ShareMsg)>,
    /// Free direct-table slots for server sockets.
    pub server_slots: ServerSlots,
    /// Index of each backend's first server in the flattened per-server tables.
    pub server_index: Vec<usize>,
    /// Connect latency per server (flattened): 1.5 KiB each, allocated at start.
    pub connect_latency: Vec<LatencyHistogram>,
    /// Per frontend, the limits a connection is admitted against: the global one, and the
    /// frontend's own if it has a maxconn.
    pub admission: Vec<[Option<LimitId>; 2]>,
    /// Per frontend with `accept_proxy`, the limit of connections reading their PROXY header.
    pub proxy_header: Vec<Option<LimitId>>,
    /// Per frontend with per-source limits, this worker's table of sources (all of theirs: the
    /// listeners steer each source to one worker).
    pub per_source: Vec<Option<crate::sourcelimits::SourceTable>>,
}

impl Upstream {
    /// What a connection accepted on frontend `fe` first takes: a PROXY-header slot for an
    /// `accept_proxy` frontend (the admission shares come once its header is there), else the
    /// admission shares.
    pub fn on_accept(&self, fe: usize) -> Admission {
        if self.proxy_header[fe].is_some() { Admission::Handshake } else { Admission::Admitted }
    }

    /// The limits of frontend `fe` that `a` stands for.
    pub fn limits(&self, fe: usize, a: Admission) -> [Option<LimitId>; 2] {
        match a {
            Admission::None => [None, None],
            Admission::Handshake => [self.proxy_header[fe], None],
            Admission::Admitted => self.admission[fe],
        }
    }

    /// Takes the shares `a` stands for on frontend `fe`: all of them, or none when one has no room.
    pub fn take(&mut self, fe: usize, a: Admission) -> bool {
        let mut ids = [0; 2];
        let mut n = 0;
        for id in self.limits(fe, a).into_iter().flatten() {
            ids[n] = id;
            n += 1;
        }
        self.shares.take_all(&ids[..n])
    }

    /// Gives back the shares `a` stands for on frontend `fe`.
    pub fn release(&mut self, fe: usize, a: Admission) {
        for id in self.limits(fe, a).into_iter().flatten() {
            self.shares.release(id, &mut self.outbox);
        }
    }

    /// Asks the other workers for the shares of `a` that have no room here (the slow path).
    pub fn want(&mut self, fe: usize, a: Admission) {
        for id in self.limits(fe, a).into_iter().flatten() {
            if !self.shares.has_room(id) {
                self.shares.want(id, &mut self.outbox);
            }
        }
    }

    /// The source IP a connection uses toward its server, if it has one.
    pub fn source_ip(&self, c: &crate::conn::Conn) -> Option<std::net::IpAddr> {
        if c.server == crate::conn::NO_INDEX || c.source == crate::conn::NO_INDEX {
            return None;
        }
        let srv = self.backends.get(c.backend as usize)?.servers.get(c.server as usize)?;
        srv.sources.ips.get(c.source as usize).copied()
    }
}
