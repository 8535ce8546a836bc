//! Keeping a graph's compute threads on distinct CPUs.
//!
//! The pinned ggml starts its worker threads afresh for every graph, and
//! they spin while they wait for each other. Now and then the kernel starts
//! a worker on the CPU of the thread that created it while another CPU sits
//! idle (measured on the 2-core VMs: about 1 graph in 30 after the process
//! was idle for a moment). The two spinning threads then share one CPU,
//! each step waits for a scheduler tick, and it takes the load balancer
//! about 20 ms to move one of them: a decode step of 6 ms took 25.
//!
//! [`placement_callback`] is the graph's abort callback, which ggml calls
//! on every thread before it does anything else (and between nodes). On a
//! thread's first call each thread claims the CPU it runs on; a thread that
//! finds its CPU already claimed by another thread of the same graph moves
//! itself to an allowed CPU nobody claimed (and gets its affinity back at
//! once, so the kernel stays free to balance later). Then each waits until
//! all have checked in, spinning briefly and then sleeping, so a thread
//! queued behind another on a shared CPU gets to run and move. With no
//! collision this costs what ggml's first barrier costs anyway: all the
//! threads must have started. Later calls are one atomic load.
//!
//! Linux and Android only (elsewhere threads only check in and wait).

use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a thread spins before it sleeps while waiting for the others
/// (a new thread on an idle CPU starts well within it).
const SPIN: Duration = Duration::from_micros(100);
/// One sleep while waiting: lets a thread queued on this CPU run.
const NAP: Duration = Duration::from_micros(20);
/// How long a thread waits for the others at most (then ggml's barrier
/// takes over: correctness never depends on this).
const WAIT: Duration = Duration::from_millis(2);

/// Source of [`Placement`] ids.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The id of the last [`Placement`] this thread checked in to.
    static CHECKED_IN_TO: Cell<u64> = const { Cell::new(0) };
}

/// One graph compute's check-in state: the data of its [`placement_callback`].
#[derive(Debug)]
pub(crate) struct Placement {
    id: u64,
    nth: usize,
    claimed: Mutex<Vec<usize>>,
    checked_in: AtomicUsize,
}

impl Placement {
    /// For a compute on `nth` threads.
    pub(crate) fn new(nth: usize) -> Placement {
        Placement {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            nth,
            claimed: Mutex::new(Vec::with_capacity(nth)),
            checked_in: AtomicUsize::new(0),
        }
    }

    /// Called by each of the `nth` threads once: claims this thread's CPU
    /// (moving first if another thread holds it) and waits for the rest.
    pub(crate) fn check_in(&self) -> CheckIn {
        let nth = self.nth;
        let mut report = CheckIn::default();
        if nth < 2 {
            return report;
        }
        if let Some(cpu) = os::current_cpu() {
            report.was_on = Some(cpu);
            let target = {
                let mut claimed = self.claimed.lock().unwrap_or_else(|e| e.into_inner());
                let target = if claimed.contains(&cpu) {
                    choose(cpu, &claimed, &os::allowed_cpus())
                } else {
                    cpu
                };
                claimed.push(target);
                target
            };
            report.claimed = Some(target);
            if target != cpu && os::move_to(target) {
                report.moved_to = os::current_cpu();
            }
        }
        self.checked_in.fetch_add(1, Ordering::AcqRel);
        let start = Instant::now();
        while self.checked_in.load(Ordering::Acquire) < nth {
            let waited = start.elapsed();
            if waited > WAIT {
                break;
            }
            if waited < SPIN {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(NAP);
            }
        }
        report
    }
}

/// What [`Placement::check_in`] did, for tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CheckIn {
    /// The CPU the thread was on when it checked in.
    pub was_on: Option<usize>,
    /// The CPU it claimed.
    pub claimed: Option<usize>,
    /// Where it ran right after moving, if it moved.
    pub moved_to: Option<usize>,
}

/// Where a thread on `cpu` should run, given the CPUs other threads of its
/// graph already claimed: its own CPU if free, else the first allowed CPU
/// nobody claimed, else its own (more threads than CPUs: nothing helps).
pub(crate) fn choose(cpu: usize, claimed: &[usize], allowed: &[usize]) -> usize {
    if !claimed.contains(&cpu) {
        return cpu;
    }
    allowed
        .iter()
        .copied()
        .find(|c| !claimed.contains(c))
        .unwrap_or(cpu)
}

/// A ggml abort callback (`ggml_cplan::abort_callback`) whose data is a
/// [`Placement`]: checks the calling thread in on its first call for that
/// placement; never aborts.
///
/// # Safety
/// `data` points to a [`Placement`] that outlives the graph's compute.
pub(crate) unsafe extern "C" fn placement_callback(data: *mut c_void) -> bool {
    // SAFETY: the caller (the graph compute) passes a live `Placement`.
    let placement = unsafe { &*(data as *const Placement) };
    if placement.checked_in.load(Ordering::Relaxed) >= placement.nth {
        return false;
    }
    let first = CHECKED_IN_TO.with(|last| last.replace(placement.id) != placement.id);
    if first {
        placement.check_in();
    }
    false
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod os {
    use std::mem;

    /// The CPU this thread runs on now.
    pub(super) fn current_cpu() -> Option<usize> {
        // SAFETY: no arguments; returns -1 on failure.
        let cpu = unsafe { libc::sched_getcpu() };
        usize::try_from(cpu).ok()
    }

    fn affinity() -> Option<libc::cpu_set_t> {
        // SAFETY: an all-zero cpu_set_t is a valid, empty set, and the call
        // writes at most `size_of::<cpu_set_t>()` bytes into it.
        unsafe {
            let mut set: libc::cpu_set_t = mem::zeroed();
            (libc::sched_getaffinity(0, mem::size_of::<libc::cpu_set_t>(), &mut set) == 0)
                .then_some(set)
        }
    }

    /// The CPUs this thread may run on, ascending.
    pub(super) fn allowed_cpus() -> Vec<usize> {
        let Some(set) = affinity() else {
            return Vec::new();
        };
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: `c` is below CPU_SETSIZE.
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .collect()
    }

    /// Moves this thread to `cpu`, one of its allowed CPUs (restricting its
    /// affinity to that CPU makes the kernel migrate it before the call
    /// returns), then gives it back its affinity. `false` if it could not.
    pub(super) fn move_to(cpu: usize) -> bool {
        let Some(original) = affinity() else {
            return false;
        };
        if cpu >= libc::CPU_SETSIZE as usize {
            return false;
        }
        // SAFETY: `one` is a valid set with one CPU below CPU_SETSIZE; both
        // calls only read the sets.
        unsafe {
            let mut one: libc::cpu_set_t = mem::zeroed();
            libc::CPU_SET(cpu, &mut one);
            let size = mem::size_of::<libc::cpu_set_t>();
            let moved = libc::sched_setaffinity(0, size, &one) == 0;
            libc::sched_setaffinity(0, size, &original);
            moved
        }
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod os {
    pub(super) fn current_cpu() -> Option<usize> {
        None
    }
    pub(super) fn allowed_cpus() -> Vec<usize> {
        Vec::new()
    }
    pub(super) fn move_to(_cpu: usize) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_thread_keeps_a_free_cpu_and_leaves_a_claimed_one() {
        assert_eq!(choose(3, &[], &[0, 1, 2, 3]), 3);
        assert_eq!(choose(3, &[1], &[0, 1, 2, 3]), 3);
        assert_eq!(choose(1, &[1], &[0, 1, 2, 3]), 0);
        assert_eq!(choose(0, &[0, 1], &[0, 1, 2, 3]), 2);
        // Every allowed CPU taken: stay.
        assert_eq!(choose(1, &[0, 1], &[0, 1]), 1);
        // Only CPUs this thread may use count (e.g. under taskset).
        assert_eq!(choose(4, &[4], &[4, 5]), 5);
    }

    /// A thread that checks in on a CPU another thread of its graph holds
    /// moves to a free one, when this process may use two. Each thread is
    /// put on the same CPU by pinning and unpinned at once (as ggml's
    /// workers arrive: with the creator's full affinity). They check in one
    /// after the other, so the first waits out its wait for the second.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn a_thread_on_a_claimed_cpu_moves() {
        let allowed = os::allowed_cpus();
        if allowed.len() < 2 {
            eprintln!("skipped: fewer than 2 CPUs allowed");
            return;
        }
        let first = allowed[0];
        let placement = Arc::new(Placement::new(2));
        let check_in_on_first = || {
            let placement = placement.clone();
            std::thread::spawn(move || {
                assert!(os::move_to(first));
                placement.check_in()
            })
            .join()
            .unwrap()
        };
        let a = check_in_on_first();
        let b = check_in_on_first();
        assert_eq!(a.moved_to, None, "{a:?}");
        assert_ne!(a.claimed, b.claimed, "{a:?} {b:?}");
        // Unless the kernel moved `b` between its pinning and its check-in,
        // it found `first` claimed and moved to where it claimed.
        if b.was_on == a.claimed {
            assert!(
                b.moved_to.is_some() && b.moved_to == b.claimed,
                "{a:?} {b:?}"
            );
            assert_ne!(b.moved_to, a.claimed);
        } else {
            assert_eq!(b.moved_to, None, "{a:?} {b:?}");
        }
    }

    #[test]
    fn one_thread_does_nothing() {
        assert_eq!(Placement::new(1).check_in(), CheckIn::default());
    }

    /// The callback checks a thread in once per placement, however often
    /// ggml calls it, and never aborts.
    #[test]
    fn the_callback_checks_in_once_and_never_aborts() {
        let a = Placement::new(2);
        let data = &a as *const Placement as *mut c_void;
        for _ in 0..3 {
            // SAFETY: `a` outlives the calls.
            assert!(!unsafe { placement_callback(data) });
        }
        assert_eq!(a.checked_in.load(Ordering::Relaxed), 1);
        let b = Placement::new(2);
        // SAFETY: `b` outlives the call.
        assert!(!unsafe { placement_callback(&b as *const Placement as *mut c_void) });
        assert_eq!(b.checked_in.load(Ordering::Relaxed), 1);
    }
}
