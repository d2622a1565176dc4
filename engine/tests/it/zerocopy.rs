//! Zero-copy sends (`tune.send_zerocopy`): sends of at least the size set go by `SENDMSG_ZC`,
//! whose buffers the kernel reads until its notification, which may come after the send's
//! completion and after the connection is gone. The bytes arrive intact, small messages are
//! still copied, and every buffer comes back — also when connections are reset with zero-copy
//! sends in flight.

use std::time::{Duration, Instant};

use crate::common::*;

fn zerocopy_engine(echo: &Backend, extra: &str) -> TestEngine {
    engine(&format!(
        "global: {{ workers: 2, tune: {{ splice: never, send_zerocopy: 16k{extra} }} }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
        echo.addr
    ))
}

/// With this kernel's features, then pinned to 6.1's (zero-copy sends, but no report of whether
/// the kernel copied).
#[test]
fn bulk_streams_go_zero_copy_both_ways_and_arrive_intact_while_small_messages_are_copied() {
    let (native, _) = ringproxy::features::effective(None).unwrap();
    for (extra, report) in [("", native.zc_report), (", io_features: \"6.1\"", false)] {
        let echo = Backend::start(Mode::Echo);
        let engine = zerocopy_engine(&echo, extra);
        let fe = addr(&engine, "fe");
        let mut c = connect(fe);
        for _ in 0..50 {
            echo_once(&mut c, b"a heartbeat of 32 bytes, echoed.");
        }
        drop(c);
        let s = engine.stats();
        assert!(s.total(|w| w.ring_sends) >= 100, "the small messages were sent on");
        assert_eq!(s.total(|w| w.zerocopy_sends), 0, "messages below send_zerocopy are copied");

        let mut pumps: Vec<Pump> = (0..8).map(|i| Pump::connect(fe, 700 + i, false).unwrap().limit(16 * MIB)).collect();
        run_all(&mut pumps, Duration::from_secs(60), || {});
        drop(pumps);
        let s = engine.stats();
        let (zc, sends, copied) =
            (s.total(|w| w.zerocopy_sends), s.total(|w| w.ring_sends), s.total(|w| w.zerocopy_copied));
        eprintln!("{extra:?}: {zc} of {sends} sends zero-copy, {copied} of them copied by the kernel after all");
        assert!(zc > 0, "bulk sends went zero-copy");
        if report {
            // Loopback: the receiving socket gets a copy, and the report says so.
            assert!(copied > 0, "the kernel reported the loopback copies");
        } else {
            assert_eq!(copied, 0, "no report asked for");
        }
        assert_clean(engine, &[echo.addr.port()]);
    }
}

/// Clients that reset their connection while bytes stream both ways (echo): sends toward the
/// reset client fail or are cancelled, the server's side closes, and every buffer a zero-copy
/// send read from comes back with its notification — the gauges at 0 (`zerocopy_pending`,
/// `buffers_in_use` among them).
#[test]
fn connections_reset_with_zero_copy_sends_in_flight_give_every_buffer_back() {
    let echo = Backend::start(Mode::Echo);
    let engine = zerocopy_engine(&echo, "");
    let fe = addr(&engine, "fe");
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..30 {
        let mut p = vec![Pump::connect(fe, 900 + i, false).unwrap()];
        // Reset at a different point each time, once a few hundred KiB came back.
        while p[0].received < 256 * 1024 + i * 37_000 {
            assert!(Instant::now() < deadline, "connection {i} stalled at {} B back", p[0].received);
            step_all(&mut p);
        }
        let Pump { s, .. } = p.pop().unwrap();
        reset(s);
    }
    wait_until("the proxy to close every connection", Duration::from_secs(10), || {
        engine.stats().total(|w| w.active) == 0
    });
    let s = engine.stats();
    let (zc, resets) = (s.total(|w| w.zerocopy_sends), s.total(|w| w.resets_from_client));
    eprintln!("{zc} zero-copy sends; {resets} of 30 closes seen as the client's reset");
    assert!(zc > 0, "bulk sends went zero-copy");
    assert!(resets > 0, "the clients' resets closed their connections");
    assert_clean(engine, &[echo.addr.port()]);
}

/// A network whose packets wait: the test runs in a namespace of its own whose loopback (MTU
/// 1500) is shaped by a token bucket (TBF, 400 Mbit/s, up to 100 ms of queue), so a zero-copy
/// send's notification comes only once its packets have left the queue and been acknowledged —
/// well after the send's completion, with the next sends of the flow already in flight; and for
/// connections reset with bytes still queued, after the connection is gone (the packets in the
/// queue hold the pages until they leave it). The bytes arrive intact, and every buffer comes back.
#[test]
fn notifications_that_come_late_or_after_the_connection_is_gone_give_every_buffer_back() {
    let shaping = ["ip link set lo mtu 1500", "tc qdisc add dev lo root tbf rate 400mbit burst 64k latency 100ms"];
    in_network_namespace(&shaping, || {
        let echo = Backend::start(Mode::Echo);
        let engine = zerocopy_engine(&echo, "");
        let fe = addr(&engine, "fe");
        let mut pumps: Vec<Pump> = (0..4).map(|i| Pump::connect(fe, 300 + i, false).unwrap().limit(2 * MIB)).collect();
        let mut most_pending = 0;
        run_all(&mut pumps, Duration::from_secs(60), || {
            most_pending = most_pending.max(engine.stats().total(|w| w.zerocopy_pending));
        });
        drop(pumps);
        let zc = engine.stats().total(|w| w.zerocopy_sends);
        eprintln!("{zc} zero-copy sends, at most {most_pending} waiting for their notification at once");
        assert!(zc > 0, "bulk sends went zero-copy");
        assert!(most_pending > 1, "sends waited for notifications that came late (at most {most_pending} at once)");

        // Resets while bytes wait in the queue: notifications after the connections are freed.
        let deadline = Instant::now() + Duration::from_secs(60);
        for i in 0..10 {
            let mut p = vec![Pump::connect(fe, 400 + i, false).unwrap()];
            while p[0].received < 128 * 1024 {
                assert!(Instant::now() < deadline, "connection {i} stalled at {} B back", p[0].received);
                step_all(&mut p);
            }
            let Pump { s, .. } = p.pop().unwrap();
            reset(s);
        }
        let mut pending_when_closed = 0;
        wait_until("the proxy to close every connection", Duration::from_secs(10), || {
            let s = engine.stats();
            pending_when_closed = s.total(|w| w.zerocopy_pending);
            s.total(|w| w.active) == 0
        });
        eprintln!("{pending_when_closed} notifications still to come once every connection was closed");
        assert_clean(engine, &[echo.addr.port()]);
    });
}
