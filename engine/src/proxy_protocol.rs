//! The PROXY protocol (HAProxy's spec, versions 1 and 2): parsing a header a client sends us
//! (`accept_proxy`) and writing one to a server (`send_proxy`).
//!
//! Parsing is total and strict: any input yields a header, "need more bytes", or an error saying
//! what is wrong; nothing panics, nothing reads past the input. A header longer than
//! [`MAX_HEADER`] is refused (v2 TLVs included), so a client cannot make us wait for or hold more.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Longest header accepted: v1 is at most 107 bytes; v2 is 16 bytes plus addresses and TLVs.
pub const MAX_HEADER: usize = 1024;
/// Longest v1 line, CRLF included (spec).
const MAX_V1: usize = 107;
const V2_SIG: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Bytes the header occupies at the start of the stream.
    pub len: usize,
    /// The original client and the address it connected to; `None` for v1 `UNKNOWN`, v2 `LOCAL`
    /// and v2 `UNSPEC` (health checks from the previous proxy, or non-IP transports).
    pub source: Option<SocketAddr>,
    pub dest: Option<SocketAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The bytes so far are a valid beginning; read more.
    Incomplete,
    Done(Header),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("PROXY v1 header longer than 107 bytes")]
    V1TooLong,
    #[error("malformed PROXY v1 header: {0}")]
    V1(&'static str),
    #[error("unsupported PROXY v2 version or command byte {0:#04x}")]
    V2Command(u8),
    #[error("unsupported PROXY v2 address family/transport {0:#04x}")]
    V2Family(u8),
    #[error("PROXY v2 header of {0} bytes is over the {MAX_HEADER}-byte limit")]
    V2TooLong(usize),
    #[error("PROXY v2 address block shorter than its family needs")]
    V2Short,
}

/// Parses the start of a stream.
pub fn parse(buf: &[u8]) -> Result<Parsed, HeaderError> {
    if buf.is_empty() {
        return Ok(Parsed::Incomplete);
    }
    if buf[0] == b'P' {
        return parse_v1(buf);
    }
    if buf[0] == V2_SIG[0] {
        return parse_v2(buf);
    }
    Err(HeaderError::NotProxy)
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, HeaderError> {
    let prefix = b"PROXY ";
    let n = buf.len().min(prefix.len());
    if buf[..n] != prefix[..n] {
        return Err(HeaderError::NotProxy);
    }
    let Some(end) = buf.iter().take(MAX_V1).position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_V1 { Err(HeaderError::V1TooLong) } else { Ok(Parsed::Incomplete) };
    };
    if end == 0 || buf[end - 1] != b'\r' {
        return Err(HeaderError::V1("line does not end with CRLF"));
    }
    let line = std::str::from_utf8(&buf[prefix.len()..end - 1]).map_err(|_| HeaderError::V1("not ASCII"))?;
    let len = end + 1;
    let mut parts = line.split(' ');
    let proto = parts.next().unwrap_or("");
    if proto == "UNKNOWN" {
        return Ok(Parsed::Done(Header { len, source: None, dest: None }));
    }
    let v6 = match proto {
        "TCP4" => false,
        "TCP6" => true,
        _ => return Err(HeaderError::V1("protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    let fields: Vec<&str> = parts.collect();
    let [src, dst, sport, dport] = fields.as_slice() else {
        return Err(HeaderError::V1("expected source, destination and two ports"));
    };
    let ip = |s: &str| -> Result<IpAddr, HeaderError> {
        let ip: IpAddr = s.parse().map_err(|_| HeaderError::V1("bad address"))?;
        if ip.is_ipv6() != v6 {
            return Err(HeaderError::V1("address does not match the protocol"));
        }
        Ok(ip)
    };
    let port = |s: &str| -> Result<u16, HeaderError> {
        // The spec forbids leading zeros and signs; "0" itself is a valid port number.
        if s.is_empty() || (s.len() > 1 && s.starts_with('0')) || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HeaderError::V1("bad port"));
        }
        s.parse().map_err(|_| HeaderError::V1("bad port"))
    };
    Ok(Parsed::Done(Header {
        len,
        source: Some(SocketAddr::new(ip(src)?, port(sport)?)),
        dest: Some(SocketAddr::new(ip(dst)?, port(dport)?)),
    }))
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, HeaderError> {
    let n = buf.len().min(V2_SIG.len());
    if buf[..n] != V2_SIG[..n] {
        return Err(HeaderError::NotProxy);
    }
    if buf.len() < 16 {
        return Ok(Parsed::Incomplete);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 || ver_cmd & 0x0F > 1 {
        return Err(HeaderError::V2Command(ver_cmd));
    }
    let fam = buf[13];
    let addr_len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let len = 16 + addr_len;
    if len > MAX_HEADER {
        return Err(HeaderError::V2TooLong(len));
    }
    if buf.len() < len {
        return Ok(Parsed::Incomplete);
    }
    let local = ver_cmd & 0x0F == 0;
    let a = &buf[16..len];
    let (source, dest) = match fam {
        0x00 => (None, None),
        0x11 => {
            if a.len() < 12 {
                return Err(HeaderError::V2Short);
            }
            let src = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            let dst = Ipv4Addr::new(a[4], a[5], a[6], a[7]);
            (
                Some(SocketAddr::new(src.into(), u16::from_be_bytes([a[8], a[9]]))),
                Some(SocketAddr::new(dst.into(), u16::from_be_bytes([a[10], a[11]]))),
            )
        }
        0x21 => {
            if a.len() < 36 {
                return Err(HeaderError::V2Short);
            }
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s.copy_from_slice(&a[0..16]);
            d.copy_from_slice(&a[16..32]);
            (
                Some(SocketAddr::new(Ipv6Addr::from(s).into(), u16::from_be_bytes([a[32], a[33]]))),
                Some(SocketAddr::new(Ipv6Addr::from(d).into(), u16::from_be_bytes([a[34], a[35]]))),
            )
        }
        // UDP and Unix sockets are not TCP connections we can stand in for.
        other if !local => return Err(HeaderError::V2Family(other)),
        _ => (None, None),
    };
    if local {
        return Ok(Parsed::Done(Header { len, source: None, dest: None }));
    }
    Ok(Parsed::Done(Header { len, source, dest }))
}

/// Writes a v1 header for a connection from `src` to `dst` into `out`; returns its length.
/// Mixed families (an IPv4 client on an IPv6 listener) are written as IPv6.
pub fn write_v1(src: SocketAddr, dst: SocketAddr, out: &mut Vec<u8>) -> usize {
    use std::io::Write;
    let start = out.len();
    let (s, d) = same_family(src, dst);
    let proto = if s.is_ipv4() { "TCP4" } else { "TCP6" };
    let _ = write!(out, "PROXY {proto} {} {} {} {}\r\n", s.ip(), d.ip(), s.port(), d.port());
    out.len() - start
}

/// Writes a v2 PROXY command header (no TLVs); returns its length.
pub fn write_v2(src: SocketAddr, dst: SocketAddr, out: &mut Vec<u8>) -> usize {
    let start = out.len();
    let (s, d) = same_family(src, dst);
    out.extend_from_slice(&V2_SIG);
    out.push(0x21);
    match (s.ip(), d.ip()) {
        (IpAddr::V4(si), IpAddr::V4(di)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&si.octets());
            out.extend_from_slice(&di.octets());
        }
        (si, di) => {
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&to_v6(si).octets());
            out.extend_from_slice(&to_v6(di).octets());
        }
    }
    out.extend_from_slice(&s.port().to_be_bytes());
    out.extend_from_slice(&d.port().to_be_bytes());
    out.len() - start
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    if src.is_ipv4() == dst.is_ipv4() {
        (src, dst)
    } else {
        (SocketAddr::new(to_v6(src.ip()).into(), src.port()), SocketAddr::new(to_v6(dst.ip()).into(), dst.port()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_round_trip_and_prefixes() {
        let mut b = Vec::new();
        let n = write_v1(sa("10.1.2.3:5555"), sa("192.168.0.1:443"), &mut b);
        assert_eq!(&b[..], b"PROXY TCP4 10.1.2.3 192.168.0.1 5555 443\r\n");
        b.extend_from_slice(b"payload");
        let want = Header { len: n, source: Some(sa("10.1.2.3:5555")), dest: Some(sa("192.168.0.1:443")) };
        assert_eq!(parse(&b), Ok(Parsed::Done(want)));
        for k in 0..n {
            assert_eq!(parse(&b[..k]), Ok(Parsed::Incomplete), "prefix of {k} bytes");
        }
        let mut b = Vec::new();
        write_v1(sa("[2001:db8::1]:1"), sa("[::1]:2"), &mut b);
        assert_eq!(&b[..], b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n");
        assert!(matches!(parse(&b), Ok(Parsed::Done(h)) if h.source == Some(sa("[2001:db8::1]:1"))));
        assert_eq!(parse(b"PROXY UNKNOWN\r\nGET"), Ok(Parsed::Done(Header { len: 15, source: None, dest: None })));
    }

    #[test]
    fn v1_errors() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(HeaderError::NotProxy));
        assert_eq!(parse(b"PROXZ"), Err(HeaderError::NotProxy));
        assert!(matches!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"), Err(HeaderError::V1(_))));
        assert!(matches!(parse(b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n"), Err(HeaderError::V1(_))));
        assert!(matches!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n"), Err(HeaderError::V1(_))));
        assert!(matches!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 2\r\n"), Err(HeaderError::V1(_))));
        assert!(matches!(parse(b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n"), Err(HeaderError::V1(_))));
        assert!(matches!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"), Err(HeaderError::V1(_))));
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert_eq!(parse(&long), Err(HeaderError::V1TooLong));
    }

    #[test]
    fn v2_round_trip_and_prefixes() {
        for (src, dst) in [("10.1.2.3:5555", "192.168.0.1:443"), ("[2001:db8::1]:1", "[::1]:2")] {
            let mut b = Vec::new();
            let n = write_v2(sa(src), sa(dst), &mut b);
            assert_eq!(n, if src.starts_with('[') { 52 } else { 28 });
            b.extend_from_slice(b"x");
            let want = Header { len: n, source: Some(sa(src)), dest: Some(sa(dst)) };
            assert_eq!(parse(&b), Ok(Parsed::Done(want)));
            for k in 0..n {
                assert_eq!(parse(&b[..k]), Ok(Parsed::Incomplete), "prefix of {k} bytes");
            }
        }
    }

    #[test]
    fn v2_local_tlvs_and_errors() {
        let mut h = V2_SIG.to_vec();
        h.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(parse(&h), Ok(Parsed::Done(Header { len: 16, source: None, dest: None })));
        // TLVs after the addresses are skipped.
        let mut h = V2_SIG.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0x00, 12 + 7]);
        h.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 0, 80, 1, 187]);
        h.extend_from_slice(&[0x04, 0x00, 0x04, b'a', b'b', b'c', b'd']);
        assert!(matches!(parse(&h), Ok(Parsed::Done(Header { len: 35, .. }))));
        let mut bad = V2_SIG.to_vec();
        bad.extend_from_slice(&[0x31, 0x11, 0, 12]);
        assert_eq!(parse(&bad), Err(HeaderError::V2Command(0x31)));
        let mut udp = V2_SIG.to_vec();
        udp.extend_from_slice(&[0x21, 0x12, 0, 12]);
        udp.extend_from_slice(&[0; 12]);
        assert_eq!(parse(&udp), Err(HeaderError::V2Family(0x12)));
        let mut big = V2_SIG.to_vec();
        big.extend_from_slice(&[0x21, 0x11, 0xFF, 0xFF]);
        assert_eq!(parse(&big), Err(HeaderError::V2TooLong(16 + 65535)));
        let mut short = V2_SIG.to_vec();
        short.extend_from_slice(&[0x21, 0x21, 0, 12]);
        short.extend_from_slice(&[0; 12]);
        assert_eq!(parse(&short), Err(HeaderError::V2Short));
        let mut notsig = V2_SIG.to_vec();
        notsig[5] = 0;
        assert_eq!(parse(&notsig), Err(HeaderError::NotProxy));
    }

    #[test]
    fn mixed_families_are_written_as_ipv6() {
        let mut b = Vec::new();
        write_v1(sa("10.0.0.1:1"), sa("[::1]:2"), &mut b);
        assert_eq!(&b[..], b"PROXY TCP6 ::ffff:10.0.0.1 ::1 1 2\r\n");
    }
}
