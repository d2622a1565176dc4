//! Backpressure and fairness: a server that stops reading does not make the proxy buffer (its
//! memory stays flat while the client is pushed back by TCP), and one connection moving bulk data
//! does not starve the others on the same worker.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;
use sha2::{Digest, Sha256};

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap()
}

/// Waits until the process's RSS stops changing (the same value over 5 samples 20 ms apart);
/// returns it.
fn settled_rss_kib(pid: u32) -> u64 {
    let mut samples = vec![rss_kib(pid)];
    wait_until("the proxy's RSS to settle", Duration::from_secs(5), || {
        samples.push(rss_kib(pid));
        let last = &samples[samples.len().saturating_sub(5)..];
        last.len() == 5 && last.iter().all(|&v| v == last[0])
    });
    *samples.last().unwrap()
}

#[test]
fn a_server_that_stops_reading_is_not_buffered_by_the_proxy() {
    server_stops_reading_in("never");
}

#[test]
fn a_server_that_stops_reading_is_not_buffered_by_the_proxy_when_splicing() {
    server_stops_reading_in("always");
}

fn server_stops_reading_in(splice: &str) {
    // The server accepts, then reads nothing until told to.
    let l = listen("127.0.0.1:0");
    let server_addr = l.local_addr().unwrap();
    let go = Arc::new(AtomicBool::new(false));
    let server = {
        let go = go.clone();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            while !go.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 16];
            let mut n = 0u64;
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => {
                        h.update(&buf[..k]);
                        n += k as u64;
                    }
                }
            }
            (n, <[u8; 32]>::from(h.finalize()))
        })
    };
    let name = format!("slow-{splice}");
    let sock = temp_path(&format!("{name}.sock"));
    let proxy = Proxy::start(
        &name,
        &format!(
            "global: {{ workers: 1, tune: {{ splice: {splice} }}, stats: {{ socket: {} }} }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
             backends: [{{ name: be, servers: [{{ name: s, address: \"{server_addr}\" }}] }}]\n",
            sock.display()
        ),
    );
    let pid = proxy.pid();
    let rss_before = settled_rss_kib(pid);
    // Push as much as TCP lets through while the server reads nothing (non-blocking writes; a
    // partial write keeps its remainder for the next try, so the stream stays exact).
    let mut c = TcpStream::connect(proxy.addr("fe")).unwrap();
    c.set_nonblocking(true).unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let mut h = Sha256::new();
    let mut rng = Stream::new(42);
    let mut pending: Vec<u8> = Vec::new();
    let start = Instant::now();
    let mut last_progress = Instant::now();
    while start.elapsed() < Duration::from_secs(20) && last_progress.elapsed() < Duration::from_millis(1500) {
        if pending.is_empty() {
            pending = vec![0u8; 64 * 1024];
            rng.fill(&mut pending);
            h.update(&pending);
        }
        match c.write(&pending) {
            Ok(n) => {
                pending.drain(..n);
                written.fetch_add(n as u64, Ordering::SeqCst);
                last_progress = Instant::now();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("{e}"),
        }
    }
    assert!(last_progress.elapsed() >= Duration::from_millis(1500), "TCP never pushed back");
    let in_flight = written.load(Ordering::SeqCst);
    let rss_blocked = rss_kib(pid);
    eprintln!("blocked after {} MiB in flight; proxy RSS {} -> {} KiB", in_flight >> 20, rss_before, rss_blocked);
    // What sits between the client and the stalled server is in kernel socket buffers and one pipe
    // (bounded by tcp_rmem/tcp_wmem and tune.pipe_size), or in at most a paused flow's share of
    // receive buffers: 1 MiB of them, plus what the multishot receive took in the wakeup that
    // crossed that mark (at most the 64 buffers the ring offers at rest: 4 MiB of 64 KiB
    // buffers, the default in both modes). Receive buffers become memory only when written,
    // so all of it shows in the growth: at most 5 MiB, whatever is in flight.
    assert!(rss_blocked < rss_before + 6144, "the proxy grew by {} KiB", rss_blocked - rss_before);
    // Now the server reads: everything arrives, intact.
    go.store(true, Ordering::SeqCst);
    c.set_nonblocking(false).unwrap();
    c.write_all(&pending).unwrap();
    written.fetch_add(pending.len() as u64, Ordering::SeqCst);
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let (n, digest) = server.join().unwrap();
    assert_eq!(n, written.load(Ordering::SeqCst));
    assert_eq!(digest, <[u8; 32]>::from(h.finalize()));
    drop(c);
    proxy.stop_clean();
}

#[test]
fn a_bulk_transfer_does_not_starve_other_connections_on_the_same_worker() {
    let sink = Backend::start(Mode::Silent);
    let echo = Backend::start(Mode::Echo);
    let engine = engine(&format!(
        "global: {{ workers: 1 }}\nfrontends:\n  - {{ name: bulk, bind: \"127.0.0.1:0\", backend: sink }}\n\
         \x20 - {{ name: rr, bind: \"127.0.0.1:0\", backend: echo }}\n\
         backends:\n  - {{ name: sink, servers: [{{ name: s, address: \"{}\" }}] }}\n\
         \x20 - {{ name: echo, servers: [{{ name: s, address: \"{}\" }}] }}\n",
        sink.addr, echo.addr
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let moved = Arc::new(AtomicU64::new(0));
    let hot = {
        let (stop, moved, to) = (stop.clone(), moved.clone(), addr(&engine, "bulk"));
        std::thread::spawn(move || {
            let mut c = connect(to);
            let chunk = vec![7u8; 1 << 20];
            while !stop.load(Ordering::SeqCst) {
                c.write_all(&chunk).unwrap();
                moved.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
        })
    };
    wait_until("the bulk transfer to be running", Duration::from_secs(5), || moved.load(Ordering::SeqCst) > 64 << 20);
    let mut rr = connect(addr(&engine, "rr"));
    let mut worst = Duration::ZERO;
    for i in 0..50u32 {
        let t = Instant::now();
        echo_once(&mut rr, &i.to_le_bytes());
        worst = worst.max(t.elapsed());
    }
    let during = moved.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    hot.join().unwrap();
    eprintln!("worst request/response while {} MiB moved in bulk: {worst:?}", during >> 20);
    // Each chunk of the bulk flow is one bounded splice, then the worker turns to the next ready
    // connection: a round trip waits for at most a few chunks, never for the bulk flow to end.
    assert!(worst < Duration::from_millis(500), "a request waited {worst:?} behind the bulk transfer");
    drop(rr);
    assert_clean(engine, &[sink.addr.port(), echo.addr.port()]);
}

#[test]
fn a_burst_on_many_connections_with_few_receive_buffers_all_gets_through() {
    // `splice: never` with the fewest receive buffers a worker may have (64): 400 connections
    // send at once, more than the ring offers buffers, so receives end with ENOBUFS and wait for
    // buffers to come back; every byte must still arrive, in order, and everything be given back.
    const CONNS: usize = 400;
    const LEN: usize = 16 * 1024;
    let echo = Backend::start(Mode::Echo);
    let engine = engine(&format!(
        "global: {{ workers: 1, tune: {{ splice: never, recv_buffers: 64 }} }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{}\", source: 127.0.2.30 }}] }}]\n",
        echo.addr
    ));
    let mut conns: Vec<TcpStream> = (0..CONNS).map(|_| connect(addr(&engine, "fe"))).collect();
    let message = |i: usize| -> Vec<u8> {
        let mut m = vec![0u8; LEN];
        Stream::new(i as u64).fill(&mut m);
        m
    };
    for round in 0..3 {
        // Everyone writes first (each fits in the socket buffers), then everyone reads.
        for (i, c) in conns.iter_mut().enumerate() {
            c.write_all(&message(i + round * CONNS)).unwrap();
        }
        for (i, c) in conns.iter_mut().enumerate() {
            let mut back = vec![0u8; LEN];
            c.read_exact(&mut back).unwrap();
            assert!(back == message(i + round * CONNS), "connection {i}, round {round}: the echo differs");
        }
    }
    let s = engine.stats();
    eprintln!(
        "{CONNS} connections x 3 bursts of {LEN} B: {} receives, {} sends, {} waits for a receive buffer, {} buffers created",
        s.total(|w| w.ring_recvs),
        s.total(|w| w.ring_sends),
        s.total(|w| w.buffer_waits),
        s.total(|w| w.buffers_in_use + w.buffers_pooled)
    );
    assert!(s.total(|w| w.buffers_in_use + w.buffers_pooled) <= 64 + 8, "at most recv_buffers (and header buffers)");
    drop(conns);
    assert_clean(engine, &[echo.addr.port()]);
}

/// What the kernel makes of SO_RCVBUF / SO_SNDBUF `v`: twice it (its bookkeeping), after capping
/// it at `net.core.rmem_max` / `wmem_max`.
fn kernel_size(v: u64, cap: &str) -> u32 {
    let max: u64 = std::fs::read_to_string(format!("/proc/sys/net/core/{cap}")).unwrap().trim().parse().unwrap();
    (2 * v.min(max)) as u32
}

/// `tune.rcvbuf_client` / `sndbuf_client` / `rcvbuf_server` / `sndbuf_server`: every socket of
/// the proxy has its side's sizes (the listeners too, which accepted sockets inherit them from),
/// in every splice mode and on both workers; bulk data moves intact through buffers that small;
/// and a flow whose server stops reading holds, in the proxy's two sockets, no more than those
/// sizes (unset, each grows toward `tcp_rmem` / `tcp_wmem`'s maximum: 32 and 4 MiB here).
#[test]
fn socket_buffer_sizes_are_set_on_each_side_and_bound_what_a_stalled_flow_holds() {
    const RCV_CLIENT: u64 = 32 * KIB;
    const SND_CLIENT: u64 = 48 * KIB;
    const RCV_SERVER: u64 = 40 * KIB;
    const SND_SERVER: u64 = 56 * KIB;
    let tune = "rcvbuf_client: 32k, sndbuf_client: 48k, rcvbuf_server: 40k, sndbuf_server: 56k";
    let (client_rb, client_tb) = (kernel_size(RCV_CLIENT, "rmem_max"), kernel_size(SND_CLIENT, "wmem_max"));
    let (server_rb, server_tb) = (kernel_size(RCV_SERVER, "rmem_max"), kernel_size(SND_SERVER, "wmem_max"));
    for splice in ["auto", "always", "never"] {
        let echo = Backend::start(Mode::Echo);
        let engine = engine(&format!(
            "global: {{ workers: 2, tune: {{ splice: {splice}, {tune} }} }}\n\
             frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
             backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
            echo.addr
        ));
        let fe = addr(&engine, "fe");
        // At least 8 connections, and until both workers have accepted some (the kernel's hash
        // puts all of 8 on one worker once in 128).
        let mut conns: Vec<TcpStream> = Vec::new();
        while conns.len() < 8 || !engine.stats().workers.iter().all(|w| w.accepted > 0) {
            assert!(conns.len() < 64, "{splice}: 64 connections, all on one worker");
            let mut c = connect(fe);
            echo_once(&mut c, &[conns.len() as u8; 100]);
            conns.push(c);
        }
        let n = conns.len();
        let sockets = tcp_sockets_on(&[fe.port(), echo.addr.port()]);
        let listeners: Vec<_> = sockets.iter().filter(|s| s.local == fe && s.state == "LISTEN").collect();
        let clients: Vec<_> = sockets.iter().filter(|s| s.local == fe && s.state == "ESTAB").collect();
        let servers: Vec<_> = sockets.iter().filter(|s| s.remote == echo.addr && s.state == "ESTAB").collect();
        assert_eq!((listeners.len(), clients.len(), servers.len()), (2, n, n), "{splice}: {sockets:?}");
        for s in listeners.iter().chain(&clients) {
            assert_eq!((s.rcvbuf, s.sndbuf), (client_rb, client_tb), "{splice}: client side {s:?}");
        }
        for s in &servers {
            assert_eq!((s.rcvbuf, s.sndbuf), (server_rb, server_tb), "{splice}: server side {s:?}");
        }
        assert!(engine.stats().workers.iter().all(|w| w.accepted > 0), "{splice}: both workers took some");
        drop(conns);
        // 4 MiB each way on 4 connections at once, checksummed, through those buffers.
        let mut pumps: Vec<Pump> = (0..4).map(|i| Pump::connect(fe, 700 + i, false).unwrap().limit(4 * MIB)).collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        while pumps.iter().any(|p| !p.eof) {
            assert!(Instant::now() < deadline, "{splice}: transfers stalled");
            step_all(&mut pumps);
        }
        for p in &pumps {
            p.intact().unwrap_or_else(|e| panic!("{splice}: {e}"));
        }
        drop(pumps);
        assert_clean(engine, &[echo.addr.port()]);
    }

    // A server that reads 1 MiB and then nothing: once the client is stalled, the proxy's socket
    // toward it holds at most its receive buffer unread, the socket toward the server at most its
    // send buffer unacknowledged, plus what sends add past it: the kernel checks the send buffer
    // before it starts a packet, not while it fills one (up to lo's gso_max_size, 64 KiB), so a
    // send that finds room may add up to a packet, and a full run of the suite under load once saw
    // 75.8 KiB past it (78-136 KiB unsent, for 112 KiB of send buffer, in six runs alone). Bound:
    // two 64 KiB buffers past it — unset, the socket grows toward tcp_wmem's 4 MiB. What the flow holds in the proxy between the two is its pause mark's
    // (1 MiB of bytes, in as many receive buffers as the receives took: reported, not bounded
    // here).
    let stuck = FaultBackend::start(None, Behaviour::StopReadingAfter(MIB));
    let engine = engine(&format!(
        "global: {{ workers: 1, tune: {{ {tune} }} }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
        stuck.addr
    ));
    let fe = addr(&engine, "fe");
    let mut p = Pump::connect(fe, 800, false).unwrap();
    let mut last_move = Instant::now();
    while last_move.elapsed() < Duration::from_secs(1) {
        match p.step() {
            Ok(true) => last_move = Instant::now(),
            Ok(false) => p.wait(20),
            Err(e) => panic!("the client saw {e} before it stalled"),
        }
        assert!(p.sent < 256 * MIB, "the client never stalled");
    }
    let sockets = tcp_sockets_on(&[fe.port(), stuck.addr.port()]);
    let toward_client = sockets.iter().find(|s| s.local == fe && s.state == "ESTAB").expect("the client's socket");
    let toward_server = sockets.iter().find(|s| s.remote == stuck.addr).expect("the server's socket");
    assert!(toward_client.rx_queue <= u64::from(client_rb), "unread from the client: {toward_client:?}");
    let buf = u64::from(ringproxy::config::default::RECV_BUFFER_SIZE);
    assert!(toward_server.tx_queue <= u64::from(server_tb) + 2 * buf, "unsent to the server: {toward_server:?}");
    let held = engine.stats().total(|w| w.buffers_in_use);
    eprintln!(
        "stalled flow: client pushed {:.2} MiB; in the proxy: {} B unread from the client (rcvbuf {}), {} B unsent to \
         the server (sndbuf {}), {held} receive buffers of {buf} B",
        p.sent as f64 / MIB as f64,
        toward_client.rx_queue,
        toward_client.rcvbuf,
        toward_server.tx_queue,
        toward_server.sndbuf
    );
    drop(p);
    stuck.release();
    wait_until("the stuck server to close", Duration::from_secs(5), || stuck.active() == 0);
    assert_clean(engine, &[stuck.addr.port()]);
}

/// A client that writes and never reads, through the proxy to an echo server: both directions
/// stall (the server's echo blocks, so it stops reading). Returns the bytes waiting in the
/// proxy's socket toward the client and in its socket toward the server (`ss`'s Send-Q: not yet
/// acknowledged, here all of it not yet sent: the peers' windows are shut).
fn stalled_send_queues(tune: &str) -> (u64, u64) {
    let echo = Backend::start(Mode::Echo);
    let engine = engine(&format!(
        "global: {{ workers: 1, tune: {{ splice: never{tune} }} }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
        echo.addr
    ));
    let fe = addr(&engine, "fe");
    let mut c = connect(fe);
    c.set_nonblocking(true).unwrap();
    let chunk = vec![7u8; 64 << 10];
    let (mut sent, mut last_move) = (0u64, Instant::now());
    while last_move.elapsed() < Duration::from_secs(1) {
        match c.write(&chunk) {
            Ok(n) => {
                sent += n as u64;
                last_move = Instant::now();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("the client saw {e} before it stalled"),
        }
        assert!(sent < 512 * MIB, "the client never stalled");
    }
    let sockets = tcp_sockets_on(&[fe.port(), echo.addr.port()]);
    let toward_client = sockets.iter().find(|s| s.local == fe && s.state == "ESTAB").expect("the client's socket");
    let toward_server = sockets.iter().find(|s| s.remote == echo.addr).expect("the server's socket");
    let queues = (toward_client.tx_queue, toward_server.tx_queue);
    eprintln!(
        "tune {{ {tune} }}: stalled after {sent} B; the proxy's send queues: toward the client {}, toward the server {}",
        queues.0, queues.1
    );
    drop(c);
    assert_clean(engine, &[echo.addr.port()]);
    queues
}

/// `tune.notsent_lowat` on both sides' sockets (the listener's accepted sockets inherit it): a
/// peer that stops reading leaves at most that much (plus the one send that crossed it, at most
/// one 64 KiB receive buffer here) waiting in the proxy's socket toward it; unset, the proxy
/// fills the socket's send buffer.
#[test]
fn notsent_lowat_bounds_what_waits_for_a_peer_that_stops_reading_on_each_side() {
    const LOWAT: u64 = 32 * KIB;
    let bound = LOWAT + u64::from(ringproxy::config::default::RECV_BUFFER_SIZE);
    let unset = stalled_send_queues("");
    let set = stalled_send_queues(", notsent_lowat: 32k");
    assert!(set.0 <= bound && set.1 <= bound, "with notsent_lowat 32k: {set:?} (bound {bound} each)");
    assert!(unset.0 > bound && unset.1 > bound, "unset, a stalled socket queues more: {unset:?}");
}

/// Small receives behind a destination that stopped reading share receive buffers. A client
/// writes its stream 1,000 bytes at a time (`TCP_NODELAY`) and never reads, through an echo
/// server (so both directions stall), with `splice: never` and the proxy's socket buffers small
/// (8 KiB receive buffers on both sides: its receives bring a few KiB each). A receive whose bytes
/// fit behind those of the buffer queued before it is copied there and its own buffer given back
/// at once, so at the stall the proxy holds about as many 64 KiB buffers as its queued bytes fill
/// — not one per receive, which held 3 or more times as many (the pause counts buffers, and the
/// receives that complete after it were a buffer each). Then the client reads it all back, intact.
#[test]
fn small_receives_behind_a_stalled_destination_share_buffers_and_arrive_intact() {
    const PIECE: usize = 1000;
    let echo = Backend::start(Mode::Echo);
    let engine = engine(&format!(
        "global: {{ workers: 1, tune: {{ splice: never, rcvbuf_client: 8k, sndbuf_client: 16k, rcvbuf_server: 8k, \
         sndbuf_server: 16k }} }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
        echo.addr
    ));
    let fe = addr(&engine, "fe");
    let mut c = connect(fe);
    c.set_nodelay(true).unwrap();
    c.set_nonblocking(true).unwrap();
    let mut stream = Stream::new(11);
    let mut piece = [0u8; PIECE];
    let (mut at, mut sent, mut last_move) = (PIECE, 0u64, Instant::now());
    while last_move.elapsed() < Duration::from_secs(1) {
        if at == PIECE {
            stream.fill(&mut piece);
            at = 0;
        }
        match c.write(&piece[at..]) {
            Ok(n) => {
                at += n;
                sent += n as u64;
                last_move = Instant::now();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("the client saw {e} before it stalled"),
        }
        assert!(sent < 512 * MIB, "the client never stalled");
    }
    let s = engine.stats();
    let (held, queued, merged) =
        (s.total(|w| w.buffers_in_use), s.total(|w| w.ring_queued_bytes), s.total(|w| w.ring_recv_merged));
    let (recvs, bufs) = (s.total(|w| w.ring_recvs), s.total(|w| w.ring_recv_bufs));
    let size = u64::from(ringproxy::config::default::RECV_BUFFER_SIZE);
    eprintln!(
        "stalled after {sent} B: the proxy holds {queued} B in {held} receive buffers of {size} B; {recvs} receives \
         ({:.0} B each), {bufs} buffers filled, {merged} copied behind the bytes queued before them",
        (s.total(|w| w.bytes_client_to_server) + s.total(|w| w.bytes_server_to_client)) as f64 / recvs as f64
    );
    assert!(merged > 0 && held > 0, "small receives behind a stalled destination were copied: {merged} of {recvs}");
    // Two directions, each with a send in flight and the buffers queued behind it: in each run
    // of buffers queued while a send was in flight, two neighbours together hold more than one
    // buffer's worth (else the later one would have been copied into the earlier), but the
    // first of each run may hold a few bytes.
    let bound = 2 * queued.div_ceil(size) + 2 * 4;
    assert!(held <= bound, "{held} buffers for {queued} B (at most {bound})");

    // Everything comes back, in order and intact (pieces of PIECE bytes, a multiple of 8: the
    // stream generated in one go is the same bytes).
    c.set_nonblocking(false).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut back = vec![0u8; sent as usize];
    c.read_exact(&mut back).expect("the echo comes back");
    let mut expected = vec![0u8; (sent as usize).div_ceil(PIECE) * PIECE];
    Stream::new(11).fill(&mut expected);
    if let Some(at) = back.iter().zip(&expected).position(|(a, b)| a != b) {
        panic!("the echo differs from what was sent at byte {at} of {sent}");
    }
    drop(c);
    assert_clean(engine, &[echo.addr.port()]);
}

/// A server that answers no SYN until opened (its accept queue is full: backlog 0 and one
/// connection never accepted), then accepts everything and echoes it.
struct Gate {
    addr: std::net::SocketAddr,
    listener: socket2::Socket,
    _filler: socket2::Socket,
}

impl Gate {
    fn closed() -> Gate {
        let hole = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        hole.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
        hole.listen(0).unwrap();
        let addr = hole.local_addr().unwrap().as_socket().unwrap();
        let filler = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        filler.connect(&addr.into()).unwrap();
        Gate { addr, listener: hole, _filler: filler }
    }

    /// From now on every SYN is answered (a listen() again sets the queue's limit) and every
    /// connection echoed.
    fn open(self) {
        self.listener.listen(4096).unwrap();
        let l: std::net::TcpListener = self.listener.into();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 || c.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
    }
}

/// The slowest of 20 round trips on `rr` and of one on a new connection to frontend `rr` (kept
/// open, returned), beside whatever else the worker holds.
fn round_trips_beside(engine: &ringproxy::Engine, rr: &mut TcpStream) -> (Duration, TcpStream) {
    let mut worst = Duration::ZERO;
    for i in 0..20u32 {
        let t = Instant::now();
        echo_once(rr, &i.to_le_bytes());
        worst = worst.max(t.elapsed());
    }
    let mut fresh = connect(addr(engine, "rr"));
    let t = Instant::now();
    echo_once(&mut fresh, b"a new connection");
    (worst.max(t.elapsed()), fresh)
}

#[test]
fn clients_that_speak_while_their_server_is_unreachable_do_not_starve_the_worker() {
    // 200 clients send their first bytes at once and their server answers no SYN (a backend
    // down, or overloaded, or a storm of connects): what they sent waits for it, but not in the
    // worker's receive buffers (64 here), which the worker's other connections need meanwhile.
    const HELD: usize = 200;
    let echo = Backend::start(Mode::Echo);
    let gate = Gate::closed();
    let engine = engine(&format!(
        "global: {{ workers: 1, tune: {{ recv_buffers: 64 }} }}\n\
         frontends:\n  - {{ name: held, bind: \"127.0.0.1:0\", backend: gate }}\n\
         \x20 - {{ name: rr, bind: \"127.0.0.1:0\", backend: echo }}\n\
         backends:\n  - {{ name: gate, retries: 0, timeout: {{ connect: 20s }}, servers: [{{ name: s, address: \"{}\" }}] }}\n\
         \x20 - {{ name: echo, servers: [{{ name: s, address: \"{}\" }}] }}\n",
        gate.addr, echo.addr
    ));
    let mut rr = connect(addr(&engine, "rr"));
    echo_once(&mut rr, b"before");
    let first = |i: usize| format!("client {i:03} speaks first ").repeat(4).into_bytes();
    let mut held: Vec<TcpStream> = (0..HELD)
        .map(|i| {
            let mut c = connect(addr(&engine, "held"));
            c.write_all(&first(i)).unwrap();
            c
        })
        .collect();
    wait_until("every held client accepted", Duration::from_secs(5), || {
        engine.stats().frontends.iter().find(|f| f.frontend == "held").is_some_and(|f| f.accepted == HELD as u64)
    });
    std::thread::sleep(Duration::from_millis(200));
    let s = engine.stats();
    let in_use = s.total(|w| w.buffers_in_use);
    eprintln!(
        "{HELD} clients waiting for their server: {in_use} receive buffers held, {} bytes received",
        s.frontends.iter().find(|f| f.frontend == "held").map_or(0, |f| f.bytes_in)
    );
    assert!(in_use <= 32, "connections not yet connected hold {in_use} of the worker's 64 receive buffers");
    // Meanwhile the worker's other connections go on, and new ones are served.
    let (worst, fresh) = round_trips_beside(&engine, &mut rr);
    assert!(worst < Duration::from_millis(500), "a round trip took {worst:?} beside the waiting clients");
    // The server answers: every held client's first bytes reach it, intact, and come back.
    gate.open();
    for (i, c) in held.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut back = vec![0u8; first(i).len()];
        c.read_exact(&mut back).unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert!(back == first(i), "client {i}: the echo differs");
    }
    drop((held, rr, fresh));
    assert_clean(engine, &[echo.addr.port()]);
}

#[test]
fn a_destination_that_stops_reading_keeps_no_receive_buffer_from_the_other_flows() {
    // 100 clients push into a server that accepted them and stopped reading, through a worker of
    // 64 receive buffers: what they sent waits for it, copied out of the buffers, so that the
    // worker's other connections still get one; once it reads again every byte arrives intact.
    const HELD: usize = 100;
    let stuck = {
        let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        l.set_recv_buffer_size(4096).unwrap();
        l.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
        l.listen(1024).unwrap();
        std::net::TcpListener::from(l)
    };
    let stuck_addr = stuck.local_addr().unwrap();
    let release = Arc::new(AtomicBool::new(false));
    // Each connection, once released, read to its end: (client id, bytes after the id, SHA-256).
    let server = {
        let release = release.clone();
        std::thread::spawn(move || {
            let conns: Vec<TcpStream> = (0..HELD).map(|_| stuck.accept().unwrap().0).collect();
            while !release.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let readers: Vec<_> = conns
                .into_iter()
                .map(|mut c| {
                    std::thread::spawn(move || {
                        let mut id = [0u8; 8];
                        c.read_exact(&mut id).unwrap();
                        let (n, hash) = crate::proxy::recv_stream(&mut c);
                        (u64::from_le_bytes(id), n, hash)
                    })
                })
                .collect();
            readers.into_iter().map(|r| r.join().unwrap()).collect::<Vec<_>>()
        })
    };
    let echo = Backend::start(Mode::Echo);
    let engine = engine(&format!(
        "global: {{ workers: 1, tune: {{ recv_buffers: 64, rcvbuf_client: 16k, sndbuf_server: 16k }} }}\n\
         frontends:\n  - {{ name: held, bind: \"127.0.0.1:0\", backend: stuck }}\n\
         \x20 - {{ name: rr, bind: \"127.0.0.1:0\", backend: echo }}\n\
         backends:\n  - {{ name: stuck, servers: [{{ name: s, address: \"{stuck_addr}\" }}] }}\n\
         \x20 - {{ name: echo, servers: [{{ name: s, address: \"{}\" }}] }}\n",
        echo.addr
    ));
    let mut rr = connect(addr(&engine, "rr"));
    echo_once(&mut rr, b"before");
    // Each client pushes until its socket takes no more for 20 ms (everything on the way is full).
    let mut held: Vec<(TcpStream, u64, Sha256)> = Vec::new();
    for i in 0..HELD {
        let mut c = connect(addr(&engine, "held"));
        socket2::SockRef::from(&c).set_send_buffer_size(16 << 10).unwrap();
        c.write_all(&(i as u64).to_le_bytes()).unwrap();
        c.set_nonblocking(true).unwrap();
        let mut chunk = vec![0u8; 64 << 10];
        Stream::new(i as u64).fill(&mut chunk);
        let (mut h, mut n, mut refused, mut at) = (Sha256::new(), 0u64, 0, 0usize);
        while refused < 4 {
            match c.write(&chunk[at..]) {
                Ok(k) => {
                    h.update(&chunk[at..at + k]);
                    n += k as u64;
                    at = (at + k) % chunk.len();
                    refused = 0;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    refused += 1;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("client {i}: {e}"),
            }
        }
        held.push((c, n, h));
    }
    // Meanwhile the worker's other connections go on, and new ones are served.
    let (worst, fresh) = round_trips_beside(&engine, &mut rr);
    // (A receive may wait up to STALL_MS, 200 ms, for the stuck queues to give their buffers up;
    // before, it waited for as long as the server did not read.)
    assert!(worst < Duration::from_secs(2), "a round trip took {worst:?} beside the stuck flows");
    let s = engine.stats();
    let (in_use, spilled) = (s.total(|w| w.buffers_in_use), s.total(|w| w.ring_spilled_bytes));
    eprintln!(
        "{HELD} flows into a server that stopped reading ({} MiB pushed): {in_use} receive buffers held, \
         {spilled} bytes copied out of them in {} spills",
        held.iter().map(|h| h.1).sum::<u64>() >> 20,
        s.total(|w| w.ring_spills)
    );
    // (How many buffers the stuck flows hold at a given moment varies: a source whose receive
    // waited for a buffer gets one, its queue waits for room, and is copied out once it has waited
    // STALL_MS while others wait; what is asserted is that the others are served.)
    assert!(spilled > 0, "what they queued was copied out of the buffers ({in_use} held)");
    // The server reads again: every byte each client sent arrives, in order.
    release.store(true, Ordering::SeqCst);
    let mut expected = std::collections::HashMap::new();
    for (i, (c, n, h)) in held.iter_mut().enumerate() {
        c.set_nonblocking(false).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        expected.insert(i as u64, (*n, <[u8; 32]>::from(std::mem::take(h).finalize())));
    }
    let got = server.join().unwrap();
    assert_eq!(got.len(), HELD);
    for (id, n, hash) in got {
        let (want_n, want_hash) = expected[&id];
        assert_eq!(n, want_n, "client {id}: bytes that reached the server");
        assert!(hash == want_hash, "client {id}: the bytes differ");
    }
    drop((held, rr, fresh));
    assert_clean(engine, &[echo.addr.port(), stuck_addr.port()]);
}
