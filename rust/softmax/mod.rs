//! Softmax and log-softmax on f32, bfloat16 and float16, forward and backward.
//!
//! 16-bit inputs and outputs are converted in registers (element.rs); every kernel computes
//! and accumulates in f32, with f64 folds.
//!
//! Rows that leave the cache run the two-pass algorithm of Dukhan & Ablavatski: pass 1 reads
//! x once and accumulates exp(x) as a (mantissa, exponent) pair, rescaling by powers of two
//! whenever the exponent grows, so no separate max pass is needed; pass 2 recomputes exp(x)
//! and scales it. That is two reads and one write per element, against three reads and one or
//! two writes for the classic max / sum / normalize scheme, which is kept (three_pass.rs, in
//! `dev` builds) so the benchmark can measure the difference. Rows up to `Element::short_row`
//! run the in-cache kernel instead: one read from memory (the max), then exp(x) computed once
//! into an f32 scratch row that stays in cache, then the scaled output. With AVX2 or scalar code,
//! where exp costs more than a pass over memory, every row takes the in-cache kernel's passes
//! (16-bit softmax rows of 262144+, which would need a float32 scratch row as long as the
//! input, recompute exp in the last pass instead). docs/softmax.md has the measurements behind
//! the choices.
//!
//! A tensor is seen as `[outer, n, inner]` with the softmax over `n`. With `inner == 1` each row
//! is contiguous and is vectorized along its length (short rows many to a task, a long row split
//! across threads and the partial sums merged); otherwise `inner` independent softmaxes are
//! vectorized side by side.
//!
//! Rows the fast paths cannot take exactly (NaN or +inf present, every entry -inf, or a row
//! maximum beyond about 2^21 in magnitude) go through `special::exact_row`, which follows
//! torch's max-subtracting formula in f64 and so its special-value semantics.
//!
//! Files: element.rs (storage types), forward.rs, backward.rs, special.rs (the rows the fast
//! paths cannot take), reduce.rs (f32 row sums and maxima shared with cut cross-entropy),
//! layout.rs (the `[outer, n, inner]` view and how a call is cut into parallel tasks),
//! three_pass.rs.

use crate::simd::{Bf16, Simd, SimdLevel, F16};

mod backward;
mod element;
mod forward;
mod layout;
mod reduce;
mod special;
#[cfg(test)]
mod tests;
#[cfg(any(test, feature = "dev"))]
mod three_pass;

pub use backward::softmax_backward;
pub use element::Element;
pub use forward::{softmax_forward, ExpSum};
pub use layout::Layout;
pub(crate) use reduce::{exp_shifted_store, exp_shifted_sum, row_max, sum};
#[cfg(any(test, feature = "dev"))]
pub use three_pass::{softmax_three_pass, ThreePass};

use backward::{columns_backward_impl, grad_out_impl, grad_reduce_impl, rows_backward_impl};
use element::Lanes;
use forward::{
    columns_forward_impl, exp_sum_impl, pass2_impl, row_max_impl, rows_forward_impl,
    scaled_exp_sum_impl,
};
use layout::ColumnJob;

/// Inputs are clamped here from below before the exponent split (-inf then contributes 0).
const X_FLOOR: f32 = -2_097_152.0;
/// Vectors summed in f32 lanes before folding into f64: each lane accumulator then adds at most
/// a few hundred terms on every path, which bounds rounding growth.
const BLOCK_VECTORS: usize = 1024;
/// Steps along a strided dimension between f64 folds.
const FOLD: usize = 256;

/// An elementwise map `out = f(a, b)` with two per-lane parameters `p`, `q`.
trait Pointwise {
    unsafe fn apply<S: Simd>(a: S::V, b: S::V, p: S::V, q: S::V) -> S::V;
}

#[inline(always)]
pub(crate) unsafe fn exp_floored<S: Simd>(x: S::V) -> S::V {
    S::exp(S::max(S::splat(X_FLOOR), x))
}

/// `out[i] = P(a[i], b[i])` over `len` contiguous elements; `out` may alias `a` or `b`.
#[inline(always)]
unsafe fn map_row<S: Lanes, A: Element, O: Element, P: Pointwise>(
    a: *const A,
    b: *const A,
    out: *mut O,
    len: usize,
    p: f32,
    q: f32,
) {
    let (pv, qv) = (S::splat(p), S::splat(q));
    let mut i = 0;
    while i + S::LANES <= len {
        let v = P::apply::<S>(A::load::<S>(a.add(i)), A::load::<S>(b.add(i)), pv, qv);
        O::store::<S>(out.add(i), v);
        i += S::LANES;
    }
    if i < len {
        let rest = len - i;
        let (va, vb) = (
            A::load_partial::<S>(a.add(i), rest, 0.0),
            A::load_partial::<S>(b.add(i), rest, 0.0),
        );
        O::store_partial::<S>(out.add(i), P::apply::<S>(va, vb, pv, qv), rest);
    }
}

/// The kernel entry points of one storage type, each compiled once per SIMD backend.
pub trait Kernels: Element {
    /// Two-pass pass 1 over a contiguous piece of a row.
    fn exp_sum(level: SimdLevel, x: &[Self]) -> ExpSum;
    /// Two-pass pass 2 with the parameters of `ExpSum::pass2_params`.
    fn pass2(level: SimdLevel, x: &[Self], y: &mut [Self], p: f32, q: f32, log: bool);
    /// The largest entry of a piece of a row (NaN skipped).
    fn row_max(level: SimdLevel, x: &[Self]) -> f32;
    /// Σ exp(x) 2^-nmax over a piece of a row, the terms stored in `e` when given.
    fn scaled_exp_sum(level: SimdLevel, x: &[Self], e: Option<&mut [f32]>, nmax: f32) -> f64;
    /// The in-cache forward over whole rows of length `n`.
    fn rows_forward(level: SimdLevel, x: &[Self], y: &mut [Self], n: usize, log: bool);
    /// Σ y dy (softmax) or Σ dy (log-softmax) over a piece of a row.
    fn grad_reduce(level: SimdLevel, y: &[Self], dy: &[Self], log: bool) -> f64;
    /// The backward's elementwise pass over a piece of a row, given `grad_reduce`'s total.
    fn grad_out(level: SimdLevel, y: &[Self], dy: &[Self], dx: &mut [Self], r: f32, log: bool);
    /// The backward over whole rows of length `n`, each read once from memory.
    fn rows_backward(
        level: SimdLevel,
        y: &[Self],
        dy: &[Self],
        dx: &mut [Self],
        n: usize,
        log: bool,
    );
    /// Requires a job built by `run_columns` (bounds and disjointness checked there).
    fn columns_forward(level: SimdLevel, job: ColumnJob<Self>);
    /// As `columns_forward`.
    fn columns_backward(level: SimdLevel, job: ColumnJob<Self>);
}

macro_rules! kernels {
    ($($t:ty => $m:ident),* $(,)?) => {$(
        mod $m {
            use super::*;

            crate::dispatch! {
                pub(super) fn exp_sum(x: &[$t]) -> ExpSum = exp_sum_impl<$t>;
                pub(super) fn pass2(x: &[$t], y: &mut [$t], p: f32, q: f32, log: bool)
                    = pass2_impl<$t>;
                pub(super) fn row_max(x: &[$t]) -> f32 = row_max_impl<$t>;
                pub(super) fn scaled_exp_sum(x: &[$t], e: Option<&mut [f32]>, nmax: f32) -> f64
                    = scaled_exp_sum_impl<$t>;
                pub(super) fn rows_forward(x: &[$t], y: &mut [$t], n: usize, log: bool)
                    = rows_forward_impl<$t>;
                pub(super) fn grad_reduce(y: &[$t], dy: &[$t], log: bool) -> f64
                    = grad_reduce_impl<$t>;
                pub(super) fn grad_out(y: &[$t], dy: &[$t], dx: &mut [$t], r: f32, log: bool)
                    = grad_out_impl<$t>;
                pub(super) fn rows_backward(
                    y: &[$t], dy: &[$t], dx: &mut [$t], n: usize, log: bool
                ) = rows_backward_impl<$t>;
                pub(super) fn columns_forward(job: ColumnJob<$t>) = columns_forward_impl<$t>;
                pub(super) fn columns_backward(job: ColumnJob<$t>) = columns_backward_impl<$t>;
            }
        }

        impl Kernels for $t {
            fn exp_sum(level: SimdLevel, x: &[Self]) -> ExpSum {
                $m::exp_sum(level, x)
            }
            fn pass2(level: SimdLevel, x: &[Self], y: &mut [Self], p: f32, q: f32, log: bool) {
                $m::pass2(level, x, y, p, q, log)
            }
            fn row_max(level: SimdLevel, x: &[Self]) -> f32 {
                $m::row_max(level, x)
            }
            fn scaled_exp_sum(
                level: SimdLevel,
                x: &[Self],
                e: Option<&mut [f32]>,
                nmax: f32,
            ) -> f64 {
                $m::scaled_exp_sum(level, x, e, nmax)
            }
            fn rows_forward(level: SimdLevel, x: &[Self], y: &mut [Self], n: usize, log: bool) {
                $m::rows_forward(level, x, y, n, log)
            }
            fn grad_reduce(level: SimdLevel, y: &[Self], dy: &[Self], log: bool) -> f64 {
                $m::grad_reduce(level, y, dy, log)
            }
            fn grad_out(
                level: SimdLevel, y: &[Self], dy: &[Self], dx: &mut [Self], r: f32, log: bool,
            ) {
                $m::grad_out(level, y, dy, dx, r, log)
            }
            fn rows_backward(
                level: SimdLevel, y: &[Self], dy: &[Self], dx: &mut [Self], n: usize, log: bool,
            ) {
                $m::rows_backward(level, y, dy, dx, n, log)
            }
            fn columns_forward(level: SimdLevel, job: ColumnJob<Self>) {
                $m::columns_forward(level, job)
            }
            fn columns_backward(level: SimdLevel, job: ColumnJob<Self>) {
                $m::columns_backward(level, job)
            }
        }
    )*};
}

kernels!(f32 => f32_kernels, Bf16 => bf16_kernels, F16 => f16_kernels);
