//! The backward of softmax and log-softmax from the forward's output, contiguous or strided.

use std::ops::Range;

use super::layout::{for_each_row, over_pieces, run_columns, ColumnJob, Layout};
use super::reduce::{dot, sum};
use super::{exp_floored, map_row, Pointwise, FOLD};
use crate::dispatch;
use crate::error::FgResult;
use crate::simd::{Scalar, Simd, SimdLevel};
use crate::threads::{Disjoint, SendPtr};

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

#[inline(always)]
unsafe fn softmax_grad_impl<S: Simd>(y: &[f32], dy: &[f32], dx: &mut [f32], dot: f32) {
    map_row::<S, SoftmaxGrad>(y.as_ptr(), dy.as_ptr(), dx.as_mut_ptr(), y.len(), dot, 0.0)
}
#[inline(always)]
unsafe fn log_softmax_grad_impl<S: Simd>(y: &[f32], dy: &[f32], dx: &mut [f32], sum: f32) {
    map_row::<S, LogSoftmaxGrad>(y.as_ptr(), dy.as_ptr(), dx.as_mut_ptr(), y.len(), sum, 0.0)
}

dispatch! {
    fn softmax_grad(y: &[f32], dy: &[f32], dx: &mut [f32], dot: f32) = softmax_grad_impl;
    fn log_softmax_grad(y: &[f32], dy: &[f32], dx: &mut [f32], sum: f32) = log_softmax_grad_impl;
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
    let out = Disjoint::new(dx);
    over_pieces(
        pieces,
        |r| {
            // SAFETY: the pieces are disjoint ranges of this row.
            let dxp = unsafe { out.piece(r.clone()) };
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
unsafe fn columns_backward_entry<S: Simd>(job: ColumnJob) {
    columns_backward_impl::<S>(job.a, job.b, job.out, job.n, job.stride, job.lanes, job.log)
}

dispatch! {
    /// Requires a `ColumnJob` built by `run_columns` (bounds and disjointness checked there).
    fn columns_backward(job: ColumnJob) = columns_backward_entry;
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
