//! Fuzzing the PROXY protocol header parser (proptest, runs in CI). It reads bytes straight from
//! untrusted clients, so for any input it must: not panic; answer a header, "need more bytes" or
//! an error with a message; never ask for more once MAX_HEADER bytes are there (a client cannot
//! make us wait or hold more); stay consistent as bytes arrive (every prefix of a header is
//! "need more", a prefix that is already wrong never becomes right, bytes after the header change
//! nothing); and read back exactly what `write_v1`/`write_v2` wrote.
//!
//! Default: 6,000 cases in total (a second or two in debug). More: `RINGPROXY_FUZZ_CASES=200000`.
//! Each test prints how many cases it executed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use ringproxy::proxy_protocol::{self, HeaderError, MAX_HEADER, Parsed};

const V2_SIG: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];

fn cases(default: u32, share: u32) -> u32 {
    match std::env::var("RINGPROXY_FUZZ_CASES").ok().and_then(|v| v.trim().parse::<u64>().ok()) {
        Some(n) => (n * share as u64 / 100).clamp(1, u32::MAX as u64) as u32,
        None => default,
    }
}

fn fuzz<S: Strategy>(what: &str, cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let executed = AtomicU64::new(0);
    let mut runner = TestRunner::new(ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() });
    let result = runner.run(&strategy, |v| {
        executed.fetch_add(1, Ordering::SeqCst);
        test(v)
    });
    eprintln!("fuzz_proxy_protocol {what}: {} cases executed", executed.load(Ordering::SeqCst));
    if let Err(e) = result {
        panic!("{what}: {e}");
    }
}

/// The contract for one input, checked against every prefix of it.
fn check(buf: &[u8]) -> Result<(), TestCaseError> {
    let whole = proxy_protocol::parse(buf);
    match &whole {
        Ok(Parsed::Done(h)) => {
            prop_assert!(
                h.len >= 1 && h.len <= buf.len() && h.len <= MAX_HEADER,
                "header length {} of {}",
                h.len,
                buf.len()
            );
            prop_assert_eq!(h.source.is_some(), h.dest.is_some());
            // The header alone parses the same; bytes after it change nothing.
            prop_assert_eq!(proxy_protocol::parse(&buf[..h.len]), whole.clone());
        }
        Ok(Parsed::Incomplete) => {
            prop_assert!(buf.len() < MAX_HEADER, "asks for more after {} bytes", buf.len());
        }
        Err(e) => {
            prop_assert!(!e.to_string().trim().is_empty());
        }
    }
    // As the bytes arrive: "need more" until the header is complete, and never an error
    // before a valid header or a header before an error.
    for k in 0..buf.len() {
        let part = proxy_protocol::parse(&buf[..k]);
        match (&part, &whole) {
            (Ok(Parsed::Incomplete), _) => {}
            (Ok(Parsed::Done(a)), Ok(Parsed::Done(b))) => prop_assert_eq!(a, b, "prefix of {} bytes", k),
            (Err(_), Err(_)) => {}
            _ => prop_assert!(false, "prefix of {k} bytes gave {part:?}, all {} bytes gave {whole:?}", buf.len()),
        }
    }
    Ok(())
}

fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<u32>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)),
        (any::<u128>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)),
    ]
}

/// What a header of `src` → `dst` must read back as (mixed families are written as IPv6).
fn expected(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(v4.to_ipv6_mapped().into(), a.port()),
        IpAddr::V6(_) => a,
    };
    if src.is_ipv4() == dst.is_ipv4() { (src, dst) } else { (v6(src), v6(dst)) }
}

#[test]
fn random_bytes_never_panic_and_stay_consistent() {
    fuzz("random bytes", cases(1500, 25), proptest::collection::vec(any::<u8>(), 0..1100), |b| check(&b));
}

#[test]
fn v1_like_input_never_panics_and_stays_consistent() {
    // "PROXY " and then tokens that look like the real ones, broken in every way.
    let token = prop_oneof![
        proptest::sample::select(
            &[
                "TCP4",
                "TCP6",
                "UNKNOWN",
                "UDP4",
                "tcp4",
                "",
                " ",
                "\r",
                "\n",
                "\r\n",
                "0",
                "00",
                "65535",
                "65536",
                "-1",
                "+1",
                "1.2.3.4",
                "255.255.255.255",
                "256.1.1.1",
                "::1",
                "::ffff:1.2.3.4",
                "fe80::1%lo",
                "1.2.3",
                "\u{0}",
                "\u{ff}",
                "é"
            ][..]
        )
        .prop_map(|s| s.as_bytes().to_vec()),
        "[0-9a-fA-F:.]{0,45}".prop_map(|s| s.into_bytes()),
        proptest::collection::vec(any::<u8>(), 0..8),
    ];
    let line = proptest::collection::vec(
        (token, prop_oneof![Just(b" ".to_vec()), Just(b"  ".to_vec()), Just(Vec::new())]),
        0..8,
    );
    let end = prop_oneof![Just(b"\r\n".to_vec()), Just(b"\n".to_vec()), Just(b"\r".to_vec()), Just(Vec::new())];
    let tail = proptest::collection::vec(any::<u8>(), 0..32);
    fuzz("v1-like headers", cases(1500, 25), (line, end, tail), |(line, end, tail)| {
        let mut b = b"PROXY ".to_vec();
        for (t, sep) in line {
            b.extend_from_slice(&t);
            b.extend_from_slice(&sep);
        }
        b.extend_from_slice(&end);
        b.extend_from_slice(&tail);
        check(&b)
    });
}

#[test]
fn v2_like_input_never_panics_and_stays_consistent() {
    // The signature, then any version/command, family, length and body.
    let strategy = (
        prop_oneof![Just(0x20u8), Just(0x21u8), any::<u8>()],
        prop_oneof![Just(0x00u8), Just(0x11u8), Just(0x12u8), Just(0x21u8), Just(0x22u8), Just(0x31u8), any::<u8>()],
        prop_oneof![Just(0u16), Just(12u16), Just(36u16), Just(216u16), 0u16..1100, any::<u16>()],
        proptest::collection::vec(any::<u8>(), 0..1100),
        0usize..12,
    );
    fuzz("v2-like headers", cases(1500, 25), strategy, |(ver_cmd, fam, len, body, sig_damage)| {
        let mut b = V2_SIG.to_vec();
        if sig_damage > 8 {
            b[sig_damage] ^= 0x40;
        }
        b.push(ver_cmd);
        b.push(fam);
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&body);
        check(&b)
    });
}

#[test]
fn written_headers_read_back_exactly() {
    let strategy = (addr(), addr(), any::<bool>(), proptest::collection::vec(any::<u8>(), 0..64));
    fuzz("write/parse round trips", cases(1000, 15), strategy, |(src, dst, v2, payload)| {
        let mut b = Vec::new();
        let n =
            if v2 { proxy_protocol::write_v2(src, dst, &mut b) } else { proxy_protocol::write_v1(src, dst, &mut b) };
        prop_assert_eq!(n, b.len());
        b.extend_from_slice(&payload);
        let (s, d) = expected(src, dst);
        match proxy_protocol::parse(&b) {
            Ok(Parsed::Done(h)) => {
                prop_assert_eq!(h.len, n);
                prop_assert_eq!(h.source, Some(s));
                prop_assert_eq!(h.dest, Some(d));
            }
            other => prop_assert!(false, "{:?} for a header written from {src} to {dst}", other),
        }
        check(&b)
    });
}

#[test]
fn damaged_written_headers_never_panic() {
    let strategy = (
        addr(),
        addr(),
        any::<bool>(),
        proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        prop_oneof![Just(None), any::<usize>().prop_map(Some)],
    );
    fuzz("damaged written headers", cases(500, 10), strategy, |(src, dst, v2, flips, cut)| {
        let mut b = Vec::new();
        if v2 {
            proxy_protocol::write_v2(src, dst, &mut b);
        } else {
            proxy_protocol::write_v1(src, dst, &mut b);
        }
        for (at, x) in flips {
            let i = at % b.len();
            b[i] ^= x;
        }
        if let Some(c) = cut {
            b.truncate(c % (b.len() + 1));
        }
        check(&b)
    });
}

#[test]
fn errors_say_what_is_wrong() {
    // A few fixed cases, to be sure every error variant has a message.
    let errors = [
        proxy_protocol::parse(b"GET / HTTP/1.1\r\n"),
        proxy_protocol::parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"),
        proxy_protocol::parse(&[b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat()),
        proxy_protocol::parse(&[V2_SIG.as_slice(), &[0x31, 0x11, 0, 12]].concat()),
        proxy_protocol::parse(&[V2_SIG.as_slice(), &[0x21, 0x12, 0, 12], &[0; 12]].concat()),
        proxy_protocol::parse(&[V2_SIG.as_slice(), &[0x21, 0x11, 0xFF, 0xFF]].concat()),
        proxy_protocol::parse(&[V2_SIG.as_slice(), &[0x21, 0x21, 0, 12], &[0; 12]].concat()),
    ];
    for e in errors {
        let e: HeaderError = e.expect_err("refused");
        assert!(!e.to_string().is_empty(), "{e:?}");
    }
}
