//! f32 row reductions: sums, maxima and sums of exp(x - max), shared by cut cross-entropy
//! (rust/cce.rs) and the three-pass baseline.

use super::{exp_floored, BLOCK_VECTORS};
use crate::dispatch;
use crate::simd::Simd;

/// `Σ a[i]`, with f32 lanes folded into f64 per block.
#[inline(always)]
unsafe fn sum_impl<S: Simd>(a: &[f32]) -> f64 {
    let l = S::LANES;
    let mut total = 0.0f64;
    let block = BLOCK_VECTORS * S::LANES;
    for start in (0..a.len()).step_by(block) {
        let end = (start + block).min(a.len());
        let pa = a.as_ptr();
        let (mut s0, mut s1) = (S::splat(0.0), S::splat(0.0));
        let mut i = start;
        while i + 2 * l <= end {
            s0 = S::add(s0, S::load(pa.add(i)));
            s1 = S::add(s1, S::load(pa.add(i + l)));
            i += 2 * l;
        }
        let lanes = S::to_array(S::add(s0, s1));
        total += lanes[..l].iter().map(|&v| v as f64).sum::<f64>();
        total += a[i..end].iter().map(|&v| v as f64).sum::<f64>();
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

/// Three-pass (recompute) pass 2: Σ exp(x - max).
#[inline(always)]
unsafe fn exp_shifted_sum_impl<S: Simd>(x: &[f32], max: f32) -> f64 {
    // Read only: STORE false never writes through the pointer.
    exp_sum::<S, false>(x.as_ptr().cast_mut(), x.len(), max)
}

/// Σ exp(x - max), each exp(x - max) written over its x (the same sum, bit for bit).
#[inline(always)]
unsafe fn exp_shifted_store_impl<S: Simd>(x: &mut [f32], max: f32) -> f64 {
    exp_sum::<S, true>(x.as_mut_ptr(), x.len(), max)
}

/// Σ exp(x - max) over `len` floats at `px`, written back in place when `STORE`.
#[inline(always)]
unsafe fn exp_sum<S: Simd, const STORE: bool>(px: *mut f32, len: usize, max: f32) -> f64 {
    #[inline(always)]
    unsafe fn exp_at<S: Simd, const STORE: bool>(p: *mut f32, mv: S::V) -> S::V {
        let e = exp_floored::<S>(S::sub(S::load(p), mv));
        if STORE {
            S::store(p, e);
        }
        e
    }
    let mv = S::splat(max);
    let mut total = 0.0f64;
    let block = BLOCK_VECTORS * S::LANES;
    for start in (0..len).step_by(block) {
        let end = (start + block).min(len);
        let (mut s0, mut s1) = (S::splat(0.0), S::splat(0.0));
        let mut i = start;
        while i + 2 * S::LANES <= end {
            s0 = S::add(s0, exp_at::<S, STORE>(px.add(i), mv));
            s1 = S::add(s1, exp_at::<S, STORE>(px.add(i + S::LANES), mv));
            i += 2 * S::LANES;
        }
        // The ragged end as one masked vector (padding -inf: exactly 0): on short rows (cut
        // cross-entropy over a few hundred logits) scalar exps there took as long as the rest.
        if i + S::LANES <= end {
            s0 = S::add(s0, exp_at::<S, STORE>(px.add(i), mv));
            i += S::LANES;
        }
        if i < end {
            let v = S::load_partial(px.add(i), end - i, f32::NEG_INFINITY);
            let e = exp_floored::<S>(S::sub(v, mv));
            if STORE {
                S::store_partial(px.add(i), e, end - i);
            }
            s1 = S::add(s1, e);
        }
        let s = S::to_array(S::add(s0, s1));
        total += s[..S::LANES].iter().map(|&v| v as f64).sum::<f64>();
    }
    total
}

dispatch! {
    pub(crate) fn sum(a: &[f32]) -> f64 = sum_impl;
    pub(crate) fn row_max(x: &[f32]) -> f32 = max_impl;
    pub(crate) fn exp_shifted_sum(x: &[f32], max: f32) -> f64 = exp_shifted_sum_impl;
    pub(crate) fn exp_shifted_store(x: &mut [f32], max: f32) -> f64 = exp_shifted_store_impl;
}
