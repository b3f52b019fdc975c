//! L1 LayerNorm and L1 RMSNorm (docs/definitions.md) over rows of length n:
//! LayerNorm y = (x - mean) / (sqrt(pi/2) * mean|x - mean| + eps) * gamma + beta,
//! RMSNorm   y = x / (sqrt(pi/2) * mean|x| + eps) * gamma.
//! No square root in the statistics, so the LayerNorm's can be computed exactly in integers
//! straight from ShiftQuant codes (`forward_codes`).
//!
//! Rows are stored as float32, bfloat16 or float16 ([`Storage`]) and computed in f32: 16-bit
//! values are widened in registers as they are read and rounded as they are written, so a
//! 16-bit call moves 16-bit bytes only. A row is read from memory once: the statistics passes
//! and the output pass run over it while it sits in L1/L2, the next row being prefetched
//! meanwhile (docs/l1norm.md has the measurements).
//!
//! The forward saves, per row, the mean (0 for RMSNorm) and r = 1 / (sqrt(pi/2) * mean|d| + eps)
//! as f32; the backward reads x and dy once per row and, with d = x - mean, g = dy * gamma,
//! y^ = d * r and s = sign(d), writes dx = r * ((g - mean g) - sqrt(pi/2) / n * (sum g y^) *
//! (s - mean s)) (RMSNorm: the means dropped) and adds dy y^ and dy into per-task weight and bias
//! gradient slots, summed at the end.

use crate::error::{FgError, FgResult};
use crate::shiftquant::num_groups;
use crate::simd::{prefetch_block, Simd, SimdLevel};
use crate::simd::{Bf16, Storage, F16};
use crate::threads::{self, Disjoint};

/// sqrt(pi / 2): makes mean|x - mean| match the standard deviation of a Gaussian.
pub const SQRT_HALF_PI: f64 = 1.253_314_137_315_500_3;
/// Elements summed in f32 lanes before folding into f64 (bounds rounding growth on long rows).
const FOLD: usize = 1024;
/// Elements per block of the loops that prefetch the next row (long enough to vectorize).
const BLOCK: usize = 256;
/// Inputs of at least this many bytes (x in the forward; x and dy in a float32 backward) are
/// taken to come from memory, and each row prefetches the next while it is computed. Smaller
/// ones stay in L2 / L3 between a model's ops, where the prefetch instructions only cost. Zen 4
/// (family 25 model 17), one thread, kernels alone, without / with the prefetch: float32 rows
/// of 512-2048 from 1 to 8 MiB forward 1.1-1.4x, backward 1.1-1.3x; [2048, 4096] bfloat16
/// (16 MiB) 0.8x both ways. A 16-bit backward prefetches at every size: its rows are widened
/// to float32 first, and that pass gained from the prefetch from 4 MiB on (docs/l1norm.md).
const STREAM_BYTES: usize = 16 << 20;

/// Jobs of fewer elements run on the calling thread; parallel tasks hold about this many.
const PAR_MIN: usize = 1 << 15;
/// Most forward tasks per thread: many short tasks, so that a thread slow to wake (a loaded
/// machine) just takes fewer of them.
const FORWARD_TASKS_PER_THREAD: usize = 64;
/// Most backward tasks per thread: each owns weight / bias gradient slots of n floats that are
/// summed at the end, so fewer, but more than one for the same reason.
const BACKWARD_TASKS_PER_THREAD: usize = 4;

/// Which norm a kernel computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    /// L1 LayerNorm: subtracts the row mean, optional bias.
    Layer,
    /// L1 RMSNorm: no mean, no bias.
    Rms,
}

/// Independent vector accumulators of a sum (ACC chains, so adds do not wait on each other).
const ACC: usize = 4;

/// A sum over f32 vectors in ACC accumulators, folded into f64 every FOLD elements (bounds
/// rounding growth on long rows).
struct VecSum<S: Simd> {
    acc: [S::V; ACC],
    total: f64,
}

impl<S: Simd> VecSum<S> {
    #[inline(always)]
    unsafe fn new() -> Self {
        VecSum {
            acc: [S::splat(0.0); ACC],
            total: 0.0,
        }
    }

    /// The accumulators' lanes added into `total` in f64, and cleared. In vector registers: on
    /// rows of 128 the lanes added one by one in scalar f64 (a chain of 16 dependent adds per
    /// sum) were about a sixth of the forward's and of the backward's time.
    #[inline(always)]
    unsafe fn fold(&mut self) {
        let v = self.acc[1..].iter().fold(self.acc[0], |s, &a| S::add(s, a));
        self.total += S::sum_f64(v);
        self.acc = [S::splat(0.0); ACC];
    }

    /// Σ f(x_i); the lanes past the end of `x` are loaded as `fill`, which f must map to 0.
    /// 16-bit rows are widened a fold block at a time into `buf` (FOLD floats, 4 KiB: stays in
    /// L1, where a widened copy of the whole row, 16 KiB at n = 4096, pushed the rows the
    /// passes read out of it); f32 rows are read where they lie.
    #[inline(always)]
    unsafe fn sum<E: Storage>(
        x: &[E],
        buf: &mut [f32],
        fill: f32,
        f: impl Fn(S::V) -> S::V,
    ) -> f64 {
        let mut s = Self::new();
        for block in x.chunks(FOLD) {
            let block = widened(block, buf);
            let (p, len) = (block.as_ptr(), block.len());
            let mut i = 0;
            while i + ACC * S::LANES <= len {
                for k in 0..ACC {
                    s.acc[k] = S::add(s.acc[k], f(S::load(p.add(i + k * S::LANES))));
                }
                i += ACC * S::LANES;
            }
            while i + S::LANES <= len {
                s.acc[0] = S::add(s.acc[0], f(S::load(p.add(i))));
                i += S::LANES;
            }
            if i < len {
                s.acc[1] = S::add(s.acc[1], f(S::load_partial(p.add(i), len - i, fill)));
            }
            s.fold();
        }
        s.total
    }
}

/// `x` as f32: borrowed when `E` is f32, else widened into the front of `buf` (at least as
/// long as `x`).
#[inline(always)]
fn widened<'b, E: Storage>(x: &'b [E], buf: &'b mut [f32]) -> &'b [f32] {
    if E::IS_F32 {
        // SAFETY: E is f32 (only f32's Storage impl sets IS_F32).
        unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), x.len()) }
    } else {
        let buf = &mut buf[..x.len()];
        for (o, v) in buf.iter_mut().zip(x) {
            *o = v.to_f32();
        }
        buf
    }
}

/// The optional elementwise affine parameters (float32), each of length n.
#[derive(Clone, Copy)]
pub struct Affine<'a> {
    pub gamma: Option<&'a [f32]>,
    pub beta: Option<&'a [f32]>,
}

/// The affine parameters of a row, defaults filled in (ones / zeros) so the loops stay plain.
#[derive(Clone, Copy)]
struct Params<'a> {
    gamma: &'a [f32],
    beta: &'a [f32],
}

/// Per-row statistics saved by the forward: mean (LayerNorm only) and r.
pub struct Stats<'a> {
    pub mean: Option<&'a mut [f32]>,
    pub rstd: &'a mut [f32],
}

/// A row of ShiftQuant codes as the input of the codes path.
#[derive(Clone, Copy)]
pub struct CodesIn<'a> {
    pub codes: &'a [i8],
    pub scale: &'a [f32],
    pub shifts: &'a [u8],
    pub group_size: usize,
}

/// One row's forward: two statistics passes and the output pass over the row from cache;
/// `next` (the next row, or empty) is prefetched while this row is written. `x` is the row as
/// stored (16-bit rows longer than `buf`: the statistics widen a fold block at a time into
/// `buf`, the output pass in registers) or widened to f32 whole (rows that fit `buf`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn forward_row<S: Simd, X: Storage, E: Storage>(
    norm: Norm,
    x: &[X],
    buf: &mut [f32],
    next: &[E],
    eps: f64,
    p: Params<'_>,
    y: &mut [E],
) -> (f32, f32) {
    let n = x.len() as f64;
    let mean = match norm {
        // Summed relative to the first element: a constant row then sums exact zeros and its
        // mean is exact, so d = x - mean is 0 (raw f32 sums left a rounding error that the tiny
        // mean|d| then magnified to O(1) outputs).
        Norm::Layer => {
            let pivot = x.first().map_or(0.0, |v| v.to_f32());
            let shift = S::splat(pivot);
            (f64::from(pivot) + VecSum::<S>::sum(x, buf, pivot, |v| S::sub(v, shift)) / n) as f32
        }
        Norm::Rms => 0.0,
    };
    let m = S::splat(mean);
    let mean_abs = VecSum::<S>::sum(x, buf, mean, |v| S::abs(S::sub(v, m))) / n;
    if !(mean.is_finite() && mean_abs.is_finite()) {
        return forward_row_f64(norm, x, eps, p, y);
    }
    let r = (1.0 / (SQRT_HALF_PI * mean_abs + eps)) as f32;
    let chunks = y
        .chunks_mut(BLOCK)
        .zip(x.chunks(BLOCK))
        .zip(p.gamma.chunks(BLOCK).zip(p.beta.chunks(BLOCK)));
    for (c, ((yc, xc), (gc, bc))) in chunks.enumerate() {
        prefetch_block(next, c * BLOCK, BLOCK);
        match norm {
            Norm::Layer => {
                for (((o, &v), &g), &b) in yc.iter_mut().zip(xc).zip(gc).zip(bc) {
                    *o = E::from_f32((v.to_f32() - mean) * r * g + b);
                }
            }
            Norm::Rms => {
                for ((o, &v), &g) in yc.iter_mut().zip(xc).zip(gc) {
                    *o = E::from_f32(v.to_f32() * r * g);
                }
            }
        }
    }
    (mean, r)
}

/// A row whose f32 sums overflowed (|x| near f32::MAX: x - mean, or the lanes' sums, past
/// f32's range) or that holds inf / NaN: the same rule in f64, scalar. Finite rows keep their
/// finite answer; inf and NaN propagate as in the f64 reference.
#[cold]
fn forward_row_f64<X: Storage, E: Storage>(
    norm: Norm,
    x: &[X],
    eps: f64,
    p: Params<'_>,
    y: &mut [E],
) -> (f32, f32) {
    let n = x.len() as f64;
    let x64 = |v: &X| f64::from(v.to_f32());
    let mean = match norm {
        Norm::Layer => x.iter().map(x64).sum::<f64>() / n,
        Norm::Rms => 0.0,
    };
    let mean_abs = x.iter().map(|v| (x64(v) - mean).abs()).sum::<f64>() / n;
    let r = 1.0 / (SQRT_HALF_PI * mean_abs + eps);
    for (((o, v), &g), &b) in y.iter_mut().zip(x).zip(p.gamma).zip(p.beta) {
        let out = (x64(v) - mean) * r * f64::from(g);
        // RMSNorm has no bias: adding its zero would turn a -0 into +0 (`forward_row` keeps -0).
        let out = if norm == Norm::Layer {
            out + f64::from(b)
        } else {
            out
        };
        *o = E::from_f32(out as f32);
    }
    (mean as f32, r as f32)
}

/// The codes path: statistics exact in integers. With v = q * 2^(15 - k) (the row in units of
/// scale * 2^-15), e = n v - Σv and E = Σ|e|: d = scale 2^-15 e / n, mean|d| = scale 2^-15 E / n².
#[inline(always)]
fn forward_codes_row(
    c: &CodesIn<'_>,
    row: usize,
    n: usize,
    eps: f64,
    p: Params<'_>,
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

/// Row `r` of the codes, dequantized into `buf`.
fn dequantize_row<'b>(c: &CodesIn<'_>, r: usize, n: usize, buf: &'b mut Vec<f32>) -> &'b [f32] {
    let groups = num_groups(n, c.group_size);
    let codes = &c.codes[r * n..(r + 1) * n];
    buf.clear();
    for (g, &k) in codes.chunks(c.group_size).zip(&c.shifts[r * groups..]) {
        let step = c.scale[r] * f32::from_bits((127 - u32::from(k)) << 23);
        buf.extend(g.iter().map(|&q| f32::from(q) * step));
    }
    buf
}

/// A row's weight / bias gradient accumulators (this task's slots), when asked for.
struct ParamGrads<'a> {
    dgamma: Option<&'a mut [f32]>,
    dbeta: Option<&'a mut [f32]>,
}

/// One row's backward (`x`, `dy` widened to f32); `next` holds the next row's x, dy and dx (or
/// empties), prefetched meanwhile.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn backward_row<S: Simd, E: Storage>(
    norm: Norm,
    x: &[f32],
    next: (&[E], &[E], &[E]),
    (mean, r): (f32, f32),
    dy: &[f32],
    gamma: &[f32],
    dx: &mut [E],
    pg: &mut ParamGrads<'_>,
) {
    let n = x.len() as f64;
    // mean|d| = (1 / r - eps) / sqrt(pi / 2), so max |d| <= n / (sqrt(pi / 2) r): past 2^120
    // some d = x - mean (or a product with it) may leave f32's range.
    let limit = 2f64.powi(120) * (SQRT_HALF_PI * f64::from(r));
    if limit.is_nan() || n >= limit {
        return backward_row_f64(norm, x, (mean, r), dy, gamma, dx, pg);
    }
    // Σ g, Σ g d and Σ sign(d) with g = dy * gamma and d = x - mean, in vector lanes folded into
    // f64 (the sign counts exactly: at most FOLD / LANES per lane between folds); RMSNorm needs
    // only Σ g d.
    let sums = match norm {
        Norm::Layer => grad_sums::<S, true>(x, dy, gamma, mean),
        Norm::Rms => grad_sums::<S, false>(x, dy, gamma, mean),
    };
    if !(sums[0].is_finite() && sums[1].is_finite()) {
        return backward_row_f64(norm, x, (mean, r), dy, gamma, dx, pg);
    }
    let inv_n = 1.0 / n;
    let (mean_g, mean_s) = match norm {
        Norm::Layer => ((sums[0] * inv_n) as f32, (sums[2] * inv_n) as f32),
        Norm::Rms => (0.0, 0.0),
    };
    // Σ g y^ = r Σ g d.
    let coef = (SQRT_HALF_PI * inv_n * sums[1]) as f32 * r;
    // dx = r (g - mean g) - r coef (s - mean s) = r g + c0 - c1 s, s = sign(d).
    let (c1, c0) = (r * coef, r * (coef * mean_s - mean_g));
    let k = Pass2 { mean, r, c0, c1 };
    // One loop for dx, dgamma and dbeta, specialized on which of the last two are wanted.
    match (pg.dgamma.as_deref_mut(), pg.dbeta.as_deref_mut()) {
        (Some(dg), Some(db)) => k.run::<E, true, true>(x, next, dy, gamma, dx, dg, db),
        (Some(dg), None) => k.run::<E, true, false>(x, next, dy, gamma, dx, dg, &mut []),
        (None, Some(db)) => k.run::<E, false, true>(x, next, dy, gamma, dx, &mut [], db),
        (None, None) => k.run::<E, false, false>(x, next, dy, gamma, dx, &mut [], &mut []),
    }
}

/// How much of the next row of dx a backward row prefetches: all of it when the weight or bias
/// gradient is summed, else none. The slots' stores hit L1 but retire in order behind dx's,
/// which miss it (fresh memory): without the prefetch they filled the store buffer and stalled
/// the loop on the slot loads (perf: a third of the backward on them). Xeon family 6 model
/// 207, float32, with the prefetch: [1024, 512] 1.12-1.38x, [4096, 512] 1.18-1.64x, [256,
/// 4096] 1.06-1.13x (1 and 2 threads); bfloat16 unchanged (half the lines); without the slots
/// 0.92-1.0x, so it is left out there.
fn prefetch_dx(pg: &ParamGrads<'_>, n: usize) -> usize {
    if pg.dgamma.is_some() || pg.dbeta.is_some() {
        n
    } else {
        0
    }
}

/// The backward's first pass over a row: [Σ g, Σ g d, Σ sign(d)] (g = dy gamma, d = x - mean),
/// the first and last only with `LAYER` (0 without: RMSNorm's formula has no use for them).
#[inline(always)]
unsafe fn grad_sums<S: Simd, const LAYER: bool>(
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    mean: f32,
) -> [f64; 3] {
    let mut sums = [VecSum::<S>::new(), VecSum::<S>::new(), VecSum::<S>::new()];
    for ((xb, db), gb) in x.chunks(FOLD).zip(dy.chunks(FOLD)).zip(gamma.chunks(FOLD)) {
        let (len, rows) = (xb.len(), (xb.as_ptr(), db.as_ptr(), gb.as_ptr()));
        let mut i = 0;
        while i + 2 * S::LANES <= len {
            grad_sums_step::<S, LAYER>(&mut sums, rows, mean, i, 0, S::LANES);
            grad_sums_step::<S, LAYER>(&mut sums, rows, mean, i + S::LANES, 1, S::LANES);
            i += 2 * S::LANES;
        }
        while i < len {
            grad_sums_step::<S, LAYER>(&mut sums, rows, mean, i, 0, len - i);
            i += S::LANES;
        }
        sums.iter_mut().for_each(|s| s.fold());
    }
    sums.map(|s| s.total)
}

/// The backward's first pass, one vector: lanes `i..i + min(rest, LANES)` of the row's x, dy and
/// gamma (`rows`) into accumulators `k` of Σ g d and, with `LAYER`, Σ g and Σ sign(d) (g = dy
/// gamma, d = x - mean); padding lanes add 0. A named always-inlined function, not a closure: a
/// closure is not compiled with the kernel's target features, and its `Simd` calls stayed
/// out-of-line calls.
#[inline(always)]
unsafe fn grad_sums_step<S: Simd, const LAYER: bool>(
    [sg, sgd, ss]: &mut [VecSum<S>; 3],
    (px, pd, pgm): (*const f32, *const f32, *const f32),
    mean: f32,
    i: usize,
    k: usize,
    rest: usize,
) {
    let (xv, dv, gv) = if rest >= S::LANES {
        (S::load(px.add(i)), S::load(pd.add(i)), S::load(pgm.add(i)))
    } else {
        (
            S::load_partial(px.add(i), rest, mean),
            S::load_partial(pd.add(i), rest, 0.0),
            S::load_partial(pgm.add(i), rest, 0.0),
        )
    };
    let g = S::mul(dv, gv);
    let d = S::sub(xv, S::splat(mean));
    sgd.acc[k] = S::add(sgd.acc[k], S::mul(g, d));
    if !LAYER {
        return;
    }
    sg.acc[k] = S::add(sg.acc[k], g);
    // sign(d): every nonzero f32 times 2^200 is at least 2^51 in magnitude (or infinite), so
    // the clamp gives exactly -1, 0 or 1.
    let big = S::splat(2f32.powi(100));
    let sign = S::min(
        S::max(S::mul(S::mul(d, big), big), S::splat(-1.0)),
        S::splat(1.0),
    );
    ss.acc[k] = S::add(ss.acc[k], sign);
}

/// A row's backward in f64, scalar (rows where the f32 passes could overflow, or whose sums are
/// not finite): the formulas of [`backward_row`].
#[cold]
fn backward_row_f64<E: Storage>(
    norm: Norm,
    x: &[f32],
    (mean, r): (f32, f32),
    dy: &[f32],
    gamma: &[f32],
    dx: &mut [E],
    pg: &mut ParamGrads<'_>,
) {
    let (n, mean, r) = (x.len() as f64, f64::from(mean), f64::from(r));
    let d = |i: usize| f64::from(x[i]) - mean;
    let g = |i: usize| f64::from(dy[i]) * f64::from(gamma[i]);
    let sign = |v: f64| f64::from(i8::from(v > 0.0) - i8::from(v < 0.0));
    let (mut sg, mut sgd, mut ss) = (0.0, 0.0, 0.0);
    for i in 0..x.len() {
        sg += g(i);
        sgd += g(i) * d(i);
        ss += sign(d(i));
    }
    let (mean_g, mean_s) = match norm {
        Norm::Layer => (sg / n, ss / n),
        Norm::Rms => (0.0, 0.0),
    };
    let coef = SQRT_HALF_PI / n * sgd * r;
    for i in 0..x.len() {
        dx[i] = E::from_f32((r * (g(i) - mean_g) - r * coef * (sign(d(i)) - mean_s)) as f32);
        if let Some(dg) = pg.dgamma.as_deref_mut() {
            dg[i] += (f64::from(dy[i]) * d(i) * r) as f32;
        }
        if let Some(db) = pg.dbeta.as_deref_mut() {
            db[i] += dy[i];
        }
    }
}

/// The backward's second pass over a row (from cache), with the row's constants.
struct Pass2 {
    mean: f32,
    r: f32,
    c0: f32,
    c1: f32,
}

impl Pass2 {
    /// dx, and (when `G` / `B`) dy y^ into `dg` and dy into `db`, a block at a time,
    /// prefetching the next row's x and dy.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn run<E: Storage, const G: bool, const B: bool>(
        &self,
        x: &[f32],
        next: (&[E], &[E], &[E]),
        dy: &[f32],
        gamma: &[f32],
        dx: &mut [E],
        dg: &mut [f32],
        db: &mut [f32],
    ) {
        let Pass2 { mean, r, c0, c1 } = *self;
        let n = x.len();
        let (dy, gamma, dx) = (&dy[..n], &gamma[..n], &mut dx[..n]);
        let (dg, db) = (
            &mut dg[..if G { n } else { 0 }],
            &mut db[..if B { n } else { 0 }],
        );
        for start in (0..n).step_by(BLOCK) {
            prefetch_block(next.0, start, BLOCK);
            prefetch_block(next.1, start, BLOCK);
            prefetch_block(next.2, start, BLOCK);
            for i in start..(start + BLOCK).min(n) {
                let (d, dv) = (x[i] - mean, dy[i]);
                dx[i] = E::from_f32(r * (dv * gamma[i]) + c0 - signed(d, c1));
                if G {
                    dg[i] += dv * d * r;
                }
                if B {
                    db[i] += dv;
                }
            }
        }
    }
}

/// sign(v) * c: c, -c or 0 (0 at 0: the subgradient torch uses for |x|); selects, which
/// vectorize.
#[inline(always)]
fn signed(v: f32, c: f32) -> f32 {
    if v > 0.0 {
        c
    } else if v < 0.0 {
        -c
    } else {
        0.0
    }
}

/// A forward job: whole rows of x into y and the statistics.
pub struct ForwardJob<'a, E> {
    norm: Norm,
    x: &'a [E],
    /// Whether each row prefetches the next ([`STREAM_BYTES`]).
    ahead: bool,
    n: usize,
    eps: f64,
    params: Params<'a>,
    y: &'a mut [E],
    stats: Stats<'a>,
}

/// A backward job over whole rows; `pg` are this task's weight / bias gradient slots.
pub struct BackwardJob<'a, E> {
    norm: Norm,
    x: &'a [E],
    /// Whether each row prefetches the next row's x and dy ([`STREAM_BYTES`]).
    ahead: bool,
    n: usize,
    stats: (Option<&'a [f32]>, &'a [f32]),
    dy: &'a [E],
    gamma: &'a [f32],
    dx: &'a mut [E],
    pg: ParamGrads<'a>,
}

#[inline(always)]
#[allow(clippy::extra_unused_type_parameters)] // S picks the target features, via dispatch!
unsafe fn forward_impl<S: Simd, E: Storage>(job: ForwardJob<'_, E>) {
    let ForwardJob {
        norm,
        x,
        ahead,
        n,
        eps,
        params,
        y,
        stats,
    } = job;
    let mut mean = stats.mean;
    // 16-bit rows are widened whole, once, and every pass reads the copy, except RMSNorm rows
    // longer than FOLD: their one statistics pass widens a fold block at a time and the output
    // pass converts in registers. Zen 4, bf16, one thread: RMSNorm rows of 4096 widened whole
    // ran 5-10% slower (the 16 KiB copy, gamma and the rows passed L1), rows of 512-1024 read
    // as stored 5-7% slower (a conversion per element in each pass); LayerNorm's two
    // statistics passes made rows of 4096 read as stored 7% slower.
    let whole = !E::IS_F32 && (n <= FOLD || norm == Norm::Layer);
    let len = if whole {
        n
    } else if E::IS_F32 {
        0
    } else {
        FOLD
    };
    let mut buf = vec![0f32; len];
    for (i, (yr, r)) in y.chunks_exact_mut(n).zip(stats.rstd.iter_mut()).enumerate() {
        let after = if ahead {
            (i + 1) * n..(i + 2) * n
        } else {
            0..0
        };
        let next = x.get(after).unwrap_or(&[]);
        let xr = &x[i * n..(i + 1) * n];
        let (m, rr) = if whole {
            let xw = widened(xr, &mut buf);
            forward_row::<S, f32, E>(norm, xw, &mut [], next, eps, params, yr)
        } else {
            forward_row::<S, E, E>(norm, xr, &mut buf, next, eps, params, yr)
        };
        if let Some(mean) = mean.as_deref_mut() {
            mean[i] = m;
        }
        *r = rr;
    }
}

#[inline(always)]
#[allow(clippy::extra_unused_type_parameters)] // S picks the target features, via dispatch!
unsafe fn backward_impl<S: Simd, E: Storage>(job: BackwardJob<'_, E>) {
    let BackwardJob {
        norm,
        x,
        ahead,
        n,
        stats,
        dy,
        gamma,
        dx,
        mut pg,
    } = job;
    // Rows of x and dy widened to f32 (one pass each; they then stay in cache for the passes).
    let cap = if E::IS_F32 { 0 } else { n };
    let (mut xbuf, mut dybuf) = (vec![0f32; cap], vec![0f32; cap]);
    let dx_ahead = prefetch_dx(&pg, n);
    let mut rest = dx;
    for (i, &r) in stats.1.iter().enumerate() {
        let (dxr, after) = rest.split_at_mut(n);
        rest = after;
        let mean = stats.0.map_or(0.0, |m| m[i]);
        let span = |t: usize| t * n..(t + 1) * n;
        // The next row's span, or an empty one where nothing is prefetched.
        let after = if ahead { span(i + 1) } else { 0..0 };
        let next = (
            x.get(after.clone()).unwrap_or(&[]),
            dy.get(after).unwrap_or(&[]),
            rest.get(..dx_ahead).unwrap_or(&[]),
        );
        let xr = widened(&x[span(i)], &mut xbuf);
        let dyr = widened(&dy[span(i)], &mut dybuf);
        backward_row::<S, E>(norm, xr, next, (mean, r), dyr, gamma, dxr, &mut pg);
    }
}

/// The codes forward (float32 out): integer statistics, rows [r0, r0 + y.len() / n).
#[inline(always)]
#[allow(clippy::extra_unused_type_parameters)] // S picks the target features, via dispatch!
unsafe fn forward_codes_impl<S: Simd>(c: CodesIn<'_>, r0: usize, job: ForwardJob<'_, f32>) {
    let mut v = Vec::with_capacity(job.n);
    let mean = job.stats.mean.unwrap_or_default();
    let rows = job
        .y
        .chunks_exact_mut(job.n)
        .zip(mean.iter_mut().zip(job.stats.rstd));
    for (i, (yr, (m, r))) in rows.enumerate() {
        (*m, *r) = forward_codes_row(&c, r0 + i, job.n, job.eps, job.params, yr, &mut v);
    }
}

/// The codes backward: each row dequantized into a scratch row, then the float backward.
#[inline(always)]
#[allow(clippy::extra_unused_type_parameters)] // S picks the target features, via dispatch!
unsafe fn backward_codes_impl<S: Simd>(c: CodesIn<'_>, r0: usize, job: BackwardJob<'_, f32>) {
    let BackwardJob {
        n,
        stats,
        dy,
        gamma,
        dx,
        mut pg,
        ..
    } = job;
    let mut buf = Vec::with_capacity(n);
    let dx_ahead = prefetch_dx(&pg, n);
    let mut rest = dx;
    for (i, &r) in stats.1.iter().enumerate() {
        let (dxr, after) = rest.split_at_mut(n);
        rest = after;
        let mean = stats.0.map_or(0.0, |m| m[i]);
        let xr = dequantize_row(&c, r0 + i, n, &mut buf);
        let dyr = &dy[i * n..(i + 1) * n];
        let next = (&[][..], &[][..], rest.get(..dx_ahead).unwrap_or(&[]));
        backward_row::<S, f32>(Norm::Layer, xr, next, (mean, r), dyr, gamma, dxr, &mut pg);
    }
}

crate::dispatch! {
    fn forward_f32(job: ForwardJob<'_, f32>) = forward_impl<f32>;
    fn forward_bf16(job: ForwardJob<'_, Bf16>) = forward_impl<Bf16>;
    fn forward_f16(job: ForwardJob<'_, F16>) = forward_impl<F16>;
    fn backward_f32(job: BackwardJob<'_, f32>) = backward_impl<f32>;
    fn backward_bf16(job: BackwardJob<'_, Bf16>) = backward_impl<Bf16>;
    fn backward_f16(job: BackwardJob<'_, F16>) = backward_impl<F16>;
    fn forward_codes_kernel(c: CodesIn<'_>, r0: usize, job: ForwardJob<'_, f32>) = forward_codes_impl;
    fn backward_codes_kernel(c: CodesIn<'_>, r0: usize, job: BackwardJob<'_, f32>) = backward_codes_impl;
}

/// The storage types with compiled kernels.
pub trait Kernels: Storage {
    fn forward(level: SimdLevel, job: ForwardJob<'_, Self>);
    fn backward(level: SimdLevel, job: BackwardJob<'_, Self>);
}

macro_rules! kernels {
    ($($t:ty => $fwd:ident, $bwd:ident;)*) => {$(
        impl Kernels for $t {
            fn forward(level: SimdLevel, job: ForwardJob<'_, $t>) {
                $fwd(level, job)
            }
            fn backward(level: SimdLevel, job: BackwardJob<'_, $t>) {
                $bwd(level, job)
            }
        }
    )*};
}

kernels! {
    f32 => forward_f32, backward_f32;
    Bf16 => forward_bf16, backward_bf16;
    F16 => forward_f16, backward_f16;
}

/// ShiftQuant codes of `rows` rows of `n`, checked.
fn check_codes(op: &str, c: &CodesIn<'_>, rows: usize, n: usize) -> FgResult<()> {
    let ok = c.group_size > 0
        && c.codes.len() == rows * n
        && c.scale.len() == rows
        && c.shifts.len() == rows * num_groups(n, c.group_size)
        && c.shifts.iter().all(|&k| k <= crate::shiftquant::MAX_SHIFT);
    if !ok {
        return Err(FgError::Value(format!(
            "{op}: x does not hold {rows} rows of {n}"
        )));
    }
    Ok(())
}

fn check_len(op: &str, name: &str, got: usize, want: usize) -> FgResult<()> {
    if got != want {
        return Err(FgError::Value(format!(
            "{op}: {name} must hold {want} elements, got {got}"
        )));
    }
    Ok(())
}

fn op_names(norm: Norm) -> (&'static str, &'static str) {
    match norm {
        Norm::Layer => ("l1_layer_norm", "l1_layer_norm_backward"),
        Norm::Rms => ("l1_rms_norm", "l1_rms_norm_backward"),
    }
}

/// n >= 1, and the mean (and bias) given for LayerNorm only.
fn check_shape(op: &str, norm: Norm, n: usize, mean: Option<usize>, bias: bool) -> FgResult<()> {
    if n == 0 {
        return Err(FgError::Value(format!(
            "{op}: the normalized size must be at least 1"
        )));
    }
    match norm {
        Norm::Layer if mean.is_none() => Err(FgError::Value(format!("{op}: mean is required"))),
        Norm::Rms if mean.is_some() || bias => {
            Err(FgError::Value(format!("{op}: takes no bias and no mean")))
        }
        _ => Ok(()),
    }
}

/// Rows per parallel task: all on the calling thread for small jobs, else tasks of PAR_MIN
/// elements or more, at most `tasks_per_thread` per thread and at least one per thread.
fn rows_per_task(rows: usize, n: usize, tasks_per_thread: usize) -> usize {
    let threads = threads::num_threads();
    if threads == 1 || rows * n < PAR_MIN {
        return rows.max(1);
    }
    PAR_MIN
        .div_ceil(n)
        .max(rows.div_ceil(threads * tasks_per_thread))
        .min(rows.div_ceil(threads))
}

/// The forward's checks and threading: `task(first row, job)` per chunk of rows, `job.x` the
/// chunk's rows of `x` (empty for the codes path).
#[allow(clippy::too_many_arguments)]
fn run_forward<E: Storage>(
    op: &str,
    norm: Norm,
    x: &[E],
    n: usize,
    eps: f64,
    affine: Affine<'_>,
    y: &mut [E],
    stats: Stats<'_>,
    task: impl Fn(usize, ForwardJob<'_, E>) + Sync,
) -> FgResult<()> {
    check_shape(
        op,
        norm,
        n,
        stats.mean.as_ref().map(|m| m.len()),
        affine.beta.is_some(),
    )?;
    let rows = stats.rstd.len();
    check_len(op, "out", y.len(), rows * n)?;
    if let Some(m) = &stats.mean {
        check_len(op, "mean", m.len(), rows)?;
    }
    for (name, p) in [("weight", affine.gamma), ("bias", affine.beta)] {
        check_len(op, name, p.map_or(n, <[f32]>::len), n)?;
    }
    let ones = vec![1.0f32; if affine.gamma.is_none() { n } else { 0 }];
    let zeros = vec![0.0f32; if affine.beta.is_none() { n } else { 0 }];
    let params = Params {
        gamma: affine.gamma.unwrap_or(&ones),
        beta: affine.beta.unwrap_or(&zeros),
    };
    let ahead = std::mem::size_of_val(x) >= STREAM_BYTES;
    let (y, rstd) = (Disjoint::new(y), Disjoint::new(stats.rstd));
    let mean = stats.mean.map(Disjoint::new);
    threads::for_each_chunk(
        rows,
        rows_per_task(rows, n, FORWARD_TASKS_PER_THREAD),
        |_, r| {
            let span = r.start * n..r.end * n;
            // SAFETY: chunks are disjoint row ranges.
            let job = unsafe {
                ForwardJob {
                    norm,
                    x: x.get(span.clone()).unwrap_or(&[]),
                    ahead,
                    n,
                    eps,
                    params,
                    y: y.piece(span),
                    stats: Stats {
                        mean: mean.as_ref().map(|m| m.piece(r.clone())),
                        rstd: rstd.piece(r.clone()),
                    },
                }
            };
            task(r.start, job)
        },
    );
    Ok(())
}

/// The L1 norm (`norm`) of `rows = stats.rstd.len()` rows of `x` into `y`, saving per-row
/// mean (LayerNorm: `stats.mean` must be given) and r.
#[allow(clippy::too_many_arguments)]
pub fn forward<E: Kernels>(
    level: SimdLevel,
    norm: Norm,
    x: &[E],
    n: usize,
    eps: f64,
    affine: Affine<'_>,
    y: &mut [E],
    stats: Stats<'_>,
) -> FgResult<()> {
    let op = op_names(norm).0;
    check_len(op, "x", x.len(), stats.rstd.len() * n)?;
    run_forward(op, norm, x, n, eps, affine, y, stats, |_, job| {
        E::forward(level, job)
    })
}

/// L1 LayerNorm of the rows ShiftQuant codes `c` hold, statistics exact in integers.
pub fn forward_codes(
    level: SimdLevel,
    c: CodesIn<'_>,
    n: usize,
    eps: f64,
    affine: Affine<'_>,
    y: &mut [f32],
    stats: Stats<'_>,
) -> FgResult<()> {
    let op = op_names(Norm::Layer).0;
    check_codes(op, &c, stats.rstd.len(), n)?;
    run_forward(op, Norm::Layer, &[], n, eps, affine, y, stats, |r0, job| {
        forward_codes_kernel(level, c, r0, job)
    })
}

/// What a backward reads: the forward's statistics (mean: LayerNorm only), dy and the weight.
#[derive(Clone, Copy)]
pub struct BackwardIn<'a, E> {
    pub mean: Option<&'a [f32]>,
    pub rstd: &'a [f32],
    pub dy: &'a [E],
    pub gamma: Option<&'a [f32]>,
}

/// The backward's outputs: dx, and the weight / bias gradients when asked for (overwritten
/// with their sums over rows).
pub struct Grads<'a, E> {
    pub dx: &'a mut [E],
    pub dgamma: Option<&'a mut [f32]>,
    pub dbeta: Option<&'a mut [f32]>,
}

/// The backward's checks and threading, as [`run_forward`].
fn run_backward<E: Storage>(
    op: &str,
    norm: Norm,
    x: &[E],
    n: usize,
    inp: BackwardIn<'_, E>,
    grads: Grads<'_, E>,
    task: impl Fn(usize, BackwardJob<'_, E>) + Sync,
) -> FgResult<()> {
    check_shape(
        op,
        norm,
        n,
        inp.mean.map(<[f32]>::len),
        grads.dbeta.is_some(),
    )?;
    let rows = inp.rstd.len();
    if let Some(m) = inp.mean {
        check_len(op, "mean", m.len(), rows)?;
    }
    check_len(op, "grad_out", inp.dy.len(), rows * n)?;
    check_len(op, "grad_in", grads.dx.len(), rows * n)?;
    check_len(op, "weight", inp.gamma.map_or(n, <[f32]>::len), n)?;
    for (name, g) in [("grad_weight", &grads.dgamma), ("grad_bias", &grads.dbeta)] {
        check_len(op, name, g.as_ref().map_or(n, |g| g.len()), n)?;
    }
    let ones = vec![1.0f32; if inp.gamma.is_none() { n } else { 0 }];
    let gamma = inp.gamma.unwrap_or(&ones);
    let ahead =
        !E::IS_F32 || std::mem::size_of_val(x) + std::mem::size_of_val(inp.dy) >= STREAM_BYTES;
    let chunk = rows_per_task(rows, n, BACKWARD_TASKS_PER_THREAD);
    let tasks = rows.div_ceil(chunk).max(1);
    // Each task sums its rows' weight / bias gradients into its own slot; slots add up last.
    let Grads { dx, dgamma, dbeta } = grads;
    let (want_g, want_b) = (dgamma.is_some(), dbeta.is_some());
    let mut partial_g = vec![0.0f32; if want_g { tasks * n } else { 0 }];
    let mut partial_b = vec![0.0f32; if want_b { tasks * n } else { 0 }];
    let (dxd, pgd, pbd) = (
        Disjoint::new(dx),
        Disjoint::new(&mut partial_g),
        Disjoint::new(&mut partial_b),
    );
    threads::for_each_chunk(rows, chunk, |t, r| {
        let span = r.start * n..r.end * n;
        let slot = t * n..(t + 1) * n;
        // SAFETY: chunks are disjoint row ranges, and task t alone owns slot t.
        let job = unsafe {
            BackwardJob {
                norm,
                x: x.get(span.clone()).unwrap_or(&[]),
                ahead,
                n,
                stats: (inp.mean.map(|m| &m[r.clone()]), &inp.rstd[r.clone()]),
                dy: &inp.dy[span.clone()],
                gamma,
                dx: dxd.piece(span),
                pg: ParamGrads {
                    dgamma: want_g.then(|| pgd.piece(slot.clone())),
                    dbeta: want_b.then(|| pbd.piece(slot)),
                },
            }
        };
        task(r.start, job)
    });
    for (out, partial) in [(dgamma, partial_g), (dbeta, partial_b)] {
        if let Some(out) = out {
            out.fill(0.0);
            for slot in partial.chunks(n) {
                out.iter_mut().zip(slot).for_each(|(o, &p)| *o += p);
            }
        }
    }
    Ok(())
}

/// The gradients of the L1 norm (`norm`) at `x`.
pub fn backward<E: Kernels>(
    level: SimdLevel,
    norm: Norm,
    x: &[E],
    n: usize,
    inp: BackwardIn<'_, E>,
    grads: Grads<'_, E>,
) -> FgResult<()> {
    let op = op_names(norm).1;
    check_len(op, "x", x.len(), inp.rstd.len() * n)?;
    run_backward(op, norm, x, n, inp, grads, |_, job| E::backward(level, job))
}

/// The gradients of L1 LayerNorm whose input was given as ShiftQuant codes (straight-through:
/// the float backward at the dequantized input).
pub fn backward_codes(
    level: SimdLevel,
    c: CodesIn<'_>,
    n: usize,
    inp: BackwardIn<'_, f32>,
    grads: Grads<'_, f32>,
) -> FgResult<()> {
    let op = op_names(Norm::Layer).1;
    check_codes(op, &c, inp.rstd.len(), n)?;
    run_backward(op, Norm::Layer, &[], n, inp, grads, |r0, job| {
        backward_codes_kernel(level, c, r0, job)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::SplitMix64::new(seed);
        (0..n)
            .map(|_| ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 1.5) as f32)
            .collect()
    }

    /// The definition and its gradient, plainly, in f64: (y, dx, dgamma, dbeta).
    fn reference(
        norm: Norm,
        x: &[f32],
        n: usize,
        eps: f64,
        gamma: &[f32],
        beta: &[f32],
        dy: &[f32],
    ) -> [Vec<f64>; 4] {
        let (mut y, mut dx) = (vec![], vec![]);
        let (mut dg, mut db) = (vec![0.0; n], vec![0.0; n]);
        let nf = n as f64;
        for (row, dyr) in x.chunks(n).zip(dy.chunks(n)) {
            let row: Vec<f64> = row.iter().map(|&v| f64::from(v)).collect();
            let mean = match norm {
                Norm::Layer => row.iter().sum::<f64>() / nf,
                Norm::Rms => 0.0,
            };
            let d: Vec<f64> = row.iter().map(|v| v - mean).collect();
            let r = 1.0 / (SQRT_HALF_PI * d.iter().map(|v| v.abs()).sum::<f64>() / nf + eps);
            let g: Vec<f64> = (0..n).map(|i| f64::from(dyr[i] * gamma[i])).collect();
            let (sg, sgd) = (
                g.iter().sum::<f64>(),
                (0..n).map(|i| g[i] * d[i]).sum::<f64>(),
            );
            let ss = d
                .iter()
                .map(|v| v.signum() * f64::from(u8::from(*v != 0.0)))
                .sum::<f64>();
            let (mg, ms) = match norm {
                Norm::Layer => (sg / nf, ss / nf),
                Norm::Rms => (0.0, 0.0),
            };
            for i in 0..n {
                let b = if norm == Norm::Layer { beta[i] } else { 0.0 };
                y.push(d[i] * r * f64::from(gamma[i]) + f64::from(b));
                let s = d[i].signum() * f64::from(u8::from(d[i] != 0.0));
                dx.push(r * ((g[i] - mg) - SQRT_HALF_PI / nf * r * sgd * (s - ms)));
                dg[i] += f64::from(dyr[i]) * d[i] * r;
                db[i] += f64::from(dyr[i]);
            }
        }
        [y, dx, dg, db]
    }

    fn close(got: impl Iterator<Item = f64>, want: &[f64], tol: f64, what: &str) {
        for (i, (a, b)) in got.zip(want).enumerate() {
            assert!(
                (a - b).abs() <= tol * (1.0 + b.abs()),
                "{what}[{i}]: {a} vs {b}"
            );
        }
    }

    /// Forward and backward of `E` rows against the f64 definition at the rows' own values.
    fn check<E: Kernels>(norm: Norm, rows: usize, n: usize, tol: f64) {
        let eps = 1e-5;
        let x: Vec<E> = data(rows * n, 1).into_iter().map(E::from_f32).collect();
        let dy: Vec<E> = data(rows * n, 4).into_iter().map(E::from_f32).collect();
        let widen = |v: &[E]| v.iter().map(|e| e.to_f32()).collect::<Vec<f32>>();
        let gamma = data(n, 2);
        let beta = data(n, 3);
        let want = reference(norm, &widen(&x), n, eps, &gamma, &beta, &widen(&dy));
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            let affine = Affine {
                gamma: Some(&gamma),
                beta: (norm == Norm::Layer).then_some(&beta[..]),
            };
            let mut y = vec![E::from_f32(0.0); rows * n];
            let (mut mean, mut rstd) = (vec![0.0; rows], vec![0.0; rows]);
            let stats = Stats {
                mean: (norm == Norm::Layer).then_some(&mut mean[..]),
                rstd: &mut rstd,
            };
            forward(level, norm, &x, n, eps, affine, &mut y, stats).unwrap();
            close(widen(&y).into_iter().map(f64::from), &want[0], tol, "y");
            let mut dx = vec![E::from_f32(0.0); rows * n];
            let (mut dg, mut db) = (vec![0.0; n], vec![0.0; n]);
            let inp = BackwardIn {
                mean: (norm == Norm::Layer).then_some(&mean[..]),
                rstd: &rstd,
                dy: &dy,
                gamma: Some(&gamma),
            };
            let grads = Grads {
                dx: &mut dx,
                dgamma: Some(&mut dg),
                dbeta: (norm == Norm::Layer).then_some(&mut db[..]),
            };
            backward(level, norm, &x, n, inp, grads).unwrap();
            close(widen(&dx).into_iter().map(f64::from), &want[1], tol, "dx");
            close(
                dg.iter().map(|&v| f64::from(v)),
                &want[2],
                tol * 10.0,
                "dgamma",
            );
            if norm == Norm::Layer {
                close(
                    db.iter().map(|&v| f64::from(v)),
                    &want[3],
                    tol * 10.0,
                    "dbeta",
                );
            }
        }
    }

    #[test]
    fn kernels_match_the_definition_in_every_storage() {
        let _count = crate::threads::TEST_COUNT_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        crate::threads::set_num_threads(2, true).unwrap();
        for norm in [Norm::Layer, Norm::Rms] {
            for (rows, n) in [(3, 37), (1, 1), (2, 1000), (64, 1024), (5, 3000)] {
                check::<f32>(norm, rows, n, 2e-5);
                check::<Bf16>(norm, rows, n, 1e-2);
                check::<F16>(norm, rows, n, 2e-3);
            }
        }
    }

    /// Rows past [`STREAM_BYTES`] prefetch the next row, smaller calls do not: the same rows
    /// give the same bits either way (a 16 MiB float32 call against its four quarters, whose
    /// forward and backward both stay below the limit).
    #[test]
    fn prefetching_rows_give_the_same_bits() {
        let (rows, n, eps) = (1024, 4096, 1e-5);
        let quarter = rows / 4;
        assert!(rows * n * 4 >= STREAM_BYTES && 2 * quarter * n * 4 < STREAM_BYTES);
        let (x, dy, gamma, beta) = (data(rows * n, 5), data(rows * n, 6), data(n, 7), data(n, 8));
        let level = crate::simd::detected();
        let run = |r: std::ops::Range<usize>| {
            let (x, dy) = (&x[r.start * n..r.end * n], &dy[r.start * n..r.end * n]);
            let k = r.len();
            let (mut y, mut dx) = (vec![0.0f32; k * n], vec![0.0f32; k * n]);
            let (mut mean, mut rstd) = (vec![0.0; k], vec![0.0; k]);
            let affine = Affine {
                gamma: Some(&gamma),
                beta: Some(&beta),
            };
            let stats = Stats {
                mean: Some(&mut mean),
                rstd: &mut rstd,
            };
            forward(level, Norm::Layer, x, n, eps, affine, &mut y, stats).unwrap();
            let inp = BackwardIn {
                mean: Some(&mean),
                rstd: &rstd,
                dy,
                gamma: Some(&gamma),
            };
            let grads = Grads {
                dx: &mut dx,
                dgamma: None,
                dbeta: None,
            };
            backward(level, Norm::Layer, x, n, inp, grads).unwrap();
            [y, mean, rstd, dx].map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>())
        };
        let whole = run(0..rows);
        let parts: Vec<_> = (0..4)
            .map(|q| run(q * quarter..(q + 1) * quarter))
            .collect();
        for (k, what) in ["y", "mean", "rstd", "dx"].iter().enumerate() {
            let joined: Vec<u32> = parts.iter().flat_map(|p| p[k].iter().copied()).collect();
            assert!(whole[k] == joined, "{what}");
        }
    }

    #[test]
    fn norm_and_shape_mismatches_are_refused() {
        let level = SimdLevel::Scalar;
        let x = [1.0f32; 8];
        let (mut y, mut rstd, mut mean) = ([0.0f32; 8], [0.0f32; 2], [0.0f32; 2]);
        let none = Affine {
            gamma: None,
            beta: None,
        };
        // RMS norm with a mean buffer; LayerNorm over rows that do not divide x.
        for (norm, n) in [(Norm::Rms, 4), (Norm::Layer, 3)] {
            let stats = Stats {
                mean: Some(&mut mean),
                rstd: &mut rstd,
            };
            let err = forward(level, norm, &x, n, 1e-5, none, &mut y, stats);
            assert!(matches!(err, Err(FgError::Value(_))), "{norm:?} n={n}");
        }
    }

    #[test]
    fn codes_forward_matches_the_float_forward_of_the_dequantized_input() {
        use crate::shiftquant::{dequantize, quantize_rows, Codes, Rounding, Spec};
        let (rows, n, gs) = (4, 100, 16);
        let x = data(rows * n, 5);
        let spec = Spec::new("t", 6, gs, Rounding::Nearest).unwrap();
        let (mut codes, mut scale, mut shifts) = (
            vec![0i8; rows * n],
            vec![0f32; rows],
            vec![0u8; rows * num_groups(n, gs)],
        );
        let level = crate::simd::detected();
        let out = Codes {
            codes: &mut codes,
            scale: &mut scale,
            shifts: &mut shifts,
        };
        quantize_rows(level, &x, n, &spec, out).unwrap();
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
        let mut got = [vec![0f32; rows * n], vec![0f32; rows * n]];
        let mut stats = [vec![0f32; rows], vec![0f32; rows]];
        let [mean, rstd] = &mut stats;
        forward_codes(
            level,
            c,
            n,
            1e-5,
            none,
            &mut got[0],
            Stats {
                mean: Some(mean),
                rstd,
            },
        )
        .unwrap();
        let (mut mean2, mut rstd2) = (vec![0f32; rows], vec![0f32; rows]);
        forward(
            level,
            Norm::Layer,
            &xd,
            n,
            1e-5,
            none,
            &mut got[1],
            Stats {
                mean: Some(&mut mean2),
                rstd: &mut rstd2,
            },
        )
        .unwrap();
        for (a, b) in got[0].iter().zip(&got[1]) {
            assert!((a - b).abs() < 1e-5, "{a} {b}");
        }
        // The codes backward is the float backward at the dequantized input.
        let dy = data(rows * n, 6);
        let mut dx = [vec![0f32; rows * n], vec![0f32; rows * n]];
        let inp = BackwardIn {
            mean: Some(&mean2),
            rstd: &rstd2,
            dy: &dy,
            gamma: None,
        };
        let [dx0, dx1] = &mut dx;
        let grads = |dx| Grads {
            dx,
            dgamma: None,
            dbeta: None,
        };
        backward_codes(level, c, n, inp, grads(dx0)).unwrap();
        backward(level, Norm::Layer, &xd, n, inp, grads(dx1)).unwrap();
        assert_eq!(dx[0], dx[1]);
    }
}
