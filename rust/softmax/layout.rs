//! The `[outer, n, inner]` view of a tensor and how a call is cut into parallel tasks: rows,
//! pieces of a long row, and lane blocks of strided slabs.

use std::ops::Range;

use crate::error::{FgError, FgResult};
use crate::threads::{self, Disjoint, SendPtr};

/// Below this many elements a call runs on the calling thread.
const PAR_MIN: usize = 1 << 15;
/// Smallest piece of a row given to one thread.
const CHUNK_MIN: usize = 1 << 17;
/// Rows from this length on are split across threads when there are fewer rows than threads.
pub(super) const SPLIT_ROW: usize = 2 * CHUNK_MIN;

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
    if threads == 1 || rows * n < PAR_MIN || (rows == 1 && n < SPLIT_ROW) {
        rows_fn(a, b, out, whole)
    } else if rows >= threads || n < SPLIT_ROW {
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
