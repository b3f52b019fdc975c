//! The forward kernels: the two-pass kernel for rows that leave the cache (pass 1 sums exp(x)
//! as (mantissa, exponent) pairs, pass 2 writes exp(x) / sum or x - log-sum-exp), the in-cache
//! kernel for short rows, and the strided kernel for softmaxes side by side.

use std::ops::Range;

use super::element::{Element, Lanes};
use super::layout::{for_each_row, over_pieces, run_columns, ColumnJob, Layout};
use super::special::exact_row;
use super::{map_row, Kernels, Pointwise, BLOCK_VECTORS, FOLD, X_FLOOR};
use crate::error::FgResult;
use crate::simd::{pow2, Scalar, Simd, SimdLevel};
use crate::threads::Disjoint;

/// Below this the f32 exponent accumulator starts; any real exponent is larger.
const EXP_INIT: f32 = -1.0e30;

/// A sum of exponentials held as `mant * 2^exp`; `exp` is the largest exponent seen, so
/// `exp * ln 2` is within 0.35 of the largest input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExpSum {
    pub mant: f64,
    pub exp: f64,
}

impl ExpSum {
    pub const EMPTY: ExpSum = ExpSum {
        mant: 0.0,
        exp: EXP_INIT as f64,
    };

    pub fn merge(self, other: ExpSum) -> ExpSum {
        let exp = self.exp.max(other.exp);
        ExpSum {
            mant: self.mant * pow2(self.exp - exp) + other.mant * pow2(other.exp - exp),
            exp,
        }
    }

    /// About the largest input of the row, as an f32 near it.
    pub(super) fn approx_max(&self) -> f32 {
        (self.exp * std::f64::consts::LN_2) as f32
    }

    /// The pass-2 parameters: (p, q) for [`SoftmaxOut`] or [`LogSoftmaxOut`].
    fn pass2_params(&self, log: bool) -> (f32, f32) {
        if log {
            // y = (x - r) - (lse - r): with r near the row max, x - r rounds as torch's x - max.
            let r = self.approx_max();
            let lse = self.exp * std::f64::consts::LN_2 + self.mant.ln();
            (r, (lse - r as f64) as f32)
        } else {
            ((1.0 / self.mant) as f32, self.exp as f32)
        }
    }
}

/// Per-lane running state of pass 1: `mant * 2^exp` with `exp` only ever growing.
#[derive(Clone, Copy)]
struct LaneSum<S: Simd> {
    mant: S::V,
    exp: S::V,
}

impl<S: Simd> LaneSum<S> {
    #[inline(always)]
    unsafe fn new() -> Self {
        LaneSum {
            mant: S::splat(0.0),
            exp: S::splat(EXP_INIT),
        }
    }

    #[inline(always)]
    unsafe fn push(&mut self, x: S::V) {
        let (m, n) = S::exp_split(S::max(S::splat(X_FLOOR), x));
        if S::CHEAP_SCALE {
            let exp = S::max(self.exp, n);
            let old = S::scale(self.mant, S::sub(self.exp, exp));
            self.mant = S::add(old, S::scale(m, S::sub(n, exp)));
            self.exp = exp;
            return;
        }
        // Rescaling is rare once the largest exponents are seen; a NaN n never rescales, and
        // its NaN m poisons mant.
        if S::any_gt(n, self.exp) {
            let exp = S::max(self.exp, n);
            self.mant = S::scale(self.mant, S::sub(self.exp, exp));
            self.exp = exp;
        }
        self.mant = S::add(self.mant, S::scale(m, S::sub(n, self.exp)));
    }

    #[inline(always)]
    unsafe fn combine(self, other: Self) -> Self {
        let exp = S::max(self.exp, other.exp);
        LaneSum {
            mant: S::add(
                S::scale(self.mant, S::sub(self.exp, exp)),
                S::scale(other.mant, S::sub(other.exp, exp)),
            ),
            exp,
        }
    }

    #[inline(always)]
    unsafe fn lanes(self) -> [ExpSum; 16] {
        let (mant, exp) = (S::to_array(self.mant), S::to_array(self.exp));
        std::array::from_fn(|l| ExpSum {
            mant: mant[l] as f64,
            exp: exp[l] as f64,
        })
    }

    #[inline(always)]
    unsafe fn reduce(self) -> ExpSum {
        self.lanes()[..S::LANES]
            .iter()
            .fold(ExpSum::EMPTY, |a, b| a.merge(*b))
    }
}

/// Vectors of pass 1 that each lane accumulator sums (32 terms, 4 accumulators) before they
/// are folded, still in f32 lanes, into the block's partial sum. Terms of one size (a constant
/// row) round the same way at every add, so the error grows linearly with the count: 256 terms
/// per accumulator reached 3.3e-6 relative, two levels of 32 and 8 stay below 6e-7. The
/// in-cache kernel folds its f32 sums into f64 after every run for the same reason.
pub(super) const RUN_VECTORS: usize = 128;

/// Pass 1 over a contiguous slice.
#[inline(always)]
pub(super) unsafe fn exp_sum_impl<S: Lanes, E: Element>(x: &[E]) -> ExpSum {
    let l = S::LANES;
    let mut total = ExpSum::EMPTY;
    for block in x.chunks(BLOCK_VECTORS * S::LANES) {
        let mut partial = LaneSum::<S>::new();
        for run in block.chunks(RUN_VECTORS * S::LANES) {
            let p = run.as_ptr();
            let (mut a0, mut a1, mut a2, mut a3) = (
                LaneSum::<S>::new(),
                LaneSum::<S>::new(),
                LaneSum::<S>::new(),
                LaneSum::<S>::new(),
            );
            let mut i = 0;
            while i + 4 * l <= run.len() {
                a0.push(E::load::<S>(p.add(i)));
                a1.push(E::load::<S>(p.add(i + l)));
                a2.push(E::load::<S>(p.add(i + 2 * l)));
                a3.push(E::load::<S>(p.add(i + 3 * l)));
                i += 4 * l;
            }
            while i + l <= run.len() {
                a0.push(E::load::<S>(p.add(i)));
                i += l;
            }
            if i < run.len() {
                // -inf lanes add exactly 0.
                a1.push(E::load_partial::<S>(
                    p.add(i),
                    run.len() - i,
                    f32::NEG_INFINITY,
                ));
            }
            partial = partial.combine(a0.combine(a1).combine(a2.combine(a3)));
        }
        total = total.merge(partial.reduce());
    }
    total
}

/// softmax pass 2: exp(x) / sum with p = 1 / mant, q = exp.
struct SoftmaxOut;
impl Pointwise for SoftmaxOut {
    #[inline(always)]
    unsafe fn apply<S: Simd>(x: S::V, _: S::V, inv: S::V, exp: S::V) -> S::V {
        let (m, n) = S::exp_split(S::max(S::splat(X_FLOOR), x));
        S::scale(S::mul(m, inv), S::sub(n, exp))
    }
}

/// log_softmax output: (x - max) - (lse - max), torch's rounding.
struct LogSoftmaxOut;
impl Pointwise for LogSoftmaxOut {
    #[inline(always)]
    unsafe fn apply<S: Simd>(x: S::V, _: S::V, max: S::V, rest: S::V) -> S::V {
        S::sub(S::sub(x, max), rest)
    }
}

/// The in-cache kernel's last pass: the stored exp(x) 2^-N times 1 / sum.
pub(super) struct Scaled;
impl Pointwise for Scaled {
    #[inline(always)]
    unsafe fn apply<S: Simd>(e: S::V, _: S::V, inv: S::V, _: S::V) -> S::V {
        S::mul(e, inv)
    }
}

/// Pass 2 over a contiguous piece of a row.
#[inline(always)]
pub(super) unsafe fn pass2_impl<S: Lanes, E: Element>(
    x: &[E],
    y: &mut [E],
    p: f32,
    q: f32,
    log: bool,
) {
    let (px, py) = (x.as_ptr(), y.as_mut_ptr());
    if log {
        map_row::<S, E, E, LogSoftmaxOut>(px, px, py, x.len(), p, q)
    } else {
        map_row::<S, E, E, SoftmaxOut>(px, px, py, x.len(), p, q)
    }
}

/// The largest entry of a row (NaN skipped: a NaN row is caught by its sum).
#[inline(always)]
pub(super) unsafe fn row_max_impl<S: Lanes, E: Element>(x: &[E]) -> f32 {
    let (l, p) = (S::LANES, x.as_ptr());
    let ninf = S::splat(f32::NEG_INFINITY);
    let (mut m0, mut m1) = (ninf, ninf);
    let mut i = 0;
    while i + 2 * l <= x.len() {
        m0 = S::max(E::load::<S>(p.add(i)), m0);
        m1 = S::max(E::load::<S>(p.add(i + l)), m1);
        i += 2 * l;
    }
    while i < x.len() {
        let rest = (x.len() - i).min(l);
        m0 = S::max(E::load_upto::<S>(p.add(i), rest, f32::NEG_INFINITY), m0);
        i += rest;
    }
    S::hmax(S::max(m0, m1))
}

/// A row's in-cache parameters: its maximum and N = round(max / ln 2), the exponent by which
/// the stored exp(x) terms are scaled down (2^-N).
#[derive(Clone, Copy)]
struct InCache {
    max: f32,
    nmax: f32,
}

impl InCache {
    fn new(max: f32) -> InCache {
        InCache {
            max,
            nmax: (max * std::f32::consts::LOG2_E).round(),
        }
    }

    /// Whether the fast path holds for the row's Σ exp(x) 2^-N (else `exact_row`).
    fn is_fast(&self, sum: f64) -> bool {
        let acc = ExpSum {
            mant: sum,
            exp: self.nmax as f64,
        };
        self.max.is_finite() && acc.is_fast()
    }

    /// (p, q) of [`LogSoftmaxOut`]: y = (x - max) - (log-sum-exp - max).
    fn log_params(&self, sum: f64) -> (f32, f32) {
        let lse = self.nmax as f64 * std::f64::consts::LN_2 + sum.ln();
        (self.max, (lse - self.max as f64) as f32)
    }
}

/// exp(x) 2^-nmax from x's own exponent split. A named always-inlined function, not a
/// closure: closures (and `array::map`) are not compiled with the caller's target features, so
/// their `Simd` calls stayed out-of-line calls (two thirds of an AVX2 in-cache softmax).
#[inline(always)]
unsafe fn scaled_exp<S: Simd>(x: S::V, nmax: S::V) -> S::V {
    let (m, n) = S::exp_split(S::max(S::splat(X_FLOOR), x));
    S::scale(m, S::sub(n, nmax))
}

/// `Σ exp(x) 2^-nmax` (`nmax` the row maximum's exponent), exp(x) 2^-nmax stored in `e` when
/// given: the exponent split works on x itself, so no rounding of x - max enters (as in the
/// two-pass kernel).
#[inline(always)]
pub(super) unsafe fn scaled_exp_sum_impl<S: Lanes, E: Element>(
    x: &[E],
    e: Option<&mut [f32]>,
    nmax: f32,
) -> f64 {
    let l = S::LANES;
    let (px, pe) = (x.as_ptr(), e.map(|e| e.as_mut_ptr()));
    let nv = S::splat(nmax);
    let mut total = 0.0f64;
    let mut i = 0;
    while i < x.len() {
        let end = (i + RUN_VECTORS * l).min(x.len());
        let zero = S::splat(0.0);
        let (mut s0, mut s1, mut s2, mut s3) = (zero, zero, zero, zero);
        while i + 4 * l <= end {
            let t0 = scaled_exp::<S>(E::load::<S>(px.add(i)), nv);
            let t1 = scaled_exp::<S>(E::load::<S>(px.add(i + l)), nv);
            let t2 = scaled_exp::<S>(E::load::<S>(px.add(i + 2 * l)), nv);
            let t3 = scaled_exp::<S>(E::load::<S>(px.add(i + 3 * l)), nv);
            if let Some(pe) = pe {
                S::store(pe.add(i), t0);
                S::store(pe.add(i + l), t1);
                S::store(pe.add(i + 2 * l), t2);
                S::store(pe.add(i + 3 * l), t3);
            }
            (s0, s1, s2, s3) = (
                S::add(s0, t0),
                S::add(s1, t1),
                S::add(s2, t2),
                S::add(s3, t3),
            );
            i += 4 * l;
        }
        while i < end {
            let rest = (end - i).min(l);
            let t = scaled_exp::<S>(E::load_upto::<S>(px.add(i), rest, f32::NEG_INFINITY), nv);
            if let Some(pe) = pe {
                f32::store_upto::<S>(pe.add(i), t, rest);
            }
            s0 = S::add(s0, t);
            i += rest;
        }
        total += S::hsum(S::add(S::add(s0, s1), S::add(s2, s3))) as f64;
    }
    total
}

/// The in-cache kernel over whole rows of length `n` (each read once from memory): the row
/// maximum, then exp(x) 2^-N stored in an f32 scratch row and summed, then the scaled output
/// (log-softmax: x - max - log-sum-exp, no scratch). Rows the fast path cannot take exactly
/// go through `exact_row`.
#[inline(always)]
pub(super) unsafe fn rows_forward_impl<S: Lanes, E: Element>(
    x: &[E],
    y: &mut [E],
    n: usize,
    log: bool,
) {
    // float32 rows keep exp(x) 2^-N in y itself.
    if log || E::IS_F32 {
        return rows_forward_into::<S, E>(x, y, n, log, &mut []);
    }
    let mut scratch = crate::memory::take(&SCRATCH, n);
    rows_forward_into::<S, E>(x, y, n, log, &mut scratch);
    crate::memory::keep(&SCRATCH, scratch);
}

thread_local! {
    /// The 16-bit in-cache kernel's float32 row of exp(x) 2^-N, kept per thread between calls
    /// (`memory::take` / `keep`): allocated per call (up to 512 KiB) under jemalloc, bfloat16 [2048,
    /// 32768] at 2 threads faulted 68-100k pages a call against the output's 33k and took
    /// 106-134 ms against torch's 36-59; 32 ms now.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`rows_forward_impl`] with its scratch row (`n` floats; empty where y itself holds them).
#[inline(always)]
unsafe fn rows_forward_into<S: Lanes, E: Element>(
    x: &[E],
    y: &mut [E],
    n: usize,
    log: bool,
    scratch: &mut [f32],
) {
    for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
        let row = InCache::new(row_max_impl::<S, E>(xr));
        let yp = yr.as_mut_ptr();
        let ep: *mut f32 = if E::IS_F32 {
            yp.cast()
        } else {
            scratch.as_mut_ptr()
        };
        // SAFETY: ep is n f32 (y's own row or the scratch row); nothing else reads it here.
        let e = (!log).then(|| std::slice::from_raw_parts_mut(ep, n));
        let sum = scaled_exp_sum_impl::<S, E>(xr, e, row.nmax);
        if !row.is_fast(sum) {
            exact_row(n, 1, xr.as_ptr(), yp, log);
            continue;
        }
        if log {
            let (p, q) = row.log_params(sum);
            map_row::<S, E, E, LogSoftmaxOut>(xr.as_ptr(), xr.as_ptr(), yp, n, p, q)
        } else {
            let inv = (1.0 / sum) as f32;
            map_row::<S, f32, E, Scaled>(ep, ep, yp, n, inv, 0.0)
        }
    }
}

/// `y *= inv` (the in-cache kernel's last pass over a float32 row held in y).
#[inline(always)]
pub(super) unsafe fn scale_in_place_impl<S: Lanes>(y: &mut [f32], inv: f32) {
    let p = y.as_mut_ptr();
    map_row::<S, f32, f32, Scaled>(p, p, p, y.len(), inv, 0.0)
}

crate::dispatch! {
    pub(super) fn scale_in_place(y: &mut [f32], inv: f32) = scale_in_place_impl;
}

/// The in-cache kernel's passes over one row split into `pieces` across threads, with AVX2 or
/// scalar code, where computing exp twice costs more than a third pass over memory (Zen 3,
/// rows of 10^7-10^8, 2 threads: float32 softmax 1.29-1.43x as fast as two-pass, at 0.81-0.87
/// of copy bandwidth; log-softmax 1.23-1.49x; docs/softmax.md): the maximum, then exp(x) 2^-N
/// summed (and written to y for float32 softmax), then y scaled in place or x - log-sum-exp
/// written. 16-bit softmax, which has no float32 row to keep the terms in, recomputes exp(x)
/// 2^-N in the last pass (two exps, as two-pass, but a plain sum in the middle pass in place
/// of two-pass's running rescale: bfloat16 rows 1.2-1.27x as fast on Zen 3, docs/softmax.md).
fn forward_row_exp_once<E: Kernels>(
    level: SimdLevel,
    x: &[E],
    y: &mut [E],
    pieces: &[Range<usize>],
    log: bool,
) {
    let row = InCache::new(over_pieces(
        pieces,
        |r| E::row_max(level, &x[r]),
        f32::NEG_INFINITY,
        f32::max,
    ));
    let ys = Disjoint::new(&mut *y);
    let sum = over_pieces(
        pieces,
        |r| {
            // SAFETY: the pieces are disjoint ranges of this row, of float32 elements here.
            let e = (!log && E::IS_F32).then(|| unsafe { as_f32(ys.piece(r.clone())) });
            E::scaled_exp_sum(level, &x[r], e, row.nmax)
        },
        0.0,
        |a, b| a + b,
    );
    if !row.is_fast(sum) {
        // SAFETY: x and y are whole rows of the same length.
        unsafe { exact_row(x.len(), 1, x.as_ptr(), y.as_mut_ptr(), log) };
        return;
    }
    let (p, q) = row.log_params(sum);
    let inv = (1.0 / sum) as f32;
    let ys = Disjoint::new(y);
    over_pieces(
        pieces,
        |r| {
            // SAFETY: as above.
            let yp = unsafe { ys.piece(r.clone()) };
            if log {
                E::pass2(level, &x[r], yp, p, q, true)
            } else if E::IS_F32 {
                // SAFETY: as above.
                scale_in_place(level, unsafe { as_f32(yp) }, inv)
            } else {
                // exp(x) 2^-N / sum: pass 2's softmax output with the in-cache sum's scale.
                E::pass2(level, &x[r], yp, inv, row.nmax, false)
            }
        },
        (),
        |_, _| (),
    )
}

/// A float32 row seen as `[f32]`.
///
/// # Safety
/// `E` is f32 (`E::IS_F32`).
unsafe fn as_f32<E: Element>(y: &mut [E]) -> &mut [f32] {
    debug_assert!(E::IS_F32);
    std::slice::from_raw_parts_mut(y.as_mut_ptr().cast::<f32>(), y.len())
}

/// Softmax (or log-softmax) of one contiguous row split into `pieces`: two-pass with AVX-512,
/// else `forward_row_exp_once`.
fn forward_row<E: Kernels>(
    level: SimdLevel,
    x: &[E],
    y: &mut [E],
    pieces: &[Range<usize>],
    log: bool,
) {
    if level != SimdLevel::Avx512 {
        return forward_row_exp_once(level, x, y, pieces, log);
    }
    let acc = over_pieces(
        pieces,
        |r| E::exp_sum(level, &x[r]),
        ExpSum::EMPTY,
        ExpSum::merge,
    );
    if !acc.is_fast() {
        // SAFETY: x and y are whole rows of the same length.
        unsafe { exact_row(x.len(), 1, x.as_ptr(), y.as_mut_ptr(), log) };
        return;
    }
    let (p, q) = acc.pass2_params(log);
    let out = Disjoint::new(y);
    over_pieces(
        pieces,
        |r| {
            // SAFETY: the pieces are disjoint ranges of this row.
            let yp = unsafe { out.piece(r.clone()) };
            E::pass2(level, &x[r], yp, p, q, log)
        },
        (),
        |_, _| (),
    )
}

/// Lanes `[0, lanes)` of one `[n, stride]` slab, `S::LANES` at a time, then one at a time.
///
/// # Safety
/// `job` comes from `run_columns` (bounds and disjointness checked there).
#[inline(always)]
pub(super) unsafe fn columns_forward_impl<S: Lanes, E: Element>(job: ColumnJob<E>) {
    let (x, out) = (job.a, job.out);
    let mut j = 0;
    while j + S::LANES <= job.lanes {
        column_block_forward::<S, E>(x.0.add(j), out.ptr().add(j), job.n, job.stride, job.log);
        j += S::LANES;
    }
    while j < job.lanes {
        column_block_forward::<Scalar, E>(x.0.add(j), out.ptr().add(j), job.n, job.stride, job.log);
        j += 1;
    }
}

#[inline(always)]
unsafe fn column_block_forward<S: Lanes, E: Element>(
    x: *const E,
    y: *mut E,
    n: usize,
    stride: usize,
    log: bool,
) {
    let mut acc = [ExpSum::EMPTY; 16];
    let mut k = 0;
    while k < n {
        let end = (k + FOLD).min(n);
        let (mut a0, mut a1) = (LaneSum::<S>::new(), LaneSum::<S>::new());
        while k + 2 <= end {
            a0.push(E::load::<S>(x.add(k * stride)));
            a1.push(E::load::<S>(x.add((k + 1) * stride)));
            k += 2;
        }
        if k < end {
            a0.push(E::load::<S>(x.add(k * stride)));
            k += 1;
        }
        for (total, part) in acc.iter_mut().zip(a0.combine(a1).lanes()) {
            *total = total.merge(part);
        }
    }
    let (mut p, mut q) = ([0.0f32; 16], [0.0f32; 16]);
    for l in 0..S::LANES {
        (p[l], q[l]) = acc[l].pass2_params(log);
    }
    let (pv, qv) = (S::load(p.as_ptr()), S::load(q.as_ptr()));
    for k in 0..n {
        let xv = E::load::<S>(x.add(k * stride));
        let v = if log {
            LogSoftmaxOut::apply::<S>(xv, xv, pv, qv)
        } else {
            SoftmaxOut::apply::<S>(xv, xv, pv, qv)
        };
        E::store::<S>(y.add(k * stride), v);
    }
    for (l, a) in acc[..S::LANES].iter().enumerate() {
        if !a.is_fast() {
            exact_row(n, stride, x.add(l), y.add(l), log);
        }
    }
}

/// Softmax (or log-softmax, `log`) of `x` viewed as `layout`, written to `y`.
pub fn softmax_forward<E: Kernels>(
    level: SimdLevel,
    x: &[E],
    y: &mut [E],
    layout: Layout,
    log: bool,
) -> FgResult<()> {
    let op = if log { "log_softmax" } else { "softmax" };
    layout.check(op, &[("x", x.len()), ("out", y.len())])?;
    if x.is_empty() {
        return Ok(());
    }
    let n = layout.n;
    if layout.inner == 1 {
        for_each_row(x, x, y, n, |xr, _, yr, pieces| {
            if n <= E::short_row(level, !log) {
                E::rows_forward(level, xr, yr, n, log)
            } else {
                for (xr, yr) in xr.chunks_exact(n).zip(yr.chunks_exact_mut(n)) {
                    forward_row(level, xr, yr, pieces, log)
                }
            }
        });
    } else {
        run_columns(layout, x, x, y, log, |job| E::columns_forward(level, job));
    }
    Ok(())
}
