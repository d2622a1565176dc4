//! Choosing a server: roundrobin, leastconn, source (client-IP hash) and random (power of two).
//!
//! Each worker balances on its own, from its own counts, with no shared state: roundrobin rotates
//! per worker (each worker starts at a different server, so the sum over workers stays within one
//! connection per worker of even), leastconn and random compare the connections *this worker* has
//! open to each server (with many connections the per-worker views add up to the global one), and
//! source is a pure function of the client IP, identical on every worker. Weights scale every
//! algorithm; weight 0 takes no new connections.

use std::net::IpAddr;

use crate::config::Balance;

pub struct Balancer {
    algo: Balance,
    weights: Vec<u32>,
    /// Smooth weighted round robin state (as nginx): current weight per server.
    current: Vec<i64>,
    /// Where ties start, rotating, so equal servers share evenly.
    rotor: usize,
    rng: u64,
}

impl Balancer {
    pub fn new(algo: Balance, weights: Vec<u32>, worker: usize) -> Balancer {
        let n = weights.len().max(1);
        Balancer {
            algo,
            current: vec![0; weights.len()],
            weights,
            rotor: worker % n,
            rng: 0x9e37_79b9_7f4a_7c15 ^ (worker as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9),
        }
    }

    /// The weight server `i` is balanced with now.
    pub fn weight(&self, i: usize) -> u32 {
        self.weights.get(i).copied().unwrap_or(0)
    }

    /// Changes server `i`'s weight (runtime API, slowstart); 0 takes no new connection.
    pub fn set_weight(&mut self, i: usize, weight: u32) {
        if let Some(w) = self.weights.get_mut(i) {
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
        let Balancer { algo, weights, current, rotor, rng } = self;
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
            Balance::Source => {
                let key = client.map_or(0, hash_ip);
                let mut best: Option<(usize, f64)> = None;
                for i in (0..n).filter(|&i| ok(i)) {
                    // Weighted rendezvous hashing: each server draws a score from the (client, server)
                    // hash; the best score wins. Removing a server moves only its own clients.
                    let h = mix(key ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                    let score = f64::from(weights[i]) / -u.ln();
                    if best.is_none_or(|(_, s)| score > s) {
                        best = Some((i, score));
                    }
                }
                best.map(|(i, _)| i)
            }
            Balance::Random => {
                let a = weighted_random(weights, rng, &ok)?;
                let b = weighted_random(weights, rng, &ok)?;
                Some(if lighter(b, a) { b } else { a })
            }
        }
    }
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
}
