//! Faults of clients: they connect and send nothing, or reset mid-transfer.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::*;

#[test]
fn idle_clients_are_freed_by_the_client_timeout() {
    const IDLE: u64 = 40;
    let server = FaultBackend::start(None, Behaviour::Echo);
    // `fe` admits exactly IDLE clients: if the idle ones were not freed, nobody else would get in.
    let (engine, echo) = engine_with(
        "",
        &format!(", maxconn: {IDLE}, timeout: {{ client: 500ms }}"),
        &format!("  - {{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}\n", server.addr),
    );
    let (by, fe) = (addr(&engine, "by"), addr(&engine, "fe"));
    let bystanders = Bystanders::start(by, 4, 3);
    let results = join_all(spawn_each(IDLE, move |_| {
        let t = Instant::now();
        let mut c = connect(fe);
        let (got, err) = read_to_end(&mut c);
        (got.len(), err.map(|e| e.kind()), t.elapsed())
    }));
    for (i, (got, err, took)) in results.iter().enumerate() {
        assert_eq!(*got, 0, "idle client {i} received bytes");
        assert!(err.is_none(), "idle client {i} sees a clean close, not {err:?}");
        assert!(*took >= Duration::from_millis(400), "idle client {i} closed after only {took:?}");
        assert!(*took < Duration::from_secs(2), "idle client {i} closed only after {took:?}");
    }
    let s = engine.stats();
    assert_eq!(s.total(|w| w.timeouts.client), IDLE, "each idle client counted as a client timeout");
    wait_until("the server to see every idle connection closed", Duration::from_secs(2), || server.active() == 0);
    assert_eq!(server.accepted() as u64, IDLE);
    // Their slots are free again: IDLE working clients get in at once.
    let workers = join_all(spawn_each(IDLE, move |i| {
        let mut p = Pump::connect(fe, 800 + i, false).unwrap().limit(100 * KIB + i);
        p.run(Instant::now() + Duration::from_secs(20)).and_then(|_| p.intact())
    }));
    for (i, w) in workers.into_iter().enumerate() {
        w.unwrap_or_else(|e| panic!("client {i} after the idle ones: {e}"));
    }
    bystanders.wait_progress("the bystanders to stream", MIB, 2);
    let bystanders = bystanders.finish("idle clients");
    assert_eq!(engine.stats().total(|w| w.timeouts.client), IDLE, "no bystander timed out");
    eprintln!(
        "idle clients: {IDLE}/{IDLE} idle clients closed by the 500 ms client timeout after {:?}..{:?}, then \
         {IDLE}/{IDLE} working clients served in their slots",
        results.iter().map(|r| r.2).min().unwrap(),
        results.iter().map(|r| r.2).max().unwrap()
    );
    assert!(bystanders.connections >= 4);
    still_serves_then_clean(engine, echo, &[("by", false), ("fe", false)], &[server.addr.port()]);
}

#[test]
fn clients_reset_mid_transfer() {
    const RESETTERS: u64 = 10;
    const SURVIVORS: u64 = 4;
    let server = FaultBackend::start(None, Behaviour::Echo);
    let (engine, echo) =
        engine_with("", "", &format!("  - {{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}\n", server.addr));
    let (by, fe) = (addr(&engine, "by"), addr(&engine, "fe"));
    let bystanders = Bystanders::start(by, 4, 3);
    // Survivors share the server with the resetting clients.
    let survivors: Vec<Victim> = (0..SURVIVORS).map(|i| Victim::start(fe, 400 + i, false, 2 * MIB)).collect();
    // Resetting clients stream unpaced, so bytes are in flight both ways when they reset.
    let resetters: Vec<_> = (0..RESETTERS)
        .map(|i| {
            let mut p = Pump::connect(fe, 450 + i, false).unwrap();
            let t = Instant::now();
            while p.received < 512 * KIB {
                assert!(t.elapsed() < Duration::from_secs(20), "resetting client {i} never got going");
                if !p.step().unwrap() {
                    p.wait(10);
                }
            }
            // Queue more so the reset happens with data in flight.
            for _ in 0..4 {
                let _ = p.step();
            }
            p
        })
        .collect();
    wait_until("the survivors to stream", Duration::from_secs(20), || {
        survivors.iter().all(|v| v.ready.load(Ordering::SeqCst))
    });
    assert_eq!(server.active() as u64, RESETTERS + SURVIVORS);
    let mut in_flight = 0;
    for p in &resetters {
        p.prefix_intact().unwrap();
        in_flight += p.sent - p.received;
    }
    let reset_at = Instant::now();
    for p in resetters {
        reset(p.s);
    }
    wait_until("the server side of every resetting client to close", Duration::from_secs(5), || {
        server.ends().len() as u64 == RESETTERS
    });
    let ends = server.ends();
    let slowest = ends.iter().map(|(at, _)| at.saturating_duration_since(reset_at)).max().unwrap();
    assert!(slowest < Duration::from_secs(1), "a server side closed {slowest:?} after its client's reset");
    let reset_kinds: Vec<EndedBy> = ends.iter().map(|e| e.1).collect();
    bystanders.wait_progress("the bystanders to keep streaming after the resets", MIB, 2);
    for v in &survivors {
        v.stop.store(true, Ordering::SeqCst);
    }
    for (i, v) in survivors.into_iter().enumerate() {
        let e = v.handle.join().unwrap();
        assert!(e.cut.is_none(), "survivor {i} was cut: {:?}", e.cut);
        e.intact.unwrap_or_else(|err| panic!("survivor {i}: {err}"));
    }
    let bystanders = bystanders.finish("clients reset");
    let s = engine.stats();
    assert_eq!(s.total(|w| w.resets_from_client), RESETTERS, "each reset counted as a client reset");
    assert_eq!(s.total(|w| w.resets_from_server), 0);
    eprintln!(
        "clients reset: {RESETTERS} clients reset with {:.1} MiB in flight; every server side closed within {slowest:?} \
         ({:?}); {SURVIVORS}/{SURVIVORS} clients on the same server intact",
        in_flight as f64 / MIB as f64,
        reset_kinds
    );
    assert!(bystanders.connections >= 4);
    still_serves_then_clean(engine, echo, &[("by", false), ("fe", false)], &[server.addr.port()]);
}
