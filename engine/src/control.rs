//! Messages between threads (main ↔ workers, worker ↔ worker) and how a worker is woken for them.
//!
//! Each worker owns a crossbeam receiver and an eventfd; its ring keeps a read armed on the eventfd,
//! so a sender pushes the message and then signals the eventfd. This is the control plane only:
//! share lending, stats snapshots, drain. The data path never sends or waits on these channels.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;

use crate::admin::ServerOp;
use crate::limits::ShareMsg;
use crate::stats::WorkerStats;
use crate::sys::EventFd;

pub enum Control {
    /// Lending protocol for maxconn shares.
    Share(ShareMsg),
    /// Lending protocol for `rate_limit` shares (worker/rate.rs).
    Rate(crate::worker::RateMsg),
    /// Send a copy of your counters, with the server rows (and their sources and latency
    /// buckets) of `rows` only: a query asks for the rows in slices, one per loop turn.
    /// The counters, with the server rows `rows`; the first one's sources from `sources_from`
    /// (more than 0: its row came in the slice before, which ended inside its sources); no
    /// source row unless `sources`.
    Snapshot { rows: std::ops::Range<usize>, sources_from: usize, sources: bool, reply: Sender<WorkerStats> },
    /// Stop accepting; finish open connections until the drain deadline, then exit.
    Drain,
    /// A health check changed a server's state (indices into the configuration).
    ServerState { backend: usize, server: usize, up: bool },
    /// The runtime API changes one server (indices into the configuration); `done` hears once it
    /// is applied.
    Server { backend: usize, server: usize, op: ServerOp, done: Sender<()> },
    /// `add server`: `config` is the running one with the new server as server `server` of
    /// backend `backend`: appended, or in the place of a deleted one; the worker takes it and sets
    /// the server up. `done` hears once it has.
    AddServer {
        backend: usize,
        server: usize,
        config: Arc<crate::config::Config>,
        /// This worker's addresses and sources for the server, made by the sender.
        addrs: Box<crate::sources::ServerAddrs>,
        done: Sender<()>,
    },
    /// One slice of `show conns`: up to `limit` of this worker's connections that `filter`
    /// matches, one line each, looking from entry `from` of its connection table on; the answer
    /// has the worker's id and the entry the next slice starts from (`None`: the table's end).
    ListConns {
        filter: crate::admin::ConnMatch,
        from: u32,
        limit: usize,
        reply: Sender<(usize, Vec<String>, Option<u32>)>,
    },
    /// Re-arm every accept: the engine this one replaced has stopped accepting on the shared
    /// listening sockets, and a wakeup for a queued connection may have gone to one of its
    /// cancelled accepts (accept waits are exclusive: the kernel wakes one waiter per connection).
    RearmAccepts,
    /// A reload: stop accepting and move established connections to the new engine (worker/
    /// moving.rs).
    MoveTo(Arc<crate::worker::MovePlan>),
    /// Connections offered by worker `from` (a process-wide worker id) of an older engine; the
    /// answer goes to `reply`.
    MoveOffer { from: u64, reply: Peer, items: Vec<crate::worker::MoveOffer> },
    /// The answer to an offer from worker `worker` (its index in its engine): per connection, the
    /// slots granted, or refused.
    MoveGrant { worker: usize, items: Vec<((u32, u32), Option<crate::worker::Grant>)> },
    /// Connections whose sockets are now in the slots granted to them.
    MoveArrive { from: u64, conns: Vec<crate::conn::Moved> },
    /// Grants called off (with the accept slot the client socket reached, if it did).
    MoveCancel { from: u64, keys: Vec<crate::worker::CallOff> },
    /// A binary upgrade: stop accepting and hand established connections to the new process
    /// through the courier.
    ExportTo(Arc<crate::worker::ExportPlan>),
    /// The new process took the exported connection `key` (it leaves), or did not (it stays).
    ExportAck { key: (u32, u32), taken: bool },
}

/// A `show conns` slice, one loop turn of a worker: the connection table's entries it looks at,
/// and the lines it formats. A line takes 2-3 µs (release build, the benchmark host: 256 per
/// slice made turns of 0.65-0.73 ms), so a listing holds a worker for about 0.3 ms at a time, over
/// as many turns as it takes (`HOLD=9000 VIEWS=conns scripts/stats-turns.sh`).
pub const CONNS_SCANNED_PER_TURN: usize = 4096;
pub const CONNS_LISTED_PER_TURN: usize = 128;

/// Sends every worker the message `make` builds around a reply channel, and gathers the answers
/// that come within `wait` (one deadline for all: a busy engine answers late, not N times late).
/// Returns how many workers were asked (those that have exited are not) and their answers.
/// `make` is called once per worker, in worker order, those that have exited included.
pub fn ask_all<T>(peers: &[Peer], wait: Duration, make: impl FnMut(Sender<T>) -> Control) -> (usize, Vec<T>) {
    ask(peers, std::time::Instant::now() + wait, make)
}

/// [`ask_all`] for some of the workers, with a deadline.
pub fn ask<'a, T>(
    peers: impl IntoIterator<Item = &'a Peer>,
    deadline: std::time::Instant,
    mut make: impl FnMut(Sender<T>) -> Control,
) -> (usize, Vec<T>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let asked = peers.into_iter().filter(|p| p.send(make(tx.clone()))).count();
    drop(tx);
    let answers = (0..asked).map_while(|_| rx.recv_deadline(deadline).ok()).collect();
    (asked, answers)
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
