//! Prometheus text exposition (format 0.0.4) of [`EngineStats`], and the optional /metrics endpoint.
//!
//! Every per-worker series carries a `worker` label, so uneven spread and one saturated core show up
//! directly in PromQL. The endpoint is served off the data path by `serve` (clients at once, each
//! within deadlines, under a cap): each scrape asks the workers for a snapshot like any other stats
//! reader, and scrapers waiting at the same time share one.

use crate::watch::Watch;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};

use super::{EngineStats, FrontendStats, SourceStats, WorkerStats, serve};

/// One value of a labelled family, read from a worker's counters.
type Part<'a> = (&'a str, &'a dyn Fn(&WorkerStats) -> u64);

/// The same, read from a worker's row of a frontend.
type FrontendPart<'a> = (&'a str, &'a dyn Fn(&FrontendStats) -> u64);

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP ringproxy_{name} {help}");
        let _ = writeln!(self.out, "# TYPE ringproxy_{name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let _ = write!(self.out, "ringproxy_{name}");
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A per-worker family: one sample per worker.
    fn per_worker(&mut self, s: &EngineStats, name: &str, kind: &str, help: &str, f: impl Fn(&WorkerStats) -> u64) {
        self.head(name, kind, help);
        for w in &s.workers {
            let id = w.worker.to_string();
            self.sample(name, &[("worker", &id)], f(w));
        }
    }

    /// A per-worker family of times in seconds (microsecond precision).
    fn per_worker_seconds(
        &mut self,
        s: &EngineStats,
        name: &str,
        kind: &str,
        help: &str,
        f: impl Fn(&WorkerStats) -> f64,
    ) {
        self.head(name, kind, help);
        for w in &s.workers {
            let id = w.worker.to_string();
            self.sample(name, &[("worker", &id)], format_args!("{:.6}", f(w)));
        }
    }

    /// A per-worker family split by one more label.
    fn per_worker_by(&mut self, s: &EngineStats, name: &str, kind: &str, help: &str, label: &str, parts: &[Part]) {
        self.head(name, kind, help);
        for w in &s.workers {
            let id = w.worker.to_string();
            for (value, f) in parts {
                self.sample(name, &[("worker", &id), (label, value)], f(w));
            }
        }
    }
}

impl Family<'_> {
    /// A per-worker, per-frontend family: one sample per worker and frontend, with `value`
    /// formatting each.
    fn per_frontend<V: std::fmt::Display>(
        &mut self,
        s: &EngineStats,
        (name, kind, help): (&str, &str, &str),
        value: impl Fn(&FrontendStats) -> V,
    ) {
        self.head(name, kind, help);
        for w in &s.workers {
            let id = w.worker.to_string();
            for f in &w.frontends {
                self.sample(name, &[("worker", &id), ("frontend", &f.frontend)], value(f));
            }
        }
    }

    /// A per-worker, per-frontend family split by one more label.
    fn per_frontend_by(
        &mut self,
        s: &EngineStats,
        (name, kind, help): (&str, &str, &str),
        label: &str,
        parts: &[FrontendPart],
    ) {
        self.head(name, kind, help);
        for w in &s.workers {
            let id = w.worker.to_string();
            for f in &w.frontends {
                for (value, get) in parts {
                    self.sample(name, &[("worker", &id), ("frontend", &f.frontend), (label, value)], get(f));
                }
            }
        }
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The whole exposition.
/// Servers with at most this many sources on a worker get a series per source; every server with
/// sources gets their sums.
pub const PER_SOURCE_SERIES: usize = 64;

/// A worker's source rows, one run per server (they come in server order).
fn source_runs(w: &WorkerStats) -> impl Iterator<Item = &[SourceStats]> {
    w.sources.chunk_by(|a, b| a.backend == b.backend && a.server == b.server)
}

pub fn render(s: &EngineStats) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let mut m = Family { out: &mut out };
    m.head("maxconn", "gauge", "Global maxconn in force (effective) and as configured (0: not set).");
    m.sample("maxconn", &[("kind", "effective")], s.effective_maxconn);
    m.sample("maxconn", &[("kind", "configured")], s.configured_maxconn.unwrap_or(0));
    m.head("uptime_seconds", "gauge", "Seconds since the engine started.");
    m.sample("uptime_seconds", &[], s.uptime_s);
    m.per_worker(s, "connections_active", "gauge", "Proxied connections open now.", |w| w.active);
    m.per_worker(s, "connections_closing", "gauge", "Connections being closed (not counted as active).", |w| w.closing);
    m.per_worker(s, "connections_accepted_total", "counter", "Connections accepted and admitted.", |w| w.accepted);
    m.per_worker(s, "connections_closed_total", "counter", "Proxied connections closed.", |w| w.closed);
    m.per_worker(s, "connections_parked", "gauge", "Accepted connections waiting for a maxconn slot.", |w| w.parked);
    m.per_worker(
        s,
        "connections_failed_total",
        "counter",
        "Connections that reached no server within the retries.",
        |w| w.failed,
    );
    m.per_worker(s, "queue_current", "gauge", "Connections waiting in a backend queue.", |w| w.queued);
    m.per_worker(s, "queued_total", "counter", "Connections that had to wait in a backend queue.", |w| w.queued_total);
    m.per_worker(s, "retries_total", "counter", "Connect attempts retried on another server.", |w| w.retries);
    m.per_worker_by(
        s,
        "limit_hits_total",
        "counter",
        "Times admission stopped at a maxconn, by level.",
        "level",
        &[
            ("global", &|w| w.limit_hits.global),
            ("frontend", &|w| w.limit_hits.frontend),
            ("backend", &|w| w.limit_hits.backend),
            ("server", &|w| w.limit_hits.server),
            ("rate", &|w| w.limit_hits.rate),
        ],
    );
    m.per_worker_by(
        s,
        "connect_errors_total",
        "counter",
        "Failed connects to servers, by cause.",
        "cause",
        &[
            ("refused", &|w| w.connect_errors.refused),
            ("timeout", &|w| w.connect_errors.timeout),
            ("port_exhausted", &|w| w.connect_errors.port_exhausted),
            ("unreachable", &|w| w.connect_errors.unreachable),
            ("other", &|w| w.connect_errors.other),
        ],
    );
    m.per_worker_by(
        s,
        "timeouts_total",
        "counter",
        "Connections closed by a timeout, by kind (connect timeouts are connect errors).",
        "kind",
        &[("client", &|w| w.timeouts.client), ("server", &|w| w.timeouts.server), ("queue", &|w| w.timeouts.queue)],
    );
    m.per_worker_by(
        s,
        "resets_total",
        "counter",
        "Connections ended by a reset, by the side that reset.",
        "side",
        &[("client", &|w| w.resets_from_client), ("server", &|w| w.resets_from_server)],
    );
    m.per_worker(
        s,
        "connections_denied_total",
        "counter",
        "Connections refused by a frontend's allow/deny list.",
        |w| w.denied,
    );
    m.per_worker(
        s,
        "connections_killed_total",
        "counter",
        "Connections closed by the operator (shutdown sessions server).",
        |w| w.killed,
    );
    m.per_worker_by(
        s,
        "source_refused_total",
        "counter",
        "Connections refused by a frontend's maxconn_per_source / rate_per_source, by cause.",
        "cause",
        &[
            ("maxconn", &|w| w.source_refused.maxconn),
            ("rate", &|w| w.source_refused.rate),
            ("table_full", &|w| w.source_refused.table_full),
        ],
    );
    m.per_worker(s, "sources_tracked", "gauge", "Client sources tracked for per-source limits.", |w| w.sources_tracked);
    m.per_worker(
        s,
        "connections_lifetime_ends_total",
        "counter",
        "Connections closed at their frontend's timeout.lifetime.",
        |w| w.lifetime_ends,
    );
    m.per_worker_by(
        s,
        "connections_moved_total",
        "counter",
        "Established connections moved between engines on reload, by direction (in: from the engine replaced).",
        "direction",
        &[("in", &|w| w.moved_in), ("out", &|w| w.moved_out)],
    );
    m.per_worker_by(
        s,
        "connection_moves_kept_total",
        "counter",
        "Moves that did not happen (refused by the new engine, failed in the kernel): the connection stayed.",
        "cause",
        &[("refused", &|w| w.move_refused), ("failed", &|w| w.move_failed)],
    );
    m.per_worker_by(
        s,
        "bytes_total",
        "counter",
        "Bytes forwarded, by direction.",
        "direction",
        &[("client_to_server", &|w| w.bytes_client_to_server), ("server_to_client", &|w| w.bytes_server_to_client)],
    );
    m.per_worker(s, "splices_total", "counter", "Splice chunks (socket to pipe to socket) started.", |w| w.splices);
    m.per_worker(
        s,
        "inline_splices_total",
        "counter",
        "Splice chunks moved by system calls on the worker's thread.",
        |w| w.inline_splices,
    );
    m.per_worker(s, "splice_fds", "gauge", "Process descriptors held for splicing on the worker's thread.", |w| {
        w.splice_fds
    });
    m.per_worker(s, "ring_recvs_total", "counter", "Receives into the ring's buffers that brought bytes.", |w| {
        w.ring_recvs
    });
    m.per_worker(s, "ring_recv_buffers_total", "counter", "Receive buffers those receives filled.", |w| {
        w.ring_recv_bufs
    });
    m.per_worker(s, "ring_sends_total", "counter", "Sends of received buffers started.", |w| w.ring_sends);
    m.per_worker(
        s,
        "ring_recv_merged_total",
        "counter",
        "Receives copied behind the bytes queued before them, their buffer given back at once.",
        |w| w.ring_recv_merged,
    );
    m.per_worker(s, "ring_queued_bytes", "gauge", "Bytes received and not sent on yet, in receive buffers.", |w| {
        w.ring_queued_bytes
    });
    m.per_worker(s, "zerocopy_sends_total", "counter", "Sends that went zero-copy (tune.send_zerocopy).", |w| {
        w.zerocopy_sends
    });
    m.per_worker(s, "zerocopy_copied_total", "counter", "Zero-copy sends the kernel said it copied after all.", |w| {
        w.zerocopy_copied
    });
    m.per_worker(
        s,
        "zerocopy_pending",
        "gauge",
        "Zero-copy sends whose notification has not come; their buffers are held.",
        |w| w.zerocopy_pending,
    );
    m.per_worker(
        s,
        "bulk_splicing",
        "gauge",
        "splice: auto: 1 while bulk flows splice, 0 while they use receive buffers.",
        |w| w.bulk_splicing,
    );
    m.per_worker(s, "bulk_path_switches_total", "counter", "Changes of the bulk path (probes included).", |w| {
        w.bulk_path_switches
    });
    m.per_worker(
        s,
        "bulk_cost_copy_ps_per_byte",
        "gauge",
        "Worker CPU per byte through receive buffers, last measured.",
        |w| w.bulk_cost_copy_ps,
    );
    m.per_worker(s, "bulk_cost_splice_ps_per_byte", "gauge", "Worker CPU per byte spliced, last measured.", |w| {
        w.bulk_cost_splice_ps
    });
    m.per_worker_by(
        s,
        "pipes",
        "gauge",
        "Splice pipes lent to connections and kept in the pool.",
        "state",
        &[("in_use", &|w| w.pipes_in_use), ("pooled", &|w| w.pipes_pooled)],
    );
    m.per_worker(s, "pipe_waits_total", "counter", "Times a connection waited for a free pipe.", |w| w.pipe_waits);
    m.per_worker(s, "recv_buffers_resident_bytes", "gauge", "Bytes of the receive buffers' pages resident now.", |w| {
        w.recv_buffers_resident
    });
    m.per_worker_by(
        s,
        "buffers",
        "gauge",
        "Buffers lent to connections (receive, chunk and PROXY header buffers) and kept in the pool.",
        "state",
        &[("in_use", &|w| w.buffers_in_use), ("pooled", &|w| w.buffers_pooled)],
    );
    m.per_worker(s, "buffer_waits_total", "counter", "Times a receive waited for a free receive buffer.", |w| {
        w.buffer_waits
    });
    m.per_worker(
        s,
        "ring_spilled_bytes",
        "gauge",
        "Bytes waiting for a destination with no room, copied out of the receive buffers.",
        |w| w.ring_spilled_bytes,
    );
    m.per_worker(s, "ring_spills_total", "counter", "Times a send queue was copied out of the receive buffers.", |w| {
        w.ring_spills
    });
    m.per_worker(
        s,
        "early_receives",
        "gauge",
        "Connections not yet connected to a server whose client's receive is armed (at most recv_buffers / 4).",
        |w| w.early_receives,
    );
    m.per_worker(s, "maxconn_share", "gauge", "This worker's share of the global maxconn.", |w| w.global_share);
    m.per_worker(s, "maxconn_share_lent_total", "counter", "maxconn share lent to other workers.", |w| w.share_lent);
    m.per_worker(s, "maxconn_share_borrowed_total", "counter", "maxconn share borrowed from other workers.", |w| {
        w.share_borrowed
    });
    m.per_worker(s, "ring_submissions_total", "counter", "io_uring submission entries pushed.", |w| w.ring.submitted);
    m.per_worker(s, "ring_completions_total", "counter", "io_uring completions reaped.", |w| w.ring.completions);
    m.per_worker(s, "ring_sq_full_total", "counter", "Times the submission queue was full and flushed early.", |w| {
        w.ring.sq_full
    });
    m.per_worker(s, "ring_cq_overflow", "gauge", "io_uring completion queue overflows reported by the kernel.", |w| {
        w.ring.cq_overflow
    });
    m.per_worker(s, "ring_enter_total", "counter", "io_uring_enter calls (submit and wait).", |w| w.ring.enter_calls);
    m.per_worker(
        s,
        "ring_batched_waits_total",
        "counter",
        "Waits that let completions gather (tune.batch_wait).",
        |w| w.ring.batched_waits,
    );
    m.per_worker(
        s,
        "ring_reply_waits_total",
        "counter",
        "Of them, short ones after the worker forwarded messages, for their answers (batch_wait auto).",
        |w| w.ring.reply_waits,
    );
    m.per_worker(s, "batching", "gauge", "1 while the worker's waits let completions gather (tune.batch_wait).", |w| {
        w.batching
    });
    m.per_worker(
        s,
        "quiet_messages_total",
        "counter",
        "Messages received on a flow quiet for 100 ms before them (heartbeats, pushes).",
        |w| w.quiet_messages,
    );
    m.per_worker(
        s,
        "busy_messages_total",
        "counter",
        "Messages received on a busy flow (request/response loops, bulk, a new connection's first).",
        |w| w.busy_messages,
    );
    m.per_worker(
        s,
        "idle_polled",
        "gauge",
        "Directions of idle connections whose receive is swapped for a poll (tune.idle_poll_after).",
        |w| w.idle_polled,
    );
    m.per_worker(
        s,
        "idle_poll_swaps_total",
        "counter",
        "Receives of idle connections swapped for a poll (tune.idle_poll_after).",
        |w| w.idle_poll_swaps,
    );
    m.per_worker(s, "loop_iterations_total", "counter", "Event-loop turns.", |w| w.loop_iterations);
    m.per_worker_seconds(s, "loop_busy_seconds_total", "counter", "Time the event loop spent handling events.", |w| {
        w.busy_ns as f64 / 1e9
    });
    m.per_worker_by(
        s,
        "loop_slow_turns_total",
        "counter",
        "Event-loop turns that took at least this long (wall time from waking to the next wait): every connection of the worker waited that long.",
        "over",
        &[
            ("1ms", &|w| w.slow_turns.over_1ms),
            ("10ms", &|w| w.slow_turns.over_10ms),
            ("100ms", &|w| w.slow_turns.over_100ms),
        ],
    );
    m.per_worker_seconds(
        s,
        "loop_longest_turn_seconds",
        "gauge",
        "The longest event-loop turn of the last one to two seconds.",
        |w| w.longest_turn_us as f64 / 1e6,
    );

    m.per_frontend(s, ("frontend_connections_active", "gauge", "The frontend's proxied connections open now."), |f| {
        f.active
    });
    m.per_frontend(
        s,
        ("frontend_connections_parked", "gauge", "The frontend's accepted connections waiting for a maxconn slot."),
        |f| f.parked,
    );
    m.per_frontend(
        s,
        ("frontend_connections_accepted_total", "counter", "Connections the frontend accepted and admitted."),
        |f| f.accepted,
    );
    m.per_frontend(
        s,
        ("frontend_connections_closed_total", "counter", "The frontend's proxied connections closed."),
        |f| f.closed,
    );
    m.per_frontend_by(
        s,
        ("frontend_bytes_total", "counter", "Bytes forwarded for the frontend's connections, by direction."),
        "direction",
        &[("client_to_server", &|f| f.bytes_in), ("server_to_client", &|f| f.bytes_out)],
    );
    m.per_frontend_by(
        s,
        ("frontend_connections_refused_total", "counter", "Connections the frontend refused at accept, by cause."),
        "cause",
        &[
            ("acl", &|f| f.denied),
            ("source_maxconn", &|f| f.source_refused.maxconn),
            ("source_rate", &|f| f.source_refused.rate),
            ("source_table_full", &|f| f.source_refused.table_full),
        ],
    );
    m.per_frontend_by(
        s,
        (
            "frontend_limit_hits_total",
            "counter",
            "Times admission of the frontend's connections stopped at a limit, by level.",
        ),
        "level",
        &[
            ("global", &|f| f.limit_hits.global),
            ("frontend", &|f| f.limit_hits.frontend),
            ("backend", &|f| f.limit_hits.backend),
            ("server", &|f| f.limit_hits.server),
            ("rate", &|f| f.limit_hits.rate),
        ],
    );
    m.per_frontend_by(
        s,
        ("frontend_timeouts_total", "counter", "The frontend's connections closed by a timeout, by kind."),
        "kind",
        &[("client", &|f| f.timeouts.client), ("server", &|f| f.timeouts.server), ("queue", &|f| f.timeouts.queue)],
    );
    m.per_frontend(
        s,
        ("frontend_maxconn_share", "gauge", "This worker's share of the frontend's maxconn (0: it has none)."),
        |f| f.share,
    );
    m.per_frontend(
        s,
        (
            "frontend_rate_limit_share",
            "gauge",
            "This worker's share of the frontend's rate_limit, connections per second (0: it has none).",
        ),
        |f| format!("{:.3}", f.rate_share),
    );

    let servers = |m: &mut Family, name: &str, kind: &str, help: &str, f: &dyn Fn(&super::ServerStats) -> u64| {
        m.head(name, kind, help);
        for w in &s.workers {
            let id = w.worker.to_string();
            for v in w.servers.iter().filter(|v| !v.removed) {
                m.sample(name, &[("worker", &id), ("backend", &v.backend), ("server", &v.server)], f(v));
            }
        }
    };
    servers(&mut m, "server_up", "gauge", "1 when health checks (or their absence) say the server is up.", &|v| {
        u64::from(v.state.is_up())
    });
    servers(&mut m, "server_ready", "gauge", "1 unless the runtime API set the server to drain or maint.", &|v| {
        u64::from(v.admin == super::AdminState::Ready)
    });
    servers(&mut m, "server_weight", "gauge", "The weight new connections are balanced with now.", &|v| v.weight);
    servers(&mut m, "server_connections_active", "gauge", "Connections open to the server.", &|v| v.active);
    servers(&mut m, "server_connections_total", "counter", "Connections made to the server.", &|v| v.total);
    servers(&mut m, "server_connect_errors_total", "counter", "Failed connects to the server.", &|v| v.connect_errors);
    servers(&mut m, "server_maxconn", "gauge", "The server's maxconn (0: none).", &|v| v.maxconn);
    m.head("server_bytes_total", "counter", "Bytes forwarded for the server's established connections, by direction.");
    for w in &s.workers {
        let id = w.worker.to_string();
        for v in w.servers.iter().filter(|v| !v.removed) {
            for (direction, bytes) in [("client_to_server", v.bytes_in), ("server_to_client", v.bytes_out)] {
                let labels =
                    [("worker", id.as_str()), ("backend", &v.backend), ("server", &v.server), ("direction", direction)];
                m.sample("server_bytes_total", &labels, bytes);
            }
        }
    }
    m.head("server_connect_seconds", "summary", "Time to connect to the server.");
    for w in &s.workers {
        let id = w.worker.to_string();
        for v in w.servers.iter().filter(|v| !v.removed) {
            let l = &v.connect_latency_us;
            let base = [("worker", id.as_str()), ("backend", v.backend.as_str()), ("server", v.server.as_str())];
            for (q, us) in [("0.5", l.p50), ("0.9", l.p90), ("0.99", l.p99), ("0.999", l.p999)] {
                let mut labels = base.to_vec();
                labels.push(("quantile", q));
                m.sample("server_connect_seconds", &labels, format_args!("{:.6}", us as f64 / 1e6));
            }
            m.sample("server_connect_seconds_count", &base, l.count);
        }
    }
    // Per server, its sources summed (each worker's own: with as many sources as workers, disjoint
    // ones); per source only for servers with few, so that a /16 does not make 65,536 series.
    m.head("server_source_ports_in_use", "gauge", "Local ports in use toward a server, over its sources.");
    for w in &s.workers {
        let id = w.worker.to_string();
        for run in source_runs(w) {
            let labels = [("worker", id.as_str()), ("backend", &run[0].backend), ("server", &run[0].server)];
            m.sample("server_source_ports_in_use", &labels, run.iter().map(|s| s.active).sum::<u64>());
        }
    }
    m.head("server_source_ports_capacity", "gauge", "Local ports available toward a server, over its sources.");
    for w in &s.workers {
        let id = w.worker.to_string();
        for run in source_runs(w) {
            let labels = [("worker", id.as_str()), ("backend", &run[0].backend), ("server", &run[0].server)];
            m.sample("server_source_ports_capacity", &labels, run.iter().map(|s| s.capacity).sum::<u64>());
        }
    }
    for (name, help, value) in [
        (
            "source_ports_in_use",
            "Local ports in use per source IP toward a server.",
            (|s| s.active) as fn(&SourceStats) -> u64,
        ),
        ("source_ports_capacity", "Local ports available per source IP toward a server.", |s| s.capacity),
    ] {
        m.head(name, "gauge", &format!("{help} (Servers with at most {PER_SOURCE_SERIES} sources on a worker.)"));
        for w in &s.workers {
            let id = w.worker.to_string();
            for src in source_runs(w).filter(|run| run.len() <= PER_SOURCE_SERIES).flatten() {
                let ip = src.ip.to_string();
                let labels =
                    [("worker", id.as_str()), ("backend", &src.backend), ("server", &src.server), ("source", &ip)];
                m.sample(name, &labels, value(src));
            }
        }
    }
    m.head("backend_queue_current", "gauge", "Connections waiting in the backend's queue.");
    for b in &s.backends {
        m.sample("backend_queue_current", &[("backend", &b.backend)], b.queued);
    }
    m.head(
        "backend_info",
        "gauge",
        "1 for each backend, with how it balances and how its connections move bytes (splice).",
    );
    for b in &s.backends {
        m.sample("backend_info", &[("backend", &b.backend), ("balance", &b.balance), ("splice", &b.splice)], 1);
    }
    out
}

/// A running /metrics endpoint; stops when dropped.
pub struct Endpoint {
    addr: SocketAddr,
    _running: serve::Running,
    /// A copy of the listening socket, for a binary upgrade to hand to the new process.
    listener: std::os::fd::OwnedFd,
}

impl Endpoint {
    /// Accepts no more scrapers (a new process shares the socket and takes them) and answers
    /// those it has; [`Endpoint::quiet`] once it has.
    pub fn stop_accepting(&self) {
        self._running.stop_accepting();
    }

    pub fn quiet(&self) -> bool {
        self._running.quiet()
    }

    pub fn resume_accepting(&self) {
        self._running.resume_accepting();
    }

    /// The listening socket.
    pub fn listener(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.listener)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Serves `GET /metrics` on `addr`, calling `collect` for each scrape.
pub fn serve(
    addr: SocketAddr,
    collect: impl Fn() -> EngineStats + Send + 'static,
    watch: &Watch,
) -> std::io::Result<Endpoint> {
    serve_listener(TcpListener::bind(addr)?, collect, watch)
}

/// Serves on a listening socket already bound (by [`serve`], or handed over by the process a
/// binary upgrade replaced).
pub fn serve_listener(
    listener: TcpListener,
    collect: impl Fn() -> EngineStats + Send + 'static,
    watch: &Watch,
) -> std::io::Result<Endpoint> {
    let addr = listener.local_addr()?;
    let copy = listener.try_clone()?.into();
    let running = serve::start("ringproxy-metrics", listener, Http { collect }, watch)?;
    Ok(Endpoint { addr, _running: running, listener: copy })
}

/// HTTP as `serve` runs it: a request's first line decides; anything but `GET /metrics` is a 404.
struct Http<C> {
    collect: C,
}

/// The request keys [`Http`] answers by.
const METRICS: &str = "metrics";
const NOT_FOUND: &str = "not found";

impl<C: Fn() -> EngineStats + Send + 'static> serve::Protocol for Http<C> {
    const MAX_REQUEST: usize = 8192;

    fn complete(buf: &[u8]) -> bool {
        buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n")
    }

    fn request(buf: &[u8]) -> Option<String> {
        let text = String::from_utf8_lossy(buf);
        let first = text.lines().next().unwrap_or("");
        let metrics = first.starts_with("GET /metrics ") || first == "GET /metrics";
        Some(if metrics { METRICS } else { NOT_FOUND }.to_owned())
    }

    type Later = std::convert::Infallible;

    fn answer(&self, request: &str) -> serve::Reply<Self::Later> {
        serve::Reply::Now(self.respond(request))
    }

    fn settle(&self, never: Option<Self::Later>) -> Vec<u8> {
        match never {
            Some(never) => match never {},
            None => Vec::new(),
        }
    }
}

impl<C: Fn() -> EngineStats + Send + 'static> Http<C> {
    fn respond(&self, request: &str) -> Vec<u8> {
        let (status, body, kind) = match request {
            METRICS => ("200 OK", render(&(self.collect)()), "text/plain; version=0.0.4; charset=utf-8"),
            _ => ("404 Not Found", "ringproxy serves /metrics only\n".to_string(), "text/plain; charset=utf-8"),
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let mut out = head.into_bytes();
        out.extend_from_slice(body.as_bytes());
        out
    }
}
