//! Cut cross-entropy on the CPU: the row passes over one vocabulary chunk of logits.
//!
//! The caller (Python) walks the vocabulary in chunks, has torch's matmul write each chunk's
//! logits `e · c[v0..v0+w]ᵀ (+ bias)` into one reused [rows, w] buffer, and calls these passes:
//! the forward folds the chunk into a running log-sum-exp per row (max and sum of exponentials),
//! picks the target logit and optionally sums the logits (label smoothing); the backward turns
//! the recomputed chunk into the logit gradient in place, ready for the two gradient matmuls.
//! Nothing here ever sees more than one chunk, so memory stays O(rows x w).

use crate::error::{FgError, FgResult};
use crate::simd::{Scalar, Simd, SimdLevel};
use crate::softmax::{exp_floored, exp_shifted_sum, row_max, sum};
use crate::threads::{self, Disjoint};

/// Chunks holding fewer elements than this run on the calling thread.
const PAR_MIN: usize = 1 << 16;
/// tanh(9) rounds to 1 in f32; clamping there keeps exp(2y) finite.
const TANH_CLAMP: f32 = 9.0;

/// One vocabulary chunk of logits: `logits` is [rows, width] row-major, column `j` is
/// vocabulary entry `v0 + j`; `targets[i] < 0` means row `i` has no target.
pub struct Chunk<'a> {
    pub logits: &'a mut [f32],
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

/// The logit gradient of one row piece (without the target term) in place; returns max |dz|
/// before the softcap factor, which only shrinks it.
#[inline(always)]
unsafe fn grad_row_impl<S: Simd>(
    z: &mut [f32],
    lse: f32,
    softmax: f32,
    uniform: f32,
    cap: Option<f32>,
) -> f32 {
    #[inline(always)]
    unsafe fn grad<S: Simd>(
        z: S::V,
        lse: f32,
        softmax: f32,
        uniform: f32,
        cap: Option<f32>,
    ) -> (S::V, S::V) {
        let p = exp_floored::<S>(S::sub(z, S::splat(lse)));
        let g = S::sub(S::mul(S::splat(softmax), p), S::splat(uniform));
        let size = S::max(g, S::sub(S::splat(0.0), g));
        let g = match cap {
            // d(cap * tanh(r / cap)) / dr = 1 - (z / cap)^2
            Some(cap) => {
                let t = S::mul(z, S::splat(1.0 / cap));
                S::mul(g, S::mul_add(S::sub(S::splat(0.0), t), t, S::splat(1.0)))
            }
            None => g,
        };
        (g, size)
    }
    let p = z.as_mut_ptr();
    let mut peak = S::splat(0.0);
    let mut i = 0;
    while i + S::LANES <= z.len() {
        let (g, size) = grad::<S>(S::load(p.add(i)), lse, softmax, uniform, cap);
        S::store(p.add(i), g);
        peak = S::max(peak, size);
        i += S::LANES;
    }
    let mut out = S::to_array(peak)[..S::LANES]
        .iter()
        .fold(0.0f32, |a, &b| a.max(b));
    for v in &mut z[i..] {
        let (g, size) = grad::<Scalar>(*v, lse, softmax, uniform, cap);
        *v = g;
        out = out.max(size);
    }
    out
}

/// What one row of a chunk adds to the running state.
struct RowStats {
    lse: f64,
    logit_sum: f64,
}

impl RowStats {
    const EMPTY: RowStats = RowStats {
        lse: f64::NEG_INFINITY,
        logit_sum: 0.0,
    };

    fn of(level: SimdLevel, row: &mut [f32], softcap: Option<f32>, want_sum: bool) -> RowStats {
        if let Some(cap) = softcap {
            softcap_row(level, row, cap);
        }
        let max = row_max(level, row); // ignores NaN; the sums below catch it
        let total = (want_sum || max.is_infinite()).then(|| sum(level, row));
        let lse = match total {
            // ±inf is the answer unless a NaN (or +inf - inf) hides in the row.
            Some(t) if max.is_infinite() => {
                if t.is_nan() {
                    f64::NAN
                } else {
                    max as f64
                }
            }
            _ => max as f64 + exp_shifted_sum(level, row, max).ln(),
        };
        RowStats {
            lse,
            logit_sum: total.unwrap_or(0.0),
        }
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

/// Forward: folds `chunk` into `state` (softcap applied to the chunk in place).
pub fn forward_chunk(level: SimdLevel, chunk: Chunk<'_>, state: LseState<'_>) -> FgResult<()> {
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
    let width = chunk.width;
    let (softcap, want_sum) = (chunk.softcap, state.logit_sum.is_some());
    let mut stats: Vec<RowStats> = (0..rows).map(|_| RowStats::EMPTY).collect();
    let (logits, slots) = (Disjoint::new(chunk.logits), Disjoint::new(&mut stats));
    let per_task = threads::rows_per_task(rows, width, PAR_MIN);
    threads::for_each_chunk(rows, per_task, |_, r| {
        // SAFETY: chunks are disjoint row ranges.
        let (z, out) = unsafe { (logits.piece(r.start * width..r.end * width), slots.piece(r)) };
        for (row, slot) in z.chunks_exact_mut(width).zip(out) {
            *slot = RowStats::of(level, row, softcap, want_sum);
        }
    });
    let logits = &*chunk.logits;
    let mut logit_sum = state.logit_sum;
    for (i, row) in stats.iter().enumerate() {
        state.lse[i] = log_add_exp(state.lse[i], row.lse);
        if let Some(sums) = logit_sum.as_deref_mut() {
            sums[i] += row.logit_sum;
        }
        if let Some(j) = target_column(chunk.targets[i], chunk.v0, width) {
            state.target_logit[i] = logits[i * width + j];
        }
    }
    Ok(())
}

/// Backward: replaces the recomputed raw logits of `chunk` by the logit gradient; returns the
/// largest |dz_ij| / max(|softmax_i|, |target_i|) over the chunk (0 for rows with no gradient,
/// infinite when a row's lse or coefficients are not finite, so that its NaN reaches the
/// gradients), which the caller compares against `filter_eps` to skip the chunk's gradient
/// matmuls.
pub fn backward_chunk(level: SimdLevel, chunk: Chunk<'_>, coefs: GradCoefs<'_>) -> FgResult<f32> {
    chunk.check(
        "linear_cross_entropy",
        &[
            ("lse", coefs.lse.len()),
            ("coef_softmax", coefs.softmax.len()),
            ("coef_target", coefs.target.len()),
            ("coef_uniform", coefs.uniform.len()),
        ],
    )?;
    let (width, rows, v0, softcap) = (chunk.width, chunk.rows(), chunk.v0, chunk.softcap);
    let row_peak = |i: usize, row: &mut [f32], target: Option<usize>| -> f32 {
        let (cs, ct, cu) = (coefs.softmax[i], coefs.target[i], coefs.uniform[i]);
        if cs == 0.0 && ct == 0.0 && cu == 0.0 {
            row.fill(0.0);
            return 0.0;
        }
        if let Some(cap) = softcap {
            softcap_row(level, row, cap);
        }
        let lse = coefs.lse[i];
        let (head, tail) = match target {
            Some(j) => {
                // The one-hot term touches one column: do it apart from the vector passes.
                let z = row[j];
                let g = cs * ((z - lse) as f64).exp() as f32 - cu - ct;
                row[j] = match softcap {
                    Some(cap) => g * (1.0 - (z / cap) * (z / cap)),
                    None => g,
                };
                let (head, rest) = row.split_at_mut(j);
                (
                    grad_row(level, head, lse, cs, cu, softcap).max(g.abs()),
                    &mut rest[1..],
                )
            }
            None => (0.0, row),
        };
        let peak = head.max(grad_row(level, tail, lse, cs, cu, softcap));
        // A NaN or infinite lse or coefficient puts NaN in dz, which the max above drops:
        // such a row must never let the caller filter its chunk away.
        if !(lse.is_finite() && cs.is_finite() && ct.is_finite() && cu.is_finite()) {
            return f32::INFINITY;
        }
        peak / cs.abs().max(ct.abs())
    };
    let per_task = threads::rows_per_task(rows, width, PAR_MIN);
    let mut peaks = vec![0.0f32; rows.div_ceil(per_task)];
    let (logits, slots) = (Disjoint::new(chunk.logits), Disjoint::new(&mut peaks));
    threads::for_each_chunk(rows, per_task, |t, r| {
        // SAFETY: chunks are disjoint row ranges; task t alone owns slot t.
        let (z, peak) = unsafe {
            (
                logits.piece(r.start * width..r.end * width),
                slots.piece(t..t + 1),
            )
        };
        peak[0] = z
            .chunks_exact_mut(width)
            .zip(r)
            .map(|(row, i)| row_peak(i, row, target_column(chunk.targets[i], v0, width)))
            .fold(0.0, f32::max);
    });
    Ok(peaks.into_iter().fold(0.0, f32::max))
}

#[cfg(test)]
mod tests {
    use super::*;

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
                        logits: &mut chunk,
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
                    logits: &mut dz,
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
                logits: &mut dz,
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
                logits: &mut z,
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
