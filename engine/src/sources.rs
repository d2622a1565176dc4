//! Source addresses for server connections: each worker's shard, and the ports left in it.
//!
//! One source IP can open at most `ip_local_port_range` connections to one server address (the
//! kernel picks the port per 4-tuple because we set IP_BIND_ADDRESS_NO_PORT). Several sources
//! multiply that. When a server has at least as many sources as there are workers, the workers get
//! disjoint shards (source i goes to worker i mod W), so they never compete for the same ports;
//! with fewer sources, worker w uses source w mod n. Within its shard a worker picks the source with
//! the fewest connections, skipping sources whose port capacity is used up.

use std::net::IpAddr;

use crate::worker::ring::AddrId;

/// Indices (into the server's source list) that worker `w` of `workers` uses.
pub fn shard(sources: usize, w: usize, workers: usize) -> Vec<usize> {
    if sources == 0 {
        Vec::new()
    } else if sources >= workers {
        (w..sources).step_by(workers).collect()
    } else {
        vec![w % sources]
    }
}

/// One worker's sources toward one server.
pub struct SourceShard {
    pub ips: Vec<IpAddr>,
    pub addrs: Vec<AddrId>,
    pub active: Vec<u32>,
    /// Ports available per source toward this server.
    pub capacity: u32,
    rotor: usize,
}

impl SourceShard {
    pub fn new(ips: Vec<IpAddr>, addrs: Vec<AddrId>, capacity: u32) -> SourceShard {
        let n = ips.len();
        SourceShard { ips, addrs, active: vec![0; n], capacity, rotor: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.ips.is_empty()
    }

    /// The least used source with ports left, or `None` when every source is exhausted.
    pub fn pick(&mut self) -> Option<usize> {
        let n = self.ips.len();
        let mut best: Option<usize> = None;
        for k in 0..n {
            let i = (self.rotor + k) % n;
            if self.active[i] < self.capacity && best.is_none_or(|b| self.active[i] < self.active[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        self.rotor = (b + 1) % n;
        self.active[b] += 1;
        Some(b)
    }

    /// A connection moved in from another engine already has a port from `ip`: counted against
    /// that source, if it is one of this shard's (its index).
    pub fn adopt(&mut self, ip: IpAddr) -> Option<usize> {
        let i = self.ips.iter().position(|&x| x == ip)?;
        self.active[i] += 1;
        Some(i)
    }

    pub fn release(&mut self, i: usize) {
        self.active[i] = self.active[i].saturating_sub(1);
    }

    /// Whether a connection can get a source here (or needs none).
    pub fn remaining_or_any(&self) -> bool {
        self.is_empty() || self.active.iter().any(|&a| a < self.capacity)
    }

    /// Ports still available in this shard.
    pub fn remaining(&self) -> u64 {
        self.active.iter().map(|&a| u64::from(self.capacity.saturating_sub(a))).sum()
    }
}

/// Checks that every source address is assigned to this host (binding to it works), so a typo or a
/// missing `ip addr add` is reported at start instead of as failed connections.
pub fn verify_local(ips: impl IntoIterator<Item = IpAddr>) -> Result<(), (IpAddr, std::io::Error)> {
    use socket2::{Domain, Socket, Type};
    let mut seen = std::collections::HashSet::new();
    for ip in ips {
        if !seen.insert(ip) {
            continue;
        }
        let domain = if ip.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
        let sock = Socket::new(domain, Type::STREAM, None).map_err(|e| (ip, e))?;
        // Without IP_BIND_ADDRESS_NO_PORT this probe would reserve an ephemeral port per source.
        crate::sys::set_bind_address_no_port(&sock).map_err(|e| (ip, e))?;
        sock.bind(&std::net::SocketAddr::new(ip, 0).into()).map_err(|e| (ip, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_disjoint_when_there_are_enough_sources() {
        assert_eq!(shard(6, 0, 2), vec![0, 2, 4]);
        assert_eq!(shard(6, 1, 2), vec![1, 3, 5]);
        assert_eq!(shard(1, 1, 2), vec![0]);
        assert_eq!(shard(3, 4, 8), vec![1]);
        assert!(shard(0, 0, 2).is_empty());
    }

    #[test]
    fn loopback_sources_are_local_and_others_are_not() {
        assert!(verify_local(["127.0.2.1".parse().unwrap(), "127.0.2.2".parse().unwrap()]).is_ok());
        let (ip, e) = verify_local(["192.0.2.77".parse().unwrap()]).unwrap_err();
        assert_eq!(ip.to_string(), "192.0.2.77");
        assert_eq!(e.raw_os_error(), Some(libc::EADDRNOTAVAIL));
    }

    #[test]
    fn picks_least_used_and_respects_capacity() {
        let ips = vec!["127.0.2.1".parse().unwrap(), "127.0.2.2".parse().unwrap()];
        let mut s = SourceShard::new(ips, vec![AddrId(0), AddrId(1)], 2);
        let picks: Vec<usize> = (0..4).map(|_| s.pick().unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 0, 1]);
        assert_eq!(s.pick(), None, "both sources are out of ports");
        assert_eq!(s.remaining(), 0);
        s.release(1);
        assert_eq!(s.pick(), Some(1));
    }
}
