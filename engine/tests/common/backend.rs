//! Test backends on loopback: [`Backend`] (echo, hold, silent, reset, tag), [`FaultBackend`]
//! (killed or stuck on demand, recording how each connection ended), and [`BlackHole`] (a server
//! that never answers SYN).
//!
//! Each accepts on its own thread and serves every connection on another; nothing here blocks
//! a test for longer than [`TICK`].

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::{BLOCK, STACK, reset, sockets_on_port, spawn, wait_until};

/// How often backends look at their stop, kill and release flags.
pub const TICK: Duration = Duration::from_millis(20);

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

/// A test server on loopback that serves every connection as its [`Mode`] says. Stopped (its
/// listener closed) when dropped.
pub struct Backend {
    pub addr: SocketAddr,
    accepting: Arc<Accepting>,
    release: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
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

    /// On an address of its own (127.0.77.1, which no test connects to by name), for a test that
    /// asserts on every peer it sees: a port on 127.0.0.1 may have been another test's backend a
    /// moment ago, given back when that test stopped it, and that test's proxy may still be
    /// checking or connecting to it (one such connect, from 127.0.0.1, failed the peer check of
    /// `process::admin::add_server_takes_connections_and_del_server_waits_for_none` in a full run).
    pub fn unshared(mode: Mode) -> Backend {
        Backend::on("127.0.77.1:0", mode)
    }

    pub fn on(bind: &str, mode: Mode) -> Backend {
        let release = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let (r, p) = (release.clone(), peers.clone());
        let (addr, accepting) = accept_each(bind, move |conn| {
            if let Ok(peer) = conn.peer_addr() {
                p.lock().unwrap().push(peer);
            }
            serve(conn, mode, &r);
        });
        Backend { addr, accepting, release, peers }
    }

    /// Closes the listener: connects to this address are refused from now on (established
    /// connections are left alone).
    pub fn stop(&self) {
        self.accepting.close();
    }

    /// Lets every held connection close (Hold mode).
    pub fn release(&self) {
        self.release.store(true, Ordering::SeqCst);
    }

    /// Connections open now.
    pub fn active(&self) -> usize {
        self.accepting.active.load(Ordering::SeqCst)
    }

    /// The most connections open at once.
    pub fn max_active(&self) -> usize {
        self.accepting.max_active.load(Ordering::SeqCst)
    }

    /// Connections accepted in all.
    pub fn total(&self) -> usize {
        self.accepting.total.load(Ordering::SeqCst)
    }

    /// Peer IPs seen, with counts.
    pub fn peer_ips(&self) -> HashMap<IpAddr, usize> {
        let mut m = HashMap::new();
        for p in self.peers.lock().unwrap().iter() {
            *m.entry(p.ip()).or_insert(0) += 1;
        }
        m
    }
}

/// The ports of `backends`, for [`assert_clean`](super::assert_clean).
pub fn ports_of(backends: &[Backend]) -> Vec<u16> {
    backends.iter().map(|b| b.addr.port()).collect()
}

fn serve(mut conn: TcpStream, mode: Mode, release: &AtomicBool) {
    let mut buf = vec![0u8; BLOCK];
    match mode {
        Mode::Echo => loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => return,
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
                _ => return,
            }
            conn.set_read_timeout(Some(TICK)).unwrap();
            while !release.load(Ordering::SeqCst) {
                match conn.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        if conn.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(_) => return,
                }
            }
        }
        Mode::Silent => while matches!(conn.read(&mut buf), Ok(n) if n > 0) {},
        Mode::ResetAfterRead => {
            let _ = conn.read(&mut buf);
            reset(conn);
        }
        Mode::Tag(tag) => {
            if conn.write_all(&[tag]).is_ok() {
                serve(conn, Mode::Echo, release);
            }
        }
    }
}

/// The listening side both backends share: connections accepted in all, open now and at most at
/// once, and the listener itself, to close it.
struct Accepting {
    closed: AtomicBool,
    /// A second handle on the listening socket, to shut it down.
    listener: Mutex<Option<TcpListener>>,
    total: AtomicUsize,
    active: AtomicUsize,
    max_active: AtomicUsize,
}

impl Accepting {
    /// Closes the listener: further connects are refused (established connections stay).
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some(l) = self.listener.lock().unwrap().take() {
            // shutdown() on a listening socket unlistens it and wakes the blocked accept().
            let _ = socket2::SockRef::from(&l).shutdown(Shutdown::Read);
        }
    }
}

/// Listens on `bind` and serves each connection with `serve`, on a thread of its own, until the
/// returned [`Accepting`] is closed.
fn accept_each(bind: &str, serve: impl Fn(TcpStream) + Send + Sync + 'static) -> (SocketAddr, Arc<Accepting>) {
    let listener = listen(bind);
    let addr = listener.local_addr().unwrap();
    let accepting = Arc::new(Accepting {
        closed: AtomicBool::new(false),
        listener: Mutex::new(Some(listener.try_clone().unwrap())),
        total: AtomicUsize::new(0),
        active: AtomicUsize::new(0),
        max_active: AtomicUsize::new(0),
    });
    let (a, serve) = (accepting.clone(), Arc::new(serve));
    spawn(move || {
        for conn in listener.incoming() {
            if a.closed.load(Ordering::SeqCst) {
                // The listener is dropped here.
                return;
            }
            let Ok(conn) = conn else { continue };
            a.total.fetch_add(1, Ordering::SeqCst);
            let now = a.active.fetch_add(1, Ordering::SeqCst) + 1;
            a.max_active.fetch_max(now, Ordering::SeqCst);
            let (a, serve) = (a.clone(), serve.clone());
            spawn(move || {
                serve(conn);
                a.active.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, accepting)
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

/// What a [`FaultBackend`] does with the bytes it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Echo every byte.
    Echo,
    /// Read (and discard) this many bytes, then never read again.
    StopReadingAfter(u64),
}

/// How a [`FaultBackend`]'s connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndedBy {
    /// The peer (the proxy) closed: EOF.
    Eof,
    /// The peer reset the connection.
    Reset,
    /// `kill()`: this backend reset it.
    Killed,
    /// `release()`: this backend closed it.
    Released,
}

pub struct FaultState {
    tag: Option<u8>,
    behaviour: Behaviour,
    killed: AtomicBool,
    released: AtomicBool,
    pub bytes_in: AtomicU64,
    /// When each connection ended and how.
    ends: Mutex<Vec<(Instant, EndedBy)>>,
}

/// A backend the test can break: kill it (listener shut, every connection reset), or have it stop
/// reading; it records when and how each connection ended.
pub struct FaultBackend {
    pub addr: SocketAddr,
    pub st: Arc<FaultState>,
    accepting: Arc<Accepting>,
}

impl Drop for FaultBackend {
    fn drop(&mut self) {
        self.accepting.close();
    }
}

impl FaultBackend {
    pub fn start(tag: Option<u8>, behaviour: Behaviour) -> FaultBackend {
        let st = Arc::new(FaultState {
            tag,
            behaviour,
            killed: AtomicBool::new(false),
            released: AtomicBool::new(false),
            bytes_in: AtomicU64::new(0),
            ends: Mutex::new(Vec::new()),
        });
        let s = st.clone();
        let (addr, accepting) = accept_each("127.0.0.1:0", move |conn| {
            let how = serve_fault(conn, &s);
            s.ends.lock().unwrap().push((Instant::now(), how));
        });
        FaultBackend { addr, st, accepting }
    }

    /// Crashes the server: the listener closes (new connects are refused) and every open
    /// connection is reset.
    pub fn kill(&self) {
        self.st.killed.store(true, Ordering::SeqCst);
        self.accepting.close();
    }

    /// Closes every connection normally.
    pub fn release(&self) {
        self.st.released.store(true, Ordering::SeqCst);
    }

    /// Connections accepted in all.
    pub fn accepted(&self) -> usize {
        self.accepting.total.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn active(&self) -> usize {
        self.accepting.active.load(Ordering::SeqCst)
    }

    pub fn ends(&self) -> Vec<(Instant, EndedBy)> {
        self.st.ends.lock().unwrap().clone()
    }
}

fn serve_fault(mut conn: TcpStream, st: &FaultState) -> EndedBy {
    conn.set_read_timeout(Some(TICK)).unwrap();
    conn.set_write_timeout(Some(TICK)).unwrap();
    let how = serve_fault_loop(&mut conn, st);
    match how {
        EndedBy::Killed => reset(conn),
        _ => drop(conn),
    }
    how
}

fn serve_fault_loop(conn: &mut TcpStream, st: &FaultState) -> EndedBy {
    if let Some(tag) = st.tag
        && let Err(how) = send_all(conn, &[tag], st)
    {
        return how;
    }
    let mut buf = vec![0u8; BLOCK];
    let mut read = 0u64;
    loop {
        if st.killed.load(Ordering::SeqCst) {
            return EndedBy::Killed;
        }
        if st.released.load(Ordering::SeqCst) {
            return EndedBy::Released;
        }
        let want = match st.behaviour {
            Behaviour::Echo => BLOCK,
            Behaviour::StopReadingAfter(n) => (n - read).min(BLOCK as u64) as usize,
        };
        if want == 0 {
            // Not reading any more: only notice the peer's reset or close.
            let mut p = libc::pollfd { fd: conn.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
            // SAFETY: one valid pollfd, for the duration of the call.
            unsafe { libc::poll(&mut p, 1, TICK.as_millis() as i32) };
            if p.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                return EndedBy::Reset;
            }
            if p.revents & libc::POLLRDHUP != 0 {
                return EndedBy::Eof;
            }
            continue;
        }
        match conn.read(&mut buf[..want]) {
            Ok(0) => return EndedBy::Eof,
            Ok(n) => {
                read += n as u64;
                st.bytes_in.fetch_add(n as u64, Ordering::SeqCst);
                if st.behaviour == Behaviour::Echo
                    && let Err(how) = send_all(conn, &buf[..n], st)
                {
                    return how;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(_) => return EndedBy::Reset,
        }
    }
}

fn send_all(conn: &mut TcpStream, data: &[u8], st: &FaultState) -> Result<(), EndedBy> {
    let mut off = 0;
    while off < data.len() {
        if st.killed.load(Ordering::SeqCst) {
            return Err(EndedBy::Killed);
        }
        if st.released.load(Ordering::SeqCst) {
            return Err(EndedBy::Released);
        }
        match conn.write(&data[off..]) {
            Ok(k) => off += k,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(_) => return Err(EndedBy::Reset),
        }
    }
    Ok(())
}

/// A server that never answers SYN: a listener (backlog 0) whose accept queue is full, so the
/// kernel drops every further SYN and connects to it hang until their timeout.
pub struct BlackHole {
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    /// The connection that fills the accept queue (never accepted).
    _filler: socket2::Socket,
}

impl BlackHole {
    pub fn start() -> BlackHole {
        let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        l.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
        l.listen(0).unwrap();
        let addr = l.local_addr().unwrap().as_socket().unwrap();
        let filler = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        filler.set_nonblocking(true).unwrap();
        let _ = filler.connect(&addr.into());
        // With backlog 0 the queue is full once it holds one connection: the kernel shows a
        // listener's queue length and limit as its rx_queue and tx_queue, and drops SYNs while
        // length > limit.
        wait_until("the black hole's accept queue to be full", Duration::from_secs(5), || {
            sockets_on_port(addr.port())
                .iter()
                .any(|s| s.state == "LISTEN" && s.local == addr && s.rx_queue > s.tx_queue)
        });
        BlackHole { addr, _listener: l, _filler: filler }
    }

    /// Connects still trying to reach the black hole (SYN-SENT toward it). Its own filler is
    /// established, so it is not counted.
    pub fn connects_pending(&self) -> usize {
        sockets_on_port(self.addr.port()).iter().filter(|s| s.remote == self.addr && s.state == "SYN-SENT").count()
    }
}
