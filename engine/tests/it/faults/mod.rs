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
//! back intact and be counted. Afterwards the engine must still serve and end clean
//! ([`assert_clean`](crate::common::assert_clean)).
//!
//! This module holds the harness (bystanders, victims); the faults are in `servers` (a backend
//! misbehaves) and `clients` (clients misbehave).

mod clients;
mod servers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::*;

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
// The engine, and the connections of the faulty frontend.

/// A fault test's engine (2 workers): frontend `by`, where the bystanders stream to an echo server
/// of their own (returned too), and frontend `fe`, where the fault happens, whose backend section is
/// `fe_backend` (YAML, indented as an item of `backends:`).
fn engine_with(defaults: &str, fe_extra: &str, fe_backend: &str) -> (TestEngine, Backend) {
    let echo = Backend::start(Mode::Echo);
    let engine = engine(&format!(
        "global: {{ workers: 2 }}\n{defaults}\
         frontends:\n\
         \x20 - {{ name: by, bind: \"127.0.0.1:0\", backend: by }}\n\
         \x20 - {{ name: fe, bind: \"127.0.0.1:0\", backend: be{fe_extra} }}\n\
         backends:\n\
         \x20 - {{ name: by, servers: [{{ name: echo, address: \"{}\" }}] }}\n\
         {fe_backend}",
        echo.addr
    ));
    (engine, echo)
}

/// How every fault test ends: the engine still serves `frontends` (`(name, whether its server
/// sends a tag byte first)`), then [`assert_clean`] with the fault's `servers` and the bystanders'.
fn still_serves_then_clean(engine: TestEngine, echo: Backend, frontends: &[(&str, bool)], servers: &[u16]) {
    still_serves(&engine, frontends);
    let ports: Vec<u16> = servers.iter().copied().chain([echo.addr.port()]).collect();
    assert_clean(engine, &ports);
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

/// The most a kernel socket buffer may hold here: the third field of tcp_rmem / tcp_wmem.
fn tcp_buffer_max(which: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/sys/net/ipv4/{which}")).unwrap();
    text.split_whitespace().nth(2).unwrap().parse().unwrap()
}
