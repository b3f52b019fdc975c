//! Cut cross-entropy on the CPU: the row passes over logits that torch's matmul wrote.
//!
//! The caller (Python) has torch's matmul write logits `e · c[v0..v0+w]ᵀ (+ bias)` into one
//! reused [rows, w] buffer, in float32 or, where the matmul runs in bfloat16, in bfloat16 (read
//! here as it is, into an f32 row that stays in cache: no float32 copy of the buffer), and calls
//! these passes: the forward folds a vocabulary chunk into a running log-sum-exp per row (max
//! and sum of exponentials), picks the target logit and optionally sums the logits (label
//! smoothing); the backward turns a recomputed chunk into the logit gradient in place, ready for
//! the two gradient matmuls; the fused pass takes rows over the whole vocabulary and does both
//! at once (lse, then the gradient of the summed row losses), so that the loss's gradient is
//! known in the forward. Nothing here ever sees more than the buffer.

use crate::error::{FgError, FgResult};
use crate::simd::{self, Bf16, Scalar, Simd, SimdLevel};
use crate::softmax::{exp_floored, exp_shifted_store, exp_shifted_sum, row_max, sum};
use crate::threads::{self, Disjoint};

/// Chunks holding fewer elements than this run on the calling thread.
const PAR_MIN: usize = 1 << 16;
/// tanh(9) rounds to 1 in f32; clamping there keeps exp(2y) finite.
const TANH_CLAMP: f32 = 9.0;

/// Logits as the matmul stored them: float32 or bfloat16.
pub enum Logits<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [Bf16]),
}

impl Logits<'_> {
    fn len(&self) -> usize {
        match self {
            Logits::F32(z) => z.len(),
            Logits::Bf16(z) => z.len(),
        }
    }
}

/// One vocabulary chunk of logits: `logits` is [rows, width] row-major, column `j` is
/// vocabulary entry `v0 + j`; `targets[i] < 0` means row `i` has no target.
pub struct Chunk<'a> {
    pub logits: Logits<'a>,
    pub width: usize,
    pub v0: usize,
    /// z = softcap * tanh(z / softcap), applied here to the raw logits.
    pub softcap: Option<f32>,
    pub targets: &'a [i64],
}

impl Chunk<'_> {
    fn rows(&self) -> usize {
        self.targets.len()
    }

    fn check(&self, op: &str, per_row: &[(&str, usize)]) -> FgResult<()> {
        let rows = self.rows();
        if self.width == 0 || self.logits.len() != rows * self.width {
            return Err(FgError::Value(format!(
                "{op}: logits has {} elements, expected rows ({rows}) x width ({}) with width >= 1",
                self.logits.len(),
                self.width
            )));
        }
        if let Some(cap) = self.softcap {
            if !(cap.is_finite() && cap > 0.0) {
                return Err(FgError::Value(format!(
                    "{op}: softcap must be a finite positive number, got {cap}"
                )));
            }
        }
        for &(name, len) in per_row {
            if len != rows {
                return Err(FgError::Value(format!(
                    "{op}: {name} has {len} elements, expected one per row ({rows})"
                )));
            }
        }
        Ok(())
    }
}

/// Column of `target` inside the chunk of `width` entries starting at `v0`, if it falls there.
fn target_column(target: i64, v0: usize, width: usize) -> Option<usize> {
    let local = usize::try_from(target).ok()?.checked_sub(v0)?;
    (local < width).then_some(local)
}

/// The running per-row state of the forward pass, updated chunk by chunk.
pub struct LseState<'a> {
    /// log Σ exp(z) over the chunks so far (-inf before the first).
    pub lse: &'a mut [f64],
    /// The target's logit, written by the chunk that holds it.
    pub target_logit: &'a mut [f32],
    /// Σ z so far (label smoothing needs it).
    pub logit_sum: Option<&'a mut [f64]>,
}

/// Per-row coefficients of the logit gradient: with p = exp(z - lse),
/// dz_ij = softmax_i * p_ij - target_i * [j == t_i] - uniform_i, times 1 - (z/softcap)^2 when capped.
pub struct GradCoefs<'a> {
    pub lse: &'a [f32],
    pub softmax: &'a [f32],
    pub target: &'a [f32],
    pub uniform: &'a [f32],
}

crate::dispatch! {
    fn softcap_row(x: &mut [f32], cap: f32) = softcap_row_impl;
    fn grad_row(z: &mut [f32], lse: f32, softmax: f32, uniform: f32, cap: Option<f32>) -> f32 = grad_row_impl;
    fn grad_row_from_exp(e: &mut [f32], k: f32, softmax: f32, uniform: f32) -> f32 = grad_row_from_exp_impl;
}

/// x = cap * tanh(x / cap), with tanh(y) = (e^2y - 1) / (e^2y + 1) on y clamped to ±9.
#[inline(always)]
unsafe fn softcap_row_impl<S: Simd>(x: &mut [f32], cap: f32) {
    #[inline(always)]
    unsafe fn capped<S: Simd>(x: S::V, cap: f32) -> S::V {
        let y = S::mul(x, S::splat(2.0 / cap));
        let y = S::min(
            S::splat(2.0 * TANH_CLAMP),
            S::max(S::splat(-2.0 * TANH_CLAMP), y),
        );
        let e = S::exp(y);
        let one = S::splat(1.0);
        S::mul(S::splat(cap), S::div(S::sub(e, one), S::add(e, one)))
    }
    let p = x.as_mut_ptr();
    let mut i = 0;
    while i + S::LANES <= x.len() {
        S::store(p.add(i), capped::<S>(S::load(p.add(i)), cap));
        i += S::LANES;
    }
    for v in &mut x[i..] {
        *v = capped::<Scalar>(*v, cap);
    }
}

/// The logit gradient of one row piece (without the target term) in place, subnormal entries
/// as 0; returns max |dz| before the softcap factor, which only shrinks it.
#[inline(always)]
unsafe fn grad_row_impl<S: Simd>(
    z: &mut [f32],
    lse: f32,
    softmax: f32,
    uniform: f32,
    cap: Option<f32>,
) -> f32 {
    grad_row_generic::<S, false>(z, lse, softmax, uniform, cap)
}

/// [`grad_row_impl`] over a row that holds e = exp(z - max) instead of z, with k = exp(max -
/// lse): p = e k, no exp (the fused pass stored e while summing it). Never capped.
#[inline(always)]
unsafe fn grad_row_from_exp_impl<S: Simd>(
    e: &mut [f32],
    k: f32,
    softmax: f32,
    uniform: f32,
) -> f32 {
    grad_row_generic::<S, true>(e, k, softmax, uniform, None)
}

/// The two above: `shift` is lse (z in the row) or k (e in the row, `FROM_EXP`).
#[inline(always)]
unsafe fn grad_row_generic<S: Simd, const FROM_EXP: bool>(
    z: &mut [f32],
    shift: f32,
    softmax: f32,
    uniform: f32,
    cap: Option<f32>,
) -> f32 {
    #[inline(always)]
    unsafe fn grad<S: Simd, const FROM_EXP: bool>(
        z: S::V,
        shift: f32,
        softmax: f32,
        uniform: f32,
        cap: Option<f32>,
    ) -> (S::V, S::V) {
        let p = if FROM_EXP {
            S::mul(z, S::splat(shift))
        } else {
            exp_floored::<S>(S::sub(z, S::splat(shift)))
        };
        let g = S::sub(S::mul(S::splat(softmax), p), S::splat(uniform));
        let size = S::abs(g);
        let g = match cap {
            // d(cap * tanh(r / cap)) / dr = 1 - (z / cap)^2
            Some(cap) => {
                let t = S::mul(z, S::splat(1.0 / cap));
                S::mul(g, S::mul_add(S::sub(S::splat(0.0), t), t, S::splat(1.0)))
            }
            None => g,
        };
        // Probabilities below f32's normal range (logits more than ~87 below the log-sum-exp)
        // as 0: subnormal operands slow the chunk GEMMs down by microcode assists (4096 x 512
        // -> 32000 with logits spread over +-100: 27 s a step, torch's the same), and no sum
        // they enter can tell them from 0 (|g| < 1.2e-38).
        (S::flush_subnormal(g), size)
    }
    let p = z.as_mut_ptr();
    let mut peak = S::splat(0.0);
    let mut i = 0;
    while i + S::LANES <= z.len() {
        let (g, size) = grad::<S, FROM_EXP>(S::load(p.add(i)), shift, softmax, uniform, cap);
        S::store(p.add(i), g);
        peak = S::max(peak, size);
        i += S::LANES;
    }
    let mut out = S::to_array(peak)[..S::LANES]
        .iter()
        .fold(0.0f32, |a, &b| a.max(b));
    if i < z.len() {
        // The ragged end as one masked vector, its peak over the live lanes only: on rows of a
        // few hundred logits scalar exps there were half of this function's time.
        let rest = z.len() - i;
        let fill = if FROM_EXP { 0.0 } else { f32::NEG_INFINITY };
        let v = S::load_partial(p.add(i), rest, fill);
        let (g, size) = grad::<S, FROM_EXP>(v, shift, softmax, uniform, cap);
        S::store_partial(p.add(i), g, rest);
        out = S::to_array(size)[..rest].iter().fold(out, |a, &b| a.max(b));
    }
    out
}

/// What one row of a chunk adds to the running state.
struct RowStats {
    lse: f64,
    logit_sum: f64,
}

impl RowStats {
    fn of(level: SimdLevel, row: &mut [f32], softcap: Option<f32>, want_sum: bool) -> RowStats {
        if let Some(cap) = softcap {
            softcap_row(level, row, cap);
        }
        let max = row_max(level, row); // ignores NaN; the sum below catches it
        let lse = if max.is_infinite() {
            infinite_lse(row, max)
        } else {
            max as f64 + exp_shifted_sum(level, row, max).ln()
        };
        RowStats {
            lse,
            logit_sum: if want_sum { sum(level, row) } else { 0.0 },
        }
    }

    /// [`of`](Self::of) for uncapped logits, leaving e = exp(z - max) in the row where max is
    /// finite, with k = exp(max - lse) = 1 / Σ e for the gradient (p = e k: one exp per logit,
    /// where reading z back took a second). The same lse and logit sum, bit for bit.
    fn of_storing(level: SimdLevel, row: &mut [f32], want_sum: bool) -> (RowStats, Option<f32>) {
        let logit_sum = if want_sum { sum(level, row) } else { 0.0 };
        let max = row_max(level, row);
        if max.is_infinite() {
            let lse = infinite_lse(row, max);
            return (RowStats { lse, logit_sum }, None);
        }
        let total = exp_shifted_store(level, row, max);
        let stats = RowStats {
            lse: max as f64 + total.ln(),
            logit_sum,
        };
        (stats, Some((1.0 / total) as f32))
    }
}

/// The lse of a row whose maximum (NaN ignored) is ±inf: that, unless a NaN hides in the row
/// (rare: a plain scan).
fn infinite_lse(row: &[f32], max: f32) -> f64 {
    if row.iter().any(|v| v.is_nan()) {
        f64::NAN
    } else {
        max as f64
    }
}

/// log(e^a + e^b) with torch's conventions for infinities and NaN.
fn log_add_exp(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else if lo == f64::NEG_INFINITY || hi == f64::INFINITY {
        hi
    } else {
        hi + (lo - hi).exp().ln_1p()
    }
}

/// What one row of a pass gives back.
#[derive(Default)]
struct RowOut {
    lse: f64,
    logit_sum: f64,
    target_logit: Option<f32>,
}

/// The logit gradient of one row of capped logits in place (`target`: the target's column),
/// for coefficients (softmax, target, uniform); folds each piece of `piece` columns' largest
/// |dz| / max(|softmax|, |target|) into `peaks` (infinite when the lse or a coefficient is not
/// finite, so that the NaN they put in dz is never filtered away). A row whose coefficients
/// are all 0 becomes 0.
///
/// With `exp_scale` Some(k) the row holds e = exp(z - max) ([`RowStats::of_storing`]) and p is
/// e k; `softcap` is then None.
#[allow(clippy::too_many_arguments)]
fn row_grad(
    level: SimdLevel,
    row: &mut [f32],
    target: Option<usize>,
    lse: f32,
    exp_scale: Option<f32>,
    (cs, ct, cu): (f32, f32, f32),
    softcap: Option<f32>,
    piece: usize,
    peaks: &mut [f32],
) {
    if cs == 0.0 && ct == 0.0 && cu == 0.0 {
        row.fill(0.0);
        return;
    }
    let finite = lse.is_finite() && cs.is_finite() && ct.is_finite() && cu.is_finite();
    let scale = cs.abs().max(ct.abs());
    for (k, (z, peak)) in row.chunks_mut(piece).zip(peaks.iter_mut()).enumerate() {
        let local = target
            .and_then(|j| j.checked_sub(k * piece))
            .filter(|&j| j < z.len());
        let (head, tail) = match local {
            Some(j) => {
                // The one-hot term touches one column: do it apart from the vector passes.
                let x = z[j];
                let p = match exp_scale {
                    Some(k) => x * k,
                    None => ((x - lse) as f64).exp() as f32,
                };
                let g = cs * p - cu - ct;
                z[j] = match softcap {
                    Some(cap) => g * (1.0 - (x / cap) * (x / cap)),
                    None => g,
                };
                let (head, rest) = z.split_at_mut(j);
                (
                    piece_grad(level, head, lse, exp_scale, cs, cu, softcap).max(g.abs()),
                    &mut rest[1..],
                )
            }
            None => (0.0, z),
        };
        let size = head.max(piece_grad(level, tail, lse, exp_scale, cs, cu, softcap));
        *peak = peak.max(if finite { size / scale } else { f32::INFINITY });
    }
}

/// [`grad_row`], or [`grad_row_from_exp`] for a row holding e (`exp_scale` Some(k)).
fn piece_grad(
    level: SimdLevel,
    z: &mut [f32],
    lse: f32,
    exp_scale: Option<f32>,
    cs: f32,
    cu: f32,
    softcap: Option<f32>,
) -> f32 {
    match exp_scale {
        Some(k) => grad_row_from_exp(level, z, k, cs, cu),
        None => grad_row(level, z, lse, cs, cu, softcap),
    }
}

/// Forward: folds `chunk` into `state` (softcap applied to float32 logits in place).
pub fn forward_chunk(level: SimdLevel, mut chunk: Chunk<'_>, state: LseState<'_>) -> FgResult<()> {
    let rows = chunk.rows();
    chunk.check(
        "linear_cross_entropy",
        &[
            ("lse", state.lse.len()),
            ("target_logit", state.target_logit.len()),
            (
                "logit_sum",
                state.logit_sum.as_ref().map_or(rows, |s| s.len()),
            ),
        ],
    )?;
    let (width, v0, softcap, targets) = (chunk.width, chunk.v0, chunk.softcap, chunk.targets);
    let want_sum = state.logit_sum.is_some();
    let (stats, _) = map_rows(
        level,
        &mut chunk.logits,
        width,
        false,
        || (),
        |i, row, _| {
            let s = RowStats::of(level, row, softcap, want_sum);
            RowOut {
                lse: s.lse,
                logit_sum: s.logit_sum,
                target_logit: target_column(targets[i], v0, width).map(|j| row[j]),
            }
        },
    );
    let mut logit_sum = state.logit_sum;
    for (i, row) in stats.iter().enumerate() {
        state.lse[i] = log_add_exp(state.lse[i], row.lse);
        if let Some(sums) = logit_sum.as_deref_mut() {
            sums[i] += row.logit_sum;
        }
        if let Some(z) = row.target_logit {
            state.target_logit[i] = z;
        }
    }
    Ok(())
}

/// Backward: replaces the recomputed raw logits of `chunk` by the logit gradient; returns the
/// largest |dz_ij| / max(|softmax_i|, |target_i|) over the chunk (0 for rows with no gradient,
/// infinite when a row's lse or coefficients are not finite, so that its NaN reaches the
/// gradients), which the caller compares against `filter_eps` to skip the chunk's gradient
/// matmuls.
pub fn backward_chunk(
    level: SimdLevel,
    mut chunk: Chunk<'_>,
    coefs: GradCoefs<'_>,
) -> FgResult<f32> {
    chunk.check(
        "linear_cross_entropy",
        &[
            ("lse", coefs.lse.len()),
            ("coef_softmax", coefs.softmax.len()),
            ("coef_target", coefs.target.len()),
            ("coef_uniform", coefs.uniform.len()),
        ],
    )?;
    let (width, v0, softcap, targets) = (chunk.width, chunk.v0, chunk.softcap, chunk.targets);
    let (_, peaks) = map_rows(
        level,
        &mut chunk.logits,
        width,
        true,
        || 0.0f32,
        |i, row, peak| {
            let c = (coefs.softmax[i], coefs.target[i], coefs.uniform[i]);
            if let (Some(cap), true) = (softcap, c != (0.0, 0.0, 0.0)) {
                softcap_row(level, row, cap);
            }
            let target = target_column(targets[i], v0, width);
            row_grad(
                level,
                row,
                target,
                coefs.lse[i],
                None,
                c,
                softcap,
                width,
                std::slice::from_mut(peak),
            );
        },
    );
    Ok(peaks.into_iter().fold(0.0, f32::max))
}

/// The loss options of the fused pass.
pub struct LossGrad {
    /// The weight of each row with a target in the summed loss (1 / rows counted for a mean).
    pub scale: f32,
    pub label_smoothing: f64,
    pub z_loss: f64,
    /// Columns per piece of the filter (`peaks` has one entry per piece).
    pub piece: usize,
}

/// What the fused pass writes per row (lse, target logit: NaN where the row has none, logit sum)
/// and per piece of columns (the largest relative gradient entry over the rows).
pub struct LossGradOut<'a> {
    pub lse: &'a mut [f32],
    pub target_logit: &'a mut [f32],
    pub logit_sum: Option<&'a mut [f32]>,
    pub peaks: &'a mut [f32],
}

/// Fused forward and gradient over rows of logits that span the whole vocabulary (`chunk.v0`
/// 0, `chunk.width` V): each row's lse, target logit and logit sum, then in place its logit
/// gradient for the loss `scale * Σ_rows loss_i` (coefficients a = scale (1 + 2 z_loss lse),
/// b = scale (1 - ls), u = scale ls / V for rows with a target, 0 for the others), while the
/// row is still in cache.
pub fn loss_grad_rows(
    level: SimdLevel,
    mut chunk: Chunk<'_>,
    opts: LossGrad,
    out: LossGradOut<'_>,
) -> FgResult<()> {
    let op = "linear_cross_entropy";
    let rows = chunk.rows();
    chunk.check(
        op,
        &[
            ("lse", out.lse.len()),
            ("target_logit", out.target_logit.len()),
            (
                "logit_sum",
                out.logit_sum.as_ref().map_or(rows, |s| s.len()),
            ),
        ],
    )?;
    let (width, softcap, targets) = (chunk.width, chunk.softcap, chunk.targets);
    let pieces = width.div_ceil(opts.piece.max(1));
    if chunk.v0 != 0 || opts.piece == 0 || out.peaks.len() != pieces {
        return Err(FgError::Value(format!(
            "{op}: the fused pass takes whole rows (v0 0, got {}) and one peak per piece of \
             {} columns ({pieces}, got {})",
            chunk.v0,
            opts.piece,
            out.peaks.len()
        )));
    }
    let want_sum = out.logit_sum.is_some();
    let keep = (1.0 - opts.label_smoothing) as f32;
    let uniform = (opts.label_smoothing / width as f64) as f32;
    let z2 = (2.0 * opts.z_loss) as f32;
    let init = || vec![0.0f32; pieces];
    let (stats, task_peaks) = map_rows(
        level,
        &mut chunk.logits,
        width,
        true,
        init,
        |i, row, peaks| {
            let target = target_column(targets[i], 0, width);
            // Uncapped rows keep exp(z - max) from the sum for the gradient: read z first.
            let raw_target = target.map(|j| row[j]);
            let (s, exp_scale) = match softcap {
                None => RowStats::of_storing(level, row, want_sum),
                Some(_) => (RowStats::of(level, row, softcap, want_sum), None),
            };
            let lse = s.lse as f32;
            let w = opts.scale;
            let cs = if opts.z_loss != 0.0 {
                w * (1.0 + z2 * lse)
            } else {
                w
            };
            // A row without a target has no gradient, whatever its (maybe NaN) lse.
            let c = if targets[i] >= 0 {
                (cs, w * keep, w * uniform)
            } else {
                (0.0, 0.0, 0.0)
            };
            // (Capped rows: the target's capped logit, as `of` left the row.)
            let target_logit = if softcap.is_some() {
                target.map(|j| row[j])
            } else {
                raw_target
            };
            row_grad(
                level, row, target, lse, exp_scale, c, softcap, opts.piece, peaks,
            );
            RowOut {
                lse: s.lse,
                logit_sum: s.logit_sum,
                target_logit,
            }
        },
    );
    let mut logit_sum = out.logit_sum;
    for (i, row) in stats.iter().enumerate() {
        out.lse[i] = row.lse as f32;
        out.target_logit[i] = row.target_logit.unwrap_or(f32::NAN);
        if let Some(sums) = logit_sum.as_deref_mut() {
            sums[i] = row.logit_sum as f32;
        }
    }
    out.peaks.fill(0.0);
    for peaks in task_peaks {
        for (p, q) in out.peaks.iter_mut().zip(peaks) {
            *p = p.max(q);
        }
    }
    Ok(())
}

/// Runs `f(i, row, state)` on every row of `logits` ([rows, width]) as f32, in parallel tasks
/// each with its own `init()` state: float32 rows in place, bfloat16 rows through an f32 row
/// per task that stays in cache (written back when `write_back`). Returns the per-row results
/// and the task states.
fn map_rows<R, T>(
    level: SimdLevel,
    logits: &mut Logits<'_>,
    width: usize,
    write_back: bool,
    init: impl Fn() -> T + Sync,
    f: impl Fn(usize, &mut [f32], &mut T) -> R + Sync,
) -> (Vec<R>, Vec<T>)
where
    R: Default + Send,
    T: Send,
{
    let rows = logits.len() / width;
    let per_task = threads::rows_per_task(rows, width, PAR_MIN);
    let mut results: Vec<R> = (0..rows).map(|_| R::default()).collect();
    let mut states: Vec<Option<T>> = (0..rows.div_ceil(per_task)).map(|_| None).collect();
    let (slots, tasks) = (Disjoint::new(&mut results), Disjoint::new(&mut states));
    let run = |t: usize, r: std::ops::Range<usize>, row_at: &dyn Fn(usize, &mut T) -> R| {
        // SAFETY: task t alone owns slot t and the results of its rows.
        let (out, task) = unsafe { (slots.piece(r.clone()), &mut tasks.piece(t..t + 1)[0]) };
        let mut state = init();
        for (slot, i) in out.iter_mut().zip(r) {
            *slot = row_at(i, &mut state);
        }
        *task = Some(state);
    };
    match logits {
        Logits::F32(z) => {
            let z = Disjoint::new(z);
            threads::for_each_chunk(rows, per_task, |t, r| {
                run(t, r, &|i, state| {
                    // SAFETY: row i belongs to this task alone.
                    f(i, unsafe { z.piece(i * width..(i + 1) * width) }, state)
                })
            });
        }
        Logits::Bf16(z) => {
            let z = Disjoint::new(z);
            threads::for_each_chunk(rows, per_task, |t, r| {
                let row = std::cell::RefCell::new(vec![0.0f32; width]);
                run(t, r, &|i, state| {
                    // SAFETY: row i belongs to this task alone.
                    let bits = unsafe { z.piece(i * width..(i + 1) * width) };
                    let row = &mut *row.borrow_mut();
                    simd::widen_bf16(level, bits, row);
                    let result = f(i, row, state);
                    if write_back {
                        simd::narrow_bf16(level, row, bits);
                    }
                    result
                })
            });
        }
    }
    (results, states.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::{bf16_to_f32, f32_to_bf16};

    /// Raw logits of `rows` x `vocab`, deterministic and spread over a few units.
    fn logits(rows: usize, vocab: usize) -> Vec<f32> {
        (0..rows * vocab)
            .map(|i| ((i * 7919 % 1013) as f32 / 101.3 - 5.0) * 1.3)
            .collect()
    }

    fn capped(z: f32, cap: Option<f32>) -> f64 {
        cap.map_or(z as f64, |c| c as f64 * (z as f64 / c as f64).tanh())
    }

    #[test]
    fn gradient_entries_below_the_normal_range_are_zero() {
        // p = exp(z - lse): e^-100 and e^-90 are subnormal in f32, e^-87 and e^-80 normal.
        let z0: Vec<f32> = [-100.0, -90.0, -87.0, -80.0, 0.0, -1.0]
            .into_iter()
            .cycle()
            .take(37)
            .collect();
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            let mut z = z0.clone();
            grad_row(level, &mut z, 0.0, 1.0, 0.0, None);
            for (&g, &x) in z.iter().zip(&z0) {
                let p = (x as f64).exp();
                if p < f32::MIN_POSITIVE as f64 {
                    assert_eq!(g.to_bits(), 0, "{level:?}: exp({x})");
                } else {
                    assert!(
                        (g as f64 - p).abs() <= 1e-6 * p,
                        "{level:?}: exp({x}) = {g}"
                    );
                }
            }
        }
    }

    #[test]
    fn chunked_forward_matches_float64() {
        let (rows, vocab, width) = (5, 45, 16);
        let z = logits(rows, vocab);
        let targets = [3i64, 44, -1, 16, 0];
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            for cap in [None, Some(4.0f32)] {
                let (mut lse, mut tl, mut sums) = (
                    vec![f64::NEG_INFINITY; rows],
                    vec![0.0; rows],
                    vec![0.0; rows],
                );
                for v0 in (0..vocab).step_by(width) {
                    let w = width.min(vocab - v0);
                    let mut chunk: Vec<f32> = (0..rows)
                        .flat_map(|r| z[r * vocab + v0..r * vocab + v0 + w].to_vec())
                        .collect();
                    let chunk = Chunk {
                        logits: Logits::F32(&mut chunk),
                        width: w,
                        v0,
                        softcap: cap,
                        targets: &targets,
                    };
                    let state = LseState {
                        lse: &mut lse,
                        target_logit: &mut tl,
                        logit_sum: Some(&mut sums),
                    };
                    forward_chunk(level, chunk, state).unwrap();
                }
                for r in 0..rows {
                    let row: Vec<f64> = z[r * vocab..(r + 1) * vocab]
                        .iter()
                        .map(|&v| capped(v, cap))
                        .collect();
                    let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let want = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
                    assert!(
                        (lse[r] - want).abs() < 1e-5,
                        "{level:?} {cap:?} row {r}: {} vs {want}",
                        lse[r]
                    );
                    assert!((sums[r] - row.iter().sum::<f64>()).abs() < 1e-3);
                    let t = targets[r];
                    let want_t = if t < 0 { 0.0 } else { row[t as usize] };
                    assert!((tl[r] as f64 - want_t).abs() < 1e-5);
                }
            }
        }
    }

    #[test]
    fn backward_matches_the_formula() {
        let (rows, width, v0) = (4, 37, 10);
        let raw = logits(rows, width);
        let targets = [12i64, 5, 46, -1];
        let lse = [3.0f32, 4.0, 2.5, 3.5];
        let (a, b, u) = (
            [0.5f32, 1.0, 0.25, 0.0],
            [0.4f32, 0.9, 0.2, 0.0],
            [0.01f32, 0.0, 0.02, 0.0],
        );
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            for cap in [None, Some(3.0f32)] {
                let mut dz = raw.clone();
                let chunk = Chunk {
                    logits: Logits::F32(&mut dz),
                    width,
                    v0,
                    softcap: cap,
                    targets: &targets,
                };
                let coefs = GradCoefs {
                    lse: &lse,
                    softmax: &a,
                    target: &b,
                    uniform: &u,
                };
                let peak = backward_chunk(level, chunk, coefs).unwrap();
                let mut want_peak = 0.0f64;
                for r in 0..rows {
                    for j in 0..width {
                        let z = capped(raw[r * width + j], cap);
                        let onehot = (targets[r] == (v0 + j) as i64) as u8 as f64;
                        let g = a[r] as f64 * (z - lse[r] as f64).exp()
                            - b[r] as f64 * onehot
                            - u[r] as f64;
                        if a[r] != 0.0 {
                            want_peak = want_peak.max(g.abs() / (a[r].max(b[r]) as f64));
                        }
                        let g = g * cap.map_or(1.0, |c| 1.0 - (z / c as f64).powi(2));
                        let got = dz[r * width + j] as f64;
                        assert!(
                            (got - g).abs() < 2e-6 * (1.0 + g.abs()),
                            "{level:?} {cap:?} ({r},{j}): {got} vs {g}"
                        );
                    }
                }
                assert!((peak as f64 - want_peak).abs() < 1e-5 * want_peak);
            }
        }
    }

    #[test]
    fn a_nan_row_is_never_filtered() {
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            let mut dz = logits(2, 20);
            dz[27] = f32::NAN;
            let chunk = Chunk {
                logits: Logits::F32(&mut dz),
                width: 20,
                v0: 0,
                softcap: None,
                targets: &[3, 5],
            };
            let coefs = GradCoefs {
                lse: &[3.0, f32::NAN],
                softmax: &[1.0, 1.0],
                target: &[1.0, 1.0],
                uniform: &[0.0, 0.0],
            };
            let peak = backward_chunk(level, chunk, coefs).unwrap();
            assert_eq!(peak, f32::INFINITY, "{level:?}");
            assert!(dz[20..].iter().all(|g| g.is_nan()), "{level:?}");
        }
    }

    fn to_bf16(z: &[f32]) -> Vec<Bf16> {
        z.iter().map(|&v| Bf16(f32_to_bf16(v))).collect()
    }

    #[test]
    fn bf16_logits_give_what_their_f32_values_give() {
        let (rows, width) = (3, 40);
        let bits = to_bf16(&logits(rows, width));
        let exact: Vec<f32> = bits.iter().map(|&b| bf16_to_f32(b.0)).collect();
        let targets = [3i64, -1, 39];
        let (a, b, u) = ([0.5f32, 0.0, 1.0], [0.5f32, 0.0, 1.0], [0.0f32; 3]);
        let lse = [4.0f32, 3.0, 5.0];
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            for cap in [None, Some(3.0f32)] {
                let run = |logits: Logits<'_>| {
                    let (mut l, mut t) = (vec![f64::NEG_INFINITY; rows], vec![f32::NAN; rows]);
                    let mut z = exact.clone();
                    let fwd = Chunk {
                        logits: Logits::F32(&mut z),
                        width,
                        v0: 0,
                        softcap: cap,
                        targets: &targets,
                    };
                    let state = LseState {
                        lse: &mut l,
                        target_logit: &mut t,
                        logit_sum: None,
                    };
                    forward_chunk(level, fwd, state).unwrap();
                    let chunk = Chunk {
                        logits,
                        width,
                        v0: 0,
                        softcap: cap,
                        targets: &targets,
                    };
                    let coefs = GradCoefs {
                        lse: &lse,
                        softmax: &a,
                        target: &b,
                        uniform: &u,
                    };
                    (l, t, backward_chunk(level, chunk, coefs).unwrap())
                };
                let (mut z32, mut z16) = (exact.clone(), bits.clone());
                let want = run(Logits::F32(&mut z32));
                let got = run(Logits::Bf16(&mut z16));
                assert_eq!(format!("{want:?}"), format!("{got:?}"), "{level:?} {cap:?}");
                assert_eq!(z16, to_bf16(&z32), "{level:?} {cap:?}");
            }
        }
    }

    #[test]
    fn fused_rows_are_the_forward_then_the_backward() {
        let (rows, width, piece) = (4, 45, 16);
        let raw = logits(rows, width);
        let targets = [3i64, -1, 44, 20];
        let (scale, ls, z_loss) = (0.25f32, 0.1f64, 0.01f64);
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            for cap in [None, Some(4.0f32)] {
                let mut z = raw.clone();
                z[width + 2] = f32::NAN; // the row without a target: its NaN reaches nothing
                let (mut lse, mut tl, mut sums) =
                    (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows]);
                let mut peaks = vec![0.0f32; 3];
                let chunk = Chunk {
                    logits: Logits::F32(&mut z),
                    width,
                    v0: 0,
                    softcap: cap,
                    targets: &targets,
                };
                let opts = LossGrad {
                    scale,
                    label_smoothing: ls,
                    z_loss,
                    piece,
                };
                let out = LossGradOut {
                    lse: &mut lse,
                    target_logit: &mut tl,
                    logit_sum: Some(&mut sums),
                    peaks: &mut peaks,
                };
                loss_grad_rows(level, chunk, opts, out).unwrap();
                assert!(tl[1].is_nan() && z[width..2 * width].iter().all(|&g| g == 0.0));
                // The same through the chunk passes, with the coefficients of the module doc.
                let mut want_peaks = [0.0f32; 3];
                for r in [0, 2, 3] {
                    let row: Vec<f64> = raw[r * width..(r + 1) * width]
                        .iter()
                        .map(|&v| capped(v, cap))
                        .collect();
                    let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let want_lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
                    assert!((lse[r] as f64 - want_lse).abs() < 1e-5);
                    assert!((sums[r] as f64 - row.iter().sum::<f64>()).abs() < 1e-3);
                    assert!((tl[r] as f64 - row[targets[r] as usize]).abs() < 1e-5);
                    let a = scale as f64 * (1.0 + 2.0 * z_loss * lse[r] as f64);
                    let (b, u) = (scale as f64 * (1.0 - ls), scale as f64 * ls / width as f64);
                    for (j, &zj) in row.iter().enumerate() {
                        let onehot = (targets[r] == j as i64) as u8 as f64;
                        let g = a * (zj - lse[r] as f64).exp() - b * onehot - u;
                        let k = j / piece;
                        want_peaks[k] = want_peaks[k].max((g.abs() / a.max(b)) as f32);
                        let g = g * cap.map_or(1.0, |c| 1.0 - (zj / c as f64).powi(2));
                        let got = z[r * width + j] as f64;
                        assert!(
                            (got - g).abs() < 2e-6 * (1.0 + g.abs()),
                            "{level:?} {cap:?}"
                        );
                    }
                }
                for (p, w) in peaks.iter().zip(want_peaks) {
                    assert!((p - w).abs() <= 1e-5 * w, "{level:?} {cap:?}: {p} vs {w}");
                }
            }
        }
    }

    #[test]
    fn a_row_with_both_infinities_has_an_infinite_lse() {
        let level = crate::simd::detected();
        let mut row = [f32::INFINITY, f32::NEG_INFINITY, 1.0];
        assert_eq!(
            RowStats::of(level, &mut row, None, false).lse,
            f64::INFINITY
        );
        let mut row = [f32::INFINITY, f32::NAN, 1.0];
        assert!(RowStats::of(level, &mut row, None, false).lse.is_nan());
        let mut row = [f32::NEG_INFINITY, f32::NEG_INFINITY];
        assert_eq!(
            RowStats::of(level, &mut row, None, true).lse,
            f64::NEG_INFINITY
        );
    }

    #[test]
    fn log_add_exp_handles_infinities_and_nan() {
        let inf = f64::INFINITY;
        assert_eq!(log_add_exp(-inf, -inf), -inf);
        assert_eq!(log_add_exp(-inf, 2.0), 2.0);
        assert_eq!(log_add_exp(inf, 2.0), inf);
        assert!(log_add_exp(f64::NAN, -inf).is_nan());
        assert!((log_add_exp(0.0, 0.0) - std::f64::consts::LN_2).abs() < 1e-15);
    }

    #[test]
    fn bad_lengths_and_softcap_are_value_errors() {
        let mut z = vec![0.0f32; 6];
        let mut lse = vec![0.0f64; 2];
        let mut tl = vec![0.0f32; 2];
        // 6 logits are not 2 rows of 4; a negative softcap is refused.
        for (width, softcap) in [(4, None), (3, Some(-1.0))] {
            let chunk = Chunk {
                logits: Logits::F32(&mut z),
                width,
                v0: 0,
                softcap,
                targets: &[0, 1],
            };
            let state = LseState {
                lse: &mut lse,
                target_logit: &mut tl,
                logit_sum: None,
            };
            assert!(matches!(
                forward_chunk(SimdLevel::Scalar, chunk, state),
                Err(FgError::Value(_))
            ));
        }
    }
}
