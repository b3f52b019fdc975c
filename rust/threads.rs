//! How every multithreaded kernel runs: [`split`] (and [`for_each_chunk`]) hand numbered parts
//! to torch's OpenMP team when the process has one ([`crate::openmp`]), else to ferrograd's own
//! pool; [`Disjoint`] gives the parts their non-overlapping pieces of the outputs. The thread
//! count follows torch's (`torch.set_num_threads`) until `ferrograd.set_num_threads` pins one.

use std::cell::Cell;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Once, RwLock};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::{FgError, FgResult};

/// The pool and the process it was started in: a forked child (DataLoader workers) inherits
/// the handle but not the threads, so it must start its own. It runs the parts only where no
/// OpenMP team does (`split`), and is started on first use.
static POOL: RwLock<Option<(u32, Arc<ThreadPool>)>> = RwLock::new(None);

/// The count [`set_num_threads`] pinned; 0 while the count follows torch's.
static PINNED: AtomicUsize = AtomicUsize::new(0);

/// While following torch without an OpenMP runtime to read its count from: the count torch
/// had when ferrograd last started following it (0: the machine's available parallelism).
static FALLBACK: AtomicUsize = AtomicUsize::new(0);

fn build(threads: usize) -> FgResult<Arc<ThreadPool>> {
    ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("ferrograd-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| FgError::Runtime(format!("set_num_threads: cannot start threads: {e}")))
}

/// The most workers [`set_num_threads`] starts: each is an OS thread started at once, so a
/// count beyond this is a mistake (10^6 would start a million threads), not a configuration.
pub const MAX_THREADS: usize = 1024;

/// Pins the thread count at `threads` (`pin`, its pool started at once), or follows torch's
/// count again, with `threads` (torch's count now) standing in for it where no OpenMP
/// runtime holds it.
pub fn set_num_threads(threads: usize, pin: bool) -> FgResult<()> {
    if threads == 0 || threads > MAX_THREADS {
        return Err(FgError::Value(format!(
            "set_num_threads: n must be in [1, {MAX_THREADS}], got {threads}"
        )));
    }
    let pool = if pin { Some(build(threads)?) } else { None };
    let mut slot = POOL.write().unwrap_or_else(|e| e.into_inner());
    PINNED.store(if pin { threads } else { 0 }, Ordering::Relaxed);
    FALLBACK.store(threads, Ordering::Relaxed);
    install(&mut slot, pool);
    Ok(())
}

/// Puts `pool` (started in this process) in the pool's slot. A pool the slot held from the
/// parent process (a forked child's) is forgotten, not dropped: its threads live only in the
/// parent, and dropping it could touch their state.
fn install(slot: &mut Option<(u32, Arc<ThreadPool>)>, pool: Option<Arc<ThreadPool>>) {
    let pid = process_id();
    if let Some((owner, old)) = std::mem::replace(slot, pool.map(|p| (pid, p))) {
        if owner != pid {
            std::mem::forget(old);
        }
    }
}

/// The pool's size: the pinned count, else the fallback.
fn pool_size() -> usize {
    match (
        PINNED.load(Ordering::Relaxed),
        FALLBACK.load(Ordering::Relaxed),
    ) {
        (0, 0) => std::thread::available_parallelism().map_or(1, |n| n.get()),
        (0, n) | (n, _) => n,
    }
}

/// This process's id, cached: getpid is a system call (about 0.1 µs on a VM), which every
/// kernel call made twice to notice a fork (the pool's check and the OpenMP runtime's). A
/// forked child starts with the cache cleared by the atfork handler, and asks once.
pub fn process_id() -> u32 {
    static PID: AtomicU32 = AtomicU32::new(0);
    #[cfg(unix)]
    {
        static HANDLER: Once = Once::new();
        extern "C" fn forked_child() {
            PID.store(0, Ordering::Relaxed); // an atomic store: async-signal-safe
        }
        extern "C" {
            fn pthread_atfork(
                prepare: Option<extern "C" fn()>,
                parent: Option<extern "C" fn()>,
                child: Option<extern "C" fn()>,
            ) -> std::ffi::c_int;
        }
        // SAFETY: registers a handler that only stores into an atomic.
        HANDLER.call_once(|| unsafe {
            pthread_atfork(None, None, Some(forked_child));
        });
    }
    match PID.load(Ordering::Relaxed) {
        0 => {
            let pid = std::process::id();
            PID.store(pid, Ordering::Relaxed);
            pid
        }
        pid => pid,
    }
}

/// The current pool, started on first use in this process (again in a forked child).
pub fn pool() -> Arc<ThreadPool> {
    let pid = process_id();
    if let Some((owner, pool)) = POOL.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        if *owner == pid {
            return pool.clone();
        }
    }
    let mut slot = POOL.write().unwrap_or_else(|e| e.into_inner());
    if let Some((owner, pool)) = slot.as_ref() {
        if *owner == pid {
            return pool.clone();
        }
    }
    let pool = build(pool_size()).expect("thread pool");
    install(&mut slot, Some(pool.clone()));
    pool
}

thread_local! {
    /// Whether this thread is running parts of a [`split`].
    static IN_PART: Cell<bool> = const { Cell::new(false) };
}

/// torch's count as the last call outside a part read it.
static TORCH_COUNT: AtomicUsize = AtomicUsize::new(0);

/// Marks the current thread as running parts until dropped (a panicking part included).
struct InPart(bool);

impl InPart {
    fn enter() -> Self {
        InPart(IN_PART.replace(true))
    }
}

impl Drop for InPart {
    fn drop(&mut self) {
        IN_PART.set(self.0);
    }
}

/// How many threads a kernel splits its work over: the pinned count, else torch's (read at
/// each call, so that `torch.set_num_threads` takes effect at once). A kernel nested in a part
/// of another takes the count its caller read: asking torch from a worker thread would run
/// torch's per-thread set-up there.
pub fn num_threads() -> usize {
    match PINNED.load(Ordering::Relaxed) {
        0 if IN_PART.get() => match TORCH_COUNT.load(Ordering::Relaxed) {
            0 => pool_size(),
            n => n,
        },
        0 => {
            let n = crate::openmp::torch_threads().unwrap_or_else(pool_size);
            TORCH_COUNT.store(n, Ordering::Relaxed);
            n
        }
        n => n,
    }
}

/// Runs `f(part)` for every part in 0..parts on up to `num_threads()` threads, the calling
/// thread among them, each taking the next part from a shared counter. The threads are torch's
/// OpenMP team when the process has one ([`crate::openmp`]), else the pool. A thread that is
/// slow to wake (tens to hundreds of microseconds on a VM) then just takes fewer parts.
///
/// The OpenMP team's join waits for every member: when other processes hold the cores, a
/// member that is not running delays the call by scheduler ticks (measured on a loaded 2-core
/// VM: calls took multiples of 4 ms, a 30 us softmax 6 ms), where the pool only lost about
/// half its speed. On a machine of its own the team avoids fighting torch's spinning threads
/// (see openmp.rs), the case this favours.
pub fn split<F: Fn(usize) + Sync>(parts: usize, f: F) {
    let workers = num_threads().min(parts);
    if workers <= 1 {
        (0..parts).for_each(f);
        return;
    }
    let next = AtomicUsize::new(0);
    let work = |_: usize| {
        let _in_part = InPart::enter();
        loop {
            let part = next.fetch_add(1, Ordering::Relaxed);
            if part >= parts {
                break;
            }
            f(part);
        }
    };
    if crate::openmp::parallel(workers, &work) {
        return;
    }
    let work = &work;
    pool().in_place_scope(|scope| {
        for worker in 1..workers {
            scope.spawn(move |_| work(worker));
        }
        work(0);
    });
}

/// Runs `f(part)` for every part in 0..parts as [`split`] does, but each thread first takes the
/// parts of its own contiguous run in order (thread w: parts w·parts/T .. (w+1)·parts/T), then
/// what is left of the others' runs. Kernels that stream memory then read one sequential range
/// per thread that the prefetchers follow (a shared counter interleaves the threads' parts: the
/// W4A16 GEMV from memory ran 9-23% slower per decoded token on Zen 5), and a thread that is
/// late still leaves its run to the others.
pub fn split_contiguous<F: Fn(usize) + Sync>(parts: usize, f: F) {
    let workers = num_threads().min(parts);
    if workers <= 1 {
        (0..parts).for_each(f);
        return;
    }
    let end = |w: usize| (w + 1) * parts / workers;
    let next: Vec<Counter> = (0..workers)
        .map(|w| Counter(AtomicUsize::new(w * parts / workers)))
        .collect();
    split(workers, |me| {
        for w in (me..workers).chain(0..me) {
            loop {
                let part = next[w].0.fetch_add(1, Ordering::Relaxed);
                if part >= end(w) {
                    break;
                }
                f(part);
            }
        }
    });
}

/// One thread's part counter, alone in its cache line: side by side, every part a thread took
/// pulled the line away from the other threads.
#[repr(align(64))]
struct Counter(AtomicUsize);

/// Parts per thread when a job is cut for [`split`]: a thread that starts late (a shared
/// machine) leaves its parts to the others.
const PARTS_PER_THREAD: usize = 4;

/// Items per part when `items` are cut into a few parts per thread (callers clamp or round it).
pub fn part_size(items: usize) -> usize {
    items.div_ceil(PARTS_PER_THREAD * num_threads())
}

/// Runs `f(t, rows)` for the consecutive ranges of `chunk` rows out of `rows` (the last may be
/// short), in parallel through [`split_contiguous`]: row kernels stream memory.
pub fn for_each_chunk<F: Fn(usize, Range<usize>) + Sync>(rows: usize, chunk: usize, f: F) {
    let chunk = chunk.max(1);
    split_contiguous(rows.div_ceil(chunk), |t| {
        f(t, t * chunk..((t + 1) * chunk).min(rows))
    });
}

/// A mutable slice that parallel parts cut into disjoint pieces.
pub struct Disjoint<'a, T> {
    ptr: SendPtr<T>,
    len: usize,
    _slice: PhantomData<&'a mut [T]>,
}

impl<'a, T> Disjoint<'a, T> {
    pub fn new(slice: &'a mut [T]) -> Self {
        Disjoint {
            ptr: SendPtr(slice.as_mut_ptr()),
            len: slice.len(),
            _slice: PhantomData,
        }
    }

    /// The elements `range` (bounds-checked).
    ///
    /// # Safety
    /// No two pieces alive at the same time overlap.
    #[allow(clippy::mut_from_ref)] // disjointness is the caller's contract
    pub unsafe fn piece(&self, range: Range<usize>) -> &'a mut [T] {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "piece out of bounds"
        );
        std::slice::from_raw_parts_mut(self.ptr.0.add(range.start), range.len())
    }
}

// SAFETY: pieces handed to different threads are disjoint (the `piece` contract).
unsafe impl<T: Send> Sync for Disjoint<'_, T> {}

/// Rows per parallel task for a row-wise kernel: tasks of about `min_elems` elements, all
/// rows on the calling thread when the whole job is smaller than that.
pub fn rows_per_task(rows: usize, len: usize, min_elems: usize) -> usize {
    if num_threads() == 1 || rows * len < min_elems {
        rows.max(1)
    } else {
        (min_elems / len.max(1)).clamp(1, rows.div_ceil(num_threads()))
    }
}

/// A raw pointer that may cross threads; callers guarantee the regions they touch are disjoint.
#[derive(Clone, Copy)]
pub struct SendPtr<T>(pub *mut T);

impl<T> SendPtr<T> {
    /// The pointer; a method so that closures capture the whole (Send) wrapper.
    pub fn ptr(self) -> *mut T {
        self.0
    }
}

// SAFETY: users only write disjoint index ranges from different threads.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

/// Held by tests that set the thread count, which is global to the test binary's threads.
#[cfg(test)]
pub static TEST_COUNT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_threads_is_rejected() {
        for pin in [true, false] {
            assert!(matches!(set_num_threads(0, pin), Err(FgError::Value(_))));
            let too_many = set_num_threads(MAX_THREADS + 1, pin);
            assert!(matches!(too_many, Err(FgError::Value(_))));
        }
    }

    #[test]
    fn contiguous_split_runs_every_part_once() {
        for parts in [0, 1, 2, 3, 7, 64, 1001] {
            let seen: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
            split_contiguous(parts, |p| {
                seen[p].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                seen.iter().all(|n| n.load(Ordering::Relaxed) == 1),
                "{parts} parts"
            );
        }
    }

    #[test]
    fn pinned_and_followed_counts() {
        let _count = TEST_COUNT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        set_num_threads(3, true).unwrap();
        assert_eq!(num_threads(), 3);
        assert_eq!(pool().current_num_threads(), 3);
        set_num_threads(1, true).unwrap();
        assert_eq!(num_threads(), 1);
        // No torch in the test binary: following torch falls back to the count given.
        assert!(crate::openmp::torch_threads().is_none());
        set_num_threads(2, false).unwrap();
        assert_eq!(num_threads(), 2);
        assert_eq!(pool().current_num_threads(), 2);
        // A kernel nested in a part takes its caller's count; the mark ends with the parts.
        let nested: Vec<AtomicUsize> = (0..4).map(|_| AtomicUsize::new(0)).collect();
        split(4, |p| nested[p].store(num_threads(), Ordering::Relaxed));
        assert!(nested.iter().all(|n| n.load(Ordering::Relaxed) == 2));
        assert!(!IN_PART.get());
    }
}
