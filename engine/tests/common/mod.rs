//! Test harness: real backends on loopback, the engine started in-process on port 0, small client
//! helpers, and a reader for the kernel's socket table. Every wait is bounded.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ringproxy::Engine;

pub const STACK: usize = 256 * 1024;

/// What a test backend does with each connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Echo everything back; close after the client's EOF.
    Echo,
    /// Echo, and keep the connection until `release()` (then close).
    Hold,
    /// Read and discard, never write; close on EOF.
    Silent,
    /// Reset the connection (SO_LINGER 0 close) after reading the first bytes.
    ResetAfterRead,
    /// Write this one byte on accept (so a client learns which server it reached), then echo.
    Tag(u8),
}

#[derive(Default)]
pub struct BackendState {
    stopped: AtomicBool,
    pub active: AtomicUsize,
    pub max_active: AtomicUsize,
    pub total: AtomicUsize,
    pub closed_by_peer: AtomicUsize,
    pub peers: Mutex<Vec<SocketAddr>>,
    release: AtomicBool,
}

pub struct Backend {
    pub addr: SocketAddr,
    pub state: Arc<BackendState>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Backend {
    pub fn start(mode: Mode) -> Backend {
        Backend::on("127.0.0.1:0", mode)
    }

    pub fn on(bind: &str, mode: Mode) -> Backend {
        let listener = listen(bind);
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(BackendState::default());
        let st = state.clone();
        thread::Builder::new()
            .stack_size(STACK)
            .spawn(move || {
                for conn in listener.incoming() {
                    if st.stopped.load(Ordering::SeqCst) {
                        // Stopped: the listener is dropped here, so further connects are refused.
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let st = st.clone();
                    st.total.fetch_add(1, Ordering::SeqCst);
                    let now = st.active.fetch_add(1, Ordering::SeqCst) + 1;
                    st.max_active.fetch_max(now, Ordering::SeqCst);
                    if let Ok(peer) = conn.peer_addr() {
                        st.peers.lock().unwrap().push(peer);
                    }
                    thread::Builder::new()
                        .stack_size(STACK)
                        .spawn(move || {
                            serve(conn, mode, &st);
                            st.active.fetch_sub(1, Ordering::SeqCst);
                        })
                        .unwrap();
                }
            })
            .unwrap();
        Backend { addr, state }
    }

    /// Closes the listener: connects to this address are refused from now on (established
    /// connections are left alone).
    pub fn stop(&self) {
        if !self.state.stopped.swap(true, Ordering::SeqCst) {
            // Wake the accept loop so it sees the flag and drops the listener.
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        }
    }

    /// Lets every held connection close (Hold mode).
    pub fn release(&self) {
        self.state.release.store(true, Ordering::SeqCst);
    }

    pub fn active(&self) -> usize {
        self.state.active.load(Ordering::SeqCst)
    }

    pub fn total(&self) -> usize {
        self.state.total.load(Ordering::SeqCst)
    }

    /// Peer IPs seen, with counts.
    pub fn peer_ips(&self) -> HashMap<IpAddr, usize> {
        let mut m = HashMap::new();
        for p in self.state.peers.lock().unwrap().iter() {
            *m.entry(p.ip()).or_insert(0) += 1;
        }
        m
    }
}

fn serve(mut conn: TcpStream, mode: Mode, st: &BackendState) {
    let mut buf = vec![0u8; 64 * 1024];
    match mode {
        Mode::Echo => loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => {
                    st.closed_by_peer.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                Ok(n) => {
                    if conn.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        },
        Mode::Hold => {
            // The first message is always echoed, so a client knows it got through.
            match conn.read(&mut buf) {
                Ok(n) if n > 0 => {
                    if conn.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
                _ => {
                    st.closed_by_peer.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
            conn.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            loop {
                if st.release.load(Ordering::SeqCst) {
                    return;
                }
                match conn.read(&mut buf) {
                    Ok(0) => {
                        st.closed_by_peer.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    Ok(n) => {
                        if conn.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(_) => {
                        st.closed_by_peer.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
            }
        }
        Mode::Silent => loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => {
                    st.closed_by_peer.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                Ok(_) => {}
            }
        },
        Mode::ResetAfterRead => {
            let _ = conn.read(&mut buf);
            reset(conn);
        }
        Mode::Tag(tag) => {
            if conn.write_all(&[tag]).is_err() {
                return;
            }
            serve(conn, Mode::Echo, st);
        }
    }
}

/// A listening socket with a backlog deep enough for a thousand simultaneous connects
/// (std's TcpListener uses 128, which overflows into SYN cookies and resets under a burst).
pub fn listen(bind: &str) -> TcpListener {
    let addr: SocketAddr = bind.parse().expect("a socket address");
    let domain = if addr.is_ipv6() { socket2::Domain::IPV6 } else { socket2::Domain::IPV4 };
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.bind(&addr.into()).expect("bind test backend");
    s.listen(4096).unwrap();
    s.into()
}

/// Closes with RST.
pub fn reset(conn: TcpStream) {
    let s = socket2::Socket::from(conn);
    let _ = s.set_linger(Some(Duration::ZERO));
    drop(s);
}

/// Starts the engine from YAML text.
pub fn engine(yaml: &str) -> Engine {
    let config = ringproxy::config::parse(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}"));
    Engine::start(config).unwrap_or_else(|e| panic!("engine did not start: {e}"))
}

/// The first listening address of frontend `fe`.
pub fn addr(engine: &Engine, fe: &str) -> SocketAddr {
    engine.addrs(fe)[0]
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to the proxy");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Connects from a given local IP.
pub fn connect_from(addr: SocketAddr, from: IpAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::new(from, 0).into()).unwrap();
    sock.connect_timeout(&addr.into(), Duration::from_secs(5)).unwrap();
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Writes `msg`, reads the same number of bytes back, and checks them.
pub fn echo_once(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, msg);
}

/// Reads until EOF or error; returns what was read and whether it ended with an error.
pub fn read_to_end(s: &mut TcpStream) -> (Vec<u8>, Option<std::io::Error>) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return (out, Some(e)),
        }
    }
}

/// Waits until `f` holds (polling), failing the test after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for: {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

pub fn half_close(s: &TcpStream) {
    s.shutdown(Shutdown::Write).unwrap();
}

/// TCP sockets in the kernel whose local or remote port is `port`, with their state
/// (from /proc/net/tcp and tcp6; state names as in `ss`).
pub fn sockets_on_port(port: u16) -> Vec<(SocketAddr, SocketAddr, &'static str)> {
    let mut out = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 {
                continue;
            }
            let (Some(l), Some(r)) = (parse_proc_addr(f[1]), parse_proc_addr(f[2])) else {
                continue;
            };
            if l.port() == port || r.port() == port {
                out.push((l, r, state_name(f[3])));
            }
        }
    }
    out
}

fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    if ip.len() == 8 {
        let v = u32::from_str_radix(ip, 16).ok()?;
        Some(SocketAddr::new(IpAddr::from(v.swap_bytes().to_be_bytes()), port))
    } else {
        let mut bytes = [0u8; 16];
        for i in 0..4 {
            let w = u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok()?;
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        Some(SocketAddr::new(IpAddr::from(bytes), port))
    }
}

fn state_name(hex: &str) -> &'static str {
    match hex {
        "01" => "ESTAB",
        "02" => "SYN-SENT",
        "03" => "SYN-RECV",
        "04" => "FIN-WAIT-1",
        "05" => "FIN-WAIT-2",
        "06" => "TIME-WAIT",
        "07" => "CLOSE",
        "08" => "CLOSE-WAIT",
        "09" => "LAST-ACK",
        "0A" => "LISTEN",
        "0B" => "CLOSING",
        _ => "?",
    }
}

/// Sockets on `port` that still hold a connection open (anything but LISTEN, TIME-WAIT, CLOSE).
pub fn open_sockets_on_port(port: u16) -> Vec<(SocketAddr, SocketAddr, &'static str)> {
    sockets_on_port(port).into_iter().filter(|(_, _, s)| !matches!(*s, "LISTEN" | "TIME-WAIT" | "CLOSE")).collect()
}

/// Number of descriptors this process has open.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

/// A deterministic pseudo-random byte stream (xorshift), cheap even in debug builds.
pub struct Stream {
    state: u64,
}

impl Stream {
    pub fn new(seed: u64) -> Stream {
        Stream { state: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1 }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            let b = self.state.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }
}
