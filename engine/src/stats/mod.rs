//! Counters each worker owns and publishes on request.
//!
//! A worker increments plain integers in its own `WorkerStats`; nothing is shared. A snapshot is a
//! copy the worker sends back over its control channel between two event-loop turns, so publishing
//! never stops or slows the data path. [`EngineStats`] is the set of snapshots plus process-level
//! facts (effective limits), with totals computed on demand.

use std::net::IpAddr;

use crate::worker::ring::RingCounters;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectErrors {
    pub refused: u64,
    pub timeout: u64,
    pub port_exhausted: u64,
    pub unreachable: u64,
    pub other: u64,
}

impl ConnectErrors {
    pub fn total(&self) -> u64 {
        self.refused + self.timeout + self.port_exhausted + self.unreachable + self.other
    }
}

/// Times admission stopped at a limit, by level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimitHits {
    pub global: u64,
    pub frontend: u64,
    pub backend: u64,
    pub server: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub client: u64,
    pub server: u64,
    pub queue: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    pub backend: String,
    pub server: String,
    pub active: u64,
    pub total: u64,
    pub connect_errors: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceStats {
    pub backend: String,
    pub server: String,
    pub ip: IpAddr,
    pub active: u64,
    pub capacity: u64,
}

#[derive(Clone, Debug, Default)]
pub struct WorkerStats {
    pub worker: usize,
    pub cpu: Option<usize>,
    /// Proxied connections open now (client accepted and admitted).
    pub active: u64,
    pub accepted: u64,
    pub closed: u64,
    /// Accepted but waiting for a global/frontend slot (the listener is paused meanwhile).
    pub parked: u64,
    pub limit_hits: LimitHits,
    pub queued: u64,
    pub queued_total: u64,
    pub connect_errors: ConnectErrors,
    pub timeouts: Timeouts,
    pub retries: u64,
    /// Connections that failed every server they were allowed to try.
    pub failed: u64,
    pub resets_from_client: u64,
    pub resets_from_server: u64,
    pub bytes_client_to_server: u64,
    pub bytes_server_to_client: u64,
    pub splices: u64,
    pub pipes_in_use: u64,
    pub pipes_pooled: u64,
    pub pipe_waits: u64,
    /// This worker's share of the global maxconn, and share lent to / borrowed from other workers.
    pub global_share: u64,
    pub share_lent: u64,
    pub share_borrowed: u64,
    pub ring: RingCounters,
    pub loop_iterations: u64,
    pub busy_ns: u64,
    pub servers: Vec<ServerStats>,
    pub sources: Vec<SourceStats>,
}

/// What the whole engine reports: one snapshot per worker plus the limits in force.
#[derive(Clone, Debug, Default)]
pub struct EngineStats {
    pub workers: Vec<WorkerStats>,
    /// maxconn as configured (None: not set).
    pub configured_maxconn: Option<u32>,
    /// maxconn in force after fitting the host's limits.
    pub effective_maxconn: u32,
    pub nofile: u64,
}

impl EngineStats {
    /// Sum of a counter over workers.
    pub fn total(&self, f: impl Fn(&WorkerStats) -> u64) -> u64 {
        self.workers.iter().map(f).sum()
    }

    /// Per-server rows summed over workers (same order as in each worker).
    pub fn servers(&self) -> Vec<ServerStats> {
        let mut out: Vec<ServerStats> = Vec::new();
        for w in &self.workers {
            for (i, s) in w.servers.iter().enumerate() {
                match out.get_mut(i) {
                    Some(o) => {
                        o.active += s.active;
                        o.total += s.total;
                        o.connect_errors += s.connect_errors;
                    }
                    None => out.push(s.clone()),
                }
            }
        }
        out
    }
}
