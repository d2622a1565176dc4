//! The port items of `ringproxy check`: the proxy's own ports inside the ephemeral range, and
//! whether each server's connections fit in the ports of its (source IP, server address) pairs.
//!
//! One source IP opens at most one connection per ephemeral port toward one server address (the
//! engine binds with IP_BIND_ADDRESS_NO_PORT, so the kernel picks the port per 4-tuple). A server's
//! demand is spread over its sources; servers at the same address with the same source share that
//! pair's ports. Every fix keeps each pair under 80%, leaving room for TIME_WAIT and bursts.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{HostFacts, Item, Status, grade, ok, warn};
use crate::config::{Backend, Config, Server};

/// The port range suggested when a (source, server) pair runs out of ports.
const WIDE_RANGE: (u16, u16) = (1024, 65535);

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

pub(super) fn reserved(config: &Config, facts: &HostFacts, (lo, hi): (u16, u16)) -> Item {
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
/// A source address (`None`: the kernel picks one) toward a server address: one pool of
/// ephemeral ports, shared by every server that uses both.
type Pair = (Option<IpAddr>, SocketAddr);

/// The connections one server may receive, and the limit that says so (`server maxconn`, or
/// `maxconn 300000 x weight 1/6`).
struct Demand {
    conns: u64,
    why: String,
}

/// Whether the connections each server may receive fit in the ports of its (source IP, server
/// address) pairs. Servers with the same address and the same source share that pair's ports.
pub(super) fn port_capacity(config: &Config, facts: &HostFacts, target: u32, ports: u32) -> Vec<Item> {
    let demand: Vec<Vec<Demand>> = config.backends.iter().map(|b| backend_demand(config, b, target)).collect();
    let pairs = pair_loads(config, &demand);
    let wide = WideRange::for_host(config, facts);
    // The first server that needs the wide range shows its sysctls; the others point at it.
    let mut first_fix: Option<String> = None;
    // Per server address: servers seen so far and the first one's first source (example blocks).
    let mut groups: HashMap<SocketAddr, (u128, Option<IpAddr>)> = HashMap::new();
    let mut items = Vec::new();
    for (be, row) in config.backends.iter().zip(&demand) {
        for (s, d) in be.servers.iter().zip(row) {
            let me = format!("{}/{}", be.name, s.name);
            let group = groups.entry(s.address).or_insert((0, s.sources.first().copied()));
            let (k, first) = *group;
            group.0 += 1;
            let (worst, mut detail) = server_ports(s, &me, d, &pairs, ports);
            let name = format!("ports {me}");
            let cap = u64::from(ports);
            let status = grade(worst, cap * 4 / 5, cap);
            if status == Status::Ok {
                items.push(ok(name, detail));
                continue;
            }
            if status == Status::Warn {
                detail.push_str(" (over 80%: little room for TIME_WAIT and bursts)");
            }
            let item = Item::new(status, name, detail).fix(more_sources(s, d.conns, ports, first, k));
            items.push(wide.fix(item, d.conns, facts, &mut first_fix, &me));
        }
    }
    items
}

/// The sources of a server's connections: each configured one, or `None` (the kernel picks).
fn source_slots(s: &Server) -> Vec<Option<IpAddr>> {
    if s.sources.is_empty() { vec![None] } else { s.sources.iter().copied().map(Some).collect() }
}

/// The connections each server of `b` may receive: its own maxconn, else its weight's part of
/// the tightest limit above it (backend, its frontends', or `target`).
fn backend_demand(config: &Config, b: &Backend, target: u32) -> Vec<Demand> {
    let total: u64 = b.servers.iter().map(|s| u64::from(s.weight)).sum();
    let fe = config.frontends.iter().filter(|f| config.backends[f.backend].name == b.name);
    let fe: Option<u64> = fe.map(|f| f.maxconn.map(u64::from)).sum();
    let (limit, of) = match (b.maxconn, fe) {
        (Some(m), _) if m <= target && fe.is_none_or(|f| u64::from(m) <= f) => (m, "backend maxconn"),
        (_, Some(f)) if f <= u64::from(target) => (f as u32, "frontend maxconn"),
        _ => (target, "maxconn"),
    };
    (b.servers.iter())
        .map(|s| match s.maxconn {
            Some(m) => Demand { conns: u64::from(m.min(target)), why: "server maxconn".into() },
            None => Demand {
                conns: (u64::from(limit) * u64::from(s.weight)).div_ceil(total.max(1)),
                why: format!("{of} {limit} x weight {}/{total}", s.weight),
            },
        })
        .collect()
}

/// The connections on each pair (a server's demand spread evenly over its sources), and the
/// servers (`backend/server`) that use it.
fn pair_loads(config: &Config, demand: &[Vec<Demand>]) -> HashMap<Pair, (u64, BTreeSet<String>)> {
    let mut pairs: HashMap<Pair, (u64, BTreeSet<String>)> = HashMap::new();
    for (b, row) in config.backends.iter().zip(demand) {
        for (s, d) in b.servers.iter().zip(row) {
            let src = source_slots(s);
            for ip in &src {
                let e = pairs.entry((*ip, s.address)).or_default();
                e.0 += d.conns.div_ceil(src.len() as u64);
                e.1.insert(format!("{}/{}", b.name, s.name));
            }
        }
    }
    pairs
}

/// The most connections any of the server's pairs carries, and the item's detail: capacity,
/// demand, and the servers it shares pairs with.
fn server_ports(
    s: &Server,
    me: &str,
    d: &Demand,
    pairs: &HashMap<Pair, (u64, BTreeSet<String>)>,
    ports: u32,
) -> (u64, String) {
    let src = source_slots(s);
    let (mut worst, mut shared) = (0, BTreeSet::new());
    for ip in &src {
        if let Some((load, names)) = pairs.get(&(*ip, s.address)) {
            worst = worst.max(*load);
            shared.extend(names.iter().filter(|x| *x != me).cloned());
        }
    }
    let list = match s.sources.as_slice() {
        [] => "none set, the kernel picks one".to_owned(),
        [one] => one.to_string(),
        many => format!("{}..{}", many[0], many[many.len() - 1]),
    };
    let n = src.len() as u64;
    let mut detail = format!(
        "{}: {n} source(s) ({list}) x {ports} ports = {} connections; may receive up to {} ({})",
        s.address,
        n * u64::from(ports),
        d.conns,
        d.why
    );
    if !shared.is_empty() {
        let names: Vec<String> = shared.into_iter().collect();
        let _ = write!(detail, "; shares sources and address with {}: up to {worst} per source", names.join(", "));
    }
    (worst, detail)
}

/// The fix that adds sources: how many keep each pair under 80%, and an example block of that
/// many, the `k`-th at this server address so the examples of servers sharing it do not overlap.
fn more_sources(s: &Server, conns: u64, ports: u32, first: Option<IpAddr>, k: u128) -> String {
    let cap = u64::from(ports);
    let need = conns.div_ceil((cap * 4 / 5).max(1));
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
    format!(
        "add sources: {need} needed, e.g. {example} ({block} x {ports} = {}); servers at the same address need disjoint sources, each assigned to this host",
        block * cap
    )
}

/// The other fix: the widest ephemeral port range, with the proxy's own ports in it reserved.
struct WideRange {
    /// Ports of [`WIDE_RANGE`] left once the proxy's own are reserved.
    ports: u32,
    /// The proxy's own ports inside it (listeners, local servers).
    own: Vec<u16>,
}

impl WideRange {
    fn for_host(config: &Config, facts: &HostFacts) -> WideRange {
        let own = own_ports(config, facts, WIDE_RANGE.0);
        let ports = ephemeral(WIDE_RANGE, &own.iter().map(|&p| (p, p)).collect::<Vec<_>>());
        WideRange { ports, own }
    }

    /// Adds the wide-range fix to `item` (for `conns` connections): with its sysctls for the first
    /// server that needs it (recorded in `first_fix`), pointing at that one for the others.
    fn fix(&self, item: Item, conns: u64, facts: &HostFacts, first_fix: &mut Option<String>, me: &str) -> Item {
        let ((lo, hi), wide) = (WIDE_RANGE, self.ports);
        let need = conns.div_ceil((u64::from(wide) * 4 / 5).max(1));
        let widen = format!(
            "or widen the ephemeral port range to {lo}-{hi} ({wide} ports: {need} source(s) needed) and reserve the proxy's own ports"
        );
        if let Some(first) = first_fix {
            return item.fix(format!("{widen}, as shown for {first}"));
        }
        *first_fix = Some(format!("ports {me}"));
        let mut item = item.fix(format!("{widen}:")).sysctl("net.ipv4.ip_local_port_range", format!("{lo} {hi}"));
        if !self.own.is_empty() {
            item = item.sysctl("net.ipv4.ip_local_reserved_ports", reserve_value(facts, &self.own));
        }
        item
    }
}

/// Ports of `lo..=hi` not in `reserved`.
pub(super) fn ephemeral((lo, hi): (u16, u16), reserved: &[(u16, u16)]) -> u32 {
    (lo..=hi).filter(|&p| !is_reserved(p, reserved)).count() as u32
}

fn is_reserved(p: u16, reserved: &[(u16, u16)]) -> bool {
    reserved.iter().any(|&(a, b)| (a..=b).contains(&p))
}

/// `[1884, 1880, 1883]` -> `1880,1883-1884` (the kernel's port-list syntax).
pub(super) fn port_list(mut ports: Vec<u16>) -> String {
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
