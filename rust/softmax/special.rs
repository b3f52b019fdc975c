//! The rows the fast path cannot take exactly: NaN or +inf present, every entry -inf, or a row
//! maximum beyond about 2^21 in magnitude. They follow torch's formula in f64.

use super::element::Element;
use super::{ExpSum, X_FLOOR};

/// A row whose maximum lies in this range is computed exactly by the fast path: every entry's
/// exponent is an exact integer and clamped entries are far below the maximum.
const FAST_MAX_LO: f32 = X_FLOOR + 256.0;
const FAST_MAX_HI: f32 = 2_097_152.0;

impl ExpSum {
    /// Whether the fast path's result is exact for this row (see the module docs). NaN and
    /// +inf poison `mant`; a row of -inf (clamped to `X_FLOOR`) has a tiny `exp`.
    pub fn is_fast(&self) -> bool {
        let max = self.approx_max();
        self.mant.is_finite() && (FAST_MAX_LO..=FAST_MAX_HI).contains(&max)
    }
}

/// torch's formula in f64 over a (possibly strided) row: exact special-value semantics.
///
/// # Safety
/// `x` and `y` are valid for indices `k * stride`, `k < n`, and no other thread touches them.
pub(super) unsafe fn exact_row<E: Element>(
    n: usize,
    stride: usize,
    x: *const E,
    y: *mut E,
    log: bool,
) {
    let at = |k: usize| (*x.add(k * stride)).to_f32();
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
        *y.add(k * stride) = E::from_f32(v as f32);
    }
}
