//! Outgoing connections: which (source, target) pair a connection uses, how
//! its socket is prepared (TCP_NODELAY, `IP_BIND_ADDRESS_NO_PORT` + bind to
//! the source address so the port is chosen at connect time per 4-tuple),
//! the connect SQE pair (connect linked to a timeout) and ramp pacing.
//!
//! Invariants: connection `n` of a process uses pair `n mod (S×T)` (target
//! `pair mod T`, source `pair div T`), so connections are spread evenly over
//! every source × target pair; the sockaddrs handed to the kernel live in
//! [`Endpoints`], which every worker keeps alive and unmodified until its
//! ring has no operation in flight.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types};
use socket2::SockAddr;

use crate::ring::{Op, Ring, Tag};

/// Targets and this process's source addresses.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub targets: Vec<SocketAddr>,
    pub target_addrs: Vec<SockAddr>,
    pub sources: Vec<IpAddr>,
}

impl Endpoints {
    pub fn new(targets: Vec<SocketAddr>, sources: Vec<IpAddr>) -> Endpoints {
        let target_addrs = targets.iter().map(|t| SockAddr::from(*t)).collect();
        Endpoints { targets, target_addrs, sources }
    }

    /// `(source, target index)` for a process-local connection number.
    pub fn pick(&self, n: u64) -> (Option<IpAddr>, usize) {
        let t = self.targets.len().max(1) as u64;
        let s = self.sources.len() as u64;
        if s == 0 {
            return (None, (n % t) as usize);
        }
        let pair = n % (s * t);
        (Some(self.sources[(pair / t) as usize]), (pair % t) as usize)
    }
}

/// Create a TCP socket for `target`, bound to `source` (port chosen at
/// connect time). Returns the errno on failure.
pub fn open_socket(source: Option<IpAddr>, target: &SocketAddr) -> Result<OwnedFd, i32> {
    let domain = if target.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain syscall; the returned fd is owned right below.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(last_errno());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
    if let Some(src) = source {
        if src.is_ipv4() != target.is_ipv4() {
            return Err(libc::EAFNOSUPPORT);
        }
        set_int_opt(fd, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
        let sa = SockAddr::from(SocketAddr::new(src, 0));
        // SAFETY: `sa` is a valid sockaddr of `sa.len()` bytes for the call.
        let r = unsafe { libc::bind(fd, sa.as_ptr().cast(), sa.len()) };
        if r != 0 {
            return Err(last_errno());
        }
    }
    Ok(owned)
}

pub fn set_int_opt(fd: RawFd, level: i32, name: i32, value: i32) -> Result<(), i32> {
    // SAFETY: passes a pointer to a local i32 and its size.
    let r = unsafe {
        libc::setsockopt(fd, level, name, (&value as *const i32).cast(), std::mem::size_of::<i32>() as libc::socklen_t)
    };
    if r != 0 { Err(last_errno()) } else { Ok(()) }
}

pub fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// Queue a connect of `fd` to `addr` linked to a timeout of `timeout`.
/// Both completions carry `slot`/`generation`; the timeout's is
/// [`Op::ConnectTimeout`] and should be ignored. A connect cut short by the
/// timeout completes with `-ECANCELED`.
///
/// # Safety
/// `addr` and `timeout` must stay alive and unmodified until both
/// completions are reaped, and `fd` must stay open until the connect
/// completion is reaped.
pub unsafe fn push_connect(
    ring: &mut Ring,
    fd: &OwnedFd,
    addr: &SockAddr,
    timeout: &types::Timespec,
    slot: u32,
    generation: u32,
) -> std::io::Result<()> {
    let connect = opcode::Connect::new(types::Fd(fd.as_raw_fd()), addr.as_ptr().cast(), addr.len())
        .build()
        .flags(squeue::Flags::IO_LINK)
        .user_data(Tag::new(slot, generation, Op::Connect).encode());
    let link =
        opcode::LinkTimeout::new(timeout).build().user_data(Tag::new(slot, generation, Op::ConnectTimeout).encode());
    // SAFETY: forwarded from this function's contract.
    unsafe { ring.push_pair(&connect, &link) }
}

/// Paces connection attempts at `rate` per second (unlimited if `rate` is
/// infinite or zero).
#[derive(Clone, Debug)]
pub struct Pacer {
    rate: f64,
    start: Instant,
    issued: u64,
}

impl Pacer {
    pub fn new(rate: f64, start: Instant) -> Pacer {
        Pacer { rate, start, issued: 0 }
    }

    /// How many more attempts may start now (at most `cap`).
    pub fn allowance(&mut self, now: Instant, cap: u64) -> u64 {
        if !(self.rate.is_finite() && self.rate > 0.0) {
            self.issued += cap;
            return cap;
        }
        let elapsed = now.saturating_duration_since(self.start).as_secs_f64();
        let due = (elapsed * self.rate).floor() as u64 + 1;
        let n = due.saturating_sub(self.issued).min(cap);
        self.issued += n;
        n
    }

    /// Time until the next attempt is allowed.
    pub fn next_in(&self, now: Instant) -> Duration {
        if !(self.rate.is_finite() && self.rate > 0.0) {
            return Duration::ZERO;
        }
        let at = self.start + Duration::from_secs_f64(self.issued as f64 / self.rate);
        at.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_spread_evenly() {
        let e = Endpoints::new(
            vec!["127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap()],
            vec!["127.0.1.1".parse().unwrap(), "127.0.1.2".parse().unwrap(), "127.0.1.3".parse().unwrap()],
        );
        let mut counts = std::collections::HashMap::new();
        for n in 0..600 {
            *counts.entry(e.pick(n)).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 6);
        assert!(counts.values().all(|&c| c == 100));
    }

    #[test]
    fn pacer_limits_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1000.0, t0);
        assert_eq!(p.allowance(t0, 10_000), 1);
        assert_eq!(p.allowance(t0 + Duration::from_millis(100), 10_000), 100);
        assert_eq!(p.allowance(t0 + Duration::from_millis(100), 10_000), 0);
        let mut u = Pacer::new(f64::INFINITY, t0);
        assert_eq!(u.allowance(t0, 7), 7);
    }
}
