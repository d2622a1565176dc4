//! Counters each worker owns and publishes on request.
//!
//! A worker increments plain integers in its own `WorkerStats`; nothing is shared and nothing is
//! atomic. A snapshot is a copy the worker sends back over its control channel between two
//! event-loop turns, so publishing never stops or slows the data path. What a snapshot costs grows
//! with the servers only by their rows: connect latency travels as each worker's percentiles plus
//! its non-zero histogram buckets (`latency`), never as whole histograms. [`EngineStats`] is the
//! set of snapshots plus process-level facts (effective limits), with totals and per-server views
//! computed on demand. `render` turns it into the operator's tables and HAProxy-style CSV,
//! `prometheus` into the Prometheus text format; `socket` serves all of it on a Unix socket, and
//! `serve` keeps the clients of both endpoints from holding each other up.

pub mod latency;
pub mod prometheus;
pub mod render;
mod serve;
pub mod socket;

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub use latency::{LatencyBucket, LatencyHistogram};
pub use serve::{ANSWER_BUDGET, ANSWER_DEADLINE, MAX_CLIENTS, REQUEST_DEADLINE};

use crate::worker::ring::RingCounters;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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

    pub fn add(&mut self, o: &ConnectErrors) {
        self.refused += o.refused;
        self.timeout += o.timeout;
        self.port_exhausted += o.port_exhausted;
        self.unreachable += o.unreachable;
        self.other += o.other;
    }
}

/// Times admission stopped at a limit, by level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitHits {
    pub global: u64,
    pub frontend: u64,
    pub backend: u64,
    pub server: u64,
    /// Times a listener waited for its frontend's `rate_limit`.
    #[serde(default)]
    pub rate: u64,
}

impl LimitHits {
    pub fn add(&mut self, o: &LimitHits) {
        self.global += o.global;
        self.frontend += o.frontend;
        self.backend += o.backend;
        self.server += o.server;
        self.rate += o.rate;
    }
}

/// Connections refused at accept by `maxconn_per_source` / `rate_per_source`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRefused {
    /// The source had `maxconn_per_source` open (or its address was unknown).
    pub maxconn: u64,
    /// The source's `rate_per_source` was used up.
    pub rate: u64,
    /// The worker's table of sources was full.
    pub table_full: u64,
}

impl SourceRefused {
    pub fn total(&self) -> u64 {
        self.maxconn + self.rate + self.table_full
    }

    pub fn add(&mut self, o: &SourceRefused) {
        self.maxconn += o.maxconn;
        self.rate += o.rate;
        self.table_full += o.table_full;
    }
}

/// Event-loop turns that took long: wall time from the worker waking to its next wait — its own
/// work, any submission flushed mid-turn, and any time the thread was preempted or its vCPU stolen
/// meanwhile. Every connection of the worker waited at least that long for such a turn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlowTurns {
    /// Turns of 1 ms or more (the longer ones included).
    pub over_1ms: u64,
    /// Turns of 10 ms or more.
    pub over_10ms: u64,
    /// Turns of 100 ms or more.
    pub over_100ms: u64,
}

impl SlowTurns {
    /// Counts a turn of `ns` nanoseconds.
    pub fn record(&mut self, ns: u64) {
        if ns >= 1_000_000 {
            self.over_1ms += 1;
            if ns >= 10_000_000 {
                self.over_10ms += 1;
                if ns >= 100_000_000 {
                    self.over_100ms += 1;
                }
            }
        }
    }
}

/// Connections closed by a timeout, by kind (connect timeouts are in `ConnectErrors::timeout`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    pub client: u64,
    pub server: u64,
    pub queue: u64,
}

impl Timeouts {
    pub fn add(&mut self, o: &Timeouts) {
        self.client += o.client;
        self.server += o.server;
        self.queue += o.queue;
    }
}

/// Connect latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

/// A new connect-latency histogram (see `latency`: 1 µs to 67 s within 3.1 %, 1.5 KiB). Recording
/// never allocates.
pub fn latency_histogram() -> LatencyHistogram {
    LatencyHistogram::default()
}

/// What one server's stats cost each worker, all the time: its latency histogram and its row
/// (names aside). `ringproxy check` counts it in its memory item.
pub const SERVER_BYTES_PER_WORKER: u64 = (latency::HISTOGRAM_BYTES + std::mem::size_of::<ServerStats>()) as u64;

/// Whether a server takes new connections (health checks decide; without them it is always up).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerState {
    #[default]
    #[serde(rename = "UP")]
    Up,
    #[serde(rename = "DOWN")]
    Down,
}

impl ServerState {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerState::Up => "UP",
            ServerState::Down => "DOWN",
        }
    }

    pub fn is_up(self) -> bool {
        self == ServerState::Up
    }
}

impl ServerStats {
    /// The row of server `srv` of backend `backend` before anything happened.
    pub fn new(backend: &str, srv: &crate::config::Server) -> ServerStats {
        ServerStats {
            backend: backend.to_owned(),
            server: srv.name.clone(),
            address: srv.address.to_string(),
            state: ServerState::Up,
            weight: u64::from(srv.weight),
            ramp_pct: 100,
            maxconn: u64::from(srv.maxconn.unwrap_or(0)),
            ..ServerStats::default()
        }
    }

    /// The status operators read (HAProxy's words): MAINT and DRAIN override UP; DOWN stays DOWN
    /// under DRAIN.
    pub fn status(&self) -> &'static str {
        match (self.admin, self.state) {
            (AdminState::Maint, _) => "MAINT",
            (AdminState::Drain, ServerState::Up) => "DRAIN",
            (_, state) => state.as_str(),
        }
    }
}

impl std::fmt::Display for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// Compares with the word operators see (`"UP"`, `"DOWN"`).
impl PartialEq<&str> for ServerState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// What the operator set a server to through the runtime API (`set server B/S state ...`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminState {
    /// Takes new connections (when UP).
    #[default]
    #[serde(rename = "READY")]
    Ready,
    /// Takes no new connection; its open ones continue.
    #[serde(rename = "DRAIN")]
    Drain,
    /// Taken out for maintenance: no new connection, its open ones continue; its health no
    /// longer matters (the row says MAINT).
    #[serde(rename = "MAINT")]
    Maint,
}

impl AdminState {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        }
    }

    pub fn parse(word: &str) -> Option<AdminState> {
        match word {
            "ready" => Some(AdminState::Ready),
            "drain" => Some(AdminState::Drain),
            "maint" => Some(AdminState::Maint),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerStats {
    pub backend: String,
    pub server: String,
    pub address: String,
    pub state: ServerState,
    /// Set through the runtime API (READY unless changed).
    #[serde(default)]
    pub admin: AdminState,
    /// The weight new connections are balanced with now: the configured one or the one set at
    /// run time, lower while the server ramps up after `slowstart`.
    #[serde(default)]
    pub weight: u64,
    /// `del server` removed it: its row is left out of the merged stats.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
    /// Where a `slowstart` ramp is: the weight in use as a percentage of the server's weight (100
    /// when not ramping).
    #[serde(default)]
    pub ramp_pct: u64,
    pub active: u64,
    /// Connections that gave the server back but still name it: closing (their sockets being
    /// torn down, a connect chain cancelled), or waiting to try another server. A deleted
    /// server's index is taken by the next `add server` only once this and `active` are 0.
    #[serde(default)]
    pub lingering: u64,
    pub total: u64,
    pub connect_errors: u64,
    /// maxconn of this server (0: none).
    pub maxconn: u64,
    /// This worker's share of it.
    pub share: u64,
    /// Bytes its connections received from their clients (sent on to it) and from it (sent on to
    /// the clients), counted from the moment each connection reached it (what a client sent
    /// before is counted then).
    #[serde(default)]
    pub bytes_in: u64,
    #[serde(default)]
    pub bytes_out: u64,
    pub connect_latency_us: Latency,
}

/// One frontend's counters on one worker, and (in [`EngineStats::frontends`]) summed over the
/// workers. A worker counts what happens to a connection in its frontend's row only; the worker's
/// own totals of the same counters are these rows summed when a snapshot is taken.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FrontendStats {
    pub frontend: String,
    /// Connections open now (admitted, not closing), reading their PROXY header, and accepted but
    /// waiting for a global or frontend maxconn slot (gauges).
    pub active: u64,
    pub handshakes: u64,
    pub parked: u64,
    pub accepted: u64,
    pub closed: u64,
    /// Bytes received from its clients (sent on to servers) and from its servers (sent on to the
    /// clients).
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Connections refused by the access list (`allow` / `deny`), and by the per-source limits,
    /// by cause.
    pub denied: u64,
    pub source_refused: SourceRefused,
    /// Times admission of its connections stopped at a limit, by level (`rate`: its
    /// `rate_limit`).
    pub limit_hits: LimitHits,
    /// Its connections closed by a timeout, a reset, `timeout.lifetime`, the operator, a bad
    /// PROXY header, or because no server could be reached.
    pub timeouts: Timeouts,
    pub resets_from_client: u64,
    pub resets_from_server: u64,
    pub lifetime_ends: u64,
    pub killed: u64,
    pub proxy_header_errors: u64,
    pub failed: u64,
    /// Its `maxconn` (0: none) and `rate_limit` (0: none), as configured.
    pub maxconn: u64,
    pub rate_limit: u64,
    /// The worker's share of its `maxconn` now (0 without one): summed, the part of it the
    /// workers hold (the rest is lent on the way or kept back, see `limits`).
    pub share: u64,
    /// The worker's share of its `rate_limit` now, connections per second (0 without one): the
    /// shares add up to the limit and move to the workers that have the demand (`rate`).
    pub rate_share: f64,
}

impl FrontendStats {
    /// The row of frontend `fe` before anything happened.
    pub fn new(fe: &crate::config::Frontend) -> FrontendStats {
        FrontendStats {
            frontend: fe.name.clone(),
            maxconn: u64::from(fe.maxconn.unwrap_or(0)),
            rate_limit: u64::from(fe.rate_limit.unwrap_or(0)),
            ..FrontendStats::default()
        }
    }

    /// Adds `o`'s counters and gauges (not its name or its configured limits).
    pub fn add(&mut self, o: &FrontendStats) {
        self.active += o.active;
        self.handshakes += o.handshakes;
        self.parked += o.parked;
        self.accepted += o.accepted;
        self.closed += o.closed;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.denied += o.denied;
        self.source_refused.add(&o.source_refused);
        self.limit_hits.add(&o.limit_hits);
        self.timeouts.add(&o.timeouts);
        self.resets_from_client += o.resets_from_client;
        self.resets_from_server += o.resets_from_server;
        self.lifetime_ends += o.lifetime_ends;
        self.killed += o.killed;
        self.proxy_header_errors += o.proxy_header_errors;
        self.failed += o.failed;
        self.share += o.share;
        self.rate_share += o.rate_share;
    }

    /// Connections refused at accept, every cause (access list and per-source limits).
    pub fn refused(&self) -> u64 {
        self.denied + self.source_refused.total()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStats {
    pub backend: String,
    pub server: String,
    pub ip: IpAddr,
    /// Connections open from this source to the server (each holds one local port).
    pub active: u64,
    /// Ports available to this source toward the server (ip_local_port_range).
    pub capacity: u64,
    /// The server's row (index in its worker's `servers`). A worker leaves the names empty and
    /// gives the row: the names are filled in off the worker ([`WorkerStats::name_sources`]), so
    /// that copying a server's 65,536 sources makes no allocation on the data path's thread.
    #[serde(skip)]
    pub server_row: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStats {
    pub backend: String,
    pub balance: String,
    pub active: u64,
    pub total: u64,
    pub connect_errors: u64,
    pub queued: u64,
    pub maxconn: u64,
    /// Its servers' bytes, summed.
    #[serde(default)]
    pub bytes_in: u64,
    #[serde(default)]
    pub bytes_out: u64,
    /// How its connections move their bytes: its `splice` (`tune.splice` unless it sets its own).
    #[serde(default)]
    pub splice: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkerStats {
    pub worker: usize,
    pub cpu: Option<usize>,
    /// Listening sockets this worker still accepts on (0 once a drain has closed them).
    pub listening: u64,
    /// Proxied connections open now (admitted, not closing): what counts against maxconn.
    pub active: u64,
    /// Connections being closed (cancelling their last operations); not counted in `active`.
    pub closing: u64,
    /// Connections reading their PROXY header (`accept_proxy`): they hold a PROXY-header slot of
    /// their frontend, not a maxconn one, so they are not counted in `active`.
    #[serde(default)]
    pub handshakes: u64,
    pub accepted: u64,
    pub closed: u64,
    /// Accepted but waiting for a global/frontend slot (the listener is paused meanwhile).
    pub parked: u64,
    pub limit_hits: LimitHits,
    /// Connections waiting in a backend queue now, and since start.
    pub queued: u64,
    pub queued_total: u64,
    pub connect_errors: ConnectErrors,
    pub timeouts: Timeouts,
    pub retries: u64,
    /// Connections that failed every server they were allowed to try.
    pub failed: u64,
    pub resets_from_client: u64,
    pub resets_from_server: u64,
    /// PROXY protocol headers refused (malformed, oversized, late) and sent to servers.
    pub proxy_header_errors: u64,
    /// Connections refused by their frontend's access list (`allow` / `deny`), closed at accept.
    #[serde(default)]
    pub denied: u64,
    /// Connections closed by the operator (`shutdown sessions server`).
    #[serde(default)]
    pub killed: u64,
    /// Connections closed at their frontend's `timeout.lifetime`.
    #[serde(default)]
    pub lifetime_ends: u64,
    /// Established connections that moved in from the engine a reload replaced, and out to the
    /// engine that replaced this one (their sockets stay open: they are not in `closed`).
    #[serde(default)]
    pub moved_in: u64,
    #[serde(default)]
    pub moved_out: u64,
    /// Moves the new engine refused (no maxconn share, no free slot, draining itself): the
    /// connection stays and is offered again a second later.
    #[serde(default)]
    pub move_refused: u64,
    /// Moves whose hand-over failed in the kernel (MSG_RING): the connection stays.
    #[serde(default)]
    pub move_failed: u64,
    /// Connections refused by a frontend's per-source limits, by cause.
    #[serde(default)]
    pub source_refused: SourceRefused,
    /// Sources this worker tracks for per-source limits (gauge).
    #[serde(default)]
    pub sources_tracked: u64,
    pub proxy_headers_sent: u64,
    /// Looks at a client's bytes while waiting for its whole PROXY header (a header split over
    /// several packets takes more than one).
    #[serde(default)]
    pub proxy_header_peeks: u64,
    pub bytes_client_to_server: u64,
    pub bytes_server_to_client: u64,
    pub splices: u64,
    /// Receive completions into the ring's buffers that brought bytes (`splice: auto` and
    /// `never`), the buffers they filled (several per completion with bundles, 6.10+), and the
    /// sends that forwarded them (one send may carry several receives' buffers).
    #[serde(default)]
    pub ring_recvs: u64,
    #[serde(default)]
    pub ring_recv_bufs: u64,
    #[serde(default)]
    pub ring_sends: u64,
    /// Receives whose bytes were copied behind those of the buffer queued before them (their
    /// destination was behind), their own buffer given back at once; and the bytes received and
    /// not sent on yet that the send queues hold now (gauge).
    #[serde(default)]
    pub ring_recv_merged: u64,
    #[serde(default)]
    pub ring_queued_bytes: u64,
    /// `tune.send_zerocopy`: sends that went zero-copy (`SENDMSG_ZC`); their notifications that
    /// said the kernel copied the bytes after all (loopback, a device without scatter-gather;
    /// 6.2+); and the zero-copy sends whose notification has not come yet, whose buffers are held
    /// until it does (gauge).
    #[serde(default)]
    pub zerocopy_sends: u64,
    #[serde(default)]
    pub zerocopy_copied: u64,
    #[serde(default)]
    pub zerocopy_pending: u64,
    /// `splice: auto`: 1 while this worker's bulk flows splice, 0 while they go through the
    /// receive buffers; how often it changed (each probe counts its moves); and what each path
    /// cost when last measured, in ps of the worker's CPU per byte moved (0: not measured).
    #[serde(default)]
    pub bulk_splicing: u64,
    #[serde(default)]
    pub bulk_path_switches: u64,
    #[serde(default)]
    pub bulk_cost_copy_ps: u64,
    #[serde(default)]
    pub bulk_cost_splice_ps: u64,
    pub pipes_in_use: u64,
    pub pipes_pooled: u64,
    /// Process descriptors held (or being made) for splicing on the worker's thread: 2 per
    /// connection that has moved bulk data with `splice: auto` or `always` (gauge).
    #[serde(default)]
    pub splice_fds: u64,
    /// Chunks spliced on the worker's thread by system calls (counted in `splices` too).
    #[serde(default)]
    pub inline_splices: u64,
    /// Buffers lent to connections and kept in the pool: chunk buffers (small transfers), PROXY
    /// header buffers and, with `splice: auto` or `never`, the receive buffers of the provided-buffer
    /// ring lent to connections.
    pub buffers_in_use: u64,
    pub buffers_pooled: u64,
    /// Bytes of the receive buffers' pages resident now, whoever holds the buffers (gauge): pages
    /// a receive wrote stay until a trim gives them back (a second after their buffer was last
    /// reached: docs/architecture.md, *How many buffers*).
    #[serde(default)]
    pub recv_buffers_resident: u64,
    pub pipe_waits: u64,
    /// Times a connection's receive waited for a receive buffer (`splice: auto` or `never`): it
    /// found the worker's ring empty (ENOBUFS), or every buffer was out.
    #[serde(default)]
    pub buffer_waits: u64,
    /// Connections not yet connected to a server whose client's receive is armed (gauge): each
    /// may hold up to two receive buffers of what its client sent first, and at most a quarter of
    /// `tune.recv_buffers` of them are at a time; the others wait for their server with the
    /// client's bytes left in its socket (docs/architecture.md, *Bytes before the server*).
    #[serde(default)]
    pub early_receives: u64,
    /// Bytes queued for a destination with no room that were copied out of the receive buffers
    /// while the worker was short of them (gauge), and how many times a queue was (a destination
    /// that stopped reading keeps no buffer from the other flows: docs/architecture.md, *A
    /// destination that stops reading*).
    #[serde(default)]
    pub ring_spilled_bytes: u64,
    #[serde(default)]
    pub ring_spills: u64,
    /// This worker's share of the global maxconn, and share lent to / borrowed from other workers.
    pub global_share: u64,
    pub share_lent: u64,
    pub share_borrowed: u64,
    pub ring: RingCounters,
    /// Messages received (receives or splices that brought bytes) on a direction of a connection
    /// that had none for 100 ms before them (`quiet`: heartbeats, pushes), and the others (`busy`:
    /// request/response loops, bulk transfers, a new connection's first messages). What
    /// `tune.batch_wait: auto` decides by (worker/coalesce.rs).
    #[serde(default)]
    pub quiet_messages: u64,
    #[serde(default)]
    pub busy_messages: u64,
    /// 1 while the worker's waits let completions gather (`tune.batch_wait`: `auto` on quiet
    /// traffic, or a window set), 0 while every event wakes it (gauge).
    #[serde(default)]
    pub batching: u64,
    /// `tune.idle_poll_after`: directions of idle connections whose multishot receive is swapped
    /// for a one-shot poll now, to hold less kernel memory (gauge), and how many swaps there were.
    #[serde(default)]
    pub idle_polled: u64,
    #[serde(default)]
    pub idle_poll_swaps: u64,
    pub loop_iterations: u64,
    /// Completions that matched nothing in flight (a kernel or engine bug; should stay 0).
    #[serde(default)]
    pub unexpected_completions: u64,
    pub busy_ns: u64,
    #[serde(default)]
    pub slow_turns: SlowTurns,
    /// The longest event-loop turn of the last one to two seconds, µs (what a connection of this
    /// worker may have waited for the loop lately; `slow_turns` keeps the count since start).
    #[serde(default)]
    pub longest_turn_us: u64,
    /// Worker clock when the snapshot was taken (ms since the worker started).
    pub uptime_ms: u64,
    pub servers: Vec<ServerStats>,
    pub sources: Vec<SourceStats>,
    /// A slice of a stats query that ended inside the sources of its last server row: the next
    /// of them (0: it did not).
    #[serde(skip)]
    pub sources_next: usize,
    /// Connections waiting in each backend's queue now (configuration order).
    pub queued_by_backend: Vec<u64>,
    /// Per frontend (configuration order), its connections' counters on this worker. The
    /// worker's own counters of the same events (`active`, `accepted`, bytes, refusals, limit
    /// hits, closes by cause) are these rows summed.
    #[serde(default)]
    pub frontends: Vec<FrontendStats>,
    /// The non-zero connect-latency buckets of every server, by server (the index in `servers`)
    /// then bucket: what merging percentiles over workers needs. Not serialised (percentiles are),
    /// and emptied once merged.
    #[serde(skip)]
    pub connect_latency: Vec<LatencyBucket>,
    /// How many server rows the worker has: a snapshot carries only the slice it was asked for
    /// (see [`Detail`]), and the collector asks for the rest by this.
    #[serde(skip)]
    pub server_rows: usize,
}

impl WorkerStats {
    /// Fills in each source row's backend and server names from its server's row; drops a row
    /// whose server row is not there (cannot happen: a slice brings a server's row no later than
    /// its sources).
    pub fn name_sources(&mut self) {
        let servers = &self.servers;
        self.sources.retain_mut(|src| match servers.get(src.server_row as usize) {
            Some(row) => {
                if src.server.is_empty() {
                    src.backend.clone_from(&row.backend);
                    src.server.clone_from(&row.server);
                }
                true
            }
            None => false,
        });
    }

    /// Sets the worker's totals of what its frontends' rows count: the rows summed.
    pub fn sum_frontends(&mut self) {
        let mut t = FrontendStats::default();
        for f in &self.frontends {
            t.add(f);
        }
        self.active = t.active;
        self.handshakes = t.handshakes;
        self.accepted = t.accepted;
        self.closed = t.closed;
        self.bytes_client_to_server = t.bytes_in;
        self.bytes_server_to_client = t.bytes_out;
        self.denied = t.denied;
        self.source_refused = t.source_refused;
        self.limit_hits = t.limit_hits;
        self.timeouts = t.timeouts;
        self.resets_from_client = t.resets_from_client;
        self.resets_from_server = t.resets_from_server;
        self.lifetime_ends = t.lifetime_ends;
        self.killed = t.killed;
        self.proxy_header_errors = t.proxy_header_errors;
        self.failed = t.failed;
    }
}

/// How much of the workers' counters a stats query needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detail {
    /// The per-worker counters only (`show info`, `show cores`, the drain's checks): no worker
    /// copies a server or source row.
    Totals,
    /// The per-server rows without their sources (`show servers`, `show stat`): a server with a
    /// `/16` of sources adds nothing to copy.
    Servers,
    /// Everything: the per-server and per-source rows too, which each worker copies
    /// [`ROWS_PER_TURN`] servers at a time, one slice per loop turn, so that a query on an engine
    /// with tens of thousands of servers does not hold a worker's connections for milliseconds.
    Full,
}

/// Server rows (with their sources and latency buckets) a worker copies for a stats query in one
/// loop turn: a worker's longest turn over ten `show servers` of 40,000 servers was 0.2–0.6 ms on
/// the benchmark host, against 6–12 ms for all its rows at once (`scripts/stats-turns.sh`).
pub const ROWS_PER_TURN: usize = 1024;

/// What the whole engine reports: one snapshot per worker plus the limits in force.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EngineStats {
    pub version: String,
    pub pid: u32,
    pub uptime_s: u64,
    /// maxconn as configured (None: not set).
    pub configured_maxconn: Option<u32>,
    /// maxconn in force after fitting the host's limits.
    pub effective_maxconn: u32,
    pub nofile: u64,
    pub workers: Vec<WorkerStats>,
    /// Per-frontend rows summed over workers (configuration order).
    #[serde(default)]
    pub frontends: Vec<FrontendStats>,
    /// Per-server rows summed over workers, with merged connect-latency percentiles.
    pub servers: Vec<ServerStats>,
    pub backends: Vec<BackendStats>,
    /// Health-check results per checked server (empty without health checks).
    pub health: Vec<crate::health::ServerHealth>,
}

impl EngineStats {
    /// Sum of a counter over workers.
    pub fn total(&self, f: impl Fn(&WorkerStats) -> u64) -> u64 {
        self.workers.iter().map(f).sum()
    }

    /// Fills `servers` and `backends` from the workers' rows, one backend row per backend of
    /// `config` (the one the workers run), in its order. Connect latency is merged one server at a
    /// time from the workers' non-zero buckets, which are then dropped.
    pub fn aggregate(&mut self, config: &crate::config::Config) {
        let mut servers: Vec<ServerStats> = Vec::new();
        for w in &self.workers {
            for (i, s) in w.servers.iter().enumerate() {
                match servers.get_mut(i) {
                    Some(o) => {
                        o.active += s.active;
                        o.lingering += s.lingering;
                        o.total += s.total;
                        o.connect_errors += s.connect_errors;
                        o.share += s.share;
                        o.bytes_in += s.bytes_in;
                        o.bytes_out += s.bytes_out;
                    }
                    None => servers.push(s.clone()),
                }
            }
        }
        let mut merge = latency::Merge::default();
        // Each worker's buckets are in server order: one cursor per worker walks them along.
        let mut at = vec![0; self.workers.len()];
        for (i, row) in servers.iter_mut().enumerate() {
            for (w, at) in self.workers.iter().zip(&mut at) {
                if let Some(own) = w.servers.get(i) {
                    merge.add_row(&own.connect_latency_us);
                }
                while let Some(b) = w.connect_latency.get(*at).filter(|b| b.server as usize <= i) {
                    if b.server as usize == i {
                        merge.add_bucket(b);
                    }
                    *at += 1;
                }
            }
            row.connect_latency_us = merge.take();
        }
        for w in &mut self.workers {
            w.connect_latency = Vec::new();
        }
        servers.retain(|s| !s.removed);
        let mut rows: Vec<BackendStats> = config
            .backends
            .iter()
            .enumerate()
            .map(|(i, backend)| BackendStats {
                backend: backend.name.clone(),
                balance: backend.balance.as_str().to_string(),
                splice: backend.splice.as_str().to_string(),
                maxconn: u64::from(backend.maxconn.unwrap_or(0)),
                queued: self.workers.iter().map(|w| w.queued_by_backend.get(i).copied().unwrap_or(0)).sum(),
                ..BackendStats::default()
            })
            .collect();
        // One pass over the servers (an engine may have thousands of backends and of servers).
        let by_name: std::collections::HashMap<&str, usize> =
            config.backends.iter().enumerate().map(|(i, b)| (b.name.as_str(), i)).collect();
        for s in &servers {
            if let Some(b) = by_name.get(s.backend.as_str()).map(|&i| &mut rows[i]) {
                b.active += s.active;
                b.total += s.total;
                b.connect_errors += s.connect_errors;
                b.bytes_in += s.bytes_in;
                b.bytes_out += s.bytes_out;
            }
        }
        self.servers = servers;
        self.backends = rows;
        self.frontends = Vec::with_capacity(config.frontends.len());
        for (i, fe) in config.frontends.iter().enumerate() {
            let mut row = FrontendStats::new(fe);
            for w in &self.workers {
                if let Some(own) = w.frontends.get(i) {
                    row.add(own);
                }
            }
            self.frontends.push(row);
        }
    }

    /// Per-server rows summed over workers (same as `servers` after `aggregate`).
    pub fn servers(&self) -> Vec<ServerStats> {
        self.servers.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::SlowTurns;

    #[test]
    fn a_turn_counts_in_every_bucket_it_reaches() {
        let mut t = SlowTurns::default();
        for ns in [999_999, 1_000_000, 9_999_999, 10_000_000, 100_000_000, 2_000_000_000] {
            t.record(ns);
        }
        assert_eq!(t, SlowTurns { over_1ms: 5, over_10ms: 3, over_100ms: 2 });
    }
}
