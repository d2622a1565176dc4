//! The validated configuration: what every other module reads, with values already parsed
//! (addresses, durations, source sets) and cross-checked (a frontend's backend exists, names are
//! unique). Only `validate.rs` builds these; nothing downstream re-checks strings.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::raw::{Balance, OnDown, OnRemoved, ProxyVersion};

/// Defaults that apply when neither the section nor `defaults` says otherwise.
pub mod default {
    use std::time::Duration;
    pub const CONNECT: Duration = Duration::from_secs(5);
    pub const CLIENT: Duration = Duration::from_secs(50);
    pub const SERVER: Duration = Duration::from_secs(50);
    pub const DRAIN: Duration = Duration::from_secs(30);
    pub const RETRIES: u32 = 3;
    pub const BACKLOG_MAX: u32 = 65_535;
    pub const WEIGHT: u32 = 1;
    pub const PIPE_SIZE: u32 = 256 * 1024;
    pub const MAX_PIPES: u32 = 4096;
    /// Bytes per receive buffer unless `tune.recv_buffer_size` says: 64 KiB in every mode. Up to
    /// a quarter of the receive completions and sends per byte of 16 KiB buffers: under `auto`,
    /// the ringload throughput rows 1.00–1.18 × faster in the full bench run of 2026-12-05
    /// (docs/benchmarks.md); small messages write one page of their buffer whatever its size.
    pub const RECV_BUFFER_SIZE: u32 = 64 * 1024;

    /// Receive buffers per worker unless `tune.recv_buffers` says: a pool of 16 MiB under `auto`
    /// (bulk flows splice once the worker finds it pays: 1,000 bulk flows peak at the same 32 MiB
    /// through 2 workers with 256 of 64 KiB as with 1,024 of 16 KiB), 64 MiB under `never` (every
    /// byte of every flow goes through them: many busy flows wait for a smaller pool), in
    /// buffers of `size` bytes (within the range `tune.recv_buffers` accepts).
    pub fn recv_buffers(splice: super::SpliceMode, size: u32) -> u32 {
        let pool: u32 = match splice {
            super::SpliceMode::Never => 64 << 20,
            super::SpliceMode::Auto | super::SpliceMode::Always => 16 << 20,
        };
        (pool / size).clamp(RECV_BUFFERS_MIN, RECV_BUFFERS_MAX)
    }
    /// The fewest and most receive buffers per worker (a buffer id is 16 bits).
    pub const RECV_BUFFERS_MIN: u32 = 64;
    pub const RECV_BUFFERS_MAX: u32 = 1 << 16;
    /// The smallest and largest `tune.rcvbuf_*` / `sndbuf_*` (the kernel doubles the value, and
    /// caps it at `net.core.rmem_max` / `wmem_max`) and `tune.notsent_lowat`.
    pub const SOCKET_BUFFER_MIN: u64 = 4096;
    pub const SOCKET_BUFFER_MAX: u64 = 1 << 30;
    pub const RING_ENTRIES: u32 = 4096;
    pub const IOWQ_WORKERS: u32 = 4;
    pub const PEER_LOOKUPS: u32 = 4096;
    pub const PROXY_HEADER: Duration = Duration::from_secs(5);
    pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
    pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
    pub const KEEPALIVE_COUNT: u32 = 6;
    pub const PROXY_HEADER_MAXCONN: u32 = 1024;
    pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);
    pub const CHECK_TIMEOUT: Duration = Duration::from_secs(1);
    pub const CHECK_RISE: u32 = 2;
    pub const CHECK_FALL: u32 = 3;
}

/// Upper bound for any `maxconn`: far above what one host can hold, low enough to keep arithmetic exact.
pub const MAXCONN_LIMIT: u64 = 100_000_000;
/// Highest server weight (as in HAProxy).
pub const WEIGHT_LIMIT: u64 = 256;

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the configuration came from (a path, or a label for text), used in messages.
    pub origin: String,
    pub global: Global,
    pub frontends: Vec<Frontend>,
    pub backends: Vec<Backend>,
    /// Things that are allowed but probably not intended, as `FILE:LINE:COLUMN: warning: ...`.
    pub warnings: Vec<String>,
}

impl Config {
    /// Whether frontend `f`'s workers look up each client's address at accept (something needs
    /// it: PROXY headers, `allow`/`deny`, per-source limits, the connection log, `balance: source`
    /// or `hash`, `send_proxy`); otherwise the engine never learns it, and saves a system call per
    /// connection.
    pub fn knows_clients(&self, f: usize) -> bool {
        let fe = &self.frontends[f];
        let be = &self.backends[fe.backend];
        fe.accept_proxy
            || fe.acl.is_some()
            || fe.per_source.is_some()
            || self.global.connection_log.is_some()
            || matches!(be.balance, Balance::Source | Balance::Hash)
            || be.servers.iter().any(|s| s.send_proxy.is_some())
    }

    /// How the connections of frontend `f` move their bytes: its backend's splice mode.
    pub fn frontend_splice(&self, f: usize) -> SpliceMode {
        self.backends[self.frontends[f].backend].splice
    }

    /// The splice modes of the backends some frontend uses: what the workers must be able to do.
    pub(super) fn modes(&self) -> impl Iterator<Item = SpliceMode> + '_ {
        (0..self.frontends.len()).map(|f| self.frontend_splice(f))
    }

    /// Whether some connections move small chunks through the workers' rings of receive buffers
    /// (a backend with `splice: auto` or `never`): the workers make the rings.
    pub fn uses_ring(&self) -> bool {
        self.modes().any(SpliceMode::uses_ring)
    }

    /// Whether some connections may splice (a backend with `splice: auto` or `always`): pipes,
    /// and process descriptors of spliced connections' sockets, count against the descriptors.
    pub fn splices(&self) -> bool {
        self.modes().any(SpliceMode::splices)
    }

    /// Whether some connections choose their bulk path (a backend with `splice: auto`): the
    /// workers measure both paths (worker/bulkpath.rs).
    pub fn splices_auto(&self) -> bool {
        self.modes().any(|m| m == SpliceMode::Auto)
    }
}

#[derive(Clone, Debug)]
pub struct Global {
    /// `None` means one worker per online CPU.
    pub workers: Option<usize>,
    pub pin_cpus: bool,
    /// `None` means as many as this host's limits allow.
    pub maxconn: Option<u32>,
    pub drain_timeout: Duration,
    /// On SIGTERM: how long the engine says it is not ready (`show ready`), still accepting, before
    /// it stops accepting and drains (a routing daemon withdraws its route meanwhile).
    pub withdraw_delay: Option<Duration>,
    pub tune: Tune,
    pub stats: Stats,
    pub connection_log: Option<LogTarget>,
    /// Drop root to this user / group once everything is bound.
    pub user: Option<String>,
    pub group: Option<String>,
}

/// `timeout.lifetime`: a connection is closed once it is `max` old, less a part of `jitter`
/// drawn for each connection (so that connections made together do not all end together).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    pub max: Duration,
    pub jitter: Duration,
}

impl Lifetime {
    /// The age (ms) at which connection `key` (any number that differs between connections) ends:
    /// `max - jitter × u`, `u` in [0, 1) drawn from `key`.
    pub fn of(&self, key: u64) -> u64 {
        let mut x = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
        let jitter = self.jitter.as_millis() as u64;
        let off = if jitter == 0 { 0 } else { ((u128::from(x) * u128::from(jitter)) >> 64) as u64 };
        self.max.as_millis() as u64 - off
    }
}

/// Where operators read the engine's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Unix socket speaking the stats line protocol (docs/operations.md).
    pub socket: Option<std::path::PathBuf>,
    /// Permission bits of the socket (default 0600).
    pub mode: u32,
    /// Unix socket that takes the read-only commands and those that change state (`set server`,
    /// `shutdown sessions`, `reload`...).
    pub admin_socket: Option<std::path::PathBuf>,
    /// Permission bits of the admin socket (default 0600).
    pub admin_mode: u32,
    /// Address of the Prometheus /metrics endpoint.
    pub prometheus: Option<SocketAddr>,
}

/// Where connection log lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogTarget {
    Stdout,
    Stderr,
    File(std::path::PathBuf),
}

/// How a flow moves its bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SpliceMode {
    /// The default: small chunks as `Never` moves them; a flow that fills a whole receive buffer
    /// is moving bulk data and splices (zero copy) by splice(2) on the worker's own thread, back
    /// to receive buffers when its chunks get small. Where the sockets cannot have process
    /// descriptors (a kernel before 6.8, or the descriptor limit), everything as `Never`.
    #[default]
    Auto,
    /// Every chunk by splice: on the worker's thread where the sockets have process
    /// descriptors, through io_uring (an io-wq thread) where they cannot.
    Always,
    /// No splice: a multishot receive into the worker's ring of provided buffers, and a send of
    /// what came in, all in the worker's own thread (no io-wq): two copies per byte.
    Never,
}

impl SpliceMode {
    /// Whether small chunks (all of them with `Never`) go through the worker's ring of receive
    /// buffers.
    pub fn uses_ring(self) -> bool {
        self != SpliceMode::Always
    }

    /// Whether bytes may be spliced (and connections hold process descriptors to do it).
    pub fn splices(self) -> bool {
        self != SpliceMode::Never
    }

    /// The configuration's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            SpliceMode::Auto => "auto",
            SpliceMode::Always => "always",
            SpliceMode::Never => "never",
        }
    }
}

/// Engine knobs with safe defaults; see docs/configuration.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tune {
    /// Bytes per splice pipe (F_SETPIPE_SZ).
    pub pipe_size: u32,
    /// Most pipes one worker keeps (in flight plus pooled).
    pub max_pipes: u32,
    /// Most receive buffers one worker creates (`splice: auto` or `never`); by default a pool of
    /// bytes per mode divided by `recv_buffer_size`.
    pub recv_buffers: u32,
    /// Bytes per receive buffer: the most one receive completion brings (`splice: auto`: a
    /// receive that fills one whole is bulk data, and the flow may splice from then on).
    pub recv_buffer_size: u32,
    /// Submission queue entries per worker ring.
    pub ring_entries: u32,
    /// Most io-wq threads the kernel may run for one worker's splices.
    pub iowq_workers: u32,
    /// Most client-address lookups in flight at once per worker.
    pub peer_lookups: u32,
    /// Use only what this kernel version's io_uring offers (`None`: what the running kernel
    /// offers); see features.rs.
    pub io_features: Option<(u32, u32)>,
    pub splice: SpliceMode,
    /// Kernel buffer sizes of the client sockets (`rcvbuf_client`, `sndbuf_client`; set on the
    /// listeners, which accepted sockets inherit).
    pub client_buffers: SocketBuffers,
    /// Kernel buffer sizes of the server sockets (`rcvbuf_server`, `sndbuf_server`; set in the
    /// connect chain).
    pub server_buffers: SocketBuffers,
    /// TCP_NOTSENT_LOWAT on every socket, both sides: the most bytes a socket's send queue holds
    /// that TCP has not sent yet before a send waits (`None`: the kernel's,
    /// `net.ipv4.tcp_notsent_lowat`, unlimited by default).
    pub notsent_lowat: Option<u32>,
    /// Sends of at least this many bytes on the receive-buffer path go by `SENDMSG_ZC`: the
    /// kernel sends from our buffers instead of copying them, and they are held until it says
    /// it is done with them (`None`, the default: every send copies).
    pub send_zerocopy: Option<u32>,
    /// Whether a worker that fell asleep lets completions gather before it runs them: fewer
    /// wakeups for many mostly idle connections, at up to a window of latency per pass through
    /// the worker. IORING_ENTER_EXT_ARG's `min_wait_usec`, 6.12.
    pub batch_wait: BatchWait,
    /// An established connection that moved no byte either way for this long has each of its
    /// multishot receives (`splice: auto` or `never`) swapped for a one-shot readiness poll,
    /// which holds less kernel memory; the first byte to arrive re-arms the receive (`None`:
    /// never). See [`DEFAULT_IDLE_POLL_AFTER`].
    pub idle_poll_after: Option<Duration>,
}

/// `tune.idle_poll_after`'s default: longer than the heartbeats of request/response traffic and
/// games, shorter than the keep-alives of MQTT (60 s), WebSocket pings (20-30 s) and push channels,
/// whose connections spend most of their life waiting.
pub const DEFAULT_IDLE_POLL_AFTER: Duration = Duration::from_secs(10);

/// `tune.batch_wait`. A window W: a worker that fell asleep runs nothing until the next multiple
/// of W on the monotonic clock, unless [`BATCH_EVENTS`] completions are ready first; one that
/// comes after that point wakes it at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchWait {
    /// Every event wakes the worker at once.
    Off,
    /// Windows of this length ([`AUTO_BATCH_WINDOW`] unless the operator said: `auto 1ms`) while
    /// the worker's traffic is many quiet flows — each message on a flow that had none for a
    /// while, at a rate where a window gathers several — and none otherwise: a busy flow, a
    /// closed loop or new connections turn them off; a window in which the worker forwarded
    /// messages is followed by a short one for their answers (worker/coalesce.rs).
    Auto(Duration),
    /// Windows of this, whatever the traffic.
    Every(Duration),
}

impl Default for BatchWait {
    fn default() -> BatchWait {
        BatchWait::Auto(AUTO_BATCH_WINDOW)
    }
}

/// The window of `batch_wait: auto` unless it names one.
pub const AUTO_BATCH_WINDOW: Duration = Duration::from_millis(2);

/// The events that end a [`Tune::batch_wait`] early: so many ready at once wake the worker.
pub const BATCH_EVENTS: usize = 64;

/// SO_RCVBUF / SO_SNDBUF for one side's sockets; `None`: the kernel's own (`tcp_rmem` /
/// `tcp_wmem`'s default, grown by autotuning up to their maximum). A value set fixes the
/// buffer (no autotuning); the kernel reserves twice it, for its bookkeeping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketBuffers {
    pub receive: Option<u32>,
    pub send: Option<u32>,
}

/// One socket option with an int value: (level, name, value).
pub type SockOpt = (libc::c_int, libc::c_int, i32);

impl Tune {
    /// The four socket buffer sizes by key (`rcvbuf_client`, `sndbuf_client`, `rcvbuf_server`,
    /// `sndbuf_server`), as set.
    pub fn buffer_sizes(&self) -> [(&'static str, Option<u32>); 4] {
        let (c, s) = (self.client_buffers, self.server_buffers);
        [
            ("rcvbuf_client", c.receive),
            ("sndbuf_client", c.send),
            ("rcvbuf_server", s.receive),
            ("sndbuf_server", s.send),
        ]
    }

    /// The options every client socket gets (set on the listeners, which accepted sockets
    /// inherit them from).
    pub fn client_sockopts(&self) -> Vec<SockOpt> {
        self.sockopts(self.client_buffers)
    }

    /// The options every server socket gets (in the connect chain).
    pub fn server_sockopts(&self) -> Vec<SockOpt> {
        self.sockopts(self.server_buffers)
    }

    fn sockopts(&self, b: SocketBuffers) -> Vec<SockOpt> {
        [
            (libc::SOL_SOCKET, libc::SO_RCVBUF, b.receive),
            (libc::SOL_SOCKET, libc::SO_SNDBUF, b.send),
            (libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, self.notsent_lowat),
        ]
        .into_iter()
        .filter_map(|(level, name, v)| v.map(|v| (level, name, v as i32)))
        .collect()
    }
}

impl Default for Tune {
    fn default() -> Self {
        Tune {
            pipe_size: default::PIPE_SIZE,
            max_pipes: default::MAX_PIPES,
            recv_buffers: default::recv_buffers(SpliceMode::Auto, default::RECV_BUFFER_SIZE),
            recv_buffer_size: default::RECV_BUFFER_SIZE,
            ring_entries: default::RING_ENTRIES,
            iowq_workers: default::IOWQ_WORKERS,
            peer_lookups: default::PEER_LOOKUPS,
            io_features: None,
            splice: SpliceMode::Auto,
            client_buffers: SocketBuffers::default(),
            server_buffers: SocketBuffers::default(),
            notsent_lowat: None,
            send_zerocopy: None,
            batch_wait: BatchWait::default(),
            idle_poll_after: Some(DEFAULT_IDLE_POLL_AFTER),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Frontend {
    pub name: String,
    pub binds: Vec<SocketAddr>,
    /// Index into [`Config::backends`].
    pub backend: usize,
    pub maxconn: Option<u32>,
    pub backlog: u32,
    pub client_timeout: Duration,
    /// Expect a PROXY protocol header from clients, within `proxy_header_timeout`.
    pub accept_proxy: bool,
    pub proxy_header_timeout: Duration,
    /// Maximum age of a connection (`timeout.lifetime`), with its jitter.
    pub lifetime: Option<Lifetime>,
    /// The most connections reading their PROXY header at once (engine-wide); they hold this
    /// limit's slots, not the maxconn ones, until their header is all there.
    pub proxy_header_maxconn: u32,
    /// Who may connect (`allow` / `deny`); `None`: everyone.
    pub acl: Option<Acl>,
    /// Keepalive probes on client sockets (set on the listeners, which accepted sockets inherit).
    pub tcp_keepalive: Option<Keepalive>,
    /// New connections per second accepted, at most (`rate_limit`); the others wait in the
    /// listen backlog.
    pub rate_limit: Option<u32>,
    /// Limits per client source (`maxconn_per_source`, `rate_per_source`).
    pub per_source: Option<PerSource>,
}

/// A frontend's limits per client source: an address, or the prefix it is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PerSource {
    pub maxconn: Option<u32>,
    /// New connections per second.
    pub rate: Option<u32>,
    /// Prefix lengths a source is keyed by (32 and 128: each address on its own).
    pub prefix_v4: u8,
    pub prefix_v6: u8,
}

impl PerSource {
    /// The source `ip` is counted as: its prefix, as one number (IPv4 as IPv4-mapped IPv6).
    pub fn key(&self, ip: std::net::IpAddr) -> u128 {
        let (v, len) = match ip {
            std::net::IpAddr::V4(a) => (u128::from(a.to_ipv6_mapped()), 96 + u32::from(self.prefix_v4)),
            std::net::IpAddr::V6(a) => (u128::from(a), u32::from(self.prefix_v6)),
        };
        if len == 0 { 0 } else { v & (u128::MAX << (128 - len)) }
    }
}

/// TCP keepalive: after `idle` without traffic, a probe every `interval`; `count` unanswered
/// probes reset the connection (which the proxy then sees as a reset of that side).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub count: u32,
}

impl Keepalive {
    /// TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT as the kernel takes them (seconds, seconds, count).
    pub fn as_sockopts(&self) -> [i32; 3] {
        [self.idle.as_secs() as i32, self.interval.as_secs() as i32, self.count as i32]
    }
}

/// A frontend's access list: a client is served if `allow` is empty or holds its address, and
/// `deny` does not.
#[derive(Clone, Debug, Default)]
pub struct Acl {
    pub allow: Vec<super::address::Cidr>,
    pub deny: Vec<super::address::Cidr>,
}

impl Acl {
    pub fn permits(&self, ip: std::net::IpAddr) -> bool {
        (self.allow.is_empty() || self.allow.iter().any(|c| c.contains(ip)))
            && !self.deny.iter().any(|c| c.contains(ip))
    }
}

#[derive(Clone, Debug)]
pub struct Backend {
    pub name: String,
    pub balance: Balance,
    pub maxconn: Option<u32>,
    pub retries: u32,
    pub connect_timeout: Duration,
    pub server_timeout: Duration,
    pub queue_timeout: Duration,
    pub check: Option<HealthCheck>,
    pub on_down: OnDown,
    /// What a reload does with the connections of a server it removes (the new file's backend of
    /// the same name decides; the old one's when the backend is gone too).
    pub on_removed: OnRemoved,
    /// Keepalive probes on server sockets (set in the connect chain).
    pub tcp_keepalive: Option<Keepalive>,
    /// Connections shut down together are closed at an even pace over this window (none: at once).
    pub close_spread: Option<Duration>,
    /// How this backend's connections move their bytes: its own `splice`, else `tune.splice`.
    pub splice: SpliceMode,
    pub servers: Vec<Server>,
}

/// A backend's health check (applied to each of its servers that has `check` enabled).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that bring a down server up, and failures that take an up server down.
    pub rise: u32,
    pub fall: u32,
    /// Sent after connecting (none: a plain TCP connect check).
    pub send: Option<Vec<u8>>,
    /// Must appear in what the server answers within the timeout.
    pub expect: Option<Vec<u8>>,
}

#[derive(Clone, Debug)]
pub struct Server {
    pub name: String,
    pub address: SocketAddr,
    pub weight: u32,
    pub maxconn: Option<u32>,
    /// Source addresses for connections to this server; empty means the kernel chooses.
    pub sources: Vec<IpAddr>,
    /// Health-checked (only when the backend has a check).
    pub check: bool,
    pub send_proxy: Option<ProxyVersion>,
    /// Takes new connections only while no normal (non-backup) server of its backend is UP.
    pub backup: bool,
    /// Coming back (health check up, `set server ... state ready`), the server's weight ramps
    /// from ~0 to full over this time (none: at once).
    pub slowstart: Option<Duration>,
}
