//! Checksummed client streams: [`Stream`], a deterministic byte stream, and [`Pump`], a client
//! connection that sends one through an echo path and checks what comes back, byte for byte as it
//! arrives and by SHA-256 at the end.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::BLOCK;

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

/// A nonblocking client connection that sends stream `seed` and checks that what comes back is
/// exactly that stream (byte for byte as it arrives, and SHA-256 of each side at the end).
pub struct Pump {
    pub s: TcpStream,
    seed: u64,
    tx: Stream,
    out: Vec<u8>,
    out_off: usize,
    pub sent: u64,
    tx_hash: Sha256,
    /// Stop sending (and half-close) once this many bytes are sent; `None`: until `finish()`.
    limit: Option<u64>,
    pub shut: bool,
    /// Bytes per second, counted from `started`; `None`: as fast as the path takes them.
    pace: Option<u64>,
    started: Instant,
    /// The backend writes one tag byte first (which server this is).
    tagged: bool,
    pub tag: Option<u8>,
    rx: Stream,
    expect: Vec<u8>,
    exp_off: usize,
    pub received: u64,
    rx_hash: Sha256,
    /// First byte (offset) that differed from what was sent.
    corrupt_at: Option<u64>,
    pub eof: bool,
    buf: Vec<u8>,
}

impl Pump {
    pub fn connect(addr: SocketAddr, seed: u64, tagged: bool) -> std::io::Result<Pump> {
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

    pub fn limit(mut self, bytes: u64) -> Pump {
        self.limit = Some(bytes);
        self
    }

    pub fn paced(mut self, bytes_per_s: u64) -> Pump {
        self.pace = Some(bytes_per_s);
        self
    }

    /// Sends what is pending, then half-closes.
    pub fn finish(&mut self) {
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
    pub fn step(&mut self) -> std::io::Result<bool> {
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
    pub fn wait(&self, ms: i32) {
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
    pub fn run(&mut self, deadline: Instant) -> Result<(), String> {
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
    pub fn intact(&self) -> Result<(), String> {
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
    pub fn prefix_intact(&self) -> Result<(), String> {
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

/// One round of every pump not at its echo's EOF; if none moved, waits (5 ms at most) for one.
pub fn step_all(pumps: &mut [Pump]) {
    let mut moved = false;
    for p in pumps.iter_mut().filter(|p| !p.eof) {
        moved |= p.step().unwrap();
    }
    if !moved && let Some(p) = pumps.iter().find(|p| !p.eof) {
        p.wait(5);
    }
}

/// Runs `pumps` at once until every one has its echo's EOF (within `limit`), calling `tick`
/// between rounds (to sample the engine meanwhile); then checks that each came back intact.
pub fn run_all(pumps: &mut [Pump], limit: Duration, mut tick: impl FnMut()) {
    let deadline = Instant::now() + limit;
    while pumps.iter().any(|p| !p.eof) {
        assert!(
            Instant::now() < deadline,
            "stalled (sent, received): {:?}",
            pumps.iter().map(|p| (p.sent, p.received)).collect::<Vec<_>>()
        );
        tick();
        step_all(pumps);
    }
    for (i, p) in pumps.iter().enumerate() {
        p.intact().unwrap_or_else(|e| panic!("stream {i}: {e}"));
    }
}
