//! The verdicts of `ringproxy check`: each item a pure function of the configuration and the
//! [`HostFacts`], so every one is unit-tested on synthetic hosts.
//!
//! Each item is OK, WARN or FAIL, and every non-OK item carries the exact fix (a sysctl, a limits
//! line, a config change) with the number in it. Sizing comes from `plan.rs` evaluated at the
//! *hard* RLIMIT_NOFILE, because the engine raises the soft limit to the hard one at start;
//! capacity questions (ports, memory, fs.file-max) are asked for the configured maxconn, not the
//! lower one the host allows today.

use std::net::IpAddr;

use super::ports::{self, ephemeral};
use super::render::{counts, size};
use super::{HostFacts, Item, Status, fail, grade, ok, warn};
use crate::config::Config;
use crate::host::NofileLimit;
use crate::plan::{self, Plan};
use crate::stats::SERVER_BYTES_PER_WORKER;
use crate::stats::socket::Occupant;

/// Kernel structures per socket besides its buffers (tcp_sock, file, inode): a rough slab cost.
const SOCKET_OVERHEAD: u64 = 3 << 10;
use crate::features::FLOOR;

/// Judges the host against the configuration.
pub fn evaluate(config: &Config, facts: &HostFacts) -> Vec<Item> {
    let range = facts.port_range.unwrap_or((32768, 60999));
    let ephemeral_ports = ephemeral(range, &facts.reserved_ports);
    let plan = plan::plan(config, facts.nofile.map_or(1024, |l| l.hard), &facts.cpus, ephemeral_ports);
    // What the configuration asks for (unset: what the host allows), within the frontends' limits.
    let frontends: Option<u64> = config.frontends.iter().map(|f| f.maxconn.map(u64::from)).sum();
    let global = config.global.maxconn.unwrap_or(plan.maxconn);
    let target = frontends.map_or(global, |f| f.min(u64::from(global)) as u32).max(1);

    let mut items = vec![ok("config", format!("valid ({})", counts(config)))];
    for w in &config.warnings {
        let at = w.split(": warning:").next().unwrap_or(&config.origin);
        let fix = format!("edit {at} as the warning says (or leave it if it is intended)");
        items.push(warn("config", w.clone()).fix(fix));
    }
    items.push(kernel(facts));
    items.push(io_uring_item(facts));
    items.push(hand_over(facts));
    items.push(workers(config, &plan, facts));
    items.extend(open_files(config, &plan, facts));
    items.push(file_max(&plan, target, facts));
    items.extend(backlogs(config, facts));
    items.extend(socket_buffers(config, facts));
    items.push(ports::reserved(config, facts, range));
    items.extend(ports::port_capacity(config, facts, target, ephemeral_ports));
    items.push(sources_item(config, facts));
    items.extend(stats_socket(config, facts));
    items.extend(memory(config, &plan, target, facts));
    items
}

/// What is at the stats socket's path: the engine replaces only a stale socket, and refuses to
/// start over anything else (review item 1i).
fn stats_socket(config: &Config, facts: &HostFacts) -> Option<Item> {
    let path = config.global.stats.socket.as_ref()?.display();
    Some(match facts.stats_socket.as_ref()? {
        Occupant::Nothing => ok("stats socket", format!("{path} will be created")),
        Occupant::Socket => ok(
            "stats socket",
            format!("{path} is a socket: replaced at start if no engine answers on it, refused if one does"),
        ),
        Occupant::Other(kind) => fail(
            "stats socket",
            format!("{path} is {kind}, not a socket: the engine would refuse to start (it never removes it)"),
        )
        .fix("set global.stats.socket to a path of its own, e.g. /run/ringproxy/ringproxy.sock"),
        Occupant::Unknown(e) => warn("stats socket", format!("cannot look at {path}: {e}"))
            .fix("check that the engine's user can reach the socket's directory"),
    })
}

fn kernel(facts: &HostFacts) -> Item {
    let Some(release) = &facts.kernel else {
        return warn("kernel", "cannot read the kernel release (uname)")
            .fix("check `uname -r`: ringproxy needs Linux 6.1 or later");
    };
    match uring_access::version(release) {
        Some(v) if v >= FLOOR => ok(
            "kernel",
            format!(
                "Linux {release} (needs 6.1+; 6.7 adds socket options on direct sockets, 6.8 FIXED_FD_INSTALL, \
                 6.11 BIND: each spares a fallback)"
            ),
        ),
        Some(_) => fail(
            "kernel",
            format!("Linux {release} is too old: ringproxy needs 6.1+ (multishot receive, DEFER_TASKRUN)"),
        )
        .fix("upgrade the kernel to Linux 6.1 or later"),
        None => warn("kernel", format!("cannot parse the release \"{release}\""))
            .fix("check `uname -r`: ringproxy needs Linux 6.1 or later"),
    }
}

fn io_uring_item(facts: &HostFacts) -> Item {
    let disabled = facts.io_uring_disabled.unwrap_or(0);
    match &facts.io_uring {
        Ok(missing) if missing.is_empty() => {
            let note = if disabled == 1 { " (kernel.io_uring_disabled = 1, but this user may)" } else { "" };
            let features = match &facts.io_features {
                Ok((f, chosen)) => format!("; features ({chosen}): {f}"),
                Err(e) => format!("; features: cannot probe: {e}"),
            };
            let detail = format!(
                "ring set up, sparse file table registered, every opcode of the 6.1 floor supported{note}{features}"
            );
            ok("io_uring", detail)
        }
        Ok(missing) => {
            let detail = format!("the kernel lacks IORING_OP_{}", missing.join(", IORING_OP_"));
            fail("io_uring", detail).fix("upgrade the kernel to Linux 6.1 or later")
        }
        // Access itself (seccomp, sysctl) was checked before the report (`run`): what fails here
        // is a later step (the file table, the probe).
        Err(e) => fail("io_uring", e.clone()).fix(
            "upgrade the kernel (the workers' ring flags, SINGLE_ISSUER and DEFER_TASKRUN, need 6.1+); \
             EMFILE when registering the file table means RLIMIT_NOFILE is too small",
        ),
    }
}

/// What reloads and binary upgrades hand over on this host without closing: a reload moves
/// established connections between rings (MSG_RING, within the 6.1 floor); an upgrade hands the
/// new process its listening sockets always, and established connections where direct sockets can
/// become descriptors (FIXED_FD_INSTALL, 6.8).
fn hand_over(facts: &HostFacts) -> Item {
    match &facts.io_features {
        Ok((f, _)) if f.fd_install => ok(
            "hand-over",
            "reload and binary upgrade (ringproxy upgrade, SIGUSR2) move every established connection: nothing is \
             closed",
        ),
        Ok(_) => warn(
            "hand-over",
            "reload moves every established connection; a binary upgrade hands the new process the listening \
             sockets only: established connections stay with the old process until they end or timeout.drain \
             passes (making descriptors of direct sockets needs FIXED_FD_INSTALL, Linux 6.8)",
        )
        .fix("upgrade the kernel to Linux 6.8 or later for upgrades that close nothing"),
        Err(e) => warn("hand-over", format!("cannot tell (io_uring features: {e})")),
    }
}

fn workers(config: &Config, plan: &Plan, facts: &HostFacts) -> Item {
    let (n, w) = (facts.cpus.len().max(1), plan.workers);
    let how = if config.global.workers.is_none() { "auto: one per usable CPU" } else { "configured" };
    let pin = if config.global.pin_cpus { "pinned" } else { "not pinned" };
    let mut detail = format!("{w} ({how}) on {n} usable CPU(s), {pin}");
    if w > n {
        detail.push_str("; more workers than CPUs is allowed and holds more connections: each worker's io_uring file table is capped by RLIMIT_NOFILE on its own (the workers share the CPUs)");
    }
    ok("workers", detail)
}

/// RLIMIT_NOFILE, fs.nr_open and the splice pipes that fit: three items, or one when the limit
/// cannot be read.
fn open_files(config: &Config, plan: &Plan, facts: &HostFacts) -> Vec<Item> {
    let Some(limit) = facts.nofile else {
        return vec![fail("open files", "cannot read RLIMIT_NOFILE").fix("check `ulimit -Hn` as the service user")];
    };
    // RLIMIT_NOFILE the configuration needs: 0 when the hard limit already does.
    let needed = match config.global.maxconn {
        Some(m) if plan.maxconn < m => plan.nofile_needed,
        _ => 0,
    };
    vec![nofile(config, plan, facts, limit, needed), nr_open(facts, needed), pipes(config, plan, limit.hard)]
}

/// Whether the configured maxconn fits the hard RLIMIT_NOFILE, and the ways to make it fit.
fn nofile(config: &Config, plan: &Plan, facts: &HostFacts, limit: NofileLimit, needed: u64) -> Item {
    let NofileLimit { soft, hard } = limit;
    let raised = if soft < hard { format!(" (the soft limit {soft} is raised to it at start)") } else { String::new() };
    let (workers, held, cpw, slack) = (plan.workers, plan.maxconn, plan.conns_per_worker, plan::PARK_SLACK);
    match config.global.maxconn {
        Some(m) if held < m => {
            let detail = format!(
                "maxconn {m} needs RLIMIT_NOFILE {needed} per worker ring (2 sockets per connection + {slack} slack); hard limit is {hard}{raised} -> {workers} worker(s) hold {held}, the engine would run with maxconn {held}"
            );
            let mut item = fail("open files", detail)
                .fix(format!("LimitNOFILE={needed} in the systemd unit's [Service] section"))
                .fix(format!(
                    "or \"* soft nofile {needed}\" and \"* hard nofile {needed}\" in /etc/security/limits.conf"
                ));
            if facts.nr_open.is_some_and(|n| n < needed) {
                item = item.fix("  (either needs fs.nr_open raised first, see below)");
            }
            if needed >= u64::from(plan::MAX_TABLE) {
                // One ring's table cannot hold a worker's share however high the limit goes.
                item = item.fix(format!(
                    "  and global.workers: {} (one io_uring table holds at most {} sockets)",
                    plan::workers_at_table_cap(m),
                    plan::MAX_TABLE
                ));
            }
            let per_worker = (hard.min(u64::from(plan::MAX_TABLE)) as u32).saturating_sub(plan::PARK_SLACK) / 2;
            let more = m.div_ceil(per_worker.max(1)) as usize;
            if more <= 1024 {
                let mut c = config.clone();
                c.global.workers = Some(more);
                let pipes = plan::plan(&c, hard, &facts.cpus, plan.ephemeral_ports).pipes_per_worker;
                item = item.fix(format!("or global.workers: {more} ({more} x {per_worker} >= {m} at this limit; {pipes} splice pipes per worker then)"));
            }
            item
        }
        Some(m) => ok(
            "open files",
            format!(
                "maxconn {m} fits: {workers} worker(s) x {cpw} connections, 2 direct descriptors each + {slack} per ring <= hard limit {hard}{raised}"
            ),
        ),
        None => ok(
            "open files",
            format!(
                "global.maxconn not set: hard limit {hard}{raised} lets {workers} worker(s) hold {held} (at most {})",
                plan::DEFAULT_MAXCONN
            ),
        ),
    }
}

/// fs.nr_open, the ceiling RLIMIT_NOFILE cannot be raised above, vs the `needed` limit.
fn nr_open(facts: &HostFacts, needed: u64) -> Item {
    match facts.nr_open {
        None => warn("fs.nr_open", "cannot read fs.nr_open").fix("check `sysctl fs.nr_open`"),
        Some(n) if n < needed => {
            let detail = format!("{n}: RLIMIT_NOFILE cannot be raised above it, and {needed} is needed");
            fail("fs.nr_open", detail).sysctl("fs.nr_open", needed)
        }
        Some(n) => ok(
            "fs.nr_open",
            format!(
                "{n} (the ceiling for RLIMIT_NOFILE{})",
                if needed > 0 { format!("; {needed} needed") } else { String::new() }
            ),
        ),
    }
}

/// The splice pipes per worker that fit beside the connections in the `hard` open-files limit.
fn pipes(config: &Config, plan: &Plan, hard: u64) -> Item {
    let (pipes, max, workers) = (plan.pipes_per_worker, config.global.tune.max_pipes, plan.workers);
    if pipes < max && pipes < 64 {
        warn("splice pipes", format!("only {pipes} per worker fit in RLIMIT_NOFILE {hard} with {workers} workers (tune.max_pipes {max}); busy connections wait for one"))
            .fix(format!(
                "raise the open-files limit (LimitNOFILE=) or use fewer workers: each pipe takes 2 of the {hard} descriptors{}",
                if config.splices() {
                    ", and each connection splicing on its worker's thread 2 more (tune.splice, a backend's splice)"
                } else {
                    ""
                }
            ))
    } else {
        ok(
            "splice pipes",
            format!("{pipes} per worker (tune.max_pipes {max}), ordinary descriptors that fit in RLIMIT_NOFILE"),
        )
    }
}

fn file_max(plan: &Plan, target: u32, facts: &HostFacts) -> Item {
    let (name, used) = ("fs.file-max", facts.files_in_use.unwrap_or(0));
    let pipes = 2 * u64::from(plan.pipes_per_worker) * plan.workers as u64;
    let need = 2 * u64::from(target) + pipes + 1024;
    let suggest = (need + used).div_ceil(1 << 16) * (1 << 16) + (1 << 16);
    let Some(max) = facts.file_max else {
        return warn(name, "cannot read fs.file-max").sysctl(name, suggest);
    };
    let detail = format!(
        "{max} system-wide, {used} in use; the proxy needs {need} (2 x {target} sockets + {pipes} pipe ends + 1024); clients and servers on this host count too"
    );
    match max {
        _ if need > max => fail(name, detail).sysctl(name, suggest),
        _ if need + used > max => warn(name, detail).sysctl(name, suggest),
        _ => ok(name, detail),
    }
}

/// net.core.somaxconn (caps every accept queue) and tcp_max_syn_backlog (the SYN queue) vs the
/// frontends' backlogs.
fn backlogs(config: &Config, facts: &HostFacts) -> Vec<Item> {
    let want = config.frontends.iter().map(|f| f.backlog).max().unwrap_or(0);
    let checks = [
        (
            "net.core.somaxconn",
            facts.somaxconn,
            "the kernel silently caps the accept queue of frontend backlog {fe} at {n}; beyond it, \
             new connections are dropped (clients retry after 1s, 3s, 7s...)",
        ),
        (
            "net.ipv4.tcp_max_syn_backlog",
            facts.syn_backlog,
            "the SYN queue of frontend backlog {fe} holds {n} half-open connections; beyond it, the \
             kernel answers with SYN cookies (tcp_syncookies=1) or drops SYNs",
        ),
    ];
    let mut items = Vec::new();
    for (sysctl, value, what) in checks {
        let name = sysctl.trim_start_matches("net.ipv4.");
        items.push(match value {
            None => warn(name, format!("cannot read {sysctl}")).sysctl(sysctl, want),
            Some(n) if n < u64::from(want) => {
                let fe = config.frontends.iter().filter(|f| u64::from(f.backlog) > n);
                let fe: Vec<String> = fe.map(|f| format!("{} {}", f.name, f.backlog)).collect();
                let fe = fe.join(", ");
                let detail = format!("{n}: {what}").replace("{fe}", &fe).replace("{n}", &n.to_string());
                warn(name, detail).sysctl(sysctl, want)
            }
            Some(n) => ok(name, format!("{n} >= every frontend backlog (largest {want})")),
        });
    }
    items
}

/// `tune.rcvbuf_*` / `sndbuf_*` vs net.core.rmem_max / wmem_max, which silently cap SO_RCVBUF /
/// SO_SNDBUF (only when a size is set).
fn socket_buffers(config: &Config, facts: &HostFacts) -> Option<Item> {
    let sizes = config.global.tune.buffer_sizes();
    if sizes.iter().all(|(_, v)| v.is_none()) {
        return None;
    }
    let (mut capped, mut unread, mut raise) = (Vec::new(), Vec::new(), Vec::new());
    for (sysctl, kind, max) in
        [("net.core.rmem_max", "rcvbuf", facts.rmem_max), ("net.core.wmem_max", "sndbuf", facts.wmem_max)]
    {
        let mine: Vec<(&str, u64)> = sizes
            .iter()
            .filter(|(key, _)| key.starts_with(kind))
            .filter_map(|&(key, v)| Some((key, u64::from(v?))))
            .collect();
        let Some(want) = mine.iter().map(|s| s.1).max() else { continue };
        match max {
            None => unread.push(sysctl),
            Some(max) if want > max => {
                let over: Vec<String> =
                    mine.iter().filter(|s| s.1 > max).map(|s| format!("tune.{} {}", s.0, s.1)).collect();
                capped.push(format!("{} ({sysctl} {max})", over.join(", ")));
            }
            Some(_) => continue,
        }
        raise.push((sysctl, want));
    }
    let name = "socket buffers";
    let mut item = match (capped.is_empty(), unread.is_empty()) {
        (true, true) => {
            return Some(ok(name, "every tune.rcvbuf_* / sndbuf_* set is within net.core.rmem_max / wmem_max"));
        }
        (false, _) => warn(
            name,
            format!(
                "the kernel silently caps SO_RCVBUF / SO_SNDBUF at net.core.rmem_max / wmem_max: {} get that maximum, not the size set",
                capped.join("; ")
            ),
        ),
        (true, false) => warn(name, format!("cannot read {}", unread.join(", "))),
    };
    for (sysctl, want) in raise {
        item = item.sysctl(sysctl, want);
    }
    Some(item)
}

fn sources_item(config: &Config, facts: &HostFacts) -> Item {
    let name = "source addresses";
    let mut all: Vec<(IpAddr, String)> = Vec::new();
    for b in &config.backends {
        for s in &b.servers {
            all.extend(s.sources.iter().map(|ip| (*ip, format!("{}/{}", b.name, s.name))));
        }
    }
    let total = all.len();
    if total == 0 {
        return ok(name, "none configured (the kernel picks the source address)");
    }
    let mut bad: Vec<&(IpAddr, String)> = all.iter().filter(|(ip, _)| facts.unbindable.contains_key(ip)).collect();
    bad.sort();
    bad.dedup_by_key(|(ip, _)| *ip);
    if bad.is_empty() && facts.nonlocal_bind {
        return warn(
            name,
            format!("all {total} bind, but ip_nonlocal_bind = 1 lets any address bind, so that proves nothing"),
        )
        .fix("check that each source is listed by `ip -br addr`");
    }
    if bad.is_empty() {
        return ok(name, format!("all {total} are assigned to this host (binding test)"));
    }
    // The binding test's error, once per distinct error.
    let mut why: Vec<&str> = bad.iter().filter_map(|(ip, _)| facts.unbindable.get(ip)).map(String::as_str).collect();
    why.sort_unstable();
    why.dedup();
    let more = if bad.len() > 5 { ", ..." } else { "" };
    let list: Vec<String> = bad.iter().take(5).map(|(ip, s)| format!("{ip} ({s})")).collect();
    let (n, list, why) = (bad.len(), list.join(", "), why.join("; "));
    let detail = format!("{n} of {total} not assigned to this host: {list}{more} ({why})");
    let mut item = fail(name, detail);
    for (ip, _) in bad.iter().take(5) {
        item = item.fix(format!("ip addr add {ip}/{} dev lo", if ip.is_ipv4() { 32 } else { 128 }));
    }
    if bad.len() > 5 {
        item = item.fix(format!("(and likewise for the {} others)", bad.len() - 5));
    }
    item.fix("(or on the interface facing the servers; make it persistent in the network configuration)")
}

/// Kernel socket memory for `target` idle connections, vs tcp_mem; that and the per-server stats
/// every worker keeps, vs RAM.
fn memory(config: &Config, plan: &Plan, target: u32, facts: &HostFacts) -> Vec<Item> {
    let (Some(mem), Some(r), Some(w)) = (facts.tcp_mem, facts.tcp_rmem, facts.tcp_wmem) else {
        return vec![
            warn("tcp memory", "cannot read tcp_mem / tcp_rmem / tcp_wmem")
                .fix("check `sysctl net.ipv4.tcp_mem net.ipv4.tcp_rmem net.ipv4.tcp_wmem`"),
        ];
    };
    let (page, ram) = (facts.page_size.max(1), facts.mem_total);
    let per_conn = 2 * (r[0] + w[0] + SOCKET_OVERHEAD);
    // Connections that fit in half the RAM at this floor: the most a tcp_mem suggestion is sized for.
    let fits = ram.map_or(u64::MAX, |m| m / 2 / per_conn).min(u64::from(u32::MAX)) as u32;
    let pages_for = |conns: u32| (2 * u64::from(conns) * (r[0] + w[0])).div_ceil(page);
    let (sockets, pages) = (2 * u64::from(target), pages_for(target));
    // Buffers filled: a size set by tune.rcvbuf_* / sndbuf_* (which the kernel doubles), else the
    // default, from which a busy socket autotunes up to the maximum.
    let tune = &config.global.tune;
    let filled = |set: Option<u32>, default: u64| set.map_or(default, |v| 2 * u64::from(v));
    let client = [filled(tune.client_buffers.receive, r[1]), filled(tune.client_buffers.send, w[1])];
    let server = [filled(tune.server_buffers.receive, r[1]), filled(tune.server_buffers.send, w[1])];
    let busy = u64::from(target) * (client[0] + client[1] + server[0] + server[1]);
    let whence = match tune.buffer_sizes().iter().all(|(_, v)| v.is_none()) {
        true => format!(
            "tcp_rmem / tcp_wmem's defaults, from which busy sockets autotune up to {} + {} each unless tune.rcvbuf_* / sndbuf_* fix them",
            r[2], w[2]
        ),
        false => "tune.rcvbuf_* / sndbuf_* as set, doubled by the kernel, else tcp_rmem / tcp_wmem's defaults".into(),
    };
    let today = match plan.maxconn < target {
        true => format!(
            " ({} at the {} connections the open-files limit allows today)",
            size(pages_for(plan.maxconn) * page),
            plan.maxconn
        ),
        false => String::new(),
    };
    let detail = format!(
        "{target} idle connections = {sockets} sockets x (tcp_rmem min {} + tcp_wmem min {}) = {} = {pages} pages{today} vs tcp_mem {} {} {} (pressure at {}, limit {}). Assumes nearly empty buffers, each socket charged its minimum; with their buffers filled (client side {} + {}, server side {} + {}: {whence}) they would need {}",
        r[0],
        w[0],
        size(pages * page),
        mem[0],
        mem[1],
        mem[2],
        size(mem[1] * page),
        size(mem[2] * page),
        client[0],
        client[1],
        server[0],
        server[1],
        size(busy)
    );
    let status = grade(pages, mem[1], mem[2]);
    let mut tcp = Item::new(status, "tcp memory", detail);
    if status != Status::Ok {
        let sized = target.min(fits);
        if sized < target {
            tcp = tcp.fix(format!("lower global.maxconn first (see memory); then, for maxconn {sized}:"));
        }
        let low = pages_for(sized).max(mem[0]);
        let (press, high) = ((low * 3 / 2).max(mem[1]), (low * 2).max(mem[2]));
        tcp = tcp.sysctl("net.ipv4.tcp_mem", format!("{low} {press} {high}"));
        if r[1] > r[0] || w[1] > w[0] {
            tcp = tcp
                .fix("and small default buffers, so busy connections grow theirs only as needed:")
                .sysctl("net.ipv4.tcp_rmem", format!("{} {} {}", r[0], r[0], r[2]))
                .sysctl("net.ipv4.tcp_wmem", format!("{} {} {}", w[0], w[0], w[2]));
        }
    }
    let Some(ram) = ram else {
        return vec![tcp, warn("memory", "cannot read MemTotal from /proc/meminfo").fix("check `free -g`")];
    };
    let servers: u64 = config.backends.iter().map(|b| b.servers.len() as u64).sum();
    let stats = servers * plan.workers as u64 * SERVER_BYTES_PER_WORKER;
    // splice: auto or never: each worker's receive buffers, created as transfers need them, up to this.
    let (recv, recv_words) = if config.uses_ring() {
        let buf = u64::from(config.global.tune.recv_buffer_size);
        let per_worker = u64::from(config.global.tune.recv_buffers) * buf;
        let words = format!(
            " + {} workers x {} receive buffers x {} (at most, as bulk transfers need them)",
            plan.workers,
            config.global.tune.recv_buffers,
            size(buf)
        );
        (per_worker * plan.workers as u64, words)
    } else {
        (0, String::new())
    };
    // balance: hash: each worker's Maglev table of each such backend.
    let hash_tables: u64 = config
        .backends
        .iter()
        .filter(|b| b.balance == crate::config::Balance::Hash)
        .map(|b| crate::balance::table_bytes(b.servers.len()) * plan.workers as u64)
        .sum();
    let recv_words = if hash_tables > 0 {
        format!("{recv_words} + {} of balance: hash tables", size(hash_tables))
    } else {
        recv_words
    };
    let recv = recv + hash_tables;
    let total = per_conn * u64::from(target) + stats + recv;
    let detail = format!(
        "{target} connections x {} (2 sockets: buffer floor + ~{} of kernel structures each) + {servers} servers x {} workers x {} of stats (latency histogram and counters){recv_words} = {} of {} RAM",
        size(per_conn),
        size(SOCKET_OVERHEAD),
        plan.workers,
        size(SERVER_BYTES_PER_WORKER),
        size(total),
        size(ram)
    );
    let status = grade(total, ram / 2, ram / 10 * 9);
    let mut item = Item::new(status, "memory", detail);
    if status != Status::Ok {
        item = item.fix(format!(
            "global.maxconn: {fits} (half the RAM at this floor), or a host with {} RAM or more",
            size(total * 2)
        ));
        if stats > ram / 4 {
            item = item.fix(format!(
                "per-server stats alone take {}: run fewer workers (global.workers), or split the servers over several engines",
                size(stats)
            ));
        }
    }
    vec![tcp, item]
}
