//! L1 LayerNorm (docs/definitions.md) over rows of length n:
//! y = (x - mean) / (sqrt(pi/2) * mean|x - mean| + eps) * gamma + beta. No square root in the statistics, so they can be computed
//! exactly in integers straight from ShiftQuant codes (`forward_codes`).
//!
//! The forward saves, per row, the mean and r = 1 / (sqrt(pi/2) * mean|d| + eps); the backward
//! recomputes d = x - mean from x (or from the codes) and, with g = dy * gamma, y^ = d * r and
//! s = sign(d):  dx = r * ((g - mean g) - sqrt(pi/2) / n * (sum g y^) * (s - mean s)).

use std::ops::{Add, Mul, Sub};

use crate::error::{FgError, FgResult};
use crate::shiftquant::num_groups;
use crate::simd::{prefetch_block, Simd, SimdLevel};
use crate::threads::{self, Disjoint};

/// sqrt(pi / 2): makes mean|x - mean| match the standard deviation of a Gaussian.
pub const SQRT_HALF_PI: f64 = 1.253_314_137_315_500_3;
/// Lanes of the per-row accumulators (independent sums that vectorize).
const LANES: usize = 16;
/// Rows holding fewer elements than this in total run on the calling thread.
const PAR_MIN: usize = 1 << 15;

/// The float types the kernels run in (float32, and float64 for gradcheck).
pub trait Real:
    Copy + Send + Sync + Default + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self>
{
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn abs(self) -> Self;
    /// -1, 0 or 1 (0 at 0: the subgradient torch uses for |x|).
    fn sign(self) -> Self;
}

macro_rules! real {
    ($t:ty) => {
        impl Real for $t {
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline(always)]
            fn sign(self) -> Self {
                ((self > 0.0) as u8 as $t) - ((self < 0.0) as u8 as $t)
            }
        }
    };
}
real!(f32);
real!(f64);

/// Σ f(x_i) in LANES independent partial sums (they vectorize), then in f64.
#[inline(always)]
fn lane_sum<T: Real>(x: &[T], f: impl Fn(T) -> T) -> f64 {
    let mut acc = [T::default(); LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(0.0, |s, &v| s + f(v).to_f64());
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = *a + f(v);
        }
    }
    acc.iter().fold(tail, |s, &v| s + v.to_f64())
}

/// The optional elementwise affine parameters, each of length n.
#[derive(Clone, Copy)]
pub struct Affine<'a, T> {
    pub gamma: Option<&'a [T]>,
    pub beta: Option<&'a [T]>,
}

/// Per-row statistics saved by the forward: mean and r = 1 / (sqrt(pi/2) mean|d| + eps).
pub struct Stats<'a, T> {
    pub mean: &'a mut [T],
    pub rstd: &'a mut [T],
}

/// A row of ShiftQuant codes as the input of the codes path.
#[derive(Clone, Copy)]
pub struct CodesIn<'a> {
    pub codes: &'a [i8],
    pub scale: &'a [f32],
    pub shifts: &'a [u8],
    pub group_size: usize,
}

/// The affine parameters of a row, defaults filled in (ones / zeros) so the loops stay plain.
#[derive(Clone, Copy)]
pub struct Params<'a, T> {
    gamma: &'a [T],
    beta: &'a [T],
}

/// Elements per block of the loops that prefetch the next row (long enough to vectorize).
const BLOCK: usize = 256;

/// One row's forward; `next` (the next row, or empty) is prefetched while this row is written
/// from cache, so that its first pass does not wait on memory.
#[inline(always)]
fn forward_row<T: Real>(x: &[T], next: &[T], eps: f64, p: Params<'_, T>, y: &mut [T]) -> (T, T) {
    let n = x.len() as f64;
    // Summed relative to the first element: a constant row then sums exact zeros and its mean
    // is exact, so d = x - mean is 0 (f32 lane sums of the raw values left a rounding error
    // that the tiny mean|d| then magnified to O(1) outputs).
    let pivot = x.first().map_or(0.0, |v| v.to_f64());
    let shift = T::from_f64(pivot);
    let mean = T::from_f64(pivot + lane_sum(x, |v| v - shift) / n);
    let mean_abs = lane_sum(x, |v| (v - mean).abs()) / n;
    let r = T::from_f64(1.0 / (SQRT_HALF_PI * mean_abs + eps));
    let chunks = y
        .chunks_mut(BLOCK)
        .zip(x.chunks(BLOCK))
        .zip(p.gamma.chunks(BLOCK).zip(p.beta.chunks(BLOCK)));
    for (c, ((yc, xc), (gc, bc))) in chunks.enumerate() {
        prefetch_block(next, c * BLOCK, BLOCK);
        for (((o, &v), &g), &b) in yc.iter_mut().zip(xc).zip(gc).zip(bc) {
            *o = (v - mean) * r * g + b;
        }
    }
    (mean, r)
}

/// The codes path: statistics exact in integers. With v = q * 2^(15 - k) (the row in units of
/// scale * 2^-15), e = n v - Σv and E = Σ|e|: d = scale 2^-15 e / n, mean|d| = scale 2^-15 E / n².
#[inline(always)]
fn forward_codes_row(
    c: &CodesIn<'_>,
    row: usize,
    n: usize,
    eps: f64,
    p: Params<'_, f32>,
    y: &mut [f32],
    v: &mut Vec<i32>,
) -> (f32, f32) {
    let groups = num_groups(n, c.group_size);
    let codes = &c.codes[row * n..(row + 1) * n];
    let shifts = &c.shifts[row * groups..(row + 1) * groups];
    let scale = c.scale[row];
    let gs = c.group_size;
    let n = n as i64;
    v.clear();
    for (g, &k) in codes.chunks(gs).zip(shifts) {
        let up = 15 - u32::from(k);
        v.extend(g.iter().map(|&q| i32::from(q) << up));
    }
    let total: i64 = v.iter().map(|&q| i64::from(q)).sum();
    let abs_dev: i64 = v.iter().map(|&q| (n * i64::from(q) - total).abs()).sum();
    let unit = f64::from(scale) / 32768.0;
    let nf = n as f64;
    let mean = unit * total as f64 / nf;
    let r = 1.0 / (SQRT_HALF_PI * unit * abs_dev as f64 / (nf * nf) + eps);
    // d_i * r = e_i * (unit r / n), one rounding from the exact integer e_i.
    let step = unit * r / nf;
    for (i, o) in y.iter_mut().enumerate() {
        let d = ((n * i64::from(v[i]) - total) as f64 * step) as f32;
        *o = d * p.gamma[i] + p.beta[i];
    }
    (mean as f32, r as f32)
}

/// One row's backward; `next` holds the next row's x and dy (or empties), prefetched meanwhile.
#[inline(always)]
fn backward_row<T: Real>(
    x: &[T],
    next: (&[T], &[T]),
    (mean, r): (T, T),
    dy: &[T],
    gamma: &[T],
    grads: Grads<'_, T>,
) {
    let Grads { dx, dgamma, dbeta } = grads;
    let n = x.len() as f64;
    // Σ g, Σ g d and Σ sign(d) with g = dy * gamma and d = x - mean, in lanes.
    let mut acc = [[T::default(); LANES]; 3];
    let mut tail = [0.0f64; 3];
    let add = |acc: &mut [T; 3], (&xv, (&dv, &gv)): (&T, (&T, &T))| {
        let (d, g) = (xv - mean, dv * gv);
        acc[0] = acc[0] + g;
        acc[1] = acc[1] + g * d;
        acc[2] = acc[2] + d.sign();
    };
    let chunks = x
        .chunks_exact(LANES)
        .zip(dy.chunks_exact(LANES).zip(gamma.chunks_exact(LANES)));
    for (xc, (dc, gc)) in chunks {
        for j in 0..LANES {
            let mut lane = [acc[0][j], acc[1][j], acc[2][j]];
            add(&mut lane, (&xc[j], (&dc[j], &gc[j])));
            (acc[0][j], acc[1][j], acc[2][j]) = (lane[0], lane[1], lane[2]);
        }
    }
    let full = x.len() - x.len() % LANES;
    for e in x[full..].iter().zip(dy[full..].iter().zip(&gamma[full..])) {
        let mut lane = [T::default(); 3];
        add(&mut lane, e);
        tail.iter_mut()
            .zip(lane)
            .for_each(|(t, v)| *t += v.to_f64());
    }
    let sums: Vec<f64> = (0..3)
        .map(|i| acc[i].iter().fold(tail[i], |s, &v| s + v.to_f64()))
        .collect();
    let mean_g = T::from_f64(sums[0] / n);
    let mean_s = T::from_f64(sums[2] / n);
    // Σ g y^ = r Σ g d.
    let coef = T::from_f64(SQRT_HALF_PI / n * sums[1]) * r;
    // dx, dgamma and dbeta a block at a time from cache, prefetching the next row's x and dy.
    let (mut dgamma, mut dbeta) = (
        dgamma.map(|d| d.chunks_mut(BLOCK)),
        dbeta.map(|d| d.chunks_mut(BLOCK)),
    );
    let chunks = dx
        .chunks_mut(BLOCK)
        .zip(x.chunks(BLOCK))
        .zip(dy.chunks(BLOCK).zip(gamma.chunks(BLOCK)));
    for (c, ((dxc, xc), (dyc, gc))) in chunks.enumerate() {
        prefetch_block(next.0, c * BLOCK, BLOCK);
        prefetch_block(next.1, c * BLOCK, BLOCK);
        for (o, (&xv, (&dv, &gv))) in dxc.iter_mut().zip(xc.iter().zip(dyc.iter().zip(gc))) {
            *o = r * ((dv * gv - mean_g) - coef * ((xv - mean).sign() - mean_s));
        }
        if let Some(dg) = dgamma.as_mut().and_then(Iterator::next) {
            for (o, (&xv, &dv)) in dg.iter_mut().zip(xc.iter().zip(dyc)) {
                *o = *o + dv * (xv - mean) * r;
            }
        }
        if let Some(db) = dbeta.as_mut().and_then(Iterator::next) {
            db.iter_mut().zip(dyc).for_each(|(o, &v)| *o = *o + v);
        }
    }
}

/// The input of a forward or backward: floats, or (float32 only) ShiftQuant codes.
#[derive(Clone, Copy)]
pub enum Input<'a, T> {
    Floats(&'a [T]),
    Codes(CodesIn<'a>),
}

impl<T: Real> Input<'_, T> {
    /// Row r when the input holds floats and has that row, else empty (what is prefetched).
    #[inline(always)]
    fn floats_row(&self, r: usize, n: usize) -> &[T] {
        match self {
            Input::Floats(x) => x.get(r * n..(r + 1) * n).unwrap_or(&[]),
            Input::Codes(_) => &[],
        }
    }

    /// Row r as floats: borrowed, or dequantized into `buf`.
    #[inline(always)]
    fn row<'b>(&'b self, r: usize, n: usize, buf: &'b mut Vec<T>) -> &'b [T] {
        match self {
            Input::Floats(x) => &x[r * n..(r + 1) * n],
            Input::Codes(c) => {
                let groups = num_groups(n, c.group_size);
                let codes = &c.codes[r * n..(r + 1) * n];
                buf.clear();
                for (g, &k) in codes.chunks(c.group_size).zip(&c.shifts[r * groups..]) {
                    let step = c.scale[r] * f32::from_bits((127 - u32::from(k)) << 23);
                    buf.extend(
                        g.iter()
                            .map(|&q| T::from_f64(f64::from(f32::from(q) * step))),
                    );
                }
                buf
            }
        }
    }
}

/// The backward's outputs; dgamma / dbeta are accumulated into (callers pass zeros).
pub struct Grads<'a, T> {
    pub dx: &'a mut [T],
    pub dgamma: Option<&'a mut [T]>,
    pub dbeta: Option<&'a mut [T]>,
}

/// Rows [r0, r0 + y.len() / n) of the forward.
#[inline(always)]
#[allow(clippy::extra_unused_type_parameters)] // S picks the target features, via dispatch!
unsafe fn forward_impl<S: Simd, T: Real>(
    x: Input<'_, T>,
    r0: usize,
    n: usize,
    eps: f64,
    p: Params<'_, T>,
    y: &mut [T],
    stats: Stats<'_, T>,
) {
    let mut buf = Vec::new();
    let rows = y
        .chunks_exact_mut(n)
        .zip(stats.mean.iter_mut().zip(stats.rstd.iter_mut()));
    for (i, (yr, (m, r))) in rows.enumerate() {
        let next = x.floats_row(r0 + i + 1, n);
        (*m, *r) = forward_row(x.row(r0 + i, n, &mut buf), next, eps, p, yr);
    }
}

/// The codes forward (float32): integer statistics, rows [r0, r0 + y.len() / n).
#[inline(always)]
#[allow(clippy::extra_unused_type_parameters)] // S picks the target features, via dispatch!
unsafe fn forward_codes_impl<S: Simd>(
    c: CodesIn<'_>,
    r0: usize,
    n: usize,
    eps: f64,
    p: Params<'_, f32>,
    y: &mut [f32],
    stats: Stats<'_, f32>,
) {
    let mut v = Vec::with_capacity(n);
    let rows = y
        .chunks_exact_mut(n)
        .zip(stats.mean.iter_mut().zip(stats.rstd.iter_mut()));
    for (i, (yr, (m, r))) in rows.enumerate() {
        (*m, *r) = forward_codes_row(&c, r0 + i, n, eps, p, yr, &mut v);
    }
}

/// Rows [r0, r0 + dy.len() / n) of the backward.
#[inline(always)]
#[allow(clippy::extra_unused_type_parameters)]
unsafe fn backward_impl<S: Simd, T: Real>(
    x: Input<'_, T>,
    r0: usize,
    n: usize,
    stats: (&[T], &[T]),
    dy: &[T],
    gamma: &[T],
    grads: Grads<'_, T>,
) {
    let Grads {
        dx,
        mut dgamma,
        mut dbeta,
    } = grads;
    let mut buf = Vec::new();
    let rows = dy
        .chunks_exact(n)
        .zip(dx.chunks_exact_mut(n))
        .zip(stats.0.iter().zip(stats.1));
    for (i, ((dyr, dxr), (&m, &r))) in rows.enumerate() {
        let next = (
            x.floats_row(r0 + i + 1, n),
            dy.get((i + 1) * n..(i + 2) * n).unwrap_or(&[]),
        );
        let xr = x.row(r0 + i, n, &mut buf);
        let grads = Grads {
            dx: dxr,
            dgamma: dgamma.as_deref_mut(),
            dbeta: dbeta.as_deref_mut(),
        };
        backward_row(xr, next, (m, r), dyr, gamma, grads);
    }
}

crate::dispatch! {
    fn forward_f32(x: Input<'_, f32>, r0: usize, n: usize, eps: f64, p: Params<'_, f32>, y: &mut [f32], stats: Stats<'_, f32>) = forward_impl<f32>;
    fn forward_f64(x: Input<'_, f64>, r0: usize, n: usize, eps: f64, p: Params<'_, f64>, y: &mut [f64], stats: Stats<'_, f64>) = forward_impl<f64>;
    fn forward_codes(c: CodesIn<'_>, r0: usize, n: usize, eps: f64, p: Params<'_, f32>, y: &mut [f32], stats: Stats<'_, f32>) = forward_codes_impl;
    fn backward_f32(x: Input<'_, f32>, r0: usize, n: usize, stats: (&[f32], &[f32]), dy: &[f32], gamma: &[f32], grads: Grads<'_, f32>) = backward_impl<f32>;
    fn backward_f64(x: Input<'_, f64>, r0: usize, n: usize, stats: (&[f64], &[f64]), dy: &[f64], gamma: &[f64], grads: Grads<'_, f64>) = backward_impl<f64>;
}

/// The float types with dispatched kernels.
pub trait Kernels: Real {
    #[allow(clippy::too_many_arguments)]
    fn forward(
        level: SimdLevel,
        x: Input<'_, Self>,
        r0: usize,
        n: usize,
        eps: f64,
        p: Params<'_, Self>,
        y: &mut [Self],
        stats: Stats<'_, Self>,
    );
    #[allow(clippy::too_many_arguments)]
    fn backward(
        level: SimdLevel,
        x: Input<'_, Self>,
        r0: usize,
        n: usize,
        stats: (&[Self], &[Self]),
        dy: &[Self],
        gamma: &[Self],
        grads: Grads<'_, Self>,
    );
}

impl Kernels for f32 {
    fn forward(
        level: SimdLevel,
        x: Input<'_, f32>,
        r0: usize,
        n: usize,
        eps: f64,
        p: Params<'_, f32>,
        y: &mut [f32],
        stats: Stats<'_, f32>,
    ) {
        match x {
            Input::Codes(c) => forward_codes(level, c, r0, n, eps, p, y, stats),
            floats => forward_f32(level, floats, r0, n, eps, p, y, stats),
        }
    }
    fn backward(
        level: SimdLevel,
        x: Input<'_, f32>,
        r0: usize,
        n: usize,
        stats: (&[f32], &[f32]),
        dy: &[f32],
        gamma: &[f32],
        grads: Grads<'_, f32>,
    ) {
        backward_f32(level, x, r0, n, stats, dy, gamma, grads)
    }
}

impl Kernels for f64 {
    fn forward(
        level: SimdLevel,
        x: Input<'_, f64>,
        r0: usize,
        n: usize,
        eps: f64,
        p: Params<'_, f64>,
        y: &mut [f64],
        stats: Stats<'_, f64>,
    ) {
        forward_f64(level, x, r0, n, eps, p, y, stats)
    }
    fn backward(
        level: SimdLevel,
        x: Input<'_, f64>,
        r0: usize,
        n: usize,
        stats: (&[f64], &[f64]),
        dy: &[f64],
        gamma: &[f64],
        grads: Grads<'_, f64>,
    ) {
        backward_f64(level, x, r0, n, stats, dy, gamma, grads)
    }
}

/// Rows per parallel task: everything on the calling thread for small inputs, else one task per
/// thread (not `threads::rows_per_task`'s finer split: each backward task owns a partial
/// weight / bias gradient slot of n elements, so fewer tasks mean less to add up).
fn rows_per_task(rows: usize, n: usize) -> usize {
    let threads = threads::num_threads();
    if threads == 1 || rows * n < PAR_MIN {
        rows.max(1)
    } else {
        rows.div_ceil(threads)
    }
}

impl<T> Input<'_, T> {
    fn check(&self, op: &str, rows: usize, n: usize) -> FgResult<()> {
        let ok = match self {
            Input::Floats(x) => x.len() == rows * n,
            Input::Codes(c) => {
                c.group_size > 0
                    && c.codes.len() == rows * n
                    && c.scale.len() == rows
                    && c.shifts.len() == rows * num_groups(n, c.group_size)
                    && c.shifts.iter().all(|&k| k <= crate::shiftquant::MAX_SHIFT)
            }
        };
        if !ok {
            return Err(FgError::Value(format!(
                "{op}: x does not hold {rows} rows of {n}"
            )));
        }
        Ok(())
    }
}

fn check_len(op: &str, name: &str, got: usize, want: usize) -> FgResult<()> {
    if got != want {
        return Err(FgError::Value(format!(
            "{op}: {name} must hold {want} elements, got {got}"
        )));
    }
    Ok(())
}

/// L1 LayerNorm of `rows = y.len() / n` rows into `y`, saving per-row mean and rstd.
pub fn forward<T: Kernels>(
    level: SimdLevel,
    x: Input<'_, T>,
    n: usize,
    eps: f64,
    affine: Affine<'_, T>,
    y: &mut [T],
    stats: Stats<'_, T>,
) -> FgResult<()> {
    let op = "l1_layer_norm";
    if n == 0 {
        return Err(FgError::Value(format!(
            "{op}: the normalized size must be at least 1"
        )));
    }
    let rows = stats.mean.len();
    x.check(op, rows, n)?;
    check_len(op, "out", y.len(), rows * n)?;
    check_len(op, "rstd", stats.rstd.len(), rows)?;
    for (name, p) in [("weight", affine.gamma), ("bias", affine.beta)] {
        check_len(op, name, p.map_or(n, <[T]>::len), n)?;
    }
    let (ones, zeros) = (vec![T::from_f64(1.0); n], vec![T::default(); n]);
    let p = Params {
        gamma: affine.gamma.unwrap_or(&ones),
        beta: affine.beta.unwrap_or(&zeros),
    };
    let (y, mean, rstd) = (
        Disjoint::new(y),
        Disjoint::new(stats.mean),
        Disjoint::new(stats.rstd),
    );
    threads::for_each_chunk(rows, rows_per_task(rows, n), |_, r| {
        // SAFETY: chunks are disjoint row ranges.
        let (y, stats) = unsafe {
            let stats = Stats {
                mean: mean.piece(r.clone()),
                rstd: rstd.piece(r.clone()),
            };
            (y.piece(r.start * n..r.end * n), stats)
        };
        T::forward(level, x, r.start, n, eps, p, y, stats)
    });
    Ok(())
}

/// The input gradient into `grads.dx`; weight / bias gradients (summed over rows) into
/// `grads.dgamma` / `grads.dbeta` when given (overwritten).
pub fn backward<T: Kernels>(
    level: SimdLevel,
    x: Input<'_, T>,
    n: usize,
    stats: (&[T], &[T]),
    dy: &[T],
    gamma: Option<&[T]>,
    grads: Grads<'_, T>,
) -> FgResult<()> {
    let op = "l1_layer_norm_backward";
    let rows = stats.0.len();
    if n == 0 {
        return Err(FgError::Value(format!(
            "{op}: the normalized size must be at least 1"
        )));
    }
    x.check(op, rows, n)?;
    check_len(op, "rstd", stats.1.len(), rows)?;
    check_len(op, "grad_out", dy.len(), rows * n)?;
    check_len(op, "grad_in", grads.dx.len(), rows * n)?;
    check_len(op, "weight", gamma.map_or(n, <[T]>::len), n)?;
    for (name, g) in [("grad_weight", &grads.dgamma), ("grad_bias", &grads.dbeta)] {
        check_len(op, name, g.as_ref().map_or(n, |g| g.len()), n)?;
    }
    let ones = vec![T::from_f64(1.0); if gamma.is_none() { n } else { 0 }];
    let gamma = gamma.unwrap_or(&ones);
    let chunk = rows_per_task(rows, n);
    let tasks = rows.div_ceil(chunk).max(1);
    // Each task sums its rows' weight / bias gradients into its own slot; slots add up last.
    let (want_g, want_b) = (grads.dgamma.is_some(), grads.dbeta.is_some());
    let mut partial_g = vec![T::default(); if want_g { tasks * n } else { 0 }];
    let mut partial_b = vec![T::default(); if want_b { tasks * n } else { 0 }];
    let (dx, pg, pb) = (
        Disjoint::new(grads.dx),
        Disjoint::new(&mut partial_g),
        Disjoint::new(&mut partial_b),
    );
    threads::for_each_chunk(rows, chunk, |t, r| {
        // SAFETY: chunks are disjoint row ranges, and task t alone owns slot t.
        let slot = t * n..(t + 1) * n;
        let (dgamma, dbeta) = unsafe {
            (
                want_g.then(|| pg.piece(slot.clone())),
                want_b.then(|| pb.piece(slot)),
            )
        };
        let dx = unsafe { dx.piece(r.start * n..r.end * n) };
        let stats = (&stats.0[r.clone()], &stats.1[r.clone()]);
        let dy = &dy[r.start * n..r.end * n];
        T::backward(
            level,
            x,
            r.start,
            n,
            stats,
            dy,
            gamma,
            Grads { dx, dgamma, dbeta },
        )
    });
    for (out, partial) in [(grads.dgamma, partial_g), (grads.dbeta, partial_b)] {
        if let Some(out) = out {
            out.fill(T::default());
            for slot in partial.chunks(n) {
                out.iter_mut().zip(slot).for_each(|(o, &p)| *o = *o + p);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f64> {
        let mut rng = crate::rng::SplitMix64::new(seed);
        (0..n)
            .map(|_| (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 1.5)
            .collect()
    }

    /// The definition, plainly, in f64.
    fn reference(x: &[f64], n: usize, eps: f64, gamma: &[f64], beta: &[f64]) -> Vec<f64> {
        x.chunks(n)
            .flat_map(|row| {
                let mean = row.iter().sum::<f64>() / n as f64;
                let mad = row.iter().map(|v| (v - mean).abs()).sum::<f64>() / n as f64;
                let denom = SQRT_HALF_PI * mad + eps;
                row.iter()
                    .enumerate()
                    .map(move |(i, v)| (v - mean) / denom * gamma[i] + beta[i])
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn forward_matches_the_definition_and_backward_matches_finite_differences() {
        let (rows, n, eps) = (3, 37, 1e-5);
        let x = data(rows * n, 1);
        let gamma = data(n, 2);
        let beta = data(n, 3);
        let dy = data(rows * n, 4);
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            let affine = Affine {
                gamma: Some(&gamma[..]),
                beta: Some(&beta[..]),
            };
            let run = |x: &[f64]| {
                let mut y = vec![0.0; rows * n];
                let (mut mean, mut rstd) = (vec![0.0; rows], vec![0.0; rows]);
                forward(
                    level,
                    Input::Floats(x),
                    n,
                    eps,
                    affine,
                    &mut y,
                    Stats {
                        mean: &mut mean,
                        rstd: &mut rstd,
                    },
                )
                .unwrap();
                (y, mean, rstd)
            };
            let (y, mean, rstd) = run(&x);
            for (a, b) in y.iter().zip(reference(&x, n, eps, &gamma, &beta)) {
                assert!((a - b).abs() < 1e-12, "{a} {b}");
            }
            let mut dx = vec![0.0; rows * n];
            let (mut dg, mut db) = (vec![0.0; n], vec![0.0; n]);
            let grads = Grads {
                dx: &mut dx,
                dgamma: Some(&mut dg),
                dbeta: Some(&mut db),
            };
            backward(
                level,
                Input::Floats(&x),
                n,
                (&mean, &rstd),
                &dy,
                Some(&gamma),
                grads,
            )
            .unwrap();
            let loss = |x: &[f64]| run(x).0.iter().zip(&dy).map(|(a, b)| a * b).sum::<f64>();
            for i in [0, 5, n + 3, rows * n - 1] {
                let h = 1e-6;
                let (mut xp, mut xm) = (x.clone(), x.clone());
                xp[i] += h;
                xm[i] -= h;
                let fd = (loss(&xp) - loss(&xm)) / (2.0 * h);
                assert!(
                    (fd - dx[i]).abs() < 1e-6,
                    "{level:?} dx[{i}] {} vs {fd}",
                    dx[i]
                );
            }
            let want_db: f64 = (0..rows).map(|r| dy[r * n + 2]).sum();
            assert!((db[2] - want_db).abs() < 1e-12);
        }
    }

    #[test]
    fn codes_forward_matches_the_float_forward_of_the_dequantized_input() {
        use crate::shiftquant::{dequantize, quantize_rows, Codes, Rounding, Spec};
        let (rows, n, gs) = (4, 100, 16);
        let x: Vec<f32> = data(rows * n, 5).iter().map(|&v| v as f32).collect();
        let spec = Spec::new("t", 6, gs, Rounding::Nearest).unwrap();
        let (mut codes, mut scale, mut shifts) = (
            vec![0i8; rows * n],
            vec![0f32; rows],
            vec![0u8; rows * num_groups(n, gs)],
        );
        let level = crate::simd::detected();
        quantize_rows(
            level,
            &x,
            n,
            &spec,
            Codes {
                codes: &mut codes,
                scale: &mut scale,
                shifts: &mut shifts,
            },
        )
        .unwrap();
        let mut xd = vec![0f32; rows * n];
        dequantize(level, &codes, &scale, &shifts, gs, &mut xd).unwrap();
        let c = CodesIn {
            codes: &codes,
            scale: &scale,
            shifts: &shifts,
            group_size: gs,
        };
        let none = Affine {
            gamma: None,
            beta: None,
        };
        let run = |x: Input<'_, f32>| {
            let mut y = vec![0f32; rows * n];
            let (mut mean, mut rstd) = (vec![0f32; rows], vec![0f32; rows]);
            forward(
                level,
                x,
                n,
                1e-5,
                none,
                &mut y,
                Stats {
                    mean: &mut mean,
                    rstd: &mut rstd,
                },
            )
            .unwrap();
            y
        };
        for (a, b) in run(Input::Codes(c)).iter().zip(run(Input::Floats(&xd))) {
            assert!((a - b).abs() < 1e-5, "{a} {b}");
        }
    }
}
