//! The classic three-pass softmax (max, sum, normalize): the benchmark's baseline, built for
//! tests and the `dev` feature only.

use super::element::Lanes;
use super::forward::scale_in_place;
use super::layout::{for_each_row, over_pieces, Layout};
use super::reduce::{exp_shifted_sum, row_max};
use super::{exp_floored, map_row, Pointwise, BLOCK_VECTORS};
use std::ops::Range;

use crate::dispatch;
use crate::error::FgResult;
use crate::simd::{Scalar, Simd, SimdLevel};
use crate::threads::Disjoint;

/// Which three-pass variant to run (both are baselines for the benchmark).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreePass {
    /// max; exp(x - max) stored and summed; the stored values rescaled (3 reads, 2 writes).
    Reload,
    /// max; sum of exp(x - max); exp recomputed and scaled (3 reads, 1 write).
    Recompute,
}

/// Three-pass (recompute) pass 3: exp(x - max) / sum.
struct ExpShiftedScaled;
impl Pointwise for ExpShiftedScaled {
    #[inline(always)]
    unsafe fn apply<S: Simd>(x: S::V, _: S::V, max: S::V, inv: S::V) -> S::V {
        S::mul(exp_floored::<S>(S::sub(x, max)), inv)
    }
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

#[inline(always)]
unsafe fn exp_shifted_scaled_impl<S: Lanes>(x: &[f32], y: &mut [f32], max: f32, inv: f32) {
    map_row::<S, f32, f32, ExpShiftedScaled>(
        x.as_ptr(),
        x.as_ptr(),
        y.as_mut_ptr(),
        x.len(),
        max,
        inv,
    )
}

dispatch! {
    fn exp_store_sum(x: &[f32], y: &mut [f32], max: f32) -> f64 = exp_store_sum_impl;
    fn exp_shifted_scaled(x: &[f32], y: &mut [f32], max: f32, inv: f32) = exp_shifted_scaled_impl;
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
    for_each_row(x, x, y, n, |xs, _, ys, pieces| {
        for (xr, yr) in xs.chunks_exact(n).zip(ys.chunks_exact_mut(n)) {
            three_pass_row(level, xr, yr, pieces, variant)
        }
    });
    Ok(())
}

fn three_pass_row(
    level: SimdLevel,
    xr: &[f32],
    yr: &mut [f32],
    pieces: &[Range<usize>],
    variant: ThreePass,
) {
    {
        let max = over_pieces(
            pieces,
            |r| row_max(level, &xr[r]),
            f32::NEG_INFINITY,
            f32::max,
        );
        let out = Disjoint::new(yr);
        // SAFETY (both passes below): the pieces are disjoint ranges of this row.
        let total = over_pieces(
            pieces,
            |r| match variant {
                ThreePass::Reload => {
                    exp_store_sum(level, &xr[r.clone()], unsafe { out.piece(r.clone()) }, max)
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
                ThreePass::Reload => scale_in_place(level, unsafe { out.piece(r.clone()) }, inv),
                ThreePass::Recompute => exp_shifted_scaled(
                    level,
                    &xr[r.clone()],
                    unsafe { out.piece(r.clone()) },
                    max,
                    inv,
                ),
            },
            (),
            |_, _| (),
        );
    }
}
