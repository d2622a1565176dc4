//! Batched waits (`tune.batch_wait`): a worker that went to sleep lets completions gather until
//! the next multiple of the window, or until 64 are ready (the kernel's `min_wait_usec`, 6.12), so
//! that many mostly idle connections wake it once per batch instead of once per message. Every message still arrives;
//! the worker turns far fewer times per message; where the kernel lacks the feature the setting
//! is not applied and the start says so.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::common::*;

const CONNS: usize = 200;
const ROUNDS: usize = 30;

fn batch_engine(echo: &Backend, tune: &str) -> TestEngine {
    engine(&format!(
        "global: {{ workers: 1, tune: {{ {tune} }} }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
        echo.addr
    ))
}

/// `ROUNDS` rounds of a 16-byte message on each of `CONNS` connections, every echo checked;
/// returns the worker's loop turns per message over the rounds.
fn heartbeat_rounds(engine: &TestEngine) -> f64 {
    let fe = addr(engine, "fe");
    let mut conns: Vec<TcpStream> = (0..CONNS).map(|_| connect(fe)).collect();
    // One exchange each first: every connection established through to the server.
    for c in &mut conns {
        echo_once(c, b"hello, 16 bytes.");
    }
    let turns0 = engine.stats().total(|w| w.loop_iterations);
    for round in 0..ROUNDS {
        for (i, c) in conns.iter_mut().enumerate() {
            c.write_all(format!("r{round:04} c{i:04} ..!.").as_bytes()).unwrap();
        }
        for (i, c) in conns.iter_mut().enumerate() {
            let mut got = [0u8; 16];
            c.read_exact(&mut got).unwrap();
            assert_eq!(&got, format!("r{round:04} c{i:04} ..!.").as_bytes(), "round {round}, connection {i}");
        }
    }
    let turns = engine.stats().total(|w| w.loop_iterations) - turns0;
    drop(conns);
    turns as f64 / (CONNS * ROUNDS) as f64
}

#[test]
fn many_connections_messaging_at_once_wake_the_worker_far_less_often_and_every_echo_arrives() {
    if !batched_waits_or_skip() {
        return;
    }
    let mut per_message = Vec::new();
    for tune in ["", "batch_wait: 20ms"] {
        let echo = Backend::start(Mode::Echo);
        let engine = batch_engine(&echo, tune);
        let turns = heartbeat_rounds(&engine);
        eprintln!("{tune:?}: {turns:.3} loop turns per message ({CONNS} connections x {ROUNDS} rounds)");
        per_message.push(turns);
        wait_until("the proxy to close every connection", Duration::from_secs(10), || {
            engine.stats().total(|w| w.active) == 0
        });
        assert_clean(engine, &[echo.addr.port()]);
    }
    // Each message is four events for the worker (its receive from the client, the send to the
    // server, the echo's receive, the send back); with 64 events per wake at most ~0.07 turns.
    assert!(per_message[1] < 0.25, "batched: {:.3} turns per message", per_message[1]);
    assert!(
        per_message[1] < per_message[0] / 2.0,
        "batched {:.3} against {:.3} turns per message unbatched",
        per_message[1],
        per_message[0]
    );
}

/// Pinned to 6.1's feature set the setting cannot be applied: the engine says so at start, and
/// runs as without it.
#[test]
fn without_the_kernel_feature_the_setting_is_reported_and_not_applied() {
    let echo = Backend::start(Mode::Echo);
    let engine = batch_engine(&echo, "batch_wait: 1ms, io_features: \"6.1\"");
    assert!(
        engine.plan().warnings.iter().any(|w| w.contains("tune.batch_wait") && w.contains("6.12")),
        "warnings: {:?}",
        engine.plan().warnings
    );
    let mut c = connect(addr(&engine, "fe"));
    for _ in 0..20 {
        echo_once(&mut c, b"a heartbeat of 32 bytes, echoed.");
    }
    drop(c);
    wait_until("the proxy to close the connection", Duration::from_secs(10), || {
        engine.stats().total(|w| w.active) == 0
    });
    assert_clean(engine, &[echo.addr.port()]);
}
