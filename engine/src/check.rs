//! `ringproxy check`: a preflight of this host against a configuration, one line per item.
//!
//! Reading and judging are separate. [`HostFacts::read`] gathers everything from the host (limits,
//! sysctls, an io_uring probe, a binding test per configured IP) and never fails: an unreadable
//! value is `None` and its item says so. [`evaluate`] is pure (facts and configuration in, [`Item`]s
//! out), so every verdict is unit-tested with synthetic hosts. Each item is OK, WARN or FAIL, and
//! every non-OK item carries the exact fix (a sysctl, a limits line, a config change) with the
//! number in it. Sizing comes from `plan.rs` evaluated at the *hard* RLIMIT_NOFILE, because the
//! engine raises the soft limit to the hard one at start; capacity questions (ports, memory,
//! fs.file-max) are asked for the configured maxconn, not the lower one the host allows today. The
//! exit code is the worst status: 0 OK, 1 WARN, 2 FAIL.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::config::Config;
use crate::host::{self, NofileLimit};
use crate::plan::{self, Plan};

/// Kernel structures per socket besides its buffers (tcp_sock, file, inode): a rough slab cost.
const SOCKET_OVERHEAD: u64 = 3 << 10;
/// Oldest kernel with everything the engine uses (IORING_OP_BIND is the newest).
const MIN_KERNEL: (u32, u32) = (6, 11);
/// The port range suggested when a (source, server) pair runs out of ports.
const WIDE_RANGE: (u16, u16) = (1024, 65535);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

/// One line of the report.
#[derive(Clone, Debug)]
pub struct Item {
    pub status: Status,
    pub name: String,
    pub detail: String,
    /// How to make it OK; alternatives on separate lines.
    pub fix: Option<String>,
    /// `(name, value)` of the sysctls in the fix, for the persistent block at the end.
    pub sysctls: Vec<(String, String)>,
}

impl Item {
    fn new(status: Status, name: impl Into<String>, detail: impl Into<String>) -> Item {
        let (name, detail) = (name.into(), detail.into());
        Item { status, name, detail, fix: None, sysctls: Vec::new() }
    }

    /// Appends a line to the fix.
    fn fix(mut self, line: impl AsRef<str>) -> Item {
        let line = line.as_ref();
        self.fix = Some(self.fix.map_or(line.to_owned(), |f| format!("{f}\n{line}")));
        self
    }

    /// Appends `sysctl -w NAME=VALUE` to the fix.
    fn sysctl(mut self, name: &str, value: impl ToString) -> Item {
        let value = value.to_string();
        let cmd = match value.contains(' ') {
            true => format!("sysctl -w {name}=\"{value}\""),
            false => format!("sysctl -w {name}={value}"),
        };
        self.sysctls.push((name.to_owned(), value));
        self.fix(cmd)
    }
}

/// OK up to `warn_above`, WARN up to `fail_above`, FAIL beyond.
fn grade(value: u64, warn_above: u64, fail_above: u64) -> Status {
    match value {
        v if v > fail_above => Status::Fail,
        v if v > warn_above => Status::Warn,
        _ => Status::Ok,
    }
}

fn ok(name: impl Into<String>, detail: impl Into<String>) -> Item {
    Item::new(Status::Ok, name, detail)
}

fn warn(name: impl Into<String>, detail: impl Into<String>) -> Item {
    Item::new(Status::Warn, name, detail)
}

fn fail(name: impl Into<String>, detail: impl Into<String>) -> Item {
    Item::new(Status::Fail, name, detail)
}

/// Everything [`evaluate`] needs to know about the host.
#[derive(Clone, Debug)]
pub struct HostFacts {
    /// `uname -r`.
    pub kernel: Option<String>,
    pub nofile: Option<NofileLimit>,
    pub nr_open: Option<u64>,
    pub file_max: Option<u64>,
    /// First field of fs.file-nr: files allocated now, system-wide.
    pub files_in_use: Option<u64>,
    pub somaxconn: Option<u64>,
    pub syn_backlog: Option<u64>,
    pub port_range: Option<(u16, u16)>,
    pub reserved_ports: Vec<(u16, u16)>,
    pub tcp_mem: Option<[u64; 3]>,
    pub tcp_rmem: Option<[u64; 3]>,
    pub tcp_wmem: Option<[u64; 3]>,
    pub page_size: u64,
    pub mem_total: Option<u64>,
    pub cpus: Vec<usize>,
    /// The io_uring probe: opcodes the kernel lacks, or why no ring could be set up.
    pub io_uring: Result<Vec<&'static str>, String>,
    pub io_uring_disabled: Option<u64>,
    /// ip_nonlocal_bind is on: binding succeeds for any address, so the binding test proves nothing.
    pub nonlocal_bind: bool,
    /// Configured IPs (sources, server addresses) this host cannot bind to, with the error.
    pub unbindable: HashMap<IpAddr, String>,
}

impl HostFacts {
    /// Reads this host. Never fails; what cannot be read is `None`.
    pub fn read(config: &Config) -> HostFacts {
        let triple = |n: &str| host::sysctl(n).and_then(|v| <[u64; 3]>::try_from(v).ok());
        let mut ips: Vec<IpAddr> = (config.backends.iter().flat_map(|b| &b.servers))
            .flat_map(|s| std::iter::once(s.address.ip()).chain(s.sources.iter().copied()))
            .collect();
        ips.sort_unstable();
        ips.dedup();
        let unbindable = ips
            .into_iter()
            .filter_map(|ip| crate::sources::verify_local([ip]).err())
            .map(|(ip, e)| (ip, e.to_string()))
            .collect();
        let nonlocal = ["net.ipv4.ip_nonlocal_bind", "net.ipv6.ip_nonlocal_bind"];
        HostFacts {
            kernel: kernel_release(),
            nofile: host::nofile().ok(),
            nr_open: host::sysctl1("fs.nr_open"),
            file_max: host::sysctl1("fs.file-max"),
            files_in_use: host::sysctl1("fs.file-nr"),
            somaxconn: host::sysctl1("net.core.somaxconn"),
            syn_backlog: host::sysctl1("net.ipv4.tcp_max_syn_backlog"),
            port_range: host::local_port_range(),
            reserved_ports: host::reserved_ports(),
            tcp_mem: triple("net.ipv4.tcp_mem"),
            tcp_rmem: triple("net.ipv4.tcp_rmem"),
            tcp_wmem: triple("net.ipv4.tcp_wmem"),
            page_size: host::page_size(),
            mem_total: host::mem_total(),
            cpus: host::usable_cpus(),
            io_uring: probe_io_uring(),
            io_uring_disabled: host::sysctl1("kernel.io_uring_disabled"),
            nonlocal_bind: nonlocal.iter().any(|n| host::sysctl1(n).unwrap_or(0) != 0),
            unbindable,
        }
    }
}

fn kernel_release() -> Option<String> {
    // SAFETY: utsname is plain data (all zero is valid); uname only writes into it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname for the duration of the call.
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    let bytes: Vec<u8> = u.release.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8(bytes).ok()
}

/// Sets up a ring with the workers' flags, registers a sparse file table, probes the opcodes used.
fn probe_io_uring() -> Result<Vec<&'static str>, String> {
    use io_uring::opcode::*;
    let ring: io_uring::IoUring = io_uring::IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_submit_all()
        .build(8)
        .map_err(|e| format!("io_uring_setup failed: {e}"))?;
    let sub = ring.submitter();
    sub.register_files_sparse(8).map_err(|e| format!("registering a sparse file table failed: {e}"))?;
    let mut probe = io_uring::Probe::new();
    sub.register_probe(&mut probe).map_err(|e| format!("IORING_REGISTER_PROBE failed: {e}"))?;
    let ops = [
        ("ACCEPT", Accept::CODE),
        ("SOCKET", Socket::CODE),
        ("BIND", Bind::CODE),
        ("CONNECT", Connect::CODE),
        ("LINK_TIMEOUT", LinkTimeout::CODE),
        ("URING_CMD", UringCmd16::CODE),
        ("SPLICE", Splice::CODE),
        ("POLL_ADD", PollAdd::CODE),
        ("SHUTDOWN", Shutdown::CODE),
        ("CLOSE", Close::CODE),
    ];
    Ok(ops.iter().filter(|(_, c)| !probe.is_supported(*c)).map(|(n, _)| *n).collect())
}

/// Runs the preflight, prints one line per item, returns the exit code (0 ok, 1 warnings, 2 errors).
pub fn run(config: &Config) -> i32 {
    let facts = HostFacts::read(config);
    let items = evaluate(config, &facts);
    print!("{}", render(config, &facts, &items));
    exit_code(&items)
}

/// 0 when every item is OK, 1 with warnings only, 2 with any failure.
pub fn exit_code(items: &[Item]) -> i32 {
    match items.iter().map(|i| i.status).max() {
        Some(Status::Fail) => 2,
        Some(Status::Warn) => 1,
        _ => 0,
    }
}

/// The report: a header, one aligned line per item with its fix below, the sysctls to persist,
/// and a summary.
pub fn render(config: &Config, facts: &HostFacts, items: &[Item]) -> String {
    let (origin, kernel) = (&config.origin, facts.kernel.as_deref().unwrap_or("?"));
    let (cpus, ram) = (facts.cpus.len(), facts.mem_total.map_or("?".into(), size));
    let mut out =
        format!("ringproxy check: {origin} ({}) on Linux {kernel}, {cpus} usable CPU(s), {ram} RAM\n", counts(config));
    let width = items.iter().map(|i| i.name.len()).max().unwrap_or(0).max(20) + 2;
    for i in items {
        let status = ["OK", "WARN", "FAIL"][i.status as usize];
        let _ = writeln!(out, "{status:<6}{:<width$}{}", i.name, i.detail);
        for (n, line) in i.fix.iter().flat_map(|f| f.lines()).enumerate() {
            let _ = writeln!(out, "      {}{line}", if n == 0 { "fix: " } else { "     " });
        }
    }
    let mut seen = BTreeSet::new();
    let persist: Vec<String> = (items.iter().filter(|i| i.status != Status::Ok))
        .flat_map(|i| &i.sysctls)
        .filter(|(n, _)| seen.insert(n.clone()))
        .map(|(n, v)| format!("  {n} = {v}\n"))
        .collect();
    if !persist.is_empty() {
        out.push_str("to keep the sysctl fixes across reboots, put in /etc/sysctl.d/90-ringproxy.conf:\n");
        out.push_str(&persist.concat());
    }
    let n = |s: Status| items.iter().filter(|i| i.status == s).count();
    let (ok, warn, fail) = (n(Status::Ok), n(Status::Warn), n(Status::Fail));
    let _ = writeln!(out, "summary: {ok} OK, {warn} WARN, {fail} FAIL");
    out
}

fn counts(config: &Config) -> String {
    let servers = config.backends.iter().map(|b| b.servers.len()).sum();
    let (f, b) = (config.frontends.len(), config.backends.len());
    format!("{}, {}, {}", plural(f, "frontend"), plural(b, "backend"), plural(servers, "server"))
}

/// Judges the host against the configuration.
pub fn evaluate(config: &Config, facts: &HostFacts) -> Vec<Item> {
    let range = facts.port_range.unwrap_or((32768, 60999));
    let ports = ephemeral(range, &facts.reserved_ports);
    let plan = plan::plan(config, facts.nofile.map_or(1024, |l| l.hard), &facts.cpus, ports);
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
    items.push(workers(config, &plan, facts));
    items.extend(open_files(config, &plan, facts));
    items.push(file_max(&plan, target, facts));
    items.extend(backlogs(config, facts));
    items.push(reserved(config, facts, range));
    items.extend(port_capacity(config, facts, target, ports));
    items.push(sources_item(config, facts));
    items.extend(memory(&plan, target, facts));
    items
}

fn kernel(facts: &HostFacts) -> Item {
    let Some(release) = &facts.kernel else {
        return warn("kernel", "cannot read the kernel release (uname)")
            .fix("check `uname -r`: ringproxy needs Linux 6.11 or later");
    };
    let mut it = release.split(['.', '-']).map(|t| t.parse::<u32>().ok());
    match it.next().flatten().zip(it.next().flatten()) {
        Some(v) if v >= MIN_KERNEL => {
            ok("kernel", format!("Linux {release} (needs 6.11+: direct descriptors, multishot accept, IORING_OP_BIND)"))
        }
        Some(_) => fail(
            "kernel",
            format!("Linux {release} is too old: ringproxy needs 6.11+ (IORING_OP_BIND, uring_cmd setsockopt)"),
        )
        .fix("upgrade the kernel to Linux 6.11 or later"),
        None => warn("kernel", format!("cannot parse the release \"{release}\""))
            .fix("check `uname -r`: ringproxy needs Linux 6.11 or later"),
    }
}

fn io_uring_item(facts: &HostFacts) -> Item {
    let disabled = facts.io_uring_disabled.unwrap_or(0);
    match &facts.io_uring {
        Ok(missing) if missing.is_empty() => {
            let note = if disabled == 1 { " (kernel.io_uring_disabled = 1, but this user may)" } else { "" };
            let detail = format!("ring set up, sparse file table registered, every opcode used is supported{note}");
            ok("io_uring", detail)
        }
        Ok(missing) => {
            let detail = format!("the kernel lacks IORING_OP_{}", missing.join(", IORING_OP_"));
            fail("io_uring", detail).fix("upgrade the kernel to Linux 6.11 or later")
        }
        Err(e) if disabled != 0 => fail("io_uring", format!("{e}; kernel.io_uring_disabled = {disabled}"))
            .sysctl("kernel.io_uring_disabled", 0),
        Err(e) => fail("io_uring", e.clone()).fix(
            "allow io_uring_setup, io_uring_enter and io_uring_register in the seccomp profile of the \
             container or service (Docker: --security-opt seccomp=<a profile allowing them>)",
        ),
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

fn open_files(config: &Config, plan: &Plan, facts: &HostFacts) -> Vec<Item> {
    let Some(NofileLimit { soft, hard }) = facts.nofile else {
        return vec![fail("open files", "cannot read RLIMIT_NOFILE").fix("check `ulimit -Hn` as the service user")];
    };
    let per_worker = (hard.min(u64::from(u32::MAX)) as u32).saturating_sub(plan::PARK_SLACK) / 2;
    let raised = if soft < hard { format!(" (the soft limit {soft} is raised to it at start)") } else { String::new() };
    let (workers, held, cpw, slack) = (plan.workers, plan.maxconn, plan.conns_per_worker, plan::PARK_SLACK);
    // RLIMIT_NOFILE the configuration needs: 0 when the hard limit already does.
    let mut needed = 0;
    let files = match config.global.maxconn {
        Some(m) if held < m => {
            needed = plan.nofile_needed;
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
    };
    let nr_open = match facts.nr_open {
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
    };
    let (pipes, max) = (plan.pipes_per_worker, config.global.tune.max_pipes);
    let pipes = if pipes < max && pipes < 64 {
        warn("splice pipes", format!("only {pipes} per worker fit in RLIMIT_NOFILE {hard} with {workers} workers (tune.max_pipes {max}); busy connections wait for one"))
            .fix(format!("raise the open-files limit (LimitNOFILE=) or use fewer workers: each pipe takes 2 of the {hard} descriptors"))
    } else {
        ok(
            "splice pipes",
            format!("{pipes} per worker (tune.max_pipes {max}), ordinary descriptors that fit in RLIMIT_NOFILE"),
        )
    };
    vec![files, nr_open, pipes]
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

/// Listening ports, and ports of servers on this host, at or above `from`.
fn own_ports(config: &Config, facts: &HostFacts, from: u16) -> Vec<u16> {
    let binds = config.frontends.iter().flat_map(|f| &f.binds).map(SocketAddr::port);
    let servers = config.backends.iter().flat_map(|b| &b.servers);
    let local = (servers.filter(|s| !facts.unbindable.contains_key(&s.address.ip()))).map(|s| s.address.port());
    let mut v: Vec<u16> = binds.chain(local).filter(|&p| p != 0 && p >= from).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The ip_local_reserved_ports value that adds `ports` to what is reserved now.
fn reserve_value(facts: &HostFacts, ports: &[u16]) -> String {
    let now = facts.reserved_ports.iter().flat_map(|&(a, b)| a..=b);
    port_list(ports.iter().copied().chain(now).collect())
}

fn reserved(config: &Config, facts: &HostFacts, (lo, hi): (u16, u16)) -> Item {
    let inside: Vec<u16> = (own_ports(config, facts, lo).into_iter())
        .filter(|&p| p <= hi && !is_reserved(p, &facts.reserved_ports))
        .collect();
    if inside.is_empty() {
        return ok(
            "reserved ports",
            format!("no listening or local server port is an unreserved ephemeral port ({lo}-{hi})"),
        );
    }
    let detail = format!(
        "{} inside ip_local_port_range {lo}-{hi} and not reserved: an outgoing connection can take the port first, and the listener or server then cannot bind it",
        port_list(inside.clone())
    );
    warn("reserved ports", detail).sysctl("net.ipv4.ip_local_reserved_ports", reserve_value(facts, &inside))
}

/// Whether the connections each server may receive fit in the ports of its (source IP, server
/// address) pairs. Servers with the same address and the same source share that pair's ports.
fn port_capacity(config: &Config, facts: &HostFacts, target: u32, ports: u32) -> Vec<Item> {
    type Pair = (Option<IpAddr>, SocketAddr);
    let sources = |s: &crate::config::Server| -> Vec<Option<IpAddr>> {
        if s.sources.is_empty() { vec![None] } else { s.sources.iter().copied().map(Some).collect() }
    };
    // Connections each server may receive (and why), then the load on each pair.
    let mut demand: Vec<Vec<(u64, String)>> = Vec::new();
    let mut pairs: HashMap<Pair, (u64, BTreeSet<String>)> = HashMap::new();
    for b in &config.backends {
        let total: u64 = b.servers.iter().map(|s| u64::from(s.weight)).sum();
        let fe = config.frontends.iter().filter(|f| config.backends[f.backend].name == b.name);
        let fe: Option<u64> = fe.map(|f| f.maxconn.map(u64::from)).sum();
        let (limit, of) = match (b.maxconn, fe) {
            (Some(m), _) if m <= target && fe.is_none_or(|f| u64::from(m) <= f) => (m, "backend maxconn"),
            (_, Some(f)) if f <= u64::from(target) => (f as u32, "frontend maxconn"),
            _ => (target, "maxconn"),
        };
        let row: Vec<(u64, String)> = (b.servers.iter())
            .map(|s| match s.maxconn {
                Some(m) => (u64::from(m.min(target)), "server maxconn".into()),
                None => (
                    (u64::from(limit) * u64::from(s.weight)).div_ceil(total.max(1)),
                    format!("{of} {limit} x weight {}/{total}", s.weight),
                ),
            })
            .collect();
        for (s, (d, _)) in b.servers.iter().zip(&row) {
            let src = sources(s);
            for ip in &src {
                let e = pairs.entry((*ip, s.address)).or_default();
                e.0 += d.div_ceil(src.len() as u64);
                e.1.insert(format!("{}/{}", b.name, s.name));
            }
        }
        demand.push(row);
    }
    let reserve_wide = own_ports(config, facts, WIDE_RANGE.0);
    let wide = ephemeral(WIDE_RANGE, &reserve_wide.iter().map(|&p| (p, p)).collect::<Vec<_>>());
    let (cap, (wlo, whi)) = (u64::from(ports), WIDE_RANGE);
    let mut first_fix: Option<String> = None;
    // Per server address: servers seen so far and the first one's first source (example blocks).
    let mut groups: HashMap<SocketAddr, (u128, Option<IpAddr>)> = HashMap::new();
    let mut items = Vec::new();
    for (b, be) in config.backends.iter().enumerate() {
        for (s, (d, why)) in be.servers.iter().zip(&demand[b]) {
            let (me, d) = (format!("{}/{}", be.name, s.name), *d);
            let src = sources(s);
            let n = src.len() as u64;
            let (mut worst, mut shared) = (0, BTreeSet::new());
            for ip in &src {
                if let Some((load, names)) = pairs.get(&(*ip, s.address)) {
                    worst = worst.max(*load);
                    shared.extend(names.iter().filter(|x| **x != me).cloned());
                }
            }
            let list = match s.sources.as_slice() {
                [] => "none set, the kernel picks one".to_owned(),
                [one] => one.to_string(),
                many => format!("{}..{}", many[0], many[many.len() - 1]),
            };
            let mut detail = format!(
                "{}: {n} source(s) ({list}) x {ports} ports = {} connections; may receive up to {d} ({why})",
                s.address,
                n * cap
            );
            if !shared.is_empty() {
                let names: Vec<String> = shared.into_iter().collect();
                let _ =
                    write!(detail, "; shares sources and address with {}: up to {worst} per source", names.join(", "));
            }
            let group = groups.entry(s.address).or_insert((0, s.sources.first().copied()));
            let (k, first) = (group.0, group.1);
            group.0 += 1;
            let name = format!("ports {me}");
            let status = grade(worst, cap * 4 / 5, cap);
            if status == Status::Ok {
                items.push(ok(name, detail));
                continue;
            }
            if status == Status::Warn {
                detail.push_str(" (over 80%: little room for TIME_WAIT and bursts)");
            }
            // A block of 2^bits sources, the k-th at this address so the examples do not overlap.
            // Sources (and below, with the wide range) that keep each pair under 80%.
            let need = d.div_ceil((cap * 4 / 5).max(1));
            let bits = need.next_power_of_two().trailing_zeros();
            let loopback = s.address.ip().is_loopback().then_some(IpAddr::from([127, 0, 2, 0]));
            let example = match first.or(loopback) {
                Some(ip) => {
                    let (v, width) = match ip {
                        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
                        IpAddr::V6(v6) => (u128::from(v6), 128),
                    };
                    let start = ((v >> bits).wrapping_add(k)).checked_shl(bits).unwrap_or(0);
                    let ip = match ip {
                        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(start as u32)),
                        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(start)),
                    };
                    format!("source: {ip}/{}", width - bits)
                }
                None => format!("source: a /{} of this host's addresses", 32 - bits),
            };
            let block = 1u64 << bits;
            let wide_need = d.div_ceil((u64::from(wide) * 4 / 5).max(1));
            let mut item = Item::new(status, name, detail)
                .fix(format!("add sources: {need} needed, e.g. {example} ({block} x {ports} = {}); servers at the same address need disjoint sources, each assigned to this host", block * cap));
            let widen = format!(
                "or widen the ephemeral port range to {wlo}-{whi} ({wide} ports: {wide_need} source(s) needed) and reserve the proxy's own ports"
            );
            if let Some(first) = &first_fix {
                item = item.fix(format!("{widen}, as shown for {first}"));
            } else {
                first_fix = Some(format!("ports {me}"));
                item = item.fix(format!("{widen}:")).sysctl("net.ipv4.ip_local_port_range", format!("{wlo} {whi}"));
                if !reserve_wide.is_empty() {
                    item = item.sysctl("net.ipv4.ip_local_reserved_ports", reserve_value(facts, &reserve_wide));
                }
            }
            items.push(item);
        }
    }
    items
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

/// Kernel socket memory for `target` idle connections, vs tcp_mem and vs RAM.
fn memory(plan: &Plan, target: u32, facts: &HostFacts) -> Vec<Item> {
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
    let (sockets, pages, busy) = (2 * u64::from(target), pages_for(target), 2 * u64::from(target) * (r[1] + w[1]));
    let today = match plan.maxconn < target {
        true => format!(
            " ({} at the {} connections the open-files limit allows today)",
            size(pages_for(plan.maxconn) * page),
            plan.maxconn
        ),
        false => String::new(),
    };
    let detail = format!(
        "{target} idle connections = {sockets} sockets x (tcp_rmem min {} + tcp_wmem min {}) = {} = {pages} pages{today} vs tcp_mem {} {} {} (pressure at {}, limit {}). Assumes nearly empty buffers, each socket charged its minimum; with their default buffers filled ({} + {}) they would need {}",
        r[0],
        w[0],
        size(pages * page),
        mem[0],
        mem[1],
        mem[2],
        size(mem[1] * page),
        size(mem[2] * page),
        r[1],
        w[1],
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
    let total = per_conn * u64::from(target);
    let detail = format!(
        "{target} connections x {} (2 sockets: buffer floor + ~{} of kernel structures each) = {} of {} RAM",
        size(per_conn),
        size(SOCKET_OVERHEAD),
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
    }
    vec![tcp, item]
}

/// Ports of `lo..=hi` not in `reserved`.
fn ephemeral((lo, hi): (u16, u16), reserved: &[(u16, u16)]) -> u32 {
    (lo..=hi).filter(|&p| !is_reserved(p, reserved)).count() as u32
}

fn is_reserved(p: u16, reserved: &[(u16, u16)]) -> bool {
    reserved.iter().any(|&(a, b)| (a..=b).contains(&p))
}

/// `[1884, 1880, 1883]` -> `1880,1883-1884` (the kernel's port-list syntax).
fn port_list(mut ports: Vec<u16>) -> String {
    ports.sort_unstable();
    ports.dedup();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ports.len() {
        let mut j = i;
        while j + 1 < ports.len() && ports[j + 1] == ports[j] + 1 {
            j += 1;
        }
        out.push(if i == j { ports[i].to_string() } else { format!("{}-{}", ports[i], ports[j]) });
        i = j + 1;
    }
    out.join(",")
}

fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// Bytes as `312 MiB` or `30.5 GiB`.
fn size(bytes: u64) -> String {
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < 4 {
        v /= 1024.0;
        unit += 1;
    }
    let u = ["B", "KiB", "MiB", "GiB", "TiB"][unit];
    if unit == 0 || v >= 100.0 { format!("{v:.0} {u}") } else { format!("{v:.1} {u}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host with room for everything the test configurations ask.
    fn roomy() -> HostFacts {
        HostFacts {
            kernel: Some("6.12.0-1-amd64".into()),
            nofile: Some(NofileLimit { soft: 8_000_000, hard: 8_000_000 }),
            nr_open: Some(8_000_000),
            file_max: Some(1 << 40),
            files_in_use: Some(1000),
            somaxconn: Some(65535),
            syn_backlog: Some(65535),
            port_range: Some((32768, 60999)),
            reserved_ports: Vec::new(),
            tcp_mem: Some([10_000_000, 15_000_000, 20_000_000]),
            tcp_rmem: Some([4096, 4096, 16 << 20]),
            tcp_wmem: Some([4096, 4096, 16 << 20]),
            page_size: 4096,
            mem_total: Some(256 << 30),
            cpus: vec![0, 1, 2, 3],
            io_uring: Ok(Vec::new()),
            io_uring_disabled: Some(0),
            nonlocal_bind: false,
            unbindable: HashMap::new(),
        }
    }

    /// A configuration: `global` keys (2 workers unless given), extra frontend keys, server lines.
    fn config(global: &str, frontend: &str, servers: &str) -> Config {
        let workers = if global.contains("workers") { "" } else { "workers: 2, " };
        let text = format!(
            "global: {{ {workers}{global} }}\nfrontends:\n  - {{ name: fe, bind: \"127.0.0.1:1880\", backend: be, {frontend} }}\n\
             backends:\n  - name: be\n    servers:\n{servers}"
        );
        crate::config::parse(&text, "t.yaml").unwrap_or_else(|e| panic!("{e}"))
    }

    const ONE: &str = "      - { name: a, address: \"127.0.0.1:1883\", source: 127.0.2.1 }\n";

    fn item<'a>(items: &'a [Item], name: &str) -> &'a Item {
        items.iter().find(|i| i.name == name).unwrap_or_else(|| panic!("no item {name}: {items:#?}"))
    }

    fn fix(i: &Item) -> &str {
        i.fix.as_deref().unwrap_or_else(|| panic!("{} has no fix", i.name))
    }

    #[test]
    fn a_roomy_host_is_all_ok() {
        let (c, f) = (config("maxconn: 100", "", ONE), roomy());
        let items = evaluate(&c, &f);
        let bad: Vec<&Item> = items.iter().filter(|i| i.status != Status::Ok).collect();
        assert!(bad.is_empty(), "{bad:#?}");
        assert_eq!(exit_code(&items), 0);
        let text = render(&c, &f, &items);
        assert!(
            text.starts_with("ringproxy check: t.yaml (1 frontend, 1 backend, 1 server) on Linux 6.12.0"),
            "{text}"
        );
        assert!(text.contains("\nOK    open files"), "{text}");
        assert!(!text.contains("sysctl.d"), "nothing to persist: {text}");
        assert!(text.ends_with(&format!("summary: {} OK, 0 WARN, 0 FAIL\n", items.len())), "{text}");
    }

    #[test]
    fn a_tiny_open_files_limit_fails_with_every_fix() {
        let mut f = roomy();
        f.nofile = Some(NofileLimit { soft: 1000, hard: 1000 });
        f.nr_open = Some(100_000);
        let items = evaluate(&config("maxconn: 100000", "", ONE), &f);
        let files = item(&items, "open files");
        assert_eq!(files.status, Status::Fail);
        assert!(files.detail.contains("hard limit is 1000 -> 2 worker(s) hold 872"), "{}", files.detail);
        let f = fix(files);
        assert!(f.contains("LimitNOFILE=200128"), "{f}");
        assert!(f.contains("\"* hard nofile 200128\""), "{f}");
        assert!(f.contains("global.workers: 230 (230 x 436 >= 100000"), "{f}");
        assert!(f.contains("fs.nr_open raised first"), "{f}");
        let nr_open = item(&items, "fs.nr_open");
        assert_eq!((nr_open.status, fix(nr_open)), (Status::Fail, "sysctl -w fs.nr_open=200128"));
        assert_eq!(exit_code(&items), 2);
    }

    #[test]
    fn the_hard_limit_counts_and_more_workers_than_cpus_is_ok() {
        let mut f = roomy();
        f.nofile = Some(NofileLimit { soft: 1024, hard: 20_000 });
        f.cpus = vec![0, 1];
        let c = config(
            "maxconn: 300000, workers: 32, pin_cpus: false",
            "",
            "      - { name: a, address: \"10.0.0.1:80\", source: 127.0.2.0/28 }\n",
        );
        let items = evaluate(&c, &f);
        let files = item(&items, "open files");
        assert_eq!(files.status, Status::Ok, "{files:#?}");
        assert!(files.detail.contains("soft limit 1024 is raised to it at start"), "{}", files.detail);
        let w = item(&items, "workers");
        assert!(w.status == Status::Ok && w.detail.contains("more workers than CPUs is allowed"), "{w:#?}");
    }

    #[test]
    fn a_small_somaxconn_warns_with_the_sysctl() {
        let mut f = roomy();
        (f.somaxconn, f.syn_backlog) = (Some(128), Some(512));
        let items = evaluate(&config("maxconn: 100", "backlog: 1000", ONE), &f);
        let s = item(&items, "net.core.somaxconn");
        assert_eq!(s.status, Status::Warn);
        assert!(s.detail.contains("backlog fe 1000 at 128"), "{}", s.detail);
        assert_eq!(fix(s), "sysctl -w net.core.somaxconn=1000");
        assert_eq!(fix(item(&items, "tcp_max_syn_backlog")), "sysctl -w net.ipv4.tcp_max_syn_backlog=1000");
        assert_eq!(exit_code(&items), 1);
    }

    #[test]
    fn own_ports_inside_the_ephemeral_range_warn() {
        let mut f = roomy();
        f.reserved_ports = vec![(50000, 50001)];
        f.unbindable.insert("192.0.2.9".parse().unwrap(), "Cannot assign requested address".into());
        let servers =
            "      - { name: a, address: \"127.0.0.1:40001\" }\n      - { name: b, address: \"192.0.2.9:40002\" }\n";
        let c = crate::config::parse(&format!("global: {{ maxconn: 100 }}\nfrontends:\n  - {{ name: fe, bind: [\"0.0.0.0:40000\", \"127.0.0.1:0\"], backend: be }}\nbackends:\n  - name: be\n    servers:\n{servers}"), "t").unwrap();
        let r = evaluate(&c, &f);
        let r = item(&r, "reserved ports");
        assert_eq!(r.status, Status::Warn);
        assert!(r.detail.starts_with("40000-40001 inside ip_local_port_range 32768-60999"), "{}", r.detail);
        // The remote server's port does not matter; what is reserved already stays reserved.
        assert_eq!(fix(r), "sysctl -w net.ipv4.ip_local_reserved_ports=40000-40001,50000-50001");
    }

    #[test]
    fn port_capacity_counts_sources_and_shared_pairs() {
        let six: String = (1..=6)
            .map(|i| {
                format!("      - {{ name: s{i}, address: \"127.0.0.1:{}\", source: 127.0.2.{i} }}\n", 1883 + i / 4)
            })
            .collect();
        let items = evaluate(&config("maxconn: 300000", "", &six), &roomy());
        let s1 = item(&items, "ports be/s1");
        assert_eq!(s1.status, Status::Fail);
        assert_eq!(
            s1.detail,
            "127.0.0.1:1883: 1 source(s) (127.0.2.1) x 28232 ports = 28232 connections; may receive up to 50000 (maxconn 300000 x weight 1/6)"
        );
        assert!(
            fix(s1).contains("add sources: 3 needed, e.g. source: 127.0.2.0/30 (4 x 28232 = 112928)"),
            "{}",
            fix(s1)
        );
        assert!(fix(s1).contains("sysctl -w net.ipv4.ip_local_port_range=\"1024 65535\"\nsysctl -w net.ipv4.ip_local_reserved_ports=1880,1883-1884"), "{}", fix(s1));
        // The second server at the same address gets the next block; it points at the first for the sysctls.
        let s2 = fix(item(&items, "ports be/s2"));
        assert!(s2.contains("source: 127.0.2.4/30") && s2.contains("as shown for ports be/s1"), "{s2}");

        let enough = "      - { name: a, address: \"127.0.0.1:1883\", source: 127.0.2.0/30, maxconn: 90000 }\n      - { name: b, address: \"127.0.0.1:1883\", source: 127.0.3.0/30 }\n";
        let items = evaluate(&config("maxconn: 300000", "", enough), &roomy());
        let a = item(&items, "ports be/a");
        assert_eq!(a.status, Status::Ok, "{a:#?}");
        assert!(a.detail.contains("4 source(s) (127.0.2.0..127.0.2.3) x 28232 ports = 112928 connections; may receive up to 90000 (server maxconn)"), "{}", a.detail);

        // Each alone fits, but both use the one source toward the one address.
        let shared = "      - { name: a, address: \"127.0.0.1:1883\", source: 127.0.2.1 }\n      - { name: b, address: \"127.0.0.1:1883\", source: 127.0.2.1 }\n";
        let items = evaluate(&config("maxconn: 40000", "", shared), &roomy());
        let a = item(&items, "ports be/a");
        assert_eq!(a.status, Status::Fail, "{a:#?}");
        assert!(a.detail.ends_with("shares sources and address with be/b: up to 40000 per source"), "{}", a.detail);
    }

    #[test]
    fn frontend_limits_bound_what_is_sized() {
        let items = evaluate(&config("maxconn: 300000", "maxconn: 1000", ONE), &roomy());
        let a = item(&items, "ports be/a");
        assert!(a.detail.ends_with("may receive up to 1000 (frontend maxconn 1000 x weight 1/1)"), "{}", a.detail);
        assert!(item(&items, "memory").detail.starts_with("1000 connections x "));
    }

    #[test]
    fn unassigned_sources_fail_with_ip_addr_add() {
        let mut f = roomy();
        f.unbindable.insert("192.0.2.77".parse().unwrap(), "Cannot assign requested address (os error 99)".into());
        let c = config(
            "maxconn: 100",
            "",
            "      - { name: a, address: \"192.0.2.1:1883\", source: [127.0.2.1, 192.0.2.77] }\n",
        );
        let items = evaluate(&c, &f);
        let s = item(&items, "source addresses");
        assert_eq!(s.status, Status::Fail);
        assert!(
            s.detail.starts_with("1 of 2 not assigned to this host: 192.0.2.77 (be/a) (Cannot assign"),
            "{}",
            s.detail
        );
        assert!(fix(s).starts_with("ip addr add 192.0.2.77/32 dev lo\n"), "{}", fix(s));
        f.unbindable.clear();
        f.nonlocal_bind = true;
        assert_eq!(item(&evaluate(&c, &f), "source addresses").status, Status::Warn);
    }

    #[test]
    fn io_uring_and_kernel_problems_fail() {
        let mut f = roomy();
        f.io_uring = Err("io_uring_setup failed: Operation not permitted (os error 1)".into());
        f.io_uring_disabled = Some(2);
        f.kernel = Some("5.15.0-91-generic".into());
        let items = evaluate(&config("maxconn: 100", "", ONE), &f);
        assert_eq!(fix(item(&items, "io_uring")), "sysctl -w kernel.io_uring_disabled=0");
        assert_eq!(item(&items, "kernel").status, Status::Fail);
        f.io_uring = Ok(vec!["BIND"]);
        assert!(
            item(&evaluate(&config("maxconn: 100", "", ONE), &f), "io_uring").detail.contains("lacks IORING_OP_BIND")
        );
    }

    #[test]
    fn memory_is_sized_for_the_configured_maxconn() {
        let mut f = roomy();
        (f.mem_total, f.tcp_mem) = (Some(1 << 30), Some([1000, 2000, 3000]));
        f.tcp_rmem = Some([4096, 131072, 6 << 20]);
        let items = evaluate(&config("maxconn: 100000", "", ONE), &f);
        let m = item(&items, "memory");
        assert_eq!(m.status, Status::Fail, "22 KiB x 100000 = 2.1 GiB > 1 GiB: {m:#?}");
        // 1 GiB / 2 / (2 x (4096 + 4096 + 3072)) connections.
        assert!(fix(m).starts_with("global.maxconn: 23831 "), "{}", fix(m));
        let t = item(&items, "tcp memory");
        assert_eq!(t.status, Status::Fail);
        assert!(t.detail.contains("= 200000 sockets x (tcp_rmem min 4096 + tcp_wmem min 4096)"), "{}", t.detail);
        // Sized for the 23831 connections that fit: 2 x 23831 x 8 KiB = 95324 pages.
        let fix = fix(t);
        assert!(fix.contains("for maxconn 23831:\nsysctl -w net.ipv4.tcp_mem=\"95324 142986 190648\""), "{fix}");
        assert!(fix.contains("net.ipv4.tcp_rmem=\"4096 4096 6291456\""), "{fix}");
        let small = evaluate(&config("maxconn: 100", "", ONE), &f);
        assert_eq!(item(&small, "tcp memory").status, Status::Ok);
    }

    #[test]
    fn file_max_counts_two_sockets_per_connection() {
        let mut f = roomy();
        f.file_max = Some(150_000);
        let items = evaluate(&config("maxconn: 100000", "", ONE), &f);
        let i = item(&items, "fs.file-max");
        assert_eq!(i.status, Status::Fail, "{i:#?}");
        assert!(fix(i).starts_with("sysctl -w fs.file-max="), "{}", fix(i));
        let text = render(&config("maxconn: 100000", "", ONE), &f, &items);
        assert!(text.contains("/etc/sysctl.d/90-ringproxy.conf:\n  fs.file-max = "), "{text}");
    }

    #[test]
    fn config_warnings_are_items() {
        let text = "frontends:\n  - { name: fe, bind: \"127.0.0.1:0\", backend: a }\nbackends:\n  - { name: a, servers: [{ name: s, address: \"127.0.0.1:9\" }] }\n  - { name: b, servers: [{ name: s, address: \"127.0.0.1:9\" }] }\n";
        let items = evaluate(&crate::config::parse(text, "t.yaml").unwrap(), &roomy());
        let w = items.iter().find(|i| i.status == Status::Warn).expect("a warning item");
        assert!(w.detail.contains("backend \"b\" is not used"), "{w:#?}");
        assert!(fix(w).starts_with("edit t.yaml:5:"), "{}", fix(w));
    }

    #[test]
    fn port_lists_use_the_kernel_syntax() {
        assert_eq!(port_list(vec![1884, 1880, 1883, 1880]), "1880,1883-1884");
        assert_eq!(ephemeral((100, 109), &[(105, 200), (100, 100)]), 4);
    }
}
