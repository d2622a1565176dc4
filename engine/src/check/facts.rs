//! What `ringproxy check` knows about this host: the only part of the preflight that reads it.
//!
//! [`HostFacts::read`] gathers limits, sysctls, memory, CPUs, an io_uring probe, a binding test
//! per configured IP and what is at the stats socket's path, and never fails: a value that cannot be read is `None` (or an `Err` text for
//! the probe) and the item that needs it says so. Nothing here judges; `items.rs` does, on these
//! facts alone, so tests build synthetic hosts instead of reading this one.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::config::Config;
use crate::host::{self, NofileLimit};
use crate::stats::socket::{self, Occupant};
use crate::sys;

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
    /// net.core.rmem_max / wmem_max: the most SO_RCVBUF / SO_SNDBUF may set.
    pub rmem_max: Option<u64>,
    pub wmem_max: Option<u64>,
    pub page_size: u64,
    pub mem_total: Option<u64>,
    pub cpus: Vec<usize>,
    /// The io_uring probe: opcodes the kernel lacks, or why no ring could be set up.
    pub io_uring: Result<Vec<&'static str>, String>,
    pub io_uring_disabled: Option<u64>,
    /// The io_uring features the engine would use with this configuration, and how chosen.
    pub io_features: Result<(crate::features::IoFeatures, String), String>,
    /// ip_nonlocal_bind is on: binding succeeds for any address, so the binding test proves nothing.
    pub nonlocal_bind: bool,
    /// Configured IPs (sources, server addresses) this host cannot bind to, with the error.
    pub unbindable: HashMap<IpAddr, String>,
    /// What is at `global.stats.socket` now, when it is set.
    pub stats_socket: Option<Occupant>,
}

impl HostFacts {
    /// Replaces what was read of the sysctls by the values a stock kernel starts with on a host
    /// with this RAM (`ringproxy check --sysctl`).
    pub fn stock_sysctls(&mut self) {
        let pages = self.mem_total.unwrap_or(1 << 30) / self.page_size.max(1);
        // fs/file_table.c: about 10% of memory, in 1 KiB units; net/ipv4/tcp.c: tcp_mem from 1/16
        // of the buffer pages.
        let tcp = (pages / 16).max(128);
        self.nr_open = Some(1 << 20);
        self.file_max = Some((self.mem_total.unwrap_or(1 << 30) / 1024 / 10).max(8192));
        self.files_in_use = Some(0);
        self.somaxconn = Some(4096);
        self.syn_backlog = Some(1024);
        self.port_range = Some((32768, 60999));
        self.reserved_ports = Vec::new();
        self.tcp_mem = Some([tcp / 4 * 3, tcp, tcp / 4 * 3 * 2]);
        self.tcp_rmem = Some([4096, 131072, 6291456]);
        self.tcp_wmem = Some([4096, 16384, 4194304]);
        (self.rmem_max, self.wmem_max) = (Some(212992), Some(212992));
    }

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
            kernel: sys::kernel_release(),
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
            rmem_max: host::sysctl1("net.core.rmem_max"),
            wmem_max: host::sysctl1("net.core.wmem_max"),
            page_size: host::page_size(),
            mem_total: host::mem_total(),
            cpus: host::usable_cpus(),
            io_uring: probe_io_uring(),
            io_uring_disabled: host::sysctl1("kernel.io_uring_disabled"),
            io_features: crate::features::effective(config.global.tune.io_features).map_err(|e| e.to_string()),
            nonlocal_bind: nonlocal.iter().any(|n| host::sysctl1(n).unwrap_or(0) != 0),
            unbindable,
            stats_socket: config.global.stats.socket.as_deref().map(socket::occupant),
        }
    }
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
        ("CONNECT", Connect::CODE),
        ("LINK_TIMEOUT", LinkTimeout::CODE),
        ("SPLICE", Splice::CODE),
        ("POLL_ADD", PollAdd::CODE),
        ("SHUTDOWN", Shutdown::CODE),
        ("CLOSE", Close::CODE),
        // Reloads move established connections between rings with it (6.0).
        ("MSG_RING", MsgRingData::CODE),
    ];
    Ok(ops.iter().filter(|(_, c)| !probe.is_supported(*c)).map(|(n, _)| *n).collect())
}
