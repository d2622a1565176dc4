//! maxconn: the global limit holds exactly across workers; server limits queue; queue timeout;
//! rate_limit.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::*;

/// Opens `n` clients that each send their number, wait for its echo, then wait for the close.
/// Returns the join handles and a counter of clients whose echo came back.
fn clients(proxy: std::net::SocketAddr, n: u64) -> (Vec<thread::JoinHandle<()>>, Arc<AtomicUsize>) {
    let served = Arc::new(AtomicUsize::new(0));
    let handles = spawn_each(n, {
        let served = served.clone();
        move |i| {
            let mut s = connect(proxy);
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            echo_once(&mut s, &i.to_le_bytes());
            served.fetch_add(1, Ordering::SeqCst);
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
        }
    });
    (handles, served)
}

// Several tests below wait a moment, then assert that a count is "still N". Such a check can only
// pass wrongly (had the moment been too short to see a breach), never fail wrongly.

#[test]
fn global_maxconn_is_exact_across_two_workers() {
    let backend = Backend::start(Mode::Hold);
    let engine = engine(&format!(
        "global: {{ workers: 2, maxconn: 100 }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
        backend.addr
    ));
    let (handles, served) = clients(addr(&engine, "fe"), 150);
    wait_until("100 connections at the server", Duration::from_secs(10), || backend.active() == 100);
    // Give a breach of the limit time to show (can only pass wrongly, see above).
    thread::sleep(Duration::from_millis(500));
    assert_eq!(backend.active(), 100, "exactly 100 proxied at once");
    assert_eq!(backend.max_active(), 100);
    assert_eq!(served.load(Ordering::SeqCst), 100, "the other 50 are waiting, not refused");
    let stats = engine.stats();
    assert_eq!(stats.total(|w| w.active), 100);
    assert!(stats.total(|w| w.limit_hits.global) > 0);
    // Let the first 100 finish: the 50 waiting ones are served as slots free. (While they churn the
    // server's own count lags the proxy's by the moment its handler takes to see each EOF, so the
    // limit is judged above, with everything held.)
    backend.release();
    join_all(handles);
    assert_eq!(served.load(Ordering::SeqCst), 150);
    assert_eq!(backend.total(), 150);
    assert_clean(engine, &[backend.addr.port()]);
}

#[test]
fn server_maxconn_queues_and_serves_in_turn() {
    let backend = Backend::start(Mode::Hold);
    let engine = engine(&format!(
        "global: {{ workers: 2 }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, timeout: {{ queue: 20s }}, servers: [{{ name: s, address: \"{}\", maxconn: 5 }}] }}]\n",
        backend.addr
    ));
    let (handles, served) = clients(addr(&engine, "fe"), 12);
    wait_until("5 connections at the server", Duration::from_secs(10), || backend.active() == 5);
    wait_until("7 connections queued", Duration::from_secs(5), || engine.stats().total(|w| w.queued) == 7);
    // Give a breach of the server's maxconn time to show (can only pass wrongly, see above).
    thread::sleep(Duration::from_millis(300));
    assert_eq!(backend.active(), 5);
    assert_eq!(backend.max_active(), 5, "never more than maxconn while held");
    assert_eq!(served.load(Ordering::SeqCst), 5);
    backend.release();
    join_all(handles);
    assert_eq!(served.load(Ordering::SeqCst), 12);
    let stats = engine.stats();
    // At least the 7 that waited at the peak; a worker may also queue a connection and then serve
    // it with share borrowed from the other worker before the peak.
    assert!(stats.total(|w| w.queued_total) >= 7);
    assert_eq!(stats.total(|w| w.timeouts.queue), 0);
    assert_clean(engine, &[backend.addr.port()]);
}

#[test]
fn queue_timeout_closes_the_waiting_client() {
    let backend = Backend::start(Mode::Hold);
    let engine = engine(&format!(
        "global: {{ workers: 1 }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, timeout: {{ queue: 300ms }}, servers: [{{ name: s, address: \"{}\", maxconn: 1 }}] }}]\n",
        backend.addr
    ));
    let proxy = addr(&engine, "fe");
    let mut first = connect(proxy);
    echo_once(&mut first, b"first");
    let mut second = connect(proxy);
    let t = std::time::Instant::now();
    let (got, _) = read_to_end(&mut second);
    assert!(got.is_empty());
    assert!(t.elapsed() >= Duration::from_millis(250) && t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let stats = engine.stats();
    assert_eq!(stats.total(|w| w.timeouts.queue), 1);
    assert_eq!(backend.total(), 1, "the queued client never reached the server");
    echo_once(&mut first, b"still fine");
    drop((first, second));
    assert_clean(engine, &[backend.addr.port()]);
}

/// Which worker took the connection just opened (the one whose accepted+parked count grew), or
/// `None` if none did within 300ms (it waits in a paused worker's kernel backlog).
fn landed_on(engine: &ringproxy::Engine, before: &[u64]) -> Option<usize> {
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_millis(300) {
        let now: Vec<u64> = engine.stats().workers.iter().map(|w| w.accepted + w.parked).collect();
        if let Some(w) = now.iter().zip(before).position(|(a, b)| a > b) {
            return Some(w);
        }
        thread::sleep(Duration::from_millis(5));
    }
    None
}

#[test]
fn global_maxconn_is_reached_when_one_worker_gets_every_connection() {
    let backend = Backend::start(Mode::Hold);
    let engine = engine(&format!(
        "global: {{ workers: 2, maxconn: 100 }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
        backend.addr
    ));
    let proxy = addr(&engine, "fe");
    let mut kept = Vec::new();
    let mut tries = 0;
    // Keep only connections that SO_REUSEPORT hands to worker 0; worker 0 starts with a share of
    // 50 and must borrow the other 50 from worker 1 to reach the global limit.
    while kept.len() < 100 {
        tries += 1;
        assert!(tries < 2000, "SO_REUSEPORT never picked worker 0 often enough");
        let before: Vec<u64> = engine.stats().workers.iter().map(|w| w.accepted + w.parked).collect();
        let mut c = connect(proxy);
        let on = landed_on(&engine, &before);
        if on == Some(0) {
            echo_once(&mut c, b"kept");
            kept.push(c);
        } else {
            drop(c);
            wait_until("worker 1 to close it", Duration::from_secs(5), || engine.stats().workers[1].active == 0);
        }
    }
    let stats = engine.stats();
    assert_eq!(backend.active(), 100);
    assert_eq!(stats.workers[0].active, 100);
    assert_eq!(stats.workers[0].global_share, 100, "worker 0 borrowed worker 1's unused share");
    assert_eq!(stats.workers[1].global_share, 0);
    assert_eq!(stats.workers[0].share_borrowed, 50);
    // One more on either worker waits: the limit is reached exactly.
    let mut extra = Vec::new();
    for _ in 0..6 {
        extra.push(connect(proxy));
    }
    wait_until("the extra connections to be parked", Duration::from_secs(5), || {
        engine.stats().total(|w| w.parked) >= 1
    });
    // Give a breach of the limit time to show (can only pass wrongly, see above).
    thread::sleep(Duration::from_millis(300));
    assert_eq!(backend.active(), 100, "the limit holds");
    // Closing one kept connection lets a waiting connection in. (Waiting connections whose clients
    // already left — probes dropped above — may be admitted first and close at once; the next one
    // takes their place.) The count returns to exactly 100 and never exceeds it.
    drop(kept.pop());
    wait_until("a waiting connection to be proxied", Duration::from_secs(5), || backend.total() >= 101);
    wait_until("100 connections again", Duration::from_secs(5), || backend.active() == 100);
    assert_eq!(backend.max_active(), 100);
    drop((kept, extra));
    assert_clean(engine, &[backend.addr.port()]);
}

/// Many workers and a global maxconn barely above the demand: `SO_REUSEPORT` hands some workers
/// more connections than their share, and they must borrow the few spare slots of the others, one
/// or two at a time. A worker that got less than it had parked must ask again: it has stopped
/// accepting, so no new connection would ever make it ask (found at 100 workers: connections parked
/// and in its backlog waited for good while other workers had room).
#[test]
fn every_worker_borrows_until_its_parked_connections_are_in() {
    const WORKERS: u64 = 8;
    const CLIENTS: u64 = 400;
    let backend = Backend::start(Mode::Hold);
    let engine = engine(&format!(
        "global: {{ workers: {WORKERS}, maxconn: {} }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
        CLIENTS + WORKERS,
        backend.addr
    ));
    let (handles, served) = clients(addr(&engine, "fe"), CLIENTS);
    wait_until("every client proxied and echoed", Duration::from_secs(20), || {
        served.load(Ordering::SeqCst) == CLIENTS as usize
    });
    let stats = engine.stats();
    assert_eq!(stats.total(|w| w.active), CLIENTS);
    assert_eq!(stats.total(|w| w.parked), 0);
    assert_eq!(backend.active(), CLIENTS as usize);
    assert!(backend.max_active() <= (CLIENTS + WORKERS) as usize, "the limit held");
    // The shares still add up to the limit, wherever they are now.
    assert_eq!(stats.total(|w| w.global_share), CLIENTS + WORKERS);
    backend.release();
    join_all(handles);
    assert_clean(engine, &[backend.addr.port()]);
}

/// `allow` / `deny` on a frontend: a client whose address the list refuses is closed at accept,
/// before any server is tried, and counted in `denied`; the others are served. Both with every
/// io_uring feature and, where CI runs this suite under the 6.1 set, with addresses read at accept.
#[test]
fn an_access_list_closes_refused_clients_at_accept_and_counts_them() {
    let backend = Backend::start(Mode::Echo);
    let engine = engine(&format!(
        "global: {{ workers: 2 }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be, allow: [\"127.0.0.0/24\"], deny: [\"127.0.0.6\"] }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
        backend.addr
    ));
    let fe = addr(&engine, "fe");
    for ok in ["127.0.0.5", "127.0.0.7"] {
        let mut c = connect_from(fe, ok.parse().unwrap());
        echo_once(&mut c, b"allowed");
    }
    for refused in ["127.0.0.6", "127.0.1.5"] {
        let mut c = connect_from(fe, refused.parse().unwrap());
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let (data, err) = read_to_end(&mut c);
        assert!(data.is_empty() && err.is_none(), "{refused}: closed at once, nothing served ({err:?})");
    }
    wait_until("both refusals counted", Duration::from_secs(2), || engine.stats().total(|w| w.denied) == 2);
    assert_eq!(backend.total(), 2, "only the allowed clients reached the server");
    assert_clean(engine, &[backend.addr.port()]);
}

/// `n` clients that connect at once (each by `connect`) to a `Mode::Tag(7)` backend behind the
/// proxy: when each was served (its tag came back), in order.
fn served_at(n: usize, connect: impl Fn() -> std::net::TcpStream + Clone + Send + 'static) -> Vec<Duration> {
    let start = Instant::now();
    let mut served: Vec<Duration> = join_all(
        (0..n)
            .map(|_| {
                let connect = connect.clone();
                spawn(move || {
                    let mut c = connect();
                    let mut tag = [0u8];
                    c.read_exact(&mut tag).unwrap();
                    assert_eq!(tag[0], 7);
                    let at = start.elapsed();
                    echo_once(&mut c, b"served");
                    at
                })
            })
            .collect(),
    );
    served.sort();
    served
}

/// The most of `served` (times) within any one second.
fn busiest_second(served: &[Duration]) -> usize {
    served
        .iter()
        .map(|t| served.iter().filter(|u| **u >= *t && **u < *t + Duration::from_secs(1)).count())
        .max()
        .unwrap_or(0)
}

/// `rate_limit: 20/s`: 60 clients that connect at once are all served — none refused, the ones
/// above the rate wait in the listen backlog — at about 20 per second (each of the two workers
/// accepts its share, 10/s, one connection at a time).
#[test]
fn rate_limit_paces_accepts_and_refuses_nobody() {
    let backend = Backend::start(Mode::Tag(7));
    let engine = engine(&format!(
        "global: {{ workers: 2 }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be, rate_limit: 20/s }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
        backend.addr
    ));
    let fe = addr(&engine, "fe");
    let served = served_at(60, move || connect(fe));
    let last = served[59];
    assert!(last >= Duration::from_millis(2_300), "60 at 20/s take ~3 s; the last was served at {last:?}");
    assert!(last <= Duration::from_secs(6), "the last was served only at {last:?}");
    let busiest = busiest_second(&served);
    assert!(busiest <= 24, "{busiest} served within one second (20/s and a burst of one per worker)");
    let stats = engine.stats();
    assert_eq!(stats.total(|w| w.accepted), 60);
    assert!(stats.total(|w| w.limit_hits.rate) > 0);
    assert_clean(engine, &[backend.addr.port()]);
}

/// Per-source steering (`maxconn_per_source`) sends every connection of one address to one
/// worker: the other worker's unused share of `rate_limit` is lent to it (worker/rate.rs), so the
/// address is accepted at the frontend's rate, not at half of it — and never faster.
#[test]
fn rate_limit_shares_move_to_the_worker_where_the_clients_wait() {
    let backend = Backend::start(Mode::Tag(7));
    let engine = engine(&format!(
        "global: {{ workers: 2 }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be, rate_limit: 40/s, \
         maxconn_per_source: 1000 }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
        backend.addr
    ));
    let fe = addr(&engine, "fe");
    let served = served_at(120, move || connect_from(fe, "127.0.5.1".parse().unwrap()));
    let last = served[119];
    // At 40/s, 120 take 3 s (less the first bursts); at one worker's half, 20/s, they took 6 s.
    assert!(last >= Duration::from_millis(2_700), "faster than 40/s: the last was served at {last:?}");
    assert!(last <= Duration::from_millis(4_500), "not lent: the last was served only at {last:?}");
    let busiest = busiest_second(&served);
    eprintln!("120 from one address at 40/s: the last served at {last:?}, at most {busiest} within a second");
    assert!(busiest <= 46, "{busiest} served within one second (40/s and the workers' bursts)");
    // All on one worker, which now holds most of the rate; the shares still add up to it.
    let s = engine.stats();
    let accepted: Vec<u64> = s.workers.iter().map(|w| w.accepted).collect();
    assert!(accepted.contains(&120) && accepted.contains(&0), "steered to one worker: {accepted:?}");
    let hot = s.workers.iter().find(|w| w.accepted == 120).unwrap();
    assert!(hot.frontends[0].rate_share >= 35.0, "its share: {:?}", hot.frontends[0]);
    let total: f64 = s.workers.iter().map(|w| w.frontends[0].rate_share).sum();
    assert!((total - 40.0).abs() < 1e-9, "the shares add up to the rate: {total}");
    assert!((s.frontends[0].rate_share - 40.0).abs() < 1e-9, "and so does the frontend's row: {:?}", s.frontends[0]);
    assert!(s.total(|w| w.limit_hits.rate) > 0);
    assert_clean(engine, &[backend.addr.port()]);
}

/// A client that sends its whole request and its end (FIN) while it waits in the queue for a
/// server slot: with `splice: never` the client's receive runs from accept, so those bytes wait in
/// the proxy's queue, bounded by backpressure; once a server is there they arrive whole and in
/// order, then the end. Both modes.
#[test]
fn bytes_and_the_end_sent_while_queued_arrive_whole_once_connected() {
    for splice in ["never", "always"] {
        let backend = Backend::start(Mode::Echo);
        let engine = engine(&format!(
            "global: {{ workers: 1, tune: {{ splice: {splice} }} }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
             backends: [{{ name: be, timeout: {{ queue: 20s }}, servers: [{{ name: s, address: \"{}\", maxconn: 1 }}] }}]\n",
            backend.addr
        ));
        let fe = addr(&engine, "fe");
        let mut first = connect(fe);
        echo_once(&mut first, b"holds the only slot");
        let mut second = connect(fe);
        wait_until("the second client to be queued", Duration::from_secs(5), || {
            engine.stats().total(|w| w.queued) == 1
        });
        let request: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        let writer = {
            let mut w = second.try_clone().unwrap();
            let request = request.clone();
            spawn(move || {
                std::io::Write::write_all(&mut w, &request).unwrap();
                w.shutdown(std::net::Shutdown::Write).unwrap();
            })
        };
        thread::sleep(Duration::from_millis(200));
        assert_eq!(engine.stats().total(|w| w.queued), 1, "{splice}: still queued");
        drop(first);
        let (got, err) = read_to_end(&mut second);
        writer.join().unwrap();
        assert!(err.is_none(), "{splice}: {err:?}");
        assert_eq!(got.len(), request.len(), "{splice}: every byte echoed");
        assert!(got == request, "{splice}: in order");
        drop(second);
        assert_clean(engine, &[backend.addr.port()]);
    }
}
