//! The backward of softmax and log-softmax from the forward's output, contiguous or strided.

use std::ops::Range;

use super::element::{Element, Lanes};
use super::forward::RUN_VECTORS;
use super::layout::{for_each_row, over_pieces, run_columns, ColumnJob, Layout};
use super::{exp_floored, map_row, Kernels, Pointwise, BLOCK_VECTORS, FOLD};
use crate::error::FgResult;
use crate::simd::{Scalar, Simd, SimdLevel};
use crate::threads::Disjoint;

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

/// `Σ y dy` (softmax) or `Σ dy` (log-softmax), f32 lanes folded into f64 every `run` vectors.
#[inline(always)]
unsafe fn reduce<S: Lanes, E: Element>(y: &[E], dy: &[E], log: bool, run: usize) -> f64 {
    let l = S::LANES;
    let (py, pg) = (y.as_ptr(), dy.as_ptr());
    let mut total = 0.0f64;
    let mut i = 0;
    while i < y.len() {
        let end = (i + run * l).min(y.len());
        let (mut s0, mut s1) = (S::splat(0.0), S::splat(0.0));
        while i + 2 * l <= end {
            let (g0, g1) = (E::load::<S>(pg.add(i)), E::load::<S>(pg.add(i + l)));
            if log {
                (s0, s1) = (S::add(s0, g0), S::add(s1, g1));
            } else {
                s0 = S::mul_add(E::load::<S>(py.add(i)), g0, s0);
                s1 = S::mul_add(E::load::<S>(py.add(i + l)), g1, s1);
            }
            i += 2 * l;
        }
        while i < end {
            let rest = (end - i).min(l);
            let g = E::load_upto::<S>(pg.add(i), rest, 0.0);
            s0 = if log {
                S::add(s0, g)
            } else {
                S::mul_add(E::load_upto::<S>(py.add(i), rest, 0.0), g, s0)
            };
            i += rest;
        }
        total += S::hsum(S::add(s0, s1)) as f64;
    }
    total
}

#[inline(always)]
pub(super) unsafe fn grad_reduce_impl<S: Lanes, E: Element>(y: &[E], dy: &[E], log: bool) -> f64 {
    assert_eq!(y.len(), dy.len());
    reduce::<S, E>(y, dy, log, BLOCK_VECTORS)
}

#[inline(always)]
pub(super) unsafe fn grad_out_impl<S: Lanes, E: Element>(
    y: &[E],
    dy: &[E],
    dx: &mut [E],
    r: f32,
    log: bool,
) {
    assert!(y.len() == dy.len() && y.len() == dx.len());
    let (py, pg, pd) = (y.as_ptr(), dy.as_ptr(), dx.as_mut_ptr());
    if log {
        map_row::<S, E, E, LogSoftmaxGrad>(py, pg, pd, y.len(), r, 0.0)
    } else {
        map_row::<S, E, E, SoftmaxGrad>(py, pg, pd, y.len(), r, 0.0)
    }
}

/// The backward over whole rows of length `n`: the reduction, then the output pass while the
/// row is still in cache.
#[inline(always)]
pub(super) unsafe fn rows_backward_impl<S: Lanes, E: Element>(
    y: &[E],
    dy: &[E],
    dx: &mut [E],
    n: usize,
    log: bool,
) {
    let rows = y.chunks_exact(n).zip(dy.chunks_exact(n));
    for ((yr, gr), dr) in rows.zip(dx.chunks_exact_mut(n)) {
        let r = reduce::<S, E>(yr, gr, log, RUN_VECTORS) as f32;
        grad_out_impl::<S, E>(yr, gr, dr, r, log)
    }
}

/// Backward of one contiguous row split into `pieces`.
fn backward_row<E: Kernels>(
    level: SimdLevel,
    y: &[E],
    dy: &[E],
    dx: &mut [E],
    pieces: &[Range<usize>],
    log: bool,
) {
    let reduce = |r: Range<usize>| E::grad_reduce(level, &y[r.clone()], &dy[r], log);
    let red = over_pieces(pieces, reduce, 0.0, |a, b| a + b) as f32;
    let out = Disjoint::new(dx);
    over_pieces(
        pieces,
        |r| {
            // SAFETY: the pieces are disjoint ranges of this row.
            let dxp = unsafe { out.piece(r.clone()) };
            E::grad_out(level, &y[r.clone()], &dy[r], dxp, red, log)
        },
        (),
        |_, _| (),
    )
}

/// Backward counterpart of `columns_forward_impl`, same contract.
#[inline(always)]
pub(super) unsafe fn columns_backward_impl<S: Lanes, E: Element>(job: ColumnJob<E>) {
    let (y, dy, dx) = (job.a.0, job.b.0, job.out.ptr());
    let (n, stride, log) = (job.n, job.stride, job.log);
    let mut j = 0;
    while j + S::LANES <= job.lanes {
        column_block_backward::<S, E>(y.add(j), dy.add(j), dx.add(j), n, stride, log);
        j += S::LANES;
    }
    while j < job.lanes {
        column_block_backward::<Scalar, E>(y.add(j), dy.add(j), dx.add(j), n, stride, log);
        j += 1;
    }
}

#[inline(always)]
unsafe fn column_block_backward<S: Lanes, E: Element>(
    y: *const E,
    dy: *const E,
    dx: *mut E,
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
            let g = E::load::<S>(dy.add(k * stride));
            s = if log {
                S::add(s, g)
            } else {
                S::mul_add(E::load::<S>(y.add(k * stride)), g, s)
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
        let (yv, gv) = (
            E::load::<S>(y.add(k * stride)),
            E::load::<S>(dy.add(k * stride)),
        );
        let v = if log {
            LogSoftmaxGrad::apply::<S>(yv, gv, rv, rv)
        } else {
            SoftmaxGrad::apply::<S>(yv, gv, rv, rv)
        };
        E::store::<S>(dx.add(k * stride), v);
    }
}

/// Gradient of softmax (or log-softmax) given its output `y` and the output gradient `dy`.
pub fn softmax_backward<E: Kernels>(
    level: SimdLevel,
    y: &[E],
    dy: &[E],
    dx: &mut [E],
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
    let n = layout.n;
    if layout.inner == 1 {
        for_each_row(y, dy, dx, n, |yr, gr, dr, pieces| {
            if n <= E::short_row(level, false) {
                E::rows_backward(level, yr, gr, dr, n, log)
            } else {
                let rows = yr.chunks_exact(n).zip(gr.chunks_exact(n));
                for ((yr, gr), dr) in rows.zip(dr.chunks_exact_mut(n)) {
                    backward_row(level, yr, gr, dr, pieces, log)
                }
            }
        });
    } else {
        run_columns(layout, y, dy, dx, log, |job| {
            E::columns_backward(level, job)
        });
    }
    Ok(())
}
