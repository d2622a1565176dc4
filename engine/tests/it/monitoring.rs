//! The monitoring plane under hostile local clients (security review 7b9477c, items 1c, 1d, 1f,
//! 1i): idle, dripping and non-reading clients of the stats socket and of /metrics delay no real
//! query and no shutdown; clients beyond the cap are closed at once; what is at the socket's path
//! is replaced only if it is a stale socket.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::stats::http_get;
use ringproxy::stats::{self, socket};

/// What a real query may take with the other clients around.
const ANSWER_WITHIN: Duration = Duration::from_secs(1);

/// An engine with a stats socket at `sock`, a /metrics endpoint and `servers` servers (the first
/// one `echo`, the others at an address nothing listens on); drain 1 s.
fn monitored(sock: &Path, echo: SocketAddr, servers: usize) -> TestEngine {
    let _ = std::fs::remove_file(sock);
    let more: String = (1..servers).map(|i| format!(", {{ name: s{i}, address: \"127.0.9.1:9\" }}")).collect();
    engine(&format!(
        "global: {{ workers: 2, stats: {{ socket: {}, prometheus: \"127.0.0.1:0\" }} }}\n\
         defaults: {{ timeout: {{ drain: 1s }} }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, servers: [{{ name: s0, address: \"{echo}\" }}{more}] }}]\n",
        sock.display()
    ))
}

/// Clients that connect and send nothing, `n` on the stats socket and `n` on /metrics, each
/// reading with a time limit.
fn idle(sock: &Path, metrics: SocketAddr, n: usize) -> Vec<Box<dyn Read + Send>> {
    let limit = Some(Duration::from_secs(10));
    let mut out: Vec<Box<dyn Read + Send>> = Vec::new();
    for _ in 0..n {
        let u = UnixStream::connect(sock).unwrap();
        u.set_read_timeout(limit).unwrap();
        out.push(Box::new(u));
        let t = TcpStream::connect(metrics).unwrap();
        t.set_read_timeout(limit).unwrap();
        out.push(Box::new(t));
    }
    out
}

/// A client that sends one byte every 1.5 s and never ends its request, until the server closes
/// it (at 7b9477c: never, each byte restarted a 2 s read timeout).
fn drip<S: Write + Send + 'static>(mut s: S) -> JoinHandle<usize> {
    spawn(move || {
        let mut sent = 0;
        while s.write_all(b"x").is_ok() && sent < 100 {
            sent += 1;
            std::thread::sleep(Duration::from_millis(1500));
        }
        sent
    })
}

/// `show info` on the socket and a scrape of /metrics, each answered within [`ANSWER_WITHIN`].
fn answered_at_once(sock: &Path, metrics: SocketAddr) {
    let t = Instant::now();
    let info = socket::query(sock, "show info").unwrap();
    assert!(info.contains("workers: 2"), "{info}");
    assert!(t.elapsed() < ANSWER_WITHIN, "show info took {:?}", t.elapsed());
    let t = Instant::now();
    let resp = http_get(metrics, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 200") && resp.contains("ringproxy_connections_active"), "{resp:.200}");
    assert!(t.elapsed() < ANSWER_WITHIN, "the scrape took {:?}", t.elapsed());
}

/// Reads until the server closes; returns the bytes read and when it closed.
fn read_until_closed(mut s: impl Read, limit: Duration) -> (usize, Duration) {
    let t = Instant::now();
    let mut got = 0;
    let mut buf = [0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return (got, t.elapsed()),
            Ok(n) => got += n,
        }
        assert!(t.elapsed() < limit, "the server kept the client for more than {limit:?}");
    }
}

/// Review 1c, 1d, 1f: 20 idle clients and one dripping client on each endpoint (at 7b9477c: a
/// query waited 2 s per idle client, and for ever behind the drip). A real query is answered at
/// once, and the idle and dripping clients are closed at the request deadline without an answer.
#[test]
fn idle_and_dripping_clients_delay_no_query() {
    let echo = Backend::start(Mode::Echo);
    let sock = temp_path("monitor-idle.sock");
    let engine = monitored(&sock, echo.addr, 2);
    let metrics = engine.metrics_addr().unwrap();
    let idle = idle(&sock, metrics, 20);
    let drips = [drip(UnixStream::connect(&sock).unwrap()), drip(TcpStream::connect(metrics).unwrap())];
    answered_at_once(&sock, metrics);
    for c in idle {
        let (got, after) = read_until_closed(c, Duration::from_secs(10));
        assert_eq!(got, 0, "an idle client is closed without an answer");
        assert!(after < stats::REQUEST_DEADLINE + Duration::from_secs(1), "closed at the request deadline: {after:?}");
    }
    for d in drips {
        let sent = d.join().unwrap();
        assert!(sent <= 4, "a dripping client is cut off at the request deadline, not after {sent} bytes");
    }
    answered_at_once(&sock, metrics);
    assert_clean(engine, &[echo.addr.port()]);
}

/// Review 1c, 1d, 1f: shutting down does not wait for the monitoring clients (at 7b9477c, a
/// dripping client kept the stats thread, hence `Engine::shutdown`, blocked for as long as it
/// dripped). With 20 idle clients, a dripping one and one not reading its answer on each endpoint,
/// the engine stops in less than the request deadline, and every client sees its connection
/// closed. (The clients come after `assert_idle`, which waits for the engine's ports to be quiet;
/// each is held by a thread that reads until the server closes it, so that `assert_stops_clean`
/// sees them go.)
#[test]
fn shutdown_does_not_wait_for_monitoring_clients() {
    let echo = Backend::start(Mode::Echo);
    let sock = temp_path("monitor-stop.sock");
    let engine = monitored(&sock, echo.addr, 2);
    let metrics = engine.metrics_addr().unwrap();
    assert_idle(&engine, &[echo.addr.port()]);
    // The drips first: at 7b9477c each endpoint's one thread was then stuck reading them.
    let drips = [drip(UnixStream::connect(&sock).unwrap()), drip(TcpStream::connect(metrics).unwrap())];
    std::thread::sleep(Duration::from_millis(200));
    let limit = Duration::from_secs(10);
    let until_closed = |c: Box<dyn Read + Send>| spawn(move || read_until_closed(c, limit).1);
    let mut readers: Vec<_> = idle(&sock, metrics, 20).into_iter().map(until_closed).collect();
    let mut slow = UnixStream::connect(&sock).unwrap();
    slow.write_all(b"show json\n").unwrap();
    readers.push(until_closed(Box::new(slow)));
    let mut slow_http = TcpStream::connect(metrics).unwrap();
    slow_http.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    readers.push(until_closed(Box::new(slow_http)));
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    assert_stops_clean(engine, &[echo.addr.port()]);
    assert!(t.elapsed() < stats::REQUEST_DEADLINE, "the engine took {:?} to stop", t.elapsed());
    for r in readers {
        let closed = r.join().unwrap();
        assert!(closed < stats::REQUEST_DEADLINE, "a client was closed only after {closed:?}");
    }
    for d in drips {
        d.join().unwrap();
    }
    assert!(!sock.exists(), "the socket file is removed");
}

/// Review 1c: at most `MAX_CLIENTS` are served at once; one more is closed at once rather than
/// queued behind them, and the socket serves again as soon as they are gone.
#[test]
fn a_client_beyond_the_cap_is_closed_at_once() {
    let echo = Backend::start(Mode::Echo);
    let sock = temp_path("monitor-cap.sock");
    let engine = monitored(&sock, echo.addr, 2);
    let held: Vec<UnixStream> = (0..stats::MAX_CLIENTS).map(|_| UnixStream::connect(&sock).unwrap()).collect();
    // The loop accepts in order: once the one past the cap is closed, all of these are held.
    let mut extra = UnixStream::connect(&sock).unwrap();
    extra.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = extra.write_all(b"show info\n");
    let (got, after) = read_until_closed(&mut extra, Duration::from_secs(5));
    assert_eq!(got, 0, "no answer beyond the cap");
    assert!(after < ANSWER_WITHIN, "closed at once, not queued: {after:?}");
    drop(held);
    wait_until("the socket to serve again", Duration::from_secs(5), || {
        socket::query(&sock, "show info").is_ok_and(|a| a.contains("workers: 2"))
    });
    assert_clean(engine, &[echo.addr.port()]);
}

/// Review 1c: a client that asks for a large answer and does not read it holds nobody up, and is
/// closed at the answer deadline.
#[test]
fn a_client_not_reading_its_answer_holds_nobody_up() {
    let echo = Backend::start(Mode::Echo);
    let sock = temp_path("monitor-slow.sock");
    // 2000 servers: `show json` is about a megabyte, more than a Unix socket buffers.
    let engine = monitored(&sock, echo.addr, 2000);
    let metrics = engine.metrics_addr().unwrap();
    let whole = socket::query(&sock, "show json").unwrap().len();
    assert!(whole > 512 * 1024, "the answer is larger than the socket buffers ({whole} bytes)");
    let mut slow = UnixStream::connect(&sock).unwrap();
    slow.write_all(b"show json\n").unwrap();
    let mut slow_http = TcpStream::connect(metrics).unwrap();
    slow_http.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    answered_at_once(&sock, metrics);
    std::thread::sleep(stats::ANSWER_DEADLINE + Duration::from_millis(500));
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (got, _) = read_until_closed(&mut slow, Duration::from_secs(5));
    assert!(got < whole, "cut off at the answer deadline: {got} of {whole} bytes");
    drop(slow_http);
    assert_clean(engine, &[echo.addr.port()]);
}

/// Review 1i: a regular file at the stats socket's path (`socket: /etc/ringproxy.yaml`) is
/// refused with a message saying so, and left as it was (at 7b9477c it was deleted, and the
/// socket took its place).
#[test]
fn a_regular_file_at_the_socket_path_is_refused_and_kept() {
    let echo = Backend::start(Mode::Echo);
    let file = write_temp("monitor-typo.yaml", "global: { workers: 1 }\n");
    let yaml = format!(
        "global: {{ workers: 1, stats: {{ socket: {} }} }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
        file.display(),
        echo.addr
    );
    let err = ringproxy::Engine::start(ringproxy::config::parse(&yaml, "t.yaml").unwrap())
        .err()
        .expect("the engine must not start over a regular file")
        .to_string();
    assert!(err.contains("a regular file is there, not a socket") && err.contains("untouched"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "global: { workers: 1 }\n", "the file is intact");
    std::fs::remove_file(&file).unwrap();
}

/// Review 1i: a socket nobody answers on (left by an engine that was killed) is replaced.
#[test]
fn a_stale_socket_is_replaced() {
    let echo = Backend::start(Mode::Echo);
    let sock = temp_path("monitor-stale.sock");
    let _ = std::fs::remove_file(&sock);
    drop(UnixListener::bind(&sock).unwrap());
    assert!(UnixStream::connect(&sock).is_err(), "stale: nobody answers");
    let engine = monitored(&sock, echo.addr, 1);
    assert!(socket::query(&sock, "show info").unwrap().contains("workers: 2"));
    assert_clean(engine, &[echo.addr.port()]);
    assert!(!sock.exists());
}
