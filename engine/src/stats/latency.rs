//! Connect latency per server per worker: a fixed log-linear histogram of microseconds.
//!
//! Values below 32 µs have a bucket each; above, every power of two is split into 16 equal
//! buckets, up to 2^26 µs (67 s); longer values count in the last bucket (a connect gives up long
//! before, at `timeout connect`). A quantile is reported as the middle of its bucket: at most 1/32
//! (3.1 %) from the value recorded, and never above the largest value, which is kept exactly, as
//! is the count. That is 368 `u32` counters, [`HISTOGRAM_BYTES`] per server per worker, allocated
//! once when the worker starts: recording computes an index and adds one, and never allocates. A
//! counter about to overflow first halves every counter, which keeps the shape (the quantiles) of
//! the distribution. A worker sends only its non-zero buckets ([`LatencyBucket`]) with a snapshot;
//! [`merge`] sums them over workers one server at a time.

use super::Latency;

/// Buckets below 2^SUB_BITS hold one value each; above, each power of two has 2^SUB_BITS buckets.
const SUB_BITS: u32 = 4;
const SUB: usize = 1 << SUB_BITS;
/// Values from 2^TOP_BITS µs on count in the last bucket.
const TOP_BITS: u32 = 26;
/// 16 one-value buckets, then 16 per power of two from 2^4 to 2^25.
pub const BUCKETS: usize = SUB * (TOP_BITS - SUB_BITS + 1) as usize;
/// What one histogram takes (one per server per worker).
pub const HISTOGRAM_BYTES: usize = std::mem::size_of::<LatencyHistogram>();
const _: () = assert!(HISTOGRAM_BYTES <= 1536, "a few KiB per server per worker at most");

const QUANTILES: [f64; 4] = [0.5, 0.9, 0.99, 0.999];

/// One server's connect latencies on one worker.
#[derive(Clone, Debug)]
pub struct LatencyHistogram {
    counts: [u32; BUCKETS],
    /// Connects recorded (exact, whatever the halving did to the buckets).
    count: u64,
    /// Largest value recorded, in µs.
    max: u64,
}

/// A non-zero bucket of one server's histogram, as a worker sends it with a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatencyBucket {
    /// Index of the server in the flattened per-server tables.
    pub server: u32,
    pub bucket: u16,
    pub count: u32,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram { counts: [0; BUCKETS], count: 0, max: 0 }
    }
}

impl LatencyHistogram {
    /// Records one connect that took `us` microseconds.
    #[inline]
    pub fn record(&mut self, us: u64) {
        let i = bucket_of(us);
        if self.counts[i] == u32::MAX {
            for c in &mut self.counts {
                *c = c.div_ceil(2);
            }
        }
        self.counts[i] += 1;
        self.count += 1;
        self.max = self.max.max(us);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Count, quantiles and maximum of what was recorded.
    pub fn latency(&self) -> Latency {
        if self.count == 0 {
            return Latency::default();
        }
        latency_of(&self.counts, self.count, self.max)
    }

    /// Appends the non-zero buckets to `out`, in bucket order, as server `server`'s.
    pub fn export(&self, server: u32, out: &mut Vec<LatencyBucket>) {
        if self.count == 0 {
            return;
        }
        for (i, &count) in self.counts.iter().enumerate() {
            if count > 0 {
                out.push(LatencyBucket { server, bucket: i as u16, count });
            }
        }
    }
}

/// The bucket `us` falls in.
#[inline]
fn bucket_of(us: u64) -> usize {
    if us < 2 * SUB as u64 {
        return us as usize;
    }
    let top = 63 - us.leading_zeros();
    if top >= TOP_BITS {
        return BUCKETS - 1;
    }
    let shift = top - SUB_BITS;
    // (top - SUB_BITS) full powers of two above the first 16 buckets, then the position in this one.
    (shift as usize) * SUB + (us >> shift) as usize
}

/// The value a quantile falling in bucket `i` is reported as: the middle of the bucket.
fn bucket_value(i: usize) -> u64 {
    if i < 2 * SUB {
        return i as u64;
    }
    let shift = (i / SUB - 1) as u32;
    let low = ((SUB + i % SUB) as u64) << shift;
    low + (1 << shift) / 2
}

/// Quantiles of bucket counts (`count` and `max` are passed through, exact).
fn latency_of<C: Copy + Into<u64>>(counts: &[C], count: u64, max: u64) -> Latency {
    let total: u64 = counts.iter().map(|&c| c.into()).sum();
    let mut values = [0u64; QUANTILES.len()];
    let mut q = 0;
    let mut seen = 0u64;
    for (i, &c) in counts.iter().enumerate() {
        seen += c.into();
        while q < QUANTILES.len() && seen > 0 && seen >= rank(QUANTILES[q], total) {
            values[q] = bucket_value(i).min(max);
            q += 1;
        }
        if q == QUANTILES.len() {
            break;
        }
    }
    let [p50, p90, p99, p999] = values;
    Latency { count, p50, p90, p99, p999, max }
}

/// How many values lie at or below quantile `q` of `total`.
fn rank(q: f64, total: u64) -> u64 {
    ((q * total as f64).ceil() as u64).clamp(1, total.max(1))
}

/// Merges one server's histograms across workers: feed each worker's buckets, then [`Merge::take`].
pub struct Merge {
    counts: [u64; BUCKETS],
    count: u64,
    max: u64,
    any: bool,
}

impl Default for Merge {
    fn default() -> Self {
        Merge { counts: [0; BUCKETS], count: 0, max: 0, any: false }
    }
}

impl Merge {
    /// Adds a worker's row for the server: its exact count and maximum.
    pub fn add_row(&mut self, l: &Latency) {
        self.count += l.count;
        self.max = self.max.max(l.max);
    }

    pub fn add_bucket(&mut self, b: &LatencyBucket) {
        if let Some(c) = self.counts.get_mut(usize::from(b.bucket)) {
            *c += u64::from(b.count);
            self.any = true;
        }
    }

    /// The merged latency, and a cleared merge for the next server.
    pub fn take(&mut self) -> Latency {
        let out = match self.any {
            true => latency_of(&self.counts, self.count, self.max),
            false => Latency { count: self.count, max: self.max, ..Latency::default() },
        };
        if self.any {
            self.counts.fill(0);
        }
        (self.count, self.max, self.any) = (0, 0, false);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_the_range_in_order_within_3_percent() {
        let mut last = 0;
        for us in 0..200_000u64 {
            assert!(bucket_of(us) >= last, "buckets follow the values");
            last = bucket_of(us);
        }
        for us in (0..200_000u64).chain((1..2_000).map(|k| k * 33_331)) {
            let v = bucket_value(bucket_of(us));
            let err = (v as f64 - us as f64).abs() / (us.max(1) as f64);
            assert!(err <= 1.0 / 32.0 + 1e-9, "{us} µs reported as {v}: {err}");
        }
        assert_eq!(bucket_of((1 << TOP_BITS) - 1), BUCKETS - 1);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_match_the_recorded_values() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.latency(), Latency::default());
        for us in 1..=10_000 {
            h.record(us);
        }
        let l = h.latency();
        assert_eq!((l.count, l.max), (10_000, 10_000));
        for (got, want) in [(l.p50, 5_000.0), (l.p90, 9_000.0), (l.p99, 9_900.0), (l.p999, 9_990.0)] {
            assert!((got as f64 - want).abs() / want < 0.04, "{got} for {want}");
        }
        let mut one = LatencyHistogram::default();
        one.record(70);
        assert_eq!(one.latency().p50, 70, "never above the maximum");
    }

    #[test]
    fn merging_the_exported_buckets_equals_one_histogram() {
        let (mut a, mut b, mut all) =
            (LatencyHistogram::default(), LatencyHistogram::default(), LatencyHistogram::default());
        for us in 0..5_000u64 {
            let v = us * us % 700_001;
            match us % 3 {
                0 => a.record(v),
                _ => b.record(v),
            }
            all.record(v);
        }
        let mut out = Vec::new();
        a.export(7, &mut out);
        b.export(7, &mut out);
        assert!(out.iter().all(|x| x.server == 7 && x.count > 0));
        let mut m = Merge::default();
        m.add_row(&a.latency());
        m.add_row(&b.latency());
        out.iter().for_each(|x| m.add_bucket(x));
        assert_eq!(m.take(), all.latency());
        assert_eq!(m.take(), Latency::default(), "take clears the merge");
    }

    #[test]
    fn a_full_counter_halves_the_histogram_and_keeps_its_shape() {
        let mut h = LatencyHistogram::default();
        h.counts[bucket_of(100)] = u32::MAX;
        h.counts[bucket_of(1000)] = u32::MAX / 9;
        h.count = u64::from(u32::MAX) + u64::from(u32::MAX / 9);
        h.max = 1000;
        h.record(100);
        assert_eq!(h.counts[bucket_of(100)], u32::MAX / 2 + 2);
        assert_eq!(h.count, u64::from(u32::MAX) + u64::from(u32::MAX / 9) + 1);
        let l = h.latency();
        assert_eq!((l.p50, l.p99), (bucket_value(bucket_of(100)), 1000), "{l:?}");
    }
}
