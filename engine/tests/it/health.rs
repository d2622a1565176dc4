//! Health checks: a dead server is marked DOWN and gets no new connections, comes back UP, the
//! expect string is honoured, and `on_down: shutdown_sessions` closes its connections.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::*;

fn server_state(engine: &ringproxy::Engine, name: &str) -> String {
    engine.stats().servers.iter().find(|s| s.server == name).map(|s| s.state.to_string()).unwrap_or_default()
}

/// `assert_clean` for an engine with health checks: the checker keeps connecting to the servers
/// while the engine runs, so their ports are checked for open sockets only once it is shut down.
fn stops_clean(engine: TestEngine, servers: &[u16]) {
    assert_idle(&engine, &[]);
    assert_stops_clean(engine, servers);
}

#[test]
fn a_dead_server_goes_down_gets_no_connections_and_comes_back() {
    let a = Backend::start(Mode::Tag(0));
    let b = Backend::start(Mode::Tag(1));
    let b_addr: SocketAddr = b.addr;
    let engine = engine(&format!(
        "global: {{ workers: 2 }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends:\n  - name: be\n    retries: 0\n    check: {{ interval: 100ms, timeout: 100ms, rise: 2, fall: 2 }}\n\
         \x20   servers: [{{ name: a, address: \"{}\" }}, {{ name: b, address: \"{}\" }}]\n",
        a.addr, b.addr
    ));
    let proxy = addr(&engine, "fe");
    wait_until("both servers checked", Duration::from_secs(5), || engine.stats().health.iter().all(|h| h.checks >= 2));
    assert_eq!(server_state(&engine, "b"), "UP");
    // Kill b: its listener goes away, connects are refused.
    b.stop();
    wait_until("b to be marked DOWN", Duration::from_secs(5), || server_state(&engine, "b") == "DOWN");
    let errors_before = engine.stats().total(|w| w.connect_errors.total());
    for _ in 0..20 {
        let mut c = connect(proxy);
        let mut tag = [0u8];
        std::io::Read::read_exact(&mut c, &mut tag).expect("served by the live server");
        assert_eq!(tag[0], 0);
    }
    assert_eq!(engine.stats().total(|w| w.connect_errors.total()), errors_before, "no connect to the DOWN server");
    let h = engine.stats().health.iter().find(|h| h.server == "b").cloned().unwrap();
    assert!(!h.up && h.changes == 1 && h.last_error.is_some(), "{h:?}");
    // Bring b back on the same address: UP after `rise` checks, and it takes connections again.
    let b2 = Backend::on(&b_addr.to_string(), Mode::Tag(1));
    wait_until("b to be marked UP", Duration::from_secs(5), || server_state(&engine, "b") == "UP");
    let mut seen_b = false;
    for _ in 0..10 {
        let mut c = connect(proxy);
        let mut tag = [0u8];
        std::io::Read::read_exact(&mut c, &mut tag).unwrap();
        seen_b |= tag[0] == 1;
    }
    assert!(seen_b, "b serves again");
    drop(b2);
    stops_clean(engine, &[a.addr.port(), b_addr.port()]);
}

#[test]
fn expect_string_must_be_in_the_answer() {
    let echo = Backend::start(Mode::Echo);
    let engine = engine(&format!(
        "global: {{ workers: 1 }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends:\n  - name: good\n    check: {{ interval: 100ms, rise: 1, fall: 1, send: \"PING\\r\\n\", expect: PING }}\n\
         \x20   servers: [{{ name: echoes, address: \"{0}\" }}]\n\
         \x20 - name: be\n    check: {{ interval: 100ms, rise: 1, fall: 1, send: \"PING\\r\\n\", expect: PONG }}\n\
         \x20   servers: [{{ name: wrong, address: \"{0}\" }}]\n",
        echo.addr
    ));
    wait_until("the mismatching server to go DOWN", Duration::from_secs(5), || {
        server_state(&engine, "wrong") == "DOWN"
    });
    // Give a wrong DOWN time to show. This can only pass wrongly (had the moment been too short),
    // never fail wrongly.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(server_state(&engine, "echoes"), "UP");
    // With its only server DOWN, a client of `be` is refused service, not hung.
    let mut c = connect(addr(&engine, "fe"));
    let (got, _) = read_to_end(&mut c);
    assert!(got.is_empty());
    drop(c);
    stops_clean(engine, &[echo.addr.port()]);
}

#[test]
fn shutdown_sessions_closes_connections_of_a_down_server() {
    let held = Backend::start(Mode::Hold);
    let engine = engine(&format!(
        "global: {{ workers: 2 }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends:\n  - name: be\n    on_down: shutdown_sessions\n    check: {{ interval: 100ms, timeout: 100ms, fall: 1 }}\n\
         \x20   servers: [{{ name: s, address: \"{}\" }}]\n",
        held.addr
    ));
    let mut conns: Vec<_> = (0..5u8)
        .map(|i| {
            let mut c = connect(addr(&engine, "fe"));
            echo_once(&mut c, &[i]);
            c
        })
        .collect();
    // The server stops accepting (checks fail) while its established connections would live on.
    held.stop();
    wait_until("the server to be DOWN", Duration::from_secs(5), || server_state(&engine, "s") == "DOWN");
    for c in conns.iter_mut() {
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let (_, err) = read_to_end(c);
        assert_reset_passed_on(err); // clients see a reset
    }
    wait_until("every session closed", Duration::from_secs(2), || engine.stats().total(|w| w.active) == 0);
    drop(conns);
    stops_clean(engine, &[held.addr.port()]);
}

/// `on_down: shutdown_sessions` also closes connections still connecting to the server that went
/// DOWN (here a black hole: its check times out, and so would every connect): their clients see
/// the close and the engine frees them.
#[test]
fn shutdown_sessions_closes_connections_still_connecting() {
    let hole = BlackHole::start();
    // Servers start UP; the first check starts at once and fails after its 1 s timeout.
    let engine = engine(&format!(
        "global: {{ workers: 2 }}\ndefaults: {{ timeout: {{ connect: 30s, drain: 1s }} }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends:\n  - name: be\n    retries: 0\n    on_down: shutdown_sessions\n\
         \x20   check: {{ interval: 10s, timeout: 1s, fall: 1 }}\n\
         \x20   servers: [{{ name: s, address: \"{}\" }}]\n",
        hole.addr
    ));
    let mut conns: Vec<_> = (0..3).map(|_| connect(addr(&engine, "fe"))).collect();
    wait_until("3 connections connecting", Duration::from_secs(1), || engine.stats().total(|w| w.active) == 3);
    wait_until("the server to be DOWN", Duration::from_secs(5), || server_state(&engine, "s") == "DOWN");
    for c in conns.iter_mut() {
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let (got, err) = read_to_end(c);
        assert!(got.is_empty(), "{err:?}");
    }
    drop(conns);
    stops_clean(engine, &[]);
}

/// `servers[].backup: true`: a backup server takes no connection while a normal one is UP, takes
/// every new one once no normal server is UP, and stops taking them when one comes back.
#[test]
fn a_backup_server_serves_only_while_no_normal_server_is_up() {
    let a = Backend::start(Mode::Tag(0));
    let spare = Backend::start(Mode::Tag(9));
    let a_addr: SocketAddr = a.addr;
    let engine = engine(&format!(
        "global: {{ workers: 2 }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends:\n  - name: be\n    retries: 0\n    check: {{ interval: 100ms, timeout: 100ms, rise: 2, fall: 2 }}\n\
         \x20   servers: [{{ name: a, address: \"{}\" }}, {{ name: spare, address: \"{}\", backup: true }}]\n",
        a.addr, spare.addr
    ));
    let proxy = addr(&engine, "fe");
    let tags = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                let mut c = connect(proxy);
                let mut tag = [0u8];
                std::io::Read::read_exact(&mut c, &mut tag).expect("served");
                tag[0]
            })
            .collect()
    };
    wait_until("both servers checked", Duration::from_secs(5), || engine.stats().health.iter().all(|h| h.checks >= 2));
    assert_eq!(server_state(&engine, "spare"), "UP", "a backup is checked like any server");
    assert!(tags(20).iter().all(|&t| t == 0), "the backup takes nothing while a is UP");
    a.stop();
    wait_until("a to be marked DOWN", Duration::from_secs(5), || server_state(&engine, "a") == "DOWN");
    assert!(tags(20).iter().all(|&t| t == 9), "with no normal server UP, the backup takes every connection");
    let a2 = Backend::on(&a_addr.to_string(), Mode::Tag(0));
    wait_until("a to be marked UP", Duration::from_secs(5), || server_state(&engine, "a") == "UP");
    assert!(tags(20).iter().all(|&t| t == 0), "a is back: the backup stops taking new connections");
    drop(a2);
    stops_clean(engine, &[a_addr.port(), spare.addr.port()]);
}

/// `servers[].slowstart` when a health check brings a server back: it starts at a small part of
/// its weight (the stats say how far the ramp is), takes a small share of new connections under
/// `leastconn` at first, and its full weight once the window has passed. Not at start-up.
#[test]
fn a_server_brought_back_by_its_health_check_ramps_over_its_slowstart() {
    let a = Backend::start(Mode::Tag(0));
    let b = Backend::start(Mode::Tag(1));
    let a_addr: SocketAddr = a.addr;
    let engine = engine(&format!(
        "global: {{ workers: 2 }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends:\n  - name: be\n    balance: leastconn\n    retries: 0\n    check: {{ interval: 100ms, timeout: 100ms, rise: 1, fall: 1 }}\n\
         \x20   servers: [{{ name: a, address: \"{}\", slowstart: 3s }}, {{ name: b, address: \"{}\" }}]\n",
        a.addr, b.addr
    ));
    let proxy = addr(&engine, "fe");
    let ramp = |name: &str| engine.stats().servers.iter().find(|s| s.server == name).map(|s| s.ramp_pct).unwrap();
    assert_eq!(ramp("a"), 100, "no ramp at start-up");
    a.stop();
    wait_until("a to be marked DOWN", Duration::from_secs(5), || server_state(&engine, "a") == "DOWN");
    // Connections held on b while a is away: an empty a would take every new one under leastconn.
    let mut held: Vec<_> = (0..20).map(|_| connect(proxy)).collect();
    let a2 = Backend::on(&a_addr.to_string(), Mode::Tag(0));
    wait_until("a to be marked UP", Duration::from_secs(5), || server_state(&engine, "a") == "UP");
    let back = std::time::Instant::now();
    assert!(ramp("a") < 40, "just back: {}% of its weight", ramp("a"));
    let mut to_a = 0;
    for _ in 0..20 {
        let mut c = connect(proxy);
        let mut tag = [0u8];
        std::io::Read::read_exact(&mut c, &mut tag).expect("served");
        to_a += usize::from(tag[0] == 0);
        held.push(c);
    }
    assert!(back.elapsed() < Duration::from_millis(1500), "the sample took {:?}", back.elapsed());
    assert!(to_a <= 8, "early in its ramp a took {to_a} of 20 new connections (all 20 without slowstart)");
    wait_until("the ramp to end", Duration::from_secs(5), || ramp("a") == 100);
    drop(held);
    drop(a2);
    stops_clean(engine, &[a_addr.port(), b.addr.port()]);
}
