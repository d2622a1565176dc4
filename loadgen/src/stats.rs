//! What a run measured: counters, failure causes, exact latency histograms
//! and the timeline, in a form that merges exactly across worker threads and
//! processes.
//!
//! [`Measurement`] is both what a worker thread returns and the wire format a
//! child process prints for its parent (one JSON line). Merging is exact:
//! counters add, histograms are sent as raw `(value, count)` bucket pairs and
//! re-recorded into a histogram of the same configuration, so merged
//! percentiles equal those of one histogram that saw every sample.
//! [`Progress`] holds the live atomic counters a process's main thread
//! samples for the progress line and the timeline.

use std::ops::AddAssign;
use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// `$to.f += $from.f` for every listed field `f`: how counters merge, here
/// and in `serve`, written once.
macro_rules! add_fields {
    ($to:expr, $from:expr; $($f:ident),+ $(,)?) => {
        $( $to.$f += $from.$f; )+
    };
}
pub(crate) use add_fields;

/// Largest latency recorded, in microseconds (values above are clamped).
pub const MAX_LATENCY_US: u64 = 120_000_000;

/// Why a connection attempt failed, or why an established connection ended
/// before the run did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    Refused,
    Timeout,
    Reset,
    PortExhaustion,
    PeerClosed,
    Other,
}

impl Cause {
    /// Classify an errno: ECONNREFUSED → refused; ETIMEDOUT and ECANCELED
    /// (our linked connect timeout fired) → timeout; ECONNRESET, EPIPE,
    /// ECONNABORTED → reset; EADDRNOTAVAIL, EADDRINUSE → port exhaustion.
    pub fn from_errno(errno: i32) -> Cause {
        match errno {
            libc::ECONNREFUSED => Cause::Refused,
            libc::ETIMEDOUT | libc::ECANCELED => Cause::Timeout,
            libc::ECONNRESET | libc::EPIPE | libc::ECONNABORTED => Cause::Reset,
            libc::EADDRNOTAVAIL | libc::EADDRINUSE => Cause::PortExhaustion,
            _ => Cause::Other,
        }
    }

    /// Why a send or receive ended the connection, from its result `<= 0`
    /// (0 on a receive means the peer closed).
    pub fn from_result(result: i32, recv: bool) -> Cause {
        match result {
            0 if recv => Cause::PeerClosed,
            0 => Cause::Other,
            r => Cause::from_errno(-r),
        }
    }
}

/// Counts by [`Cause`]. `peer_closed` only occurs for drops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Causes {
    pub refused: u64,
    pub timeout: u64,
    pub reset: u64,
    pub port_exhaustion: u64,
    pub peer_closed: u64,
    pub other: u64,
}

impl Causes {
    pub fn add(&mut self, c: Cause) {
        match c {
            Cause::Refused => self.refused += 1,
            Cause::Timeout => self.timeout += 1,
            Cause::Reset => self.reset += 1,
            Cause::PortExhaustion => self.port_exhaustion += 1,
            Cause::PeerClosed => self.peer_closed += 1,
            Cause::Other => self.other += 1,
        }
    }

    pub fn total(&self) -> u64 {
        self.refused + self.timeout + self.reset + self.port_exhaustion + self.peer_closed + self.other
    }
}

impl AddAssign<&Causes> for Causes {
    fn add_assign(&mut self, o: &Causes) {
        add_fields!(self, o; refused, timeout, reset, port_exhaustion, peer_closed, other);
    }
}

/// A latency histogram in microseconds (1 µs .. [`MAX_LATENCY_US`], 3
/// significant digits). Serialises as its non-empty buckets.
#[derive(Clone, Debug)]
pub struct Hist(pub Histogram<u64>);

impl Default for Hist {
    fn default() -> Self {
        Hist::new()
    }
}

impl Hist {
    pub fn new() -> Hist {
        // Bounds are constants known to be valid.
        match Histogram::new_with_bounds(1, MAX_LATENCY_US, 3) {
            Ok(h) => Hist(h),
            Err(_) => unreachable!("constant histogram bounds are valid"),
        }
    }

    pub fn record_us(&mut self, us: u64) {
        self.0.saturating_record(us.clamp(1, MAX_LATENCY_US));
    }

    pub fn record_duration(&mut self, d: std::time::Duration) {
        self.record_us(d.as_micros().min(u128::from(MAX_LATENCY_US)) as u64);
    }

    pub fn len(&self) -> u64 {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `(highest equivalent value, count)` for every non-empty bucket.
    pub fn buckets(&self) -> Vec<[u64; 2]> {
        self.0.iter_recorded().map(|v| [v.value_iterated_to(), v.count_at_value()]).collect()
    }

    pub fn merge(&mut self, o: &Hist) {
        // Same bounds on both sides, so `add` cannot fail; fall back to
        // re-recording if it ever does.
        if self.0.add(&o.0).is_err() {
            for [v, c] in o.buckets() {
                let _ = self.0.record_n(v.clamp(1, MAX_LATENCY_US), c);
            }
        }
    }
}

impl Serialize for Hist {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.buckets().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Hist {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let buckets = Vec::<[u64; 2]>::deserialize(d)?;
        let mut h = Hist::new();
        for [v, c] in buckets {
            h.0.record_n(v.clamp(1, MAX_LATENCY_US), c)
                .map_err(|e| serde::de::Error::custom(format!("bad histogram bucket: {e:?}")))?;
        }
        Ok(h)
    }
}

/// One timeline point: cumulative counters at `t_s` seconds after start,
/// plus the connections open at that moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub t_s: f64,
    pub open: u64,
    pub established: u64,
    pub completed: u64,
    pub failed: u64,
    pub up_bytes: u64,
    pub down_bytes: u64,
}

/// Everything a worker thread, a process or a whole run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Measurement {
    /// Connections the run meant to open (hold: N; others: attempts made).
    pub planned: u64,
    pub attempted: u64,
    pub established: u64,
    pub failed: Causes,
    /// Established connections that ended before the run did.
    pub dropped: Causes,
    /// Most connections open at one time (sum over processes of each one's peak).
    pub peak_open: u64,
    /// hold --reconnect: connections dialed again after one ended, that got established.
    #[serde(default)]
    pub reconnects: u64,
    /// Connections open when the run ended (hold).
    #[serde(default)]
    pub open_at_end: u64,
    /// hold --reconnect was given: a drop is expected (the client dials again).
    #[serde(default)]
    pub reconnecting: bool,
    /// hold: seconds from start until every planned connection was attempted
    /// and resolved; `None` if that never happened.
    pub ramp_time_s: Option<f64>,
    pub msgs_sent: u64,
    pub msgs_ok: u64,
    pub lost: u64,
    /// hold: heartbeats whose echo came after the next was due, sent at or after
    /// `--latency-after` (a failure) or before it (the warm-up: reported, not a failure).
    #[serde(default)]
    pub late: u64,
    #[serde(default)]
    pub late_in_warmup: u64,
    pub corrupted: u64,
    /// rate: connections that completed a request/response; latency: responses.
    pub completed: u64,
    pub up_bytes: u64,
    pub down_bytes: u64,
    /// Seconds over which rates are computed.
    pub window_s: f64,
    pub latency: Hist,
    pub latency_uncorrected: Hist,
    pub connect_latency: Hist,
    pub timeline: Vec<Sample>,
    pub processes: u32,
    pub workers: u32,
    pub interrupted: bool,
}

impl Measurement {
    /// Merge measurements of workers/processes that ran side by side.
    pub fn merge(&mut self, o: &Measurement) {
        self.ramp_time_s = match (self.ramp_time_s, o.ramp_time_s) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, None) if o.planned == 0 => a,
            (None, b) if self.planned == 0 => b,
            _ => None,
        };
        self.reconnecting |= o.reconnecting;
        add_fields!(self, o; planned, attempted, established, peak_open, reconnects, open_at_end, msgs_sent, msgs_ok, lost, late,
            late_in_warmup, corrupted, completed, up_bytes, down_bytes, processes, workers);
        self.failed += &o.failed;
        self.dropped += &o.dropped;
        self.window_s = self.window_s.max(o.window_s);
        self.latency.merge(&o.latency);
        self.latency_uncorrected.merge(&o.latency_uncorrected);
        self.connect_latency.merge(&o.connect_latency);
        self.timeline = merge_timelines(&self.timeline, &o.timeline);
        self.interrupted |= o.interrupted;
    }

    /// Merge a set; the result of merging nothing is an empty measurement.
    pub fn merge_all<'a>(parts: impl IntoIterator<Item = &'a Measurement>) -> Measurement {
        let mut it = parts.into_iter();
        let Some(first) = it.next() else {
            return Measurement::default();
        };
        let mut m = first.clone();
        for p in it {
            m.merge(p);
        }
        m
    }
}

/// Sum two timelines sample by sample (index `k` is `k` ticks after each
/// side's own start). A shorter side is carried forward with its last sample.
pub fn merge_timelines(a: &[Sample], b: &[Sample]) -> Vec<Sample> {
    if a.is_empty() {
        return b.to_vec();
    }
    if b.is_empty() {
        return a.to_vec();
    }
    let n = a.len().max(b.len());
    (0..n)
        .map(|i| {
            let mut x = a.get(i).or(a.last()).copied().unwrap_or_default();
            let y = b.get(i).or(b.last()).copied().unwrap_or_default();
            add_fields!(x, y; open, established, completed, failed, up_bytes, down_bytes);
            if i >= a.len() {
                x.t_s = y.t_s;
            }
            x
        })
        .collect()
}

/// Live counters shared by a process's worker threads and its main thread.
#[derive(Debug, Default)]
pub struct Progress {
    pub open: AtomicU64,
    pub attempted: AtomicU64,
    pub established: AtomicU64,
    pub failed: AtomicU64,
    pub completed: AtomicU64,
    pub up_bytes: AtomicU64,
    pub down_bytes: AtomicU64,
    pub lost: AtomicU64,
    /// hold: heartbeats whose echo had not come when the next was due (counted when it is due).
    pub late: AtomicU64,
    pub corrupted: AtomicU64,
}

/// A plain copy of [`Progress`]; children send these to their parent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub open: u64,
    pub attempted: u64,
    pub established: u64,
    pub failed: u64,
    pub completed: u64,
    pub up_bytes: u64,
    pub down_bytes: u64,
    pub lost: u64,
    #[serde(default)]
    pub late: u64,
    pub corrupted: u64,
}

impl Progress {
    pub fn snapshot(&self) -> Snapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            open: l(&self.open),
            attempted: l(&self.attempted),
            established: l(&self.established),
            failed: l(&self.failed),
            completed: l(&self.completed),
            up_bytes: l(&self.up_bytes),
            down_bytes: l(&self.down_bytes),
            lost: l(&self.lost),
            late: l(&self.late),
            corrupted: l(&self.corrupted),
        }
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn dec(counter: &AtomicU64) {
        counter.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Snapshot {
    pub fn sum<'a>(it: impl IntoIterator<Item = &'a Snapshot>) -> Snapshot {
        it.into_iter().fold(Snapshot::default(), |mut a, b| {
            add_fields!(a, b; open, attempted, established, failed, completed, up_bytes, down_bytes, lost, late, corrupted);
            a
        })
    }

    pub fn sample(&self, t_s: f64) -> Sample {
        Sample {
            t_s,
            open: self.open,
            established: self.established,
            completed: self.completed,
            failed: self.failed,
            up_bytes: self.up_bytes,
            down_bytes: self.down_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_merge_is_exact_through_json() {
        let mut a = Hist::new();
        let mut b = Hist::new();
        let mut all = Hist::new();
        for i in 1..5000u64 {
            let v = i * 37 % 100_000 + 1;
            if i % 3 == 0 {
                a.record_us(v)
            } else {
                b.record_us(v)
            }
            all.record_us(v);
        }
        let a2: Hist = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        let b2: Hist = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        let mut m = a2;
        m.merge(&b2);
        assert_eq!(m.len(), all.len());
        for q in [0.0, 50.0, 90.0, 99.0, 99.9, 100.0] {
            assert_eq!(m.0.value_at_percentile(q), all.0.value_at_percentile(q), "p{q}");
        }
        assert_eq!(m.0.max(), all.0.max());
    }

    #[test]
    fn measurement_merge_sums() {
        let mut a = Measurement {
            planned: 10,
            established: 10,
            lost: 1,
            processes: 1,
            timeline: vec![Sample { open: 5, ..Default::default() }],
            ..Default::default()
        };
        a.failed.add(Cause::Refused);
        let mut b = a.clone();
        b.failed.add(Cause::from_errno(libc::EADDRNOTAVAIL));
        b.timeline.push(Sample { open: 7, ..Default::default() });
        a.merge(&b);
        assert_eq!(a.established, 20);
        assert_eq!(a.lost, 2);
        assert_eq!(a.failed.refused, 2);
        assert_eq!(a.failed.port_exhaustion, 1);
        assert_eq!(a.processes, 2);
        assert_eq!(a.timeline.len(), 2);
        assert_eq!(a.timeline[1].open, 12);
    }

    #[test]
    fn errno_classification() {
        assert_eq!(Cause::from_errno(libc::ECONNREFUSED), Cause::Refused);
        assert_eq!(Cause::from_errno(libc::ETIMEDOUT), Cause::Timeout);
        assert_eq!(Cause::from_errno(libc::EPIPE), Cause::Reset);
        assert_eq!(Cause::from_errno(libc::EADDRNOTAVAIL), Cause::PortExhaustion);
        assert_eq!(Cause::from_errno(libc::EMFILE), Cause::Other);
        assert_eq!(Cause::from_result(0, true), Cause::PeerClosed);
        assert_eq!(Cause::from_result(0, false), Cause::Other);
        assert_eq!(Cause::from_result(-libc::ECONNRESET, true), Cause::Reset);
    }
}
