//! Messages between threads (main ↔ workers, worker ↔ worker) and how a worker is woken for them.
//!
//! Each worker owns a crossbeam receiver and an eventfd; its ring keeps a read armed on the eventfd,
//! so a sender pushes the message and then signals the eventfd. This is the control plane only:
//! share lending, stats snapshots, drain. The data path never sends or waits on these channels.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use crossbeam_channel::Sender;

use crate::limits::ShareMsg;
use crate::stats::WorkerStats;

pub enum Control {
    /// Lending protocol for maxconn shares.
    Share(ShareMsg),
    /// Send a copy of your counters.
    Snapshot(Sender<WorkerStats>),
    /// Stop accepting; finish open connections until the drain deadline, then exit.
    Drain,
    /// A health check changed a server's state (indices into the configuration).
    ServerState { backend: usize, server: usize, up: bool },
    /// Re-arm every accept: the engine this one replaced has stopped accepting on the shared
    /// listening sockets, and a wakeup for a queued connection may have gone to one of its
    /// cancelled accepts (accept waits are exclusive: the kernel wakes one waiter per connection).
    RearmAccepts,
}

/// An eventfd used as a doorbell.
pub struct EventFd(OwnedFd);

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd has no pointer arguments.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64. EAGAIN (counter saturated) still leaves it signalled.
        unsafe { libc::write(self.0.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// The way to reach one worker.
#[derive(Clone)]
pub struct Peer {
    pub tx: Sender<Control>,
    pub wake: Arc<EventFd>,
}

impl Peer {
    /// Delivers `msg`; false if the worker has exited.
    pub fn send(&self, msg: Control) -> bool {
        let ok = self.tx.send(msg).is_ok();
        if ok {
            self.wake.signal();
        }
        ok
    }
}
