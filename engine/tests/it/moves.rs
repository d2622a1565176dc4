//! Reload without reconnects: established connections move to the new engine (MSG_RING between
//! the rings, worker/moving.rs) and keep flowing both ways, keep their deadlines and count exactly
//! once against maxconn; those whose server the new file removed follow `on_removed`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::common::*;

fn yaml(server: std::net::SocketAddr, extra_global: &str, backend: &str) -> String {
    format!(
        "global: {{ workers: 2{extra_global} }}\ndefaults: {{ timeout: {{ client: 30s, server: 30s, drain: 10s }} }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be{backend}, servers: [{{ name: s, address: \"{server}\" }}] }}]\n"
    )
}

/// Waits until `engine` holds exactly `n` moved-in connections, all active.
fn wait_moved(engine: &TestEngine, n: u64) {
    wait_for(&format!("{n} connections to move in"), Duration::from_secs(20), || {
        let s = engine.stats();
        let (moved, active) = (s.total(|w| w.moved_in), s.total(|w| w.active));
        if moved == n && active >= n { Ok(()) } else { Err(format!("moved_in {moved}, active {active}")) }
    });
}

fn wait_finished(old: &TestEngine) {
    wait_until("the old engine to finish (it holds nothing)", Duration::from_secs(20), || old.finished());
}

#[test]
fn established_connections_move_on_reload_and_keep_flowing_both_ways() {
    for splice in ["never", "auto", "always"] {
        let echo = Backend::start(Mode::Echo);
        let tune = format!(", tune: {{ splice: {splice} }}");
        let mut old = engine(&yaml(echo.addr, &tune, ""));
        let fe = addr(&old, "fe");
        // Idle connections, each having said something.
        let mut idle = held_echoing(fe, 100);
        // Transfers in both directions at once (echo), running through the reload.
        let mut pumps: Vec<Pump> =
            (0..4).map(|i| Pump::connect(fe, 77 + i, false).unwrap().limit(4 * MIB).paced(4 * MIB)).collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        let step_all = |pumps: &mut Vec<Pump>| {
            for p in pumps.iter_mut() {
                p.step().unwrap();
            }
        };
        let until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < until {
            step_all(&mut pumps);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(pumps.iter().all(|p| p.received > 0 && p.received < 4 * MIB), "mid-transfer at the reload");
        // The new file changes the timeouts and the backend's balancing.
        let new_yaml = yaml(echo.addr, &tune, ", balance: leastconn, timeout: { server: 40s }");
        let new = old.reload(&new_yaml);
        let start = Instant::now();
        loop {
            step_all(&mut pumps);
            let s = new.stats();
            if s.total(|w| w.moved_in) == 104 || start.elapsed() > Duration::from_secs(20) {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        wait_moved(&new, 104);
        let took = start.elapsed();
        wait_finished(&old);
        eprintln!("splice {splice}: 104 connections moved in {took:?}");
        // Both ways, byte for byte, to the end.
        for p in &mut pumps {
            p.run(deadline).unwrap();
            p.intact().unwrap();
        }
        for (i, c) in idle.iter_mut().enumerate() {
            echo_once(c, format!("still here {i}").as_bytes());
        }
        let s = new.stats();
        assert_eq!(s.total(|w| w.closed), 4, "only the four transfers ended");
        assert_eq!(s.total(|w| w.active), 100);
        drop(idle);
        drop(pumps);
        assert_clean(new, &[echo.addr.port()]);
        assert_clean(old, &[echo.addr.port()]);
    }
}

#[test]
fn a_reload_that_changes_the_backends_splice_mode_moves_its_transfers_into_the_new_mode() {
    // The backend's own `splice` changes with the reload (its connections were copied through
    // the receive buffers and are spliced from then on, and the reverse): transfers under way
    // move with it, mid-stream, and go on in the new engine's mode to their last byte.
    for (from, to) in [("never", "always"), ("always", "never")] {
        let echo = Backend::start(Mode::Echo);
        let mut old = engine(&yaml(echo.addr, "", &format!(", splice: {from}")));
        let fe = addr(&old, "fe");
        let mut idle = held_echoing(fe, 20);
        let mut pumps: Vec<Pump> =
            (0..4).map(|i| Pump::connect(fe, 90 + i, false).unwrap().limit(4 * MIB).paced(4 * MIB)).collect();
        let until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < until {
            for p in pumps.iter_mut() {
                p.step().unwrap();
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(pumps.iter().all(|p| p.received > 0 && p.received < 4 * MIB), "{from} → {to}: mid-transfer");
        let new = old.reload(&yaml(echo.addr, "", &format!(", splice: {to}")));
        let start = Instant::now();
        while new.stats().total(|w| w.moved_in) < 24 && start.elapsed() < Duration::from_secs(20) {
            for p in pumps.iter_mut() {
                p.step().unwrap();
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        wait_moved(&new, 24);
        wait_finished(&old);
        let before = new.stats();
        let deadline = Instant::now() + Duration::from_secs(60);
        for p in &mut pumps {
            p.run(deadline).unwrap();
            p.intact().unwrap_or_else(|e| panic!("{from} → {to}: {e}"));
        }
        for (i, c) in idle.iter_mut().enumerate() {
            echo_once(c, format!("still here {i}").as_bytes());
        }
        let s = new.stats();
        let spliced = s.total(|w| w.splices) - before.total(|w| w.splices);
        let bufs = s.total(|w| w.ring_recv_bufs) - before.total(|w| w.ring_recv_bufs);
        match to {
            "always" => assert!(spliced > 0 && bufs == 0, "{from} → {to}: {spliced} splices, {bufs} buffers"),
            _ => assert!(spliced == 0 && bufs > 0, "{from} → {to}: {spliced} splices, {bufs} buffers"),
        }
        drop(idle);
        drop(pumps);
        assert_clean(new, &[echo.addr.port()]);
        assert_clean(old, &[echo.addr.port()]);
    }
}

/// `show conns` lines of an engine, by client address: (state, the absolute time the connection
/// reaches its lifetime, if the line says).
fn lifetimes(engine: &TestEngine) -> std::collections::HashMap<String, Instant> {
    let now = Instant::now();
    engine
        .list_conns(ringproxy::admin::ConnMatch::default(), 1000)
        .iter()
        .filter_map(|l| {
            let field = |k: &str| l.split(' ').find_map(|f| f.strip_prefix(k)).map(str::to_string);
            let ends: u64 = field("ends_in_ms=")?.parse().ok()?;
            Some((field("client=")?, now + Duration::from_millis(ends)))
        })
        .collect()
}

#[test]
fn a_moved_connection_keeps_its_deadlines() {
    let echo = Backend::start(Mode::Echo);
    // Idle deadline: the client timeout, counted from its last traffic. End of life: the
    // lifetime less each connection's part of the jitter (`balance: source`, so the engine knows
    // each client's address and `show conns` names it).
    let y = format!(
        "global: {{ workers: 2 }}\ndefaults: {{ timeout: {{ client: 1500ms, server: 30s, drain: 10s }} }}\n\
         frontends:\n  - {{ name: fe, bind: \"127.0.0.1:0\", backend: be }}\n\
         \x20 - {{ name: long, bind: \"127.0.0.1:0\", backend: be, timeout: {{ client: 30s, lifetime: 4s, lifetime_jitter: 2s }} }}\n\
         backends: [{{ name: be, balance: source, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
        echo.addr
    );
    let mut old = engine(&y);
    let mut idle = connect(addr(&old, "fe"));
    echo_once(&mut idle, b"x");
    let t0 = Instant::now();
    let mut long: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut c = connect(addr(&old, "long"));
            echo_once(&mut c, b"y");
            c
        })
        .collect();
    let before = lifetimes(&old);
    assert_eq!(before.len(), 20);
    std::thread::sleep(Duration::from_millis(700));
    let new = old.reload(&y);
    wait_moved(&new, 21);
    wait_finished(&old);
    // Each connection ends at the same moment as it would have (±50 ms of measuring).
    let after = lifetimes(&new);
    assert_eq!(after.len(), 20, "all 20 moved");
    for (client, end) in &before {
        let moved = after.get(client).unwrap_or_else(|| panic!("{client} moved"));
        let diff = if *moved > *end { *moved - *end } else { *end - *moved };
        assert!(diff < Duration::from_millis(50), "{client}: its end of life moved by {diff:?}");
    }
    // The idle connection times out 1.5 s after its last traffic, not 1.5 s after the move.
    idle.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (_, err) = read_to_end(&mut idle);
    let at = t0.elapsed();
    assert!(err.is_none(), "closed gracefully: {err:?}");
    assert!(at >= Duration::from_millis(1400) && at < Duration::from_millis(2100), "timed out after {at:?}");
    for c in &mut long {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        read_to_end(c);
    }
    let s = new.stats();
    assert_eq!(s.total(|w| w.timeouts.client), 1);
    assert_eq!(s.total(|w| w.lifetime_ends), 20);
    drop((idle, long));
    assert_clean(new, &[echo.addr.port()]);
    assert_clean(old, &[echo.addr.port()]);
}

#[test]
fn maxconn_counts_each_moved_connection_exactly_once() {
    let hold = Backend::start(Mode::Echo);
    let y = |maxconn: u32| yaml(hold.addr, &format!(", maxconn: {maxconn}"), "");
    let mut old = engine(&y(6));
    let fe = addr(&old, "fe");
    let mut conns = held_echoing(fe, 6);
    let mut new = old.reload(&y(6));
    wait_moved(&new, 6);
    wait_finished(&old);
    let s = new.stats();
    assert_eq!(s.total(|w| w.active), 6, "the six moved, counted once");
    // A seventh waits for a slot (parked), as it would have before the reload.
    let mut seventh = connect(fe);
    seventh.write_all(b"7").unwrap();
    wait_until("the seventh to be parked", Duration::from_secs(5), || new.stats().total(|w| w.parked) == 1);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(new.stats().total(|w| w.active), 6, "still six: the limit holds");
    drop(conns.pop());
    let mut got = [0u8];
    seventh.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"7", "served once a moved connection closed");
    conns.push(seventh);
    // A reload to maxconn 4: four move, two stay on the old engine (refused, offered again each
    // second) until one of the four closes.
    let newer = new.reload(&y(4));
    wait_moved(&newer, 4);
    assert_eq!(newer.stats().total(|w| w.active), 4);
    wait_until("the two refused to be offered again", Duration::from_secs(10), || {
        new.stats().total(|w| w.move_refused) >= 2
    });
    assert_eq!(new.stats().total(|w| w.active), 2, "two stay where they are");
    for (i, c) in conns.iter_mut().enumerate() {
        echo_once(c, &[100 + i as u8]);
    }
    // One connection ends: if it was one of the four, one of the two left moves into its slot;
    // either way the new engine holds four and the old one one.
    drop(conns.remove(0));
    wait_until("four in the new engine, one left in the old", Duration::from_secs(10), || {
        let (n, o) = (newer.stats(), new.stats());
        n.total(|w| w.active) == 4 && o.total(|w| w.active) == 1
    });
    for (i, c) in conns.iter_mut().enumerate() {
        echo_once(c, &[200 + i as u8]);
    }
    drop(conns);
    assert_clean(newer, &[hold.addr.port()]);
    assert_clean(new, &[hold.addr.port()]);
    assert_clean(old, &[hold.addr.port()]);
}

/// Reads the tag byte a `Mode::Tag` backend sends first.
fn tag(c: &mut TcpStream) -> u8 {
    let mut t = [0u8];
    c.read_exact(&mut t).unwrap();
    t[0]
}

#[test]
fn connections_of_a_removed_server_follow_on_removed() {
    for rule in ["keep", "close"] {
        let (a, b) = (Backend::start(Mode::Tag(1)), Backend::start(Mode::Tag(2)));
        let y = |servers: &str| {
            format!(
                "global: {{ workers: 2 }}\ndefaults: {{ timeout: {{ client: 30s, server: 30s, drain: 2s }} }}\n\
                 frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
                 backends: [{{ name: be, on_removed: {rule}, close_spread: 200ms, servers: [{servers}] }}]\n"
            )
        };
        let sa = format!("{{ name: a, address: \"{}\" }}", a.addr);
        let sb = format!("{{ name: b, address: \"{}\" }}", b.addr);
        let mut old = engine(&y(&format!("{sa}, {sb}")));
        let fe = addr(&old, "fe");
        let mut conns: Vec<(u8, TcpStream)> = (0..20)
            .map(|i| {
                let mut c = connect(fe);
                let t = tag(&mut c);
                echo_once(&mut c, &[i]);
                (t, c)
            })
            .collect();
        let on_b = conns.iter().filter(|(t, _)| *t == 2).count() as u64;
        assert!(on_b > 0 && on_b < 20, "both servers have connections");
        let new = old.reload(&y(&sa));
        wait_moved(&new, 20 - on_b);
        let reloaded = Instant::now();
        for (t, c) in conns.iter_mut() {
            match (*t, rule) {
                (1, _) => echo_once(c, b"moved"),
                // Still served by the old engine, until its drain ends.
                (_, "keep") => echo_once(c, b"kept"),
                _ => {}
            }
        }
        for (_, c) in conns.iter_mut().filter(|(t, _)| *t == 2) {
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let (_, err) = read_to_end(c);
            let at = reloaded.elapsed();
            assert!(err.is_none(), "{rule}: closed, not reset: {err:?}");
            if rule == "close" {
                assert!(at < Duration::from_millis(1500), "{rule}: closed at once (over close_spread), after {at:?}");
            } else {
                assert!(at >= Duration::from_millis(1500), "{rule}: kept until the drain ends, closed after {at:?}");
            }
        }
        wait_finished(&old);
        let s = new.stats();
        assert_eq!(s.total(|w| w.active), 20 - on_b);
        drop(conns);
        assert_clean(new, &[a.addr.port(), b.addr.port()]);
        assert_clean(old, &[a.addr.port(), b.addr.port()]);
    }
}

/// A reload moves every established connection even when `timeout.drain` is shorter than a move
/// takes: the drain's deadline cuts what cannot move, not connections on their way (it stays
/// ahead of the moves), so a tiny drain closes nothing that the new engine can take.
#[test]
fn a_drain_shorter_than_a_move_still_moves_every_connection() {
    let echo = Backend::start(Mode::Echo);
    let y = |drain: &str| {
        format!(
            "global: {{ workers: 2 }}\ndefaults: {{ timeout: {{ client: 30s, server: 30s, drain: {drain} }} }}\n\
             frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
             backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
            echo.addr
        )
    };
    let mut old = engine(&y("1ms"));
    let fe = addr(&old, "fe");
    let mut idle = held_echoing(fe, 300);
    let mut pump = Pump::connect(fe, 5, false).unwrap().limit(4 * MIB).paced(4 * MIB);
    let until = Instant::now() + Duration::from_millis(200);
    while Instant::now() < until {
        pump.step().unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(pump.received > 0 && pump.received < 4 * MIB, "mid-transfer at the reload");
    let new = old.reload(&y("1ms"));
    let start = Instant::now();
    while new.stats().total(|w| w.moved_in) < 301 && start.elapsed() < Duration::from_secs(20) {
        pump.step().unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    wait_moved(&new, 301);
    wait_finished(&old);
    // What the old engine did, from its workers' counters as they exited: it moved all, cut none.
    old.join();
    let (moved_out, closed): (u64, u64) = old.exited().iter().fold((0, 0), |(m, c), w| (m + w.moved_out, c + w.closed));
    assert_eq!((moved_out, closed), (301, 0), "moved out, closed by the old engine");
    pump.run(Instant::now() + Duration::from_secs(60)).unwrap();
    pump.intact().unwrap();
    for (i, c) in idle.iter_mut().enumerate() {
        echo_once(c, format!("moved despite a 1 ms drain {i}").as_bytes());
    }
    let s = new.stats();
    assert_eq!(s.total(|w| w.closed), 1, "only the transfer ended");
    assert_eq!(s.total(|w| w.active), 300);
    drop(idle);
    drop(pump);
    assert_clean(new, &[echo.addr.port()]);
    assert_clean(old, &[echo.addr.port()]);
}

/// Connections open from each source address toward the server, summed over the workers (sources
/// with none left out).
fn per_source(engine: &TestEngine) -> std::collections::BTreeMap<std::net::IpAddr, u64> {
    let mut by_ip = std::collections::BTreeMap::new();
    for src in engine.stats().workers.iter().flat_map(|w| w.sources.iter()) {
        if src.active > 0 {
            *by_ip.entry(src.ip).or_insert(0) += src.active;
        }
    }
    by_ip
}

/// A moved connection keeps its socket, so its source port: the new engine counts it against that
/// source, found among many (a /24 gives each of 2 workers 128 sources, looked up by address), and
/// gives it back when the connection closes; new connections take the least used sources.
#[test]
fn moved_connections_count_against_the_sources_they_hold() {
    let echo = Backend::start(Mode::Echo);
    let y = format!(
        "global: {{ workers: 2 }}\ndefaults: {{ timeout: {{ client: 30s, server: 30s, drain: 10s }} }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{}\", source: 127.66.0.0/24 }}] }}]\n",
        echo.addr
    );
    let mut old = engine(&y);
    let fe = addr(&old, "fe");
    let mut conns = held_echoing(fe, 60);
    let before = per_source(&old);
    assert_eq!(before.len(), 60, "each of the 60 on a source of its own (the least used): {before:?}");
    let new = old.reload(&y);
    wait_moved(&new, 60);
    wait_finished(&old);
    assert_eq!(per_source(&new), before, "each counted against the source it holds");
    // Every other one closes: its source is given back.
    let kept: Vec<TcpStream> = conns.drain(..).enumerate().filter(|(i, _)| i % 2 == 0).map(|(_, c)| c).collect();
    wait_until("30 connections left on 30 sources", Duration::from_secs(10), || {
        let now = per_source(&new);
        now.len() == 30 && now.values().all(|&n| n == 1) && now.keys().all(|ip| before.contains_key(ip))
    });
    // Ten more: each takes a source with none (the least used), so still one per source.
    conns = kept;
    for i in 0..10u8 {
        let mut c = connect(fe);
        echo_once(&mut c, &[i]);
        conns.push(c);
    }
    let now = per_source(&new);
    assert_eq!((now.len(), now.values().sum::<u64>()), (40, 40), "one per source: {now:?}");
    for (i, c) in conns.iter_mut().enumerate() {
        echo_once(c, format!("still here {i}").as_bytes());
    }
    drop(conns);
    wait_until("every source given back", Duration::from_secs(10), || per_source(&new).is_empty());
    assert_clean(new, &[echo.addr.port()]);
    assert_clean(old, &[echo.addr.port()]);
}
