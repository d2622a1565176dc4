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
                let fd = OwnedFd::from(sock);
                fds.push(fd.try_clone().map_err(fail)?);
                list.push(Listener { frontend: f, fd, ipv6: addr.is_ipv6(), addr });
            }
            // Copies of sockets a previous engine with more workers used are closed here; those
            // sockets close when that engine is drained.
            drop(old);
            bound.push(Bound { frontend: fe.name.clone(), addr });
            groups.push(ListenerGroup { frontend: fe.name.clone(), configured: want, bound: addr, fds });
        }
    }
    Ok((per_worker, bound, groups))
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
