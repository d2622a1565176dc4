//! Server choice (roundrobin, leastconn, source, random), source-IP shards and retries.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::common::*;

fn tagged(n: u8) -> Vec<Backend> {
    (0..n).map(|i| Backend::start(Mode::Tag(i))).collect()
}

fn servers_yaml(backends: &[Backend]) -> String {
    let items: Vec<String> =
        backends.iter().enumerate().map(|(i, b)| format!("{{ name: s{i}, address: \"{}\" }}", b.addr)).collect();
    format!("[{}]", items.join(", "))
}

/// Connects, reads the server's tag byte, checks an echo, closes.
fn which_server(proxy: SocketAddr, from: Option<IpAddr>) -> u8 {
    let mut c = match from {
        Some(ip) => connect_from(proxy, ip),
        None => connect(proxy),
    };
    let mut tag = [0u8];
    c.read_exact(&mut tag).unwrap();
    echo_once(&mut c, b"ping");
    tag[0]
}

#[test]
fn roundrobin_spreads_evenly() {
    let bs = tagged(3);
    let engine = engine(&format!(
        "global: {{ workers: 2 }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, balance: roundrobin, servers: {} }}]\n",
        servers_yaml(&bs)
    ));
    let proxy = addr(&engine, "fe");
    let mut counts = [0u32; 3];
    for _ in 0..90 {
        counts[which_server(proxy, None) as usize] += 1;
    }
    let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
    // Each worker rotates on its own: at most one connection per worker from even.
    assert!(max - min <= 2, "{counts:?}");
    assert_clean(engine, &ports_of(&bs));
}

#[test]
fn roundrobin_follows_weights() {
    let bs = tagged(2);
    let engine = engine(&format!(
        "global: {{ workers: 1 }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, servers: [{{ name: a, address: \"{}\", weight: 1 }}, {{ name: b, address: \"{}\", weight: 3 }}] }}]\n",
        bs[0].addr, bs[1].addr
    ));
    let proxy = addr(&engine, "fe");
    let mut counts = [0u32; 2];
    for _ in 0..40 {
        counts[which_server(proxy, None) as usize] += 1;
    }
    assert_eq!(counts, [10, 30]);
    assert_clean(engine, &ports_of(&bs));
}

#[test]
fn leastconn_sends_new_connections_to_the_least_loaded_server() {
    let held = [Backend::start(Mode::Hold), Backend::start(Mode::Hold)];
    // One worker, so its view is the whole view.
    let engine = engine(&format!(
        "global: {{ workers: 1 }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, balance: leastconn, servers: {} }}]\n",
        servers_yaml(&held)
    ));
    let proxy = addr(&engine, "fe");
    let mut conns = Vec::new();
    for i in 0..4u8 {
        let mut c = connect(proxy);
        echo_once(&mut c, &[i]);
        conns.push(c);
    }
    assert_eq!((held[0].active(), held[1].active()), (2, 2), "spread evenly while equal");
    // Server 0 ends its connections; their clients see EOF and close too.
    held[0].release();
    wait_until("server 0 to close its side", Duration::from_secs(5), || held[0].active() == 0);
    conns.retain_mut(|c| {
        c.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut b = [0u8; 1];
        !matches!(c.read(&mut b), Ok(0))
    });
    assert_eq!(conns.len(), 2);
    wait_until("the proxy to close them", Duration::from_secs(5), || engine.stats().servers()[0].active == 0);
    // The next two connections must both go to the idle server.
    for _ in 0..2 {
        let mut c = connect(proxy);
        // Server 0 (released) echoes the first message, then closes.
        echo_once(&mut c, b"p");
        conns.push(c);
    }
    assert_eq!(held[0].total(), 4, "both new connections went to the idle server");
    assert_eq!(held[1].total(), 2);
    drop(conns);
    assert_clean(engine, &ports_of(&held));
}

#[test]
fn source_hash_is_sticky_per_client_ip_and_spreads_ips() {
    let bs = tagged(3);
    let engine = engine(&format!(
        "global: {{ workers: 2 }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, balance: source, servers: {} }}]\n",
        servers_yaml(&bs)
    ));
    let proxy = addr(&engine, "fe");
    let mut used = HashSet::new();
    for i in 1..=24u8 {
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 3, i));
        // Several connections from one IP (different source ports, so different workers too).
        let first = which_server(proxy, Some(ip));
        for _ in 0..3 {
            assert_eq!(which_server(proxy, Some(ip)), first, "client {ip} moved");
        }
        used.insert(first);
    }
    assert_eq!(used.len(), 3, "24 client IPs should reach all 3 servers");
    assert_clean(engine, &ports_of(&bs));
}

#[test]
fn random_uses_every_server() {
    let bs = tagged(2);
    let engine = engine(&format!(
        "global: {{ workers: 2 }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, balance: random, servers: {} }}]\n",
        servers_yaml(&bs)
    ));
    let proxy = addr(&engine, "fe");
    let mut counts = [0u32; 2];
    for _ in 0..60 {
        counts[which_server(proxy, None) as usize] += 1;
    }
    assert!(counts.iter().all(|&c| c >= 10), "{counts:?}");
    assert_clean(engine, &ports_of(&bs));
}

#[test]
fn sources_come_from_the_configured_ips_and_each_worker_uses_its_own_shard() {
    let backend = Backend::unshared(Mode::Hold);
    let engine = engine(&format!(
        "global: {{ workers: 2 }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{}\", source: 127.0.2.1-127.0.2.4 }}] }}]\n",
        backend.addr
    ));
    let conns = connections_from_each_workers_own_sources(&engine, &backend, "s", 40);
    drop(conns);
    assert_clean(engine, &[backend.addr.port()]);
}

/// A server added at run time gets its sources as one at start does (the workers take blocks of
/// addresses made by the engine's caller, sources.rs): each connection from the address its
/// worker's shard names, counted against that source. Its backend's first server has no source
/// (its connections come from 127.0.0.1).
#[test]
fn a_server_added_at_run_time_connects_from_each_workers_own_sources() {
    let backend = Backend::unshared(Mode::Hold);
    let yaml = |added: &str| {
        format!(
            "global: {{ workers: 2 }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
             backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}{added}] }}]\n",
            backend.addr
        )
    };
    let engine = engine(&yaml(""));
    let added = format!(", {{ name: t, address: \"{}\", source: 127.0.2.1-127.0.2.4 }}", backend.addr);
    engine.add_server(0, 1, std::sync::Arc::new(ringproxy::config::parse(&yaml(&added), "t").unwrap())).unwrap();
    let conns = connections_from_each_workers_own_sources(&engine, &backend, "t", 80);
    drop(conns);
    assert_clean(engine, &[backend.addr.port()]);
}

/// Opens `n` connections through the engine's `fe` (held, returned) and checks server `server`'s
/// sources 127.0.2.1-127.0.2.4: the workers' shards are disjoint halves of them; each source's
/// connections as the workers count them are those the backend saw from it; a worker that took 4
/// or more connections to the server used both of its sources.
fn connections_from_each_workers_own_sources(
    engine: &ringproxy::Engine,
    backend: &Backend,
    server: &str,
    n: u32,
) -> Vec<std::net::TcpStream> {
    let conns = held_echoing(addr(engine, "fe"), n);
    let configured: HashSet<IpAddr> = (1..=4).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 2, i))).collect();
    let mut seen = backend.peer_ips();
    seen.remove(&IpAddr::V4(Ipv4Addr::LOCALHOST)); // (a server without sources)
    assert!(seen.keys().all(|ip| configured.contains(ip)), "unexpected source in {seen:?}");
    assert!(seen.values().sum::<usize>() >= n as usize / 4, "{seen:?}");
    let stats = engine.stats();
    let mut shards: Vec<HashSet<IpAddr>> = Vec::new();
    let mut per_ip: HashMap<IpAddr, u64> = HashMap::new();
    for w in &stats.workers {
        let rows: Vec<_> = w.sources.iter().filter(|s| s.server == server).collect();
        shards.push(rows.iter().map(|s| s.ip).collect());
        for s in &rows {
            *per_ip.entry(s.ip).or_insert(0) += s.active;
        }
        // And every worker that took connections spread them over both of its sources.
        if rows.iter().map(|s| s.active).sum::<u64>() >= 4 {
            assert!(rows.iter().all(|s| s.active > 0), "worker {} left a source unused: {rows:?}", w.worker);
        }
    }
    assert_eq!(shards[0].len(), 2);
    assert_eq!(shards[1].len(), 2);
    assert!(shards[0].is_disjoint(&shards[1]), "workers share a source: {shards:?}");
    assert_eq!(shards[0].union(&shards[1]).cloned().collect::<HashSet<_>>(), configured);
    // What each worker says it opened from each source is what the server saw.
    assert_eq!(per_ip.values().sum::<u64>(), seen.values().sum::<usize>() as u64);
    for (ip, n) in &seen {
        assert_eq!(per_ip.get(ip).copied().unwrap_or(0), *n as u64, "source {ip}");
    }
    conns
}

#[test]
fn retries_reach_the_live_server_when_the_other_is_down() {
    let live = Backend::start(Mode::Echo);
    let dead: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }; // closed again: connecting to it is refused
    let engine = engine(&format!(
        "global: {{ workers: 2 }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, retries: 2, servers: [{{ name: dead, address: \"{dead}\" }}, {{ name: live, address: \"{}\" }}] }}]\n",
        live.addr
    ));
    let proxy = addr(&engine, "fe");
    for i in 0..50u32 {
        let mut c = connect(proxy);
        echo_once(&mut c, &i.to_le_bytes());
    }
    assert_eq!(live.total(), 50, "every connection succeeded on the live server");
    let stats = engine.stats();
    assert!(stats.total(|w| w.connect_errors.refused) >= 10, "the dead server was tried");
    assert_eq!(stats.total(|w| w.retries), stats.total(|w| w.connect_errors.refused));
    assert_eq!(stats.total(|w| w.failed), 0);
    assert_clean(engine, &[live.addr.port(), dead.port()]);
}
