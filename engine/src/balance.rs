//! Choosing a server: roundrobin, leastconn, source (client-IP hash), random (power of two) and
//! hash (Maglev consistent hashing of the client IP).
//!
//! Each worker balances on its own, from its own counts, with no shared state: roundrobin rotates
//! per worker (each worker starts at a different server, so the sum over workers stays within one
//! connection per worker of even), leastconn and random compare the connections *this worker* has
//! open to each server (with many connections the per-worker views add up to the global one), and
//! source and hash are pure functions of the client IP and the servers' availability, identical on
//! every worker. Weights scale every algorithm; weight 0 takes no new connections.

use std::net::IpAddr;

use crate::config::Balance;

/// Weights are kept ×256 inside the balancer, so that a server ramping up (`slowstart`) moves in
/// small steps even at the default weight 1. Every algorithm only compares weights with each
/// other, so the scale changes no choice.
pub const WEIGHT_SCALE: u32 = 256;

pub struct Balancer {
    algo: Balance,
    weights: Vec<u32>,
    /// `hash` only: the Maglev table, rebuilt when a server's availability or weight changed.
    maglev: Option<Maglev>,
    /// Smooth weighted round robin state (as nginx): current weight per server.
    current: Vec<i64>,
    /// Where ties start, rotating, so equal servers share evenly.
    rotor: usize,
    rng: u64,
}

impl Balancer {
    /// `weights` as configured (they are scaled by [`WEIGHT_SCALE`] here).
    pub fn new(algo: Balance, weights: Vec<u32>, worker: usize) -> Balancer {
        let n = weights.len().max(1);
        let weights: Vec<u32> = weights.into_iter().map(|w| w.saturating_mul(WEIGHT_SCALE)).collect();
        Balancer {
            algo,
            current: vec![0; weights.len()],
            maglev: None,
            weights,
            rotor: worker % n,
            rng: 0x9e37_79b9_7f4a_7c15 ^ (worker as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9),
        }
    }

    pub fn algo(&self) -> Balance {
        self.algo
    }

    /// The weight server `i` is balanced with now (×[`WEIGHT_SCALE`]).
    pub fn weight(&self, i: usize) -> u32 {
        self.weights.get(i).copied().unwrap_or(0)
    }

    /// `balance: hash`: identifies each server by `keys` (a hash of its name, so that a server keeps
    /// its place in the table whatever its position in the list).
    pub fn with_keys(mut self, keys: Vec<u64>) -> Balancer {
        if self.algo == Balance::Hash {
            let n = keys.len();
            self.maglev = Some(Maglev { keys, available: vec![true; n], table: Vec::new(), dirty: true });
        }
        self
    }

    /// A server added at run time (`add server`), with its configured weight and (for `hash`) its
    /// identity: it takes index `weights.len()`.
    pub fn add_server(&mut self, weight: u32, key: u64) {
        self.weights.push(weight.saturating_mul(WEIGHT_SCALE));
        self.current.push(0);
        if let Some(m) = &mut self.maglev {
            m.keys.push(key);
            m.available.push(true);
            m.dirty = true;
        }
    }

    /// A server added at run time in the place of deleted server `i` (`add server` taking its
    /// index): balanced from scratch, with its weight and identity.
    pub fn replace_server(&mut self, i: usize, weight: u32, key: u64) {
        let (Some(w), Some(current)) = (self.weights.get_mut(i), self.current.get_mut(i)) else { return };
        *w = weight.saturating_mul(WEIGHT_SCALE);
        *current = 0;
        if let Some(m) = &mut self.maglev {
            m.keys[i] = key;
            m.available[i] = true;
            m.dirty = true;
        }
    }

    /// Server `i` may take new connections (health, runtime API) or not: for `hash`, whose table
    /// holds only the servers that may.
    pub fn set_available(&mut self, i: usize, available: bool) {
        if let Some(m) = &mut self.maglev
            && m.available.get(i).is_some_and(|a| *a != available)
        {
            m.available[i] = available;
            m.dirty = true;
        }
    }

    /// Changes server `i`'s weight (×[`WEIGHT_SCALE`]: runtime API, slowstart); 0 takes no new
    /// connection.
    pub fn set_weight(&mut self, i: usize, weight: u32) {
        if let Some(w) = self.weights.get_mut(i) {
            if *w != weight
                && let Some(m) = &mut self.maglev
            {
                m.dirty = true;
            }
            *w = weight;
            // Smooth round robin: a server whose weight dropped must not keep its old credit.
            self.current[i] = self.current[i].min(i64::from(weight));
        }
    }

    /// Picks a server among those for which `eligible(i)` holds. `active[i]` is this worker's count of
    /// open connections to server `i`; `client` is used by `source`.
    pub fn pick(
        &mut self,
        active: impl Fn(usize) -> u32,
        client: Option<IpAddr>,
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let Balancer { algo, weights, current, rotor, rng, maglev } = self;
        let n = weights.len();
        let ok = |i: usize| weights[i] > 0 && eligible(i);
        let lighter = |a: usize, b: usize| {
            u64::from(active(a)) * u64::from(weights[b]) < u64::from(active(b)) * u64::from(weights[a])
        };
        match *algo {
            Balance::Roundrobin => {
                let mut total = 0i64;
                let mut best: Option<usize> = None;
                for k in 0..n {
                    let i = (*rotor + k) % n;
                    if !ok(i) {
                        continue;
                    }
                    let w = i64::from(weights[i]);
                    current[i] += w;
                    total += w;
                    if best.is_none_or(|b| current[i] > current[b]) {
                        best = Some(i);
                    }
                }
                let b = best?;
                current[b] -= total;
                Some(b)
            }
            Balance::Leastconn => {
                let mut best: Option<usize> = None;
                for k in 0..n {
                    let i = (*rotor + k) % n;
                    if ok(i) && best.is_none_or(|b| lighter(i, b)) {
                        best = Some(i);
                    }
                }
                if let Some(b) = best {
                    *rotor = (b + 1) % n;
                }
                best
            }
            Balance::Source => rendezvous(weights, client.map_or(0, hash_ip), &ok),
            Balance::Hash => {
                let key = client.map_or(0, hash_ip);
                let table = maglev.as_mut().map(|m| m.table(weights)).unwrap_or_default();
                match table.get((key % table.len().max(1) as u64) as usize) {
                    Some(&s) if s != NONE && ok(s as usize) => Some(s as usize),
                    // The key's server cannot take this connection (full, already tried by it, or
                    // the table is empty): the next choice for this key, among those that can.
                    _ => rendezvous(weights, key, &ok),
                }
            }
            Balance::Random => {
                let a = weighted_random(weights, rng, &ok)?;
                let b = weighted_random(weights, rng, &ok)?;
                Some(if lighter(b, a) { b } else { a })
            }
        }
    }
}

/// Weighted rendezvous hashing: each server draws a score from the (key, server) hash; the best
/// score wins. Removing a server moves only its own keys.
fn rendezvous(weights: &[u32], key: u64, ok: &impl Fn(usize) -> bool) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for i in (0..weights.len()).filter(|&i| ok(i)) {
        let h = mix(key ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let score = f64::from(weights[i]) / -u.ln();
        if best.is_none_or(|(_, s)| score > s) {
            best = Some((i, score));
        }
    }
    best.map(|(i, _)| i)
}

/// An entry of the Maglev table that names no server (no server available).
const NONE: u16 = u16::MAX;

/// Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
/// Balancer", NSDI 2016): a table of M entries (M prime, at least 100 × servers), each naming a
/// server; a key goes to entry `hash % M`. Each server fills entries in its own order (a
/// permutation of the table drawn from its name), servers taking turns in proportion to their
/// weights, until the table is full. Removing one server leaves almost every other entry where it
/// was: only ~1/N of the keys move (measured in the tests). One lookup per connection; the table
/// (2 bytes per entry: 128 KiB for up to 655 servers) is rebuilt, off the data path's common case,
/// only when a server's availability or weight changed.
struct Maglev {
    /// Per server: its identity (a hash of its name).
    keys: Vec<u64>,
    /// Per server: whether it may take new connections (health and runtime API).
    available: Vec<bool>,
    table: Vec<u16>,
    dirty: bool,
}

impl Maglev {
    /// The table, rebuilt first if something changed.
    fn table(&mut self, weights: &[u32]) -> &[u16] {
        if self.dirty {
            self.build(weights);
            self.dirty = false;
        }
        &self.table
    }

    fn build(&mut self, weights: &[u32]) {
        let n = self.keys.len();
        let m = table_size(n);
        self.table.clear();
        self.table.resize(m, NONE);
        let live: Vec<usize> = (0..n).filter(|&i| self.available[i] && weights[i] > 0).collect();
        let Some(heaviest) = live.iter().map(|&i| u64::from(weights[i])).max() else { return };
        let m64 = m as u64;
        let offset: Vec<u64> = self.keys.iter().map(|&k| mix(k) % m64).collect();
        let skip: Vec<u64> = self.keys.iter().map(|&k| mix(k ^ 0x5851_f42d_4c95_7f2d) % (m64 - 1) + 1).collect();
        let mut next = vec![0u64; n];
        let mut credit = vec![0u64; n];
        let mut filled = 0;
        while filled < m {
            for &i in &live {
                // A server of the heaviest weight places one entry per turn, the others in
                // proportion.
                credit[i] += u64::from(weights[i]);
                while credit[i] >= heaviest && filled < m {
                    credit[i] -= heaviest;
                    loop {
                        let c = ((offset[i] + next[i] * skip[i]) % m64) as usize;
                        next[i] += 1;
                        if self.table[c] == NONE {
                            self.table[c] = i as u16;
                            filled += 1;
                            break;
                        }
                    }
                }
            }
        }
    }
}

/// The smallest prime at least 100 × `servers` (and at least 65,537).
fn table_size(servers: usize) -> usize {
    let is_prime = |n: usize| n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d));
    (servers.saturating_mul(100).max(65_537)..).find(|&n| is_prime(n)).unwrap_or(65_537)
}

/// What one worker's Maglev table for a backend of `servers` servers takes.
pub fn table_bytes(servers: usize) -> u64 {
    (table_size(servers) * std::mem::size_of::<u16>()) as u64
}

/// The identity `balance: hash` gives a server: a hash of its name.
pub fn server_key(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// A random eligible server, with probability proportional to its weight.
fn weighted_random(weights: &[u32], rng: &mut u64, ok: &impl Fn(usize) -> bool) -> Option<usize> {
    let total: u64 = (0..weights.len()).filter(|&i| ok(i)).map(|i| u64::from(weights[i])).sum();
    if total == 0 {
        return None;
    }
    let mut r = next_random(rng) % total;
    for i in (0..weights.len()).filter(|&i| ok(i)) {
        let w = u64::from(weights[i]);
        if r < w {
            return Some(i);
        }
        r -= w;
    }
    None
}

/// xorshift64*: plenty for load spreading.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => mix(u64::from(u32::from(v4))),
        IpAddr::V6(v6) => {
            let v = u128::from(v6);
            mix((v as u64) ^ mix((v >> 64) as u64))
        }
    }
}

/// splitmix64's finaliser: a fast, well-mixed 64-bit hash.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn counts(b: &mut Balancer, n: usize, picks: usize) -> Vec<u32> {
        let mut c = vec![0; n];
        for _ in 0..picks {
            c[b.pick(|_| 0, None, |_| true).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn roundrobin_is_even_and_weighted() {
        let mut b = Balancer::new(Balance::Roundrobin, vec![1; 6], 0);
        assert_eq!(counts(&mut b, 6, 60), vec![10; 6]);
        let mut b = Balancer::new(Balance::Roundrobin, vec![1, 3, 0], 1);
        assert_eq!(counts(&mut b, 3, 40), vec![10, 30, 0]);
    }

    #[test]
    fn roundrobin_workers_start_apart() {
        let firsts: Vec<usize> = (0..3)
            .map(|w| Balancer::new(Balance::Roundrobin, vec![1; 3], w).pick(|_| 0, None, |_| true).unwrap())
            .collect();
        assert_eq!(firsts, vec![0, 1, 2]);
    }

    #[test]
    fn roundrobin_skips_ineligible() {
        let mut b = Balancer::new(Balance::Roundrobin, vec![1; 3], 0);
        for _ in 0..10 {
            assert_ne!(b.pick(|_| 0, None, |i| i != 1), Some(1));
        }
        assert_eq!(b.pick(|_| 0, None, |_| false), None);
    }

    #[test]
    fn leastconn_picks_the_least_loaded_per_weight() {
        let mut b = Balancer::new(Balance::Leastconn, vec![1, 1, 2], 0);
        assert_eq!(b.pick(|i| [5, 2, 6][i], None, |_| true), Some(1));
        assert_eq!(b.pick(|i| [5, 4, 6][i], None, |_| true), Some(2), "6/2 = 3 < 4");
    }

    #[test]
    fn source_is_sticky_and_spreads() {
        let mut b = Balancer::new(Balance::Source, vec![1; 4], 0);
        let mut other = Balancer::new(Balance::Source, vec![1; 4], 3);
        let mut seen = [0u32; 4];
        for i in 0..400u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            let s = b.pick(|_| 0, Some(ip), |_| true).unwrap();
            assert_eq!(b.pick(|_| 0, Some(ip), |_| true), Some(s), "same client, same server");
            assert_eq!(other.pick(|_| 0, Some(ip), |_| true), Some(s), "same on every worker");
            seen[s] += 1;
            // Taking another server out only moves the clients of that server.
            let without_3 = b.pick(|_| 0, Some(ip), |i| i != 3).unwrap();
            if s != 3 {
                assert_eq!(without_3, s);
            }
        }
        assert!(seen.iter().all(|&c| c > 60), "{seen:?}");
    }

    #[test]
    fn random_prefers_the_lighter_of_two() {
        let mut b = Balancer::new(Balance::Random, vec![1, 1], 0);
        let heavy = (0..200).filter(|_| b.pick(|i| [100, 0][i], None, |_| true) == Some(0)).count();
        assert!(heavy < 80, "the loaded server won {heavy} of 200");
    }

    fn maglev(weights: Vec<u32>, worker: usize) -> Balancer {
        let keys = (0..weights.len()).map(|i| server_key(&format!("s{i}"))).collect();
        Balancer::new(Balance::Hash, weights, worker).with_keys(keys)
    }

    /// Where each of `keys` client addresses goes.
    fn placement(b: &mut Balancer, keys: u32) -> Vec<usize> {
        (0..keys).map(|k| b.pick(|_| 0, Some(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + k))), |_| true).unwrap()).collect()
    }

    /// The measure: with one of N servers DOWN, only its own ~1/N of the keys move (and
    /// almost none of the others'); it comes back, and they all return.
    #[test]
    fn hash_moves_only_the_keys_of_a_server_that_goes_away() {
        const KEYS: u32 = 100_000;
        for n in [3usize, 10, 50] {
            let mut b = maglev(vec![1; n], 0);
            let before = placement(&mut b, KEYS);
            let mut per = vec![0u32; n];
            before.iter().for_each(|&s| per[s] += 1);
            let even = KEYS as f64 / n as f64;
            assert!(per.iter().all(|&c| (c as f64 - even).abs() < even * 0.1), "n={n}: uneven {per:?}");
            b.set_available(1, false);
            let after = placement(&mut b, KEYS);
            assert!(after.iter().all(|&s| s != 1), "nothing goes to the server that left");
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
            let others_moved = before.iter().zip(&after).filter(|(a, b)| **a != 1 && a != b).count();
            let fraction = moved as f64 / KEYS as f64;
            eprintln!(
                "maglev, {n} servers, one goes DOWN: {:.2}% of {KEYS} keys moved ({:.2}% ideal), {:.3}% of the other servers' keys",
                fraction * 100.0,
                100.0 / n as f64,
                others_moved as f64 * 100.0 / KEYS as f64
            );
            assert!(fraction < 1.0 / n as f64 * 1.1 + 0.01, "n={n}: {fraction} moved");
            assert!((others_moved as f64) < KEYS as f64 * 0.02, "n={n}: {others_moved} keys of live servers moved");
            b.set_available(1, true);
            assert_eq!(placement(&mut b, KEYS), before, "back to the same table");
        }
    }

    #[test]
    fn hash_is_the_same_on_every_worker_weighted_and_spills_when_its_server_cannot() {
        let (mut a, mut b) = (maglev(vec![1, 3], 0), maglev(vec![1, 3], 5));
        assert_eq!(placement(&mut a, 5000), placement(&mut b, 5000), "workers agree");
        let heavy = placement(&mut a, 40_000).iter().filter(|&&s| s == 1).count();
        assert!((28_000..32_000).contains(&heavy), "weight 3 of 4 took {heavy} of 40000");
        let ip = IpAddr::V4(Ipv4Addr::new(10, 9, 8, 7));
        let s = a.pick(|_| 0, Some(ip), |_| true).unwrap();
        assert_eq!(a.pick(|_| 0, Some(ip), |i| i != s), Some(1 - s), "full or tried: the other one");
        assert_eq!(a.pick(|_| 0, Some(ip), |_| false), None);
        a.set_weight(0, 0);
        a.set_weight(1, 0);
        assert_eq!(a.weight(0), 0);
        assert_eq!(a.pick(|_| 0, Some(ip), |_| true), None, "no weight, no server");
    }
}
