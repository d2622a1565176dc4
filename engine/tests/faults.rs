//! Faults: the engine keeps every other connection intact and keeps serving while one thing goes
//! wrong. One test per fault:
//!
//! * a backend killed mid-transfer (its clients see a reset or EOF at once, new connections go to
//!   the other server);
//! * a backend that stops reading (the proxy buffers no more than one pipe per stuck flow; the
//!   server timeout frees the connections);
//! * a backend that never answers SYN (connect timeout, then the retry on the good server serves
//!   the client);
//! * clients that connect and send nothing (the client timeout frees them and their slots);
//! * clients that reset mid-transfer (the server side is closed within 1 s).
//!
//! In each, "bystanders" move checksummed streams (SHA-256 of every byte sent and received, and
//! an exact byte-for-byte comparison as they arrive) through the same engine (2 workers) during the
//! fault, on their own frontend: long-lived connections streaming both ways through the fault,
//! and short connections opened and closed one after another. Every bystander byte must come
//! back intact and be counted. Afterwards the engine must still serve, hold no connection
//! (`active` 0, nothing parked or queued, no pipe lent) and leave no open socket on its ports.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use ringproxy::Engine;
use sha2::{Digest, Sha256};

const BLOCK: usize = 64 * 1024;
const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
/// How often test backends look at their kill/release flags.
const TICK: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------------------------
// Pump: one client connection streaming deterministic bytes through an echo path.

/// A nonblocking client connection that sends stream `seed` and checks that what comes back is
/// exactly that stream (byte for byte as it arrives, and SHA-256 of each side at the end).
struct Pump {
    s: TcpStream,
    seed: u64,
    tx: Stream,
    out: Vec<u8>,
    out_off: usize,
    sent: u64,
    tx_hash: Sha256,
    /// Stop sending (and half-close) once this many bytes are sent; `None`: until `finish()`.
    limit: Option<u64>,
    shut: bool,
    /// Bytes per second, counted from `started`; `None`: as fast as the path takes them.
    pace: Option<u64>,
    started: Instant,
    /// The backend writes one tag byte first (which server this is).
    tagged: bool,
    tag: Option<u8>,
    rx: Stream,
    expect: Vec<u8>,
    exp_off: usize,
    received: u64,
    rx_hash: Sha256,
    /// First byte (offset) that differed from what was sent.
    corrupt_at: Option<u64>,
    eof: bool,
    buf: Vec<u8>,
}

impl Pump {
    fn connect(addr: SocketAddr, seed: u64, tagged: bool) -> std::io::Result<Pump> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_nonblocking(true)?;
        Ok(Pump {
            s,
            seed,
            tx: Stream::new(seed),
            out: Vec::new(),
            out_off: 0,
            sent: 0,
            tx_hash: Sha256::new(),
            limit: None,
            shut: false,
            pace: None,
            started: Instant::now(),
            tagged,
            tag: None,
            rx: Stream::new(seed),
            expect: Vec::new(),
            exp_off: 0,
            received: 0,
            rx_hash: Sha256::new(),
            corrupt_at: None,
            eof: false,
            buf: vec![0; BLOCK],
        })
    }

    fn limit(mut self, bytes: u64) -> Pump {
        self.limit = Some(bytes);
        self
    }

    fn paced(mut self, bytes_per_s: u64) -> Pump {
        self.pace = Some(bytes_per_s);
        self
    }

    /// Sends what is pending, then half-closes.
    fn finish(&mut self) {
        if self.limit.is_none() {
            self.limit = Some(self.sent + (self.out.len() - self.out_off) as u64);
        }
    }

    fn may_start_block(&self) -> bool {
        match self.pace {
            None => true,
            Some(rate) => (self.started.elapsed().as_secs_f64() * rate as f64) as u64 + BLOCK as u64 > self.sent,
        }
    }

    /// One nonblocking round: write what the socket takes, read what is there.
    /// Ok(true) if anything moved.
    fn step(&mut self) -> std::io::Result<bool> {
        let mut progress = false;
        if !self.shut {
            if self.out_off == self.out.len() {
                let room = self.limit.map_or(u64::MAX, |l| l - self.sent);
                if room == 0 {
                    self.s.shutdown(Shutdown::Write)?;
                    self.shut = true;
                    progress = true;
                } else if self.may_start_block() {
                    // Only the last block of a limited stream is short, so the stream stays
                    // aligned with the receiver's copy (Stream fills 8 bytes at a time).
                    self.out.resize(room.min(BLOCK as u64) as usize, 0);
                    self.tx.fill(&mut self.out);
                    self.out_off = 0;
                }
            }
            if self.out_off < self.out.len() {
                match self.s.write(&self.out[self.out_off..]) {
                    Ok(k) => {
                        self.tx_hash.update(&self.out[self.out_off..self.out_off + k]);
                        self.out_off += k;
                        self.sent += k as u64;
                        progress = true;
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if !self.eof {
            match self.s.read(&mut self.buf) {
                Ok(0) => {
                    self.eof = true;
                    progress = true;
                }
                Ok(n) => {
                    self.take(n);
                    progress = true;
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(progress)
    }

    fn take(&mut self, n: usize) {
        let buf = std::mem::take(&mut self.buf);
        let mut data = &buf[..n];
        if self.tagged && self.tag.is_none() {
            self.tag = Some(data[0]);
            data = &data[1..];
        }
        self.rx_hash.update(data);
        while !data.is_empty() {
            if self.exp_off == self.expect.len() {
                self.expect.resize(BLOCK, 0);
                self.rx.fill(&mut self.expect);
                self.exp_off = 0;
            }
            let k = data.len().min(self.expect.len() - self.exp_off);
            let want = &self.expect[self.exp_off..self.exp_off + k];
            if self.corrupt_at.is_none() && data[..k] != *want {
                let i = (0..k).find(|&i| data[i] != want[i]).unwrap_or(0);
                self.corrupt_at = Some(self.received + i as u64);
            }
            self.exp_off += k;
            self.received += k as u64;
            data = &data[k..];
        }
        self.buf = buf;
    }

    /// Waits (up to `ms`) until the socket can make progress.
    fn wait(&self, ms: i32) {
        let mut events = 0;
        if !self.eof {
            events |= libc::POLLIN;
        }
        if !self.shut && self.out_off < self.out.len() {
            events |= libc::POLLOUT;
        }
        let mut p = libc::pollfd { fd: self.s.as_raw_fd(), events, revents: 0 };
        // SAFETY: one valid pollfd, for the duration of the call.
        unsafe { libc::poll(&mut p, 1, ms) };
    }

    /// Runs until the echo's EOF, an error, or `deadline`.
    fn run(&mut self, deadline: Instant) -> Result<(), String> {
        while !self.eof {
            if Instant::now() > deadline {
                return Err(format!("stalled: sent {}, received {}", self.sent, self.received));
            }
            match self.step() {
                Ok(true) => {}
                Ok(false) => self.wait(20),
                Err(e) => return Err(format!("{e} after sending {} and receiving {}", self.sent, self.received)),
            }
        }
        Ok(())
    }

    /// Everything sent came back, byte for byte, and nothing else.
    fn intact(&self) -> Result<(), String> {
        if let Some(at) = self.corrupt_at {
            return Err(format!("byte {at} of the echo differs from what was sent"));
        }
        if !self.eof || !self.shut {
            return Err(format!("not finished (sent {}, received {})", self.sent, self.received));
        }
        if self.received != self.sent {
            return Err(format!("sent {} bytes, {} came back", self.sent, self.received));
        }
        if self.tx_hash.clone().finalize() != self.rx_hash.clone().finalize() {
            return Err("SHA-256 of the echo differs from SHA-256 of what was sent".into());
        }
        Ok(())
    }

    /// For a connection cut short: what came back is exactly the start of what was sent.
    fn prefix_intact(&self) -> Result<(), String> {
        if let Some(at) = self.corrupt_at {
            return Err(format!("byte {at} of the echo differs from what was sent"));
        }
        if self.received > self.sent {
            return Err(format!("{} bytes came back but only {} were sent", self.received, self.sent));
        }
        let mut again = Stream::new(self.seed);
        let mut hash = Sha256::new();
        let mut block = vec![0u8; BLOCK];
        let mut left = self.received;
        while left > 0 {
            again.fill(&mut block);
            let n = left.min(BLOCK as u64) as usize;
            hash.update(&block[..n]);
            left -= n as u64;
        }
        if hash.finalize() != self.rx_hash.clone().finalize() {
            return Err("SHA-256 of the bytes received differs from the start of the stream".into());
        }
        Ok(())
    }
}

/// Sets SO_LINGER 0 and closes: the peer gets a reset.
fn reset_stream(s: TcpStream) {
    reset(s);
}

// ---------------------------------------------------------------------------------------------
// Bystanders: connections that must not notice the fault.

#[derive(Default)]
struct Bystanders {
    stop: Arc<AtomicBool>,
    /// Bytes verified so far (received and matched), and short connections completed.
    bytes: Arc<AtomicU64>,
    cycles: Arc<AtomicU64>,
    handles: Vec<thread::JoinHandle<Tally>>,
}

#[derive(Default, Debug)]
struct Tally {
    connections: u64,
    bytes: u64,
    failures: Vec<String>,
}

impl Bystanders {
    /// `long` connections streaming both ways (paced) until `finish`, and `short` loops of
    /// connect, send 1 byte .. 1 MiB, read the echo, close.
    fn start(addr: SocketAddr, long: u64, short: u64) -> Bystanders {
        let mut b = Bystanders::default();
        for i in 0..long {
            let (stop, bytes) = (b.stop.clone(), b.bytes.clone());
            b.handles.push(spawn(move || long_bystander(addr, 1000 + i, &stop, &bytes)));
        }
        for i in 0..short {
            let (stop, bytes, cycles) = (b.stop.clone(), b.bytes.clone(), b.cycles.clone());
            b.handles.push(spawn(move || short_bystander(addr, 2000 + i * 1000, &stop, &bytes, &cycles)));
        }
        b
    }

    fn progress(&self) -> (u64, u64) {
        (self.bytes.load(Ordering::SeqCst), self.cycles.load(Ordering::SeqCst))
    }

    /// Waits until the bystanders moved `bytes` more and completed `cycles` more connections.
    fn wait_progress(&self, what: &str, bytes: u64, cycles: u64) {
        let (b0, c0) = self.progress();
        wait_until(what, Duration::from_secs(20), || {
            let (b, c) = self.progress();
            b >= b0 + bytes && c >= c0 + cycles
        });
    }

    /// Stops them, checks every connection, returns the totals.
    fn finish(self, test: &str) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Tally::default();
        for h in self.handles {
            let t = h.join().expect("a bystander thread panicked");
            all.connections += t.connections;
            all.bytes += t.bytes;
            all.failures.extend(t.failures);
        }
        eprintln!(
            "{test}: bystanders: {} connections tried, {} lost or damaged, {:.1} MiB echoed intact",
            all.connections,
            all.failures.len(),
            all.bytes as f64 / MIB as f64
        );
        assert!(all.failures.is_empty(), "{test}: bystanders damaged:\n{}", all.failures.join("\n"));
        assert!(all.connections > 0 && all.bytes > 0);
        all
    }
}

fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> thread::JoinHandle<T> {
    thread::Builder::new().stack_size(STACK).spawn(f).unwrap()
}

fn long_bystander(addr: SocketAddr, seed: u64, stop: &AtomicBool, bytes: &AtomicU64) -> Tally {
    let mut t = Tally { connections: 1, ..Tally::default() };
    let mut p = match Pump::connect(addr, seed, false) {
        Ok(p) => p.paced(4 * MIB),
        Err(e) => {
            t.failures.push(format!("long bystander {seed}: connect: {e}"));
            return t;
        }
    };
    let mut stopping: Option<Instant> = None;
    let mut counted = 0;
    while !p.eof {
        if stopping.is_none() && stop.load(Ordering::SeqCst) {
            p.finish();
            stopping = Some(Instant::now());
        }
        if stopping.is_some_and(|s| s.elapsed() > Duration::from_secs(20)) {
            t.failures.push(format!("long bystander {seed}: no EOF 20 s after finishing ({} bytes)", p.received));
            return t;
        }
        match p.step() {
            Ok(true) => {}
            Ok(false) => p.wait(10),
            Err(e) => {
                t.failures.push(format!("long bystander {seed}: {e} after {} bytes sent", p.sent));
                return t;
            }
        }
        bytes.fetch_add(p.received - counted, Ordering::SeqCst);
        counted = p.received;
    }
    match p.intact() {
        Ok(()) => t.bytes = p.received,
        Err(e) => t.failures.push(format!("long bystander {seed}: {e}")),
    }
    t
}

fn short_bystander(addr: SocketAddr, seed: u64, stop: &AtomicBool, bytes: &AtomicU64, cycles: &AtomicU64) -> Tally {
    const SIZES: [u64; 6] = [1, 100, 4 * KIB, 64 * KIB + 3, 300 * KIB, MIB];
    let mut t = Tally::default();
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        let size = SIZES[i % SIZES.len()];
        t.connections += 1;
        let result = Pump::connect(addr, seed + i as u64, false).map_err(|e| format!("connect: {e}")).and_then(|p| {
            let mut p = p.limit(size);
            p.run(Instant::now() + Duration::from_secs(20))?;
            p.intact()?;
            Ok(p.received)
        });
        match result {
            Ok(n) => {
                t.bytes += n;
                bytes.fetch_add(n, Ordering::SeqCst);
                cycles.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => t.failures.push(format!("short bystander {seed}+{i} ({size} bytes): {e}")),
        }
        i += 1;
    }
    t
}

// ---------------------------------------------------------------------------------------------
// A backend the test can break.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    /// Echo every byte.
    Echo,
    /// Read (and discard) this many bytes, then never read again.
    StopReadingAfter(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndedBy {
    /// The peer (the proxy) closed: EOF.
    Eof,
    /// The peer reset the connection.
    Reset,
    /// `kill()`: this backend reset it.
    Killed,
    /// `release()`: this backend closed it.
    Released,
}

struct FaultState {
    tag: Option<u8>,
    behaviour: Behaviour,
    killed: AtomicBool,
    released: AtomicBool,
    accepted: AtomicUsize,
    active: AtomicUsize,
    max_active: AtomicUsize,
    bytes_in: AtomicU64,
    /// When each connection ended and how.
    ends: Mutex<Vec<(Instant, EndedBy)>>,
    listener: Mutex<Option<TcpListener>>,
}

struct FaultBackend {
    addr: SocketAddr,
    st: Arc<FaultState>,
}

impl FaultBackend {
    fn start(tag: Option<u8>, behaviour: Behaviour) -> FaultBackend {
        let listener = listen("127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let st = Arc::new(FaultState {
            tag,
            behaviour,
            killed: AtomicBool::new(false),
            released: AtomicBool::new(false),
            accepted: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            max_active: AtomicUsize::new(0),
            bytes_in: AtomicU64::new(0),
            ends: Mutex::new(Vec::new()),
            listener: Mutex::new(Some(listener.try_clone().unwrap())),
        });
        let s = st.clone();
        spawn(move || {
            for conn in listener.incoming() {
                if s.killed.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                s.accepted.fetch_add(1, Ordering::SeqCst);
                let now = s.active.fetch_add(1, Ordering::SeqCst) + 1;
                s.max_active.fetch_max(now, Ordering::SeqCst);
                let s = s.clone();
                spawn(move || {
                    let how = serve_fault(conn, &s);
                    s.ends.lock().unwrap().push((Instant::now(), how));
                    s.active.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        FaultBackend { addr, st }
    }

    /// Crashes the server: the listener closes (new connects are refused) and every open
    /// connection is reset.
    fn kill(&self) {
        self.st.killed.store(true, Ordering::SeqCst);
        if let Some(l) = self.st.listener.lock().unwrap().take() {
            // shutdown() on a listening socket wakes the blocked accept() and unlistens it.
            socket2::SockRef::from(&l).shutdown(Shutdown::Read).unwrap();
        }
    }

    /// Closes every connection normally.
    fn release(&self) {
        self.st.released.store(true, Ordering::SeqCst);
    }

    fn accepted(&self) -> usize {
        self.st.accepted.load(Ordering::SeqCst)
    }

    fn active(&self) -> usize {
        self.st.active.load(Ordering::SeqCst)
    }

    fn ends(&self) -> Vec<(Instant, EndedBy)> {
        self.st.ends.lock().unwrap().clone()
    }
}

fn serve_fault(mut conn: TcpStream, st: &FaultState) -> EndedBy {
    conn.set_read_timeout(Some(TICK)).unwrap();
    conn.set_write_timeout(Some(TICK)).unwrap();
    let how = serve_fault_loop(&mut conn, st);
    match how {
        EndedBy::Killed => reset_stream(conn),
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

// ---------------------------------------------------------------------------------------------
// Engine set-up and the checks every test ends with.

/// An engine with frontend `by` (bystanders, to an echo server) and frontend `fe` (the fault)
/// whose backend section is `fe_backend` (YAML, indented as an item of `backends:`).
fn engine_with(defaults: &str, fe_extra: &str, fe_backend: &str, echo: SocketAddr) -> Engine {
    engine(&format!(
        "global: {{ workers: 2 }}\n{defaults}\
         frontends:\n\
         \x20 - {{ name: by, bind: \"127.0.0.1:0\", backend: by }}\n\
         \x20 - {{ name: fe, bind: \"127.0.0.1:0\", backend: be{fe_extra} }}\n\
         backends:\n\
         \x20 - {{ name: by, servers: [{{ name: echo, address: \"{echo}\" }}] }}\n\
         {fe_backend}"
    ))
}

/// Several echo exchanges on each frontend listed: the engine still serves.
/// `(frontend, whether its server sends a tag byte first)`.
fn still_serves(engine: &Engine, frontends: &[(&str, bool)]) {
    for &(fe, tagged) in frontends {
        for i in 0..5u64 {
            let mut p = Pump::connect(addr(engine, fe), 9_000_000 + i, tagged).unwrap().limit(32 * KIB + i);
            p.run(Instant::now() + Duration::from_secs(10)).unwrap_or_else(|e| panic!("frontend {fe}: {e}"));
            p.intact().unwrap_or_else(|e| panic!("frontend {fe}: {e}"));
        }
    }
}

/// Nothing left behind: no connection in the engine, no pipe lent, no open socket on the ports.
fn assert_clean(engine: &Engine, ports: &[u16]) {
    wait_until("the engine to hold no connection", Duration::from_secs(10), || {
        let s = engine.stats();
        s.total(|w| w.active) == 0 && s.total(|w| w.parked) == 0 && s.total(|w| w.queued) == 0
    });
    for &port in ports {
        wait_until(&format!("no open socket on port {port}"), Duration::from_secs(5), || {
            open_sockets_on_port(port).is_empty()
        });
    }
    wait_until("every pipe back in the pool", Duration::from_secs(5), || engine.stats().total(|w| w.pipes_in_use) == 0);
    let s = engine.stats();
    assert_eq!(s.total(|w| w.accepted), s.total(|w| w.closed), "every accepted connection was closed");
}

/// A client connection of the faulty frontend, run on its own thread until told to stop or cut.
struct Victim {
    stop: Arc<AtomicBool>,
    /// Set once it has its tag (if any) and 256 KiB of echo back.
    ready: Arc<AtomicBool>,
    handle: thread::JoinHandle<VictimEnd>,
}

#[derive(Debug)]
struct VictimEnd {
    tag: Option<u8>,
    /// Ok: finished and intact. Err: the connection was cut (when, and what the client saw).
    cut: Option<(Instant, String)>,
    intact: Result<(), String>,
    sent: u64,
    received: u64,
}

impl Victim {
    fn start(addr: SocketAddr, seed: u64, tagged: bool, rate: u64) -> Victim {
        let stop = Arc::new(AtomicBool::new(false));
        let ready = Arc::new(AtomicBool::new(false));
        let (st, rd) = (stop.clone(), ready.clone());
        let handle = spawn(move || {
            let mut p = Pump::connect(addr, seed, tagged).expect("connect to the proxy").paced(rate);
            let mut stopping: Option<Instant> = None;
            loop {
                if !rd.load(Ordering::SeqCst) && p.received >= 256 * KIB && (!tagged || p.tag.is_some()) {
                    rd.store(true, Ordering::SeqCst);
                }
                if stopping.is_none() && st.load(Ordering::SeqCst) {
                    p.finish();
                    stopping = Some(Instant::now());
                }
                if stopping.is_some_and(|s| s.elapsed() > Duration::from_secs(20)) {
                    let intact = Err("no EOF 20 s after finishing".to_owned());
                    return VictimEnd { tag: p.tag, cut: None, intact, sent: p.sent, received: p.received };
                }
                let stepped = p.step();
                if let Err(e) = stepped {
                    return VictimEnd {
                        tag: p.tag,
                        cut: Some((Instant::now(), format!("{:?}", e.kind()))),
                        intact: p.prefix_intact(),
                        sent: p.sent,
                        received: p.received,
                    };
                }
                if p.eof && p.shut {
                    return VictimEnd { tag: p.tag, cut: None, intact: p.intact(), sent: p.sent, received: p.received };
                }
                if p.eof {
                    // EOF before we finished: the connection was closed under us.
                    return VictimEnd {
                        tag: p.tag,
                        cut: Some((Instant::now(), "EOF".into())),
                        intact: p.prefix_intact(),
                        sent: p.sent,
                        received: p.received,
                    };
                }
                if stepped.is_ok_and(|moved| !moved) {
                    p.wait(10);
                }
            }
        });
        Victim { stop, ready, handle }
    }
}

/// Connects through `fe`, reads the server's tag, echoes `len` bytes; returns the tag.
fn tagged_exchange(proxy: SocketAddr, seed: u64, len: u64) -> Result<u8, String> {
    let mut p = Pump::connect(proxy, seed, true).map_err(|e| format!("connect: {e}"))?.limit(len);
    p.run(Instant::now() + Duration::from_secs(20))?;
    p.intact()?;
    p.tag.ok_or_else(|| "no tag".to_owned())
}

// ---------------------------------------------------------------------------------------------
// The faults.

#[test]
fn backend_killed_mid_transfer() {
    const VICTIMS: u64 = 12;
    const AFTER: u64 = 20;
    let doomed = FaultBackend::start(Some(b'K'), Behaviour::Echo);
    let good = FaultBackend::start(Some(b'G'), Behaviour::Echo);
    let echo = Backend::start(Mode::Echo);
    let engine = engine_with(
        "",
        "",
        &format!(
            "  - {{ name: be, balance: roundrobin, servers: [{{ name: doomed, address: \"{}\" }}, {{ name: good, address: \"{}\" }}] }}\n",
            doomed.addr, good.addr
        ),
        echo.addr,
    );
    let (by, fe) = (addr(&engine, "by"), addr(&engine, "fe"));
    let bystanders = Bystanders::start(by, 4, 3);
    let victims: Vec<Victim> = (0..VICTIMS).map(|i| Victim::start(fe, 100 + i, true, 2 * MIB)).collect();
    wait_until("every connection of `fe` to stream both ways", Duration::from_secs(20), || {
        victims.iter().all(|v| v.ready.load(Ordering::SeqCst))
    });
    assert!(doomed.accepted() >= 1 && good.accepted() >= 1, "round robin put connections on both servers");
    let on_doomed = doomed.active();
    bystanders.wait_progress("the bystanders to stream before the kill", MIB, 2);

    let killed_at = Instant::now();
    doomed.kill();
    let refused = TcpStream::connect_timeout(&doomed.addr, Duration::from_secs(2));
    assert!(
        refused.as_ref().is_err_and(|e| e.kind() == ErrorKind::ConnectionRefused),
        "the killed server refuses connections: {refused:?}"
    );
    // New connections while the killed server's clients are being cut: all reach the good one.
    let before = bystanders.progress();
    let mut tags = Vec::new();
    for i in 0..AFTER {
        tags.push(tagged_exchange(fe, 500 + i, 64 * KIB + i).unwrap_or_else(|e| panic!("new connection {i}: {e}")));
    }
    assert!(tags.iter().all(|&t| t == b'G'), "every new connection went to the good server: {tags:?}");
    bystanders.wait_progress("the bystanders to keep streaming after the kill", MIB, 2);
    let after = bystanders.progress();

    // Finish the survivors, then look at everyone.
    for v in &victims {
        v.stop.store(true, Ordering::SeqCst);
    }
    let ends: Vec<VictimEnd> = victims.into_iter().map(|v| v.handle.join().unwrap()).collect();
    let (mut cut, mut survived, mut by_reset, mut got_before_cut) = (0, 0, 0, 0);
    for (i, e) in ends.iter().enumerate() {
        match e.tag {
            Some(b'K') => {
                let (at, how) = e.cut.as_ref().unwrap_or_else(|| panic!("victim {i} on the killed server was not cut"));
                let after_kill = at.saturating_duration_since(killed_at);
                assert!(after_kill < Duration::from_secs(2), "victim {i} noticed the kill only after {after_kill:?}");
                assert!(how == "ConnectionReset" || how == "EOF", "victim {i} saw {how}");
                e.intact.as_ref().unwrap_or_else(|err| panic!("victim {i}: what it got before the cut: {err}"));
                by_reset += (how == "ConnectionReset") as u64;
                got_before_cut += e.received;
                cut += 1;
            }
            Some(b'G') => {
                assert!(e.cut.is_none(), "victim {i} on the good server was cut: {:?}", e.cut);
                e.intact.as_ref().unwrap_or_else(|err| panic!("victim {i} on the good server: {err}"));
                assert_eq!(e.sent, e.received);
                survived += 1;
            }
            other => panic!("victim {i}: unexpected tag {other:?}"),
        }
    }
    assert_eq!(cut, on_doomed as u64, "every connection of the killed server was cut");
    let bystanders = bystanders.finish("backend killed");
    let s = engine.stats();
    assert_eq!(s.total(|w| w.resets_from_server), cut, "each cut connection counted as a server reset");
    assert!(s.total(|w| w.connect_errors.refused) >= 1, "connects to the killed server were refused");
    assert_eq!(s.total(|w| w.retries), s.total(|w| w.connect_errors.total()), "every refused connect was retried");
    assert_eq!(s.total(|w| w.failed), 0, "no client failed");
    eprintln!(
        "backend killed: {cut} clients of the killed server cut ({by_reset} saw a reset, {} an EOF; {:.1} MiB received \
         before the cut, all intact), {survived} on the good server intact, {AFTER}/{AFTER} new connections served by the good server ({} connects refused and \
         retried), bystanders moved {:.1} MiB and {} connections between the kill and the end of the new ones",
        cut - by_reset,
        got_before_cut as f64 / MIB as f64,
        s.total(|w| w.connect_errors.refused),
        (after.0 - before.0) as f64 / MIB as f64,
        after.1 - before.1
    );
    assert!(bystanders.connections >= 4);
    still_serves(&engine, &[("by", false), ("fe", true)]);
    assert_clean(&engine, &[by.port(), fe.port()]);
}

/// The most a kernel socket buffer may hold here: the third field of tcp_rmem / tcp_wmem.
fn tcp_buffer_max(which: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/sys/net/ipv4/{which}")).unwrap();
    text.split_whitespace().nth(2).unwrap().parse().unwrap()
}

#[test]
fn backend_that_stops_reading() {
    const STUCK: u64 = 4;
    const PIPE: u64 = 256 * KIB;
    let stuck = FaultBackend::start(None, Behaviour::StopReadingAfter(MIB));
    let echo = Backend::start(Mode::Echo);
    // The stuck flows stop both timers; the server timeout is the shorter, so it closes them.
    let engine = engine_with(
        "defaults: { timeout: { client: 30s } }\n",
        "",
        &format!(
            "  - {{ name: be, timeout: {{ server: 4s }}, servers: [{{ name: stuck, address: \"{}\" }}] }}\n",
            stuck.addr
        ),
        echo.addr,
    );
    // What a client can push into a path whose end reads nothing, if the proxy adds only its pipe:
    // its own send buffer, the proxy's receive buffer, one pipe, the proxy's send buffer, the
    // server's receive buffer, and the 1 MiB the server read.
    let (rmem, wmem) = (tcp_buffer_max("tcp_rmem"), tcp_buffer_max("tcp_wmem"));
    let bound = 2 * (rmem + wmem) + PIPE + MIB;
    let (by, fe) = (addr(&engine, "by"), addr(&engine, "fe"));
    let stalled = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..STUCK)
        .map(|i| {
            let stalled = stalled.clone();
            spawn(move || {
                // Push as fast as the path takes it; "stalled" once nothing moved for 1 s.
                let mut p = Pump::connect(fe, 300 + i, false).unwrap();
                let mut last_move = Instant::now();
                let mut stalled_at: Option<Instant> = None;
                loop {
                    let how = match p.step() {
                        Ok(true) if p.eof => "EOF".to_owned(),
                        Ok(true) => {
                            last_move = Instant::now();
                            String::new()
                        }
                        Ok(false) => {
                            p.wait(20);
                            String::new()
                        }
                        Err(e) => format!("{:?}", e.kind()),
                    };
                    if !how.is_empty() {
                        return (p.sent, stalled_at.map(|t| t.elapsed()), how);
                    }
                    if stalled_at.is_none() && last_move.elapsed() > Duration::from_secs(1) {
                        stalled_at = Some(Instant::now());
                        stalled.fetch_add(1, Ordering::SeqCst);
                    }
                    assert!(p.sent <= bound, "client {i} pushed {} bytes into a stuck path (bound {bound})", p.sent);
                }
            })
        })
        .collect();
    wait_until("every client toward the stuck server to stall", Duration::from_secs(20), || {
        stalled.load(Ordering::SeqCst) == STUCK as usize
    });
    // Bounded: one pipe per stuck flow at most, and nothing moves any more.
    let s1 = engine.stats();
    let pipes_stalled = s1.total(|w| w.pipes_in_use);
    assert!(pipes_stalled <= STUCK, "pipes lent: {pipes_stalled}");
    assert_eq!(stuck.st.bytes_in.load(Ordering::SeqCst), STUCK * MIB, "the server read 1 MiB each, then stopped");
    thread::sleep(Duration::from_millis(300));
    let s2 = engine.stats();
    assert_eq!(
        s1.total(|w| w.bytes_client_to_server),
        s2.total(|w| w.bytes_client_to_server),
        "the proxy moves nothing toward a server that reads nothing"
    );
    let forwarded = s2.total(|w| w.bytes_client_to_server);
    // Others are unaffected meanwhile.
    let bystanders = Bystanders::start(by, 3, 3);
    bystanders.wait_progress("the bystanders to stream past the stuck connections", 4 * MIB, 8);
    let pipes_during = engine.stats().total(|w| w.pipes_in_use);
    let bystanders = bystanders.finish("backend stops reading");
    let pipes_after = engine.stats().total(|w| w.pipes_in_use);
    assert!(pipes_after <= STUCK, "pipes lent with only the stuck flows left: {pipes_after}");
    // The server timeout frees them; each client learns it.
    let ends: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    for (i, (pushed, waited, how)) in ends.iter().enumerate() {
        assert!(*pushed <= bound, "client {i} pushed {pushed} bytes into a stuck path (bound {bound})");
        let waited = waited.unwrap_or_else(|| panic!("client {i} ended ({how}) before it stalled"));
        assert!(waited < Duration::from_secs(4 + 3), "client {i} closed {waited:?} after stalling");
        assert!(how == "EOF" || how == "ConnectionReset" || how == "BrokenPipe", "client {i} saw {how}");
    }
    let s = engine.stats();
    assert_eq!(s.total(|w| w.timeouts.server), STUCK, "the server timeout closed the stuck connections");
    assert_eq!(s.total(|w| w.timeouts.client), 0);
    stuck.release();
    wait_until("the stuck server to close", Duration::from_secs(5), || stuck.active() == 0);
    let most = ends.iter().map(|e| e.0).max().unwrap();
    eprintln!(
        "backend stops reading: {STUCK} clients stalled after pushing at most {:.1} MiB each (bound from kernel \
         buffers + one pipe: {:.1} MiB); the proxy forwarded {:.1} MiB in all and the server read {STUCK} MiB; pipes \
         lent {pipes_stalled} while stalled, {pipes_during} with bystanders running, {pipes_after} after; all closed by \
         the server timeout ({:?})",
        most as f64 / MIB as f64,
        bound as f64 / MIB as f64,
        forwarded as f64 / MIB as f64,
        ends.iter().map(|e| e.2.as_str()).collect::<Vec<_>>()
    );
    assert!(bystanders.connections >= 8);
    still_serves(&engine, &[("by", false)]);
    assert_clean(&engine, &[by.port(), fe.port(), stuck.addr.port()]);
}

/// A listener whose accept queue is full, so further SYNs are dropped and connects hang.
fn blackhole() -> (socket2::Socket, Vec<socket2::Socket>, SocketAddr) {
    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    l.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
    l.listen(0).unwrap();
    let addr = l.local_addr().unwrap().as_socket().unwrap();
    let fillers: Vec<socket2::Socket> = (0..2)
        .map(|_| {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_nonblocking(true).unwrap();
            let _ = s.connect(&addr.into());
            s
        })
        .collect();
    // The first filler completes its handshake and fills the accept queue.
    wait_until("the black hole's accept queue to fill", Duration::from_secs(2), || {
        sockets_on_port(addr.port()).iter().any(|(l, _, st)| l.port() == addr.port() && *st == "ESTAB")
    });
    (l, fillers, addr)
}

#[test]
fn backend_that_never_answers_syn() {
    const CLIENTS: u64 = 20;
    let (_hole_listener, _fillers, hole) = blackhole();
    let good = FaultBackend::start(Some(b'G'), Behaviour::Echo);
    let echo = Backend::start(Mode::Echo);
    let engine = engine_with(
        "",
        "",
        &format!(
            "  - {{ name: be, balance: roundrobin, retries: 3, timeout: {{ connect: 300ms }}, servers: [{{ name: hole, address: \"{hole}\" }}, {{ name: good, address: \"{}\" }}] }}\n",
            good.addr
        ),
        echo.addr,
    );
    let (by, fe) = (addr(&engine, "by"), addr(&engine, "fe"));
    let bystanders = Bystanders::start(by, 4, 3);
    bystanders.wait_progress("the bystanders to stream", MIB, 2);
    let before = bystanders.progress();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            spawn(move || {
                let t = Instant::now();
                let tag = tagged_exchange(fe, 700 + i, 128 * KIB + i);
                (tag, t.elapsed())
            })
        })
        .collect();
    let results: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let after = bystanders.progress();
    let mut slow = 0;
    for (i, (tag, took)) in results.iter().enumerate() {
        let tag = tag.as_ref().unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert_eq!(*tag, b'G', "client {i} was served by the good server");
        assert!(*took < Duration::from_secs(3), "client {i} took {took:?}");
        slow += (*took >= Duration::from_millis(290)) as u64;
    }
    let s = engine.stats();
    let timeouts = s.total(|w| w.connect_errors.timeout);
    assert!(timeouts >= 1, "some connects went to the black hole first");
    assert_eq!(s.total(|w| w.connect_errors.total()), timeouts, "no other connect error");
    assert_eq!(s.total(|w| w.retries), timeouts, "each timed-out connect was retried");
    assert_eq!(s.total(|w| w.failed), 0, "no client failed");
    assert!(slow >= timeouts, "{slow} clients waited the connect timeout, {timeouts} connects timed out");
    let bystanders = bystanders.finish("backend never answers SYN");
    eprintln!(
        "backend never answers SYN: {CLIENTS}/{CLIENTS} clients served by the good server, {timeouts} after a connect \
         timeout and a retry (slowest {:?}); bystanders moved {:.1} MiB and {} connections meanwhile",
        results.iter().map(|r| r.1).max().unwrap(),
        (after.0 - before.0) as f64 / MIB as f64,
        after.1 - before.1
    );
    assert!(bystanders.connections >= 4);
    still_serves(&engine, &[("by", false), ("fe", true)]);
    assert_clean(&engine, &[by.port(), fe.port(), good.addr.port()]);
}

#[test]
fn idle_clients_are_freed_by_the_client_timeout() {
    const IDLE: u64 = 40;
    let server = FaultBackend::start(None, Behaviour::Echo);
    let echo = Backend::start(Mode::Echo);
    // `fe` admits exactly IDLE clients: if the idle ones were not freed, nobody else would get in.
    let engine = engine_with(
        "",
        &format!(", maxconn: {IDLE}, timeout: {{ client: 500ms }}"),
        &format!("  - {{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}\n", server.addr),
        echo.addr,
    );
    let (by, fe) = (addr(&engine, "by"), addr(&engine, "fe"));
    let bystanders = Bystanders::start(by, 4, 3);
    let idle: Vec<_> = (0..IDLE)
        .map(|_| {
            spawn(move || {
                let t = Instant::now();
                let mut c = connect(fe);
                let (got, err) = read_to_end(&mut c);
                (got.len(), err.map(|e| e.kind()), t.elapsed())
            })
        })
        .collect();
    let results: Vec<_> = idle.into_iter().map(|h| h.join().unwrap()).collect();
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
    let workers: Vec<_> = (0..IDLE)
        .map(|i| {
            spawn(move || {
                let mut p = Pump::connect(fe, 800 + i, false).unwrap().limit(100 * KIB + i);
                p.run(Instant::now() + Duration::from_secs(20)).and_then(|_| p.intact())
            })
        })
        .collect();
    for (i, w) in workers.into_iter().enumerate() {
        w.join().unwrap().unwrap_or_else(|e| panic!("client {i} after the idle ones: {e}"));
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
    still_serves(&engine, &[("by", false), ("fe", false)]);
    assert_clean(&engine, &[by.port(), fe.port(), server.addr.port()]);
}

#[test]
fn clients_reset_mid_transfer() {
    const RESETTERS: u64 = 10;
    const SURVIVORS: u64 = 4;
    let server = FaultBackend::start(None, Behaviour::Echo);
    let echo = Backend::start(Mode::Echo);
    let engine = engine_with(
        "",
        "",
        &format!("  - {{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}\n", server.addr),
        echo.addr,
    );
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
        reset_stream(p.s);
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
    still_serves(&engine, &[("by", false), ("fe", false)]);
    assert_clean(&engine, &[by.port(), fe.port(), server.addr.port()]);
}
