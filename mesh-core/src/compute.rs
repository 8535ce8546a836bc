//! One compute pool per process: graphs run one at a time, in arrival order.
//!
//! The pinned ggml spins its worker threads while a graph runs, so two graphs
//! computing at once on a machine with as many cores as one graph's threads
//! do not share the cores: each spins while the other holds them, and
//! throughput collapses by orders of magnitude. Every graph a [`Node`]
//! computes (its own generation, and every stage session it serves) therefore
//! takes the process-wide [`ComputePool`] first. The pool is a fair (FIFO)
//! ticket lock: a session waits for at most the graphs queued before it, and
//! no session starves.
//!
//! [`Node`]: crate::node::Node

use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A fair lock around graph computation (see the module docs).
#[derive(Debug, Default)]
pub struct ComputePool {
    state: Mutex<Tickets>,
    turn: Condvar,
}

#[derive(Debug, Default)]
struct Tickets {
    next: u64,
    serving: u64,
    waited: Duration,
    runs: u64,
}

/// Counters of a [`ComputePool`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PoolStats {
    /// Computations run.
    pub runs: u64,
    /// Total time computations waited for their turn.
    pub waited: Duration,
}

impl ComputePool {
    /// A new pool (tests; the process uses [`pool`]).
    pub fn new() -> ComputePool {
        ComputePool::default()
    }

    /// Runs `f` when every computation that asked before has finished.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        let asked = Instant::now();
        let ticket = {
            let mut s = self.lock();
            let t = s.next;
            s.next += 1;
            while s.serving != t {
                s = self.turn.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            s.waited += asked.elapsed();
            s.runs += 1;
            t
        };
        // Pass the turn on even if `f` panics.
        struct Next<'a>(&'a ComputePool, u64);
        impl Drop for Next<'_> {
            fn drop(&mut self) {
                let mut s = self.0.lock();
                s.serving = self.1 + 1;
                drop(s);
                self.0.turn.notify_all();
            }
        }
        let _next = Next(self, ticket);
        f()
    }

    /// Runs so far and the time they waited.
    pub fn stats(&self) -> PoolStats {
        let s = self.lock();
        PoolStats {
            runs: s.runs,
            waited: s.waited,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tickets> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The process-wide pool.
pub fn pool() -> &'static ComputePool {
    static POOL: OnceLock<ComputePool> = OnceLock::new();
    POOL.get_or_init(ComputePool::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn runs_one_at_a_time_and_survives_a_panic() {
        let pool = Arc::new(ComputePool::new());
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (pool, inside, most) = (pool.clone(), inside.clone(), most.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        pool.run(|| {
                            let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(n, Ordering::SeqCst);
                            std::thread::yield_now();
                            inside.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 1);
        assert_eq!(pool.stats().runs, 200);
        let p = pool.clone();
        assert!(std::thread::spawn(move || p.run(|| panic!("boom")))
            .join()
            .is_err());
        // The turn passed on: the next run does not wait forever.
        assert_eq!(pool.run(|| 5), 5);
    }
}
