//! Per-source limits of a frontend (`maxconn_per_source`, `rate_per_source`), as one worker keeps
//! them: a table of the sources it has seen, keyed by address or prefix.
//!
//! Exact across workers without sharing anything: the listening sockets of a frontend with
//! per-source limits carry a steering program (listener.rs, `source_program`) that sends every
//! connection of one source (prefix) to the same worker's socket, so one worker sees all of a
//! source's connections and its counts are the engine's.
//!
//! Bounded: an entry holds a source's open connections and its rate bucket; it is dropped once it
//! has no connection open and its bucket is full again (it then says nothing a fresh entry would
//! not), which a sweep once a second finds. At most `capacity` entries are kept (twice the
//! worker's share of maxconn: every source with an open connection fits, with room for as many
//! that only connect now and then); a new source that finds the table full is refused (fail
//! closed, as the access list), counted in `source_table_full`. Each tracked source costs one
//! [`SLOT_BYTES`] slot of the hash table, which is 44–87 % full: 38–75 bytes.

use std::collections::HashMap;

use crate::config::PerSource;

/// One slot of the table: the key, the entry, the hash table's control byte.
pub const SLOT_BYTES: usize = std::mem::size_of::<(u128, Entry)>() + 1;

#[derive(Clone, Copy, Debug)]
struct Entry {
    /// Connections of this source open now (counted by this worker).
    open: u32,
    /// Rate bucket: tokens, and when they were last counted (worker clock, ms).
    tokens: f32,
    at: u64,
}

/// Why a source's new connection is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `maxconn_per_source` connections of this source are open.
    Maxconn,
    /// Its `rate_per_source` is used up for now.
    Rate,
    /// The table is full of other sources.
    TableFull,
}

pub struct SourceTable {
    limits: PerSource,
    entries: HashMap<u128, Entry>,
    capacity: usize,
}

impl SourceTable {
    pub fn new(limits: PerSource, capacity: usize) -> SourceTable {
        SourceTable { limits, entries: HashMap::new(), capacity: capacity.max(1) }
    }

    pub fn limits(&self) -> PerSource {
        self.limits
    }

    /// Sources tracked now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A new connection from the source `key` (PerSource::key): counted and admitted, or refused.
    pub fn admit(&mut self, key: u128, now: u64) -> Result<(), Refusal> {
        let full = self.entries.len() >= self.capacity;
        let burst = self.limits.rate.map_or(0.0, |r| r as f32);
        let e = match self.entries.get_mut(&key) {
            Some(e) => e,
            None if full => return Err(Refusal::TableFull),
            None => self.entries.entry(key).or_insert(Entry { open: 0, tokens: burst, at: now }),
        };
        if let Some(max) = self.limits.maxconn
            && e.open >= max
        {
            return Err(Refusal::Maxconn);
        }
        if let Some(rate) = self.limits.rate {
            // A second's worth at most saved up: `rate` at once, then `rate` per second.
            e.tokens = (e.tokens + now.saturating_sub(e.at) as f32 * rate as f32 / 1000.0).min(burst);
            e.at = now;
            if e.tokens < 1.0 {
                return Err(Refusal::Rate);
            }
            e.tokens -= 1.0;
        }
        e.open += 1;
        Ok(())
    }

    /// A connection admitted elsewhere (by the engine it moved from) is counted for `key`, without
    /// a limit: it is open already. False when the table has no room for a new source (then it is
    /// not counted).
    pub fn adopt(&mut self, key: u128) -> bool {
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            return false;
        }
        let burst = self.limits.rate.map_or(0.0, |r| r as f32);
        self.entries.entry(key).or_insert(Entry { open: 0, tokens: burst, at: 0 }).open += 1;
        true
    }

    /// A connection admitted for `key` closed.
    pub fn release(&mut self, key: u128) {
        if let Some(e) = self.entries.get_mut(&key) {
            e.open = e.open.saturating_sub(1);
        }
    }

    /// Drops the entries that say nothing a fresh one would not: no connection open, bucket full
    /// again (once a second).
    pub fn sweep(&mut self, now: u64) {
        let rate = self.limits.rate;
        self.entries.retain(|_, e| {
            e.open > 0
                || rate.is_some_and(|r| {
                    let refilled = e.tokens + now.saturating_sub(e.at) as f32 * r as f32 / 1000.0;
                    refilled < r as f32
                })
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(maxconn: Option<u32>, rate: Option<u32>) -> PerSource {
        PerSource { maxconn, rate, prefix_v4: 24, prefix_v6: 64 }
    }

    #[test]
    fn a_slot_is_33_bytes() {
        assert_eq!(SLOT_BYTES, 33, "the figure docs/configuration.md gives (38-75 bytes per source)");
    }

    #[test]
    fn maxconn_counts_open_connections_of_a_prefix() {
        let l = limits(Some(2), None);
        let mut t = SourceTable::new(l, 100);
        let a = l.key("10.1.2.3".parse().unwrap());
        assert_eq!(a, l.key("10.1.2.200".parse().unwrap()), "one /24");
        assert_ne!(a, l.key("10.1.3.3".parse().unwrap()));
        assert_eq!(
            l.key("2001:db8:0:1::5".parse().unwrap()),
            l.key("2001:db8:0:1:ffff::1".parse().unwrap()),
            "one /64"
        );
        assert_eq!((t.admit(a, 0), t.admit(a, 0), t.admit(a, 0)), (Ok(()), Ok(()), Err(Refusal::Maxconn)));
        t.release(a);
        assert_eq!(t.admit(a, 0), Ok(()));
        t.release(a);
        t.release(a);
        t.sweep(0);
        assert_eq!(t.len(), 0, "no connection open: the entry goes");
    }

    #[test]
    fn rate_allows_a_burst_then_the_rate_and_the_table_stays_bounded() {
        let l = limits(None, Some(5));
        let mut t = SourceTable::new(l, 3);
        let a = l.key("10.0.0.1".parse().unwrap());
        let ok = (0..8).filter(|_| t.admit(a, 1000).is_ok()).count();
        assert_eq!(ok, 5, "a second's worth at once");
        assert_eq!(t.admit(a, 1100), Err(Refusal::Rate), "0.5 token after 100 ms");
        assert_eq!(t.admit(a, 1200), Ok(()), "one token after 200 ms");
        for i in 2..=3 {
            assert_eq!(t.admit(l.key(format!("10.0.{i}.1").parse().unwrap()), 1200), Ok(()));
        }
        assert_eq!(t.admit(l.key("10.0.9.1".parse().unwrap()), 1200), Err(Refusal::TableFull));
        for _ in 0..6 {
            t.release(a);
        }
        t.sweep(1300);
        assert_eq!(t.len(), 3, "buckets not yet full: kept (the rate remembers them)");
        t.sweep(3000);
        assert_eq!(t.len(), 2, "a's bucket is full again and it has nothing open");
    }
}
