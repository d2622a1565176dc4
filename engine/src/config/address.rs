//! Addresses as written in the configuration: listener binds, server addresses and source-IP sets.
//!
//! Only literal IP addresses are accepted; host names are never resolved, so a configuration means the
//! same thing on every start and loading it cannot block on DNS. Every function returns a message that
//! names the offending text and the expected form.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The most source addresses one server may list after expanding ranges and CIDR blocks.
pub const MAX_SOURCES_PER_SERVER: usize = 65_536;

/// Parses a listener address: `IP:PORT`, `[IPv6]:PORT`, `*:PORT` or `:PORT` (all IPv4 addresses).
/// Port 0 asks the kernel for an ephemeral port (useful in tests).
pub fn parse_bind(text: &str) -> Result<SocketAddr, String> {
    let t = text.trim();
    let wildcard = t.strip_prefix("*:").or_else(|| t.strip_prefix(':').filter(|p| !p.contains(':')));
    if let Some(port) = wildcard {
        let port = parse_port(port, text, true)?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    }
    parse_socket_addr(t, text, true)
}

/// Parses a server address: `IP:PORT` or `[IPv6]:PORT`, port 1–65535.
pub fn parse_server(text: &str) -> Result<SocketAddr, String> {
    let addr = parse_socket_addr(text.trim(), text, false)?;
    if addr.ip().is_unspecified() {
        return Err(format!("\"{text}\" is the unspecified address; a server needs a real IP address"));
    }
    Ok(addr)
}

fn parse_socket_addr(t: &str, original: &str, allow_port0: bool) -> Result<SocketAddr, String> {
    let (host, port) = if let Some(rest) = t.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("\"{original}\" has an unclosed '['; write IPv6 addresses as \"[::1]:8080\""))?;
        let port =
            after.strip_prefix(':').ok_or_else(|| format!("\"{original}\" has no port; write \"[{host}]:PORT\""))?;
        (host, port)
    } else {
        let (host, port) = t
            .rsplit_once(':')
            .ok_or_else(|| format!("\"{original}\" has no port; write IP:PORT such as 127.0.0.1:1883"))?;
        if host.contains(':') {
            return Err(format!(
                "\"{original}\": IPv6 addresses need brackets, e.g. \"[{host}]:{port}\" (quote it in YAML)"
            ));
        }
        (host, port)
    };
    let ip: IpAddr = host.parse().map_err(|_| {
        if host.chars().any(|c| c.is_ascii_alphabetic()) && !host.contains(':') {
            format!("\"{original}\": \"{host}\" is not an IP address (host names are not resolved; write the IP)")
        } else {
            format!("\"{original}\": \"{host}\" is not an IP address")
        }
    })?;
    if ip.is_ipv6() && !t.starts_with('[') {
        return Err(format!("\"{original}\": IPv6 addresses need brackets"));
    }
    let port = parse_port(port, original, allow_port0)?;
    Ok(SocketAddr::new(ip, port))
}

fn parse_port(text: &str, original: &str, allow_zero: bool) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(0) if !allow_zero => Err(format!("\"{original}\": port 0 is not a valid server port")),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("\"{original}\": \"{text}\" is not a port number (0-65535)")),
    }
}

/// Expands one source-IP term: `IP`, `IP/PREFIX` (every address of the block) or `IP-IP` (inclusive
/// range of one family). Appends to `out`, refusing to grow past [`MAX_SOURCES_PER_SERVER`].
pub fn expand_source(text: &str, out: &mut Vec<IpAddr>) -> Result<(), String> {
    let t = text.trim();
    let (first, count) = if let Some((ip, prefix)) = t.split_once('/') {
        let ip: IpAddr = ip.parse().map_err(|_| format!("source \"{text}\": \"{ip}\" is not an IP address"))?;
        let bits = if ip.is_ipv4() { 32 } else { 128 };
        let prefix: u32 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= bits)
            .ok_or_else(|| format!("source \"{text}\": \"/{prefix}\" is not a prefix length 0-{bits}"))?;
        let host_bits = bits - prefix;
        if host_bits > 16 {
            return Err(too_many(text));
        }
        let mask = if host_bits == 0 { u128::MAX } else { u128::MAX << host_bits };
        (from_u128(ip, to_u128(ip) & mask), 1u128 << host_bits)
    } else if let Some((a, b)) = t.split_once('-') {
        let a: IpAddr = a.trim().parse().map_err(|_| format!("source \"{text}\": \"{a}\" is not an IP address"))?;
        let b: IpAddr = b.trim().parse().map_err(|_| format!("source \"{text}\": \"{b}\" is not an IP address"))?;
        if a.is_ipv4() != b.is_ipv4() {
            return Err(format!("source \"{text}\": a range must stay within one address family"));
        }
        let (lo, hi) = (to_u128(a), to_u128(b));
        if hi < lo {
            return Err(format!("source \"{text}\": the range ends before it starts"));
        }
        (a, hi - lo + 1)
    } else {
        let ip: IpAddr = t
            .parse()
            .map_err(|_| format!("source \"{text}\" is not an IP address, a range (A-B) or a CIDR block (A/N)"))?;
        (ip, 1)
    };
    if out.len() as u128 + count > MAX_SOURCES_PER_SERVER as u128 {
        return Err(too_many(text));
    }
    let base = to_u128(first);
    out.extend((0..count).map(|i| from_u128(first, base + i)));
    Ok(())
}

/// A block of addresses, `IP/PREFIX` (a bare IP is its own /32 or /128), for access lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    base: u128,
    prefix: u8,
    v4: bool,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let t = text.trim();
        let (ip, prefix) = t.split_once('/').map_or((t, None), |(a, p)| (a, Some(p)));
        let ip: IpAddr = ip.parse().map_err(|_| format!("\"{text}\" is not an IP address or a CIDR block (A/N)"))?;
        let bits = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(|| format!("\"{text}\": \"/{p}\" is not a prefix length 0-{bits}"))?,
        };
        Ok(Cidr { base: to_u128(ip) & mask(bits, prefix), prefix, v4: ip.is_ipv4() })
    }

    /// Whether `ip` lies in the block (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let bits = if self.v4 { 32 } else { 128 };
        ip.is_ipv4() == self.v4 && to_u128(ip) & mask(bits, self.prefix) == self.base
    }
}

fn mask(bits: u8, prefix: u8) -> u128 {
    let host = u32::from(bits - prefix);
    let all = if bits == 32 { u128::from(u32::MAX) } else { u128::MAX };
    if host >= 128 { 0 } else { all & (u128::MAX << host) }
}

fn too_many(text: &str) -> String {
    format!("source \"{text}\": more than {MAX_SOURCES_PER_SERVER} addresses for one server")
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4) as u128,
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn from_u128(family: IpAddr, n: u128) -> IpAddr {
    match family {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(n as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_blocks_match_their_addresses_only() {
        let net = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.255.7".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.2.3".parse().unwrap()), "IPv4-mapped counts as IPv4");
        assert!(!net.contains("2001:db8::1".parse().unwrap()));
        let one = Cidr::parse("127.0.0.5").unwrap();
        assert!(one.contains("127.0.0.5".parse().unwrap()) && !one.contains("127.0.0.6".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("192.0.2.1".parse().unwrap()));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:ffff::1".parse().unwrap()) && !v6.contains("2001:db9::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").unwrap_err().contains("prefix length 0-32"));
        assert!(Cidr::parse("host").is_err());
    }

    #[test]
    fn binds() {
        assert_eq!(parse_bind("127.0.0.1:1883").unwrap(), "127.0.0.1:1883".parse().unwrap());
        assert_eq!(parse_bind("[::]:1883").unwrap(), "[::]:1883".parse().unwrap());
        assert_eq!(parse_bind("*:80").unwrap(), "0.0.0.0:80".parse().unwrap());
        assert_eq!(parse_bind(":80").unwrap(), "0.0.0.0:80".parse().unwrap());
        assert_eq!(parse_bind("127.0.0.1:0").unwrap().port(), 0);
        assert!(parse_bind("127.0.0.1").unwrap_err().contains("no port"));
        assert!(parse_bind("::1:80").unwrap_err().contains("brackets"));
        assert!(parse_bind("1.2.3.4:99999").unwrap_err().contains("not a port"));
    }

    #[test]
    fn servers() {
        assert!(parse_server("127.0.0.1:1883").is_ok());
        assert!(parse_server("[::1]:1883").is_ok());
        assert!(parse_server("app1.local:1883").unwrap_err().contains("not resolved"));
        assert!(parse_server("127.0.0.1:0").unwrap_err().contains("port 0"));
        assert!(parse_server("0.0.0.0:80").unwrap_err().contains("unspecified"));
        assert!(parse_server("192.168.8.300:80").unwrap_err().contains("is not an IP address"));
    }

    #[test]
    fn sources() {
        let mut v = Vec::new();
        expand_source("127.0.2.1", &mut v).unwrap();
        expand_source("127.0.3.0/30", &mut v).unwrap();
        expand_source("127.0.4.254-127.0.5.1", &mut v).unwrap();
        let s: Vec<String> = v.iter().map(|ip| ip.to_string()).collect();
        assert_eq!(
            s,
            [
                "127.0.2.1",
                "127.0.3.0",
                "127.0.3.1",
                "127.0.3.2",
                "127.0.3.3",
                "127.0.4.254",
                "127.0.4.255",
                "127.0.5.0",
                "127.0.5.1"
            ]
        );
        let mut v6 = Vec::new();
        expand_source("fd00::1-fd00::3", &mut v6).unwrap();
        assert_eq!(v6.len(), 3);
        assert!(expand_source("10.0.0.0/8", &mut Vec::new()).unwrap_err().contains("more than"));
        assert!(expand_source("10.0.0.5-10.0.0.1", &mut Vec::new()).unwrap_err().contains("ends before"));
        assert!(expand_source("10.0.0.1-fd00::1", &mut Vec::new()).unwrap_err().contains("family"));
        assert!(expand_source("10.0.0.0/33", &mut Vec::new()).unwrap_err().contains("prefix"));
        assert!(expand_source("192.168.8.300", &mut Vec::new()).unwrap_err().contains("not an IP"));
    }
}
