//! PROXY protocol: the server sees the real client (`send_proxy` v1/v2), a client's header is
//! honoured (`accept_proxy`), and a bad, oversized or late header closes only that connection.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use crate::common::*;
use ringproxy::proxy_protocol::{self, Parsed};

/// (source, dest) of a header a backend received.
type Seen = (Option<SocketAddr>, Option<SocketAddr>);

/// A backend that reads a PROXY header, reports (source, dest) on `tx`, then echoes.
fn header_backend() -> (SocketAddr, mpsc::Receiver<Seen>) {
    let l = listen("127.0.0.1:0");
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { continue };
            let tx = tx.clone();
            thread::spawn(move || {
                conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 512];
                let header = loop {
                    let n = conn.read(&mut chunk).unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    match proxy_protocol::parse(&buf) {
                        Ok(Parsed::Done(h)) => break h,
                        Ok(Parsed::Incomplete) => {}
                        Err(e) => panic!("the proxy sent a bad header: {e}"),
                    }
                };
                let _ = tx.send((header.source, header.dest));
                // Echo whatever followed the header, then the rest.
                let _ = conn.write_all(&buf[header.len..]);
                loop {
                    match conn.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if conn.write_all(&chunk[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, rx)
}

#[test]
fn send_proxy_v1_and_v2_tell_the_server_who_the_client_is() {
    for version in ["v1", "v2"] {
        let (backend, seen) = header_backend();
        let engine = engine(&format!(
            "global: {{ workers: 2 }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
             backends: [{{ name: be, servers: [{{ name: s, address: \"{backend}\", send_proxy: {version} }}] }}]\n"
        ));
        let proxy = addr(&engine, "fe");
        let client_ip: IpAddr = "127.0.3.7".parse().unwrap();
        let mut c = connect_from(proxy, client_ip);
        echo_once(&mut c, b"payload after the header");
        let (src, dst) = seen.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(src, Some(c.local_addr().unwrap()), "{version}: the server sees the client");
        assert_eq!(dst, Some(proxy), "{version}: and the address the client reached");
        assert_eq!(engine.stats().total(|w| w.proxy_headers_sent), 1);
        drop(c);
        assert_clean(engine, &[backend.port()]);
    }
}

#[test]
fn send_proxy_on_a_wildcard_listener_names_the_local_address() {
    let (backend, seen) = header_backend();
    let engine = engine(&format!(
        "global: {{ workers: 1 }}\nfrontends: [{{ name: fe, bind: \"0.0.0.0:0\", backend: be }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{backend}\", send_proxy: v1 }}] }}]\n"
    ));
    let port = addr(&engine, "fe").port();
    let target: SocketAddr = format!("127.0.0.5:{port}").parse().unwrap();
    let mut c = connect(target);
    echo_once(&mut c, b"x");
    let (src, dst) = seen.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(src, Some(c.local_addr().unwrap()));
    assert_eq!(dst, Some(target), "the kernel's local address, not 0.0.0.0");
    drop(c);
    assert_clean(engine, &[backend.port()]);
}

#[test]
fn accept_proxy_uses_the_clients_header_and_passes_the_payload() {
    let (backend, seen) = header_backend();
    let engine = engine(&format!(
        "global: {{ workers: 2 }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be, accept_proxy: true }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{backend}\", send_proxy: v2 }}] }}]\n"
    ));
    let proxy = addr(&engine, "fe");
    // A v1 header in two pieces, with payload in the same segment as its end.
    let mut split = connect(proxy);
    split.write_all(b"PROXY TCP4 10.9.8.7 ").unwrap();
    // The proxy has looked at the first piece (an incomplete header) before the rest is sent.
    wait_until("the proxy to peek at the first piece", Duration::from_secs(5), || {
        engine.stats().total(|w| w.proxy_header_peeks) >= 1
    });
    split.write_all(b"10.0.0.1 5555 80\r\nhello").unwrap();
    let mut got = [0u8; 5];
    split.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");
    let (src, dst) = seen.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(src, Some("10.9.8.7:5555".parse().unwrap()));
    assert_eq!(dst, Some("10.0.0.1:80".parse().unwrap()));
    assert!(engine.stats().total(|w| w.proxy_header_peeks) >= 2, "the split header was peeked at again");
    // A v2 header, then an echo.
    let mut v2 = connect(proxy);
    let mut h = Vec::new();
    proxy_protocol::write_v2("[2001:db8::9]:4000".parse().unwrap(), "[2001:db8::1]:443".parse().unwrap(), &mut h);
    v2.write_all(&h).unwrap();
    echo_once(&mut v2, b"v2 payload");
    let (src, _) = seen.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(src, Some("[2001:db8::9]:4000".parse().unwrap()));
    drop((split, v2));
    assert_clean(engine, &[backend.port()]);
}

#[test]
fn bad_oversized_or_late_headers_close_only_that_connection() {
    let echo = Backend::start(Mode::Echo);
    let engine = engine(&format!(
        "global: {{ workers: 2 }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be, accept_proxy: true, \
         timeout: {{ proxy_header: 300ms }} }}]\nbackends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
        echo.addr
    ));
    let proxy = addr(&engine, "fe");
    // A good connection stays up through all of it.
    let mut good = connect(proxy);
    good.write_all(b"PROXY UNKNOWN\r\n").unwrap();
    echo_once(&mut good, b"before");
    let oversized = {
        let mut v =
            vec![0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21, 0x11, 0x07, 0xD0];
        v.extend_from_slice(&[0u8; 1100]);
        v
    };
    let bad_inputs: [&[u8]; 4] =
        [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"PROXY TCP4 1.2.3.4 nonsense\r\n", &oversized, &[b'P'; 200]];
    for bad in bad_inputs {
        let mut c = connect(proxy);
        let _ = c.write_all(bad);
        let (got, _) = read_to_end(&mut c);
        assert!(got.is_empty(), "nothing reaches a client whose header is refused");
    }
    // No header at all: closed after the header timeout.
    let mut silent = connect(proxy);
    let t = std::time::Instant::now();
    let _ = read_to_end(&mut silent);
    assert!(t.elapsed() >= Duration::from_millis(250) && t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    echo_once(&mut good, b"after");
    let s = engine.stats();
    assert_eq!(s.total(|w| w.proxy_header_errors), 5);
    assert_eq!(echo.total(), 1, "refused clients never reached the server");
    let _ = TcpStream::connect(proxy);
    drop((good, silent));
    assert_clean(engine, &[echo.addr.port()]);
}

/// Review 2b (security-review-7b9477c): connections waiting for their PROXY header held maxconn
/// slots until their header timeout, so 150 clients that never send one made a real client wait
/// (1.8 s with `maxconn: 100`). They now hold slots of the frontend's own PROXY-header limit
/// (`proxy_header_maxconn`), and a client whose header is there is served at once.
#[test]
fn silent_clients_waiting_for_their_header_do_not_hold_maxconn_slots() {
    let echo = Backend::start(Mode::Echo);
    let engine = engine(&format!(
        "global: {{ workers: 2, maxconn: 100 }}\ndefaults: {{ timeout: {{ proxy_header: 2s }} }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be, accept_proxy: true }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
        echo.addr
    ));
    let fe = addr(&engine, "fe");
    let silent: Vec<TcpStream> = (0..150).map(|_| connect(fe)).collect();
    wait_until("150 connections reading their header", Duration::from_secs(5), || {
        engine.stats().total(|w| w.handshakes) == 150
    });
    assert_eq!(engine.stats().total(|w| w.active), 0, "none of them holds a maxconn slot");
    let t = std::time::Instant::now();
    let mut real = connect(fe);
    real.write_all(b"PROXY TCP4 10.1.1.1 10.2.2.2 1000 2000\r\n").unwrap();
    echo_once(&mut real, b"served at once");
    let took = t.elapsed();
    assert!(took < Duration::from_millis(500), "the real client waited {took:?}");
    drop((real, silent));
    assert_clean(engine, &[echo.addr.port()]);
}

/// A connection whose header is all there but finds no maxconn slot waits for one (its header
/// left in the socket), without a header timeout, and goes on when a slot frees.
#[test]
fn a_complete_header_waits_for_a_maxconn_slot_then_goes_on() {
    let held = Backend::start(Mode::Hold);
    let engine = engine(&format!(
        "global: {{ workers: 1, maxconn: 1 }}\ndefaults: {{ timeout: {{ proxy_header: 300ms }} }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be, accept_proxy: true }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
        held.addr
    ));
    let fe = addr(&engine, "fe");
    let mut first = connect(fe);
    first.write_all(b"PROXY TCP4 10.1.1.1 10.2.2.2 1000 2000\r\n").unwrap();
    echo_once(&mut first, b"first");
    let mut second = connect(fe);
    second.write_all(b"PROXY TCP4 10.1.1.2 10.2.2.2 1001 2000\r\nsecond").unwrap();
    wait_until("the second connection to wait for a slot", Duration::from_secs(5), || {
        let s = engine.stats();
        s.total(|w| w.handshakes) == 1 && s.total(|w| w.active) == 1 && s.total(|w| w.limit_hits.global) >= 1
    });
    // Longer than its header timeout: a connection waiting for a slot has none.
    thread::sleep(Duration::from_millis(600));
    assert_eq!(engine.stats().total(|w| w.proxy_header_errors), 0);
    drop(first);
    let mut got = [0u8; 6];
    second.read_exact(&mut got).expect("the second connection goes on once the first has closed");
    assert_eq!(&got, b"second");
    held.release();
    drop(second);
    assert_clean(engine, &[held.addr.port()]);
}

/// `proxy_header_maxconn` bounds the connections reading their header: beyond it, accepted
/// sockets wait (parked) like any beyond a maxconn.
#[test]
fn proxy_header_maxconn_bounds_the_connections_reading_their_header() {
    let echo = Backend::start(Mode::Echo);
    let engine = engine(&format!(
        "global: {{ workers: 1 }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be, accept_proxy: true, proxy_header_maxconn: 3 }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
        echo.addr
    ));
    let fe = addr(&engine, "fe");
    let silent: Vec<TcpStream> = (0..5).map(|_| connect(fe)).collect();
    // (The fifth may be parked too, or still in the backlog: accepting stops at the first parked.)
    wait_until("three reading their header, the others parked", Duration::from_secs(5), || {
        let s = engine.stats();
        s.total(|w| w.handshakes) == 3 && s.total(|w| w.parked) >= 1
    });
    // The bound holds (it can only pass wrongly, never fail wrongly, after this pause).
    thread::sleep(Duration::from_millis(100));
    assert_eq!(engine.stats().total(|w| w.handshakes), 3);
    drop(silent);
    assert_clean(engine, &[echo.addr.port()]);
}
