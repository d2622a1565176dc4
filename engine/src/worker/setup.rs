//! Building a worker: its ring with the address and timeout tables every connect chain may use,
//! its side of every backend (source shards, balancers, maxconn shares), its counters.

use std::collections::VecDeque;

use super::accept::ListenerState;
use super::ring::{Ring, RingSetup, ServerSlots, TimeoutId};
use super::timer::TimerWheel;
use super::token::{Op, Token};
use super::upstream::{Backend, Server, Upstream};
use super::{Worker, WorkerSetup};
use crate::balance::Balancer;
use crate::conn::{Clock, Followups, ListenerInfo, Slab};
use crate::limits::Shares;
use crate::log::ConnLog;
use crate::pipes::PipePool;
use crate::sources::ServerAddrs;
use crate::stats::{FrontendStats, ServerStats, WorkerStats, latency_histogram};

/// A number no other worker (or upgrade courier) of this process has: moves name their sender by it.
pub fn next_uid() -> u64 {
    static UIDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    UIDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Worker {
    pub(super) fn new(setup: WorkerSetup) -> std::io::Result<Worker> {
        let WorkerSetup { id, config, plan, listeners, rx, wake, peers, log } = setup;
        let cpu = plan.cpus[id];
        if let Some(cpu) = cpu {
            core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
        }
        // Address and timeout tables for the connect chains: a block per server (its address, this
        // worker's sources).
        let mut addrs = Vec::new();
        let mut timeouts = Vec::new();
        let mut keepalives = Vec::new();
        let mut backends = Vec::with_capacity(config.backends.len());
        for (b, be) in config.backends.iter().enumerate() {
            let connect_timeout = TimeoutId(timeouts.len() as u32);
            timeouts.push(be.connect_timeout);
            keepalives.push(be.tcp_keepalive.map(|k| k.as_sockopts()));
            let mut servers = Vec::with_capacity(be.servers.len());
            for (s, srv) in be.servers.iter().enumerate() {
                let made = ServerAddrs::new(srv.address, &srv.sources, id, plan.workers, plan.ephemeral_ports);
                addrs.push(made.block);
                let block = addrs.len() as u32 - 1;
                servers.push(Server::new(block, made.sources, srv.weight, plan.limits.server[b][s]));
            }
            let weights = be.servers.iter().map(|s| s.weight).collect();
            backends.push(Backend {
                balancer: Balancer::new(be.balance, weights, id)
                    .with_keys(be.servers.iter().map(|s| crate::balance::server_key(&s.name)).collect()),
                servers,
                queue: VecDeque::new(),
                limit: plan.limits.backend[b],
                connect_timeout,
                ramping: 0,
                picks: 0,
            });
        }
        let tune = &config.global.tune;
        let ring = Ring::new(RingSetup {
            entries: config.global.tune.ring_entries,
            files: plan.table_slots,
            accept_slots: plan.accept_slots,
            iowq_workers: config.global.tune.iowq_workers,
            cpu,
            addrs,
            timeouts,
            keepalives,
            server_opts: tune.server_sockopts(),
            max_chunks: plan.pipes_per_worker as usize,
            peer_slots: config.global.tune.peer_lookups as usize,
            recv_bufs: config.uses_ring().then_some((tune.recv_buffer_size as usize, tune.recv_buffers as usize)),
            io: plan.io,
        })?;
        let caps = plan.limits.totals.iter().map(|&t| t.min(plan.conns_per_worker)).collect();
        let shares = Shares::new(&plan.limits, id, plan.workers, caps);
        let stats = WorkerStats {
            worker: id,
            cpu,
            servers: config
                .backends
                .iter()
                .flat_map(|b| b.servers.iter().map(|s| ServerStats::new(&b.name, s)))
                .collect(),
            frontends: config.frontends.iter().map(FrontendStats::new).collect(),
            ..WorkerStats::default()
        };
        let mut server_index = Vec::with_capacity(config.backends.len());
        let mut n = 0;
        for b in &config.backends {
            server_index.push(n);
            n += b.servers.len();
        }
        let admission =
            (0..config.frontends.len()).map(|f| [Some(plan.limits.global), plan.limits.frontend[f]]).collect();
        let needs_peer: Vec<bool> = (0..config.frontends.len()).map(|f| config.knows_clients(f)).collect();
        let infos = listeners
            .iter()
            .map(|l| ListenerInfo {
                frontend: l.frontend as u16,
                ipv6: l.ipv6,
                addr: l.addr,
                needs_peer: needs_peer[l.frontend],
            })
            .collect();
        let now = Clock::now();
        let mut w = Worker {
            id,
            uid: next_uid(),
            cfg: config.clone(),
            ring,
            conns: Slab::with_capacity(plan.conns_per_worker as usize),
            timers: TimerWheel::new(now.ms),
            pipes: PipePool::new(plan.pipes_per_worker, config.global.tune.pipe_size),
            sendq: crate::conn::SendQueues::default(),
            splice_fds: Default::default(),
            waiters: VecDeque::new(),
            up: Upstream {
                backends,
                shares,
                outbox: Vec::new(),
                server_slots: ServerSlots::new(plan.accept_slots, plan.table_slots),
                server_index,
                connect_latency: (0..n).map(|_| latency_histogram()).collect(),
                admission,
                proxy_header: plan.limits.proxy_header.clone(),
                per_source: config
                    .frontends
                    .iter()
                    .map(|f| {
                        let capacity = 2 * plan.conns_per_worker as usize;
                        f.per_source.map(|p| crate::sourcelimits::SourceTable::new(p, capacity))
                    })
                    .collect(),
            },
            stats,
            now,
            log: log.map(ConnLog::new),
            infos,
            listeners: listeners.into_iter().map(|l| ListenerState::new(l.frontend, l.fd)).collect(),
            parked: VecDeque::new(),
            admitting: VecDeque::new(),
            client_slots: 0,
            free_client_slots: if plan.io.direct_accept() {
                Vec::new()
            } else {
                (0..plan.accept_slots).rev().collect()
            },
            follow: Followups::default(),
            started_ms: now.ms,
            rx,
            wake,
            peers,
            draining: None,
            next_trim: now.ms + 1000,
            next_stall_review: 0,
            longest_turn_ns: [0; 2],
            bulk: super::bulkpath::BulkPath::new(config.splices_auto() && plan.io.fd_install, now.ms, id),
            coalesce: super::coalesce::Coalesce::new(plan.batch_wait),
            spreads: Vec::new(),
            drain_spread: vec![false; config.backends.len()],
            rate: config
                .frontends
                .iter()
                .map(|f| f.rate_limit.map(|r| super::rate::Bucket::new(r, plan.workers, id, now.ms)))
                .collect(),
            plan,
            mover: None,
            landing: std::collections::HashMap::new(),
        };
        let fd = w.wake.fd();
        w.ring.read_wake(fd, Token::worker(Op::Wake, 0));
        Ok(w)
    }
}
