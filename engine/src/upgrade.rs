//! Binary upgrade without closing (`ringproxy upgrade`, `SIGUSR2`): the running process starts the
//! new binary with its own arguments and hands it, over a Unix socket (SOCK_SEQPACKET,
//! descriptors by SCM_RIGHTS), first every listening socket — frontends, stats and admin sockets,
//! the Prometheus endpoint — and then every established connection; then it exits.
//!
//! The order of events, and who does what:
//!
//! 1. The old process makes a socket pair and starts the new binary with one end as descriptor
//!    `RINGPROXY_UPGRADE_FD`. It sends [`Msg::Hello`] (its protocol version, its version, and which
//!    listening socket each descriptor is).
//! 2. The new process refuses a protocol it does not speak ([`Msg::Refused`], then exits 1). Else it
//!    starts its engine on the same listening sockets (the kernel queues stay; both processes
//!    accept from them for a moment) and serves the stats sockets from the same sockets, then
//!    says [`Msg::Ready`]. Until then the old process has changed nothing: if the new one exits,
//!    refuses, or says nothing within 30 s, the old one stops it and serves on, saying why.
//! 3. The old process stops accepting and exports its established connections: each worker
//!    quiesces them as for a reload (worker/moving.rs), makes process descriptors of both sockets
//!    (FIXED_FD_INSTALL, Linux 6.8) and hands them to this module's courier, which sends them in
//!    batches of [`BATCH`] ([`Msg::Conns`]: each connection's place, by name, and state — times,
//!    counters, half-closes — with its two descriptors).
//! 4. The new process's courier installs each batch in a small ring of its own and moves the
//!    connections into its workers exactly as a reload moves them between engines (a grant of
//!    slots and maxconn shares, MSG_RING, arrival), then answers [`Msg::Acks`]: per connection,
//!    taken or not. A connection taken leaves the old process (its copies closed, nothing sent on
//!    the wire); one not taken stays there and is offered again a second later.
//! 5. When the old engine holds nothing more, the old process sends [`Msg::Done`] and exits 0.
//!
//! If the new process dies after `Ready`, the connections it had not taken stay with the old one,
//! which starts a fresh engine from its configuration file on the listening sockets it still
//! holds and serves on (a reload): a rollback. Connections the new process had taken end with it.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use serde::{Deserialize, Serialize};

use crate::conn::{Moved, MovedState};
use crate::control::{Control, Peer};
use crate::worker::{Exported, Grant, MoveOffer, MovePlan};

/// The hand-over protocol this binary speaks. A new binary that speaks another refuses, and the
/// old process serves on.
pub const PROTOCOL: u32 = 1;
/// The descriptor of the hand-over socket, in the new process's environment.
pub const ENV_FD: &str = "RINGPROXY_UPGRADE_FD";
/// A testing aid: the protocol version the new process claims (to see a refusal happen).
pub const ENV_PROTOCOL: &str = "RINGPROXY_UPGRADE_PROTOCOL";
/// A testing aid: the new process dies (exit 70) once it has moved this many connections into its
/// workers, before it answers for them (to see the old process keep them and serve on).
pub const ENV_DIE_AFTER: &str = "RINGPROXY_UPGRADE_DIE_AFTER";
/// Connections per message: two descriptors each, under the kernel's 253 per message.
pub const BATCH: usize = 100;
/// How long the old process waits for the new one to serve.
pub const START_WAIT: Duration = Duration::from_secs(30);
/// Largest message (a batch's JSON is ~40 KB).
const MAX_MSG: usize = 4 << 20;
/// Batches the new process's courier moves in one round (grants, MSG_RINGs): the old workers keep
/// up to 256 connections each on their way, so a round takes what a dozen workers have sent.
const GATHER: usize = 32;

/// The messages of the hand-over.
#[derive(Debug, Serialize, Deserialize)]
pub enum Msg {
    /// old → new, with the descriptors `listeners` names, in order, then those of the stats
    /// socket, the admin socket and the Prometheus endpoint that are there.
    Hello {
        protocol: u32,
        version: String,
        pid: u32,
        listeners: Vec<ListenerDesc>,
        stats: Option<PathBuf>,
        admin: Option<PathBuf>,
        prometheus: Option<SocketAddr>,
        /// The client-side socket buffer sizes the listening sockets keep, by key (`rcvbuf_client`,
        /// `sndbuf_client`): a new file that no longer sets one gets a warning, as a reload does.
        /// (Absent from an older binary's hello: no warning.)
        #[serde(default)]
        client_buffers: Vec<(String, u32)>,
    },
    /// new → old: it does not take over (why); it exits.
    Refused { reason: String },
    /// new → old: its engine serves the listening sockets; send the connections. With the
    /// warnings of its start, which the old process adds to its answer to the upgrade.
    Ready {
        protocol: u32,
        pid: u32,
        #[serde(default)]
        warnings: Vec<String>,
    },
    /// old → new: connections, with their descriptors (client, server) in order.
    Conns { conns: Vec<WireConn> },
    /// new → old: per connection (worker, key), whether it was taken.
    Acks { acks: Vec<(usize, (u32, u32), bool)> },
    /// old → new: everything was handed over; the old process exits.
    Done,
}

/// One listening socket group of the old engine: a frontend address and its worker sockets.
#[derive(Debug, Serialize, Deserialize)]
pub struct ListenerDesc {
    pub frontend: String,
    pub configured: SocketAddr,
    pub bound: SocketAddr,
    /// How many descriptors (one per old worker).
    pub fds: usize,
}

/// A connection on the wire: where it was (worker, key), where it belongs by name, its state.
#[derive(Debug, Serialize, Deserialize)]
pub struct WireConn {
    pub worker: usize,
    pub key: (u32, u32),
    pub frontend: String,
    pub backend: String,
    pub server: String,
    pub address: SocketAddr,
    pub state: MovedState,
}

/// One end of the hand-over socket.
pub struct Link(OwnedFd);

impl Link {
    /// A connected pair: ours, and the end for the new process (close-on-exec cleared in the child
    /// only, by the caller).
    pub fn pair() -> io::Result<(Link, OwnedFd)> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors socketpair writes.
        let r =
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: two new descriptors nothing else owns.
        Ok(unsafe { (Link(OwnedFd::from_raw_fd(fds[0])), OwnedFd::from_raw_fd(fds[1])) })
    }

    /// The new process's end, if it was started by an upgrade (the variable is removed, and the
    /// descriptor made close-on-exec, so that nothing it starts inherits either).
    pub fn from_env() -> Option<io::Result<Link>> {
        let v = std::env::var(ENV_FD).ok()?;
        // SAFETY: single-threaded at this point of start-up (main, before any thread).
        unsafe { std::env::remove_var(ENV_FD) };
        let fd: RawFd = match v.parse() {
            Ok(fd) if fd > 2 => fd,
            _ => return Some(Err(io::Error::other(format!("{ENV_FD}={v} is not a descriptor")))),
        };
        // SAFETY: fcntl on a number; the old process passed this descriptor to us open.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return Some(Err(io::Error::other(format!("{ENV_FD}={fd}: {}", io::Error::last_os_error()))));
        }
        // SAFETY: inherited for this purpose; nothing else in this process owns it.
        Some(Ok(Link(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    /// Sends `msg` with `fds` (at most 253).
    pub fn send(&self, msg: &Msg, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut iov = libc::iovec { iov_base: body.as_ptr() as *mut libc::c_void, iov_len: body.len() };
        let space = cmsg_space(raw.len());
        let mut control = vec![0u8; space];
        // SAFETY: msghdr is plain data; every pointer set below points into `iov`, `control` or
        // `raw`, which outlive the sendmsg call (it copies what it sends).
        unsafe {
            let mut m: libc::msghdr = std::mem::zeroed();
            m.msg_iov = &mut iov;
            m.msg_iovlen = 1;
            if !raw.is_empty() {
                m.msg_control = control.as_mut_ptr().cast();
                m.msg_controllen = space;
                let c = libc::CMSG_FIRSTHDR(&m);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN((raw.len() * 4) as u32) as usize;
                std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(c).cast::<RawFd>(), raw.len());
            }
            loop {
                let n = libc::sendmsg(self.0.as_raw_fd(), &m, libc::MSG_NOSIGNAL);
                if n >= 0 {
                    return Ok(());
                }
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }

    /// The next message and its descriptors, waiting at most `wait` (`Ok(None)`: nothing came).
    /// The other end closed: `UnexpectedEof`.
    pub fn recv(&self, wait: Duration) -> io::Result<Option<(Msg, Vec<OwnedFd>)>> {
        let mut p = libc::pollfd { fd: self.0.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = wait.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(None) } else { Err(e) };
        }
        if r == 0 {
            return Ok(None);
        }
        let mut body = vec![0u8; MAX_MSG];
        let space = cmsg_space(253);
        let mut control = vec![0u8; space];
        let mut iov = libc::iovec { iov_base: body.as_mut_ptr().cast(), iov_len: body.len() };
        let mut fds = Vec::new();
        // SAFETY: as for `send`; every descriptor the kernel passes is taken into an OwnedFd at
        // once (MSG_CMSG_CLOEXEC: none leaks into a child).
        let n = unsafe {
            let mut m: libc::msghdr = std::mem::zeroed();
            m.msg_iov = &mut iov;
            m.msg_iovlen = 1;
            m.msg_control = control.as_mut_ptr().cast();
            m.msg_controllen = space;
            let n = libc::recvmsg(self.0.as_raw_fd(), &mut m, libc::MSG_CMSG_CLOEXEC);
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut c = libc::CMSG_FIRSTHDR(&m);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let count = ((*c).cmsg_len - libc::CMSG_LEN(0) as usize) / 4;
                    let data = libc::CMSG_DATA(c).cast::<RawFd>();
                    for i in 0..count {
                        fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                    }
                }
                c = libc::CMSG_NXTHDR(&m, c);
            }
            if m.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
                return Err(io::Error::other("a hand-over message was cut short"));
            }
            n as usize
        };
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the other process closed the hand-over socket"));
        }
        let msg =
            serde_json::from_slice(&body[..n]).map_err(|e| io::Error::other(format!("a hand-over message: {e}")))?;
        Ok(Some((msg, fds)))
    }
}

fn cmsg_space(fds: usize) -> usize {
    // SAFETY: arithmetic only.
    unsafe { libc::CMSG_SPACE((fds * 4) as u32) as usize }
}

// --- the old process ---

/// The old process's courier: passes what its workers export to the new process in batches and
/// the answers back, until every worker has exited (all its connections handed over or ended).
/// Returns how many the new process took, or why the hand-over broke off — after which it still
/// answers every export "not taken", so that each connection stays with this process.
///
/// `failed` hears why at once when the hand-over breaks off (the return comes only once every
/// worker has exited).
pub fn send_conns(
    link: Link,
    exports: Receiver<Exported>,
    peers: std::sync::Arc<Vec<Peer>>,
    failed: crossbeam_channel::Sender<String>,
) -> Result<u64, String> {
    let ack = |worker: usize, key: (u32, u32), taken: bool| {
        if let Some(p) = peers.get(worker) {
            p.send(Control::ExportAck { key, taken });
        }
    };
    let mut taken = 0u64;
    let mut broken: Option<String> = None;
    // Sent, not answered yet: (worker, key).
    let mut outstanding: std::collections::HashSet<(usize, (u32, u32))> = std::collections::HashSet::new();
    let mut gone = false;
    // An export taken while waiting, for the next batch.
    let mut carry: Vec<Exported> = Vec::new();
    loop {
        let mut busy = false;
        // The answers first: each frees room in its worker for the next connections.
        while broken.is_none() && !outstanding.is_empty() {
            match link.recv(Duration::ZERO) {
                Ok(Some((Msg::Acks { acks }, _))) => {
                    busy = true;
                    for (worker, key, ok) in acks {
                        if outstanding.remove(&(worker, key)) {
                            ack(worker, key, ok);
                            taken += u64::from(ok);
                        }
                    }
                }
                Ok(Some((other, _))) => broken = Some(format!("unexpected message {other:?}")),
                Ok(None) => break,
                Err(e) => broken = Some(e.to_string()),
            }
        }
        // Then every export there is, in batches.
        loop {
            let mut batch: Vec<Exported> = std::mem::take(&mut carry);
            while batch.len() < BATCH {
                match exports.try_recv() {
                    Ok(e) => batch.push(e),
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        gone = true;
                        break;
                    }
                }
            }
            if batch.is_empty() {
                break;
            }
            busy = true;
            if broken.is_some() {
                for e in batch {
                    ack(e.worker, e.key, false);
                }
                continue;
            }
            let fds: Vec<BorrowedFd<'_>> = batch.iter().flat_map(|e| [e.client.as_fd(), e.server_fd.as_fd()]).collect();
            let conns: Vec<WireConn> = batch
                .iter()
                .map(|e| WireConn {
                    worker: e.worker,
                    key: e.key,
                    frontend: e.frontend.clone(),
                    backend: e.backend.clone(),
                    server: e.server.clone(),
                    address: e.address,
                    state: e.state.clone(),
                })
                .collect();
            match link.send(&Msg::Conns { conns }, &fds) {
                Ok(()) => outstanding.extend(batch.iter().map(|e| (e.worker, e.key))),
                Err(e) => {
                    for x in &batch {
                        ack(x.worker, x.key, false);
                    }
                    broken = Some(format!("sending connections: {e}"));
                }
            }
            // (Our copies of the descriptors close here; the new process has its own.)
        }
        if let Some(why) = &broken {
            // Whatever the new process had not answered stays here; so does everything after.
            for (worker, key) in outstanding.drain() {
                ack(worker, key, false);
            }
            let _ = failed.try_send(why.clone());
            if gone {
                return Err(why.clone());
            }
        } else if gone && outstanding.is_empty() {
            let _ = link.send(&Msg::Done, &[]);
            return Ok(taken);
        }
        if !busy {
            // Nothing to do: wait a moment for an answer or for the next exports.
            if outstanding.is_empty() || broken.is_some() {
                match exports.recv_timeout(Duration::from_millis(5)) {
                    Ok(e) => carry.push(e),
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => gone = true,
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                }
            } else {
                let mut p = libc::pollfd { fd: link.0.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut p, 1, 2) };
            }
        }
    }
}

// --- the new process ---

/// What the new process starts from: the old process's listening sockets.
pub struct Inherited {
    pub old_pid: u32,
    pub groups: Vec<crate::listener::ListenerGroup>,
    pub stats: Option<(PathBuf, OwnedFd)>,
    pub admin: Option<(PathBuf, OwnedFd)>,
    pub prometheus: Option<(SocketAddr, OwnedFd)>,
    /// The client-side buffer sizes the listening sockets keep (see [`Msg::Hello`]).
    pub client_buffers: Vec<(String, u32)>,
}

/// Reads the old process's Hello: its listening sockets, or why this process cannot take over
/// (then the old one has been told).
pub fn receive_hello(link: &Link) -> Result<Inherited, String> {
    let (msg, fds) = match link.recv(Duration::from_secs(10)) {
        Ok(Some(m)) => m,
        Ok(None) => return Err("the old process sent nothing within 10s".into()),
        Err(e) => return Err(format!("reading the old process's hello: {e}")),
    };
    let Msg::Hello { protocol, version, pid, listeners, stats, admin, prometheus, client_buffers } = msg else {
        return Err(format!("the old process began with {msg:?} instead of its hello"));
    };
    let ours = std::env::var(ENV_PROTOCOL).ok().and_then(|v| v.parse().ok()).unwrap_or(PROTOCOL);
    if protocol != ours {
        let reason = format!(
            "the new binary (ringproxy {}) speaks hand-over protocol {ours}, the running one (ringproxy {version}) \
             protocol {protocol}: upgrade through a restart, or to a version that speaks {protocol}",
            env!("CARGO_PKG_VERSION")
        );
        let _ = link.send(&Msg::Refused { reason: reason.clone() }, &[]);
        return Err(reason);
    }
    let want: usize = listeners.iter().map(|l| l.fds).sum::<usize>()
        + usize::from(stats.is_some())
        + usize::from(admin.is_some())
        + usize::from(prometheus.is_some());
    if fds.len() != want {
        return Err(format!("the old process sent {} descriptors for {want} sockets", fds.len()));
    }
    let mut fds = fds.into_iter();
    let groups = listeners
        .into_iter()
        .map(|l| crate::listener::ListenerGroup {
            frontend: l.frontend,
            configured: l.configured,
            bound: l.bound,
            fds: fds.by_ref().take(l.fds).collect(),
        })
        .collect();
    let mut next = || fds.next().expect("counted above");
    Ok(Inherited {
        old_pid: pid,
        groups,
        stats: stats.map(|p| (p, next())),
        admin: admin.map(|p| (p, next())),
        prometheus: prometheus.map(|a| (a, next())),
        client_buffers,
    })
}

/// Every worker of `plan`'s engine cancels its accepts and arms them again: a fresh accept takes
/// whatever waits in the listening sockets' backlogs. Needed while the old process still has
/// accepts on the same sockets: a connection's wakeup goes to one waiter only, and when that is
/// the old process's (stopping) accept, the connection waits in the backlog, unseen by ours,
/// until the next one arrives (the same as on reload: `Supervisor::reload`).
pub fn rearm_accepts(plan: &MovePlan) {
    for t in &plan.targets {
        t.peer.send(Control::RearmAccepts);
    }
}

/// Whether process `pid` has exited: gone, or a zombie (whose parent, not we, reaps it: the old
/// process is the new one's parent).
pub fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

/// The new process, once the old one is done: waits (at most 30 s) until process `old` has exited,
/// so that none of its accepts can take a wakeup any more, and re-arms our accepts then (and once
/// more a little later: the exiting ring's accepts go asynchronously).
pub fn after_old_exits(old: u32, plan: &MovePlan) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !exited(old) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    rearm_accepts(plan);
    std::thread::sleep(Duration::from_millis(300));
    rearm_accepts(plan);
}

/// The new process's courier: takes the batches of connections the old process sends, moves each
/// into a worker of `plan`'s engine and answers which it took, until the old process is done.
/// Meanwhile it re-arms the workers' accepts every second ([`rearm_accepts`]): a connection whose
/// wakeup the old process's accept took waits at most that long. Returns how many it took.
pub fn receive_conns(link: Link, plan: std::sync::Arc<MovePlan>) -> Result<u64, String> {
    let slots = (2 * BATCH * GATHER) as u32;
    let mut ring = io_uring::IoUring::new(slots.next_power_of_two()).map_err(|e| format!("the courier's ring: {e}"))?;
    ring.submitter().register_files_sparse(slots).map_err(|e| format!("the courier's descriptor table: {e}"))?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let wake = std::sync::Arc::new(crate::sys::EventFd::new().map_err(|e| e.to_string())?);
    let me = Peer { tx, wake };
    let uid = crate::worker::next_uid();
    let mut round: u32 = 0;
    let mut taken = 0u64;
    let mut rotor = 0usize;
    let die_after: Option<u64> = std::env::var(ENV_DIE_AFTER).ok().and_then(|v| v.parse().ok());
    let mut rearmed = Instant::now();
    loop {
        if rearmed.elapsed() >= Duration::from_secs(1) {
            rearm_accepts(&plan);
            rearmed = Instant::now();
        }
        // One round: the first message that comes, and every one behind it (up to GATHER).
        let mut conns = Vec::new();
        let mut fds = Vec::new();
        let mut done = false;
        let mut wait = Duration::from_secs(1);
        for _ in 0..GATHER {
            let (msg, more) = match link.recv(wait) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) if conns.is_empty() => return Err(e.to_string()),
                Err(_) => break,
            };
            match msg {
                Msg::Done => {
                    done = true;
                    break;
                }
                Msg::Conns { conns: c } if more.len() == 2 * c.len() => {
                    conns.extend(c);
                    fds.extend(more);
                }
                Msg::Conns { conns: c } => {
                    // (Descriptors missing: those connections stay with the old process.)
                    let acks = c.iter().map(|c| (c.worker, c.key, false)).collect();
                    link.send(&Msg::Acks { acks }, &[]).map_err(|e| e.to_string())?;
                }
                other => return Err(format!("unexpected message {other:?}")),
            }
            wait = Duration::ZERO;
        }
        if !conns.is_empty() {
            let acks = adopt(&mut ring, &plan, &me, &rx, uid, round, &mut rotor, conns, fds);
            taken += acks.iter().filter(|a| a.2).count() as u64;
            if die_after.is_some_and(|n| taken >= n) {
                eprintln!("ringproxy: upgrade: {ENV_DIE_AFTER}: exiting after taking {taken} connections, unanswered");
                std::process::exit(70);
            }
            round = round.wrapping_add(1);
            link.send(&Msg::Acks { acks }, &[]).map_err(|e| e.to_string())?;
        }
        if done {
            return Ok(taken);
        }
    }
}

/// Moves one round's connections into the engine's workers, as an older engine's worker moves its connections on
/// reload (offer, grant, MSG_RING from the courier's table, arrival or call-off).
#[allow(clippy::too_many_arguments)]
fn adopt(
    ring: &mut io_uring::IoUring,
    plan: &MovePlan,
    me: &Peer,
    answers: &Receiver<Control>,
    uid: u64,
    round: u32,
    rotor: &mut usize,
    conns: Vec<WireConn>,
    fds: Vec<OwnedFd>,
) -> Vec<(usize, (u32, u32), bool)> {
    let mut acks: Vec<(usize, (u32, u32), bool)> = conns.iter().map(|c| (c.worker, c.key, false)).collect();
    if fds.len() != 2 * conns.len() || conns.len() > BATCH * GATHER {
        return acks;
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    if ring.submitter().register_files_update(0, &raw).is_err() {
        return acks;
    }
    // The table holds the sockets now; our descriptors close.
    drop(fds);
    let cfg = &plan.config;
    let n = plan.targets.len().max(1);
    let mut offers: Vec<Vec<MoveOffer>> = vec![Vec::new(); n];
    let mut target_of = vec![usize::MAX; conns.len()];
    for (i, c) in conns.iter().enumerate() {
        let Some(place) = crate::worker::place_by_name(cfg, &c.frontend, &c.backend, &c.server, c.address) else {
            continue;
        };
        let source = c.state.source_ip;
        let t = crate::worker::pick_target(cfg, n, place, source, c.state.client_addr, rotor);
        target_of[i] = t;
        let (frontend, backend, server) = place;
        offers[t].push(MoveOffer { key: (round, i as u32), frontend, backend, server });
    }
    let mut asked = 0;
    for (t, items) in offers.into_iter().enumerate().filter(|(_, v)| !v.is_empty()) {
        asked += usize::from(plan.targets[t].peer.send(Control::MoveOffer { from: uid, reply: me.clone(), items }));
    }
    let mut grants: Vec<Option<Grant>> = vec![None; conns.len()];
    let deadline = Instant::now() + Duration::from_secs(5);
    while asked > 0 {
        match answers.recv_deadline(deadline) {
            Ok(Control::MoveGrant { worker, items }) => {
                if items.first().is_some_and(|((r, _), _)| *r != round) {
                    // An earlier round's answer, too late: what it granted is called off.
                    let keys: Vec<_> = items.iter().filter(|(_, g)| g.is_some()).map(|(k, _)| (*k, None)).collect();
                    if let (Some(t), false) = (plan.targets.get(worker), keys.is_empty()) {
                        t.peer.send(Control::MoveCancel { from: uid, keys });
                    }
                    continue;
                }
                asked -= 1;
                for ((_, i), g) in items {
                    if let Some(slot) = grants.get_mut(i as usize) {
                        *slot = g;
                    }
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    // SAFETY (for the pushes below): no pointer; each source slot holds a socket of this table
    // until the slots are cleared after every completion is in; each target ring's descriptor is
    // held by `plan` for the length of the call.
    let mut pushed = 0;
    for (i, g) in grants.iter().enumerate() {
        let Some(g) = g else { continue };
        let target = plan.targets[target_of[i]].ring.as_raw_fd();
        let dests = [
            g.client.map_or(
                Ok(io_uring::types::DestinationSlot::auto_target()),
                io_uring::types::DestinationSlot::try_from_slot_target,
            ),
            io_uring::types::DestinationSlot::try_from_slot_target(g.server),
        ];
        for (k, dest) in dests.into_iter().enumerate() {
            let Ok(dest) = dest else { continue };
            let e = io_uring::opcode::MsgRingSendFd::new(
                io_uring::types::Fd(target),
                io_uring::types::Fixed((2 * i + k) as u32),
                dest,
                0,
            )
            .opcode_flags(1)
            .build()
            .user_data((2 * i + k) as u64);
            // SAFETY: see above.
            while unsafe { ring.submission().push(&e) }.is_err() {
                let _ = ring.submit();
            }
            pushed += 1;
        }
    }
    let mut results = vec![None::<i32>; 2 * conns.len()];
    let ts = io_uring::types::Timespec::new().sec(5);
    let mut got = 0;
    while got < pushed {
        let args = io_uring::types::SubmitArgs::new().timespec(&ts);
        if let Err(e) = ring.submitter().submit_with_args(pushed - got, &args)
            && e.raw_os_error() != Some(libc::EINTR)
            && e.raw_os_error() != Some(libc::ETIME)
        {
            break;
        }
        let before = got;
        for c in ring.completion() {
            if let Some(r) = results.get_mut(c.user_data() as usize) {
                *r = Some(c.result());
                got += 1;
            }
        }
        if got == before {
            break;
        }
    }
    let mut arrive: Vec<Vec<Moved>> = (0..n).map(|_| Vec::new()).collect();
    let mut cancel: Vec<Vec<crate::worker::CallOff>> = (0..n).map(|_| Vec::new()).collect();
    for (i, (c, g)) in conns.into_iter().zip(&grants).enumerate() {
        let Some(g) = g else { continue };
        let key = (round, i as u32);
        let client = results[2 * i].filter(|&r| r >= 0).map(|r| g.client.unwrap_or(r as u32));
        let server_ok = results[2 * i + 1].is_some_and(|r| r >= 0);
        match (client, server_ok) {
            (Some(client_slot), true) => {
                arrive[target_of[i]].push(Moved { key, client_slot, state: c.state });
                acks[i].2 = true;
            }
            (client, _) => cancel[target_of[i]].push((key, client)),
        }
    }
    for (t, conns) in arrive.into_iter().enumerate().filter(|(_, v)| !v.is_empty()) {
        plan.targets[t].peer.send(Control::MoveArrive { from: uid, conns });
    }
    for (t, keys) in cancel.into_iter().enumerate().filter(|(_, v)| !v.is_empty()) {
        plan.targets[t].peer.send(Control::MoveCancel { from: uid, keys });
    }
    // Our table's references go; the sockets live on in the workers' tables.
    let _ = ring.submitter().register_files_update(0, &vec![-1; raw.len()]);
    acks
}
