//! Listening sockets: one per bind address per worker, in one SO_REUSEPORT group, so the kernel
//! spreads incoming connections over the workers without a shared accept queue.
//!
//! All sockets are created and bound by the main thread before any worker starts, so a busy port
//! is reported before anything runs, and a `:0` bind (tests) resolves to one port that every
//! worker then binds too.

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

/// Binds every frontend address once per worker. Returns each worker's listeners and the addresses.
pub fn bind_all(config: &Config, workers: usize) -> Result<(Vec<Vec<Listener>>, Vec<Bound>), String> {
    let mut per_worker: Vec<Vec<Listener>> = (0..workers).map(|_| Vec::new()).collect();
    let mut bound = Vec::new();
    for (f, fe) in config.frontends.iter().enumerate() {
        for &want in &fe.binds {
            let mut addr = want;
            for list in per_worker.iter_mut() {
                let sock = listen(addr, fe.backlog)
                    .map_err(|e| format!("frontend \"{}\": cannot listen on {want}: {}", fe.name, explain(&e)))?;
                if addr.port() == 0 {
                    addr =
                        sock.local_addr().ok().and_then(|a| a.as_socket()).ok_or_else(|| {
                            format!("frontend \"{}\": cannot read the port bound for {want}", fe.name)
                        })?;
                }
                list.push(Listener { frontend: f, fd: OwnedFd::from(sock), ipv6: addr.is_ipv6(), addr });
            }
            bound.push(Bound { frontend: fe.name.clone(), addr });
        }
    }
    Ok((per_worker, bound))
}

fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<Socket> {
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

fn explain(e: &std::io::Error) -> String {
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
