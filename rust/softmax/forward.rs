//! The two-pass forward: pass 1 sums exp(x) as (mantissa, exponent) pairs, pass 2 writes
//! exp(x) / sum (or x - log-sum-exp); rows contiguous or strided.

use std::ops::Range;

use super::layout::{for_each_row, over_pieces, run_columns, ColumnJob, Layout};
use super::special::exact_row;
use super::{map_row, Pointwise, BLOCK_VECTORS, FOLD, X_FLOOR};
use crate::dispatch;
use crate::error::FgResult;
use crate::simd::{pow2, Scalar, Simd, SimdLevel};
use crate::threads::{Disjoint, SendPtr};

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
/// per accumulator reached 3.3e-6 relative, two levels of 32 and 8 stay below 6e-7.
const RUN_VECTORS: usize = 128;

/// Pass 1 over a contiguous slice.
#[inline(always)]
unsafe fn exp_sum_impl<S: Simd>(x: &[f32]) -> ExpSum {
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
                a0.push(S::load(p.add(i)));
                a1.push(S::load(p.add(i + l)));
                a2.push(S::load(p.add(i + 2 * l)));
                a3.push(S::load(p.add(i + 3 * l)));
                i += 4 * l;
            }
            while i + l <= run.len() {
                a0.push(S::load(p.add(i)));
                i += l;
            }
            if i < run.len() {
                // -inf lanes add exactly 0.
                a1.push(S::load_partial(p.add(i), run.len() - i, f32::NEG_INFINITY));
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

/// log_softmax pass 2: (x - max) - (lse - max), torch's rounding.
struct LogSoftmaxOut;
impl Pointwise for LogSoftmaxOut {
    #[inline(always)]
    unsafe fn apply<S: Simd>(x: S::V, _: S::V, max: S::V, rest: S::V) -> S::V {
        S::sub(S::sub(x, max), rest)
    }
}

#[inline(always)]
unsafe fn softmax_out_impl<S: Simd>(x: &[f32], y: &mut [f32], p: f32, q: f32) {
    map_row::<S, SoftmaxOut>(x.as_ptr(), x.as_ptr(), y.as_mut_ptr(), x.len(), p, q)
}
#[inline(always)]
unsafe fn log_softmax_out_impl<S: Simd>(x: &[f32], y: &mut [f32], p: f32, q: f32) {
    map_row::<S, LogSoftmaxOut>(x.as_ptr(), x.as_ptr(), y.as_mut_ptr(), x.len(), p, q)
}

dispatch! {
    /// Pass 1 of the two-pass softmax over a contiguous piece of a row.
    pub fn exp_sum(x: &[f32]) -> ExpSum = exp_sum_impl;
    fn softmax_out(x: &[f32], y: &mut [f32], p: f32, q: f32) = softmax_out_impl;
    fn log_softmax_out(x: &[f32], y: &mut [f32], p: f32, q: f32) = log_softmax_out_impl;
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
    let out = Disjoint::new(y);
    over_pieces(
        pieces,
        |r| {
            // SAFETY: the pieces are disjoint ranges of this row.
            let yp = unsafe { out.piece(r.clone()) };
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

#[inline(always)]
unsafe fn columns_forward_entry<S: Simd>(job: ColumnJob) {
    columns_forward_impl::<S>(job.a, job.out, job.n, job.stride, job.lanes, job.log)
}

dispatch! {
    /// Requires a `ColumnJob` built by `run_columns` (bounds and disjointness checked there).
    fn columns_forward(job: ColumnJob) = columns_forward_entry;
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
