//! systemd's readiness protocol (`Type=notify`, sd_notify(3)): a datagram to `$NOTIFY_SOCKET` once
//! every listener is bound and every worker runs (`READY=1`), around a reload (`RELOADING=1` then
//! `READY=1`) and when the drain begins (`STOPPING=1`). Outside systemd (no `NOTIFY_SOCKET`) it
//! does nothing. Best effort, as in libsystemd: a message that cannot be sent is not an error of
//! the proxy.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Where systemd listens, and an unbound socket to send from (made before privileges drop; the
/// socket systemd binds is writable by the service's user).
pub struct Notifier {
    sock: UnixDatagram,
    to: SocketAddr,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`: a path, or `@name` for an abstract socket. `None` when unset or
    /// unusable.
    pub fn from_env() -> Option<Notifier> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        let to = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name).ok()?,
            None => SocketAddr::from_pathname(std::path::Path::new(&path)).ok()?,
        };
        Some(Notifier { sock: UnixDatagram::unbound().ok()?, to })
    }

    fn send(&self, msg: &str) {
        let _ = self.sock.send_to_addr(msg.as_bytes(), &self.to);
    }

    /// Every listener bound, every worker running.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nMAINPID={}\nSTATUS={status}", std::process::id()));
    }

    /// A reload begins (answered by [`Notifier::ready`] once it is done or refused).
    pub fn reloading(&self) {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a local the call only writes into.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let usec = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000;
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
    }

    /// A binary upgrade handed everything to process `pid`, which is the service's main process
    /// from now on (sent by the old one, the main process until then, just before it exits).
    pub fn main_pid(&self, pid: u32, status: &str) {
        self.send(&format!("MAINPID={pid}\nSTATUS={status}"));
    }

    /// The drain begins: no new connections.
    pub fn stopping(&self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={status}"));
    }
}
