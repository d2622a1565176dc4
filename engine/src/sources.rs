//! Source addresses for server connections: each worker's shard, and the ports left in it.
//!
//! One source IP can open at most `ip_local_port_range` connections to one server address (the
//! kernel picks the port per 4-tuple because we set IP_BIND_ADDRESS_NO_PORT). Several sources
//! multiply that. When a server has at least as many sources as there are workers, the workers get
//! disjoint shards (source i goes to worker i mod W), so they never compete for the same ports;
//! with fewer sources, worker w uses source w mod n. Within its shard a worker picks the source with
//! the fewest connections, skipping sources whose port capacity is used up.

use std::net::{IpAddr, SocketAddr};

use socket2::SockAddr;

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

/// What one worker's connect chains need of one server: the block of addresses its ring keeps
/// for it — the server's address, then the worker's sources (port 0) in shard order — and the
/// shard. Made before the worker takes the server: at start on its own thread, and for `add
/// server` on the thread that asks, so that a server with a /16 of sources does not hold up the
/// worker's loop while 32,768 addresses are made and ordered.
pub struct ServerAddrs {
    pub block: Box<[SockAddr]>,
    pub sources: SourceShard,
}

impl ServerAddrs {
    /// Worker `worker`'s (of `workers`) for a server at `address` with `sources`, each source
    /// giving `capacity` ports toward it.
    pub fn new(address: SocketAddr, sources: &[IpAddr], worker: usize, workers: usize, capacity: u32) -> ServerAddrs {
        let ips = shard(sources.len(), worker, workers).into_iter().map(|i| sources[i]).collect();
        let sources = SourceShard::new(ips, capacity);
        let block = std::iter::once(address)
            .chain(sources.ips.iter().map(|&ip| SocketAddr::new(ip, 0)))
            .map(SockAddr::from)
            .collect();
        ServerAddrs { block, sources }
    }

    /// Where the server's address is once the ring keeps the block as number `block`.
    pub fn dest(block: u32) -> AddrId {
        AddrId { block, index: 0 }
    }

    /// Where the address of source `i` of the shard is, likewise.
    pub fn source(block: u32, i: usize) -> AddrId {
        AddrId { block, index: 1 + i as u32 }
    }
}

/// One worker's sources toward one server.
///
/// Picking is O(log n) in the shard's sources, not O(n): a `source` of a /16 gives a worker tens
/// of thousands of them, and a pick is made per connect. The sources are kept in a binary min-heap
/// on (connections, last pick, index): its root is the least used source, and among equally used
/// ones the least recently picked, so they take turns as in a round robin. A root whose ports are
/// used up means every source's are.
pub struct SourceShard {
    pub ips: Vec<IpAddr>,
    pub active: Vec<u32>,
    /// Ports available per source toward this server.
    pub capacity: u32,
    /// When each source was last picked (on `clock`), 0 never.
    picked: Vec<u64>,
    clock: u64,
    /// Source indices, a min-heap on `key`.
    heap: Vec<u32>,
    /// Where each source is in `heap`.
    slot: Vec<u32>,
    /// (ip, index) sorted by ip, to find a moved-in connection's source; empty for a small shard.
    by_ip: Vec<(IpAddr, u32)>,
}

/// Above this many sources a shard finds an address by binary search instead of a scan.
const SCAN_MAX: usize = 16;

impl SourceShard {
    /// `ips` beyond 65,535 are left out: a connection records its source's index in 16 bits, and
    /// only a single worker with a full /16 (65,536 sources) gets that many.
    pub fn new(mut ips: Vec<IpAddr>, capacity: u32) -> SourceShard {
        ips.truncate(usize::from(u16::MAX));
        let n = ips.len();
        let mut by_ip = Vec::new();
        if n > SCAN_MAX {
            by_ip = ips.iter().enumerate().map(|(i, &ip)| (ip, i as u32)).collect();
            by_ip.sort_unstable();
        }
        // Indices in order, all unused and never picked: already a heap.
        SourceShard {
            ips,
            active: vec![0; n],
            capacity,
            picked: vec![0; n],
            clock: 0,
            heap: (0..n as u32).collect(),
            slot: (0..n as u32).collect(),
            by_ip,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ips.is_empty()
    }

    /// The least used source with ports left, or `None` when every source is exhausted.
    pub fn pick(&mut self) -> Option<usize> {
        let &root = self.heap.first()?;
        let b = root as usize;
        if self.active[b] >= self.capacity {
            return None;
        }
        self.clock += 1;
        self.picked[b] = self.clock;
        self.active[b] += 1;
        self.sift_down(0);
        Some(b)
    }

    /// A connection moved in from another engine already has a port from `ip`: counted against
    /// that source, if it is one of this shard's (its index).
    pub fn adopt(&mut self, ip: IpAddr) -> Option<usize> {
        let i = if self.by_ip.is_empty() {
            self.ips.iter().position(|&x| x == ip)?
        } else {
            let k = self.by_ip.binary_search_by(|&(x, _)| x.cmp(&ip)).ok()?;
            self.by_ip[k].1 as usize
        };
        self.active[i] += 1;
        self.sift_down(self.slot[i] as usize);
        Some(i)
    }

    pub fn release(&mut self, i: usize) {
        if self.active[i] > 0 {
            self.active[i] -= 1;
            self.sift_up(self.slot[i] as usize);
        }
    }

    /// Whether a connection can get a source here (or needs none).
    pub fn remaining_or_any(&self) -> bool {
        self.heap.first().is_none_or(|&root| self.active[root as usize] < self.capacity)
    }

    /// Ports still available in this shard.
    pub fn remaining(&self) -> u64 {
        self.active.iter().map(|&a| u64::from(self.capacity.saturating_sub(a))).sum()
    }

    fn key(&self, i: u32) -> (u32, u64, u32) {
        (self.active[i as usize], self.picked[i as usize], i)
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        self.slot[self.heap[a] as usize] = a as u32;
        self.slot[self.heap[b] as usize] = b as u32;
    }

    fn sift_up(&mut self, mut at: usize) {
        while at > 0 {
            let parent = (at - 1) / 2;
            if self.key(self.heap[at]) >= self.key(self.heap[parent]) {
                break;
            }
            self.swap(at, parent);
            at = parent;
        }
    }

    fn sift_down(&mut self, mut at: usize) {
        let n = self.heap.len();
        loop {
            let (l, r) = (2 * at + 1, 2 * at + 2);
            let mut least = at;
            if l < n && self.key(self.heap[l]) < self.key(self.heap[least]) {
                least = l;
            }
            if r < n && self.key(self.heap[r]) < self.key(self.heap[least]) {
                least = r;
            }
            if least == at {
                break;
            }
            self.swap(at, least);
            at = least;
        }
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
        // A datagram socket: the kernel checks a bind's address the same way for every protocol
        // (inet_bind), and makes and frees one faster than a TCP socket (`add server` with a /16,
        // 65,536 probes: 0.69 s against 0.78 s, most of it making and freeing the sockets).
        let sock = Socket::new(domain, Type::DGRAM, None).map_err(|e| (ip, e))?;
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

    /// Two workers' blocks for one server: each has the server's address and its own half of the
    /// sources (disjoint, together all of them); fewer sources than workers are shared.
    #[test]
    fn each_worker_has_its_block_of_the_servers_address_and_its_own_sources() {
        let server: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        let all: Vec<IpAddr> = (1..=5).map(|i| IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 1, i])).collect();
        let [a, b] = [0, 1].map(|w| ServerAddrs::new(server, &all, w, 2, 100));
        assert_eq!(a.sources.ips, [all[0], all[2], all[4]]);
        assert_eq!(b.sources.ips, [all[1], all[3]]);
        for s in [&a, &b] {
            let addrs: Vec<_> = s.block.iter().map(|a| a.as_socket().unwrap()).collect();
            let want: Vec<_> =
                std::iter::once(server).chain(s.sources.ips.iter().map(|&ip| SocketAddr::new(ip, 0))).collect();
            assert_eq!(addrs, want);
        }
        let one = ServerAddrs::new(server, &all[..1], 1, 2, 100);
        assert_eq!(one.sources.ips, [all[0]], "fewer sources than workers: shared");
        assert_eq!(ServerAddrs::new(server, &[], 1, 2, 100).block.len(), 1, "no sources: the server's address");
    }

    #[test]
    fn picks_least_used_and_respects_capacity() {
        let ips = vec!["127.0.2.1".parse().unwrap(), "127.0.2.2".parse().unwrap()];
        let mut s = SourceShard::new(ips, 2);
        let picks: Vec<usize> = (0..4).map(|_| s.pick().unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 0, 1]);
        assert_eq!(s.pick(), None, "both sources are out of ports");
        assert_eq!(s.remaining(), 0);
        s.release(1);
        assert_eq!(s.pick(), Some(1));
    }

    fn shard_of(n: usize, capacity: u32) -> SourceShard {
        let ips = (0..n).map(|i| IpAddr::from([10, 9, (i >> 8) as u8, i as u8])).collect();
        SourceShard::new(ips, capacity)
    }

    /// The heap picks exactly what a scan of every source would: the least used with ports left,
    /// the least recently picked of equals (ties never picked: the lowest index). Picks, releases
    /// and moved-in connections in a pseudo-random order, on small and large shards.
    #[test]
    fn picks_are_those_of_a_scan_of_every_source() {
        for (n, capacity) in [(1, 3), (2, 2), (5, 4), (16, 3), (17, 3), (300, 2)] {
            let mut s = shard_of(n, capacity);
            let (mut active, mut picked, mut clock) = (vec![0u32; n], vec![0u64; n], 0u64);
            let mut held: Vec<usize> = Vec::new();
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            for step in 0..20 * n * capacity as usize {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                match x % 8 {
                    0..=3 => {
                        let want = (0..n).filter(|&i| active[i] < capacity).min_by_key(|&i| (active[i], picked[i], i));
                        assert_eq!(s.pick(), want, "n {n}, step {step}");
                        if let Some(i) = want {
                            clock += 1;
                            (active[i], picked[i]) = (active[i] + 1, clock);
                            held.push(i);
                        }
                    }
                    4..=6 if !held.is_empty() => {
                        let i = held.swap_remove((x >> 8) as usize % held.len());
                        s.release(i);
                        active[i] -= 1;
                    }
                    _ => {
                        let i = (x >> 8) as usize % n;
                        assert_eq!(s.adopt(s.ips[i]), Some(i), "n {n}, step {step}");
                        active[i] += 1;
                        held.push(i);
                    }
                }
                assert_eq!(s.active, active, "n {n}, step {step}");
                assert_eq!(s.remaining_or_any(), active.iter().any(|&a| a < capacity), "n {n}, step {step}");
            }
            assert_eq!(s.adopt(IpAddr::from([10, 8, 0, 0])), None, "not one of the shard's");
        }
    }

    /// A worker with every source of a /16 keeps 65,535 (a connection's index of its source is 16
    /// bits), and picks among them by the heap (a scan of every source would make these million
    /// picks take minutes).
    #[test]
    fn a_shard_of_a_full_slash_16_keeps_65535_sources() {
        let server: SocketAddr = "10.1.2.3:1883".parse().unwrap();
        let all: Vec<IpAddr> = (0..65_536).map(|i| IpAddr::from([10, 9, (i >> 8) as u8, i as u8])).collect();
        let ServerAddrs { block, sources: mut s } = ServerAddrs::new(server, &all, 0, 1, 28_232);
        assert_eq!(s.ips.len(), 65_535);
        // The ring's block: the server's address, then each kept source with port 0, in order.
        assert_eq!(block.len(), 65_536);
        assert_eq!(block[0].as_socket(), Some(server));
        for (i, ip) in s.ips.iter().enumerate() {
            assert_eq!(block[ServerAddrs::source(7, i).index as usize].as_socket(), Some(SocketAddr::new(*ip, 0)));
        }
        assert_eq!(ServerAddrs::dest(7), AddrId { block: 7, index: 0 });
        let first: Vec<usize> = (0..65_535).map(|_| s.pick().unwrap()).collect();
        assert_eq!(first, (0..65_535).collect::<Vec<_>>(), "each source once, in order");
        for k in 0..1_000_000 {
            let i = s.pick().unwrap();
            s.release(i);
            if k == 0 {
                assert_eq!(i, 0, "all at 1: the least recently picked");
            }
        }
        assert!(s.active.iter().all(|&a| a == 1));
    }
}
