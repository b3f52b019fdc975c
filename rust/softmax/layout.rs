//! The `[outer, n, inner]` view of a tensor and how a call is cut into parallel tasks: rows,
//! pieces of a long row, and lane blocks of strided slabs.

use std::ops::Range;

use crate::error::{FgError, FgResult};
use crate::threads::{self, Disjoint, SendPtr};

/// Below this many elements a call runs on the calling thread.
const PAR_MIN: usize = 1 << 15;
/// Smallest piece of a row given to one thread.
const CHUNK_MIN: usize = 1 << 17;
/// Outputs of at least this many bytes ask for transparent huge pages.
const HUGE_MIN: usize = 4 << 20;
const HUGE_PAGE: usize = 2 << 20;

/// The view of a tensor as `[outer, n, inner]`, softmax over `n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub outer: usize,
    pub n: usize,
    pub inner: usize,
}

impl Layout {
    pub(super) fn numel(&self, op: &str) -> FgResult<usize> {
        self.outer
            .checked_mul(self.n)
            .and_then(|v| v.checked_mul(self.inner))
            .ok_or_else(|| FgError::Value(format!("{op}: shape {self:?} overflows usize")))
    }

    pub(super) fn check(&self, op: &str, arrays: &[(&str, usize)]) -> FgResult<()> {
        let numel = self.numel(op)?;
        for (name, len) in arrays {
            if *len != numel {
                return Err(FgError::Value(format!(
                    "{op}: {name} has {len} elements but shape [{}, {}, {}] needs {numel}",
                    self.outer, self.n, self.inner
                )));
            }
        }
        Ok(())
    }
}

/// Asks Linux to back the whole 2 MiB pages inside `out` with transparent huge pages (it does
/// where THP is in `madvise` mode, the common default). A freshly allocated output is mapped
/// but not yet touched: its first writes then fault 2 MiB at a time instead of 4 KiB, which on
/// a VM took longer than the softmax itself (docs/softmax.md). Contents are unchanged; pages
/// already touched stay as they are; a refusal (file-backed memory) is ignored.
pub(super) fn advise_huge_pages<E>(out: &mut [E]) {
    #[cfg(target_os = "linux")]
    {
        const MADV_HUGEPAGE: i32 = 14;
        extern "C" {
            fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
        }
        let bytes = std::mem::size_of_val(out);
        if bytes < HUGE_MIN {
            return;
        }
        let start = out.as_mut_ptr() as usize;
        let (lo, hi) = (
            start.next_multiple_of(HUGE_PAGE),
            (start + bytes) / HUGE_PAGE * HUGE_PAGE,
        );
        if hi > lo {
            // SAFETY: [lo, hi) lies inside `out`, which is mapped; the advice changes no data.
            unsafe { madvise(lo as *mut std::ffi::c_void, hi - lo, MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = out;
}

/// Splits `len` into pieces for `threads` workers, at least `CHUNK_MIN` each, 64-aligned.
pub(super) fn chunks_of(len: usize, threads: usize) -> Vec<Range<usize>> {
    let pieces = (len / CHUNK_MIN).clamp(1, 4 * threads);
    let step = len.div_ceil(pieces).next_multiple_of(64);
    (0..len)
        .step_by(step)
        .map(|s| s..(s + step).min(len))
        .collect()
}

/// Runs `f` on every piece of a row, in parallel when there are several, and folds the results
/// in piece order.
pub(super) fn over_pieces<T: Copy + Send + Sync>(
    pieces: &[Range<usize>],
    f: impl Fn(Range<usize>) -> T + Sync,
    identity: T,
    fold: impl Fn(T, T) -> T + Sync + Send,
) -> T {
    if let [only] = pieces {
        return fold(identity, f(only.clone()));
    }
    let mut results = vec![identity; pieces.len()];
    let slots = Disjoint::new(&mut results);
    threads::split(pieces.len(), |i| {
        // SAFETY: part i alone writes slot i.
        let slot = unsafe { slots.piece(i..i + 1) };
        slot[0] = f(pieces[i].clone());
    });
    results.into_iter().fold(identity, fold)
}

/// Applies `rows_fn(a_rows, b_rows, out_rows, pieces)` to runs of whole rows of length `n`:
/// many rows to a call (`pieces` then spans one row) when rows are many or short, one row at a
/// time split into parallel `pieces` when there are few long rows.
pub(super) fn for_each_row<E: Send + Sync>(
    a: &[E],
    b: &[E],
    out: &mut [E],
    n: usize,
    rows_fn: impl Fn(&[E], &[E], &mut [E], &[Range<usize>]) + Sync,
) {
    let rows = a.len() / n;
    let threads = threads::num_threads();
    let row = 0..n;
    let whole = std::slice::from_ref(&row);
    if threads == 1 || rows * n < PAR_MIN || (rows == 1 && n < 2 * CHUNK_MIN) {
        rows_fn(a, b, out, whole)
    } else if rows >= threads || n < 2 * CHUNK_MIN {
        let out = Disjoint::new(out);
        threads::for_each_chunk(rows, threads::rows_per_task(rows, n, PAR_MIN), |_, r| {
            let span = r.start * n..r.end * n;
            // SAFETY: every row is written by one part only.
            let or = unsafe { out.piece(span.clone()) };
            rows_fn(&a[span.clone()], &b[span], or, whole)
        })
    } else {
        let pieces = chunks_of(n, threads);
        for ((ar, br), or) in a.chunks(n).zip(b.chunks(n)).zip(out.chunks_mut(n)) {
            rows_fn(ar, br, or, &pieces)
        }
    }
}

/// One task of the strided kernels: `lanes` adjacent softmaxes of one slab.
#[derive(Clone, Copy)]
pub struct ColumnJob<E> {
    pub(super) a: SendPtr<E>,
    pub(super) b: SendPtr<E>,
    pub(super) out: SendPtr<E>,
    pub(super) n: usize,
    pub(super) stride: usize,
    pub(super) lanes: usize,
    pub(super) log: bool,
}

/// Splits `[outer, n, inner]` into slab x lane-block tasks and runs `kernel` on each.
pub(super) fn run_columns<E: Copy + Send + Sync>(
    layout: Layout,
    a: &[E],
    b: &[E],
    out: &mut [E],
    log: bool,
    kernel: impl Fn(ColumnJob<E>) + Sync,
) {
    let Layout { outer, n, inner } = layout;
    let threads = threads::num_threads();
    let total = outer * n * inner;
    // Lane blocks narrow enough to give every thread work, wide enough for full vectors.
    let blocks_wanted = (4 * threads).div_ceil(outer).max(1);
    let width = inner
        .div_ceil(blocks_wanted)
        .next_multiple_of(16)
        .min(inner);
    let blocks = inner.div_ceil(width);
    let (pa, pb, po) = (
        SendPtr(a.as_ptr() as *mut E),
        SendPtr(b.as_ptr() as *mut E),
        SendPtr(out.as_mut_ptr()),
    );
    let task = |t: usize| {
        let (o, blk) = (t / blocks, t % blocks);
        let start = o * n * inner + blk * width;
        let lanes = width.min(inner - blk * width);
        // SAFETY: start + (n - 1) * inner + lanes <= total; tasks write disjoint lanes.
        kernel(unsafe {
            ColumnJob {
                a: SendPtr(pa.ptr().add(start)),
                b: SendPtr(pb.ptr().add(start)),
                out: SendPtr(po.ptr().add(start)),
                n,
                stride: inner,
                lanes,
                log,
            }
        })
    };
    if threads == 1 || total < PAR_MIN {
        (0..outer * blocks).for_each(task)
    } else {
        threads::split(outer * blocks, task)
    }
}
