//! The runtime API (`global.stats.admin_socket`, `ringproxy cmd`): taking a server out and back
//! (`set server ... state`), weights, `shutdown sessions` at once and over `close_spread`,
//! `slowstart`, `show conns`; the read-only stats socket refusing every change; refused commands
//! changing nothing; a reload naming the runtime changes it dropped.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::*;
use ringproxy::stats::socket;

/// `ringproxy cmd --socket SOCK LINE`: exit code and what it printed.
fn cmd(sock: &Path, line: &str) -> (Option<i32>, String) {
    let out = ringproxy().args(["cmd", "--socket"]).arg(sock).arg(line).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// Runs `line` on the admin socket and expects it done.
fn ok(sock: &Path, line: &str) -> String {
    let (code, text) = cmd(sock, line);
    assert_eq!(code, Some(0), "{line}: {text}");
    text
}

/// Runs `line` and expects it refused with `why` in the answer.
fn refused(sock: &Path, line: &str, why: &str) {
    let (code, text) = cmd(sock, line);
    assert_eq!(code, Some(1), "{line}: {text}");
    assert!(text.contains(why), "{line}: wanted {why:?} in {text}");
}

/// A connection through the proxy, and the tag of the server it reached.
fn tagged(front: SocketAddr) -> (TcpStream, u8) {
    let mut c = connect(front);
    let mut t = [0u8];
    c.read_exact(&mut t).unwrap();
    (c, t[0])
}

/// Of `n` new connections (each closed after its tag), how many reached the server tagged 1.
fn to_first(front: SocketAddr, n: usize) -> usize {
    (0..n).filter(|_| tagged(front).1 == 1).count()
}

/// The engine's server rows, as JSON gives them.
fn servers(sock: &Path) -> Vec<ringproxy::stats::ServerStats> {
    socket::fetch(sock).unwrap().servers
}

/// The servers' names, in the order of their rows.
fn server_names(sock: &Path) -> Vec<String> {
    servers(sock).into_iter().map(|r| r.server).collect()
}

/// A row's status, weight and active connections.
fn row(sock: &Path, name: &str) -> (String, u64, u64) {
    let r = servers(sock).into_iter().find(|r| r.server == name).unwrap();
    (r.status().to_string(), r.weight, r.active)
}

/// `ringproxy reload` through `admin`: it succeeds, names the runtime changes `dropped` (as `;`
/// separated commands), and the proxy reaches generation 1.
fn reload_dropping(admin: &Path, proxy: &mut Proxy, dropped: &str) {
    let out = ringproxy().args(["reload", "--socket"]).arg(admin).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let dropped = format!("runtime changes dropped (the file wins): {dropped}");
    assert!(text.contains(&dropped), "{dropped} in {text}");
    proxy.wait_generation(1);
}

fn sockets(name: &str) -> (PathBuf, PathBuf) {
    (temp_path(&format!("{name}-stats.sock")), temp_path(&format!("{name}-admin.sock")))
}

fn config(stats: &Path, admin: &Path, a: SocketAddr, b: SocketAddr, backend_extra: &str, a_extra: &str) -> String {
    format!(
        "global: {{ workers: 2, stats: {{ socket: {}, admin_socket: {} }} }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be, allow: [127.0.0.0/8] }}]\n\
         backends:\n  - name: be\n    balance: roundrobin\n{backend_extra}    servers:\n\
         \x20     - {{ name: a, address: \"{a}\"{a_extra} }}\n      - {{ name: b, address: \"{b}\" }}\n",
        stats.display(),
        admin.display()
    )
}

/// Every command on real sockets: what it does to new and open connections, what the stats
/// say, and that a refused command (read-only socket, unknown names, bad words) changes nothing.
#[test]
fn set_server_state_weight_and_shutdown_sessions_do_what_they_say_and_nothing_else() {
    let (a, b) = (Backend::start(Mode::Tag(1)), Backend::start(Mode::Tag(2)));
    let (stats, admin) = sockets("rt");
    let mut proxy = Proxy::start("rt", &config(&stats, &admin, a.addr, b.addr, "", ""));
    let front = proxy.addr("fe");
    let half = to_first(front, 40);
    assert!((16..=24).contains(&half), "round robin over a and b: {half} of 40 to a");

    // The read-only socket refuses every change, and so does a malformed or unknown command on
    // the admin socket: none changes anything.
    let settings = || -> Vec<(String, String, u64)> {
        servers(&stats).into_iter().map(|r| (r.server.clone(), r.status().to_string(), r.weight)).collect()
    };
    let before = settings();
    assert_eq!(before, [("a".into(), "UP".into(), 1), ("b".into(), "UP".into(), 1)]);
    for line in ["set server be/a state drain", "set server be/a weight 0", "shutdown sessions server be/a", "reload"] {
        refused(&stats, line, "this socket is read-only; send it to the admin socket");
    }
    refused(&admin, "set server nope/a state drain", "no backend \"nope\" (backends: be)");
    refused(&admin, "set server be/c state drain", "backend \"be\" has no server \"c\" (servers: a, b)");
    refused(&admin, "set server be/a state down", "state \"down\" is not one of ready, drain, maint");
    refused(&admin, "set server be/a weight 999", "weight \"999\" is not a whole number from 0 to 256");
    refused(&admin, "shutdown sessions server be", "\"be\" is not BACKEND/SERVER");
    refused(&admin, "show conns be/zz", "has no server \"zz\"");
    refused(&admin, "frobnicate", "unknown command \"frobnicate\"");
    assert_eq!(settings(), before, "refused commands changed nothing");
    let half = to_first(front, 40);
    assert!((16..=24).contains(&half), "still round robin: {half} of 40 to a");

    // drain: no new connection to a; one open to it continues, and `show conns` lists it.
    let (mut held, tag) = (0..8).map(|_| tagged(front)).find(|(_, t)| *t == 1).unwrap();
    assert_eq!(tag, 1);
    let text = ok(&admin, "set server be/a state drain");
    assert!(text.contains("set server be/a state drain: applied by every worker"), "{text}");
    assert_eq!(to_first(front, 20), 0, "a draining server takes no new connection");
    echo_once(&mut held, b"drained, not cut");
    assert_eq!(row(&stats, "a").0, "DRAIN");
    // (The client's address is known: the frontend's `allow` list needs it.)
    let listed = ok(&stats, "show conns be/a");
    let me = held.local_addr().unwrap().to_string();
    assert!(listed.starts_with("1 connections listed (limit 100)\n"), "{listed}");
    assert!(listed.contains(&format!("client={me} server=be/a")) && listed.contains("state=established"), "{listed}");
    let all = ok(&stats, "show conns limit 1");
    assert!(all.starts_with("1 connections listed (limit 1)\n") && all.lines().count() == 2, "{all}");

    // maint, then ready again: back to round robin.
    ok(&admin, "set server be/a state maint");
    assert_eq!(row(&stats, "a").0, "MAINT");
    assert_eq!(to_first(front, 10), 0);
    ok(&admin, "set server be/a state ready");
    assert_eq!(row(&stats, "a").0, "UP");
    let half = to_first(front, 40);
    assert!((16..=24).contains(&half), "ready again: {half} of 40 to a");

    // weight: 0 takes nothing new; 3 against b's 1 takes three quarters (smooth round robin per
    // worker: within one connection per worker of exact).
    ok(&admin, "set server be/a weight 0");
    assert_eq!(to_first(front, 20), 0);
    ok(&admin, "set server be/a weight 3");
    assert_eq!(row(&stats, "a").1, 3);
    let three_quarters = to_first(front, 40);
    assert!((27..=33).contains(&three_quarters), "weight 3:1 gave {three_quarters} of 40 to a");

    // shutdown sessions: every connection to a is closed (a FIN: the client reads its end),
    // those to b are not; counted as killed.
    let mut on_a = vec![held];
    let mut on_b = Vec::new();
    while on_a.len() < 4 || on_b.is_empty() {
        let (c, t) = tagged(front);
        if t == 1 { on_a.push(c) } else { on_b.push(c) }
    }
    wait_until("a's connections to show", Duration::from_secs(5), || row(&stats, "a").2 == on_a.len() as u64);
    let text = ok(&admin, "shutdown sessions server be/a");
    assert!(text.contains("its connections are closed"), "{text}");
    for c in &mut on_a {
        let mut buf = [0u8; 16];
        assert!(matches!(c.read(&mut buf), Ok(0) | Err(_)), "a connection to a stays open");
    }
    for c in &mut on_b {
        echo_once(c, b"b's connections live on");
    }
    wait_until("a to have no connection", Duration::from_secs(5), || row(&stats, "a").2 == 0);
    let info = socket::query(&stats, "show info").unwrap();
    assert!(info.contains(&format!("killed: {}\n", on_a.len())), "{info}");
    drop(on_a);
    drop(on_b);

    // A reload: the file wins, and its answer names the runtime change it dropped. Through the
    // admin socket only (refused on the stats socket above).
    let out = ringproxy().args(["reload", "-c"]).arg(proxy.config()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("runtime changes dropped (the file wins): set server be/a weight 3"), "{text}");
    proxy.wait_generation(1);
    assert_eq!(row(&stats, "a").1, 1, "the configured weight is back");
    let half = to_first(front, 40);
    assert!((16..=24).contains(&half), "after the reload: {half} of 40 to a");
    // Set back to what the file says, a change is no longer a change: the next reload drops none.
    ok(&admin, "set server be/a state drain");
    ok(&admin, "set server be/a state ready");
    let out = ringproxy().args(["reload", "--socket"]).arg(&admin).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("runtime changes dropped"), "{text}");
    proxy.wait_generation(2);
    proxy.stop_clean();
}

/// `close_spread`: a shutdown of 40 connections over 2 s closes them at an even pace (not all in
/// the same instant), and all of them within the window.
#[test]
fn close_spread_paces_a_shutdown_over_its_window() {
    let (a, b) = (Backend::start(Mode::Tag(1)), Backend::start(Mode::Tag(2)));
    let (stats, admin) = sockets("spread");
    let yaml = config(&stats, &admin, a.addr, b.addr, "    close_spread: 2s\n", "");
    let proxy = Proxy::start("spread", &yaml);
    let front = proxy.addr("fe");
    let mut on_a = Vec::new();
    while on_a.len() < 40 {
        let (c, t) = tagged(front);
        if t == 1 {
            on_a.push(c);
        }
    }
    wait_until("the 40 connections to show", Duration::from_secs(5), || row(&stats, "a").2 == 40);
    let start = Instant::now();
    let text = ok(&admin, "shutdown sessions server be/a");
    assert!(text.contains("closing its connections over 2s"), "{text}");
    // One reader per connection: when did each see its end?
    let ends: Vec<Duration> = join_all(
        on_a.into_iter()
            .map(|mut c| {
                spawn(move || {
                    let mut buf = [0u8; 16];
                    let _ = c.read(&mut buf);
                    start.elapsed()
                })
            })
            .collect(),
    );
    let (first, last) = (*ends.iter().min().unwrap(), *ends.iter().max().unwrap());
    assert!(last <= Duration::from_millis(2_800), "all closed within the window (+ margin): last at {last:?}");
    assert!(last - first >= Duration::from_millis(1_200), "spread over the window: {first:?} .. {last:?}");
    // Even: no quarter of a second sees more than a third of them (40 at once without it).
    let busiest = ends
        .iter()
        .map(|t| ends.iter().filter(|u| **u >= *t && **u < *t + Duration::from_millis(250)).count())
        .max()
        .unwrap();
    assert!(busiest <= 13, "{busiest} closes within 250 ms: {ends:?}");
    let info = socket::query(&stats, "show info").unwrap();
    assert!(info.contains("killed: 40\n"), "{info}");
    proxy.stop_clean();
}

/// `slowstart`: a server set ready again ramps from ~0 to its full weight over the window:
/// right after, it takes a small share of new connections and reports a low weight; once the
/// window has passed, its full half.
#[test]
fn slowstart_ramps_a_returning_server_from_little_to_its_full_share() {
    let (a, b) = (Backend::start(Mode::Tag(1)), Backend::start(Mode::Tag(2)));
    let (stats, admin) = sockets("slow");
    let yaml = config(&stats, &admin, a.addr, b.addr, "", ", weight: 100, slowstart: 3s");
    let proxy = Proxy::start("slow", &yaml.replace("name: b, address", "name: b, weight: 100, address"));
    let front = proxy.addr("fe");
    ok(&admin, "set server be/a state maint");
    assert_eq!(to_first(front, 10), 0);
    let back = Instant::now();
    ok(&admin, "set server be/a state ready");
    let (status, weight, _) = row(&stats, "a");
    assert_eq!(status, "UP");
    assert!(weight < 30, "just back, a is balanced with a low weight: {weight}");
    let early = to_first(front, 40);
    let early_took = back.elapsed();
    assert!(early_took < Duration::from_millis(1_000), "the early sample took {early_took:?}");
    assert!(early <= 12, "in the first {early_took:?} of a 3s ramp a took {early} of 40 (half is 20)");
    std::thread::sleep(Duration::from_millis(3_100).saturating_sub(back.elapsed()));
    let late = to_first(front, 40);
    assert!((16..=24).contains(&late), "after the ramp a takes half again: {late} of 40");
    assert_eq!(row(&stats, "a").1, 100);
    proxy.stop_clean();
}

/// `balance: hash` (Maglev on the client address), from 60 real source addresses through three
/// servers: each address keeps its server; one server taken out moves only its own clients (to
/// the other two), and they return when it comes back.
#[test]
fn balance_hash_moves_only_the_clients_of_a_server_taken_out() {
    let backends = [Backend::start(Mode::Tag(1)), Backend::start(Mode::Tag(2)), Backend::start(Mode::Tag(3))];
    let (stats, admin) = sockets("hash");
    let yaml = format!(
        "global: {{ workers: 2, stats: {{ socket: {}, admin_socket: {} }} }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends:\n  - name: be\n    balance: hash\n    hash_key: source\n    servers:\n\
         \x20     - {{ name: a, address: \"{}\" }}\n      - {{ name: b, address: \"{}\" }}\n      - {{ name: c, address: \"{}\" }}\n",
        stats.display(),
        admin.display(),
        backends[0].addr,
        backends[1].addr,
        backends[2].addr
    );
    let proxy = Proxy::start("hash", &yaml);
    let front = proxy.addr("fe");
    let ips: Vec<std::net::IpAddr> = (1..=60).map(|i| format!("127.0.4.{i}").parse().unwrap()).collect();
    let place = || -> Vec<u8> {
        ips.iter()
            .map(|ip| {
                let mut c = connect_from(front, *ip);
                let mut t = [0u8];
                c.read_exact(&mut t).unwrap();
                t[0]
            })
            .collect()
    };
    let before = place();
    assert_eq!(place(), before, "each address keeps its server");
    for tag in 1..=3 {
        let n = before.iter().filter(|&&t| t == tag).count();
        assert!((8..=32).contains(&n), "server {tag} has {n} of the 60 addresses: {before:?}");
    }
    ok(&admin, "set server be/a state maint");
    let during = place();
    assert!(during.iter().all(|&t| t != 1), "nobody reaches a server in maintenance");
    let moved_others = before.iter().zip(&during).filter(|(b, d)| **b != 1 && b != d).count();
    assert_eq!(moved_others, 0, "the clients of b and c stay where they were: {before:?} -> {during:?}");
    ok(&admin, "set server be/a state ready");
    assert_eq!(place(), before, "a's clients return to it");
    proxy.stop_clean();
}

/// `add server` and `del server` on real sockets: an added server takes new connections at
/// once (from every worker); one with connections cannot be deleted (and stays as it was); once
/// they are shut down it is, and it leaves the stats; bad adds change nothing; a reload drops
/// what was added and names it.
#[test]
fn add_server_takes_connections_and_del_server_waits_for_none() {
    let (a, b, d) = (Backend::start(Mode::Tag(1)), Backend::start(Mode::Tag(2)), Backend::unshared(Mode::Tag(4)));
    let (stats, admin) = sockets("add");
    let mut proxy = Proxy::start("add", &config(&stats, &admin, a.addr, b.addr, "", ""));
    let front = proxy.addr("fe");
    let names = || server_names(&stats);
    assert_eq!(names(), ["a", "b"]);

    // Refused adds change nothing.
    refused(&admin, &format!("add server be/a {}", d.addr), "already has a server \"a\"");
    refused(&admin, &format!("add server nope/d {}", d.addr), "no backend \"nope\"");
    refused(
        &admin,
        &format!("add server be/d {} source 192.0.2.77", d.addr),
        "source 192.0.2.77 is not an address of this host",
    );
    refused(&admin, &format!("add server be/d! {}", d.addr), "may only contain letters");
    refused(&stats, &format!("add server be/d {}", d.addr), "this socket is read-only");
    assert_eq!(names(), ["a", "b"]);

    // Added (with a source address of its own and a weight): it takes its share at once.
    let text = ok(&admin, &format!("add server be/d {} source 127.0.9.4 weight 2", d.addr));
    assert!(text.contains("added"), "{text}");
    assert_eq!(names(), ["a", "b", "d"]);
    let tags: Vec<u8> = (0..40).map(|_| tagged(front).1).collect();
    let to_d = tags.iter().filter(|&&t| t == 4).count();
    assert!((16..=24).contains(&to_d), "weight 2 of 4 took {to_d} of 40: {tags:?}");
    assert_eq!(d.peer_ips().keys().copied().collect::<Vec<_>>(), ["127.0.9.4".parse::<std::net::IpAddr>().unwrap()]);
    ok(&admin, "set server be/d weight 1");

    // Deleting it while it has a connection is refused, and it keeps taking connections.
    let (mut held, _) = (0..20).map(|_| tagged(front)).find(|(_, t)| *t == 4).unwrap();
    refused(&admin, "del server be/d", "has 1 connection(s) open; `shutdown sessions server be/d`");
    assert_eq!(row(&stats, "d").0, "UP", "the refused delete left it as it was");
    echo_once(&mut held, b"still served");
    ok(&admin, "shutdown sessions server be/d");
    wait_until("d to have no connection", Duration::from_secs(5), || row(&stats, "d").2 == 0);
    ok(&admin, "del server be/d");
    assert_eq!(names(), ["a", "b"]);
    assert!((0..20).all(|_| tagged(front).1 != 4), "a deleted server takes nothing");
    refused(&admin, "set server be/d state ready", "has no server \"d\" (servers: a, b)");
    let prom = socket::query(&stats, "show prometheus").unwrap();
    assert!(!prom.contains("server=\"d\""), "a deleted server leaves the metrics");
    drop(held);

    // A file server deleted, and the name added again: a new server.
    ok(&admin, "set server be/b state maint");
    ok(&admin, "del server be/b");
    ok(&admin, &format!("add server be/b {}", d.addr));
    assert!((0..10).any(|_| tagged(front).1 == 4), "the new b is d's address");

    // Added with a slowstart, it ramps up from ~0 (and, with no connection, deletes at once).
    ok(&admin, &format!("add server be/e {} weight 10 slowstart 10s", a.addr));
    let e = servers(&stats).into_iter().find(|r| r.server == "e").unwrap();
    assert!(e.ramp_pct < 50 && e.weight < 5, "just added: {}% of its weight ({})", e.ramp_pct, e.weight);
    ok(&admin, "del server be/e");

    // A reload: the file wins, and says what it dropped (d and e, added and deleted, left nothing).
    reload_dropping(&admin, &mut proxy, &format!("del server be/b; add server be/b {} weight 1", d.addr));
    assert_eq!(names(), ["a", "b"]);
    let tags: Vec<u8> = (0..20).map(|_| tagged(front).1).collect();
    assert!(tags.contains(&2) && !tags.contains(&4), "the file's b again: {tags:?}");
    proxy.stop_clean();
}

/// A deleted server's index goes to the next server added to its backend: each worker's rows
/// stay as many however often servers come and go (before, each deletion left its row, latency
/// histogram and block of addresses on every worker until a reload, and a backend refused new
/// servers after 65,533 had been added). The server taking the index is the new one throughout:
/// it connects from its own source addresses (its block replaced the old one), under its name.
/// The lowest free index is taken first; a reload still says what it dropped.
#[test]
fn a_deleted_servers_index_goes_to_the_next_server_added() {
    let (a, b, d) = (Backend::start(Mode::Tag(1)), Backend::start(Mode::Tag(2)), Backend::unshared(Mode::Tag(4)));
    let (stats, admin) = sockets("reuse");
    let mut proxy = Proxy::start("reuse", &config(&stats, &admin, a.addr, b.addr, "", ""));
    let front = proxy.addr("fe");
    let names = || server_names(&stats);
    // Every worker's rows, deleted servers' included.
    let rows = || socket::fetch(&stats).unwrap().workers.iter().map(|w| w.servers.len()).collect::<Vec<_>>();
    // Connections until `n` reached d; the source addresses d saw them from.
    let reach_d = |n: usize| {
        let before = d.peer_ips();
        let mut got = 0;
        for _ in 0..(n * 10) {
            if tagged(front).1 == 4 {
                got += 1;
                if got == n {
                    break;
                }
            }
        }
        assert_eq!(got, n, "{n} connections reached the added server");
        let mut after = d.peer_ips();
        for (ip, k) in before {
            *after.get_mut(&ip).unwrap() -= k;
        }
        after.into_iter().filter(|&(_, k)| k > 0).map(|(ip, _)| ip.to_string()).collect::<Vec<_>>()
    };
    let quiet = |name: &str| {
        wait_until(&format!("{name} to have no connection"), Duration::from_secs(5), || row(&stats, name).2 == 0)
    };

    ok(&admin, &format!("add server be/x {} source 127.0.9.21", d.addr));
    assert_eq!(rows(), [3, 3]);
    assert_eq!(reach_d(4), ["127.0.9.21"]);
    quiet("x");
    ok(&admin, "del server be/x");
    // y takes x's index: its row, its place in the balancer, its block of addresses.
    ok(&admin, &format!("add server be/y {} source 127.0.9.22 weight 2", d.addr));
    assert_eq!(rows(), [3, 3], "y took x's index");
    assert_eq!(names(), ["a", "b", "y"]);
    let y = servers(&stats).into_iter().find(|r| r.server == "y").unwrap();
    assert_eq!((y.total, y.weight, y.lingering), (0, 2, 0), "a new row, not x's");
    assert_eq!(reach_d(4), ["127.0.9.22"], "connections to y come from y's source, not x's");

    // Servers coming and going all day: the rows stay as many.
    // (With a maxconn, whose share limit each addition takes from the one before the last.)
    for i in 0..40u8 {
        quiet("y");
        ok(&admin, "del server be/y");
        ok(&admin, &format!("add server be/y {} source 127.0.9.{} maxconn {}", d.addr, 30 + i % 4, 50 + u32::from(i)));
    }
    assert_eq!(rows(), [3, 3], "40 deletions and additions later");
    let y = servers(&stats).into_iter().find(|r| r.server == "y").unwrap();
    assert_eq!((y.maxconn, y.share, y.active), (89, 89, 0), "the last maxconn, split whole over the workers");
    assert_eq!(reach_d(2), ["127.0.9.33"]);

    // The lowest free index first: b (a server of the file, index 1) and y deleted, z takes 1.
    quiet("y");
    ok(&admin, "set server be/b state maint");
    ok(&admin, "del server be/y");
    ok(&admin, "del server be/b");
    ok(&admin, &format!("add server be/z {}", d.addr));
    assert_eq!(names(), ["a", "z"]);
    assert_eq!(rows(), [3, 3]);
    let tags: Vec<u8> = (0..10).map(|_| tagged(front).1).collect();
    assert!(tags.contains(&1) && tags.contains(&4) && !tags.contains(&2), "a and z: {tags:?}");

    // A reload: the file wins and says what it dropped (y, added and deleted, left nothing).
    reload_dropping(&admin, &mut proxy, &format!("del server be/b; add server be/z {} weight 1", d.addr));
    assert_eq!(names(), ["a", "b"]);
    assert_eq!(rows(), [2, 2]);
    proxy.stop_clean();
}

/// Servers replaced under traffic, as service discovery does: clients connect, echo and close
/// (twice, 5 ms apart) without pause through two workers while server x is taken out (`maint`, `shutdown sessions`),
/// deleted and added again 25 times, from a different source address each time. Every exchange
/// that completes comes back intact, none fails but those the shutdowns cut, the rows stay near
/// their number (an index is taken again unless a connection still closing names it), and every
/// server row ends at no connection, open or lingering (the clean-up assertion; in a debug build
/// the counts are also checked at each step).
#[test]
fn servers_replaced_under_traffic_leave_every_count_at_zero() {
    use std::io::Write;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let (a, x) = (Backend::start(Mode::Echo), Backend::unshared(Mode::Echo));
    let (stats, admin) = sockets("replace");
    let yaml = format!(
        "global: {{ workers: 2, stats: {{ socket: {}, admin_socket: {} }} }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends:\n  - name: be\n    balance: roundrobin\n    servers:\n\
         \x20     - {{ name: a, address: \"{}\" }}\n      - {{ name: x, address: \"{}\" }}\n",
        stats.display(),
        admin.display(),
        a.addr,
        x.addr
    );
    let proxy = Proxy::start("replace", &yaml);
    let front = proxy.addr("fe");
    let (stop, done, cut) =
        (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let clients: Vec<_> = (0..4u64)
        .map(|t| {
            let (stop, done, cut) = (stop.clone(), done.clone(), cut.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let msg = format!("client {t} exchange {n:>8}");
                    let mut c = connect(front);
                    let (mut first, mut second) = (vec![0u8; msg.len()], vec![0u8; msg.len()]);
                    // Two echoes 5 ms apart: a connection lives long enough for a shutdown to cut.
                    let exchange = c
                        .write_all(msg.as_bytes())
                        .and_then(|()| c.read_exact(&mut first))
                        .map(|()| std::thread::sleep(Duration::from_millis(5)))
                        .and_then(|()| c.write_all(msg.as_bytes()))
                        .and_then(|()| c.read_exact(&mut second));
                    match exchange {
                        Ok(()) => {
                            assert!(
                                first == msg.as_bytes() && second == msg.as_bytes(),
                                "an exchange came back intact"
                            );
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        // Cut by a `shutdown sessions` (FIN or reset, before the answer).
                        Err(_) => {
                            cut.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    let rows = || socket::fetch(&stats).unwrap().workers.iter().map(|w| w.servers.len()).max().unwrap_or(0);
    for i in 0..25u8 {
        ok(&admin, "set server be/x state maint");
        ok(&admin, "shutdown sessions server be/x");
        wait_until("x to have no connection", Duration::from_secs(5), || row(&stats, "x").2 == 0);
        ok(&admin, "del server be/x");
        ok(&admin, &format!("add server be/x {} source 127.0.9.{}", x.addr, 40 + i % 8));
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let (done, cut) = (done.load(Ordering::Relaxed), cut.load(Ordering::Relaxed));
    assert!(done > 100, "{done} exchanges completed ({cut} cut)");
    assert!(cut <= 25 * 4, "only the shutdowns cut exchanges (at most one per client each): {cut}");
    let kept = rows();
    eprintln!("{done} exchanges, {cut} cut; {kept} server rows on a worker after 25 replacements");
    assert!(kept < 2 + 25, "indices were taken again: {kept} rows on a worker after 25 replacements");
    // (The file's x has no source address: its connections come from 127.0.0.1.)
    let sources: Vec<String> =
        x.peer_ips().keys().map(ToString::to_string).filter(|ip| ip.as_str() != "127.0.0.1").collect();
    assert!(sources.len() > 1 && sources.iter().all(|ip| ip.starts_with("127.0.9.4")), "{sources:?}");
    proxy.stop_clean();
}

/// A deleted server that a connection still names is not given to the next server added: here a
/// connection refused by x waits in the queue for a (at its maxconn) and names x meanwhile (its
/// `lingering` count). y then gets a new index (and the queued connection); once nothing names x,
/// the next server added takes its index.
#[test]
fn a_deleted_server_still_named_by_a_connection_keeps_its_index_until_it_is_not() {
    let (a, d) = (Backend::start(Mode::Tag(1)), Backend::unshared(Mode::Tag(4)));
    let refused_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (stats, admin) = sockets("linger");
    let yaml = format!(
        "global: {{ workers: 1, stats: {{ socket: {}, admin_socket: {} }} }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends:\n  - name: be\n    balance: roundrobin\n    timeout: {{ connect: 10s, queue: 20s }}\n    servers:\n\
         \x20     - {{ name: a, address: \"{}\", maxconn: 1 }}\n      - {{ name: x, address: \"{refused_port}\" }}\n",
        stats.display(),
        admin.display(),
        a.addr,
    );
    let proxy = Proxy::start("linger", &yaml);
    let front = proxy.addr("fe");
    let rows = || socket::fetch(&stats).unwrap().workers.iter().map(|w| w.servers.len()).collect::<Vec<_>>();
    let lingering = |name: &str| servers(&stats).into_iter().find(|r| r.server == name).map_or(0, |r| r.lingering);

    // a is full; the next connection is refused by x and waits for a, naming x.
    let (first, tag) = tagged(front);
    assert_eq!(tag, 1, "x refuses: the first connection is a's");
    let mut queued = connect(front);
    wait_until("a connection refused by x to wait, naming x", Duration::from_secs(5), || lingering("x") == 1);
    assert_eq!(row(&stats, "x").2, 0, "it holds nothing of x");
    ok(&admin, "set server be/x state maint");
    ok(&admin, "del server be/x");
    ok(&admin, &format!("add server be/y {}", d.addr));
    assert_eq!(rows(), [3], "y did not take x's index: a connection names x");

    // The queue is served by the new server at once: the connection names x no more.
    let mut t = [0u8];
    queued.read_exact(&mut t).unwrap();
    assert_eq!(t[0], 4, "the queued connection reached y");
    assert_eq!(lingering("x"), 0);
    drop(queued);
    wait_until("y to have no connection", Duration::from_secs(5), || row(&stats, "y").2 == 0);
    ok(&admin, "del server be/y");
    ok(&admin, &format!("add server be/z {}", d.addr));
    assert_eq!(rows(), [3], "z took x's index (the lowest free)");
    assert_eq!(server_names(&stats), ["a", "z"]);
    drop(first);
    proxy.stop_clean();
}

/// `show conns` filtered by frontend, client (address, or address and port) and server, in any
/// order and together: exactly the connections each names. A client filter where no frontend in
/// scope learns its clients' addresses is refused with why, not answered with an empty list.
#[test]
fn show_conns_lists_the_connections_of_a_frontend_a_client_or_a_server() {
    let (a, b) = (Backend::start(Mode::Echo), Backend::start(Mode::Echo));
    let (stats, admin) = sockets("conns");
    let proxy = Proxy::start(
        "conns",
        &format!(
            "global: {{ workers: 2, stats: {{ socket: {}, admin_socket: {} }} }}\n\
             frontends:\n  - {{ name: known, bind: \"127.0.0.1:0\", backend: be, allow: [127.0.0.0/8] }}\n\
             \x20 - {{ name: plain, bind: \"127.0.0.1:0\", backend: be }}\n\
             backends:\n  - {{ name: be, servers: [{{ name: a, address: \"{}\" }}, {{ name: b, address: \"{}\" }}] }}\n",
            stats.display(),
            admin.display(),
            a.addr,
            b.addr
        ),
    );
    let (known, plain) = (proxy.addr("known"), proxy.addr("plain"));
    let from = |i: u8| std::net::IpAddr::from([127, 0, 7, i]);
    // Two clients on `known` from 127.0.7.1, one from 127.0.7.2; two on `plain`.
    let mut held: Vec<TcpStream> = [(known, 1), (known, 1), (known, 2), (plain, 1), (plain, 2)]
        .into_iter()
        .map(|(fe, i)| {
            let mut c = connect_from(fe, from(i));
            echo_once(&mut c, b"here");
            c
        })
        .collect();
    // The connection lines of an answer, checked to say as many as they are.
    let lines = |line: &str| -> Vec<String> {
        let text = ok(&stats, line);
        let mut it = text.lines();
        let head = it.next().unwrap_or_default().to_owned();
        let rest: Vec<String> = it.map(str::to_owned).collect();
        assert!(head.starts_with(&format!("{} connections listed", rest.len())), "{line}: {text}");
        rest
    };
    let all = lines("show conns");
    assert_eq!(all.len(), 5, "{all:?}");
    let known_lines = lines("show conns frontend known");
    assert_eq!(known_lines.len(), 3, "{known_lines:?}");
    assert!(known_lines.iter().all(|l| l.contains("frontend=known ")), "{known_lines:?}");
    assert_eq!(lines("show conns frontend plain").len(), 2);
    let one = lines("show conns client 127.0.7.1");
    assert_eq!(one.len(), 2, "the two from 127.0.7.1 through `known` (`plain` does not know them): {one:?}");
    assert!(one.iter().all(|l| l.contains("client=127.0.7.1:")), "{one:?}");
    let me = held[2].local_addr().unwrap();
    let exact = lines(&format!("show conns limit 50 client {me} frontend known"));
    assert_eq!(exact.len(), 1, "{exact:?}");
    assert!(exact[0].contains(&format!("client={me} ")), "{exact:?}");
    // The server of that connection, and the other one: together with the client, one or none.
    let server = exact[0].split_whitespace().find_map(|w| w.strip_prefix("server=")).unwrap().to_owned();
    let other = if server == "be/a" { "be/b" } else { "be/a" };
    assert_eq!(lines(&format!("show conns {server} client {me}")).len(), 1);
    assert_eq!(lines(&format!("show conns {other} client {me}")).len(), 0);
    let per_server = lines(&format!("show conns {server}")).len() + lines(&format!("show conns {other}")).len();
    assert_eq!(per_server, 5, "each connection is on one server");
    assert_eq!(lines("show conns client 127.0.7.9").len(), 0);
    assert_eq!(lines("show conns frontend known limit 1").len(), 1);
    refused(
        &stats,
        "show conns client 127.0.7.1 frontend plain",
        "this frontend does not look up its clients' addresses",
    );
    refused(&stats, "show conns frontend nope", "no frontend \"nope\" (frontends: known, plain)");
    refused(&stats, "show conns client 127.0.7", "client \"127.0.7\" is not IP or IP:PORT");
    for c in &mut held {
        echo_once(c, b"still here");
    }
    drop(held);
    proxy.stop_clean();
}

/// Servers added while stats queries run (each copies the rows in slices over several loop turns
/// of each worker, and an add moves the rows after it): every answer has each server once, in
/// configuration order, the same rows on every worker. The queries run back to back while the adds
/// come; each add waits until an answer that began after it has ended (paced by answers, not by the
/// clock: a loaded host makes a query slower than several adds), so every count of added servers is
/// seen, from none to all of them.
#[test]
fn servers_added_during_stats_queries_leave_every_answer_whole_and_in_order() {
    const SERVERS: usize = 3_000;
    const ADDED: usize = 24;
    let echo = Backend::start(Mode::Echo);
    let (stats, admin) = sockets("slices");
    let servers: Vec<String> = (0..SERVERS).map(|i| format!("{{ name: s{i}, address: \"{}\" }}", echo.addr)).collect();
    let proxy = Proxy::start(
        "slices",
        &format!(
            "global: {{ workers: 2, stats: {{ socket: {}, admin_socket: {} }} }}\n\
             frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
             backends:\n  - {{ name: be, servers: [{}] }}\n  - {{ name: tail, servers: [{{ name: t, address: \"{}\" }}] }}\n",
            stats.display(),
            admin.display(),
            servers.join(", "),
            echo.addr
        ),
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reader = {
        let (stop, done, stats) = (stop.clone(), done.clone(), stats.clone());
        std::thread::spawn(move || {
            let mut answers = 0;
            let mut seen_added = std::collections::BTreeSet::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let s = socket::fetch(&stats).unwrap();
                let names: Vec<String> = s.servers.iter().map(|r| format!("{}/{}", r.backend, r.server)).collect();
                let added = names.len().saturating_sub(SERVERS + 1).min(ADDED);
                let want: Vec<String> = (0..SERVERS)
                    .map(|i| format!("be/s{i}"))
                    .chain((0..added).map(|i| format!("be/n{i}")))
                    .chain(["tail/t".to_string()])
                    .collect();
                assert!(names == want, "answer {answers}: {} rows, not the {} in order", names.len(), want.len());
                for w in &s.workers {
                    let own: Vec<String> = w.servers.iter().map(|r| format!("{}/{}", r.backend, r.server)).collect();
                    assert!(own == want, "answer {answers}, worker {}: {} rows of {}", w.worker, own.len(), want.len());
                }
                seen_added.insert(added);
                answers += 1;
                done.store(answers, std::sync::atomic::Ordering::SeqCst);
            }
            (answers, seen_added)
        })
    };
    // Two more answers ended: the second began after the add had been answered.
    let two_more_answers = || {
        let from = done.load(std::sync::atomic::Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(30);
        while done.load(std::sync::atomic::Ordering::SeqCst) < from + 2 {
            assert!(!reader.is_finished(), "the stats reader stopped after {from} answers");
            assert!(Instant::now() < deadline, "no two answers in 30 s after {from}");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    two_more_answers();
    for i in 0..ADDED {
        ok(&admin, &format!("add server be/n{i} {}", echo.addr));
        two_more_answers();
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (answers, seen) = reader.join().unwrap();
    eprintln!("{answers} answers, {} different row counts", seen.len());
    assert_eq!(seen, (0..=ADDED).collect(), "every count of added servers, none to all, in {answers} answers");
    let mut c = connect(proxy.addr("fe"));
    echo_once(&mut c, b"still proxying");
    drop(c);
    proxy.stop_clean();
}

/// An added server in a backend with a health check is checked like the others: one with nothing
/// listening goes DOWN and takes no connection; deleted, it leaves the checks.
#[test]
fn an_added_server_is_health_checked_like_the_others() {
    let (a, b) = (Backend::start(Mode::Tag(1)), Backend::start(Mode::Tag(2)));
    let (stats, admin) = sockets("addcheck");
    let yaml = config(
        &stats,
        &admin,
        a.addr,
        b.addr,
        "    check: { interval: 100ms, timeout: 100ms, rise: 1, fall: 1 }\n",
        "",
    );
    let proxy = Proxy::start("addcheck", &yaml);
    an_added_dead_server_is_checked_down_and_leaves_the_checks(&stats, &admin, proxy.addr("fe"));
    proxy.stop_clean();
}

/// Adds server x of backend `be` at a port nothing listens on (bound, then closed): the answer
/// says it is checked, its check marks it DOWN, the connections go to a or b only; deleted, it
/// leaves the checks, and a live server added in its place is checked UP.
fn an_added_dead_server_is_checked_down_and_leaves_the_checks(stats: &Path, admin: &Path, front: SocketAddr) {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let text = ok(admin, &format!("add server be/x {dead}"));
    assert!(text.contains("health-checked like the backend's other servers"), "{text}");
    wait_until("x to be checked and marked DOWN", Duration::from_secs(5), || {
        let s = socket::fetch(stats).unwrap();
        s.health.iter().any(|h| h.server == "x" && h.checks >= 1)
            && s.servers.iter().any(|r| r.server == "x" && r.status() == "DOWN")
    });
    assert!((0..20).all(|_| tagged(front).1 != 0), "every connection reached a or b");
    ok(admin, "del server be/x");
    wait_until("x to leave the checks", Duration::from_secs(5), || {
        socket::fetch(stats).unwrap().health.iter().all(|h| h.server != "x")
    });
    // A live server added next takes x's index: no result of x's checks marks it DOWN (the
    // deletion waited for the checker to drop x); it is checked UP and takes connections.
    let live = Backend::start(Mode::Tag(3));
    ok(admin, &format!("add server be/y {}", live.addr));
    wait_until("y to be checked UP", Duration::from_secs(5), || {
        let s = socket::fetch(stats).unwrap();
        s.health.iter().any(|h| h.server == "y" && h.checks >= 3)
            && s.servers.iter().any(|r| r.server == "y" && r.status() == "UP")
    });
    assert!((0..30).any(|_| tagged(front).1 == 3), "y takes connections");
    assert!(socket::fetch(stats).unwrap().workers.iter().all(|w| w.servers.len() == 3), "y took x's index");
    ok(admin, "set server be/y state maint");
    wait_until("y to have no connection", Duration::from_secs(5), || row(stats, "y").2 == 0);
    ok(admin, "del server be/y");
}

/// The same where the backend has a check but none of its servers is checked yet (each opted out
/// with `check: false`): the added server is checked all the same, as the answer says.
#[test]
fn a_server_added_where_no_server_was_checked_yet_is_checked() {
    let (a, b) = (Backend::start(Mode::Tag(1)), Backend::start(Mode::Tag(2)));
    let (stats, admin) = sockets("addfirstcheck");
    let yaml = format!(
        "global: {{ workers: 2, stats: {{ socket: {}, admin_socket: {} }} }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends:\n  - name: be\n    check: {{ interval: 100ms, timeout: 100ms, rise: 1, fall: 1 }}\n    servers:\n\
         \x20     - {{ name: a, address: \"{}\", check: false }}\n      - {{ name: b, address: \"{}\", check: false }}\n",
        stats.display(),
        admin.display(),
        a.addr,
        b.addr
    );
    let proxy = Proxy::start("addfirstcheck", &yaml);
    assert!(socket::fetch(&stats).unwrap().health.is_empty(), "no server checked at start");
    an_added_dead_server_is_checked_down_and_leaves_the_checks(&stats, &admin, proxy.addr("fe"));
    proxy.stop_clean();
}

/// `ringproxy reload` and `ringproxy cmd` without a socket to talk to: exit 2 and what to set.
#[test]
fn reload_and_cmd_say_which_socket_the_configuration_lacks() {
    let file = write_temp(
        "nosock.yaml",
        "frontends: [{ name: fe, bind: \"127.0.0.1:0\", backend: be }]\n\
         backends: [{ name: be, servers: [{ name: s, address: \"127.0.0.1:9\" }] }]\n",
    );
    let out = ringproxy().args(["reload", "-c"]).arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("sets no global.stats.admin_socket (reload is an admin command)") && err.contains("SIGHUP"),
        "{err}"
    );
    let out = ringproxy().args(["cmd", "-c"]).arg(&file).arg("show servers").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("neither global.stats.admin_socket nor global.stats.socket"), "{err}");
    let out = ringproxy().args(["cmd", "--socket", "/nonexistent/admin.sock", "help"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot connect to the stats socket /nonexistent/admin.sock")
    );
}

/// `show ready` for a routing daemon's check: ready while a server takes connections, not when
/// none does; on SIGTERM with `withdraw_delay` not ready at once while still accepting, listeners
/// closed only after the delay.
#[test]
fn show_ready_says_when_to_announce_and_sigterm_withdraws_before_it_stops_accepting() {
    let echo = Backend::start(Mode::Echo);
    let port = free_port();
    let (sock, admin) = (temp_path("ready.sock"), temp_path("ready-admin.sock"));
    let yaml = format!(
        "global: {{ workers: 2, withdraw_delay: 1500ms, stats: {{ socket: {}, admin_socket: {} }} }}\n\
         frontends:\n  - {{ name: fe, bind: \"127.0.0.1:{port}\", backend: be }}\n\
         backends:\n  - {{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}\n",
        sock.display(),
        admin.display(),
        echo.addr
    );
    let mut proxy = Proxy::start("ready", &yaml);
    let front: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // What a check runs: `ringproxy cmd --socket S show ready`, exit 0 or 1.
    let check = |socket: &Path| {
        let out = ringproxy().args(["cmd", "--socket"]).arg(socket).arg("show ready").output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, text) = check(&sock);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.starts_with("ready: 1 listeners"), "{text}");
    // No server to send to: not ready (and ready again once there is).
    let out = ringproxy().args(["cmd", "--socket"]).arg(&admin).arg("set server be/s state maint").output().unwrap();
    assert!(out.status.success());
    let (code, text) = check(&sock);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("no server up and ready in backend be"), "{text}");
    ringproxy().args(["cmd", "--socket"]).arg(&admin).arg("set server be/s state ready").output().unwrap();
    assert_eq!(check(&sock).0, Some(0));
    // SIGTERM: not ready at once, still accepting and proxying for the delay, then draining.
    let mut held = connect(front);
    echo_once(&mut held, b"before");
    let t0 = Instant::now();
    proxy.sigterm();
    proxy.wait_stderr("reporting not ready for 1500ms");
    let (code, text) = check(&sock);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("going away"), "{text}");
    let mut late = connect(front);
    echo_once(&mut late, b"accepted during the withdraw delay");
    assert!(t0.elapsed() < Duration::from_millis(1500), "checked within the delay");
    wait_until("the listeners to close after the delay", Duration::from_secs(5), || {
        TcpStream::connect_timeout(&front, Duration::from_millis(200)).is_err()
    });
    assert!(t0.elapsed() >= Duration::from_millis(1400), "closed after {:?}, not before the delay", t0.elapsed());
    echo_once(&mut held, b"still served while draining");
    // Draining: the check answers at once (a routing daemon's check must not hang for the drain)
    // and says not ready; changes that would start an engine are refused.
    let asked = Instant::now();
    let (code, text) = check(&sock);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("draining on the way out"), "{text}");
    assert!(asked.elapsed() < Duration::from_secs(2), "answered in {:?}", asked.elapsed());
    let out = ringproxy().args(["cmd", "--socket"]).arg(&admin).arg("reload").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("the service is stopping"), "{out:?}");
    echo_once(&mut held, b"still served after the reload was refused");
    drop((held, late));
    // As `Proxy::stop_clean` checks (the SIGTERM was the test's own): every gauge back to 0 — or
    // already exited, which a drain does only once it holds nothing — then exit 0.
    wait_until("ringproxy's gauges to be 0 while it drains", Duration::from_secs(10), || {
        proxy.has_exited() || socket::fetch(&sock).is_ok_and(|s| GAUGES.iter().all(|(_, g)| s.total(g) == 0))
    });
    assert_eq!(proxy.wait_exit(Duration::from_secs(40)), Some(0));
}
