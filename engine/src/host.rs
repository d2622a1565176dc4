//! Facts about this host that sizing and the preflight depend on: open-file limits, sysctls, CPUs.
//!
//! Reading never fails hard: a value that cannot be read is `None` and callers say so. The only
//! mutation is [`raise_nofile`], which lifts the soft RLIMIT_NOFILE to the hard limit.

use std::fs;
use std::path::Path;

use crate::sys;

/// The soft and hard RLIMIT_NOFILE of this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NofileLimit {
    pub soft: u64,
    pub hard: u64,
}

/// Current RLIMIT_NOFILE.
pub fn nofile() -> std::io::Result<NofileLimit> {
    let (soft, hard) = sys::nofile()?;
    Ok(NofileLimit { soft, hard })
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and returns the limits now in force.
pub fn raise_nofile() -> std::io::Result<NofileLimit> {
    let cur = nofile()?;
    if cur.soft < cur.hard {
        sys::set_nofile(cur.hard, cur.hard)?;
    }
    nofile()
}

/// Reads a sysctl by its dotted name (`net.core.somaxconn`) as whitespace-separated integers.
pub fn sysctl(name: &str) -> Option<Vec<u64>> {
    let path = Path::new("/proc/sys").join(name.replace('.', "/"));
    let text = fs::read_to_string(path).ok()?;
    text.split_whitespace().map(|t| t.parse().ok()).collect()
}

/// Reads a single-valued sysctl.
pub fn sysctl1(name: &str) -> Option<u64> {
    sysctl(name).and_then(|v| v.first().copied())
}

/// `net.ipv4.ip_local_port_range` as an inclusive (low, high) pair.
pub fn local_port_range() -> Option<(u16, u16)> {
    let v = sysctl("net.ipv4.ip_local_port_range")?;
    match v.as_slice() {
        [lo, hi] if lo <= hi && *hi <= 65535 => Some((*lo as u16, *hi as u16)),
        _ => None,
    }
}

/// `net.ipv4.ip_local_reserved_ports` as inclusive ranges (`"1880,8000-8010"`).
pub fn reserved_ports() -> Vec<(u16, u16)> {
    let text = fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports").unwrap_or_default();
    parse_port_list(&text)
}

/// Parses the kernel's port-list syntax: `1,5-9,22`.
pub fn parse_port_list(text: &str) -> Vec<(u16, u16)> {
    text.trim()
        .split(',')
        .filter(|t| !t.trim().is_empty())
        .filter_map(|t| match t.trim().split_once('-') {
            Some((a, b)) => Some((a.trim().parse().ok()?, b.trim().parse().ok()?)),
            None => {
                let p = t.trim().parse().ok()?;
                Some((p, p))
            }
        })
        .collect()
}

/// How many ephemeral ports one (source IP, destination address) pair can use: the width of
/// ip_local_port_range minus the reserved ports inside it.
pub fn ephemeral_ports() -> Option<u32> {
    let (lo, hi) = local_port_range()?;
    Some(ports_left(lo, hi, &reserved_ports()))
}

/// Ports in `[lo, hi]` not covered by any of `reserved` (ranges may overlap).
pub fn ports_left(lo: u16, hi: u16, reserved: &[(u16, u16)]) -> u32 {
    let mut taken = vec![false; (hi - lo) as usize + 1];
    for &(a, b) in reserved {
        for p in a.max(lo)..=b.min(hi) {
            taken[(p - lo) as usize] = true;
        }
    }
    taken.iter().filter(|t| !**t).count() as u32
}

/// CPUs this process may run on, in order.
pub fn usable_cpus() -> Vec<usize> {
    match core_affinity::get_core_ids() {
        Some(ids) if !ids.is_empty() => ids.into_iter().map(|c| c.id).collect(),
        _ => (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect(),
    }
}

/// Page size in bytes (for tcp_mem, which counts pages).
pub fn page_size() -> u64 {
    sys::page_size().unwrap_or(4096)
}

/// Total memory in bytes, from /proc/meminfo.
pub fn mem_total() -> Option<u64> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_reserved_ranges_count_once() {
        assert_eq!(ports_left(1000, 1999, &[(1100, 1199), (1150, 1249), (3000, 4000)]), 850);
        assert_eq!(ports_left(1000, 1000, &[(1000, 1000)]), 0);
    }

    #[test]
    fn port_lists() {
        assert_eq!(parse_port_list("1880,8000-8010\n"), vec![(1880, 1880), (8000, 8010)]);
        assert!(parse_port_list("\n").is_empty());
    }

    #[test]
    fn reads_this_host() {
        let l = raise_nofile().unwrap();
        assert_eq!(l.soft, l.hard, "the soft limit is raised to the hard limit");
        assert!(sysctl1("net.core.somaxconn").is_some());
        let (lo, hi) = local_port_range().unwrap();
        assert!(lo <= hi);
        assert!(ephemeral_ports().unwrap() <= (hi - lo) as u32 + 1);
        assert!(!usable_cpus().is_empty());
    }
}
