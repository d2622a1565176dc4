//! The connection lifecycle, on real sockets: every state a connection can be in, crossed with
//! every way it can end, plus regression tests for the lifecycle defects of the code review of
//! 7b9477c (`shared/reviews/code-review-7b9477c.md` §1) and a randomized run.
//!
//! Each case drives both ends itself — the client socket, and the server's side of the proxied
//! connection, handed over by a backend that delivers every connection it accepts — and asserts
//! what a user would check: the client and the server both see the connection end; afterwards
//! the engine's gauges (`active`, `closing`, `queued`, `parked`, pipes and buffers in use) are 0;
//! the engine stops within its drain time; and this process has exactly the descriptors it had
//! before the case. The cases of this binary run one at a time ([`serial`]), so that count is exact.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use ringproxy::Engine;
use ringproxy::engine::StartOptions;

/// The source address the engine connects to servers from, so the backend tells proxied
/// connections from health checks (which come from 127.0.0.1).
const SOURCE: &str = "127.0.3.1";
/// What the health checks of a case send first.
const CHECK: &[u8; 6] = b"CHECK\n";
/// How long any single wait of a case may take.
const LIMIT: Duration = Duration::from_secs(5);
/// The drain timeout of every case's engine (and the margin `Engine::shutdown` gets beyond it).
const DRAIN: Duration = Duration::from_millis(300);
const STOP_MARGIN: Duration = Duration::from_secs(2);

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs the cases of this binary one at a time (each compares the process's descriptor count).
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// --- the two ends ---

/// A backend that hands the test every proxied connection it accepts. Health checks (which
/// start with [`CHECK`]) are accepted and closed, as is anything from another address.
struct Server {
    addr: SocketAddr,
    conns: Receiver<TcpStream>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// `rcvbuf`: a small receive buffer, so a server that does not read soon pushes back.
    fn start(rcvbuf: Option<usize>) -> Server {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_reuse_address(true).unwrap();
        if let Some(n) = rcvbuf {
            sock.set_recv_buffer_size(n).unwrap();
        }
        sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
        sock.listen(1024).unwrap();
        let listener: TcpListener = sock.into();
        let addr = listener.local_addr().unwrap();
        let (tx, conns) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let source: IpAddr = SOURCE.parse().unwrap();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                if !conn.peer_addr().is_ok_and(|p| p.ip() == source) {
                    continue;
                }
                let tx = tx.clone();
                std::thread::spawn(move || {
                    // A health check says so at once; a proxied connection may send nothing.
                    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
                    let mut first = [0u8; CHECK.len()];
                    if !matches!(conn.peek(&mut first), Ok(n) if n == CHECK.len() && first == *CHECK) {
                        let _ = tx.send(conn);
                    }
                });
            }
        });
        Server { addr, conns, stop, thread: Some(thread) }
    }

    /// The next proxied connection, with bounded reads and writes.
    fn next(&self) -> TcpStream {
        let s = self.conns.recv_timeout(LIMIT).expect("the proxy to connect to the server");
        s.set_read_timeout(Some(LIMIT)).unwrap();
        s.set_write_timeout(Some(LIMIT)).unwrap();
        s
    }

    /// Closes the listener: new connects (and health checks) are refused; accepted connections
    /// stay.
    fn stop_listening(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(500));
            t.join().unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_listening();
    }
}

/// A server address whose accept queue is full: SYNs to it are dropped, connects hang.
struct BlackHole {
    addr: SocketAddr,
    _listener: socket2::Socket,
    _fillers: Vec<socket2::Socket>,
}

impl BlackHole {
    fn new() -> BlackHole {
        let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        l.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
        l.listen(0).unwrap();
        let addr = l.local_addr().unwrap().as_socket().unwrap();
        let fillers = (0..2)
            .map(|_| {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
                s.set_nonblocking(true).unwrap();
                let _ = s.connect(&addr.into());
                s
            })
            .collect();
        wait_until("the black hole's accept queue to fill", LIMIT, || {
            sockets_on_port(addr.port()).iter().any(|(l, _, st)| l.port() == addr.port() && *st == "ESTAB")
        });
        BlackHole { addr, _listener: l, _fillers: fillers }
    }
}

fn client(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, LIMIT).expect("connect to the proxy");
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s.set_write_timeout(Some(LIMIT)).unwrap();
    s
}

/// How a stream ended, seen from one end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// An orderly EOF.
    Eof,
    /// A reset (or an abort).
    Reset,
}

/// Reads until the peer ends the stream: how it ended and how many bytes came first. Fails the
/// test if it has not ended within `LIMIT`.
fn read_to_end_within(s: &mut TcpStream, who: &str) -> (Ended, usize) {
    s.set_read_timeout(Some(LIMIT)).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (Ended::Eof, n),
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("{who} did not see the connection end within {LIMIT:?} ({n} bytes read)")
            }
            Err(_) => return (Ended::Reset, n),
        }
    }
}

fn rst(s: TcpStream) {
    reset(s);
}

// --- the matrix ---

/// Where the connection is when it ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Where {
    /// Reading the client's PROXY header (part of it has come).
    ProxyHeader,
    /// Accepted but waiting for a global maxconn slot (parked).
    Parked,
    /// Waiting in the backend's queue for a server slot.
    Queued,
    /// The connect to the server is in flight (the server drops SYNs).
    Connecting,
    /// Established, nothing moving.
    Idle,
    /// Client → server bytes held in a chunk buffer: the server does not read.
    Buffered,
    /// Client → server bytes held in a splice pipe: the server does not read.
    Spliced,
    /// The client sent its FIN (forwarded); the server's side is open.
    HalfClosedByClient,
    /// The server sent its FIN (forwarded); the client's side is open.
    HalfClosedByServer,
    /// Already closing (a client reset, with splices in flight) when the end arrives.
    Closing,
}

/// How the connection ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    ClientFin,
    ClientRst,
    ClientTimeout,
    ServerTimeout,
    ServerFin,
    ServerRst,
    /// The server's health check fails and `on_down: shutdown_sessions` closes its connections.
    ServerDown,
    QueueTimeout,
    /// The engine drains and its drain deadline passes.
    DrainDeadline,
    /// A reload: a new engine takes the listeners, the old one drains.
    Reload,
}

const WHERE: [Where; 10] = [
    Where::ProxyHeader,
    Where::Parked,
    Where::Queued,
    Where::Connecting,
    Where::Idle,
    Where::Buffered,
    Where::Spliced,
    Where::HalfClosedByClient,
    Where::HalfClosedByServer,
    Where::Closing,
];

const END: [End; 10] = [
    End::ClientFin,
    End::ClientRst,
    End::ClientTimeout,
    End::ServerTimeout,
    End::ServerFin,
    End::ServerRst,
    End::ServerDown,
    End::QueueTimeout,
    End::DrainDeadline,
    End::Reload,
];

/// Whether an ending can happen in a state; `Err` says why a pair is not a case.
fn applies(w: Where, e: End) -> Result<(), &'static str> {
    use End::*;
    use Where::*;
    let established = matches!(w, Idle | Buffered | Spliced | HalfClosedByClient | HalfClosedByServer | Closing);
    match (w, e) {
        (_, DrainDeadline | Reload | ClientRst) => Ok(()),
        (Closing, ClientFin | ClientTimeout) => Err("the client has already reset"),
        (Closing, ServerTimeout) => Err("closing cancels the timers"),
        (HalfClosedByClient, ClientFin) => Err("the client's FIN was already sent"),
        (HalfClosedByServer, ServerFin) => Err("the server's FIN was already sent"),
        (Parked, ClientTimeout) => Err("no timeout runs before admission (clients wait as in a backlog)"),
        (Queued, ClientTimeout) => Err("a queued connection has the queue timeout instead"),
        (Queued, QueueTimeout) => Ok(()),
        (_, QueueTimeout) => Err("only a queued connection has a queue timeout"),
        (ProxyHeader | Parked | Queued | Connecting, ServerTimeout | ServerFin | ServerRst) => {
            Err("no server connection yet")
        }
        (ProxyHeader | Parked | Queued, ServerDown) => Err("not on a server yet"),
        (ProxyHeader | Parked | Queued | Connecting, ClientFin | ClientTimeout | ServerDown) => Ok(()),
        _ if established => Ok(()),
        _ => Err("not a case"),
    }
}

fn yaml(w: Where, e: End, server: SocketAddr) -> String {
    let ms = |short: bool, long: &str| if short { "300ms".to_string() } else { long.to_string() };
    let connect = match (w, e) {
        // A FIN does not stop a connect; its timeout does.
        (Where::Connecting, End::ClientFin) => "500ms",
        _ => "10s",
    };
    let client = ms(e == End::ClientTimeout && w != Where::ProxyHeader, "30s");
    let proxy_header = ms(e == End::ClientTimeout && w == Where::ProxyHeader, "30s");
    let server_timeout = ms(e == End::ServerTimeout, "30s");
    let queue = ms(e == End::QueueTimeout, "30s");
    let maxconn = if w == Where::Parked { 1 } else { 1000 };
    let splice = if matches!(w, Where::Spliced | Where::Closing) { "always" } else { "auto" };
    let accept_proxy = w == Where::ProxyHeader;
    let server_maxconn = if w == Where::Queued { ", maxconn: 1" } else { "" };
    let check = if e == End::ServerDown {
        "    check: { interval: 50ms, timeout: 50ms, rise: 1, fall: 4, send: \"CHECK\\n\" }\n    on_down: shutdown_sessions\n"
    } else {
        ""
    };
    format!(
        "global: {{ workers: 1, maxconn: {maxconn}, tune: {{ splice: {splice} }} }}\n\
         defaults: {{ timeout: {{ connect: {connect}, client: {client}, server: {server_timeout}, queue: {queue}, \
         drain: {drain}ms, proxy_header: {proxy_header} }} }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be, accept_proxy: {accept_proxy} }}]\n\
         backends:\n  - name: be\n    retries: 0\n{check}    servers: [{{ name: s, address: \"{server}\", source: {SOURCE}{server_maxconn} }}]\n",
        drain = DRAIN.as_millis()
    )
}

/// Everything a case holds while it runs.
struct Scene {
    engine: Option<Engine>,
    /// An engine that replaced the first one (reload).
    successor: Option<Engine>,
    server: Server,
    hole: Option<BlackHole>,
    fe: SocketAddr,
    client: Option<TcpStream>,
    /// The server's side of the proxied connection, once there is one.
    server_end: Option<TcpStream>,
    /// A connection holding the only maxconn (or server) slot: (client, server side).
    holder: Option<(TcpStream, TcpStream)>,
    /// Client → server bytes not yet read by the server.
    unread: usize,
    /// The frontend wants a PROXY header first.
    accept_proxy: bool,
}

impl Scene {
    fn engine(&self) -> &Engine {
        self.engine.as_ref().expect("the engine runs")
    }

    fn stats(&self) -> ringproxy::stats::EngineStats {
        self.engine().stats()
    }

    fn wait_stat(&self, what: &str, f: impl Fn(&ringproxy::stats::EngineStats) -> bool) {
        wait_until(what, LIMIT, || f(&self.stats()));
    }

    /// An established connection through the proxy, with both ends.
    fn established(&mut self) -> (TcpStream, TcpStream) {
        let mut c = client(self.fe);
        if self.accept_proxy {
            c.write_all(b"PROXY TCP4 10.1.2.3 10.4.5.6 1111 2222\r\n").unwrap();
        }
        c.write_all(b"ping").unwrap();
        let mut s = self.server.next();
        let mut got = [0u8; 4];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        s.write_all(b"pong").unwrap();
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"pong");
        (c, s)
    }

    /// Client → server bytes until the proxy holds some it cannot write (the server does not
    /// read) in a buffer (`pipes == false`) or a pipe. Each write waits until the proxy has read
    /// the one before, so in buffer mode no read ever fills a whole buffer (which would switch the
    /// flow to splice).
    fn fill(&mut self, pipes: bool) {
        let mut c = self.client.take().unwrap();
        c.set_nonblocking(true).unwrap();
        let chunk = vec![0x5Au8; if pipes { 64 * 1024 } else { 12 * 1024 }];
        let held = |s: &ringproxy::stats::EngineStats| {
            if pipes { s.total(|w| w.pipes_in_use) } else { s.total(|w| w.buffers_in_use) }
        };
        let deadline = Instant::now() + LIMIT;
        loop {
            assert!(Instant::now() < deadline, "the proxy never held bytes");
            match c.write(&chunk) {
                Ok(n) => self.unread += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("client write: {e}"),
            }
            // The proxy read it all (go on), or holds a chunk the server does not take.
            let sent = self.unread as u64 + 4;
            let mut stuck = 0;
            loop {
                let s = self.stats();
                if s.total(|w| w.bytes_client_to_server) >= sent {
                    break;
                }
                stuck = if held(&s) > 0 { stuck + 1 } else { 0 };
                if stuck == 5 {
                    c.set_nonblocking(false).unwrap();
                    self.client = Some(c);
                    return;
                }
                assert!(Instant::now() < deadline, "the proxy neither read nor held bytes");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Brings the connection to `w`.
    fn reach(&mut self, w: Where) {
        match w {
            Where::ProxyHeader => {
                let mut c = client(self.fe);
                c.write_all(b"PROXY TCP4 10.1.2.3 ").unwrap();
                self.client = Some(c);
                self.wait_stat("the proxy to look at the header", |s| s.total(|w| w.proxy_header_peeks) >= 1);
            }
            Where::Parked | Where::Queued => {
                self.holder = Some(self.established());
                self.client = Some(client(self.fe));
                if w == Where::Parked {
                    self.wait_stat("the second connection to be parked", |s| s.total(|w| w.parked) == 1);
                } else {
                    self.wait_stat("the second connection to be queued", |s| s.total(|w| w.queued) == 1);
                }
            }
            Where::Connecting => {
                self.client = Some(client(self.fe));
                let hole = self.hole.as_ref().unwrap().addr.port();
                wait_until("the connect to the black hole", LIMIT, || {
                    sockets_on_port(hole)
                        .iter()
                        .any(|(l, r, st)| r.port() == hole && l.ip().to_string() == SOURCE && *st == "SYN-SENT")
                });
            }
            Where::Idle => {
                let (c, s) = self.established();
                self.client = Some(c);
                self.server_end = Some(s);
            }
            Where::Buffered | Where::Spliced | Where::Closing => {
                let (c, s) = self.established();
                self.client = Some(c);
                self.server_end = Some(s);
                self.fill(w != Where::Buffered);
            }
            Where::HalfClosedByClient => {
                self.reach(Where::Idle);
                self.client.as_ref().unwrap().shutdown(Shutdown::Write).unwrap();
                let (how, _) = read_to_end_within(self.server_end.as_mut().unwrap(), "the server");
                assert_eq!(how, Ended::Eof, "the client's FIN is forwarded");
            }
            Where::HalfClosedByServer => {
                self.reach(Where::Idle);
                self.server_end.as_ref().unwrap().shutdown(Shutdown::Write).unwrap();
                let (how, _) = read_to_end_within(self.client.as_mut().unwrap(), "the client");
                assert_eq!(how, Ended::Eof, "the server's FIN is forwarded");
                // Still open the other way.
                self.client.as_mut().unwrap().write_all(b"more").unwrap();
                let mut got = [0u8; 4];
                self.server_end.as_mut().unwrap().read_exact(&mut got).unwrap();
                assert_eq!(&got, b"more");
            }
        }
    }

    /// Makes `e` happen.
    fn trigger(&mut self, w: Where, e: End, config: &str) {
        if w == Where::Closing {
            // Closing already: the client resets with splices in flight, and the end comes on top.
            rst(self.client.take().unwrap());
        }
        match e {
            End::ClientFin => self.client.as_ref().unwrap().shutdown(Shutdown::Write).unwrap(),
            End::ClientRst => {
                if let Some(c) = self.client.take() {
                    rst(c);
                }
            }
            End::ClientTimeout | End::ServerTimeout | End::QueueTimeout => {}
            // (While closing, the proxy may have reset the server's side already.)
            End::ServerFin => {
                let _ = self.server_end.as_ref().unwrap().shutdown(Shutdown::Write);
            }
            End::ServerRst => rst(self.server_end.take().unwrap()),
            End::ServerDown => self.server.stop_listening(),
            End::DrainDeadline => self.engine.as_mut().unwrap().drain(),
            End::Reload => {
                let cfg = ringproxy::config::parse(config, "reload.yaml").unwrap();
                let old = self.engine.as_mut().unwrap();
                let new = Engine::start_with(cfg, StartOptions { inherit: old.listeners(), external_stats: false })
                    .unwrap_or_else(|e| panic!("reload: {e}"));
                old.drain();
                new.rearm_accepts();
                self.successor = Some(new);
            }
        }
        if matches!((w, e), (Where::Parked | Where::Queued, End::ClientFin | End::ClientRst)) {
            // The connection moves on (or is found reset) once the holder's slot is free.
            let (c, mut s) = self.holder.take().unwrap();
            drop(c);
            assert_eq!(read_to_end_within(&mut s, "the holder's server").0, Ended::Eof);
        }
    }

    /// Both ends see the end of the connection.
    fn both_see_the_end(&mut self, w: Where, e: End) {
        let has_server = !matches!(w, Where::ProxyHeader | Where::Parked | Where::Queued | Where::Connecting)
            || matches!((w, e), (Where::Parked | Where::Queued, End::ClientFin));
        if has_server && self.server_end.is_none() && !matches!(e, End::ServerRst) {
            // A parked or queued connection whose client sent a FIN is connected once a slot frees.
            self.server_end = Some(self.server.next());
        }
        // The ends the test closed itself have seen it; the others must see it now.
        let client_closes = matches!(e, End::ServerFin) || w == Where::HalfClosedByServer && e == End::ClientFin;
        let server_closes = matches!(e, End::ClientFin) || w == Where::HalfClosedByClient && e == End::ServerFin;
        if server_closes && let Some(mut s) = self.server_end.take() {
            let (how, n) = read_to_end_within(&mut s, "the server");
            assert_eq!(how, Ended::Eof, "the server reads the client's FIN after its bytes");
            assert!(n >= self.unread, "the server got {n} of {} bytes sent before the FIN", self.unread);
            drop(s);
        }
        if client_closes && let Some(mut c) = self.client.take() {
            let (how, _) = read_to_end_within(&mut c, "the client");
            assert_eq!(how, Ended::Eof, "the client reads the server's FIN");
            drop(c);
        }
        if let Some(mut c) = self.client.take() {
            read_to_end_within(&mut c, "the client");
        }
        if let Some(mut s) = self.server_end.take() {
            read_to_end_within(&mut s, "the server");
        }
        if let Some((c, mut s)) = self.holder.take() {
            drop(c);
            read_to_end_within(&mut s, "the holder's server");
        }
    }
}

/// The gauges of every engine are back to 0, the engine stops within its drain time, and this
/// process has the descriptors it had before.
fn assert_clean(scene: Scene, fds_before: usize, case: &str) {
    for engine in [&scene.engine, &scene.successor].into_iter().flatten() {
        wait_until(&format!("{case}: every gauge back to 0"), LIMIT, || {
            let s = engine.stats();
            s.total(|w| w.active + w.closing + w.queued + w.parked + w.pipes_in_use + w.buffers_in_use) == 0
        });
        let s = engine.stats();
        assert_eq!(s.total(|w| w.unexpected_completions), 0, "{case}: every completion matched an op in flight");
        assert_eq!(s.total(|w| w.accepted), s.total(|w| w.closed), "{case}: every accepted connection closed");
    }
    let Scene { engine, successor, server, hole, .. } = scene;
    for engine in [engine, successor].into_iter().flatten() {
        let t = Instant::now();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            engine.shutdown();
            let _ = tx.send(());
        });
        rx.recv_timeout(DRAIN + STOP_MARGIN)
            .unwrap_or_else(|_| panic!("{case}: the engine did not stop within its drain time ({DRAIN:?})"));
        assert!(t.elapsed() < DRAIN + STOP_MARGIN);
    }
    drop(server);
    drop(hole);
    wait_until(&format!("{case}: this process's descriptors back to {fds_before}"), LIMIT, || open_fds() == fds_before);
}

fn run_case(w: Where, e: End) {
    let case = format!("{w:?} × {e:?}");
    eprintln!("case {case}");
    let fds_before = open_fds();
    let server = Server::start(matches!(w, Where::Buffered | Where::Spliced | Where::Closing).then_some(4096));
    let hole = (w == Where::Connecting).then(BlackHole::new);
    let target = hole.as_ref().map_or(server.addr, |h| h.addr);
    let config = yaml(w, e, target);
    let engine = engine(&config);
    let fe = addr(&engine, "fe");
    let mut scene = Scene {
        engine: Some(engine),
        successor: None,
        server,
        hole,
        fe,
        client: None,
        server_end: None,
        holder: None,
        unread: 0,
        accept_proxy: w == Where::ProxyHeader,
    };
    scene.reach(w);
    scene.trigger(w, e, &config);
    scene.both_see_the_end(w, e);
    if e == End::Reload && scene.hole.is_none() {
        // The new engine serves.
        let (mut c, mut s) = scene.established();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_to_end_within(&mut s, "the server").0, Ended::Eof);
        drop(s);
        assert_eq!(read_to_end_within(&mut c, "the client").0, Ended::Eof);
    }
    assert_clean(scene, fds_before, &case);
}

fn row(w: Where) {
    let _serial = serial();
    for e in END {
        if applies(w, e).is_ok() {
            run_case(w, e);
        }
    }
}

#[test]
fn reading_the_proxy_header_ends_every_way() {
    row(Where::ProxyHeader);
}

#[test]
fn parked_ends_every_way() {
    row(Where::Parked);
}

#[test]
fn queued_ends_every_way() {
    row(Where::Queued);
}

#[test]
fn connecting_ends_every_way() {
    row(Where::Connecting);
}

#[test]
fn established_idle_ends_every_way() {
    row(Where::Idle);
}

#[test]
fn mid_transfer_in_a_buffer_ends_every_way() {
    row(Where::Buffered);
}

#[test]
fn mid_transfer_in_a_pipe_ends_every_way() {
    row(Where::Spliced);
}

#[test]
fn half_closed_by_the_client_ends_every_way() {
    row(Where::HalfClosedByClient);
}

#[test]
fn half_closed_by_the_server_ends_every_way() {
    row(Where::HalfClosedByServer);
}

#[test]
fn closing_ends_every_way() {
    row(Where::Closing);
}

#[test]
fn the_matrix_names_a_reason_for_every_pair_it_skips() {
    let mut cases = 0;
    for w in WHERE {
        for e in END {
            match applies(w, e) {
                Ok(()) => cases += 1,
                Err(why) => assert!(!why.is_empty()),
            }
        }
    }
    assert!(cases >= 65, "{cases} cases");
}
