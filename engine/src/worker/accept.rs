//! A worker's listening sockets and their accepts.
//!
//! Each listener's accept is an [`Accept`] state: idle, armed (one multishot accept, or a few
//! single accepts), being cancelled, or closed (drain). A multishot accept may take its listener's
//! whole backlog at once, and the kernel drops a connection it has no direct slot for, so a
//! listener is multishot only while its backlog margin fits in the free accept slots left by the
//! listeners before it; otherwise it keeps up to [`SINGLE_ACCEPTS`] single accepts in flight, each
//! reserving the slot it will fill, so that a burst is still taken in a few loop turns. A
//! rate-limited listener keeps one, and only while its bucket has a token (rate.rs). Accepting
//! stops while a socket is parked (admission.rs) or a drain has begun.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::Worker;
use super::ring::{ClientSlot, Completion};
use super::token::{Op, Token};
use crate::conn::Known;

/// A listening socket owned by one worker.
pub struct Listener {
    pub frontend: usize,
    pub fd: OwnedFd,
    pub ipv6: bool,
    /// The bound address (a wildcard IP for `0.0.0.0` / `[::]` binds).
    pub addr: SocketAddr,
}

/// Where a listener's accept is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Accept {
    /// No accept in flight; may be armed.
    Idle,
    /// Accepts are in flight.
    Armed(InFlight),
    /// A cancel of those accepts is in flight; the last one's final completion makes it `Idle`.
    Cancelling(InFlight),
    /// Closed for good (drain): the worker's descriptor is gone.
    Closed,
}

/// The accepts a listener has in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum InFlight {
    /// One multishot accept.
    Multishot,
    /// This many single accepts (at least one), each holding the accept slot it will fill.
    Singles(u32),
}

impl InFlight {
    /// What is left after one of them completed for good; `None`: nothing.
    fn after_final(self) -> Option<InFlight> {
        match self {
            InFlight::Singles(n) if n > 1 => Some(InFlight::Singles(n - 1)),
            InFlight::Singles(_) | InFlight::Multishot => None,
        }
    }
}

/// At most this many single accepts in flight per listener: a listener that cannot be multishot
/// still takes up to this many new connections per loop turn, not one (each holds a slot reserved
/// for it, so they are also bounded by a share of the free accept slots).
pub(crate) const SINGLE_ACCEPTS: u32 = 16;

pub(crate) struct ListenerState {
    pub frontend: usize,
    /// `None` once closed; the kernel socket lives on while another engine holds it.
    pub fd: Option<OwnedFd>,
    pub accept: Accept,
    /// After an unexpected accept error, do not re-arm before this time (worker clock, ms).
    pub retry_at: u64,
    /// When the last accept error was logged, and how many were not logged since.
    pub logged_at: Option<u64>,
    pub unlogged: u64,
}

impl ListenerState {
    pub fn new(frontend: usize, fd: OwnedFd) -> ListenerState {
        ListenerState { frontend, fd: Some(fd), accept: Accept::Idle, retry_at: 0, logged_at: None, unlogged: 0 }
    }

    /// Open, with no accept in flight.
    pub fn idle(&self) -> bool {
        self.accept == Accept::Idle
    }

    /// How long until an idle listener backing off from an error may accept again.
    pub fn retry_in(&self, now: u64) -> Option<u64> {
        (self.idle() && self.retry_at > now).then(|| self.retry_at - now)
    }
}

/// Back-off after an unexpected accept error, so a persistent one cannot spin the loop.
const ACCEPT_RETRY_MS: u64 = 100;
/// At most one log line per listener per this interval for repeated accept errors.
const ACCEPT_LOG_MS: u64 = 10_000;

impl Worker {
    pub(super) fn on_accept(&mut self, listener: u16, c: Completion) {
        let now = self.now.ms;
        let l = &mut self.listeners[listener as usize];
        if let Accept::Armed(InFlight::Singles(_)) | Accept::Cancelling(InFlight::Singles(_)) = l.accept {
            // The slot reserved for this accept is either used now (counted below) or not at all.
            self.client_slots = self.client_slots.saturating_sub(1);
        }
        if !c.more() {
            l.accept = match l.accept {
                Accept::Armed(f) => f.after_final().map_or(Accept::Idle, Accept::Armed),
                Accept::Cancelling(f) => f.after_final().map_or(Accept::Idle, Accept::Cancelling),
                a @ (Accept::Idle | Accept::Closed) => a,
            };
        }
        if c.result < 0 {
            match -c.result {
                libc::ECANCELED => {}
                // The accept range of the file table is full: wait for a close to free a slot.
                libc::ENFILE | libc::EMFILE => {
                    self.stats.frontends[l.frontend].limit_hits.global += 1;
                    l.retry_at = now + ACCEPT_RETRY_MS;
                }
                e => {
                    l.retry_at = now + ACCEPT_RETRY_MS;
                    if l.logged_at.is_none_or(|t| now >= t + ACCEPT_LOG_MS) {
                        eprintln!(
                            "ringproxy: worker {}: accept on frontend \"{}\" failed: {} ({} more since the last report); retrying",
                            self.id,
                            self.cfg.frontends[l.frontend].name,
                            std::io::Error::from_raw_os_error(e),
                            l.unlogged
                        );
                        l.logged_at = Some(now);
                        l.unlogged = 0;
                    } else {
                        l.unlogged += 1;
                    }
                }
            }
            self.update_listeners();
            return;
        }
        if let Some(b) = self.rate[l.frontend].as_mut() {
            b.take(now);
        }
        let (slot, known) = if self.ring.io().direct_accept() {
            (ClientSlot::accepted(c.result as u32), Known::default())
        } else {
            // SAFETY: a non-negative result of an accept without a direct slot is a new
            // descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(c.result) };
            match self.adopt(listener, fd) {
                Some(adopted) => adopted,
                None => {
                    if !c.more() {
                        self.update_listeners();
                    }
                    return;
                }
            }
        };
        self.client_slots += 1;
        // A connection the kernel handed over is served even when a drain has begun (the accept
        // was cancelled, but completions already on their way still arrive).
        if self.parked.is_empty() {
            self.admit(listener, slot, known);
        } else {
            self.park(listener, slot, known);
        }
        if !c.more() {
            self.update_listeners();
        }
    }

    /// The plain-accept fallback (features.rs): reads what the connection will need of `fd`'s
    /// addresses, moves it into a free accept slot and closes the plain descriptor. `None` (the
    /// client is closed): no free slot, as when the kernel finds none for a direct accept.
    fn adopt(&mut self, listener: u16, fd: OwnedFd) -> Option<(ClientSlot, Known)> {
        let Some(index) = self.free_client_slots.pop() else {
            self.stats.frontends[self.infos[listener as usize].frontend as usize].limit_hits.global += 1;
            return None;
        };
        let info = self.infos[listener as usize];
        let sock = socket2::SockRef::from(&fd);
        let addr = |a: std::io::Result<socket2::SockAddr>| a.ok().and_then(|a| a.as_socket());
        let known = Known {
            looked_up: true,
            peer: if info.needs_peer { addr(sock.peer_addr()) } else { None },
            local: if info.addr.ip().is_unspecified() { addr(sock.local_addr()) } else { None },
        };
        if let Err(e) = self.ring.install_in_slot(index, fd.as_raw_fd()) {
            self.free_client_slots.push(index);
            eprintln!("ringproxy: worker {}: moving an accepted socket into the file table: {e}", self.id);
            return None;
        }
        Some((ClientSlot::accepted(index), known))
    }

    /// Arms the accept of every listener that may take connections, cancels the others.
    pub(super) fn update_listeners(&mut self) {
        // Accept until a connection has to be parked: that parked connection is the demand that
        // makes the worker borrow share (clients waiting in the kernel backlog are invisible).
        let should = self.draining.is_none() && self.parked.is_empty();
        let now = self.now.ms;
        // Slots promised in this pass to the multishot accepts of earlier listeners.
        let mut reserved: u32 = 0;
        // Rate-limited listeners out of tokens.
        let mut short = Vec::new();
        let listeners = self.listeners.len() as u32;
        for i in 0..self.listeners.len() {
            // (Single accepts armed below reserve their slots: recounted for each listener.)
            let free = self.plan.accept_slots.saturating_sub(self.client_slots);
            let l = &mut self.listeners[i];
            let Some(fd) = l.fd.as_ref().map(|f| f.as_raw_fd()) else { continue };
            let margin = self.plan.multishot_margin[l.frontend];
            let bucket = self.rate[l.frontend].as_mut();
            // A rate-limited listener takes one connection at a time (a multishot accept would
            // take the whole backlog at once).
            let limited = bucket.is_some();
            let roomy = !limited && free.saturating_sub(reserved) >= margin;
            if roomy {
                reserved += margin;
            }
            if let Some(b) = bucket
                && should
                && l.accept == Accept::Idle
                && l.retry_at <= now
                && let Some(wait) = b.wait_ms(now)
            {
                // No token: the backlog keeps the clients until one is there (and this worker
                // may ask the others for share: rate.rs).
                l.retry_at = now + wait;
                self.stats.frontends[l.frontend].limit_hits.rate += 1;
                short.push(i);
                continue;
            }
            // Single accepts this listener may have in flight: its share of the slots no multishot
            // accept was promised (at least one, as long as a slot is free).
            let depth = if limited { 1 } else { (free.saturating_sub(reserved) / listeners).clamp(1, SINGLE_ACCEPTS) };
            let token = Token::worker(Op::Accept, i as u32);
            match l.accept {
                Accept::Idle if should && l.retry_at <= now && free > 0 => {
                    l.retry_at = 0;
                    if roomy {
                        l.accept = Accept::Armed(InFlight::Multishot);
                        self.ring.accept_multi(fd, token);
                    } else {
                        let n = depth.min(free);
                        l.accept = Accept::Armed(InFlight::Singles(n));
                        self.client_slots += n;
                        (0..n).for_each(|_| self.ring.accept_once(fd, token));
                    }
                }
                // A drain or a parked connection cancels every accept; a multishot one also goes
                // when slots run short (a single accept already holds the slot it will use).
                Accept::Armed(f) if !should || (f == InFlight::Multishot && !roomy) => {
                    l.accept = Accept::Cancelling(f);
                    self.ring.cancel_all(token, Token::worker(Op::AcceptCancel, i as u32));
                }
                // Single accepts are topped up to their depth after each completion; where the
                // listener may now be multishot, they are left to complete and it re-arms as one.
                Accept::Armed(InFlight::Singles(n)) if !roomy && n < depth && l.retry_at <= now && free > 0 => {
                    let more = (depth - n).min(free);
                    l.accept = Accept::Armed(InFlight::Singles(n + more));
                    self.client_slots += more;
                    (0..more).for_each(|_| self.ring.accept_once(fd, token));
                }
                _ => {}
            }
        }
        for i in short {
            self.rate_short(i);
        }
    }

    /// Re-arms listeners whose back-off after an error has passed.
    pub(super) fn retry_listeners(&mut self) {
        let now = self.now.ms;
        if self.listeners.iter().any(|l| l.idle() && l.retry_at != 0 && l.retry_at <= now) {
            self.update_listeners();
        }
    }

    /// Cancels every armed accept; each re-arms when its cancellation completes (`on_accept`), and a
    /// fresh accept takes whatever already waits in the backlog.
    pub(super) fn rearm_accepts(&mut self) {
        for (i, l) in self.listeners.iter_mut().enumerate() {
            if let Accept::Armed(f) = l.accept {
                l.accept = Accept::Cancelling(f);
                self.ring.cancel_all(Token::worker(Op::Accept, i as u32), Token::worker(Op::AcceptCancel, i as u32));
            }
        }
    }

    /// During a drain: closes each listener whose accept is gone.
    pub(super) fn close_idle_listeners(&mut self) {
        for l in &mut self.listeners {
            if l.idle() {
                l.accept = Accept::Closed;
                // Close this worker's descriptor (no accept holds the socket through it any more).
                // The socket itself closes, refusing new SYNs, only when the engine's copy is gone
                // too — or lives on in the engine that replaces this one.
                l.fd = None;
            }
        }
    }
}
