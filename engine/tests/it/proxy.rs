//! Bytes through the proxy: integrity under concurrency, half-close, reset propagation.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::*;
use sha2::{Digest, Sha256};

/// Log-uniform size in [1, 8 MiB]: many small transfers, a good number of large ones.
fn size_for(id: u64, dir: u64) -> u64 {
    match (id, dir) {
        (0, 0) | (1, 1) => 1,
        (0, 1) | (1, 0) => 8 * MIB,
        _ => {
            let mut s = Stream::new(id * 7 + dir + 99);
            let mut b = [0u8; 8];
            s.fill(&mut b);
            let u = (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64;
            ((8.0 * MIB as f64).ln() * u).exp().max(1.0).min(8.0 * MIB as f64) as u64
        }
    }
}

/// Sends `len` bytes of stream `seed`; returns their SHA-256.
fn send_stream(s: &mut TcpStream, seed: u64, len: u64) -> [u8; 32] {
    let mut rng = Stream::new(seed);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        hash.update(&buf[..n]);
        s.write_all(&buf[..n]).expect("write");
        left -= n as u64;
    }
    hash.finalize().into()
}

/// Reads to EOF; returns (bytes, SHA-256). (Also the backpressure suite's.)
pub(crate) fn recv_stream(s: &mut TcpStream) -> (u64, [u8; 32]) {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hash.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("read failed after {total} bytes: {e}"),
        }
    }
    (total, hash.finalize().into())
}

#[derive(Default)]
struct Ledger {
    /// (id, direction) -> (bytes, hash) as sent and as received.
    sent: HashMap<(u64, u8), (u64, [u8; 32])>,
    received: HashMap<(u64, u8), (u64, [u8; 32])>,
}

/// Sends `len` bytes of stream `seed` (then EOF) on a thread of its own while reading what comes
/// back to EOF here; returns (SHA-256 of what was sent, (bytes, SHA-256) of what was received).
fn both_ways(s: &mut TcpStream, seed: u64, len: u64) -> ([u8; 32], (u64, [u8; 32])) {
    let mut w = s.try_clone().unwrap();
    let writer = spawn(move || {
        let hash = send_stream(&mut w, seed, len);
        w.shutdown(Shutdown::Write).unwrap();
        hash
    });
    let got = recv_stream(s);
    (writer.join().unwrap(), got)
}

/// A backend that reads a 24-byte header (id, bytes up, bytes down), then concurrently receives
/// the upload to EOF and sends the download, recording hashes of both.
fn integrity_backend(ledger: Arc<Mutex<Ledger>>) -> std::net::SocketAddr {
    let l = listen("127.0.0.1:0");
    let addr = l.local_addr().unwrap();
    spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { continue };
            let ledger = ledger.clone();
            spawn(move || {
                let mut h = [0u8; 24];
                conn.read_exact(&mut h).unwrap();
                let id = u64::from_le_bytes(h[0..8].try_into().unwrap());
                let down = u64::from_le_bytes(h[16..24].try_into().unwrap());
                let (sent, got) = both_ways(&mut conn, id * 2 + 1, down);
                let mut l = ledger.lock().unwrap();
                l.received.insert((id, 0), got);
                l.sent.insert((id, 1), (down, sent));
            });
        }
    });
    addr
}

#[test]
fn integrity_1000_concurrent_connections_random_sizes_both_ways() {
    const N: u64 = 1000;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let backend = integrity_backend(ledger.clone());
    let engine = engine(&format!(
        "global: {{ workers: 2, maxconn: 2000 }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends:\n  - name: be\n    servers: [{{ name: s, address: \"{backend}\", source: 127.0.2.0/30 }}]\n"
    ));
    let proxy = addr(&engine, "fe");
    let barrier = Arc::new(Barrier::new(N as usize));
    let start = Instant::now();
    let clients = spawn_each(N, {
        let ledger = ledger.clone();
        move |id| {
            let mut s = connect(proxy);
            s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(120))).unwrap();
            // Every connection is open before any transfer starts.
            barrier.wait();
            let (up, down) = (size_for(id, 0), size_for(id, 1));
            let mut header = [0u8; 24];
            header[0..8].copy_from_slice(&id.to_le_bytes());
            header[8..16].copy_from_slice(&up.to_le_bytes());
            header[16..24].copy_from_slice(&down.to_le_bytes());
            s.write_all(&header).unwrap();
            let (sent, got) = both_ways(&mut s, id * 2, up);
            let mut l = ledger.lock().unwrap();
            l.sent.insert((id, 0), (up, sent));
            l.received.insert((id, 1), got);
        }
    });
    let mut failed = 0;
    for c in clients {
        failed += c.join().is_err() as usize;
    }
    if failed > 0 {
        let st = engine.stats();
        for w in &st.workers {
            eprintln!("worker stats: {w:?}");
        }
        panic!("{failed} clients failed");
    }
    wait_until("the backend to record every upload", Duration::from_secs(30), || {
        ledger.lock().unwrap().received.len() == 2 * N as usize
    });
    let l = ledger.lock().unwrap();
    let mut bytes = [0u64; 2];
    for id in 0..N {
        for dir in 0..2u8 {
            let sent = l.sent[&(id, dir)];
            let got = l.received[&(id, dir)];
            assert_eq!(got.0, sent.0, "connection {id} direction {dir}: byte count");
            assert_eq!(got.1, sent.1, "connection {id} direction {dir}: SHA-256 differs");
            bytes[dir as usize] += sent.0;
        }
    }
    let stats = engine.stats();
    assert_eq!(stats.total(|w| w.bytes_client_to_server), bytes[0] + 24 * N, "bytes counted client→server");
    assert_eq!(stats.total(|w| w.bytes_server_to_client), bytes[1], "bytes counted server→client");
    assert_eq!(stats.total(|w| w.accepted), N);
    eprintln!(
        "{} MiB up, {} MiB down through 1000 concurrent connections in {:?}",
        bytes[0] / MIB,
        bytes[1] / MIB,
        start.elapsed()
    );
    drop(l);
    assert_clean(engine, &[backend.port()]);
}

#[test]
fn half_close_keeps_the_other_direction_flowing() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = l.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (mut conn, _) = l.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let (n, hash) = recv_stream(&mut conn);
        // The client's EOF arrived while this side is still open: now answer.
        let sent = send_stream(&mut conn, 7, MIB);
        conn.shutdown(Shutdown::Write).unwrap();
        (n, hash, sent)
    });
    let engine = engine(&format!(
        "global: {{ workers: 2 }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{backend}\" }}] }}]\n"
    ));
    let mut c = connect(addr(&engine, "fe"));
    let up = send_stream(&mut c, 3, 10 * MIB);
    c.shutdown(Shutdown::Write).unwrap();
    let (down_n, down_hash) = recv_stream(&mut c);
    let (up_n, up_hash, down_sent) = server.join().unwrap();
    assert_eq!(up_n, 10 * MIB, "the server got all 10 MiB before EOF");
    assert_eq!(up_hash, up);
    assert_eq!(down_n, MIB, "the client got the whole 1 MiB reply after its own EOF");
    assert_eq!(down_hash, down_sent);
    drop(c);
    assert_clean(engine, &[backend.port()]);
}

#[test]
fn a_server_that_answers_the_eof_and_closes_at_once_is_delivered_whole_in_both_modes() {
    // The request/response/close pattern: the client half-closes, the server reads to that EOF,
    // answers and closes straight away, so the server's EOF usually reaches the proxy while its
    // shutdown toward the server is still in flight. The proxy then
    // closes both sockets without a second shutdown; nothing may be cut short or reset.
    for splice in ["never", "auto"] {
        const CONNS: usize = 300;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let backend = l.local_addr().unwrap();
        let server = thread::spawn(move || {
            for _ in 0..CONNS {
                let (mut conn, _) = l.accept().unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut req = Vec::new();
                conn.read_to_end(&mut req).expect("the request up to the client's EOF");
                let reply: Vec<u8> = req.iter().rev().copied().chain(std::iter::repeat_n(7u8, 3000)).collect();
                conn.write_all(&reply).unwrap();
                // dropped: closed at once, with nothing left to read
            }
        });
        let engine = engine(&format!(
            "global: {{ workers: 2, tune: {{ splice: {splice} }} }}\n\
             frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
             backends: [{{ name: be, servers: [{{ name: s, address: \"{backend}\" }}] }}]\n"
        ));
        let fe = addr(&engine, "fe");
        for i in 0..CONNS {
            let mut c = connect(fe);
            let req = format!("request {i} ").repeat(1 + i % 20).into_bytes();
            c.write_all(&req).unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got)
                .unwrap_or_else(|e| panic!("{splice}: connection {i}: {e} after {} bytes", got.len()));
            let want: Vec<u8> = req.iter().rev().copied().chain(std::iter::repeat_n(7u8, 3000)).collect();
            assert!(got == want, "{splice}: connection {i}: {} bytes back, {} expected", got.len(), want.len());
        }
        server.join().unwrap();
        wait_until("every connection closed", Duration::from_secs(5), || {
            engine.stats().total(|w| w.closed) == CONNS as u64
        });
        let stats = engine.stats();
        assert_eq!(stats.total(|w| w.resets_from_client + w.resets_from_server), 0, "{splice}: no reset");
        assert_clean(engine, &[backend.port()]);
    }
}

#[test]
fn client_reset_closes_the_server_side() {
    let backend = Backend::start(Mode::Hold);
    let engine = engine(&format!(
        "global: {{ workers: 2 }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
        backend.addr
    ));
    let mut c = connect(addr(&engine, "fe"));
    echo_once(&mut c, b"hello");
    assert_eq!(backend.active(), 1);
    let t = Instant::now();
    reset(c);
    wait_until("the server side to be closed", Duration::from_secs(5), || backend.active() == 0);
    eprintln!("server side closed {:?} after the client's reset", t.elapsed());
    wait_until("the proxy to forget the connection", Duration::from_secs(5), || {
        engine.stats().total(|w| w.active) == 0
    });
    assert_eq!(engine.stats().total(|w| w.resets_from_client), 1);
    assert_clean(engine, &[backend.addr.port()]);
}

#[test]
fn server_reset_reaches_the_client_as_a_reset() {
    let backend = Backend::start(Mode::ResetAfterRead);
    let engine = engine(&format!(
        "global: {{ workers: 2 }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
        backend.addr
    ));
    let mut c = connect(addr(&engine, "fe"));
    // (Within seconds, not the 50 s of a timeout: the reset is passed on, not waited out. A
    // second was once too little for a loaded CI host running the suite's tests in parallel.)
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    c.write_all(b"hello").unwrap();
    let (_, err) = read_to_end(&mut c);
    assert_reset_passed_on(err);
    assert!(t.elapsed() < Duration::from_secs(5));
    wait_until("the proxy to forget the connection", Duration::from_secs(5), || {
        engine.stats().total(|w| w.active) == 0
    });
    assert_eq!(engine.stats().total(|w| w.resets_from_server), 1);
    drop(c);
    assert_clean(engine, &[backend.addr.port()]);
}

/// Pinned to the 6.1 feature set, where SO_LINGER cannot be set on a direct socket (no uring_cmd
/// socket options), a reset still crosses the proxy as a reset, both ways: the engine disconnects
/// the socket (a connect to `AF_UNSPEC`) just before closing it.
#[test]
fn pinned_to_the_6_1_feature_set_a_reset_crosses_as_a_reset_both_ways() {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let engine = engine(&format!(
        "global: {{ workers: 1, tune: {{ io_features: \"6.1\" }} }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"127.0.0.1:{port}\" }}] }}]\n"
    ));
    assert!(!engine.plan().io.sockopt, "the 6.1 set has no socket options on direct sockets");
    let pair = |hello: &[u8]| {
        let mut c = connect(addr(&engine, "fe"));
        c.write_all(hello).unwrap();
        let (mut s, _) = server.accept().unwrap();
        let mut got = vec![0; hello.len()];
        s.read_exact(&mut got).unwrap();
        for t in [&c, &s] {
            t.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        }
        (c, s)
    };
    // The client resets: the server's read fails with a reset, not a clean EOF.
    let (c, mut s) = pair(b"client resets");
    reset(c);
    let (_, err) = read_to_end(&mut s);
    assert_eq!(err.map(|e| e.kind()), Some(ErrorKind::ConnectionReset), "the server saw the client's reset");
    // The server resets: the client's read fails with a reset.
    let (mut c, s) = pair(b"server resets");
    reset(s);
    let (_, err) = read_to_end(&mut c);
    assert_reset_passed_on(err);
    wait_until("the proxy to forget both connections", Duration::from_secs(2), || {
        engine.stats().total(|w| w.active + w.closing) == 0
    });
    let stats = engine.stats();
    assert_eq!((stats.total(|w| w.resets_from_client), stats.total(|w| w.resets_from_server)), (1, 1));
    drop(c);
    assert_clean(engine, &[port]);
}

/// `tune.io_features: "6.1"` in the file makes the engine use only what Linux 6.1 offers
/// (features.rs) — accepts into plain descriptors moved into direct slots, server sockets made and
/// bound by system calls — and it proxies exactly as with every feature: bytes both ways, the
/// configured source, the client's address for the balancer, every gauge back to zero.
#[test]
fn pinned_to_the_6_1_feature_set_the_engine_proxies_from_its_source() {
    let backend = Backend::start(Mode::Echo);
    let engine = engine(&format!(
        "global: {{ workers: 2, tune: {{ io_features: \"6.1\" }} }}\n\
         frontends: [{{ name: fe, bind: \"0.0.0.0:0\", backend: be }}]\n\
         backends: [{{ name: be, balance: source, servers: [{{ name: s, address: \"{}\", source: 127.0.9.1 }}] }}]\n",
        backend.addr
    ));
    assert_eq!(engine.plan().io, ringproxy::features::IoFeatures::of_kernel((6, 1)));
    assert_eq!(engine.plan().io_chosen, "pinned to Linux 6.1");
    let port = addr(&engine, "fe").port();
    let mut conns: Vec<TcpStream> = (0..20).map(|_| connect(([127, 0, 0, 1], port).into())).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        let (sent, (n, got)) = both_ways(c, i as u64, 64 << 10);
        assert_eq!((n, got), (64 << 10, sent), "connection {i} intact");
    }
    assert_eq!(backend.peer_ips().get(&"127.0.9.1".parse().unwrap()), Some(&20), "every connect from the source");
    drop(conns);
    assert_clean(engine, &[backend.addr.port()]);
}

/// `tcp_keepalive` on a frontend and on a backend: the proxy's socket toward the client and its
/// socket toward the server run a keepalive timer with the configured idle time (the kernel's own
/// view, `ss -o`), and the sockets of the client and the server themselves do not.
#[test]
fn tcp_keepalive_arms_the_kernel_s_timer_on_each_configured_side() {
    let backend = Backend::start(Mode::Echo);
    let engine = engine(&format!(
        "global: {{ workers: 2 }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be, tcp_keepalive: {{ idle: 40s, interval: 7s, count: 3 }} }}]\n\
         backends: [{{ name: be, tcp_keepalive: {{ idle: 90s }}, servers: [{{ name: s, address: \"{}\", source: 127.0.9.1 }}] }}]\n",
        backend.addr
    ));
    let fe = addr(&engine, "fe");
    let mut c = connect(fe);
    echo_once(&mut c, b"keep me alive");
    let client_port = c.local_addr().unwrap().port();
    let sockets = tcp_sockets_on(&[fe.port(), backend.addr.port()]);
    let find = |what: &str, f: &dyn Fn(&TcpSocket) -> bool| {
        sockets.iter().find(|s| s.state == "ESTAB" && f(s)).cloned().unwrap_or_else(|| panic!("{what} in {sockets:?}"))
    };
    let to_client = find("the proxy's client socket", &|s| s.local == fe && s.remote.port() == client_port);
    let to_server = find("the proxy's server socket", &|s| s.remote == backend.addr);
    let client = find("the client's socket", &|s| s.local.port() == client_port);
    let server = find("the server's socket", &|s| s.local == backend.addr);
    assert_eq!(to_client.timer, 2, "keepalive timer on the client side: {to_client:?}");
    assert!((35_000..=40_000).contains(&to_client.expires_ms), "idle 40s: {to_client:?}");
    assert_eq!(to_server.timer, 2, "keepalive timer on the server side: {to_server:?}");
    assert!((85_000..=90_000).contains(&to_server.expires_ms), "idle 90s: {to_server:?}");
    assert_eq!((client.timer, server.timer), (0, 0), "the peers' own sockets have none");
    drop(c);
    assert_clean(engine, &[backend.addr.port()]);
}
