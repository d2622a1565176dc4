//! Sizing: how many workers, how many connections each can hold, and the maxconn actually in force.
//!
//! Every socket lives in its worker's io_uring direct-descriptor table (two per proxied connection),
//! and the kernel caps each ring's table at RLIMIT_NOFILE and at 1,048,576 slots
//! (`IORING_MAX_FIXED_FILES`). So a worker holds at most `(min(nofile, 1,048,576) - 128) / 2`
//! connections, whatever the configured maxconn; and because direct descriptors do
//! not count against the process's descriptor table, more workers hold more connections. Pipes are
//! ordinary descriptors, bounded so they fit in the process table. When the configured maxconn does
//! not fit, the plan lowers it and says, in one line, by how much and how to fix the host.

use crate::config::Config;
use crate::limits::LimitTable;

/// The most slots the kernel gives one ring's direct-descriptor table (`IORING_MAX_FIXED_FILES`,
/// io_uring/rsrc.h): a larger registration fails with EMFILE, whatever RLIMIT_NOFILE says.
pub const MAX_TABLE: u32 = 1 << 20;

/// How many workers hold `maxconn` connections when every worker's table is at [`MAX_TABLE`].
pub fn workers_at_table_cap(maxconn: u32) -> u32 {
    maxconn.div_ceil((MAX_TABLE - PARK_SLACK) / 2)
}

/// Direct-table slots beyond twice the connection capacity: 64 for sockets accepted while a limit
/// is being hit, 64 for server sockets still closing while their connection's slot is reused.
pub const PARK_SLACK: u32 = 128;
/// Server-socket slots beyond the connection capacity (part of `PARK_SLACK`).
pub const SERVER_SLACK: u32 = 64;
/// Most extra accept slots, when RLIMIT_NOFILE leaves room: a burst of queued connections can be
/// taken by one multishot accept without running out of slots.
pub const ACCEPT_BURST: u32 = 65_536;
/// maxconn when the configuration does not set one (and the host allows it).
pub const DEFAULT_MAXCONN: u32 = 1_000_000;
/// Most connections one worker is sized for (its direct table is 2x this, 8 bytes a slot).
pub const MAX_PER_WORKER: u32 = 4_000_000;
/// Descriptors kept free for eventfds, rings, logs, health checks and the monitoring endpoints
/// (each serves at most `stats::MAX_CLIENTS` clients at once; listeners are counted apart).
const FD_RESERVE: u64 = 64 + 2 * crate::stats::MAX_CLIENTS as u64;

#[derive(Clone, Debug)]
pub struct Plan {
    pub workers: usize,
    /// CPU each worker is pinned to (`None`: not pinned).
    pub cpus: Vec<Option<usize>>,
    /// RLIMIT_NOFILE in force (after raising the soft limit).
    pub nofile: u64,
    /// Connections one worker can hold (its slab, its share caps).
    pub conns_per_worker: u32,
    /// Direct-table slots `[0, accept_slots)` take accepted client sockets.
    pub accept_slots: u32,
    /// Size of each worker's direct table; `[accept_slots, table_slots)` take server sockets.
    pub table_slots: u32,
    /// Per frontend: free accept slots one of its listeners needs before it may use a multishot
    /// accept: twice the connections its backlog can hold (one multishot accept may drain it at
    /// once), plus 64. A worker arms multishot accepts, in configuration order, while their margins
    /// fit in its free slots; the other listeners accept one connection at a time.
    pub multishot_margin: Vec<u32>,
    pub pipes_per_worker: u32,
    /// Global maxconn in force.
    pub maxconn: u32,
    pub configured_maxconn: Option<u32>,
    /// RLIMIT_NOFILE that would let the configured maxconn fit with this many workers.
    pub nofile_needed: u64,
    pub limits: LimitTable,
    /// Ports per (source IP, server address): the width of ip_local_port_range.
    pub ephemeral_ports: u32,
    /// One line each, already phrased for the operator.
    pub warnings: Vec<String>,
    /// The io_uring operations the workers use (features.rs); every one unless the engine says.
    pub io: crate::features::IoFeatures,
    /// How `io` was chosen ("this kernel's", "pinned to Linux 6.1").
    pub io_chosen: String,
    /// `tune.batch_wait` as the workers apply it: `Off` where `io` lacks `min_wait`.
    pub batch_wait: crate::config::BatchWait,
}

/// Connections a worker should be able to hold for a global `maxconn`: twice its fair share (room
/// for uneven SO_REUSEPORT spread and lending), but at least its share plus 1024.
fn per_worker_target(maxconn: u32, workers: usize) -> u32 {
    let fair = maxconn.div_ceil(workers as u32);
    maxconn.min(fair.saturating_mul(2).max(fair.saturating_add(1024))).min(MAX_PER_WORKER)
}

pub fn plan(config: &Config, nofile: u64, usable_cpus: &[usize], ephemeral_ports: u32) -> Plan {
    let workers = config.global.workers.unwrap_or(usable_cpus.len().max(1));
    let cpus = (0..workers)
        .map(|w| (config.global.pin_cpus && !usable_cpus.is_empty()).then(|| usable_cpus[w % usable_cpus.len()]))
        .collect();
    let table_max = nofile.min(u64::from(MAX_TABLE)) as u32;
    let per_worker_max = (table_max.saturating_sub(PARK_SLACK) / 2).clamp(1, MAX_PER_WORKER);
    let mut warnings = Vec::new();

    let (maxconn, conns_per_worker, nofile_needed) = match config.global.maxconn {
        Some(m) => {
            let target = per_worker_target(m, workers);
            let per_worker = target.min(per_worker_max);
            let effective = m.min(per_worker.saturating_mul(workers as u32));
            // A table larger than the kernel's cap cannot be had by raising the limit: past it,
            // the fix is the cap and more workers.
            let needed_raw = 2 * u64::from(target) + u64::from(PARK_SLACK);
            let needed = needed_raw.min(u64::from(MAX_TABLE));
            if effective < m {
                let workers_needed = m.div_ceil(per_worker_max);
                let (cause, fix) = if nofile >= u64::from(MAX_TABLE) {
                    // The open-files limit is not what stops it: a ring's table cannot grow further.
                    ("the kernel's limit per ring", format!("run {workers_needed} workers (global.workers)"))
                } else {
                    let raise = format!(
                        "raise the open-files limit to {needed} (LimitNOFILE={needed} in the systemd unit, or \
                         \"* hard nofile {needed}\" in /etc/security/limits.conf"
                    );
                    let fix = if needed_raw > u64::from(MAX_TABLE) {
                        format!(
                            "{raise}; the kernel's limit per ring) and run {} workers, or run {workers_needed} \
                             workers (global.workers) at this limit",
                            workers_at_table_cap(m)
                        )
                    } else {
                        format!("{raise}), or run {workers_needed} workers (global.workers)")
                    };
                    ("RLIMIT_NOFILE", fix)
                };
                warnings.push(format!(
                    "maxconn {m} does not fit: each worker's io_uring file table holds at most {table_max} sockets \
                     ({cause}), i.e. {per_worker_max} proxied connections, so {workers} worker(s) hold {effective}; \
                     running with maxconn {effective}. To allow {m}: {fix}"
                ));
            }
            (effective, per_worker, needed)
        }
        None => {
            let effective = per_worker_max.saturating_mul(workers as u32).min(DEFAULT_MAXCONN);
            let per_worker = per_worker_target(effective, workers).min(per_worker_max);
            (effective, per_worker, 2 * u64::from(per_worker) + u64::from(PARK_SLACK))
        }
    };
    // Whatever RLIMIT_NOFILE leaves beyond the minimum goes to the accept range (up to ACCEPT_BURST),
    // so bursts are accepted in one go; with none left, workers accept one connection at a time
    // near capacity (worker/mod.rs).
    let minimum = 2 * conns_per_worker + PARK_SLACK;
    let burst = (table_max.saturating_sub(minimum)).min(ACCEPT_BURST);
    let accept_slots = conns_per_worker + (PARK_SLACK - SERVER_SLACK) + burst;
    let table_slots = accept_slots + conns_per_worker + SERVER_SLACK;
    let somaxconn = crate::host::sysctl1("net.core.somaxconn").unwrap_or(4096);
    let multishot_margin: Vec<u32> = config
        .frontends
        .iter()
        .map(|f| (2 * u64::from(f.backlog).min(somaxconn) + 64).min(u64::from(u32::MAX)) as u32)
        .collect();

    let listeners: u64 = config.frontends.iter().map(|f| f.binds.len() as u64).sum::<u64>() * workers as u64;
    let fd_budget = nofile.saturating_sub(FD_RESERVE + listeners + 4 * workers as u64);
    // A pipe is 2 descriptors; with splice on, so is each connection splicing on its worker's
    // thread (its sockets' process descriptors, pump.rs), one per pipe at most.
    let per_pipe = if config.splices() { 4 } else { 2 };
    let pipe_fit = (fd_budget / (per_pipe * workers as u64)).min(u64::from(u32::MAX)) as u32;
    let pipes_per_worker = config.global.tune.max_pipes.min(pipe_fit).max(1);
    if pipes_per_worker < config.global.tune.max_pipes && pipes_per_worker < 64 {
        warnings.push(format!(
            "only {pipes_per_worker} splice pipes per worker fit in RLIMIT_NOFILE {nofile}; \
             busy connections will wait for pipes. Raise the open-files limit or use fewer workers"
        ));
    }

    if workers == 1 {
        for (be, srv) in config.backends.iter().flat_map(|b| b.servers.iter().map(move |s| (b, s))) {
            if srv.sources.len() > usize::from(u16::MAX) {
                warnings.push(format!(
                    "server {}/{}: one worker uses at most 65,535 sources toward a server; of its {}, {} is not \
                     used (two or more workers share them all)",
                    be.name,
                    srv.name,
                    srv.sources.len(),
                    srv.sources[usize::from(u16::MAX)..].iter().map(|ip| ip.to_string()).collect::<Vec<_>>().join(", ")
                ));
            }
        }
    }

    let mut limits = LimitTable::default();
    limits.global = limits.add("global".into(), maxconn);
    limits.frontend = config
        .frontends
        .iter()
        .map(|f| match f.maxconn {
            Some(m) if m < maxconn => Some(limits.add(format!("frontend {}", f.name), m)),
            _ => None,
        })
        .collect();
    limits.proxy_header = config
        .frontends
        .iter()
        .map(|f| {
            f.accept_proxy.then(|| limits.add(format!("frontend {} proxy headers", f.name), f.proxy_header_maxconn))
        })
        .collect();
    limits.backend =
        config.backends.iter().map(|b| b.maxconn.map(|m| limits.add(format!("backend {}", b.name), m))).collect();
    limits.server = config
        .backends
        .iter()
        .map(|b| {
            b.servers
                .iter()
                .map(|s| s.maxconn.map(|m| limits.add(format!("server {}/{}", b.name, s.name), m)))
                .collect()
        })
        .collect();

    Plan {
        io: crate::features::IoFeatures::ALL,
        io_chosen: "this kernel's".to_owned(),
        batch_wait: config.global.tune.batch_wait,
        workers,
        cpus,
        nofile,
        conns_per_worker,
        accept_slots,
        table_slots,
        multishot_margin,
        pipes_per_worker,
        maxconn,
        configured_maxconn: config.global.maxconn,
        nofile_needed,
        limits,
        ephemeral_ports,
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(global: &str) -> Config {
        let text = format!(
            "global:\n{global}\nfrontends:\n  - {{ name: f, bind: \"127.0.0.1:1\", backend: b, maxconn: 50 }}\n\
             backends:\n  - name: b\n    maxconn: 70\n    servers:\n      - {{ name: s, address: \"127.0.0.1:2\", maxconn: 9 }}\n"
        );
        crate::config::parse(&text, "t").unwrap()
    }

    #[test]
    fn fits_and_tables_stay_within_the_limit() {
        let p = plan(&config("  workers: 2\n  maxconn: 100"), 20_000, &[0, 1], 28_232);
        assert_eq!(p.maxconn, 100);
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        assert_eq!(p.conns_per_worker, 100);
        assert!(u64::from(p.table_slots) <= p.nofile);
        assert_eq!(p.cpus, vec![Some(0), Some(1)]);
        assert_eq!(p.limits.totals, vec![100, 50, 70, 9]);
    }

    /// A host whose open-files limit is above the kernel's cap on one ring's table (1,048,576):
    /// the tables stay within the cap (a larger one fails to register), and what does not fit is
    /// told to use more workers, not a higher limit.
    #[test]
    fn tables_stay_within_the_kernels_cap_per_ring() {
        let p = plan(&config("  workers: 2\n  maxconn: 1000000"), 4_000_000, &[0, 1], 28_232);
        assert_eq!(p.maxconn, 1_000_000);
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        assert!(p.table_slots <= MAX_TABLE, "{}", p.table_slots);
        let p = plan(&config("  workers: 1\n  maxconn: 1000000"), 4_000_000, &[0], 28_232);
        assert!(p.table_slots <= MAX_TABLE, "{}", p.table_slots);
        assert_eq!(p.maxconn, (MAX_TABLE - PARK_SLACK) / 2);
        let w = &p.warnings[0];
        assert!(w.contains("the kernel's limit per ring") && w.contains("run 2 workers"), "{w}");
        assert!(!w.contains("LimitNOFILE"), "{w}");
    }

    #[test]
    fn too_large_maxconn_is_lowered_with_the_fix() {
        let p = plan(&config("  workers: 2\n  maxconn: 2000000"), 20_000, &[0, 1], 28_232);
        assert_eq!(p.maxconn, 2 * ((20_000 - PARK_SLACK) / 2));
        assert!(u64::from(p.table_slots) <= 20_000);
        assert_eq!(p.warnings.len(), 1);
        let w = &p.warnings[0];
        assert!(w.contains("maxconn 2000000 does not fit"), "{w}");
        assert!(w.contains(&format!("running with maxconn {}", p.maxconn)), "{w}");
        // 2 x 2,000,000 sockets per worker is past one ring's cap: the cap and more workers.
        assert!(w.contains("LimitNOFILE=1048576"), "{w}");
        assert!(w.contains("and run 4 workers"), "{w}");
        assert!(w.contains("or run 202 workers"), "{w}");
    }

    /// A connection records its source's index in 16 bits: one worker with a full /16 leaves the
    /// last source out, and says which; two workers use all 65,536.
    #[test]
    fn a_single_worker_says_which_source_of_a_full_slash_16_it_leaves_out() {
        let yaml = |workers| {
            format!(
                "global: {{ workers: {workers} }}\nfrontends: [{{ name: f, bind: \"127.0.0.1:1\", backend: b }}]\n\
                 backends: [{{ name: b, servers: [{{ name: s, address: \"127.0.0.1:2\", source: 10.1.0.0/16 }}] }}]\n"
            )
        };
        let p = plan(&crate::config::parse(&yaml(1), "t").unwrap(), 20_000, &[0], 28_232);
        assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
        let w = &p.warnings[0];
        assert!(w.contains("server b/s") && w.contains("of its 65536, 10.1.255.255 is not used"), "{w}");
        let p = plan(&crate::config::parse(&yaml(2), "t").unwrap(), 20_000, &[0, 1], 28_232);
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    }

    #[test]
    fn more_workers_hold_more_connections() {
        let p = plan(&config("  workers: 32\n  maxconn: 300000\n  pin_cpus: false"), 20_000, &[0, 1], 28_232);
        assert_eq!(p.maxconn, 300_000);
        assert_eq!(p.cpus, vec![None; 32]);
        assert!(u64::from(p.table_slots) <= 20_000);
        assert!(u64::from(p.pipes_per_worker) * 2 * 32 <= 20_000);
    }

    #[test]
    fn unset_maxconn_takes_what_the_host_allows() {
        let p = plan(&config("  workers: 2"), 20_000, &[0, 1], 28_232);
        assert_eq!(p.maxconn, 2 * ((20_000 - PARK_SLACK) / 2));
        assert!(p.warnings.is_empty());
        let p = plan(&config("  workers: 2"), 10_000_000, &[0, 1], 28_232);
        assert_eq!(p.maxconn, DEFAULT_MAXCONN);
    }
}
