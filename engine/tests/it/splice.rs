//! Bulk flows with `tune.splice: auto` (the default) and `always`: spliced by splice(2) on the
//! worker's own thread, through process descriptors FIXED_FD_INSTALL made of the connection's
//! sockets (an io_uring SPLICE always runs on an io-wq thread). Where a connection cannot have
//! them (a kernel without the op, or the worker's share of descriptors is taken) `auto` keeps
//! the receive buffers and `always` splices through io_uring.

use std::time::{Duration, Instant};

use crate::common::*;

const MIB: u64 = 1 << 20;

/// Engine with one frontend to `backend` and these `tune` keys.
fn engine_with(backend: std::net::SocketAddr, workers: u32, tune: &str) -> TestEngine {
    engine(&format!(
        "global: {{ workers: {workers}, tune: {{ {tune} }} }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{backend}\" }}] }}]\n"
    ))
}

/// `pumps` send their streams through the echo path at once and read them back whole
/// (`run_all`). Returns the most descriptors for splicing the engine held at once (sampled every
/// 20 ms).
fn run_sampling(engine: &TestEngine, pumps: &mut [Pump]) -> u64 {
    let (mut most, mut sampled) = (0, Instant::now());
    run_all(pumps, Duration::from_secs(60), || {
        if sampled.elapsed() > Duration::from_millis(20) {
            most = most.max(engine.stats().total(|w| w.splice_fds));
            sampled = Instant::now();
        }
    });
    most
}

#[test]
fn bulk_flows_are_spliced_on_the_workers_own_thread_and_arrive_intact() {
    for splice in ["auto", "always"] {
        let backend = Backend::start(Mode::Echo);
        let engine = engine_with(backend.addr, 2, &format!("splice: {splice}, pipe_size: 64k"));
        let fe = addr(&engine, "fe");
        // The kernel's (or the pinned feature set's, scripts/test.sh's 6.1 pass) FIXED_FD_INSTALL.
        let here = engine.plan().io.fd_install;
        let mut pumps: Vec<Pump> =
            (0..6).map(|i| Pump::connect(fe, 4_000 + i, false).unwrap().limit(8 * MIB)).collect();
        let most = run_sampling(&engine, &mut pumps);
        let s = engine.stats();
        let (spliced, inline) = (s.total(|w| w.splices), s.total(|w| w.inline_splices));
        assert_eq!(s.total(|w| w.bytes_client_to_server), 6 * 8 * MIB, "{splice}: bytes up");
        assert_eq!(s.total(|w| w.bytes_server_to_client), 6 * 8 * MIB, "{splice}: bytes down");
        if here {
            assert!(inline > 0, "{splice}: nothing spliced on the worker's thread ({spliced} splices)");
            assert_eq!(spliced, inline, "{splice}: every splice on the worker's thread, none through io_uring");
            // Each of the 6 connections carried bulk data: each held its two descriptors until
            // it closed.
            assert_eq!(most, 12, "{splice}: descriptors held while the connections were open");
        } else {
            assert_eq!(inline, 0, "{splice}: no FIXED_FD_INSTALL, no splice on the worker's thread");
            if splice == "always" {
                assert!(spliced > 0, "{splice}: bulk data through io_uring splices");
            } else {
                // (An io_uring splice costs an io-wq hand-off per chunk: receive buffers are faster.)
                assert_eq!(spliced, 0, "{splice}: bulk data through receive buffers");
            }
            assert_eq!(most, 0);
        }
        drop(pumps);
        // Every gauge back to 0, the descriptors for splicing included, and no socket left open.
        assert_clean(engine, &[backend.addr.port()]);
    }
}

#[test]
fn connections_beyond_the_workers_share_of_descriptors_splice_through_io_uring() {
    // `max_pipes: 1`: the worker holds descriptors for one connection at a time (as many
    // connections as pipes, plan.rs); the others' bulk flows splice through io_uring, and every
    // connection gets its bytes across whole.
    let backend = Backend::start(Mode::Echo);
    let engine = engine_with(backend.addr, 1, "splice: always, max_pipes: 1, pipe_size: 64k");
    let fe = addr(&engine, "fe");
    let here = engine.plan().io.fd_install;
    let mut pumps: Vec<Pump> = (0..3).map(|i| Pump::connect(fe, 5_000 + i, false).unwrap().limit(4 * MIB)).collect();
    let most = run_sampling(&engine, &mut pumps);
    let s = engine.stats();
    let (spliced, inline) = (s.total(|w| w.splices), s.total(|w| w.inline_splices));
    assert!(spliced > inline, "some splices through io_uring ({spliced} splices, {inline} on the worker's thread)");
    if here {
        assert!(inline > 0, "one connection spliced on the worker's thread");
        assert_eq!(most, 2, "at most one connection's two descriptors at once");
    }
    drop(pumps);
    assert_clean(engine, &[backend.addr.port()]);
}

#[test]
fn a_flow_goes_back_to_receive_buffers_when_its_messages_get_small() {
    // `auto`: a connection moves 4 MiB each way (its flows splice), then carries small request /
    // response messages: those go through the ring of receive buffers again, each flow having
    // spliced at most its first small message (which tells it the bulk transfer is over).
    use std::io::{Read, Write};
    let backend = Backend::start(Mode::Echo);
    let engine = engine_with(backend.addr, 1, "splice: auto");
    let here = engine.plan().io.fd_install;
    let mut c = connect(addr(&engine, "fe"));
    let mut w = c.try_clone().unwrap();
    let bulk: Vec<u8> = (0..4 * MIB as usize).map(|i| (i * 7 % 251) as u8).collect();
    let sent = bulk.clone();
    let writer = std::thread::spawn(move || w.write_all(&sent).unwrap());
    let mut back = vec![0u8; bulk.len()];
    c.read_exact(&mut back).unwrap();
    writer.join().unwrap();
    assert!(back == bulk, "the bulk transfer came back whole");
    let before = engine.stats();
    let inline_bulk = before.total(|w| w.inline_splices);
    if here {
        assert!(inline_bulk > 0, "the bulk transfer was spliced");
    } else {
        assert_eq!(inline_bulk, 0, "no FIXED_FD_INSTALL: receive buffers only");
    }
    for i in 0..50u32 {
        let msg = format!("small message {i:>4}");
        c.write_all(msg.as_bytes()).unwrap();
        let mut got = vec![0u8; msg.len()];
        c.read_exact(&mut got).unwrap();
        assert_eq!(got, msg.as_bytes(), "message {i}");
    }
    let after = engine.stats();
    let recvs = after.total(|w| w.ring_recvs) - before.total(|w| w.ring_recvs);
    let spliced = after.total(|w| w.inline_splices) - inline_bulk;
    assert!(spliced <= 2, "{spliced} small messages spliced (at most the first each way)");
    assert!(recvs >= 2 * 50 - 2, "small messages through receive buffers: {recvs} receives for 50 each way");
    drop(c);
    assert_clean(engine, &[backend.addr.port()]);
}

#[test]
fn no_receive_buffer_holds_more_than_the_configured_size_and_bundles_bring_several() {
    // `tune.recv_buffer_size` is the buffer the kernel fills: with 4 KiB buffers (`never`: every
    // byte through them) a bulk echo fills at least one buffer per 4 KiB each way (64 KiB buffers
    // take a few per megabyte here). Where the kernel bundles receives (6.10+), one completion
    // brings several of them; without (the 6.1 set), one each.
    let backend = Backend::start(Mode::Echo);
    let engine = engine_with(backend.addr, 1, "splice: never, recv_buffer_size: 4k");
    let fe = addr(&engine, "fe");
    let mut pumps: Vec<Pump> = (0..2).map(|i| Pump::connect(fe, 5_000 + i, false).unwrap().limit(4 * MIB)).collect();
    run_all(&mut pumps, Duration::from_secs(60), || {});
    let s = engine.stats();
    let bytes = s.total(|w| w.bytes_client_to_server) + s.total(|w| w.bytes_server_to_client);
    assert_eq!(bytes, 2 * 2 * 4 * MIB, "every byte across, both ways");
    let (recvs, bufs) = (s.total(|w| w.ring_recvs), s.total(|w| w.ring_recv_bufs));
    eprintln!("{bytes} bytes: {recvs} receive completions, {bufs} buffers");
    assert!(bufs * 4096 >= bytes, "{bufs} receive buffers for {bytes} bytes: some held more than 4 KiB");
    assert!(
        bufs <= bytes.div_ceil(4096) + recvs,
        "{bufs} buffers for {bytes} bytes in {recvs} receives: all but each last full"
    );
    if engine.plan().io.bundle {
        assert!(recvs * 2 <= bufs, "bundles: {recvs} receive completions for {bufs} buffers");
    } else {
        assert_eq!(recvs, bufs, "no bundles: one buffer per receive completion");
    }
    assert_eq!(s.total(|w| w.splices), 0, "never: no splice");
    drop(pumps);
    assert_clean(engine, &[backend.addr.port()]);
}

#[test]
fn auto_measures_both_bulk_paths_while_flows_run_and_holds_one() {
    // `splice: auto`: once a window of bulk traffic was measured with the flows splicing, the
    // worker moves them to its receive buffers for a window and measures that too
    // (worker/bulkpath.rs), then holds one path. Flows move both ways mid-stream (splicing →
    // receive between two splices, and back if splicing wins): every byte arrives, in order.
    // Without FIXED_FD_INSTALL (the 6.1 set) flows splice through io-wq, whose CPU the worker's
    // clock does not see: it does not choose, its bulk flows splice.
    let backend = Backend::start(Mode::Echo);
    let engine = engine_with(backend.addr, 1, "splice: auto");
    let fe = addr(&engine, "fe");
    let chooses = engine.plan().io.fd_install;
    let mut pumps: Vec<Pump> = (0..2).map(|i| Pump::connect(fe, 7_000 + i, false).unwrap()).collect();
    if !chooses {
        pumps = pumps.into_iter().map(|p| p.limit(64 * MIB)).collect();
        run_all(&mut pumps, Duration::from_secs(60), || {});
        let w = engine.stats().workers[0].clone();
        assert_eq!((w.bulk_splicing, w.bulk_path_switches, w.bulk_cost_copy_ps), (1, 0, 0));
        drop(pumps);
        return assert_clean(engine, &[backend.addr.port()]);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut measured, mut looked) = (false, Instant::now());
    while pumps.iter().any(|p| !p.eof) {
        assert!(Instant::now() < deadline, "no decision within 60 s: {:?}", engine.stats().workers[0]);
        if !measured && looked.elapsed() > Duration::from_millis(20) {
            looked = Instant::now();
            let s = engine.stats();
            if s.workers[0].bulk_cost_copy_ps > 0 && s.workers[0].bulk_cost_splice_ps > 0 {
                // Both measured: a path was chosen. The streams end here.
                measured = true;
                pumps.iter_mut().for_each(Pump::finish);
            }
        }
        step_all(&mut pumps);
    }
    for (i, p) in pumps.iter().enumerate() {
        p.intact().unwrap_or_else(|e| panic!("stream {i}: {e}"));
    }
    let w = engine.stats().workers[0].clone();
    eprintln!(
        "bulk path: splicing {}, {} switches, copy {} ps/B, splice {} ps/B, {} inline splices, {} receive buffers",
        w.bulk_splicing,
        w.bulk_path_switches,
        w.bulk_cost_copy_ps,
        w.bulk_cost_splice_ps,
        w.inline_splices,
        w.ring_recv_bufs
    );
    assert!(w.bulk_path_switches >= 1, "the receive buffers were tried");
    assert!(w.inline_splices > 0, "the flows spliced first");
    // A window that counts moves at least 16 MiB (bulkpath.rs), through buffers of at most
    // `recv_buffer_size` each: at least 16 MiB / that many buffers were filled.
    let bytes = w.bytes_client_to_server + w.bytes_server_to_client;
    let size = u64::from(ringproxy::config::default::RECV_BUFFER_SIZE);
    assert!(
        w.ring_recv_bufs * size >= 16 << 20,
        "a window's worth (16 MiB) went through the receive buffers: {} buffers of {bytes} bytes",
        w.ring_recv_bufs
    );
    drop(pumps);
    assert_clean(engine, &[backend.addr.port()]);
}

#[test]
fn each_backend_moves_bulk_data_as_its_own_splice_mode_says() {
    // `backends[].splice` over `tune.splice`: one worker, a frontend to a backend with its own
    // mode and one to a backend with `tune.splice`'s, both to the same echo server. Bulk streams
    // through each in turn move as their backend's mode says — `never`: through the receive
    // buffers, no splice; `always`: every chunk by splice, no receive buffer; `auto`: spliced on
    // the worker's thread where the kernel has FIXED_FD_INSTALL, else receive buffers — and
    // arrive whole, whichever mode the other backend and the worker's defaults have.
    for (tune, own) in [("always", "never"), ("never", "always"), ("auto", "never"), ("never", "auto")] {
        let backend = Backend::start(Mode::Echo);
        let engine = engine(&format!(
            "global: {{ workers: 1, tune: {{ splice: {tune}, pipe_size: 64k }} }}\n\
             frontends:\n\
             \x20 - {{ name: own, bind: \"127.0.0.1:0\", backend: own }}\n\
             \x20 - {{ name: inherits, bind: \"127.0.0.1:0\", backend: inherits }}\n\
             backends:\n\
             \x20 - {{ name: own, splice: {own}, servers: [{{ name: s, address: \"{a}\" }}] }}\n\
             \x20 - {{ name: inherits, servers: [{{ name: s, address: \"{a}\" }}] }}\n",
            a = backend.addr
        ));
        let here = engine.plan().io.fd_install;
        // The stats say each backend's mode.
        let said: Vec<(String, String)> =
            engine.stats().backends.iter().map(|b| (b.backend.clone(), b.splice.clone())).collect();
        assert_eq!(said, [("own".to_string(), own.to_string()), ("inherits".to_string(), tune.to_string())]);
        // `show conns` says how each way of a connection moves its bytes: a connection that said
        // one small thing splices only under `always`.
        let mut small: Vec<std::net::TcpStream> =
            ["own", "inherits"].iter().map(|fe| connect(addr(&engine, fe))).collect();
        for c in &mut small {
            echo_once(c, b"small");
        }
        for (fe, mode) in [("own", own), ("inherits", tune)] {
            let lines = engine.list_conns(ringproxy::admin::ConnMatch::default(), 100);
            let line = lines.iter().find(|l| l.contains(&format!("frontend={fe} "))).expect("listed");
            let path = if mode == "always" { "splice" } else { "buffers" };
            assert!(line.contains(&format!("path_in={path} path_out={path}")), "{fe} ({mode}): {line}");
        }
        drop(small);
        // (Closed before the streams start: their last completions counted in no stream's figures.)
        wait_until("the small connections to close", Duration::from_secs(10), || {
            engine.stats().total(|w| w.active + w.closing) == 0
        });
        for (fe, mode) in [("own", own), ("inherits", tune)] {
            let before = engine.stats().workers[0].clone();
            let size = if mode == "auto" { 8 * MIB } else { 128 * MIB };
            let mut pumps: Vec<Pump> =
                (0..2).map(|i| Pump::connect(addr(&engine, fe), 9_000 + i, false).unwrap().limit(size)).collect();
            run_all(&mut pumps, Duration::from_secs(60), || {});
            for (i, p) in pumps.iter().enumerate() {
                p.intact().unwrap_or_else(|e| panic!("{tune}/{own}, {fe} stream {i}: {e}"));
            }
            let w = engine.stats().workers[0].clone();
            let (spliced, inline, bufs) = (
                w.splices - before.splices,
                w.inline_splices - before.inline_splices,
                w.ring_recv_bufs - before.ring_recv_bufs,
            );
            let case = format!("tune.splice {tune}, {fe} ({mode}): {spliced} splices, {inline} inline, {bufs} buffers");
            assert_eq!(w.bytes_client_to_server - before.bytes_client_to_server, 2 * size, "{case}");
            if mode != "auto" {
                // `auto`'s chooser (worker/bulkpath.rs) weighs only the bytes of connections whose
                // path it chooses: 512 MiB of another mode's bulk data (several of its windows)
                // measured neither path.
                let costs = |w: &ringproxy::stats::WorkerStats| {
                    (w.bulk_cost_copy_ps, w.bulk_cost_splice_ps, w.bulk_path_switches)
                };
                assert_eq!(costs(&w), costs(&before), "{case}: the chooser measured");
            }
            match mode {
                "never" => assert!(spliced == 0 && bufs > 0, "{case}: through the receive buffers only"),
                "always" => assert!(spliced > 0 && bufs == 0, "{case}: every chunk by splice"),
                _ if here => assert!(inline > 0, "{case}: bulk data spliced on the worker's thread"),
                _ => assert!(spliced == 0 && bufs > 0, "{case}: no FIXED_FD_INSTALL, receive buffers"),
            }
            drop(pumps);
        }
        // Every gauge back to 0 (buffers, pipes, descriptors for splicing), no socket left open.
        assert_clean(engine, &[backend.addr.port()]);
    }
}
