//! Softmax and log-softmax on f32, forward and backward.
//!
//! The forward pass is the two-pass algorithm of Dukhan & Ablavatski: pass 1 reads x once and
//! accumulates exp(x) as a (mantissa, exponent) pair, rescaling by powers of two whenever the
//! exponent grows, so no separate max pass is needed; pass 2 recomputes exp(x) and scales it.
//! That is two reads and one write per element, against three reads and one or two writes for
//! the classic max / sum / normalize scheme, which is kept (three_pass.rs, in `dev` builds) so
//! the benchmark can measure the difference.
//!
//! A tensor is seen as `[outer, n, inner]` with the softmax over `n`. With `inner == 1` each row
//! is contiguous and is vectorized along its length (a long row is split across threads and the
//! partial sums merged); otherwise `inner` independent softmaxes are vectorized side by side.
//!
//! Rows the fast path cannot take exactly (NaN or +inf present, every entry -inf, or a row
//! maximum beyond about 2^21 in magnitude) go through `special::exact_row`, which follows
//! torch's max-subtracting formula in f64 and so its special-value semantics.
//!
//! Files: forward.rs (pass 1 and 2), backward.rs, special.rs (the rows the fast path cannot
//! take), reduce.rs (row sums and maxima, shared with cut cross-entropy), layout.rs (the
//! `[outer, n, inner]` view and how a call is cut into parallel tasks), three_pass.rs.

use crate::simd::Simd;

mod backward;
mod forward;
mod layout;
mod reduce;
mod special;
#[cfg(test)]
mod tests;
#[cfg(any(test, feature = "dev"))]
mod three_pass;

pub use backward::softmax_backward;
pub use forward::{exp_sum, softmax_forward, ExpSum};
pub use layout::Layout;
pub(crate) use reduce::{exp_shifted_sum, row_max, sum};
#[cfg(any(test, feature = "dev"))]
pub use three_pass::{softmax_three_pass, ThreePass};

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
