//! Accepting: a listener whose backlog margin does not fit in the worker's free accept slots
//! cannot be multishot (a multishot accept may take its whole backlog at once, and the kernel
//! drops a connection it has no slot for); it keeps several single accepts in flight instead, each
//! holding its slot, so a burst of new connections is still taken in a few loop turns.
//!
//! The worker batches its waits (`tune.batch_wait`, one wakeup per window) so that the loop
//! turns a burst costs are counted, not raced: with one single accept in flight at a time a
//! listener took one connection per window.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::common::*;

/// Connections opened at once on one listener.
const BURST: usize = 64;

fn engine_with(echo: &Backend, frontends: usize) -> TestEngine {
    let fes: Vec<String> =
        (0..frontends).map(|i| format!("{{ name: fe{i}, bind: \"127.0.0.1:0\", backend: be }}")).collect();
    engine(&format!(
        "global: {{ workers: 1, tune: {{ batch_wait: 20ms }} }}\n\
         frontends: [{}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
        fes.join(", "),
        echo.addr
    ))
}

/// Opens `BURST` connections to frontend `fe` at once and returns the worker's loop turns until it
/// had accepted them all; then checks an echo through every one and closes them.
fn burst(engine: &TestEngine, fe: &str) -> u64 {
    let turns0 = engine.stats().total(|w| w.loop_iterations);
    let accepted0 = engine.stats().total(|w| w.accepted);
    let mut conns: Vec<TcpStream> = (0..BURST).map(|_| connect(addr(engine, fe))).collect();
    wait_until("the worker to accept the burst", Duration::from_secs(20), || {
        engine.stats().total(|w| w.accepted) >= accepted0 + BURST as u64
    });
    let turns = engine.stats().total(|w| w.loop_iterations) - turns0;
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(format!("{fe} connection {i:04}").as_bytes()).unwrap();
    }
    for (i, c) in conns.iter_mut().enumerate() {
        let want = format!("{fe} connection {i:04}");
        let mut got = vec![0u8; want.len()];
        c.read_exact(&mut got).unwrap();
        assert_eq!(got, want.as_bytes(), "connection {i} through {fe}");
    }
    assert_eq!(engine.stats().total(|w| w.accepted), accepted0 + BURST as u64, "each client accepted once");
    turns
}

#[test]
fn a_listener_that_cannot_be_multishot_still_takes_a_burst_in_a_few_loop_turns() {
    if !batched_waits_or_skip() {
        return;
    }
    let echo = Backend::start(Mode::Echo);
    // How many listeners it takes for the last one's margin not to fit: the accept slots left over
    // by the multishot listeners before it (this host's somaxconn and open-files limit decide).
    let probe = engine_with(&echo, 1);
    let (slots, margin) = (probe.plan().accept_slots, probe.plan().multishot_margin[0]);
    assert!(margin <= slots, "one listener's margin ({margin}) fits in {slots} accept slots");
    assert_clean(probe, &[echo.addr.port()]);
    let n = (slots / margin) as usize + 1;

    let engine = engine_with(&echo, n);
    let margins: u32 = engine.plan().multishot_margin.iter().sum();
    assert!(margins > engine.plan().accept_slots, "{n} listeners' margins ({margins}) overflow the accept slots");
    let multishot = burst(&engine, "fe0");
    let singles = burst(&engine, &format!("fe{}", n - 1));
    eprintln!(
        "{BURST} connections at once: {multishot} loop turns through a multishot listener, {singles} through \
         one accepting with single accepts ({n} listeners, {slots} accept slots, margin {margin})"
    );
    // One single accept at a time took one connection per turn (64); up to 16 at once take them in
    // about four.
    assert!(singles <= BURST as u64 / 4, "{singles} loop turns for {BURST} connections");
    assert_clean(engine, &[echo.addr.port()]);
}
