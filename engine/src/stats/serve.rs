//! Serving the monitoring plane's clients (the stats socket and /metrics) so that no client can
//! hold up another, or the engine's exit.
//!
//! Each endpoint has one thread that polls its listener, a wake-up socket and every client, all
//! non-blocking, and a second thread that computes answers one at a time (a snapshot costs memory
//! in proportion to the servers, so a crowd of clients must not make many at once). A client has
//! [`REQUEST_DEADLINE`] from its accept to send its whole request and [`ANSWER_DEADLINE`] from the
//! moment its answer is ready to take all of it; past either it is closed. At most [`MAX_CLIENTS`]
//! are served at once: one more is accepted and closed at once, never queued. Requests are answered
//! in arrival order, and every client waiting with the same request when it is taken shares its
//! answer. Answers held for clients still reading them are limited to [`ANSWER_BUDGET`] bytes: past
//! it, the clients that have held theirs longest are closed. Dropping the [`Running`] handle sets a
//! flag and rings the wake-up: the poll thread returns at once whatever the clients do, closing
//! them all, and the answer thread after the answer in hand (a snapshot has its own deadline; a
//! reload stops waiting on the flag). Nothing here runs on a worker.

use crate::watch::Watch;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};

/// Clients served at once per endpoint; one more is closed as soon as it is accepted.
pub const MAX_CLIENTS: usize = 128;
/// From accept to the end of the request.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// From the answer being ready to its last byte taken by the client.
pub const ANSWER_DEADLINE: Duration = Duration::from_secs(5);
/// Bytes of answers held for clients still reading them, per endpoint.
pub const ANSWER_BUDGET: usize = 64 << 20;
/// How long accepting pauses after an error such as EMFILE (a level-triggered poll would spin).
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// What an endpoint speaks: one request, one answer, then the server closes.
pub(super) trait Protocol: Send + 'static {
    /// Most bytes of a request read; a longer one is taken as it is at this length.
    const MAX_REQUEST: usize;
    /// Whether `buf` holds a whole request.
    fn complete(buf: &[u8]) -> bool;
    /// The request in `buf` (whole, cut at `MAX_REQUEST`, or all the client sent before it closed
    /// its side), as the key clients share answers by; `None`: close without an answer.
    fn request(buf: &[u8]) -> Option<String>;
    /// The answer. `stop` is set when the endpoint shuts down (for an answer that waits).
    fn answer(&self, request: &str, stop: &AtomicBool) -> Vec<u8>;
}

/// A listening socket the loop accepts on.
pub(super) trait Listener: AsRawFd + Send + 'static {
    type Stream: Read + Write + AsRawFd + Send + 'static;
    fn nonblocking(&self) -> io::Result<()>;
    fn accept_stream(&self) -> io::Result<Self::Stream>;
    fn stream_nonblocking(s: &Self::Stream) -> io::Result<()>;
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    fn nonblocking(&self) -> io::Result<()> {
        self.set_nonblocking(true)
    }
    fn accept_stream(&self) -> io::Result<UnixStream> {
        self.accept().map(|(s, _)| s)
    }
    fn stream_nonblocking(s: &UnixStream) -> io::Result<()> {
        s.set_nonblocking(true)
    }
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    fn nonblocking(&self) -> io::Result<()> {
        self.set_nonblocking(true)
    }
    fn accept_stream(&self) -> io::Result<TcpStream> {
        self.accept().map(|(s, _)| s)
    }
    fn stream_nonblocking(s: &TcpStream) -> io::Result<()> {
        s.set_nonblocking(true)
    }
}

/// A served endpoint; dropping it stops the service and returns promptly.
pub(super) struct Running {
    stop: Arc<AtomicBool>,
    /// Set by [`Running::stop_accepting`]; `quiet` once the poll thread has seen it and holds no
    /// client.
    closing: Arc<AtomicBool>,
    quiet: Arc<AtomicBool>,
    wake: UnixStream,
    poll: Option<JoinHandle<()>>,
    answer: Option<JoinHandle<()>>,
}

impl Running {
    /// Accepts no more clients (the listening socket is shared with a process that takes them
    /// now) and goes on serving those it has.
    pub(super) fn stop_accepting(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let _ = (&self.wake).write(&[1]);
    }

    /// Accepts clients again (the process that took them over is gone).
    pub(super) fn resume_accepting(&self) {
        self.closing.store(false, Ordering::SeqCst);
        self.quiet.store(false, Ordering::SeqCst);
        let _ = (&self.wake).write(&[1]);
    }

    /// Accepting no more, and every client it had answered (or closed at its deadline).
    pub(super) fn quiet(&self) -> bool {
        self.quiet.load(Ordering::SeqCst)
    }
}

/// Serves `listener` with `protocol` on two threads named after `name`.
///
/// Both run under `watch`: a panic in either (a bug: answering catches its own) is reported as
/// the failure of a helper thread.
pub(super) fn start<L: Listener, P: Protocol>(
    name: &str,
    listener: L,
    protocol: P,
    watch: &Watch,
) -> io::Result<Running> {
    listener.nonblocking()?;
    let (wake, woken) = UnixStream::pair()?;
    wake.set_nonblocking(true)?;
    woken.set_nonblocking(true)?;
    let answered_wake = wake.try_clone()?;
    let (jobs_tx, jobs) = crossbeam_channel::unbounded::<String>();
    let (done, done_rx) = crossbeam_channel::unbounded::<Arc<[u8]>>();
    let stop = Arc::new(AtomicBool::new(false));
    let (closing, quiet) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let flag = stop.clone();
    let answer = watch.spawn(&format!("{name}-answers"), move || {
        answer_each(&protocol, &jobs, &done, &answered_wake, &flag);
        Ok::<(), std::convert::Infallible>(())
    })?;
    let state = Loop {
        listener,
        woken,
        clients: Vec::new(),
        jobs: jobs_tx,
        done: done_rx,
        stop: stop.clone(),
        closing: closing.clone(),
        quiet: quiet.clone(),
        inflight: None,
        seq: 0,
        accept_after: None,
        rules: Rules { max: P::MAX_REQUEST, complete: P::complete, request: P::request },
    };
    // (If this spawn fails, the job channel closes with `state` and the answer thread ends.)
    let poll = watch.spawn(name, move || {
        state.run();
        Ok::<(), std::convert::Infallible>(())
    })?;
    Ok(Running { stop, closing, quiet, wake, poll: Some(poll), answer: Some(answer) })
}

/// The answer thread: one request at a time, until the poll thread is gone or the flag is set.
fn answer_each<P: Protocol>(
    p: &P,
    jobs: &Receiver<String>,
    done: &Sender<Arc<[u8]>>,
    wake: &UnixStream,
    stop: &AtomicBool,
) {
    for request in jobs {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        // A panic while answering (a bug) costs this answer, not the endpoint: the client is
        // closed without one, and the panic message is on stderr.
        let answer = std::panic::catch_unwind(AssertUnwindSafe(|| p.answer(&request, stop))).unwrap_or_default();
        if done.send(answer.into()).is_err() {
            return;
        }
        let _ = (&*wake).write(&[1]);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = (&self.wake).write(&[1]);
        for t in [self.poll.take(), self.answer.take()].into_iter().flatten() {
            let _ = t.join();
        }
    }
}

enum Phase {
    /// Receiving the request (until `REQUEST_DEADLINE` after accept).
    Reading(Vec<u8>),
    /// The request is whole; its answer is queued or being computed. `seq` orders the requests.
    Waiting { request: String, seq: u64 },
    /// Sending the answer (until `ANSWER_DEADLINE` after `ready`).
    Writing { answer: Arc<[u8]>, at: usize, ready: Instant },
    /// To be closed at the end of this turn.
    Done,
}

struct Client<S> {
    stream: S,
    phase: Phase,
    /// For `Reading` and `Writing`.
    deadline: Instant,
}

/// The poll thread's state.
struct Loop<L: Listener> {
    listener: L,
    woken: UnixStream,
    clients: Vec<Client<L::Stream>>,
    jobs: Sender<String>,
    done: Receiver<Arc<[u8]>>,
    stop: Arc<AtomicBool>,
    /// Accept no more ([`Running::stop_accepting`]); `quiet`: seen, and no client left.
    closing: Arc<AtomicBool>,
    quiet: Arc<AtomicBool>,
    /// The request being answered, and the last `seq` given out when it was taken: the clients
    /// waiting for it then share its answer.
    inflight: Option<(String, u64)>,
    seq: u64,
    /// Accepting resumes then (after an accept error).
    accept_after: Option<Instant>,
    rules: Rules,
}

/// How the loop reads a request: the protocol's parts it needs.
struct Rules {
    max: usize,
    complete: fn(&[u8]) -> bool,
    request: fn(&[u8]) -> Option<String>,
}

impl<L: Listener> Loop<L> {
    fn run(mut self) {
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(2 + MAX_CLIENTS);
        while !self.stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            let closing = self.closing.load(Ordering::SeqCst);
            let accepting = !closing && self.accept_after.is_none_or(|t| now >= t);
            let fd = |fd: i32, events: i16| libc::pollfd { fd, events, revents: 0 };
            fds.clear();
            fds.push(fd(self.woken.as_raw_fd(), libc::POLLIN));
            // (A negative descriptor is skipped by poll.)
            fds.push(fd(if accepting { self.listener.as_raw_fd() } else { -1 }, libc::POLLIN));
            for c in &self.clients {
                let events = match c.phase {
                    Phase::Reading(_) => libc::POLLIN,
                    Phase::Writing { .. } => libc::POLLOUT,
                    Phase::Waiting { .. } | Phase::Done => 0,
                };
                fds.push(fd(c.stream.as_raw_fd(), events));
            }
            let next = self.clients.iter().filter(|c| matches!(c.phase, Phase::Reading(_) | Phase::Writing { .. }));
            let next = next.map(|c| c.deadline).chain(self.accept_after.filter(|_| !accepting)).min();
            // Rounded up, so a deadline is past when poll returns; -1: until woken.
            let ms = |t: Instant| t.saturating_duration_since(now).as_millis().saturating_add(1).min(i32::MAX as u128);
            let timeout = next.map_or(-1, |t| ms(t) as i32);
            if let Err(e) = crate::sys::poll(&mut fds, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    // Not expected (EFAULT/EINVAL/ENOMEM): do not spin on it.
                    std::thread::sleep(ACCEPT_PAUSE);
                }
                continue;
            }
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            if fds[0].revents != 0 {
                let mut sink = [0u8; 64];
                while matches!((&self.woken).read(&mut sink), Ok(n) if n > 0) {}
            }
            let now = Instant::now();
            for (c, p) in self.clients.iter_mut().zip(&fds[2..]) {
                if p.revents != 0 {
                    self.seq += 1;
                    step(c, p.revents, self.seq, &self.rules);
                }
                let timed = matches!(c.phase, Phase::Reading(_) | Phase::Writing { .. });
                if timed && now >= c.deadline {
                    c.phase = Phase::Done;
                }
            }
            self.collect_answers(now);
            self.clients.retain(|c| !matches!(c.phase, Phase::Done));
            if accepting && fds[1].revents != 0 {
                self.accept(now);
            }
            self.dispatch();
            // (Read again: set during this turn's poll, it has woken it; a client this turn
            // accepted before it was seen is served.)
            self.quiet.store(self.closing.load(Ordering::SeqCst) && self.clients.is_empty(), Ordering::SeqCst);
        }
    }

    /// Accepts every pending connection: a client while there is room, else closed at once.
    fn accept(&mut self, now: Instant) {
        loop {
            match self.listener.accept_stream() {
                Ok(s) if self.clients.len() < MAX_CLIENTS && L::stream_nonblocking(&s).is_ok() => {
                    let phase = Phase::Reading(Vec::new());
                    self.clients.push(Client { stream: s, phase, deadline: now + REQUEST_DEADLINE });
                }
                Ok(refused) => drop(refused),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted) => {}
                Err(_) => {
                    // Out of descriptors or memory: the pending connections wait in the backlog.
                    self.accept_after = Some(now + ACCEPT_PAUSE);
                    return;
                }
            }
        }
    }

    /// Hands the oldest waiting request to the answer thread, if it is free.
    fn dispatch(&mut self) {
        if self.inflight.is_some() {
            return;
        }
        let oldest = self.clients.iter().filter_map(|c| match &c.phase {
            Phase::Waiting { request, seq } => Some((seq, request)),
            _ => None,
        });
        let Some((_, request)) = oldest.min_by_key(|(seq, _)| **seq) else { return };
        if self.jobs.send(request.clone()).is_ok() {
            self.inflight = Some((request.clone(), self.seq));
        } else {
            self.give_up_waiting();
        }
    }

    /// Gives each answer to the clients waiting for it, then keeps what they hold within budget.
    fn collect_answers(&mut self, now: Instant) {
        loop {
            let answer = match self.done.try_recv() {
                Ok(answer) => answer,
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => return self.give_up_waiting(),
            };
            let Some((request, taken)) = self.inflight.take() else { continue };
            for c in &mut self.clients {
                let ours = matches!(&c.phase, Phase::Waiting { request: r, seq } if *r == request && *seq <= taken);
                if ours {
                    c.phase = match answer.is_empty() {
                        true => Phase::Done,
                        false => Phase::Writing { answer: answer.clone(), at: 0, ready: now },
                    };
                    c.deadline = now + ANSWER_DEADLINE;
                }
            }
            self.within_budget(&answer);
        }
    }

    /// Closes the clients that have held their answers longest while the answers held (each
    /// counted once, however many clients share it) exceed [`ANSWER_BUDGET`]; never those of
    /// `newest`.
    fn within_budget(&mut self, newest: &Arc<[u8]>) {
        loop {
            let mut held: Vec<(usize, usize)> = (self.clients.iter())
                .filter_map(|c| match &c.phase {
                    Phase::Writing { answer, .. } => Some((answer.as_ptr() as usize, answer.len())),
                    _ => None,
                })
                .collect();
            held.sort_unstable();
            held.dedup();
            if held.iter().map(|(_, len)| len).sum::<usize>() <= ANSWER_BUDGET {
                return;
            }
            let oldest = (self.clients.iter_mut())
                .filter(|c| matches!(&c.phase, Phase::Writing { answer, .. } if !Arc::ptr_eq(answer, newest)))
                .min_by_key(|c| match c.phase {
                    Phase::Writing { ready, .. } => ready,
                    _ => unreachable!("filtered on Writing"),
                });
            match oldest {
                Some(c) => c.phase = Phase::Done,
                None => return,
            }
        }
    }

    /// The answer thread is gone (it only ends when told to): nobody waiting will get an answer.
    fn give_up_waiting(&mut self) {
        self.inflight = None;
        for c in &mut self.clients {
            if matches!(c.phase, Phase::Waiting { .. }) {
                c.phase = Phase::Done;
            }
        }
    }
}

/// Moves one client on after poll reported `revents` for it.
fn step<S: Read + Write>(c: &mut Client<S>, revents: i16, seq: u64, rules: &Rules) {
    match &mut c.phase {
        Phase::Reading(buf) => {
            let mut chunk = [0u8; 1024];
            // Until the request is whole, at its size limit, or the client closed its side.
            while buf.len() < rules.max && !(rules.complete)(buf) {
                let room = (rules.max - buf.len()).min(chunk.len());
                match c.stream.read(&mut chunk[..room]) {
                    Ok(0) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(_) => {
                        c.phase = Phase::Done;
                        return;
                    }
                }
            }
            c.phase = match (rules.request)(buf) {
                Some(request) => Phase::Waiting { request, seq },
                None => Phase::Done,
            };
        }
        Phase::Writing { answer, at, .. } => {
            while *at < answer.len() {
                match c.stream.write(&answer[*at..]) {
                    Ok(0) => break,
                    Ok(n) => *at += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(_) => break,
                }
            }
            c.phase = Phase::Done;
        }
        // Gone before its answer (poll reports hang-ups even when asked for nothing).
        Phase::Waiting { .. } if revents & (libc::POLLHUP | libc::POLLERR) != 0 => c.phase = Phase::Done,
        Phase::Waiting { .. } | Phase::Done => {}
    }
}
