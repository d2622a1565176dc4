//! `splice: auto`: whether a worker's bulk flows splice or go through its receive buffers, chosen
//! while they run from what each costs on this host.
//!
//! Which is cheaper is a property of the host, not of the code: on one host splicing moved one
//! stream at 1.55 × copying, on another at 0.65 × (docs/benchmarks.md, 2026-12-03 and -04;
//! splice_to_socket pushes 16 pages per `sendmsg`, a receive-buffer `SENDMSG` up to 64 buffers,
//! and where each push is dear that decides). So the worker measures, over windows of
//! `WINDOW_MS` in which at least `MIN_BYTES` moved (so bulk traffic dominates the window), the
//! bytes it moved and its thread's CPU time per byte (`CLOCK_THREAD_CPUTIME_ID`: every splice,
//! receive and send of this worker runs on its thread). After a window on the path it holds, it
//! tries the other: one window for the flows to move over (not counted), one measured. The other
//! path takes over if it moved `RATE_PCT` % more bytes (a flow that splices waits for each chunk
//! to go out before it reads the next, while a receive goes on filling buffers during a send: on
//! one stream that, not CPU, can be what limits), or, moving as much (no less than `TIE_PCT` %
//! under), if it cost `MARGIN_PCT` % less CPU per byte; else the worker goes back. Rate comes
//! first: CPU a worker does not run short of is not worth a slower flow. (With any rate within
//! 10% counting as a tie, workers here took splicing for four streams at 0.95 against 1.03 GB/s,
//! for 15% less CPU, and held it for the next single stream, which it moves at 0.65 ×.) It tries
//! again after a hold that doubles while the answer stays the same (`FIRST_HOLD_MS` up to
//! `LONGEST_HOLD_MS`), so a steady host pays one probe window in minutes, and a changed one is
//! noticed.
//!
//! The first bulk window after a quiet one is not counted: flows were starting (or ending) in it,
//! so it moved less than the path can. Taken as the reference, it let the slower path win: one
//! stream down, receive buffers held, began with a window of 1,574 MiB/s; splicing's probe moved
//! 1,571 for less CPU per byte and was held at about 1,450 MiB/s, where the receive buffers move
//! 2,450 once under way (a trace of each window, 2026-12-04 22:00).
//!
//! The path held is judged by its best showing in the last `REFERENCE_WINDOWS` windows before the
//! probe (the most it moved, the least CPU per byte), not by the last window alone: with flows on
//! both workers a window is sometimes starved by the other worker's turn (one at 1.91 GB/s and 500
//! ps per byte between windows at 2.3 GB/s), and held against that one, splicing won with 2.22
//! GB/s on four streams and was held into the next single stream, which it moved at 0.7 × (the
//! 1-stream-down row at 12.5–13.6 Gbit/s in all three rounds of a run, 2026-12-05 01:38). A probe
//! has to beat what the held path showed it can do.
//!
//! Only the bytes of connections whose backend has `splice: auto` count (the worker sums its
//! frontends' whose backend has it): connections of a backend with `always` or `never` move the
//! same way in every window, and counted, a `never` backend's copies were measured as the spliced
//! path's. The thread's CPU is all the worker's, so such flows beside them make both paths look
//! dearer alike, diluting a cost margin but favouring neither.
//!
//! Both paths give every byte in order: a flow moves from splicing to its receive only between
//! splices (`Ctx::splice_here`), and to splicing only once its queue is sent (`forward`).

/// Length of one measuring window.
const WINDOW_MS: u64 = 200;
/// Bytes (both directions, all connections) a window needs to say what bulk traffic costs.
const MIN_BYTES: u64 = 16 << 20;
/// The probed path takes over if it moved this much more (in percent)...
const RATE_PCT: u64 = 10;
/// ... or, at a rate no more than `TIE_PCT` % under (as much, within a window's noise), if it
/// cost this much less CPU per byte.
const MARGIN_PCT: u64 = 5;
const TIE_PCT: u64 = 2;
/// Hold after a change of path (and at start: the first probe comes with the first bulk window).
const FIRST_HOLD_MS: u64 = 10_000;
/// Windows of the held path a probe is judged against (the last ones before it, of this burst).
const REFERENCE_WINDOWS: usize = 3;
const LONGEST_HOLD_MS: u64 = 160_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// On the path held: each window measures it.
    Hold,
    /// Just moved to the other path: flows are moving over; this window is not counted.
    Settle,
    /// On the other path: this window decides.
    Probe,
}

/// A worker took a new bulk path: what the two measured windows showed.
#[derive(Debug, PartialEq, Eq)]
pub struct Switched {
    /// The path now held: splicing (else the receive buffers).
    pub splice: bool,
    /// Bytes per second moved: [the path now held, the one left].
    pub rate: [u64; 2],
    /// CPU per byte (ps): [the path now held, the one left].
    pub cost_ps: [u64; 2],
}

impl std::fmt::Display for Switched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = |splice: bool| if splice { "splicing" } else { "the receive buffers" };
        write!(
            f,
            "bulk flows now go through {}: {:.2} GB/s at {} ps of CPU per byte, against {:.2} GB/s at {} ps through {}",
            name(self.splice),
            self.rate[0] as f64 / 1e9,
            self.cost_ps[0],
            self.rate[1] as f64 / 1e9,
            self.cost_ps[1],
            name(!self.splice)
        )
    }
}

#[derive(Debug)]
pub struct BulkPath {
    /// Bulk flows splice (else they go through the receive buffers).
    pub splice: bool,
    /// The worker chooses (`splice: auto` with splicing on its thread); else `splice` stays.
    enabled: bool,
    phase: Phase,
    /// Start of the current window: worker clock (ms), thread CPU (ns), bytes moved.
    at_ms: u64,
    at_cpu: u64,
    at_bytes: u64,
    /// The held path's last counted windows (at most `REFERENCE_WINDOWS`, of this burst, since
    /// the last probe): (bytes per second, ps per byte), oldest overwritten first.
    held: [(u64, u64); REFERENCE_WINDOWS],
    held_n: usize,
    /// Windows in a row that moved bulk traffic (0 after a quiet one): the first is the start of
    /// a burst, never a probe's reference.
    streak: u32,
    /// Windows of a burst this worker lets go by before it probes, so that workers whose flows
    /// started together do not probe at once (see `new`).
    stagger: u32,
    /// Last measured cost per path, ps per byte (0: not measured): [receive buffers, splice].
    pub cost_ps: [u64; 2],
    next_probe: u64,
    hold: u64,
    pub switches: u64,
}

impl BulkPath {
    /// `worker`: its number, which staggers its probes against its neighbours' (by 3 windows per
    /// worker, 4 apart at most): when the flows of several workers start together, a worker whose
    /// flows move to the other path frees (or takes) CPU the others measure with, so a probe
    /// measured while another worker probes can crown the wrong path. Once their answers came at
    /// different times, their holds end at different times too.
    pub fn new(enabled: bool, now_ms: u64, worker: usize) -> BulkPath {
        let stagger = 3 * (worker % 4) as u32;
        BulkPath {
            splice: true,
            enabled,
            phase: Phase::Hold,
            at_ms: now_ms,
            at_cpu: 0,
            at_bytes: 0,
            held: [(0, 0); REFERENCE_WINDOWS],
            held_n: 0,
            streak: 0,
            stagger,
            cost_ps: [0; 2],
            next_probe: 0,
            hold: FIRST_HOLD_MS,
            switches: 0,
        }
    }

    /// Whether a window has ended (the caller then reads the clocks for [`BulkPath::observe`]).
    pub fn due(&self, now_ms: u64) -> bool {
        self.enabled && now_ms >= self.at_ms + WINDOW_MS
    }

    /// A window ended at `now_ms` with this thread's CPU time at `cpu_ns` and `bytes` moved in
    /// all (both counters only grow). Returns what was measured when the worker took a new path.
    pub fn observe(&mut self, now_ms: u64, cpu_ns: u64, bytes: u64) -> Option<Switched> {
        let (cpu, moved) = (cpu_ns.saturating_sub(self.at_cpu), bytes.saturating_sub(self.at_bytes));
        let rate = moved.saturating_mul(1000) / now_ms.saturating_sub(self.at_ms).max(1);
        let first = self.at_cpu == 0;
        (self.at_ms, self.at_cpu, self.at_bytes) = (now_ms, cpu_ns, bytes);
        if first {
            return None;
        }
        if moved < MIN_BYTES {
            // Too little moved to say what bulk costs. A probe that meets a quiet window goes
            // back to the path held.
            self.streak = 0;
            self.held_n = 0;
            if self.phase != Phase::Hold {
                self.switch();
                self.phase = Phase::Hold;
                self.next_probe = now_ms + self.hold;
            }
            return None;
        }
        self.streak = self.streak.saturating_add(1);
        let cost = cpu.saturating_mul(1000) / moved;
        match self.phase {
            Phase::Hold => {
                self.cost_ps[usize::from(self.splice)] = cost;
                // The window a burst began in is never what a probe is held against: flows were
                // starting in it. The probe starts after the second at the earliest (later by the
                // worker's stagger).
                if self.streak > 1 {
                    self.held[self.held_n % REFERENCE_WINDOWS] = (rate, cost);
                    self.held_n += 1;
                }
                if now_ms >= self.next_probe && self.streak > self.stagger + 1 {
                    self.switch();
                    self.phase = Phase::Settle;
                }
            }
            Phase::Settle => self.phase = Phase::Probe,
            Phase::Probe => {
                self.cost_ps[usize::from(self.splice)] = cost;
                let known = &self.held[..self.held_n.min(REFERENCE_WINDOWS)];
                // Never empty (the window that starts a probe is recorded first); were it, the
                // path held would stay.
                let held_rate = known.iter().map(|w| w.0).max().unwrap_or(u64::MAX);
                let held_cost = known.iter().map(|w| w.1).min().unwrap_or(0);
                self.held_n = 0;
                let (faster, slower) = (
                    rate.saturating_mul(100) > held_rate.saturating_mul(100 + RATE_PCT),
                    rate.saturating_mul(100) < held_rate.saturating_mul(100 - TIE_PCT),
                );
                let cheaper = cost.saturating_mul(100) < held_cost.saturating_mul(100 - MARGIN_PCT);
                self.phase = Phase::Hold;
                if faster || !slower && cheaper {
                    // The other path is cheaper here: it is held now.
                    self.hold = FIRST_HOLD_MS;
                    self.next_probe = now_ms + self.hold;
                    return Some(Switched { splice: self.splice, rate: [rate, held_rate], cost_ps: [cost, held_cost] });
                }
                self.switch();
                self.hold = (self.hold * 2).min(LONGEST_HOLD_MS);
                self.next_probe = now_ms + self.hold;
            }
        }
        None
    }

    fn switch(&mut self) {
        self.splice = !self.splice;
        self.switches += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A worker's chooser and the clocks it reads: the worker clock (ms), the thread's CPU (ns)
    /// and the bytes moved.
    struct Fed {
        p: BulkPath,
        now: u64,
        cpu: u64,
        bytes: u64,
    }

    impl Fed {
        /// Worker `worker`'s chooser, having read its clocks once.
        fn start(worker: usize) -> Fed {
            let mut f = Fed { p: BulkPath::new(true, 0, worker), now: 0, cpu: 1, bytes: 0 };
            f.p.observe(f.now, f.cpu, f.bytes);
            f
        }

        /// One window of `WINDOW_MS` in which `mib` MiB moved at `cost` ps per byte.
        fn window(&mut self, mib: u64, cost: u64) -> Option<Switched> {
            self.now += WINDOW_MS;
            self.bytes += mib * MIB;
            self.cpu += mib * MIB * cost / 1000;
            self.p.observe(self.now, self.cpu, self.bytes)
        }

        /// `n` windows in which `mib(splice)` MiB moved at `cost(splice)` ps per byte.
        fn windows_at(&mut self, n: usize, mib: impl Fn(bool) -> u64, cost: impl Fn(bool) -> u64) {
            for _ in 0..n {
                let splice = self.p.splice;
                self.window(mib(splice), cost(splice));
            }
        }

        /// As `windows_at`, 100 MiB per window whatever the path.
        fn windows(&mut self, n: usize, cost: impl Fn(bool) -> u64) {
            self.windows_at(n, |_| 100, cost);
        }
    }

    #[test]
    fn the_cheaper_path_is_found_and_held_and_tried_again_later() {
        let mut f = Fed::start(0);
        // Receive buffers cost 300 ps per byte here, splicing 400.
        let cost = |splice: bool| if splice { 400 } else { 300 };
        // The window the burst starts in (never the reference), one on splice, then one to move
        // over, then the probe: copying wins.
        f.windows(4, cost);
        assert!(!f.p.splice, "receive buffers cost less: held");
        assert_eq!(f.p.cost_ps, [300, 400]);
        assert_eq!(f.p.switches, 1);
        // Held for FIRST_HOLD_MS: then splice is tried again and loses; back, and the hold doubles.
        f.windows((FIRST_HOLD_MS / WINDOW_MS) as usize - 1, cost);
        assert!(!f.p.splice);
        assert_eq!(f.p.switches, 1, "held");
        f.windows(3, cost);
        assert!(!f.p.splice, "splice tried again, lost, back");
        assert_eq!(f.p.switches, 3);
        assert_eq!(f.p.hold, 2 * FIRST_HOLD_MS);
    }

    #[test]
    fn splice_stays_where_it_is_cheaper_or_within_the_margin() {
        let mut f = Fed::start(0);
        // Copying 3% cheaper: inside the margin, splice stays.
        f.windows(4, |splice| if splice { 1000 } else { 970 });
        assert!(f.p.splice);
        assert_eq!((f.p.switches, f.p.hold), (2, 2 * FIRST_HOLD_MS));
    }

    #[test]
    fn a_path_that_moves_more_wins_whatever_its_cpu_per_byte() {
        let mut f = Fed::start(0);
        // One stream: splicing costs less CPU per byte but moves 300 MiB a window against 450.
        let mib = |splice: bool| if splice { 300 } else { 450 };
        f.windows_at(4, mib, |splice| if splice { 250 } else { 290 });
        assert!(!f.p.splice, "the receive buffers moved 1.5 x: held");
        // And the other way round: splicing moving 1.5 x wins back at the next probe even if dearer.
        let mib = |splice: bool| if splice { 450 } else { 300 };
        f.windows_at((FIRST_HOLD_MS / WINDOW_MS) as usize + 2, mib, |splice| if splice { 400 } else { 290 });
        assert!(f.p.splice);
        assert_eq!(f.p.switches, 2);
    }

    #[test]
    fn less_cpu_does_not_buy_a_slower_flow() {
        let mut f = Fed::start(0);
        // The receive buffers held; splicing moves 5% less for 25% less CPU per byte: it loses.
        f.p.splice = false;
        let mib = |splice: bool| if splice { 380 } else { 400 };
        let cost = |splice: bool| if splice { 300 } else { 400 };
        f.windows_at(4, mib, cost);
        assert!(!f.p.splice);
        assert_eq!(f.p.switches, 2, "tried, and back");
        // Moving as much (1% under: a tie), the cheaper one is held.
        let mib = |splice: bool| if splice { 396 } else { 400 };
        f.windows_at((2 * FIRST_HOLD_MS / WINDOW_MS) as usize + 2, mib, cost);
        assert!(f.p.splice);
        assert_eq!(f.p.switches, 3);
    }

    #[test]
    fn quiet_windows_measure_nothing_and_a_quiet_probe_goes_back() {
        let mut f = Fed::start(0);
        // Small messages only (1 MiB a window, at about 50 ms of CPU): nothing measured, nothing
        // tried.
        for _ in 0..10 {
            f.window(1, 47_684);
        }
        assert!(f.p.splice);
        assert_eq!((f.p.switches, f.p.cost_ps), (0, [0, 0]));
        // Bulk starts: its first window, a window on splice, the move to copying; then the bulk
        // ends mid-probe.
        f.windows(3, |_| 400);
        assert!(!f.p.splice);
        f.window(0, 0);
        assert!(f.p.splice, "back to the path held");
        assert_eq!(f.p.switches, 2);
    }

    #[test]
    fn the_window_a_burst_starts_in_is_not_what_the_probe_is_held_against() {
        let mut f = Fed::start(0);
        // One stream down, as traced: full windows move 290 MiB splicing and 490 through the
        // receive buffers, which cost 25% more CPU per byte.
        let mib = |splice: bool| if splice { 290 } else { 490 };
        let cost = |splice: bool| if splice { 300 } else { 375 };
        let mut switched = Vec::new();
        // Held: the receive buffers (found earlier); a quiet spell, then a burst that starts
        // mid-window and would, as the reference, let splicing win at 290 against 280 for less CPU.
        f.p.splice = false;
        f.p.next_probe = 0;
        switched.extend(f.window(0, 0));
        switched.extend(f.window(280, 375));
        assert!(!f.p.splice, "the burst's first window asks nothing");
        for _ in 0..3 {
            let splice = f.p.splice;
            switched.extend(f.window(mib(splice), cost(splice)));
        }
        assert!(!f.p.splice, "splicing moved 290 against 490: lost");
        assert_eq!(f.p.switches, 2);
        assert!(switched.is_empty());
        // Where splicing moves more, the switch says what was measured.
        f.p.next_probe = 0;
        for _ in 0..3 {
            let splice = f.p.splice;
            switched.extend(f.window(if splice { 600 } else { 490 }, cost(splice)));
        }
        assert!(f.p.splice);
        let s = switched.pop().expect("a switch");
        assert_eq!((s.rate[0] * WINDOW_MS / 1000 / MIB, s.rate[1] * WINDOW_MS / 1000 / MIB), (600, 490));
        assert_eq!(s.cost_ps, [300, 375]);
        assert!(s.to_string().starts_with("bulk flows now go through splicing: 3.15 GB/s at 300 ps"), "{s}");
    }

    #[test]
    fn a_probe_is_held_against_the_best_of_the_last_windows_not_a_starved_one() {
        let mut f = Fed::start(0);
        // Four streams, the receive buffers held: they move 470–490 MiB a window at 280–300 ps
        // per byte, but the window before the probe was starved by the other worker (330 MiB at
        // 500 ps). Splicing then moves 440 at 340: better than that window, worse than the path.
        f.p.splice = false;
        f.p.next_probe = u64::MAX;
        for (mib, cost) in [(400, 300), (480, 290), (490, 280), (470, 300)] {
            f.window(mib, cost);
        }
        f.p.next_probe = 0;
        f.window(330, 500);
        assert_eq!(f.p.phase, Phase::Settle, "the probe starts");
        f.window(440, 340);
        assert_eq!(f.window(440, 340), None);
        assert!(!f.p.splice, "splicing lost against 490 MiB at 280 ps");
        assert_eq!(f.p.switches, 2, "tried, and back");
        // Against its best it still wins where it is better: 560 MiB a window.
        f.p.next_probe = 0;
        f.windows_at(3, |splice| if splice { 560 } else { 480 }, |splice| if splice { 340 } else { 290 });
        assert!(f.p.splice);
        assert_eq!(f.p.switches, 3);
    }

    #[test]
    fn workers_whose_flows_start_together_probe_one_after_the_other() {
        let mut workers: Vec<Fed> = (0..4).map(Fed::start).collect();
        // Bulk flows on every worker from the same moment; splicing costs more everywhere. Per
        // window, which workers are off the path they held.
        let mut off = Vec::new();
        for _ in 0..16 {
            let mut moved = Vec::new();
            for (w, f) in workers.iter_mut().enumerate() {
                f.window(100, if f.p.splice { 400 } else { 300 });
                // Held: splicing until the receive buffers win, then those.
                if f.p.phase != Phase::Hold {
                    moved.push(w);
                }
            }
            off.push(moved);
        }
        assert!(off.iter().all(|m| m.len() <= 1), "one worker probes at a time: {off:?}");
        assert!(workers.iter().all(|f| !f.p.splice && f.p.switches == 1), "each found the receive buffers cheaper");
    }

    #[test]
    fn disabled_it_never_asks_for_a_window() {
        let p = BulkPath::new(false, 0, 0);
        assert!(!p.due(1_000_000));
        assert!(p.splice);
    }
}
