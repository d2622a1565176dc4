//! Timeouts: connect (a server that never answers SYN), client idle, server idle.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

/// A listener whose accept queue is full, so further SYNs are dropped and connects hang.
fn blackhole() -> (socket2::Socket, Vec<socket2::Socket>, SocketAddr) {
    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    l.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
    l.listen(0).unwrap();
    let addr = l.local_addr().unwrap().as_socket().unwrap();
    // With backlog 0 one connection fills the queue; a second one sits in SYN-SENT.
    let fillers = (0..2)
        .map(|_| {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_nonblocking(true).unwrap();
            let _ = s.connect(&addr.into());
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    (l, fillers, addr)
}

#[test]
fn connect_timeout_when_the_server_never_answers() {
    let (_l, _fillers, hole) = blackhole();
    let engine = engine(&format!(
        "global: {{ workers: 2 }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends:\n  - {{ name: be, retries: 0, timeout: {{ connect: 300ms }}, servers: [{{ name: s, address: \"{hole}\" }}] }}\n"
    ));
    let mut c = connect(addr(&engine, "fe"));
    let t = Instant::now();
    c.write_all(b"anyone there?").unwrap();
    let (got, _) = read_to_end(&mut c);
    let waited = t.elapsed();
    assert!(got.is_empty());
    assert!(waited >= Duration::from_millis(250), "closed after {waited:?}, before the connect timeout");
    assert!(waited < Duration::from_secs(3), "closed only after {waited:?}");
    let stats = engine.stats();
    assert_eq!(stats.total(|w| w.connect_errors.timeout), 1);
    assert_eq!(stats.total(|w| w.failed), 1);
}

#[test]
fn client_idle_timeout_closes_both_sides() {
    let backend = Backend::start(Mode::Silent);
    let engine = engine(&format!(
        "global: {{ workers: 2 }}\ndefaults: {{ timeout: {{ client: 300ms, server: 10s }} }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
        backend.addr
    ));
    let mut c = connect(addr(&engine, "fe"));
    wait_until("the server to see the connection", Duration::from_secs(2), || backend.active() == 1);
    let t = Instant::now();
    let (got, err) = read_to_end(&mut c);
    assert!(got.is_empty() && err.is_none(), "the client sees a clean close: {err:?}");
    let waited = t.elapsed();
    assert!(waited < Duration::from_secs(2), "closed after {waited:?}");
    wait_until("the server side to close", Duration::from_secs(1), || backend.active() == 0);
    assert_eq!(engine.stats().total(|w| w.timeouts.client), 1);
}

#[test]
fn server_idle_timeout_closes_both_sides() {
    let backend = Backend::start(Mode::Silent);
    let engine = engine(&format!(
        "global: {{ workers: 2 }}\ndefaults: {{ timeout: {{ client: 10s, server: 300ms }} }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
        backend.addr
    ));
    let mut c = connect(addr(&engine, "fe"));
    c.write_all(b"request that gets no answer").unwrap();
    let t = Instant::now();
    let (got, err) = read_to_end(&mut c);
    assert!(got.is_empty() && err.is_none(), "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "closed after {:?}", t.elapsed());
    wait_until("the server side to close", Duration::from_secs(1), || backend.active() == 0);
    let stats = engine.stats();
    assert_eq!(stats.total(|w| w.timeouts.server), 1);
    assert_eq!(stats.total(|w| w.timeouts.client), 0);
}

#[test]
fn an_active_connection_does_not_time_out() {
    let backend = Backend::start(Mode::Echo);
    let engine = engine(&format!(
        "global: {{ workers: 2 }}\ndefaults: {{ timeout: {{ client: 1s, server: 1s }} }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
        backend.addr
    ));
    let mut c = connect(addr(&engine, "fe"));
    // Four times the idle timeout, with traffic every 100ms (margin for a busy test machine).
    for i in 0..40u32 {
        echo_once(&mut c, &i.to_le_bytes());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(engine.stats().total(|w| w.timeouts.client + w.timeouts.server), 0);
}
