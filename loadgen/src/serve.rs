//! `ringload serve`: fast test backends. `echo` sends back every byte,
//! `sink` discards, `source` streams a constant pattern out as fast as the
//! peer reads (and discards anything the peer sends, so `throughput
//! --direction both` works against it).
//!
//! One thread per `--workers`, each with its own io_uring and its own
//! SO_REUSEPORT listener per `--listen` address, accepting with multishot
//! accept into io_uring direct descriptors: accepted sockets live in the
//! ring's registered file table (RLIMIT_NOFILE slots per worker) and use no
//! entry of the process fd table, so a serve process holds up to
//! workers × RLIMIT_NOFILE connections.
//!
//! Invariants: slot `i` is direct descriptor `i`; a slot's generation is
//! bumped on every accept into it, so completions of a previous connection
//! in the same slot are ignored. Echo keeps one operation in flight per
//! connection on its own buffer, which is only resized or reused when that
//! operation has completed; sink and source use per-worker buffers. All of
//! it (and the listeners) is owned with the ring ([`ring::Owned`]) and freed
//! only once nothing is in flight, on every return path.
//! `--corrupt-every N` (test aid) flips one byte of the echo every N bytes
//! echoed by a worker. `--ready-file PATH` ([`crate::ready`]) says where
//! serve listens once every listener is bound.

use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use io_uring::{opcode, types};
use socket2::{Domain, Socket, Type};

use crate::cli::{ServeArgs, ServeMode};
use crate::ready::{Ready, ReadyFile};
use crate::ring::{self, Completion, Op, Ring, Tag, next_generation};
use crate::stats::add_fields;

/// An echo connection's first buffer: enough for a heartbeat or a small request; it doubles each
/// time a receive fills it, up to [`ECHO_BUF_MAX`]. At a million held connections this buffer is
/// most of serve's memory (4 KiB each was 4.1 GB; 256 B is 0.3 GB).
const ECHO_BUF_START: usize = 256;
const ECHO_BUF_MAX: usize = 64 * 1024;
const SHARED_BUF: usize = 256 * 1024;

pub fn main(args: &ServeArgs, nofile: u64) -> Result<u8> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = args.workers.unwrap_or(cpus).clamp(1, 256);
    if args.corrupt_every == Some(0) {
        anyhow::bail!("--corrupt-every must be at least 1");
    }
    if args.corrupt_every.is_some() && args.mode != ServeMode::Echo {
        anyhow::bail!("--corrupt-every only applies to --mode echo");
    }
    // Listeners: the first per address resolves port 0; the others bind the
    // resolved address with SO_REUSEPORT so the kernel spreads connections.
    let mut per_worker: Vec<Vec<OwnedFd>> = (0..workers).map(|_| Vec::new()).collect();
    let mut out = std::io::stdout().lock();
    let mut all_bound = Vec::new();
    for addr in &args.listen {
        let first = listener(addr)?;
        let bound =
            first.local_addr().ok().and_then(|a| a.as_socket()).context("reading back the listening address")?;
        per_worker[0].push(first.into());
        for fds in per_worker.iter_mut().skip(1) {
            fds.push(listener(&bound)?.into());
        }
        writeln!(out, "listening on {bound}").context("writing to stdout")?;
        all_bound.push(bound);
    }
    writeln!(
        out,
        "mode {}, {workers} workers, up to {} connections each (direct descriptors)",
        format!("{:?}", args.mode).to_lowercase(),
        nofile.min(1 << 20)
    )
    .and_then(|_| out.flush())
    .context("writing to stdout")?;
    drop(out);
    // Removed when `main` returns.
    let _ready = match &args.ready_file {
        Some(path) => Some(ReadyFile::create(path, &Ready::serve(&all_bound))?),
        None => None,
    };
    let deadline = args.duration.map(|d| Instant::now() + d);
    let table = nofile.clamp(64, 1 << 20) as u32;
    let stats: Vec<Result<Stats>> = std::thread::scope(|scope| {
        let handles: Vec<_> = per_worker
            .into_iter()
            .enumerate()
            .map(|(w, fds)| {
                scope.spawn(move || {
                    let r = Worker::new(args, fds, table).and_then(|wk| wk.run(deadline));
                    if let Err(e) = &r {
                        eprintln!("ringload serve: worker {w} failed: {e:#}");
                        crate::stop::request();
                    }
                    r
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("worker panicked")))).collect()
    });
    let mut total = Stats::default();
    let mut failed = false;
    for s in stats {
        match s {
            Ok(s) => total.add(&s),
            Err(_) => failed = true,
        }
    }
    eprintln!(
        "ringload serve: {} connections accepted, {} bytes in, {} bytes out, {} accept errors, {} bytes corrupted on purpose",
        total.accepted, total.bytes_in, total.bytes_out, total.accept_errors, total.flips
    );
    Ok(if failed { 2 } else { 0 })
}

fn listener(addr: &SocketAddr) -> Result<Socket> {
    let s =
        Socket::new(Domain::for_address(*addr), Type::STREAM.cloexec(), None).context("creating a listening socket")?;
    s.set_reuse_address(true).context("SO_REUSEADDR")?;
    s.set_reuse_port(true).context("SO_REUSEPORT")?;
    s.bind(&(*addr).into()).with_context(|| {
        format!("cannot listen on {addr}: is the address local and the port free? (use port 0 to pick a free one)")
    })?;
    s.listen(4096).with_context(|| format!("listen() on {addr}"))?;
    Ok(s)
}

#[derive(Default, Clone, Copy)]
struct Stats {
    accepted: u64,
    bytes_in: u64,
    bytes_out: u64,
    accept_errors: u64,
    flips: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        add_fields!(self, o; accepted, bytes_in, bytes_out, accept_errors, flips);
    }
}

#[derive(Default)]
struct Slot {
    generation: u32,
    open: bool,
    /// Echo only: the connection's buffer, bytes held and bytes already sent back.
    buf: Vec<u8>,
    held: usize,
    sent: usize,
}

/// What the kernel may use while a worker's operations are in flight.
struct Held {
    /// One per direct descriptor; allocated once, never resized.
    slots: Vec<Slot>,
    /// sink and source: the discard buffer every receive writes into.
    scratch: Box<[u8]>,
    /// source: the read-only pattern every send reads.
    pattern: Box<[u8]>,
    listeners: Vec<OwnedFd>,
}

struct Worker {
    io: ring::Owned<Held>,
    rearm: Vec<Option<Instant>>,
    mode: ServeMode,
    corrupt_every: Option<u64>,
    echoed: u64,
    next_flip: u64,
    warned_full: bool,
    stats: Stats,
}

impl Worker {
    fn new(args: &ServeArgs, listeners: Vec<OwnedFd>, table: u32) -> Result<Worker> {
        let ring = Ring::new(4096).context("creating the io_uring for a serve worker")?;
        ring.register_sparse_files(table)
            .with_context(|| format!("registering {table} direct descriptors (RLIMIT_NOFILE too low?)"))?;
        let mut pattern = vec![0u8; SHARED_BUF].into_boxed_slice();
        for (i, b) in pattern.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let n = listeners.len();
        let held = Held {
            slots: (0..table).map(|_| Slot::default()).collect(),
            scratch: vec![0u8; SHARED_BUF].into_boxed_slice(),
            pattern,
            listeners,
        };
        Ok(Worker {
            io: ring::Owned::new(ring, held),
            rearm: vec![Some(Instant::now()); n],
            mode: args.mode,
            corrupt_every: args.corrupt_every,
            echoed: 0,
            next_flip: args.corrupt_every.unwrap_or(u64::MAX),
            warned_full: false,
            stats: Stats::default(),
        })
    }

    fn run(mut self, deadline: Option<Instant>) -> Result<Stats> {
        while !crate::stop::requested() && deadline.is_none_or(|d| Instant::now() < d) {
            let now = Instant::now();
            for i in 0..self.rearm.len() {
                if self.rearm[i].is_some_and(|t| t <= now) {
                    self.rearm[i] = None;
                    let (ring, held) = self.io.parts();
                    let e = opcode::AcceptMulti::new(types::Fd(held.listeners[i].as_raw_fd()))
                        .allocate_file_index(true)
                        .build()
                        .user_data(Tag::new(i as u32, 0, Op::Accept).encode());
                    // SAFETY: the listener fd lives in `held.listeners`, which
                    // `self.io` closes only once the ring is empty.
                    unsafe { ring.push(&e)? };
                }
            }
            let cs: Vec<Completion> = self.io.ring().wait(1, Duration::from_millis(100))?.to_vec();
            for c in cs {
                self.complete(c)?;
            }
        }
        // Dropping `self.io` cancels and drains what is in flight before the
        // buffers go (or leaks them if the kernel does not let go).
        Ok(self.stats)
    }

    fn complete(&mut self, c: Completion) -> Result<()> {
        if c.tag.op == Op::Accept {
            return self.on_accept(c);
        }
        let idx = c.tag.slot as usize;
        let Some(slot) = self.io.held().slots.get(idx) else {
            return Ok(());
        };
        if !slot.open || slot.generation != c.tag.generation {
            return Ok(()); // stale: a previous connection in this slot
        }
        match c.tag.op {
            Op::Recv if c.result > 0 => {
                self.stats.bytes_in += c.result as u64;
                if self.mode == ServeMode::Echo {
                    self.echo_received(idx, c.result as usize)
                } else {
                    self.push_recv(idx)
                }
            }
            Op::Send if c.result > 0 => {
                self.stats.bytes_out += c.result as u64;
                match self.mode {
                    ServeMode::Echo => {
                        let s = &mut self.io.held_mut().slots[idx];
                        s.sent += c.result as usize;
                        if s.sent < s.held {
                            return self.push_send(idx);
                        }
                        if s.held == s.buf.len() && s.buf.len() < ECHO_BUF_MAX {
                            let n = (s.buf.len() * 2).min(ECHO_BUF_MAX);
                            s.buf.resize(n, 0);
                        }
                        s.held = 0;
                        s.sent = 0;
                        self.push_recv(idx)
                    }
                    _ => self.push_send(idx),
                }
            }
            Op::Recv | Op::Send => self.close(idx),
            _ => Ok(()),
        }
    }

    fn on_accept(&mut self, c: Completion) -> Result<()> {
        let l = c.tag.slot as usize;
        if !c.more() && l < self.rearm.len() {
            // Multishot accept ended (error or kernel decision): re-arm soon.
            self.rearm[l] = Some(Instant::now() + Duration::from_millis(if c.result < 0 { 10 } else { 0 }));
        }
        if c.result < 0 {
            self.stats.accept_errors += 1;
            if c.result == -libc::ENFILE && !self.warned_full {
                self.warned_full = true;
                eprintln!(
                    "ringload serve: a worker's table of {} direct descriptors is full; new connections are refused. Start serve with more --workers.",
                    self.io.held().slots.len()
                );
            }
            return Ok(());
        }
        let idx = c.result as usize;
        let Some(s) = self.io.held_mut().slots.get_mut(idx) else {
            return Ok(());
        };
        s.generation = next_generation(s.generation);
        s.open = true;
        s.held = 0;
        s.sent = 0;
        self.stats.accepted += 1;
        match self.mode {
            ServeMode::Echo => {
                if s.buf.is_empty() {
                    s.buf = vec![0u8; ECHO_BUF_START];
                }
                self.push_recv(idx)
            }
            ServeMode::Sink => self.push_recv(idx),
            ServeMode::Source => {
                self.push_recv(idx)?;
                self.push_send(idx)
            }
        }
    }

    fn echo_received(&mut self, idx: usize, n: usize) -> Result<()> {
        let s = &mut self.io.held_mut().slots[idx];
        s.held = n;
        s.sent = 0;
        if let Some(every) = self.corrupt_every {
            let end = self.echoed + n as u64;
            while self.next_flip <= end {
                let off = (self.next_flip - self.echoed - 1) as usize;
                s.buf[off] ^= 0x5a;
                self.stats.flips += 1;
                self.next_flip += every;
            }
            self.echoed = end;
        }
        self.push_send(idx)
    }

    fn push_recv(&mut self, idx: usize) -> Result<()> {
        let (ring, held) = self.io.parts();
        let s = &mut held.slots[idx];
        let (ptr, len) = match self.mode {
            ServeMode::Echo => (s.buf.as_mut_ptr(), s.buf.len()),
            _ => (held.scratch.as_mut_ptr(), held.scratch.len()),
        };
        let e = opcode::Recv::new(types::Fixed(idx as u32), ptr, len as u32)
            .build()
            .user_data(Tag::new(idx as u32, s.generation, Op::Recv).encode());
        // SAFETY: the buffer is in `held`, which `self.io` frees only once
        // the ring is empty. echo: the slot's buffer is only touched again
        // (or resized) after this recv completes (one op in flight per echo
        // connection); sink/source: `scratch` is a discard buffer (concurrent
        // writes into it are harmless, nobody reads it). The direct
        // descriptor is the slot's until its close is queued, after this.
        unsafe { ring.push(&e)? };
        Ok(())
    }

    fn push_send(&mut self, idx: usize) -> Result<()> {
        let (ring, held) = self.io.parts();
        let s = &held.slots[idx];
        let (ptr, len) = match self.mode {
            ServeMode::Echo => (s.buf[s.sent..].as_ptr(), s.held - s.sent),
            _ => (held.pattern.as_ptr(), held.pattern.len()),
        };
        let e = opcode::Send::new(types::Fixed(idx as u32), ptr, len as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(Tag::new(idx as u32, s.generation, Op::Send).encode());
        // SAFETY: the bytes are in `held`, freed only once the ring is empty.
        // echo: they stay in the slot's buffer, untouched until this send
        // completes; source: `pattern` is never written.
        unsafe { ring.push(&e)? };
        Ok(())
    }

    fn close(&mut self, idx: usize) -> Result<()> {
        let (ring, held) = self.io.parts();
        let s = &mut held.slots[idx];
        s.open = false;
        let e = opcode::Close::new(types::Fixed(idx as u32))
            .build()
            .user_data(Tag::new(idx as u32, s.generation, Op::Close).encode());
        // SAFETY: closing a direct descriptor involves no user memory.
        unsafe { ring.push(&e)? };
        Ok(())
    }
}
