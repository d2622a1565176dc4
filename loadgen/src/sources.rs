//! Source-address lists: parsing `--sources` (comma-separated addresses,
//! `A-B` ranges and CIDR blocks, IPv4 or IPv6) and dealing them out to the
//! worker processes of a split run.
//!
//! Invariants: a parsed list is non-empty, holds no duplicates and keeps the
//! user's order; a list is never larger than [`MAX_SOURCES`] so a typo like
//! `/8` fails fast instead of allocating millions of entries.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, bail};

/// Upper bound on the number of source addresses one run may use.
pub const MAX_SOURCES: usize = 65_536;

/// Parse a `--sources` value such as `127.0.1.1,127.0.1.2`,
/// `127.0.1.1-127.0.1.20` or `127.0.1.0/28`. A CIDR block of IPv4 yields
/// every address in it except the network and broadcast addresses when the
/// block is larger than /31 (on loopback those are usable, but on a real
/// interface they are not, and the same flag value should work on both).
pub fn parse(spec: &str) -> Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let addrs = parse_part(part).with_context(|| {
            format!("bad --sources entry {part:?}: expected an address, A-B range or CIDR block like 127.0.1.0/28")
        })?;
        for a in addrs {
            if seen.insert(a) {
                out.push(a);
            }
            if out.len() > MAX_SOURCES {
                bail!("--sources {spec:?} expands to more than {MAX_SOURCES} addresses; use a smaller range");
            }
        }
    }
    if out.is_empty() {
        bail!("--sources {spec:?} names no address");
    }
    Ok(out)
}

fn parse_part(part: &str) -> Result<Vec<IpAddr>> {
    if let Some((net, bits)) = part.split_once('/') {
        let net: IpAddr = net.parse().context("not an IP address before '/'")?;
        let bits: u32 = bits.parse().context("prefix length is not a number")?;
        return cidr(net, bits);
    }
    if let Some((a, b)) = part.split_once('-') {
        let a: IpAddr = a.trim().parse().context("range start is not an IP address")?;
        let b: IpAddr = b.trim().parse().context("range end is not an IP address")?;
        return range(a, b);
    }
    Ok(vec![part.parse().context("not an IP address")?])
}

fn to_u128(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v) => u128::from(u32::from(v)),
        IpAddr::V6(v) => u128::from(v),
    }
}

fn from_u128(v4: bool, n: u128) -> IpAddr {
    if v4 { IpAddr::V4(Ipv4Addr::from(n as u32)) } else { IpAddr::V6(Ipv6Addr::from(n)) }
}

fn range(a: IpAddr, b: IpAddr) -> Result<Vec<IpAddr>> {
    if a.is_ipv4() != b.is_ipv4() {
        bail!("range mixes IPv4 and IPv6");
    }
    let (lo, hi) = (to_u128(a), to_u128(b));
    if hi < lo {
        bail!("range end is below its start");
    }
    if hi - lo >= MAX_SOURCES as u128 {
        bail!("range holds more than {MAX_SOURCES} addresses");
    }
    Ok((lo..=hi).map(|n| from_u128(a.is_ipv4(), n)).collect())
}

fn cidr(net: IpAddr, bits: u32) -> Result<Vec<IpAddr>> {
    let width = if net.is_ipv4() { 32 } else { 128 };
    if bits > width {
        bail!("prefix /{bits} is longer than {width} bits");
    }
    let host_bits = width - bits;
    if host_bits > 16 {
        bail!("/{bits} holds more than {MAX_SOURCES} addresses");
    }
    let size = 1u128 << host_bits;
    let base = to_u128(net) & !(size - 1);
    let (lo, hi) = if net.is_ipv4() && host_bits >= 2 { (base + 1, base + size - 2) } else { (base, base + size - 1) };
    Ok((lo..=hi).map(|n| from_u128(net.is_ipv4(), n)).collect())
}

/// Check that every source can be used for the targets: same address
/// family as every target, and an address of this host (bindable).
pub fn check_usable(sources: &[IpAddr], targets: &[std::net::SocketAddr]) -> Result<()> {
    for t in targets {
        if let Some(s) = sources.iter().find(|s| s.is_ipv4() != t.is_ipv4()) {
            bail!(
                "source {s} and target {t} are of different address families; use IPv4 sources for IPv4 targets and IPv6 for IPv6"
            );
        }
    }
    for s in sources {
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(std::net::SocketAddr::new(*s, 0)),
            socket2::Type::STREAM,
            None,
        )
        .context("creating a socket to check --sources")?;
        sock.bind(&std::net::SocketAddr::new(*s, 0).into()).with_context(|| {
            format!("source address {s} cannot be bound: it must be an address of this host (on loopback any 127.x.y.z works)")
        })?;
    }
    Ok(())
}

/// The sources child `index` of `count` processes uses. With at least as
/// many sources as processes each child gets a disjoint, round-robin share
/// (so processes never compete for the same source port space); otherwise
/// every child uses the whole list.
pub fn share(all: &[IpAddr], index: usize, count: usize) -> Vec<IpAddr> {
    if count <= 1 || all.len() < count {
        return all.to_vec();
    }
    all.iter().enumerate().filter(|(i, _)| i % count == index).map(|(_, a)| *a).collect()
}

/// Size of the kernel's ephemeral port range (`ip_local_port_range`), the
/// most connections one source address can open to one target.
pub fn local_port_range_size() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = s.split_whitespace().filter_map(|x| x.parse::<u64>().ok());
    let lo = it.next()?;
    let hi = it.next()?;
    Some(hi.saturating_sub(lo) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_range_and_cidr() {
        let v = parse("127.0.1.1, 127.0.1.2").unwrap();
        assert_eq!(v.len(), 2);
        let v = parse("127.0.1.1-127.0.1.20").unwrap();
        assert_eq!(v.len(), 20);
        assert_eq!(v[19], "127.0.1.20".parse::<IpAddr>().unwrap());
        let v = parse("127.0.1.0/28").unwrap();
        assert_eq!(v.len(), 14);
        assert_eq!(v[0], "127.0.1.1".parse::<IpAddr>().unwrap());
        let v = parse("127.0.1.7/32").unwrap();
        assert_eq!(v, vec!["127.0.1.7".parse::<IpAddr>().unwrap()]);
        let v = parse("::1").unwrap();
        assert!(v[0].is_ipv6());
    }

    #[test]
    fn duplicates_collapse_and_errors_explain() {
        assert_eq!(parse("127.0.1.1,127.0.1.1").unwrap().len(), 1);
        assert!(parse("").is_err());
        assert!(parse("127.0.0.0/8").is_err());
        assert!(parse("127.0.1.9-127.0.1.1").is_err());
        let e = format!("{:#}", parse("nonsense").unwrap_err());
        assert!(e.contains("--sources"), "{e}");
    }

    #[test]
    fn share_is_disjoint_when_possible() {
        let all = parse("127.0.1.1-127.0.1.6").unwrap();
        let a = share(&all, 0, 3);
        let b = share(&all, 1, 3);
        let c = share(&all, 2, 3);
        assert_eq!(a.len() + b.len() + c.len(), 6);
        assert!(a.iter().all(|x| !b.contains(x) && !c.contains(x)));
        assert_eq!(share(&all, 3, 10).len(), 6);
    }
}
