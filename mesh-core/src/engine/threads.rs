//! How many threads each graph gets: the thread policy that cannot collapse.
//!
//! The pinned ggml's workers spin while they wait for each other inside a
//! graph. On an idle machine that is what makes a decode step fast; next to
//! another busy process, a worker that loses its core makes every other
//! worker spin until it is scheduled again, and a step with as many threads
//! as cores runs 5-100x slower than with one thread less (measured on 2
//! cores). Which count is fastest changes while a process runs (other work
//! starts and stops), so it is measured, not guessed once at start:
//!
//! - The caller's thread count (a session's, the engine's) is the ceiling.
//!   The counts tried are the ceiling and its halvings (8, 4, 2, 1).
//! - Every graph's compute time is recorded under its shape (node count and
//!   input size: a decode step, a prompt chunk of some length), per thread
//!   count; a shape runs with the count whose recent times (the median of
//!   the last three, leaving out starved ones, below, unless all three were)
//!   are lowest for it (a shape not seen before, with the count the latest
//!   decision favoured). Graphs slowed by another process that woke up for
//!   a moment change nothing; a lasting collapse changes the choice after
//!   three graphs (two where the platform reports no CPU time).
//! - A graph that got less than 70% of the CPU time its threads could use
//!   (this process's CPU clock against threads x wall time: spinning workers
//!   use their whole core while they have one) had workers waiting for a
//!   core. The next graph, whatever its shape, tries fewer threads (after a
//!   single starved graph only if fewer threads never ran this shape), and
//!   so does the second graph of every new shape: a machine that is busy
//!   from the start costs one slow graph.
//! - Now and then a graph runs with a neighbouring count (a probe), so a
//!   machine that became idle again gets its threads back. Probes are spaced
//!   by a back-off (50 ms, doubling after each probe that lost, up to 16 s)
//!   and by a multiple of what a probe may take (the slowest median time of
//!   the shape): twice for the first probe after a switch (other work often
//!   stops within a few graphs), ten times after a probe lost, so probes
//!   into a lasting collapse cost at most ~10% of the time.
//!
//! The thread count never changes a result: every output element of ggml's
//! CPU ops (and of mesh-llm's kernels) is computed by one thread, whatever
//! the split (`tests/engine.rs` checks logits bit for bit).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Shortest spacing of probes.
pub const PROBE_MIN: Duration = Duration::from_millis(50);
/// Longest spacing of probes.
pub const PROBE_MAX: Duration = Duration::from_secs(16);
/// Shapes remembered (the map is cleared past this: hostile or unusual
/// workloads cannot grow it).
const MAX_SHAPES: usize = 64;
/// Below this share of the CPU its threads could use, a graph was starved.
const STARVED: f64 = 0.7;
/// Recent compute times of one shape and thread count, seconds, and which
/// were starved (see [`STARVED`]).
#[derive(Clone, Copy, Debug, Default)]
struct Samples {
    last: [f64; 3],
    starved: [bool; 3],
    len: usize,
    next: usize,
}

impl Samples {
    fn push(&mut self, secs: f64, starved: bool) {
        self.last[self.next] = secs;
        self.starved[self.next] = starved;
        self.next = (self.next + 1) % self.last.len();
        self.len = (self.len + 1).min(self.last.len());
    }

    /// What this count takes now: the median of the recent times that were
    /// not starved (another process woke up for a moment: the next graphs
    /// will not see it), or of all of them if every one was (a lasting
    /// collapse). Of two, the slower.
    fn estimate(&self) -> f64 {
        let all = &self.last[..self.len];
        let fed: Vec<f64> = (0..self.len)
            .filter(|&i| !self.starved[i])
            .map(|i| self.last[i])
            .collect();
        let mut v = if fed.is_empty() { all.to_vec() } else { fed };
        if v.is_empty() {
            return f64::INFINITY;
        }
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
}

/// The shape of a graph, for comparing like with like.
pub(crate) type Shape = (usize, usize);

/// Counters of an engine's thread policy (see the [module docs](self) and
/// `GgmlEngine::thread_stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadStats {
    /// Whether the count adapts (`EngineOptions::adaptive_threads`).
    pub adaptive: bool,
    /// The thread count the latest decision favoured (before the caller's
    /// ceiling).
    pub preferred: usize,
    /// Graphs computed.
    pub graphs: u64,
    /// Graphs that ran with fewer threads than their ceiling.
    pub reduced: u64,
    /// Probes run.
    pub probes: u64,
    /// Times the preferred count changed.
    pub switches: u64,
}

/// The thread policy of one engine (see the [module docs](self)). Pure
/// bookkeeping: the caller measures and passes the time, so the decisions
/// are testable without a model.
#[derive(Debug)]
pub(crate) struct ThreadPolicy {
    adaptive: bool,
    /// Recent compute times per shape, by thread count.
    times: HashMap<Shape, HashMap<usize, Samples>>,
    /// The count each shape's times favour.
    chosen: HashMap<Shape, usize>,
    preferred: usize,
    probing: Option<usize>,
    /// Alternates the direction of probes (more threads, then fewer).
    probe_up: bool,
    next_probe: Option<Instant>,
    backoff: Duration,
    /// Probes lost since the last switch.
    lost: u32,
    /// The last graph got too little CPU: the next one tries fewer threads.
    starved: bool,
    /// Starved graphs in a row.
    starved_run: u32,
    /// Longest graph that got too little CPU lately, seconds: what a probe
    /// back up may cost.
    starved_secs: f64,
    stats: ThreadStats,
}

impl ThreadPolicy {
    /// A policy that starts with `ceiling` threads and adapts.
    pub(crate) fn new(ceiling: usize) -> ThreadPolicy {
        ThreadPolicy {
            adaptive: true,
            times: HashMap::new(),
            chosen: HashMap::new(),
            preferred: ceiling.max(1),
            probing: None,
            probe_up: false,
            next_probe: None,
            backoff: PROBE_MIN,
            lost: 0,
            starved: false,
            starved_run: 0,
            starved_secs: 0.0,
            stats: ThreadStats::default(),
        }
    }

    /// Adapt the thread count (the default), or always use the ceiling (the
    /// pinned ggml's behaviour; a benchmarking aid).
    pub(crate) fn set_adaptive(&mut self, on: bool) {
        self.adaptive = on;
        self.probing = None;
    }

    /// Counters.
    pub(crate) fn stats(&self) -> ThreadStats {
        ThreadStats {
            adaptive: self.adaptive,
            preferred: self.preferred,
            ..self.stats
        }
    }

    /// The counts tried under `ceiling`: it and its halvings, largest first.
    fn ladder(ceiling: usize) -> Vec<usize> {
        let mut out = vec![ceiling.max(1)];
        while let Some(&last) = out.last() {
            if last == 1 {
                break;
            }
            out.push(last / 2);
        }
        out
    }

    /// Where the count preferred for `shape` (its own, or the latest
    /// decision for a shape never compared) is on `ladder`, or the largest
    /// rung under it.
    fn rung(&self, shape: Shape, ladder: &[usize]) -> usize {
        let preferred = self.chosen.get(&shape).copied().unwrap_or(self.preferred);
        ladder
            .iter()
            .position(|&t| t <= preferred)
            .unwrap_or(ladder.len() - 1)
    }

    /// The thread count for the next graph of `shape`, at most `ceiling`.
    pub(crate) fn choose(&mut self, shape: Shape, ceiling: usize, now: Instant) -> usize {
        let ceiling = ceiling.max(1);
        if !self.adaptive {
            return ceiling;
        }
        let ladder = Self::ladder(ceiling);
        let at = self.rung(shape, &ladder);
        let t = ladder[at];
        let known = |t: usize| self.times.get(&shape).is_some_and(|m| m.contains_key(&t));
        let up = at.checked_sub(1).map(|i| ladder[i]);
        let down = ladder.get(at + 1).copied();
        // A starved graph's signal is for the next graph only.
        let starved = std::mem::take(&mut self.starved);
        if let Some(d) = down.filter(|_| starved) {
            return self.probe(d);
        }
        if !known(t) {
            return t;
        }
        if let Some(d) = down.filter(|&d| !known(d)) {
            // Fewer threads never collapse: try them on the second graph of
            // a shape, so a busy machine is noticed after one slow graph.
            return self.probe(d);
        }
        if self.next_probe.is_some_and(|p| now >= p) {
            self.probe_up = !self.probe_up;
            let probe = if self.probe_up {
                up.or(down)
            } else {
                down.or(up)
            };
            if let Some(p) = probe {
                return self.probe(p);
            }
        }
        t
    }

    /// Runs the next graph with `threads` as a probe.
    fn probe(&mut self, threads: usize) -> usize {
        self.probing = Some(threads);
        self.stats.probes += 1;
        threads
    }

    /// Records that a graph of `shape` took `elapsed` with `threads` threads
    /// under `ceiling`, and used `cpu` of this process's CPU time (`None`
    /// where the platform does not say).
    pub(crate) fn record(
        &mut self,
        shape: Shape,
        threads: usize,
        ceiling: usize,
        elapsed: Duration,
        cpu: Option<Duration>,
        now: Instant,
    ) {
        self.stats.graphs += 1;
        if threads < ceiling {
            self.stats.reduced += 1;
        }
        if !self.adaptive {
            return;
        }
        // Spinning workers use their whole core while they run: a graph
        // that got much less CPU than threads x wall time had workers
        // waiting for a core, the start of a collapse.
        let secs = elapsed.as_secs_f64();
        let share = cpu.map(|c| c.as_secs_f64() / (secs * threads as f64));
        let starved = threads > 1 && share.is_some_and(|s| s < STARVED);
        if starved {
            // Try fewer threads next if they are unknown for this shape, or
            // if this is not the first starved graph in a row (a moment of
            // other work is common and passes; fewer threads' time is known).
            let fewer = threads / 2;
            let known = self
                .times
                .get(&shape)
                .is_some_and(|m| m.contains_key(&fewer));
            self.starved_run += 1;
            self.starved = !known || self.starved_run >= 2;
            self.starved_secs = self.starved_secs.max(secs);
        } else if threads > 1 {
            self.starved_run = 0;
        }
        if self.times.len() >= MAX_SHAPES && !self.times.contains_key(&shape) {
            self.times.clear();
            self.chosen.clear();
        }
        let probe = self.probing.take() == Some(threads);
        let times = self.times.entry(shape).or_default();
        let samples = times.entry(threads).or_default();
        if probe {
            // A probe's fresh sample replaces older ones: the machine may
            // have changed since.
            *samples = Samples::default();
        }
        samples.push(secs, starved);
        // The fastest count known for this shape, ties to more threads.
        let ladder = Self::ladder(ceiling);
        let best = ladder
            .iter()
            .filter_map(|t| times.get(t).map(|v| (*t, v.estimate())))
            .fold(None, |b: Option<(usize, f64)>, (t, v)| match b {
                Some((_, bv)) if bv <= v => b,
                _ => Some((t, v)),
            })
            .map(|(t, _)| t);
        // What a probe may cost: the slowest median known for this shape,
        // or, while some count has never run it, the longest starved graph.
        let unknown = ladder.iter().any(|t| !times.contains_key(t));
        let slowest = times
            .values()
            .map(Samples::estimate)
            .fold(if unknown { self.starved_secs } else { 0.0 }, f64::max);
        let was = ladder[self.rung(shape, &ladder)];
        if let Some(best) = best {
            self.chosen.insert(shape, best);
            self.preferred = best;
            if best != was {
                self.stats.switches += 1;
                self.backoff = PROBE_MIN;
                self.lost = 0;
            } else if probe {
                self.lost += 1;
                if threads < was {
                    // More threads won again: what starved them has gone.
                    self.starved_secs = 0.0;
                }
                // The probe lost: probe less often.
                self.backoff = (self.backoff * 2).min(PROBE_MAX);
            }
        }
        // The next probe waits out the back-off and a multiple of what it
        // may cost (see the module docs).
        if probe || self.next_probe.is_none() || best != Some(was) {
            let times = if self.lost == 0 { 2.0 } else { 10.0 };
            let spacing = Duration::try_from_secs_f64(times * slowest).unwrap_or(PROBE_MAX);
            self.next_probe = Some(now + self.backoff.max(spacing));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DECODE: Shape = (1000, 4);
    const MS: Duration = Duration::from_millis(1);

    /// Runs `n` graphs of `shape` on a machine where `t` threads take
    /// `cost(t)`; returns the thread counts used.
    fn run(
        p: &mut ThreadPolicy,
        clock: &mut Instant,
        shape: Shape,
        ceiling: usize,
        n: usize,
        mut cost: impl FnMut(usize) -> (Duration, Option<Duration>),
    ) -> Vec<usize> {
        (0..n)
            .map(|_| {
                let t = p.choose(shape, ceiling, *clock);
                let (took, cpu) = cost(t);
                *clock += took;
                p.record(shape, t, ceiling, took, cpu, *clock);
                t
            })
            .collect()
    }

    /// 2 threads 1.6x faster than 1; every thread has its core.
    fn idle(t: usize) -> (Duration, Option<Duration>) {
        let wall = if t >= 2 { 5 * MS } else { 8 * MS };
        (wall, Some(wall * t as u32))
    }

    /// Next to a busy process: 2 spinning threads collapse, and get half
    /// the CPU they could use.
    fn busy(t: usize) -> (Duration, Option<Duration>) {
        let wall = if t >= 2 { 300 * MS } else { 12 * MS };
        (wall, Some(wall * t as u32 / 2))
    }

    /// [`busy`] on a platform that does not report CPU time.
    fn busy_untimed(t: usize) -> (Duration, Option<Duration>) {
        (busy(t).0, None)
    }

    #[test]
    fn an_idle_machine_keeps_every_thread_and_probes_rarely() {
        let mut p = ThreadPolicy::new(2);
        let mut clock = Instant::now();
        let used = run(&mut p, &mut clock, DECODE, 2, 20_000, idle);
        let ones = used.iter().filter(|&&t| t == 1).count();
        // 100 s of decoding: probes back off to one per 16 s.
        assert!(ones <= 15, "{ones} graphs with 1 thread");
        assert_eq!(p.stats().preferred, 2);
        assert_eq!(p.stats().graphs, 20_000);
    }

    #[test]
    fn a_collapse_switches_at_once_and_returns_when_the_machine_is_idle_again() {
        let mut p = ThreadPolicy::new(2);
        let mut clock = Instant::now();
        run(&mut p, &mut clock, DECODE, 2, 500, idle);
        let start = clock;
        let used = run(&mut p, &mut clock, DECODE, 2, 2_000, busy_untimed);
        // Without CPU times: two collapsed steps (the median of three moves
        // after two), then one thread; probes cost at most ~10%.
        assert_eq!(used[..5], [2, 2, 1, 1, 1]);
        let spent = clock - start;
        let ideal = busy(1).0 * 2_000;
        assert!(
            spent.as_secs_f64() < 1.2 * ideal.as_secs_f64() + 0.3,
            "{spent:?} for what takes {ideal:?} with one thread"
        );
        // Idle again: back to two threads within one probe spacing (at most
        // ten times the collapsed step, or 16 s).
        let used = run(&mut p, &mut clock, DECODE, 2, 4_000, idle);
        let back = used.iter().position(|&t| t == 2).expect("never went back");
        let tail = &used[back + 10..];
        assert!(tail.iter().filter(|&&t| t == 2).count() > tail.len() * 99 / 100);
        assert_eq!(p.stats().preferred, 2);
    }

    #[test]
    fn a_machine_busy_from_the_start_costs_one_slow_graph() {
        let mut p = ThreadPolicy::new(2);
        let mut clock = Instant::now();
        let used = run(&mut p, &mut clock, DECODE, 2, 200, busy);
        // The first graph, then fewer threads (the second graph tries them);
        // one probe back up after twice the slow graph's time (0.6 s, 50
        // graphs of 12 ms), which loses; the next one waits ten times (3 s).
        let twos: Vec<usize> = (0..used.len()).filter(|&i| used[i] == 2).collect();
        assert_eq!(twos.len(), 2, "{used:?}");
        assert!(twos[1] >= 45, "{used:?}");
    }

    #[test]
    fn a_starved_graph_sends_the_next_one_of_any_shape_to_fewer_threads() {
        let mut p = ThreadPolicy::new(2);
        let mut clock = Instant::now();
        // A prompt chunk, once, starved; then decode steps (a new shape).
        let prompt = run(&mut p, &mut clock, (1200, 512), 2, 1, busy);
        let used = run(&mut p, &mut clock, DECODE, 2, 300, busy);
        assert_eq!(prompt, [2]);
        // Probes back up: after twice the starved graph (0.6 s, 50 steps of
        // 12 ms), then ten times.
        let twos: Vec<usize> = (0..used.len()).filter(|&i| used[i] == 2).collect();
        assert_eq!(twos.len(), 1, "{used:?}");
        assert!(twos[0] >= 45, "{used:?}");
        // Without CPU times the first decode step would have collapsed.
        let mut q = ThreadPolicy::new(2);
        run(&mut q, &mut clock, (1200, 512), 2, 1, busy_untimed);
        assert_eq!(run(&mut q, &mut clock, DECODE, 2, 1, busy_untimed), [2]);
    }

    #[test]
    fn a_lasting_collapse_with_cpu_times_costs_three_slow_graphs() {
        let mut p = ThreadPolicy::new(2);
        let mut clock = Instant::now();
        run(&mut p, &mut clock, DECODE, 2, 500, idle);
        let used = run(&mut p, &mut clock, DECODE, 2, 100, busy);
        // A second starved graph in a row sends the next one to one thread
        // (after the first, one thread's time is known: no probe); the third
        // starved graph switches.
        assert_eq!(used[..6], [2, 2, 1, 2, 1, 1], "{used:?}");
        // Then one thread until the first probe back up, twice the collapsed
        // graph's time later (0.6 s, 50 graphs of 12 ms).
        assert!(used[6..50].iter().all(|&t| t == 1), "{used:?}");
    }

    #[test]
    fn one_slow_graph_changes_nothing() {
        let mut p = ThreadPolicy::new(2);
        let mut clock = Instant::now();
        run(&mut p, &mut clock, DECODE, 2, 200, idle);
        // Another process took a core for a moment: one starved graph.
        let mut once = Some((30 * MS, Some(36 * MS)));
        let used = run(&mut p, &mut clock, DECODE, 2, 200, |t| {
            once.take().unwrap_or_else(|| idle(t))
        });
        // It tries one thread once, which loses; the rest keep two.
        assert_eq!(used.iter().filter(|&&t| t == 1).count(), 1, "{used:?}");
        assert_eq!(p.stats().preferred, 2);
    }

    #[test]
    fn the_ceiling_is_never_exceeded_and_one_thread_never_probes() {
        let mut p = ThreadPolicy::new(8);
        let mut clock = Instant::now();
        let used = run(&mut p, &mut clock, DECODE, 4, 3_000, |t| {
            (MS * (16 / t as u32), None)
        });
        assert!(used.iter().all(|&t| t <= 4 && [1, 2, 4].contains(&t)));
        let used = run(&mut p, &mut clock, DECODE, 1, 1_000, idle);
        assert!(used.iter().all(|&t| t == 1));
    }

    #[test]
    fn a_new_shape_starts_with_the_preferred_count() {
        let mut p = ThreadPolicy::new(2);
        let mut clock = Instant::now();
        run(&mut p, &mut clock, DECODE, 2, 100, idle);
        run(&mut p, &mut clock, DECODE, 2, 100, busy);
        assert_eq!(p.stats().preferred, 1);
        // A prompt chunk never seen: runs with the preferred count.
        assert_eq!(p.choose((1200, 512), 2, clock), 1);
    }

    #[test]
    fn fixed_policy_uses_the_ceiling() {
        let mut p = ThreadPolicy::new(2);
        p.set_adaptive(false);
        let mut clock = Instant::now();
        let used = run(&mut p, &mut clock, DECODE, 2, 100, busy);
        assert!(used.iter().all(|&t| t == 2));
        assert!(!p.stats().adaptive);
    }

    #[test]
    fn shapes_are_bounded() {
        let mut p = ThreadPolicy::new(2);
        let mut clock = Instant::now();
        for i in 0..1000 {
            run(&mut p, &mut clock, (i, i), 2, 1, idle);
        }
        assert!(p.times.len() <= MAX_SHAPES);
    }
}
