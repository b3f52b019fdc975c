//! Softmax and log-softmax on f32, forward and backward.
//!
//! The forward pass is the two-pass algorithm of Dukhan & Ablavatski: pass 1 reads x once and
//! accumulates exp(x) as a (mantissa, exponent) pair, rescaling by powers of two whenever the
//! exponent grows, so no separate max pass is needed; pass 2 recomputes exp(x) and scales it.
//! That is two reads and one write per element, against three reads and one or two writes for
//! the classic max / sum / normalize scheme, which is kept here ([`softmax_three_pass`]) so the
//! benchmark can measure the difference.
//!
//! A tensor is seen as `[outer, n, inner]` with the softmax over `n`. With `inner == 1` each row
//! is contiguous and is vectorized along its length (a long row is split across threads and the
//! partial sums merged); otherwise `inner` independent softmaxes are vectorized side by side.
//!
//! Rows the fast path cannot take exactly (NaN or +inf present, every entry -inf, or a row
//! maximum beyond about 2^21 in magnitude) go through [`exact_row`], which follows torch's
//! max-subtracting formula in f64 and so its special-value semantics.

use std::ops::Range;

use rayon::prelude::*;

use crate::dispatch;
use crate::error::{FgError, FgResult};
use crate::simd::{pow2, Scalar, Simd, SimdLevel};
use crate::threads::{self, SendPtr};

/// Inputs are clamped here from below before the exponent split (-inf then contributes 0).
const X_FLOOR: f32 = -2_097_152.0;
/// A row whose maximum lies in this range is computed exactly by the fast path: every entry's
/// exponent is an exact integer and clamped entries are far below the maximum.
const FAST_MAX_LO: f32 = X_FLOOR + 256.0;
const FAST_MAX_HI: f32 = 2_097_152.0;
/// Below this the f32 exponent accumulator starts; any real exponent is larger.
const EXP_INIT: f32 = -1.0e30;
/// Vectors summed in f32 lanes before folding into f64: each lane accumulator then adds at most
/// a few hundred terms on every path, which bounds rounding growth.
const BLOCK_VECTORS: usize = 1024;
/// Steps along a strided dimension between f64 folds.
const FOLD: usize = 256;
/// Below this many elements a call runs on the calling thread.
const PAR_MIN: usize = 1 << 15;
/// Smallest piece of a row given to one thread.
const CHUNK_MIN: usize = 1 << 17;

/// The view of a tensor as `[outer, n, inner]`, softmax over `n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub outer: usize,
    pub n: usize,
    pub inner: usize,
}

impl Layout {
    fn numel(&self, op: &str) -> FgResult<usize> {
        self.outer
            .checked_mul(self.n)
            .and_then(|v| v.checked_mul(self.inner))
            .ok_or_else(|| FgError::Value(format!("{op}: shape {self:?} overflows usize")))
    }

    fn check(&self, op: &str, arrays: &[(&str, usize)]) -> FgResult<()> {
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

/// Which three-pass variant to run (both are baselines for the benchmark).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreePass {
    /// max; exp(x - max) stored and summed; the stored values rescaled (3 reads, 2 writes).
    Reload,
    /// max; sum of exp(x - max); exp recomputed and scaled (3 reads, 1 write).
    Recompute,
}

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
    fn approx_max(&self) -> f32 {
        (self.exp * std::f64::consts::LN_2) as f32
    }

    /// Whether the fast path's result is exact for this row (see the module docs). NaN and
    /// +inf poison `mant`; a row of -inf (clamped to `X_FLOOR`) has a tiny `exp`.
    pub fn is_fast(&self) -> bool {
        let max = self.approx_max();
        self.mant.is_finite() && (FAST_MAX_LO..=FAST_MAX_HI).contains(&max)
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

/// Pass 1 over a contiguous slice.
#[inline(always)]
unsafe fn exp_sum_impl<S: Simd>(x: &[f32]) -> ExpSum {
    let l = S::LANES;
    let mut total = ExpSum::EMPTY;
    for block in x.chunks(BLOCK_VECTORS * S::LANES) {
        let p = block.as_ptr();
        let (mut a0, mut a1, mut a2, mut a3) = (
            LaneSum::<S>::new(),
            LaneSum::<S>::new(),
            LaneSum::<S>::new(),
            LaneSum::<S>::new(),
        );
        let mut i = 0;
        while i + 4 * l <= block.len() {
            a0.push(S::load(p.add(i)));
            a1.push(S::load(p.add(i + l)));
            a2.push(S::load(p.add(i + 2 * l)));
            a3.push(S::load(p.add(i + 3 * l)));
            i += 4 * l;
        }
        while i + l <= block.len() {
            a0.push(S::load(p.add(i)));
            i += l;
        }
        if i < block.len() {
            // -inf lanes add exactly 0.
            a1.push(S::load_partial(
                p.add(i),
                block.len() - i,
                f32::NEG_INFINITY,
            ));
        }
        total = total.merge(a0.combine(a1).combine(a2.combine(a3)).reduce());
    }
    total
}

/// An elementwise map `out = f(a, b)` with two per-lane parameters `p`, `q`.
trait Pointwise {
    unsafe fn apply<S: Simd>(a: S::V, b: S::V, p: S::V, q: S::V) -> S::V;
}

#[inline(always)]
pub(crate) unsafe fn exp_floored<S: Simd>(x: S::V) -> S::V {
    S::exp(S::max(S::splat(X_FLOOR), x))
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

/// log_softmax pass 2: (x - max) - (lse - max), torch's rounding.
struct LogSoftmaxOut;
impl Pointwise for LogSoftmaxOut {
    #[inline(always)]
    unsafe fn apply<S: Simd>(x: S::V, _: S::V, max: S::V, rest: S::V) -> S::V {
        S::sub(S::sub(x, max), rest)
    }
}

/// softmax backward: y * (dy - sum(y * dy)).
struct SoftmaxGrad;
impl Pointwise for SoftmaxGrad {
    #[inline(always)]
    unsafe fn apply<S: Simd>(y: S::V, dy: S::V, dot: S::V, _: S::V) -> S::V {
        S::mul(y, S::sub(dy, dot))
    }
}

/// log_softmax backward: dy - exp(y) * sum(dy).
struct LogSoftmaxGrad;
impl Pointwise for LogSoftmaxGrad {
    #[inline(always)]
    unsafe fn apply<S: Simd>(y: S::V, dy: S::V, sum: S::V, _: S::V) -> S::V {
        S::sub(dy, S::mul(exp_floored::<S>(y), sum))
    }
}

/// Three-pass (reload) pass 3: the stored exponentials times 1 / sum.
struct Scaled;
impl Pointwise for Scaled {
    #[inline(always)]
    unsafe fn apply<S: Simd>(e: S::V, _: S::V, inv: S::V, _: S::V) -> S::V {
        S::mul(e, inv)
    }
}

/// Three-pass (recompute) pass 3: exp(x - max) / sum.
struct ExpShiftedScaled;
impl Pointwise for ExpShiftedScaled {
    #[inline(always)]
    unsafe fn apply<S: Simd>(x: S::V, _: S::V, max: S::V, inv: S::V) -> S::V {
        S::mul(exp_floored::<S>(S::sub(x, max)), inv)
    }
}

/// `out[i] = O(a[i], b[i])` over `len` contiguous elements; `out` may alias `a` or `b`.
#[inline(always)]
unsafe fn map_row<S: Simd, O: Pointwise>(
    a: *const f32,
    b: *const f32,
    out: *mut f32,
    len: usize,
    p: f32,
    q: f32,
) {
    let (pv, qv) = (S::splat(p), S::splat(q));
    let mut i = 0;
    while i + S::LANES <= len {
        let v = O::apply::<S>(S::load(a.add(i)), S::load(b.add(i)), pv, qv);
        S::store(out.add(i), v);
        i += S::LANES;
    }
    if i < len {
        let rest = len - i;
        let (va, vb) = (
            S::load_partial(a.add(i), rest, 0.0),
            S::load_partial(b.add(i), rest, 0.0),
        );
        S::store_partial(out.add(i), O::apply::<S>(va, vb, pv, qv), rest);
    }
}

/// `Σ a[i] * b[i]` (`PAIR`) or `Σ a[i]`, with f32 lanes folded into f64 per block.
#[inline(always)]
unsafe fn reduce_impl<S: Simd, const PAIR: bool>(a: &[f32], b: &[f32]) -> f64 {
    let l = S::LANES;
    let mut total = 0.0f64;
    let block = BLOCK_VECTORS * S::LANES;
    for start in (0..a.len()).step_by(block) {
        let end = (start + block).min(a.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut s0, mut s1) = (S::splat(0.0), S::splat(0.0));
        let mut i = start;
        while i + 2 * l <= end {
            if PAIR {
                s0 = S::mul_add(S::load(pa.add(i)), S::load(pb.add(i)), s0);
                s1 = S::mul_add(S::load(pa.add(i + l)), S::load(pb.add(i + l)), s1);
            } else {
                s0 = S::add(s0, S::load(pa.add(i)));
                s1 = S::add(s1, S::load(pa.add(i + l)));
            }
            i += 2 * l;
        }
        let lanes = S::to_array(S::add(s0, s1));
        total += lanes[..l].iter().map(|&v| v as f64).sum::<f64>();
        for j in i..end {
            total += a[j] as f64 * if PAIR { b[j] as f64 } else { 1.0 };
        }
    }
    total
}

/// The row maximum ignoring NaN (three-pass pass 1; NaN rows are caught by the sum).
#[inline(always)]
unsafe fn max_impl<S: Simd>(x: &[f32]) -> f32 {
    let p = x.as_ptr();
    let mut m = S::splat(f32::NEG_INFINITY);
    let mut i = 0;
    while i + S::LANES <= x.len() {
        m = S::max(S::load(p.add(i)), m);
        i += S::LANES;
    }
    let lanes = S::to_array(m);
    lanes[..S::LANES]
        .iter()
        .chain(&x[i..])
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// Three-pass (reload) pass 2: y = exp(x - max), returning Σ y.
#[inline(always)]
unsafe fn exp_store_sum_impl<S: Simd>(x: &[f32], y: &mut [f32], max: f32) -> f64 {
    let (px, py) = (x.as_ptr(), y.as_mut_ptr());
    let mv = S::splat(max);
    let mut total = 0.0f64;
    let block = BLOCK_VECTORS * S::LANES;
    for start in (0..x.len()).step_by(block) {
        let end = (start + block).min(x.len());
        let mut s = S::splat(0.0);
        let mut i = start;
        while i + S::LANES <= end {
            let e = exp_floored::<S>(S::sub(S::load(px.add(i)), mv));
            S::store(py.add(i), e);
            s = S::add(s, e);
            i += S::LANES;
        }
        total += S::to_array(s)[..S::LANES]
            .iter()
            .map(|&v| v as f64)
            .sum::<f64>();
        for j in i..end {
            let e = exp_floored::<Scalar>(*px.add(j) - max);
            *py.add(j) = e;
            total += e as f64;
        }
    }
    total
}

/// Three-pass (recompute) pass 2: Σ exp(x - max).
#[inline(always)]
unsafe fn exp_shifted_sum_impl<S: Simd>(x: &[f32], max: f32) -> f64 {
    let px = x.as_ptr();
    let mv = S::splat(max);
    let mut total = 0.0f64;
    let block = BLOCK_VECTORS * S::LANES;
    for start in (0..x.len()).step_by(block) {
        let end = (start + block).min(x.len());
        let (mut s0, mut s1) = (S::splat(0.0), S::splat(0.0));
        let mut i = start;
        while i + 2 * S::LANES <= end {
            s0 = S::add(s0, exp_floored::<S>(S::sub(S::load(px.add(i)), mv)));
            s1 = S::add(
                s1,
                exp_floored::<S>(S::sub(S::load(px.add(i + S::LANES)), mv)),
            );
            i += 2 * S::LANES;
        }
        let s = S::to_array(S::add(s0, s1));
        total += s[..S::LANES].iter().map(|&v| v as f64).sum::<f64>();
        for j in i..end {
            total += exp_floored::<Scalar>(*px.add(j) - max) as f64;
        }
    }
    total
}

#[inline(always)]
unsafe fn softmax_out_impl<S: Simd>(x: &[f32], y: &mut [f32], p: f32, q: f32) {
    map_row::<S, SoftmaxOut>(x.as_ptr(), x.as_ptr(), y.as_mut_ptr(), x.len(), p, q)
}
#[inline(always)]
unsafe fn log_softmax_out_impl<S: Simd>(x: &[f32], y: &mut [f32], p: f32, q: f32) {
    map_row::<S, LogSoftmaxOut>(x.as_ptr(), x.as_ptr(), y.as_mut_ptr(), x.len(), p, q)
}
#[inline(always)]
unsafe fn softmax_grad_impl<S: Simd>(y: &[f32], dy: &[f32], dx: &mut [f32], dot: f32) {
    map_row::<S, SoftmaxGrad>(y.as_ptr(), dy.as_ptr(), dx.as_mut_ptr(), y.len(), dot, 0.0)
}
#[inline(always)]
unsafe fn log_softmax_grad_impl<S: Simd>(y: &[f32], dy: &[f32], dx: &mut [f32], sum: f32) {
    map_row::<S, LogSoftmaxGrad>(y.as_ptr(), dy.as_ptr(), dx.as_mut_ptr(), y.len(), sum, 0.0)
}
#[inline(always)]
unsafe fn scale_in_place_impl<S: Simd>(y: &mut [f32], inv: f32) {
    let p = y.as_mut_ptr();
    map_row::<S, Scaled>(p, p, p, y.len(), inv, 0.0)
}
#[inline(always)]
unsafe fn exp_shifted_scaled_impl<S: Simd>(x: &[f32], y: &mut [f32], max: f32, inv: f32) {
    map_row::<S, ExpShiftedScaled>(x.as_ptr(), x.as_ptr(), y.as_mut_ptr(), x.len(), max, inv)
}
#[inline(always)]
unsafe fn sum_impl<S: Simd>(a: &[f32]) -> f64 {
    reduce_impl::<S, false>(a, a)
}
#[inline(always)]
unsafe fn dot_impl<S: Simd>(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    reduce_impl::<S, true>(a, b)
}

dispatch! {
    /// Pass 1 of the two-pass softmax over a contiguous piece of a row.
    pub fn exp_sum(x: &[f32]) -> ExpSum = exp_sum_impl;
    fn softmax_out(x: &[f32], y: &mut [f32], p: f32, q: f32) = softmax_out_impl;
    fn log_softmax_out(x: &[f32], y: &mut [f32], p: f32, q: f32) = log_softmax_out_impl;
    fn softmax_grad(y: &[f32], dy: &[f32], dx: &mut [f32], dot: f32) = softmax_grad_impl;
    fn log_softmax_grad(y: &[f32], dy: &[f32], dx: &mut [f32], sum: f32) = log_softmax_grad_impl;
    pub(crate) fn sum(a: &[f32]) -> f64 = sum_impl;
    fn dot(a: &[f32], b: &[f32]) -> f64 = dot_impl;
    pub(crate) fn row_max(x: &[f32]) -> f32 = max_impl;
    fn exp_store_sum(x: &[f32], y: &mut [f32], max: f32) -> f64 = exp_store_sum_impl;
    pub(crate) fn exp_shifted_sum(x: &[f32], max: f32) -> f64 = exp_shifted_sum_impl;
    fn scale_in_place(y: &mut [f32], inv: f32) = scale_in_place_impl;
    fn exp_shifted_scaled(x: &[f32], y: &mut [f32], max: f32, inv: f32) = exp_shifted_scaled_impl;
}

/// torch's formula in f64 over a (possibly strided) row: exact special-value semantics.
///
/// # Safety
/// `x` and `y` are valid for indices `k * stride`, `k < n`, and no other thread touches them.
unsafe fn exact_row(n: usize, stride: usize, x: *const f32, y: *mut f32, log: bool) {
    let at = |k: usize| *x.add(k * stride);
    let max = (0..n).map(at).fold(f32::NEG_INFINITY, |m, v| {
        if m.is_nan() || v.is_nan() {
            f32::NAN
        } else {
            m.max(v)
        }
    });
    let sum: f64 = (0..n).map(|k| ((at(k) - max) as f64).exp()).sum();
    let log_sum = sum.ln();
    for k in 0..n {
        let shifted = (at(k) - max) as f64;
        let v = if log {
            shifted - log_sum
        } else {
            shifted.exp() / sum
        };
        *y.add(k * stride) = v as f32;
    }
}

/// Splits `len` into pieces for `threads` workers, at least `CHUNK_MIN` each, 64-aligned.
fn chunks_of(len: usize, threads: usize) -> Vec<Range<usize>> {
    let pieces = (len / CHUNK_MIN).clamp(1, 4 * threads);
    let step = len.div_ceil(pieces).next_multiple_of(64);
    (0..len)
        .step_by(step)
        .map(|s| s..(s + step).min(len))
        .collect()
}

/// Runs `f` on every piece of a row, in parallel when there are several, and folds the results.
fn over_pieces<T: Copy + Send + Sync>(
    pieces: &[Range<usize>],
    f: impl Fn(Range<usize>) -> T + Sync,
    identity: T,
    fold: impl Fn(T, T) -> T + Sync + Send,
) -> T {
    if let [only] = pieces {
        return fold(identity, f(only.clone()));
    }
    threads::install(|| {
        pieces
            .par_iter()
            .map(|r| f(r.clone()))
            .reduce(|| identity, &fold)
    })
}

/// The sub-slice `r` of a row that several pieces write at once.
///
/// # Safety
/// `row` is valid for `r.end` elements and no two live slices from it overlap.
unsafe fn piece_mut<'a>(row: SendPtr<f32>, r: &Range<usize>) -> &'a mut [f32] {
    std::slice::from_raw_parts_mut(row.ptr().add(r.start), r.len())
}

/// Two-pass softmax (or log-softmax) of one contiguous row split into `pieces`.
fn forward_row(level: SimdLevel, x: &[f32], y: &mut [f32], pieces: &[Range<usize>], log: bool) {
    let acc = over_pieces(
        pieces,
        |r| exp_sum(level, &x[r]),
        ExpSum::EMPTY,
        ExpSum::merge,
    );
    if !acc.is_fast() {
        // SAFETY: x and y are whole rows of the same length.
        unsafe { exact_row(x.len(), 1, x.as_ptr(), y.as_mut_ptr(), log) };
        return;
    }
    let (p, q) = acc.pass2_params(log);
    let out = SendPtr(y.as_mut_ptr());
    over_pieces(
        pieces,
        |r| {
            // SAFETY: the pieces are disjoint ranges of this row.
            let yp = unsafe { piece_mut(out, &r) };
            if log {
                log_softmax_out(level, &x[r], yp, p, q)
            } else {
                softmax_out(level, &x[r], yp, p, q)
            }
        },
        (),
        |_, _| (),
    )
}

/// Backward of one contiguous row split into `pieces`.
fn backward_row(
    level: SimdLevel,
    y: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    pieces: &[Range<usize>],
    log: bool,
) {
    let reduce = |r: Range<usize>| {
        if log {
            sum(level, &dy[r])
        } else {
            dot(level, &y[r.clone()], &dy[r])
        }
    };
    let red = over_pieces(pieces, reduce, 0.0, |a, b| a + b) as f32;
    let out = SendPtr(dx.as_mut_ptr());
    over_pieces(
        pieces,
        |r| {
            // SAFETY: the pieces are disjoint ranges of this row.
            let dxp = unsafe { piece_mut(out, &r) };
            if log {
                log_softmax_grad(level, &y[r.clone()], &dy[r], dxp, red)
            } else {
                softmax_grad(level, &y[r.clone()], &dy[r], dxp, red)
            }
        },
        (),
        |_, _| (),
    )
}

/// Applies `row_fn(input_row, second_row, output_row, pieces)` to every row of length `n`:
/// rows in parallel when there are many, pieces of each row in parallel when there are few.
fn for_each_row(
    a: &[f32],
    b: &[f32],
    out: &mut [f32],
    n: usize,
    row_fn: impl Fn(&[f32], &[f32], &mut [f32], &[Range<usize>]) + Sync,
) {
    let rows = a.len() / n;
    let threads = threads::num_threads();
    let row = 0..n;
    let whole = std::slice::from_ref(&row);
    if threads == 1 || rows * n < PAR_MIN || (rows == 1 && n < 2 * CHUNK_MIN) {
        for ((ar, br), or) in a.chunks(n).zip(b.chunks(n)).zip(out.chunks_mut(n)) {
            row_fn(ar, br, or, whole)
        }
    } else if rows >= threads || n < 2 * CHUNK_MIN {
        threads::install(|| {
            a.par_chunks(n)
                .zip(b.par_chunks(n))
                .zip(out.par_chunks_mut(n))
                .with_min_len((PAR_MIN / n).max(1))
                .for_each(|((ar, br), or)| row_fn(ar, br, or, whole))
        })
    } else {
        let pieces = chunks_of(n, threads);
        for ((ar, br), or) in a.chunks(n).zip(b.chunks(n)).zip(out.chunks_mut(n)) {
            row_fn(ar, br, or, &pieces)
        }
    }
}

/// Lanes `[0, lanes)` of one `[n, stride]` slab, `S::LANES` at a time, then one at a time.
///
/// # Safety
/// `x` and `out` are valid for `(n - 1) * stride + lanes` elements and no other thread touches
/// the lanes written here.
#[inline(always)]
unsafe fn columns_forward_impl<S: Simd>(
    x: SendPtr<f32>,
    out: SendPtr<f32>,
    n: usize,
    stride: usize,
    lanes: usize,
    log: bool,
) {
    let mut j = 0;
    while j + S::LANES <= lanes {
        column_block_forward::<S>(x.0.add(j), out.ptr().add(j), n, stride, log);
        j += S::LANES;
    }
    while j < lanes {
        column_block_forward::<Scalar>(x.0.add(j), out.ptr().add(j), n, stride, log);
        j += 1;
    }
}

#[inline(always)]
unsafe fn column_block_forward<S: Simd>(
    x: *const f32,
    y: *mut f32,
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
            a0.push(S::load(x.add(k * stride)));
            a1.push(S::load(x.add((k + 1) * stride)));
            k += 2;
        }
        if k < end {
            a0.push(S::load(x.add(k * stride)));
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
        let xv = S::load(x.add(k * stride));
        let v = if log {
            LogSoftmaxOut::apply::<S>(xv, xv, pv, qv)
        } else {
            SoftmaxOut::apply::<S>(xv, xv, pv, qv)
        };
        S::store(y.add(k * stride), v);
    }
    for (l, a) in acc[..S::LANES].iter().enumerate() {
        if !a.is_fast() {
            exact_row(n, stride, x.add(l), y.add(l), log);
        }
    }
}

/// Backward counterpart of [`columns_forward_impl`], same contract.
#[inline(always)]
unsafe fn columns_backward_impl<S: Simd>(
    y: SendPtr<f32>,
    dy: SendPtr<f32>,
    dx: SendPtr<f32>,
    n: usize,
    stride: usize,
    lanes: usize,
    log: bool,
) {
    let mut j = 0;
    while j + S::LANES <= lanes {
        column_block_backward::<S>(y.0.add(j), dy.0.add(j), dx.0.add(j), n, stride, log);
        j += S::LANES;
    }
    while j < lanes {
        column_block_backward::<Scalar>(y.0.add(j), dy.0.add(j), dx.0.add(j), n, stride, log);
        j += 1;
    }
}

#[inline(always)]
unsafe fn column_block_backward<S: Simd>(
    y: *const f32,
    dy: *const f32,
    dx: *mut f32,
    n: usize,
    stride: usize,
    log: bool,
) {
    let mut acc = [0.0f64; 16];
    let mut k = 0;
    while k < n {
        let end = (k + FOLD).min(n);
        let mut s = S::splat(0.0);
        for k in k..end {
            let g = S::load(dy.add(k * stride));
            s = if log {
                S::add(s, g)
            } else {
                S::mul_add(S::load(y.add(k * stride)), g, s)
            };
        }
        k = end;
        for (total, part) in acc.iter_mut().zip(S::to_array(s)) {
            *total += part as f64;
        }
    }
    let r: [f32; 16] = std::array::from_fn(|l| acc[l] as f32);
    let rv = S::load(r.as_ptr());
    for k in 0..n {
        let (yv, gv) = (S::load(y.add(k * stride)), S::load(dy.add(k * stride)));
        let v = if log {
            LogSoftmaxGrad::apply::<S>(yv, gv, rv, rv)
        } else {
            SoftmaxGrad::apply::<S>(yv, gv, rv, rv)
        };
        S::store(dx.add(k * stride), v);
    }
}

#[inline(always)]
unsafe fn columns_forward_entry<S: Simd>(job: ColumnJob) {
    columns_forward_impl::<S>(job.a, job.out, job.n, job.stride, job.lanes, job.log)
}
#[inline(always)]
unsafe fn columns_backward_entry<S: Simd>(job: ColumnJob) {
    columns_backward_impl::<S>(job.a, job.b, job.out, job.n, job.stride, job.lanes, job.log)
}

/// One task of the strided kernels: `lanes` adjacent softmaxes of one slab.
#[derive(Clone, Copy)]
struct ColumnJob {
    a: SendPtr<f32>,
    b: SendPtr<f32>,
    out: SendPtr<f32>,
    n: usize,
    stride: usize,
    lanes: usize,
    log: bool,
}

dispatch! {
    /// Requires a `ColumnJob` built by `run_columns` (bounds and disjointness checked there).
    fn columns_forward(job: ColumnJob) = columns_forward_entry;
    fn columns_backward(job: ColumnJob) = columns_backward_entry;
}

/// Splits `[outer, n, inner]` into slab x lane-block tasks and runs `kernel` on each.
fn run_columns(
    layout: Layout,
    a: &[f32],
    b: &[f32],
    out: &mut [f32],
    log: bool,
    kernel: impl Fn(ColumnJob) + Sync,
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
        SendPtr(a.as_ptr() as *mut f32),
        SendPtr(b.as_ptr() as *mut f32),
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
        threads::install(|| (0..outer * blocks).into_par_iter().for_each(task))
    }
}

/// Softmax (or log-softmax, `log`) of `x` viewed as `layout`, written to `y`.
pub fn softmax_forward(
    level: SimdLevel,
    x: &[f32],
    y: &mut [f32],
    layout: Layout,
    log: bool,
) -> FgResult<()> {
    let op = if log { "log_softmax" } else { "softmax" };
    layout.check(op, &[("x", x.len()), ("out", y.len())])?;
    if x.is_empty() {
        return Ok(());
    }
    if layout.inner == 1 {
        for_each_row(x, x, y, layout.n, |xr, _, yr, pieces| {
            forward_row(level, xr, yr, pieces, log)
        });
    } else {
        run_columns(layout, x, x, y, log, |job| columns_forward(level, job));
    }
    Ok(())
}

/// Gradient of softmax (or log-softmax) given its output `y` and the output gradient `dy`.
pub fn softmax_backward(
    level: SimdLevel,
    y: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    layout: Layout,
    log: bool,
) -> FgResult<()> {
    let op = if log {
        "log_softmax_backward"
    } else {
        "softmax_backward"
    };
    layout.check(
        op,
        &[
            ("y", y.len()),
            ("grad_out", dy.len()),
            ("grad_in", dx.len()),
        ],
    )?;
    if y.is_empty() {
        return Ok(());
    }
    if layout.inner == 1 {
        for_each_row(y, dy, dx, layout.n, |yr, dyr, dxr, pieces| {
            backward_row(level, yr, dyr, dxr, pieces, log)
        });
    } else {
        run_columns(layout, y, dy, dx, log, |job| columns_backward(level, job));
    }
    Ok(())
}

/// The classic three-pass softmax over contiguous rows (benchmark baseline).
pub fn softmax_three_pass(
    level: SimdLevel,
    x: &[f32],
    y: &mut [f32],
    n: usize,
    variant: ThreePass,
) -> FgResult<()> {
    let rows = x.len().checked_div(n).unwrap_or(0);
    let layout = Layout {
        outer: rows,
        n,
        inner: 1,
    };
    layout.check("softmax_three_pass", &[("x", x.len()), ("out", y.len())])?;
    if x.is_empty() {
        return Ok(());
    }
    for_each_row(x, x, y, n, |xr, _, yr, pieces| {
        let max = over_pieces(
            pieces,
            |r| row_max(level, &xr[r]),
            f32::NEG_INFINITY,
            f32::max,
        );
        let out = SendPtr(yr.as_mut_ptr());
        // SAFETY (both passes below): the pieces are disjoint ranges of this row.
        let total = over_pieces(
            pieces,
            |r| match variant {
                ThreePass::Reload => {
                    exp_store_sum(level, &xr[r.clone()], unsafe { piece_mut(out, &r) }, max)
                }
                ThreePass::Recompute => exp_shifted_sum(level, &xr[r], max),
            },
            0.0,
            |a, b| a + b,
        );
        let inv = (1.0 / total) as f32;
        over_pieces(
            pieces,
            |r| match variant {
                ThreePass::Reload => scale_in_place(level, unsafe { piece_mut(out, &r) }, inv),
                ThreePass::Recompute => exp_shifted_scaled(
                    level,
                    &xr[r.clone()],
                    unsafe { piece_mut(out, &r) },
                    max,
                    inv,
                ),
            },
            (),
            |_, _| (),
        );
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn levels() -> impl Iterator<Item = SimdLevel> {
        SimdLevel::ALL.into_iter().filter(|l| l.is_supported())
    }

    fn reference(x: &[f32], log: bool) -> Vec<f64> {
        let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
        x.iter()
            .map(|&v| {
                if log {
                    v as f64 - max - sum.ln()
                } else {
                    (v as f64 - max).exp() / sum
                }
            })
            .collect()
    }

    /// A deterministic spread of values (no RNG dependency).
    fn data(len: usize, spread: f32) -> Vec<f32> {
        let mut s = 0x9e37_79b9_u32;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32 - 0.5) * spread
            })
            .collect()
    }

    /// The accuracy bounds; `rel` is the softmax bound (2e-6 for the two-pass kernels).
    fn assert_close_rel(got: &[f32], want: &[f64], log: bool, rel: f64, what: &str) {
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let ok = if log {
                (g as f64 - w).abs() <= 1e-5 * w.abs().max(1.0)
            } else {
                w < 1e-30 || ((g as f64 - w) / w).abs() <= rel
            };
            assert!(ok, "{what}: element {i}: got {g}, want {w}");
        }
    }

    fn assert_close(got: &[f32], want: &[f64], log: bool, what: &str) {
        assert_close_rel(got, want, log, 2e-6, what)
    }

    #[test]
    fn rows_match_f64_on_every_path() {
        for level in levels() {
            for &(rows, n) in &[(3, 1), (5, 17), (2, 1000), (1, 70_001), (4, 40_000)] {
                let x = data(rows * n, 40.0);
                for log in [false, true] {
                    let mut y = vec![0.0; x.len()];
                    let layout = Layout {
                        outer: rows,
                        n,
                        inner: 1,
                    };
                    softmax_forward(level, &x, &mut y, layout, log).unwrap();
                    for r in 0..rows {
                        let want = reference(&x[r * n..(r + 1) * n], log);
                        let what = format!("{level:?} {rows}x{n} log={log}");
                        assert_close(&y[r * n..(r + 1) * n], &want, log, &what);
                    }
                }
            }
        }
    }

    #[test]
    fn columns_match_rows_of_the_transpose() {
        let (outer, n, inner) = (3, 37, 21);
        let x = data(outer * n * inner, 20.0);
        for level in levels() {
            for log in [false, true] {
                let mut y = vec![0.0; x.len()];
                softmax_forward(level, &x, &mut y, Layout { outer, n, inner }, log).unwrap();
                for o in 0..outer {
                    for j in 0..inner {
                        let col: Vec<f32> =
                            (0..n).map(|k| x[o * n * inner + k * inner + j]).collect();
                        let got: Vec<f32> =
                            (0..n).map(|k| y[o * n * inner + k * inner + j]).collect();
                        assert_close(
                            &got,
                            &reference(&col, log),
                            log,
                            &format!("{level:?} col {o},{j}"),
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn special_values_follow_torch() {
        let inf = f32::INFINITY;
        for level in levels() {
            let mut y = [0.0f32; 3];
            let layout = Layout {
                outer: 1,
                n: 3,
                inner: 1,
            };
            softmax_forward(level, &[-inf, 0.0, 0.0], &mut y, layout, false).unwrap();
            assert_eq!(y, [0.0, 0.5, 0.5]);
            for bad in [[-inf, -inf, -inf], [inf, 0.0, 1.0], [f32::NAN, 0.0, 1.0]] {
                softmax_forward(level, &bad, &mut y, layout, false).unwrap();
                assert!(y.iter().all(|v| v.is_nan()), "{level:?} {bad:?} -> {y:?}");
            }
            softmax_forward(level, &[1e38, -1e38, 0.0], &mut y, layout, false).unwrap();
            assert_eq!(y, [1.0, 0.0, 0.0]);
        }
    }

    #[test]
    fn backward_matches_formula() {
        let (rows, n) = (3, 300);
        let x = data(rows * n, 10.0);
        let dy = data(rows * n, 2.0);
        for level in levels() {
            for log in [false, true] {
                let layout = Layout {
                    outer: rows,
                    n,
                    inner: 1,
                };
                let mut y = vec![0.0; x.len()];
                softmax_forward(level, &x, &mut y, layout, log).unwrap();
                let mut dx = vec![0.0; x.len()];
                softmax_backward(level, &y, &dy, &mut dx, layout, log).unwrap();
                for r in 0..rows {
                    let (ys, gs) = (&y[r * n..(r + 1) * n], &dy[r * n..(r + 1) * n]);
                    let red: f64 = if log {
                        gs.iter().map(|&g| g as f64).sum()
                    } else {
                        ys.iter().zip(gs).map(|(&a, &b)| a as f64 * b as f64).sum()
                    };
                    for k in 0..n {
                        let (yk, gk) = (ys[k] as f64, gs[k] as f64);
                        let want = if log {
                            gk - yk.exp() * red
                        } else {
                            yk * (gk - red)
                        };
                        let got = dx[r * n + k] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                            "{level:?} {got} {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn three_pass_variants_agree_with_reference() {
        let (rows, n) = (3, 5000);
        let x = data(rows * n, 30.0);
        for level in levels() {
            for variant in [ThreePass::Reload, ThreePass::Recompute] {
                let mut y = vec![0.0; x.len()];
                softmax_three_pass(level, &x, &mut y, n, variant).unwrap();
                for r in 0..rows {
                    let want = reference(&x[r * n..(r + 1) * n], false);
                    // exp(x - max) rounds x - max to f32 first (as torch does): ~ulp(30) relative.
                    let what = format!("{level:?} {variant:?}");
                    assert_close_rel(&y[r * n..(r + 1) * n], &want, false, 1e-5, &what);
                }
            }
        }
    }

    #[test]
    fn wrong_lengths_are_value_errors() {
        let layout = Layout {
            outer: 2,
            n: 3,
            inner: 1,
        };
        let err = softmax_forward(SimdLevel::Scalar, &[0.0; 5], &mut [0.0; 6], layout, false);
        assert!(matches!(err, Err(FgError::Value(m)) if m.starts_with("softmax:")));
    }
}
