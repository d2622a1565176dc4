//! Faults of a backend: killed mid-transfer, stops reading, never answers SYN.

use std::io::ErrorKind;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::*;

#[test]
fn backend_killed_mid_transfer() {
    const VICTIMS: u64 = 12;
    const AFTER: u64 = 20;
    let doomed = FaultBackend::start(Some(b'K'), Behaviour::Echo);
    let good = FaultBackend::start(Some(b'G'), Behaviour::Echo);
    let (engine, echo) = engine_with(
        "",
        "",
        &format!(
            "  - {{ name: be, balance: roundrobin, servers: [{{ name: doomed, address: \"{}\" }}, {{ name: good, address: \"{}\" }}] }}\n",
            doomed.addr, good.addr
        ),
    );
    let (by, fe) = (addr(&engine, "by"), addr(&engine, "fe"));
    let bystanders = Bystanders::start(by, 4, 3);
    let victims: Vec<Victim> = (0..VICTIMS).map(|i| Victim::start(fe, 100 + i, true, 2 * MIB)).collect();
    wait_until("every connection of `fe` to stream both ways", Duration::from_secs(20), || {
        victims.iter().all(|v| v.ready.load(Ordering::SeqCst))
    });
    assert!(doomed.accepted() >= 1 && good.accepted() >= 1, "round robin put connections on both servers");
    let on_doomed = doomed.active();
    bystanders.wait_progress("the bystanders to stream before the kill", MIB, 2);

    let killed_at = Instant::now();
    doomed.kill();
    let refused = TcpStream::connect_timeout(&doomed.addr, Duration::from_secs(2));
    assert!(
        refused.as_ref().is_err_and(|e| e.kind() == ErrorKind::ConnectionRefused),
        "the killed server refuses connections: {refused:?}"
    );
    // New connections while the killed server's clients are being cut: all reach the good one.
    let before = bystanders.progress();
    let mut tags = Vec::new();
    for i in 0..AFTER {
        tags.push(tagged_exchange(fe, 500 + i, 64 * KIB + i).unwrap_or_else(|e| panic!("new connection {i}: {e}")));
    }
    assert!(tags.iter().all(|&t| t == b'G'), "every new connection went to the good server: {tags:?}");
    bystanders.wait_progress("the bystanders to keep streaming after the kill", MIB, 2);
    let after = bystanders.progress();

    // Finish the survivors, then look at everyone.
    for v in &victims {
        v.stop.store(true, Ordering::SeqCst);
    }
    let ends: Vec<VictimEnd> = victims.into_iter().map(|v| v.handle.join().unwrap()).collect();
    let (mut cut, mut survived, mut by_reset, mut got_before_cut) = (0, 0, 0, 0);
    for (i, e) in ends.iter().enumerate() {
        match e.tag {
            Some(b'K') => {
                let (at, how) = e.cut.as_ref().unwrap_or_else(|| panic!("victim {i} on the killed server was not cut"));
                let after_kill = at.saturating_duration_since(killed_at);
                assert!(after_kill < Duration::from_secs(2), "victim {i} noticed the kill only after {after_kill:?}");
                assert!(how == "ConnectionReset" || how == "EOF", "victim {i} saw {how}");
                e.intact.as_ref().unwrap_or_else(|err| panic!("victim {i}: what it got before the cut: {err}"));
                by_reset += (how == "ConnectionReset") as u64;
                got_before_cut += e.received;
                cut += 1;
            }
            Some(b'G') => {
                assert!(e.cut.is_none(), "victim {i} on the good server was cut: {:?}", e.cut);
                e.intact.as_ref().unwrap_or_else(|err| panic!("victim {i} on the good server: {err}"));
                assert_eq!(e.sent, e.received);
                survived += 1;
            }
            other => panic!("victim {i}: unexpected tag {other:?}"),
        }
    }
    assert_eq!(cut, on_doomed as u64, "every connection of the killed server was cut");
    let bystanders = bystanders.finish("backend killed");
    let s = engine.stats();
    assert_eq!(s.total(|w| w.resets_from_server), cut, "each cut connection counted as a server reset");
    assert!(s.total(|w| w.connect_errors.refused) >= 1, "connects to the killed server were refused");
    assert_eq!(s.total(|w| w.retries), s.total(|w| w.connect_errors.total()), "every refused connect was retried");
    assert_eq!(s.total(|w| w.failed), 0, "no client failed");
    eprintln!(
        "backend killed: {cut} clients of the killed server cut ({by_reset} saw a reset, {} an EOF; {:.1} MiB received \
         before the cut, all intact), {survived} on the good server intact, {AFTER}/{AFTER} new connections served by the good server ({} connects refused and \
         retried), bystanders moved {:.1} MiB and {} connections between the kill and the end of the new ones",
        cut - by_reset,
        got_before_cut as f64 / MIB as f64,
        s.total(|w| w.connect_errors.refused),
        (after.0 - before.0) as f64 / MIB as f64,
        after.1 - before.1
    );
    assert!(bystanders.connections >= 4);
    still_serves_then_clean(engine, echo, &[("by", false), ("fe", true)], &[doomed.addr.port(), good.addr.port()]);
}

#[test]
fn backend_that_stops_reading() {
    const STUCK: u64 = 4;
    const PIPE: u64 = 256 * KIB;
    let stuck = FaultBackend::start(None, Behaviour::StopReadingAfter(MIB));
    // The stuck flows stop both timers; the server timeout is the shorter, so it closes them.
    let (engine, echo) = engine_with(
        "defaults: { timeout: { client: 30s } }\n",
        "",
        &format!(
            "  - {{ name: be, timeout: {{ server: 4s }}, servers: [{{ name: stuck, address: \"{}\" }}] }}\n",
            stuck.addr
        ),
    );
    // What a client can push into a path whose end reads nothing, if the proxy adds only its pipe:
    // its own send buffer, the proxy's receive buffer, one pipe, the proxy's send buffer, the
    // server's receive buffer, and the 1 MiB the server read.
    let (rmem, wmem) = (tcp_buffer_max("tcp_rmem"), tcp_buffer_max("tcp_wmem"));
    let bound = 2 * (rmem + wmem) + PIPE + MIB;
    let (by, fe) = (addr(&engine, "by"), addr(&engine, "fe"));
    let stalled = Arc::new(AtomicUsize::new(0));
    let clients = spawn_each(STUCK, {
        let stalled = stalled.clone();
        move |i| {
            // Push as fast as the path takes it; "stalled" once nothing moved for 1 s.
            let mut p = Pump::connect(fe, 300 + i, false).unwrap();
            let mut last_move = Instant::now();
            let mut stalled_at: Option<Instant> = None;
            loop {
                let how = match p.step() {
                    Ok(true) if p.eof => "EOF".to_owned(),
                    Ok(true) => {
                        last_move = Instant::now();
                        String::new()
                    }
                    Ok(false) => {
                        p.wait(20);
                        String::new()
                    }
                    Err(e) => format!("{:?}", e.kind()),
                };
                if !how.is_empty() {
                    return (p.sent, stalled_at.map(|t| t.elapsed()), how);
                }
                if stalled_at.is_none() && last_move.elapsed() > Duration::from_secs(1) {
                    stalled_at = Some(Instant::now());
                    stalled.fetch_add(1, Ordering::SeqCst);
                }
                assert!(p.sent <= bound, "client {i} pushed {} bytes into a stuck path (bound {bound})", p.sent);
            }
        }
    });
    wait_until("every client toward the stuck server to stall", Duration::from_secs(20), || {
        stalled.load(Ordering::SeqCst) == STUCK as usize
    });
    // Bounded: one pipe per stuck flow at most (splice), or a paused flow's share of receive
    // buffers (`splice: auto`, the default here, before a flow splices): 1 MiB of them, plus what
    // its multishot receive took before the pause took effect — at most what its socket held
    // then, the receive buffer's autotuning ceiling (tcp_rmem max), in buffers of this mode's
    // default `recv_buffer_size` (the ring's offer, which other flows' bursts may have widened,
    // is no bound). And nothing moves any more.
    let s1 = engine.stats();
    let pipes_stalled = s1.total(|w| w.pipes_in_use);
    assert!(pipes_stalled <= STUCK, "pipes lent: {pipes_stalled}");
    let rmem_max: u64 = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem")
        .ok()
        .and_then(|t| t.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(6 << 20);
    let buf = u64::from(ringproxy::config::default::RECV_BUFFER_SIZE);
    let per_flow = (MIB + rmem_max).div_ceil(buf);
    let buffers_stalled = s1.total(|w| w.buffers_in_use);
    assert!(buffers_stalled <= STUCK * per_flow, "receive buffers held: {buffers_stalled} (bound {per_flow} per flow)");
    assert_eq!(stuck.st.bytes_in.load(Ordering::SeqCst), STUCK * MIB, "the server read 1 MiB each, then stopped");
    thread::sleep(Duration::from_millis(300));
    let s2 = engine.stats();
    assert_eq!(
        s1.total(|w| w.bytes_client_to_server),
        s2.total(|w| w.bytes_client_to_server),
        "the proxy moves nothing toward a server that reads nothing"
    );
    assert!(s2.total(|w| w.buffers_in_use) <= buffers_stalled, "stalled flows take no more buffers: memory stays flat");
    let forwarded = s2.total(|w| w.bytes_client_to_server);
    // Others are unaffected meanwhile.
    let bystanders = Bystanders::start(by, 3, 3);
    bystanders.wait_progress("the bystanders to stream past the stuck connections", 4 * MIB, 8);
    let pipes_during = engine.stats().total(|w| w.pipes_in_use);
    let bystanders = bystanders.finish("backend stops reading");
    let pipes_after = engine.stats().total(|w| w.pipes_in_use);
    assert!(pipes_after <= STUCK, "pipes lent with only the stuck flows left: {pipes_after}");
    // The server timeout frees them; each client learns it.
    let ends = join_all(clients);
    for (i, (pushed, waited, how)) in ends.iter().enumerate() {
        assert!(*pushed <= bound, "client {i} pushed {pushed} bytes into a stuck path (bound {bound})");
        let waited = waited.unwrap_or_else(|| panic!("client {i} ended ({how}) before it stalled"));
        assert!(waited < Duration::from_secs(4 + 3), "client {i} closed {waited:?} after stalling");
        assert!(how == "EOF" || how == "ConnectionReset" || how == "BrokenPipe", "client {i} saw {how}");
    }
    let s = engine.stats();
    assert_eq!(s.total(|w| w.timeouts.server), STUCK, "the server timeout closed the stuck connections");
    assert_eq!(s.total(|w| w.timeouts.client), 0);
    stuck.release();
    wait_until("the stuck server to close", Duration::from_secs(5), || stuck.active() == 0);
    let most = ends.iter().map(|e| e.0).max().unwrap();
    eprintln!(
        "backend stops reading: {STUCK} clients stalled after pushing at most {:.1} MiB each (bound from kernel \
         buffers + one pipe: {:.1} MiB); the proxy forwarded {:.1} MiB in all and the server read {STUCK} MiB; pipes \
         lent {pipes_stalled} while stalled, {pipes_during} with bystanders running, {pipes_after} after; receive buffers \
         held {buffers_stalled} while stalled; all closed by \
         the server timeout ({:?})",
        most as f64 / MIB as f64,
        bound as f64 / MIB as f64,
        forwarded as f64 / MIB as f64,
        ends.iter().map(|e| e.2.as_str()).collect::<Vec<_>>()
    );
    assert!(bystanders.connections >= 8);
    still_serves_then_clean(engine, echo, &[("by", false)], &[stuck.addr.port()]);
}

#[test]
fn backend_that_never_answers_syn() {
    const CLIENTS: u64 = 20;
    let hole = BlackHole::start();
    let good = FaultBackend::start(Some(b'G'), Behaviour::Echo);
    let (engine, echo) = engine_with(
        "",
        "",
        &format!(
            "  - {{ name: be, balance: roundrobin, retries: 3, timeout: {{ connect: 300ms }}, servers: [{{ name: hole, address: \"{}\" }}, {{ name: good, address: \"{}\" }}] }}\n",
            hole.addr, good.addr
        ),
    );
    let (by, fe) = (addr(&engine, "by"), addr(&engine, "fe"));
    let bystanders = Bystanders::start(by, 4, 3);
    bystanders.wait_progress("the bystanders to stream", MIB, 2);
    let before = bystanders.progress();
    let results = join_all(spawn_each(CLIENTS, move |i| {
        let t = Instant::now();
        let tag = tagged_exchange(fe, 700 + i, 128 * KIB + i);
        (tag, t.elapsed())
    }));
    let after = bystanders.progress();
    let mut slow = 0;
    for (i, (tag, took)) in results.iter().enumerate() {
        let tag = tag.as_ref().unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert_eq!(*tag, b'G', "client {i} was served by the good server");
        assert!(*took < Duration::from_secs(3), "client {i} took {took:?}");
        slow += (*took >= Duration::from_millis(290)) as u64;
    }
    let s = engine.stats();
    let timeouts = s.total(|w| w.connect_errors.timeout);
    assert!(timeouts >= 1, "some connects went to the black hole first");
    assert_eq!(s.total(|w| w.connect_errors.total()), timeouts, "no other connect error");
    assert_eq!(s.total(|w| w.retries), timeouts, "each timed-out connect was retried");
    assert_eq!(s.total(|w| w.failed), 0, "no client failed");
    assert!(slow >= timeouts, "{slow} clients waited the connect timeout, {timeouts} connects timed out");
    let bystanders = bystanders.finish("backend never answers SYN");
    eprintln!(
        "backend never answers SYN: {CLIENTS}/{CLIENTS} clients served by the good server, {timeouts} after a connect \
         timeout and a retry (slowest {:?}); bystanders moved {:.1} MiB and {} connections meanwhile",
        results.iter().map(|r| r.1).max().unwrap(),
        (after.0 - before.0) as f64 / MIB as f64,
        after.1 - before.1
    );
    assert!(bystanders.connections >= 4);
    // The black hole's own port holds its filler connection, so instead of checking the port:
    // no connect toward it is left pending.
    wait_until("no connect pending toward the black hole", Duration::from_secs(5), || hole.connects_pending() == 0);
    still_serves_then_clean(engine, echo, &[("by", false), ("fe", true)], &[good.addr.port()]);
}
