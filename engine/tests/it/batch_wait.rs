//! Batched waits (`tune.batch_wait`): a worker that went to sleep lets completions gather until
//! the next multiple of the window, or until 64 are ready (the kernel's `min_wait_usec`, 6.12), so
//! that many mostly idle connections wake it once per batch instead of once per message. Every message still arrives;
//! the worker turns far fewer times per message; where the kernel lacks the feature the setting
//! is not applied and the start says so. `auto`, the default, batches only while the worker's
//! traffic is many quiet flows, and stops for a busy one.

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

/// An engine with `batch_wait: auto` (the default; or as `tune` says) and `n` connections
/// through it to an echo server, each with one exchange behind it; `None` where the kernel cannot
/// batch.
fn auto_with_connections(n: usize, tune: &str) -> Option<(Backend, TestEngine, Vec<TcpStream>)> {
    if !batched_waits_or_skip() {
        return None;
    }
    let echo = Backend::start(Mode::Echo);
    let engine = batch_engine(&echo, tune);
    let fe = addr(&engine, "fe");
    let mut conns: Vec<TcpStream> = (0..n).map(|_| connect(fe)).collect();
    for c in &mut conns {
        echo_once(c, b"hello, 16 bytes.");
    }
    Some((echo, engine, conns))
}

/// The stats of the engine's one worker.
fn worker0(engine: &TestEngine) -> ringproxy::stats::WorkerStats {
    engine.stats().workers[0].clone()
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
    for tune in ["batch_wait: off", "batch_wait: 20ms"] {
        let echo = Backend::start(Mode::Echo);
        let engine = batch_engine(&echo, tune);
        let turns = heartbeat_rounds(&engine);
        eprintln!("{tune:?}: {turns:.3} loop turns per message ({CONNS} connections x {ROUNDS} rounds)");
        per_message.push(turns);
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
    assert_clean(engine, &[echo.addr.port()]);
}

/// `auto` (the default): connections each sending a message every 200 ms, 600 of them, are quiet
/// flows at 6,000 messages a second on the worker — its waits get windows, every echo still
/// arrives; then a closed loop on a few connections (a message right after each answer) is busy
/// traffic, and every event wakes the worker again.
#[test]
fn auto_batches_the_waits_of_many_quiet_connections_and_stops_for_a_closed_loop() {
    auto_batches_quiet_connections_and_stops_for_a_closed_loop("");
}

/// `auto 1ms`: `auto` with 1 ms windows — taken for the same quiet connections (their heartbeats
/// come at 6 messages a millisecond: enough for 4 a window), ended by the same closed loop (the
/// window's length and the rate it needs: worker/coalesce.rs's unit tests).
#[test]
fn auto_with_its_own_window_batches_and_stops_as_auto_does() {
    auto_batches_quiet_connections_and_stops_for_a_closed_loop("batch_wait: auto 1ms");
}

fn auto_batches_quiet_connections_and_stops_for_a_closed_loop(tune: &str) {
    const QUIET_CONNS: usize = 600;
    let Some((echo, engine, mut conns)) = auto_with_connections(QUIET_CONNS, tune) else { return };
    let before = worker0(&engine);
    // Rounds every 200 ms until the worker batches and has batched for a while (at most 15 s).
    let (mut rounds, mut batched_from) = (0usize, None);
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(15) {
        let t = std::time::Instant::now();
        for (i, c) in conns.iter_mut().enumerate() {
            c.write_all(format!("r{:04} c{i:04} ..!.", rounds % 10_000).as_bytes()).unwrap();
        }
        for (i, c) in conns.iter_mut().enumerate() {
            let mut got = [0u8; 16];
            c.read_exact(&mut got).unwrap();
            assert_eq!(&got, format!("r{:04} c{i:04} ..!.", rounds % 10_000).as_bytes(), "round {rounds}, conn {i}");
        }
        rounds += 1;
        let now = worker0(&engine);
        if now.batching == 1 && batched_from.is_none() {
            batched_from = Some((rounds, now.ring.batched_waits));
        }
        if let Some((r, waits)) = batched_from
            && rounds >= r + 5
        {
            assert!(now.ring.batched_waits > waits, "batching, yet no wait had a window: {:?}", now.ring);
            break;
        }
        std::thread::sleep(Duration::from_millis(200).saturating_sub(t.elapsed()));
    }
    let quiet = worker0(&engine);
    let (q, b) = (quiet.quiet_messages - before.quiet_messages, quiet.busy_messages - before.busy_messages);
    eprintln!("{rounds} rounds: {q} quiet and {b} busy messages, batching {}, {:?}", quiet.batching, quiet.ring);
    assert!(batched_from.is_some(), "never batched in {rounds} rounds ({q} quiet, {b} busy messages)");
    assert_eq!(quiet.batching, 1);
    // A short window for answers is never followed by another: at most every other window.
    let batched = quiet.ring.batched_waits - before.ring.batched_waits;
    let replies = quiet.ring.reply_waits - before.ring.reply_waits;
    assert!(replies <= batched / 2 + 1, "{replies} short waits of {batched} with a window");
    // Each heartbeat is two messages for the worker (the client's, the echo), each quiet.
    assert!(
        q >= (2 * QUIET_CONNS * rounds) as u64 * 9 / 10,
        "{q} quiet messages of {} heartbeats",
        QUIET_CONNS * rounds
    );

    // A closed loop on eight of them: busy; the waits stop having windows.
    for n in 0..300 {
        for c in conns.iter_mut().take(8) {
            echo_once(c, format!("closed loop {n:04}").as_bytes());
        }
    }
    let busy = worker0(&engine);
    assert!(busy.busy_messages - quiet.busy_messages >= 2 * 8 * 300, "{} busy", busy.busy_messages);
    assert_eq!(busy.batching, 0, "still batching after a closed loop: {:?}", busy.ring);
    drop(conns);
    assert_clean(engine, &[echo.addr.port()]);
}

/// `auto`'s short windows for answers. Heartbeats paced as a fleet's are — a few a millisecond,
/// so that windows end on time rather than on a full batch of completions (600 connections, 20
/// of them every 10 ms, each waiting for its echo): after a window in which the worker forwarded
/// some, the next wait is a short one for their echoes, then a whole window again — a short
/// window after many of the windows (a third, here), never two in a row — and every echo arrives.
#[test]
fn auto_waits_a_short_window_for_the_answers_to_what_it_forwarded() {
    const CONNS: usize = 600;
    let Some((echo, engine, mut conns)) = auto_with_connections(CONNS, "") else { return };
    let before = worker0(&engine);
    let start = std::time::Instant::now();
    let mut round = 0usize;
    while start.elapsed() < Duration::from_secs(3) {
        for (k, chunk) in conns.chunks_mut(20).enumerate() {
            let t = std::time::Instant::now();
            let message = |i: usize| format!("h{:04} c{:05} ...", round % 10_000, k * 20 + i);
            for (i, c) in chunk.iter_mut().enumerate() {
                c.write_all(message(i).as_bytes()).unwrap();
            }
            for (i, c) in chunk.iter_mut().enumerate() {
                let mut got = [0u8; 16];
                c.read_exact(&mut got).unwrap();
                assert_eq!(&got, message(i).as_bytes(), "round {round}, connection {}", k * 20 + i);
            }
            std::thread::sleep(Duration::from_millis(10).saturating_sub(t.elapsed()));
        }
        round += 1;
    }
    let after = worker0(&engine);
    let batched = after.ring.batched_waits - before.ring.batched_waits;
    let replies = after.ring.reply_waits - before.ring.reply_waits;
    eprintln!("{round} rounds: {replies} short waits of {batched} with a window, {:?}", after.ring);
    assert!(batched >= 100, "{batched} waits had a window");
    assert!(replies * 8 >= batched && replies <= batched / 2 + 1, "{replies} short waits of {batched} with a window");
    drop(conns);
    assert_clean(engine, &[echo.addr.port()]);
}

/// `auto` and keep-alives that come in bursts, as those of clients that connected together do: a
/// burst after seconds of nothing gets its windows within a glance (100 ms), not from the next
/// epoch on — by which time such a burst is over. The burst here, 600 keep-alives within 300 ms,
/// is 1,200 quiet messages (with their echoes), fewer than a whole epoch needs: judged by epochs
/// alone it never had a window.
#[test]
fn auto_gives_a_burst_of_keep_alives_its_windows_within_the_burst() {
    const CONNS: usize = 600;
    let Some((echo, engine, mut conns)) = auto_with_connections(CONNS, "") else { return };
    // Seconds with nothing: an epoch begins after the connections' first messages (busy ones),
    // and the flows are quiet.
    std::thread::sleep(Duration::from_millis(2_500));
    let before = worker0(&engine);
    assert_eq!(before.batching, 0, "batching before the burst: {:?}", before.ring);
    for (k, chunk) in conns.chunks_mut(40).enumerate() {
        let t = std::time::Instant::now();
        for (i, c) in chunk.iter_mut().enumerate() {
            c.write_all(format!("keep-alive {:05}", k * 40 + i).as_bytes()).unwrap();
        }
        std::thread::sleep(Duration::from_millis(20).saturating_sub(t.elapsed()));
    }
    for (i, c) in conns.iter_mut().enumerate() {
        let mut got = [0u8; 16];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, format!("keep-alive {i:05}").as_bytes(), "connection {i}");
    }
    let after = worker0(&engine);
    let (q, b) = (after.quiet_messages - before.quiet_messages, after.busy_messages - before.busy_messages);
    eprintln!("burst: {q} quiet and {b} busy messages, {:?} -> {:?}", before.ring, after.ring);
    assert!(q >= (2 * CONNS) as u64 * 9 / 10 && b == 0, "{q} quiet and {b} busy messages");
    assert!(after.ring.batched_waits > before.ring.batched_waits, "no wait had a window during the burst");
    drop(conns);
    assert_clean(engine, &[echo.addr.port()]);
}

/// Where the kernel cannot batch (pinned to 6.1's feature set), `auto` is off without a word: the
/// operator asked for nothing that is not done. Quiet traffic still counts as quiet.
#[test]
fn auto_is_off_without_a_warning_where_the_kernel_cannot_batch() {
    let echo = Backend::start(Mode::Echo);
    let engine = batch_engine(&echo, "io_features: \"6.1\"");
    assert!(!engine.plan().warnings.iter().any(|w| w.contains("batch_wait")), "{:?}", engine.plan().warnings);
    let fe = addr(&engine, "fe");
    let mut conns: Vec<TcpStream> = (0..50).map(|_| connect(fe)).collect();
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(150));
        for c in &mut conns {
            echo_once(c, format!("quiet round {round}").as_bytes());
        }
    }
    let s = engine.stats().workers[0].clone();
    assert_eq!((s.batching, s.ring.batched_waits), (0, 0));
    assert!(s.quiet_messages >= 2 * 50 * 3, "{} quiet messages", s.quiet_messages);
    drop(conns);
    assert_clean(engine, &[echo.addr.port()]);
}
