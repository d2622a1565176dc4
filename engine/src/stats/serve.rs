//! Serving the monitoring plane's clients (the stats socket and /metrics) so that no client can
//! hold up another, or the engine's exit.
//!
//! Each endpoint has one thread that polls its listener, a wake-up socket and every client, all
//! non-blocking, and a second thread that computes answers one at a time (a snapshot costs memory
//! in proportion to the servers, so a crowd of clients must not make many at once). A request that
//! another thread carries out (an admin command, done by the supervisor: an `upgrade` waits until
//! the new process serves, up to 30 s) holds up no other: the answer thread hands it over, goes on
//! with the next, and sends its answer when it comes ([`Reply::Later`]). A client has
//! [`REQUEST_DEADLINE`] from its accept to send its whole request and [`ANSWER_DEADLINE`] from the
//! moment its answer is ready to take all of it; past either it is closed. At most [`MAX_CLIENTS`]
//! are served at once: one more is accepted and closed at once, never queued. Requests are taken
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

/// What the answer thread makes of a request.
pub(super) enum Reply<L> {
    /// The answer.
    Now(Vec<u8>),
    /// Handed to another thread, which sends what the answer is made of on the channel by the
    /// deadline; other requests are answered meanwhile.
    Later(Receiver<L>, Instant),
}

/// What an endpoint speaks: one request, one answer, then the server closes.
pub(super) trait Protocol: Send + 'static {
    /// What a [`Reply::Later`] answer is made of.
    type Later: Send + 'static;
    /// Most bytes of a request read; a longer one is taken as it is at this length.
    const MAX_REQUEST: usize;
    /// Whether `buf` holds a whole request.
    fn complete(buf: &[u8]) -> bool;
    /// The request in `buf` (whole, cut at `MAX_REQUEST`, or all the client sent before it closed
    /// its side), as the key clients share answers by; `None`: close without an answer.
    fn request(buf: &[u8]) -> Option<String>;
    /// The answer, or the channel it will come on.
    fn answer(&self, request: &str) -> Reply<Self::Later>;
    /// The answer from what came on a [`Reply::Later`] channel; `None`: nothing came by its
    /// deadline, or its sender is gone.
    fn settle(&self, later: Option<Self::Later>) -> Vec<u8>;
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
    let (jobs_tx, jobs) = crossbeam_channel::unbounded::<(u64, String)>();
    let (done, done_rx) = crossbeam_channel::unbounded::<Out>();
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
        busy: None,
        jobs_given: 0,
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

/// What the answer thread tells the poll thread.
enum Out {
    /// The answer to a job.
    Answer(u64, Arc<[u8]>),
    /// A job handed to another thread: its answer comes later, the answer thread is free.
    Handed(u64),
}

/// How often the answer thread looks at the stop flag while it waits.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// The answer thread: one request at a time, and the answers handed to other threads as they
/// come, until the poll thread is gone or the flag is set.
fn answer_each<P: Protocol>(
    p: &P,
    jobs: &Receiver<(u64, String)>,
    done: &Sender<Out>,
    wake: &UnixStream,
    stop: &AtomicBool,
) {
    // Jobs handed to other threads: their channel and deadline.
    let mut later: Vec<(u64, Receiver<P::Later>, Instant)> = Vec::new();
    let send = |out: Out| {
        let sent = done.send(out).is_ok();
        let _ = (&*wake).write(&[1]);
        sent
    };
    // A panic while answering (a bug) costs this answer, not the endpoint: the client is closed
    // without one, and the panic message is on stderr.
    let settle = |l: Option<P::Later>| std::panic::catch_unwind(AssertUnwindSafe(|| p.settle(l))).unwrap_or_default();
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        // Those past their deadline are answered as such.
        while let Some(k) = later.iter().position(|l| l.2 <= now) {
            let (job, _, _) = later.swap_remove(k);
            if !send(Out::Answer(job, settle(None).into())) {
                return;
            }
        }
        let until = later.iter().map(|l| l.2).min().map_or(now + STOP_CHECK, |d| d.min(now + STOP_CHECK));
        let mut select = crossbeam_channel::Select::new();
        select.recv(jobs);
        for (_, rx, _) in &later {
            select.recv(rx);
        }
        let Ok(op) = select.select_deadline(until) else { continue };
        let k = op.index();
        if k == 0 {
            let Ok((job, request)) = op.recv(jobs) else { return };
            let out = match std::panic::catch_unwind(AssertUnwindSafe(|| p.answer(&request))) {
                Ok(Reply::Now(answer)) => Out::Answer(job, answer.into()),
                Ok(Reply::Later(rx, deadline)) => {
                    later.push((job, rx, deadline));
                    Out::Handed(job)
                }
                Err(_) => Out::Answer(job, Arc::from(Vec::new())),
            };
            if !send(out) {
                return;
            }
        } else {
            let got = op.recv(&later[k - 1].1).ok();
            let (job, _, _) = later.swap_remove(k - 1);
            if !send(Out::Answer(job, settle(got).into())) {
                return;
            }
        }
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
    /// The request is whole; its answer is queued (`job` none yet), being computed, or coming
    /// from another thread. `seq` orders the requests.
    Waiting { request: String, seq: u64, job: Option<u64> },
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
    jobs: Sender<(u64, String)>,
    done: Receiver<Out>,
    stop: Arc<AtomicBool>,
    /// Accept no more ([`Running::stop_accepting`]); `quiet`: seen, and no client left.
    closing: Arc<AtomicBool>,
    quiet: Arc<AtomicBool>,
    /// The job the answer thread is computing (the next waits until it is answered or handed
    /// over); `jobs_given` numbers them.
    busy: Option<u64>,
    jobs_given: u64,
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

    /// Hands the oldest request not yet taken to the answer thread, if it is free: every client
    /// waiting with the same request shares the job.
    fn dispatch(&mut self) {
        if self.busy.is_some() {
            return;
        }
        let oldest = self.clients.iter().filter_map(|c| match &c.phase {
            Phase::Waiting { request, seq, job: None } => Some((seq, request)),
            _ => None,
        });
        let Some((_, request)) = oldest.min_by_key(|(seq, _)| **seq) else { return };
        let (request, job) = (request.clone(), self.jobs_given);
        if self.jobs.send((job, request.clone())).is_err() {
            return self.give_up_waiting();
        }
        self.jobs_given += 1;
        self.busy = Some(job);
        for c in &mut self.clients {
            if let Phase::Waiting { request: r, job: j @ None, .. } = &mut c.phase
                && *r == request
            {
                *j = Some(job);
            }
        }
    }

    /// Gives each answer to the clients waiting for it, then keeps what they hold within budget.
    fn collect_answers(&mut self, now: Instant) {
        loop {
            let (job, answer) = match self.done.try_recv() {
                Ok(Out::Answer(job, answer)) => (job, answer),
                Ok(Out::Handed(job)) => {
                    self.busy = self.busy.filter(|&b| b != job);
                    continue;
                }
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => return self.give_up_waiting(),
            };
            self.busy = self.busy.filter(|&b| b != job);
            for c in &mut self.clients {
                if matches!(c.phase, Phase::Waiting { job: j, .. } if j == Some(job)) {
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
        self.busy = None;
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
                Some(request) => Phase::Waiting { request, seq, job: None },
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// Answers "fast" at once; hands "slow" to the test (which answers on the channel it gets, or
    /// not), with a deadline of 300 ms for "late".
    struct Handing {
        handed: Sender<Sender<String>>,
    }

    impl Protocol for Handing {
        type Later = String;
        const MAX_REQUEST: usize = 64;
        fn complete(buf: &[u8]) -> bool {
            buf.contains(&b'\n')
        }
        fn request(buf: &[u8]) -> Option<String> {
            std::str::from_utf8(buf).ok().map(|l| l.trim().to_owned())
        }
        fn answer(&self, request: &str) -> Reply<String> {
            let deadline = Duration::from_millis(if request == "late" { 300 } else { 30_000 });
            if request == "fast" {
                return Reply::Now(b"fast answer\n".to_vec());
            }
            let (tx, rx) = crossbeam_channel::bounded(1);
            self.handed.send(tx).unwrap();
            Reply::Later(rx, Instant::now() + deadline)
        }
        fn settle(&self, later: Option<String>) -> Vec<u8> {
            later.unwrap_or_else(|| "no answer in time\n".into()).into_bytes()
        }
    }

    fn ask(path: &PathBuf, line: &str) -> UnixStream {
        let mut c = UnixStream::connect(path).unwrap();
        c.write_all(format!("{line}\n").as_bytes()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c
    }

    fn read_all(mut c: UnixStream) -> String {
        let mut text = String::new();
        c.read_to_string(&mut text).unwrap();
        text
    }

    /// A request handed to another thread holds up no other: requests behind it are answered
    /// while it waits; its answer reaches its client when it comes, in any order; one with nothing
    /// by its deadline gets what the protocol says then. Real sockets, the real threads.
    #[test]
    fn a_request_answered_later_holds_up_no_other() {
        let dir = std::env::temp_dir().join(format!("ringproxy-serve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let (handed, handed_rx) = crossbeam_channel::unbounded();
        let running =
            start("t-serve", UnixListener::bind(&path).unwrap(), Handing { handed }, &Watch::detached()).unwrap();
        let slow = ask(&path, "slow");
        let first = handed_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        // Asked while the first is out: a job of its own (the first was taken before it came).
        let slow_again = ask(&path, "slow");
        let second = handed_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let late = ask(&path, "late");
        let _expires = handed_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        for _ in 0..3 {
            assert_eq!(read_all(ask(&path, "fast")), "fast answer\n", "answered while three wait");
        }
        second.send("the second slow one\n".into()).unwrap();
        assert_eq!(read_all(slow_again), "the second slow one\n");
        assert_eq!(read_all(late), "no answer in time\n", "its deadline passed");
        first.send("the first slow one\n".into()).unwrap();
        assert_eq!(read_all(slow), "the first slow one\n");
        // A sender dropped without a word: the same as a deadline passed.
        let dropped = ask(&path, "slow");
        drop(handed_rx.recv_timeout(Duration::from_secs(10)).unwrap());
        assert_eq!(read_all(dropped), "no answer in time\n");
        drop(running);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
