//! Listening sockets: one per bind address per worker, in one SO_REUSEPORT group, so the kernel
//! spreads incoming connections over the workers without a shared accept queue.
//!
//! All sockets are created and bound by the main thread before any worker starts, so a busy port
//! is reported before anything runs, and a `:0` bind (tests) resolves to one port that every
//! worker then binds too.
//!
//! The engine keeps a duplicate of every listening socket ([`ListenerGroup`]) so that a reload can
//! hand the *same* kernel sockets to the next engine: their accept queues are never closed, so no
//! SYN and no queued connection is lost while the old engine drains. Only addresses removed from the
//! configuration are closed, after the new engine is up.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use socket2::{Domain, Protocol, Socket, Type};

use crate::config::Config;
use crate::worker::Listener;

/// A bound frontend address, as the kernel resolved it (port 0 becomes the real port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bound {
    pub frontend: String,
    pub addr: SocketAddr,
}

/// The listening sockets of one configured bind address (one per worker), as duplicates kept by
/// the engine for a successor.
pub struct ListenerGroup {
    pub frontend: String,
    /// The address as configured (what a reloaded configuration is matched against; a `:0` bind
    /// matches only within the same frontend, and keeps its port).
    pub configured: SocketAddr,
    /// The address as bound.
    pub bound: SocketAddr,
    pub fds: Vec<OwnedFd>,
}

/// Why a frontend address could not be listened on.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The error is followed by its likely cause (port in use, address not local, port < 1024).
    #[error("frontend \"{frontend}\": cannot listen on {addr}: {}", explain(.source))]
    Listen { frontend: String, addr: SocketAddr, source: io::Error },
    #[error("frontend \"{frontend}\": cannot read the port bound for {addr}")]
    BoundPort { frontend: String, addr: SocketAddr },
}

/// What binding produces: each worker's listeners, the bound addresses, the groups kept for a
/// successor.
pub type BoundListeners = (Vec<Vec<Listener>>, Vec<Bound>, Vec<ListenerGroup>);

/// Binds every frontend address once per worker, reusing (duplicating) sockets from `inherit` (a
/// previous engine's groups) for addresses that are still configured; `inherit` itself is left as
/// it was, so a failed start changes nothing. Returns each worker's listeners, the bound addresses,
/// and the groups to keep for a successor.
pub fn bind_all(config: &Config, workers: usize, inherit: &[ListenerGroup]) -> Result<BoundListeners, ListenError> {
    let mut per_worker: Vec<Vec<Listener>> = (0..workers).map(|_| Vec::new()).collect();
    let mut bound = Vec::new();
    let mut groups = Vec::new();
    let client_opts = config.global.tune.client_sockopts();
    for (f, fe) in config.frontends.iter().enumerate() {
        for &want in &fe.binds {
            let fail = |source: io::Error| ListenError::Listen { frontend: fe.name.clone(), addr: want, source };
            let same = |g: &&ListenerGroup| g.configured == want && (want.port() != 0 || g.frontend == fe.name);
            let mut old = match inherit.iter().find(same) {
                Some(g) => g.fds.iter().map(|fd| fd.try_clone()).collect::<Result<Vec<_>, _>>().map_err(fail)?,
                None => Vec::new(),
            };
            old.reverse();
            let mut addr = want;
            let mut fds = Vec::with_capacity(workers);
            for list in per_worker.iter_mut() {
                let sock = match old.pop() {
                    Some(fd) => {
                        let sock = Socket::from(fd);
                        // Same kernel socket, possibly a new backlog.
                        sock.listen(fe.backlog.min(i32::MAX as u32) as i32).map_err(fail)?;
                        sock
                    }
                    None => listen(addr, fe.backlog).map_err(fail)?,
                };
                if addr.port() == 0 {
                    addr = (sock.local_addr().ok().and_then(|a| a.as_socket()))
                        .ok_or_else(|| ListenError::BoundPort { frontend: fe.name.clone(), addr: want })?;
                }
                // Set on every start (a reload may change it on an inherited socket): accepted
                // sockets inherit the listener's keepalive settings.
                set_keepalive(&sock, fe.tcp_keepalive).map_err(fail)?;
                // Likewise their buffer sizes (before the first SYN: the window scale a client is
                // offered follows the listener's receive buffer) and TCP_NOTSENT_LOWAT (0: the
                // sysctl's, for a reload that drops it). A buffer size is not undone when a reload
                // drops it: the kernel keeps one set until the socket closes (Supervisor::reload
                // says so).
                for &(level, name, value) in &client_opts {
                    crate::sys::set_int_option(&sock, level, name, value).map_err(fail)?;
                }
                if config.global.tune.notsent_lowat.is_none() {
                    crate::sys::set_int_option(&sock, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, 0).map_err(fail)?;
                }
                let fd = OwnedFd::from(sock);
                fds.push(fd.try_clone().map_err(fail)?);
                list.push(Listener { frontend: f, fd, ipv6: addr.is_ipv6(), addr });
            }
            // Copies of sockets a previous engine with more workers used are closed here; those
            // sockets close when that engine is drained.
            drop(old);
            // Per-source limits are counted by each worker on its own: every connection of one
            // source must reach the same worker's socket. (Set on every start: a reload may add,
            // change or remove them, or change the number of workers.)
            match (fe.per_source, fds.first()) {
                (Some(p), Some(first)) if workers > 1 => {
                    steer_by_source(first, p, workers, addr.is_ipv6()).map_err(fail)?
                }
                (_, Some(first)) => unsteer(first),
                _ => {}
            }
            bound.push(Bound { frontend: fe.name.clone(), addr });
            groups.push(ListenerGroup { frontend: fe.name.clone(), configured: want, bound: addr, fds });
        }
    }
    Ok((per_worker, bound, groups))
}

/// Classic BPF, as `SO_ATTACH_REUSEPORT_CBPF` takes it.
fn insn(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt: 0, jf: 0, k }
}

/// The program that picks a listening socket of the SO_REUSEPORT group from the client's source
/// address (its prefix), so that all connections of one source reach one worker: it loads the
/// source address from the IP header (relative to the network header: a SYN has no payload),
/// masks it to the prefix, hashes it and returns the hash modulo the number of workers — an index
/// into the group, whose first `workers` sockets are this engine's (a socket beyond them, of an
/// engine still draining after a reload with more workers, gets no new connection).
pub fn source_program(p: crate::config::PerSource, workers: usize, ipv6: bool) -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const AND_K: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
    const MUL_K: u16 = (libc::BPF_ALU | libc::BPF_MUL | libc::BPF_K) as u16;
    const XOR_X: u16 = (libc::BPF_ALU | libc::BPF_XOR | libc::BPF_X) as u16;
    const RSH_K: u16 = (libc::BPF_ALU | libc::BPF_RSH | libc::BPF_K) as u16;
    const MOD_K: u16 = (libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K) as u16;
    const TAX: u16 = (libc::BPF_MISC | libc::BPF_TAX) as u16;
    const RET_A: u16 = (libc::BPF_RET | libc::BPF_A) as u16;
    const GOLDEN: u32 = 0x9e37_79b1;
    let net = |off: u32| (libc::SKF_NET_OFF as u32).wrapping_add(off);
    // The address's 32-bit words (IPv4: one at offset 12; IPv6: four from offset 8) and the mask
    // the prefix leaves of each.
    let (words, prefix): (&[u32], u32) =
        if ipv6 { (&[8, 12, 16, 20], p.prefix_v6.into()) } else { (&[12], p.prefix_v4.into()) };
    let mut prog = Vec::with_capacity(5 * words.len() + 4);
    // For each word: h = (h ^ (word & mask)) * GOLDEN (h kept in X between words; the first has
    // no h to mix in): h = (h ^ (word & mask)) * GOLDEN   (h kept in X between words)
    let mut first = true;
    for (i, &off) in words.iter().enumerate() {
        let bits = prefix.saturating_sub(32 * i as u32).min(32);
        if bits == 0 {
            continue;
        }
        let mask = if bits == 32 { u32::MAX } else { !(u32::MAX >> bits) };
        prog.push(insn(LD_W_ABS, net(off)));
        prog.push(insn(AND_K, mask));
        if !first {
            prog.push(insn(XOR_X, 0));
        }
        prog.push(insn(MUL_K, GOLDEN));
        prog.push(insn(TAX, 0));
        first = false;
    }
    if first {
        // A prefix of 0: every source is one; all to the first socket.
        return vec![insn((libc::BPF_RET | libc::BPF_K) as u16, 0)];
    }
    // h ^= h >> 16 (the multiply's good bits are the high ones), then h % workers.
    prog.push(insn(RSH_K, 16));
    prog.push(insn(XOR_X, 0));
    prog.push(insn(MOD_K, workers as u32));
    prog.push(insn(RET_A, 0));
    prog
}

/// The worker [`source_program`] sends connections from `ip` to: the same arithmetic in user space
/// (a connection that moves to a new engine on reload goes to the worker its source's new
/// connections reach, which counts the source).
pub fn steered_worker(p: crate::config::PerSource, workers: usize, ip: std::net::IpAddr) -> usize {
    const GOLDEN: u32 = 0x9e37_79b1;
    let (words, prefix): (Vec<u32>, u32) = match ip {
        std::net::IpAddr::V4(a) => (vec![u32::from(a)], p.prefix_v4.into()),
        std::net::IpAddr::V6(a) => {
            let o = a.octets();
            (
                (0..4).map(|i| u32::from_be_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])).collect(),
                p.prefix_v6.into(),
            )
        }
    };
    let mut h: Option<u32> = None;
    for (i, w) in words.into_iter().enumerate() {
        let bits = prefix.saturating_sub(32 * i as u32).min(32);
        if bits == 0 {
            continue;
        }
        let mask = if bits == 32 { u32::MAX } else { !(u32::MAX >> bits) };
        h = Some((h.unwrap_or(0) ^ (w & mask)).wrapping_mul(GOLDEN));
    }
    match h {
        None => 0,
        Some(h) => ((h ^ (h >> 16)) % workers.max(1) as u32) as usize,
    }
}

/// Attaches [`source_program`] to the SO_REUSEPORT group of `fd`.
fn steer_by_source(fd: &OwnedFd, p: crate::config::PerSource, workers: usize, ipv6: bool) -> io::Result<()> {
    let mut prog = source_program(p, workers, ipv6);
    let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_mut_ptr() };
    // SAFETY: the kernel copies the program during the call; `prog` outlives it.
    let r = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(fd),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&raw const fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r == 0 { Ok(()) } else { Err(io::Error::other(format!("steering by source: {}", io::Error::last_os_error()))) }
}

/// Takes a steering program off the group of `fd`, if one is attached (the kernel's hash then
/// spreads connections again).
fn unsteer(fd: &OwnedFd) {
    let zero: libc::c_int = 0;
    // SAFETY: a plain option call on a descriptor we own; ENOENT (nothing attached) is expected.
    let _ = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(fd),
            libc::SOL_SOCKET,
            libc::SO_DETACH_REUSEPORT_BPF,
            (&raw const zero).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// SO_KEEPALIVE with the probes' timing, or off.
fn set_keepalive(sock: &Socket, k: Option<crate::config::Keepalive>) -> io::Result<()> {
    match k {
        None => sock.set_keepalive(false),
        Some(k) => sock.set_tcp_keepalive(
            &socket2::TcpKeepalive::new().with_time(k.idle).with_interval(k.interval).with_retries(k.count),
        ),
    }
}

fn listen(addr: SocketAddr, backlog: u32) -> io::Result<Socket> {
    let domain = if addr.is_ipv6() { Domain::IPV6 } else { Domain::IPV4 };
    let sock = Socket::new(domain, Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // `[::]` means IPv6 only; list `0.0.0.0` separately for IPv4 (explicit beats surprising).
        sock.set_only_v6(true)?;
    }
    // Accepted sockets inherit TCP_NODELAY: the proxy forwards what it gets without delay.
    sock.set_tcp_nodelay(true)?;
    sock.bind(&addr.into())?;
    sock.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(sock)
}

fn explain(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EADDRINUSE) => format!(
            "{e} (another process listens there without SO_REUSEPORT, or a \
                                            ringproxy with another owner)"
        ),
        Some(libc::EADDRNOTAVAIL) => format!("{e} (the address is not assigned to this host)"),
        Some(libc::EACCES) => format!("{e} (ports below 1024 need root or CAP_NET_BIND_SERVICE)"),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PerSource;

    /// The kernel takes the steering program for each family and prefix length (it checks
    /// classic BPF when it is attached).
    #[test]
    fn the_source_program_is_accepted_for_every_prefix() {
        for (addr, prefixes) in [("127.0.0.1:0", [0u8, 8, 24, 31, 32]), ("[::1]:0", [0, 48, 64, 100, 128])] {
            let addr: SocketAddr = addr.parse().unwrap();
            let Ok(sock) = listen(addr, 16) else {
                eprintln!("skipped {addr}: cannot listen (no IPv6?)");
                continue;
            };
            let fd = OwnedFd::from(sock);
            for p in prefixes {
                let per = PerSource { maxconn: Some(1), rate: None, prefix_v4: p.min(32), prefix_v6: p };
                steer_by_source(&fd, per, 3, addr.is_ipv6()).unwrap_or_else(|e| panic!("{addr} /{p}: {e}"));
                assert!(source_program(per, 3, addr.is_ipv6()).len() <= 24);
            }
            unsteer(&fd);
        }
    }
}
