//! The fused Adam-family step of SPAM / Stable-SPAM and its sparse-momentum bookkeeping.
//!
//! One pass per tensor reads p, g, m, v and writes p, m, v. The loops are plain element code
//! compiled once per SIMD path by `dispatch!` (LLVM vectorizes them for each target); with no
//! FMA contraction every path gives bit-identical results.
//!
//! Sparse momentum keeps m and v only for an active subset of coordinates, marked in a bitmask
//! (1 bit per parameter, little-endian within each byte) and stored compactly in index order,
//! so the state costs 8 * density + 0.125 bytes per parameter.

use crate::dispatch;
use crate::error::{FgError, FgResult};
use crate::rng::SplitMix64;
use crate::simd::Simd;
use crate::threads::{self, Disjoint};

/// Elements below which a step runs on the calling thread (a multiple of 8: whole mask bytes).
const CHUNK: usize = 1 << 16;

/// The scalars of one step on one tensor. Combinations such as `1 - lr * weight_decay` come
/// precomputed (in f64 by the caller, then rounded), as a plain torch implementation gets them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepScalars {
    /// 1 - lr * weight_decay
    pub decay: f32,
    /// lr times SPAM's warmup factor (lr alone when none applies)
    pub step_size: f32,
    pub beta1: f32,
    pub beta2: f32,
    /// 1 - beta1 and 1 - beta2
    pub one_minus_beta1: f32,
    pub one_minus_beta2: f32,
    pub eps: f32,
    /// 1 - beta1^k and 1 - beta2^k for the bias-correction counter k.
    pub bias_correction1: f32,
    pub bias_correction2: f32,
    /// SPAM spike clipping: |g| is capped at sqrt(threshold * v) (v of the previous step);
    /// `None` while clipping is inactive.
    pub spike_threshold: Option<f32>,
    /// Stable-SPAM: entries with |g| > `adaclip_bound` are multiplied by `adaclip_ratio`, then
    /// every entry by `grad_scale` (AdaGN). Neutral values: infinity, 1, 1.
    pub adaclip_bound: f32,
    pub adaclip_ratio: f32,
    pub grad_scale: f32,
}

impl StepScalars {
    pub fn validate(&self, op: &str) -> FgResult<()> {
        let finite = [
            ("decay", self.decay),
            ("step_size", self.step_size),
            ("betas", self.beta1 + self.beta2),
            ("eps", self.eps),
        ];
        for (name, v) in finite {
            if !v.is_finite() {
                return Err(FgError::Value(format!(
                    "{op}: {name} must be finite, got {v}"
                )));
            }
        }
        if self.bias_correction1 <= 0.0 || self.bias_correction2 <= 0.0 {
            return Err(FgError::Value(format!(
                "{op}: bias corrections must be positive (betas in [0, 1))"
            )));
        }
        Ok(())
    }

    /// The update of one coordinate: returns (p, m, v).
    #[inline(always)]
    fn apply(&self, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let mut g = g;
        if self.adaclip_bound.abs() < f32::INFINITY && g.abs() > self.adaclip_bound {
            g *= self.adaclip_ratio;
        }
        g *= self.grad_scale;
        if let Some(threshold) = self.spike_threshold {
            let cap = (threshold * v).sqrt();
            g = g.max(-cap).min(cap); // not clamp: a NaN cap must not panic
        }
        let m = self.beta1 * m + self.one_minus_beta1 * g;
        let v = self.beta2 * v + self.one_minus_beta2 * g * g;
        // Reciprocals (hoisted out of the loops) keep one division per element: the step is
        // otherwise bound by divider throughput, not memory.
        let (inv1, inv2) = (1.0 / self.bias_correction1, 1.0 / self.bias_correction2);
        let update = (m * inv1) / ((v * inv2).sqrt() + self.eps);
        (p * self.decay - self.step_size * update, m, v)
    }
}

// `S` only selects the target features the loop is compiled (and vectorized) for.
#[allow(clippy::extra_unused_type_parameters)]
#[inline(always)]
unsafe fn dense_step_impl<S: Simd>(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    s: &StepScalars,
) {
    for (((pi, &gi), mi), vi) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        (*pi, *mi, *vi) = s.apply(*pi, gi, *mi, *vi);
    }
}

/// The sparse step per backend: AVX-512 compresses the active coordinates into a dense run
/// (see its impl); the others walk the set bits.
trait SparseStep {
    #[inline(always)]
    unsafe fn sparse_step(
        p: &mut [f32],
        g: &[f32],
        mask: &[u8],
        m: &mut [f32],
        v: &mut [f32],
        s: &StepScalars,
    ) {
        sparse_step_bits(p, g, mask, m, v, s)
    }
}

impl SparseStep for crate::simd::Scalar {}

#[cfg(target_arch = "x86_64")]
impl SparseStep for crate::simd::Avx2 {}

#[cfg(target_arch = "x86_64")]
impl SparseStep for crate::simd::Avx512 {
    /// Per cache-sized chunk: compress the active p and g into small buffers (register
    /// compress, full-vector stores), run the vectorized dense update on them, expand the new
    /// p back into the decayed blocks. Only active coordinates pay for the arithmetic.
    #[inline(always)]
    unsafe fn sparse_step(
        p: &mut [f32],
        g: &[f32],
        mask: &[u8],
        m: &mut [f32],
        v: &mut [f32],
        s: &StepScalars,
    ) {
        use std::arch::x86_64::*;
        const BLOCKS: usize = 256; // 4096 elements per chunk; the buffers stay in L1
        let mut active_p = [0.0f32; BLOCKS * 16 + 16];
        let mut active_g = [0.0f32; BLOCKS * 16 + 16];
        let decay = _mm512_set1_ps(s.decay);
        let blocks = p.len() / 16;
        let mut j = 0;
        for first in (0..blocks).step_by(BLOCKS) {
            let chunk = first..(first + BLOCKS).min(blocks);
            let bits_of = |blk: usize| u16::from_le_bytes([mask[2 * blk], mask[2 * blk + 1]]);
            let mut n = 0;
            for blk in chunk.clone() {
                let bits = bits_of(blk);
                let pv = _mm512_loadu_ps(p.as_ptr().add(16 * blk));
                let gv = _mm512_loadu_ps(g.as_ptr().add(16 * blk));
                _mm512_storeu_ps(
                    active_p.as_mut_ptr().add(n),
                    _mm512_maskz_compress_ps(bits, pv),
                );
                _mm512_storeu_ps(
                    active_g.as_mut_ptr().add(n),
                    _mm512_maskz_compress_ps(bits, gv),
                );
                n += bits.count_ones() as usize;
            }
            dense_step_impl::<Self>(
                &mut active_p[..n],
                &active_g[..n],
                &mut m[j..j + n],
                &mut v[j..j + n],
                s,
            );
            let mut k = 0;
            for blk in chunk {
                let bits = bits_of(blk);
                let pp = p.as_mut_ptr().add(16 * blk);
                let decayed = _mm512_mul_ps(_mm512_loadu_ps(pp), decay);
                let stepped = _mm512_loadu_ps(active_p.as_ptr().add(k));
                _mm512_storeu_ps(pp, _mm512_mask_expand_ps(decayed, bits, stepped));
                k += bits.count_ones() as usize;
            }
            j += n;
        }
        let done = 16 * blocks;
        sparse_step_bits(
            &mut p[done..],
            &g[done..],
            &mask[done / 8..],
            &mut m[j..],
            &mut v[j..],
            s,
        )
    }
}

#[inline(always)]
unsafe fn sparse_step_impl<S: SparseStep>(
    p: &mut [f32],
    g: &[f32],
    mask: &[u8],
    m: &mut [f32],
    v: &mut [f32],
    s: &StepScalars,
) {
    S::sparse_step(p, g, mask, m, v, s)
}

/// The Adam update on the active coordinates (bitmask order), weight decay alone on the others.
#[inline(always)]
fn sparse_step_bits(
    p: &mut [f32],
    g: &[f32],
    mask: &[u8],
    m: &mut [f32],
    v: &mut [f32],
    s: &StepScalars,
) {
    let mut j = 0;
    for (byte_index, &byte) in mask.iter().enumerate() {
        let base = byte_index * 8;
        if s.decay == 1.0 {
            // Inactive coordinates do not change: visit the set bits only.
            let mut bits = byte;
            while bits != 0 {
                let i = base + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                (p[i], m[j], v[j]) = s.apply(p[i], g[i], m[j], v[j]);
                j += 1;
            }
            continue;
        }
        let end = (base + 8).min(p.len());
        for (bit, pi) in p[base..end].iter_mut().enumerate() {
            if byte >> bit & 1 == 1 {
                (*pi, m[j], v[j]) = s.apply(*pi, g[base + bit], m[j], v[j]);
                j += 1;
            } else {
                *pi *= s.decay;
            }
        }
    }
}

dispatch! {
    fn dense_step_dispatch(
        p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &StepScalars
    ) = dense_step_impl;
    fn sparse_step_dispatch(
        p: &mut [f32], g: &[f32], mask: &[u8], m: &mut [f32], v: &mut [f32], s: &StepScalars
    ) = sparse_step_impl;
}

/// One dense step over a whole tensor.
pub fn dense_step(
    level: crate::simd::SimdLevel,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    s: &StepScalars,
) -> FgResult<()> {
    let op = "spam_step";
    s.validate(op)?;
    if [g.len(), m.len(), v.len()] != [p.len(); 3] {
        return Err(FgError::Value(format!(
            "{op}: param, grad, exp_avg and exp_avg_sq must have the same number of elements"
        )));
    }
    let chunk = CHUNK.max(p.len().div_ceil(threads::num_threads()));
    if p.len() <= CHUNK {
        dense_step_dispatch(level, p, g, m, v, s);
        return Ok(());
    }
    let (p, m, v) = (Disjoint::new(p), Disjoint::new(m), Disjoint::new(v));
    threads::for_each_chunk(g.len(), chunk, |_, r| {
        // SAFETY: the chunks are disjoint ranges.
        let (p, m, v) = unsafe { (p.piece(r.clone()), m.piece(r.clone()), v.piece(r.clone())) };
        dense_step_dispatch(level, p, &g[r], m, v, s)
    });
    Ok(())
}

/// One sparse step: `mask` marks the coordinates whose compact moments are `m`, `v`.
pub fn sparse_step(
    level: crate::simd::SimdLevel,
    p: &mut [f32],
    g: &[f32],
    mask: &[u8],
    m: &mut [f32],
    v: &mut [f32],
    s: &StepScalars,
) -> FgResult<()> {
    let op = "spam_step";
    s.validate(op)?;
    if g.len() != p.len() || mask.len() != p.len().div_ceil(8) {
        return Err(FgError::Value(format!(
            "{op}: grad must match param and mask must hold one bit per element"
        )));
    }
    let active = count_active(mask, p.len());
    if m.len() != active || v.len() != active {
        return Err(FgError::Value(format!(
            "{op}: the mask marks {active} coordinates but exp_avg has {} and exp_avg_sq {}",
            m.len(),
            v.len()
        )));
    }
    if p.len() <= CHUNK {
        sparse_step_dispatch(level, p, g, mask, m, v, s);
        return Ok(());
    }
    // Pieces of whole mask bytes; each piece's moments start after the active coordinates of
    // the pieces before it.
    let bytes_per_piece = (CHUNK.max(p.len().div_ceil(threads::num_threads()))) / 8;
    let mut pieces = Vec::new();
    let (mut elems_done, mut active_done) = (0, 0);
    for mask_piece in mask.chunks(bytes_per_piece) {
        let elems = (mask_piece.len() * 8).min(p.len() - elems_done);
        let active = count_active(mask_piece, elems);
        pieces.push((
            mask_piece,
            elems_done..elems_done + elems,
            active_done..active_done + active,
        ));
        (elems_done, active_done) = (elems_done + elems, active_done + active);
    }
    let (p, m, v) = (Disjoint::new(p), Disjoint::new(m), Disjoint::new(v));
    threads::split(pieces.len(), |i| {
        let (mask, elems, moments) = pieces[i].clone();
        // SAFETY: the pieces' element and moment ranges are disjoint.
        let (p, m, v) = unsafe {
            (
                p.piece(elems.clone()),
                m.piece(moments.clone()),
                v.piece(moments),
            )
        };
        sparse_step_dispatch(level, p, &g[elems], mask, m, v, s)
    });
    Ok(())
}

/// Set bits among the first `numel` of the mask.
pub fn count_active(mask: &[u8], numel: usize) -> usize {
    let full = numel / 8;
    let mut count: usize = mask[..full.min(mask.len())]
        .iter()
        .map(|b| b.count_ones() as usize)
        .sum();
    if !numel.is_multiple_of(8) {
        if let Some(&last) = mask.get(full) {
            count += (last & ((1u8 << (numel % 8)) - 1)).count_ones() as usize;
        }
    }
    count
}

/// Draws exactly `k` of `numel` coordinates uniformly without replacement (Knuth's selection
/// sampling), as a bitmask; advances `rng`.
pub fn sample_mask(numel: usize, k: usize, rng: &mut SplitMix64) -> FgResult<Vec<u8>> {
    if k > numel {
        return Err(FgError::Value(format!(
            "sample_mask: cannot draw {k} of {numel} coordinates"
        )));
    }
    let mut mask = vec![0u8; numel.div_ceil(8)];
    let mut needed = k;
    for i in 0..numel {
        if needed == 0 {
            break;
        }
        let remaining = (numel - i) as u64;
        // Keep coordinate i with probability needed / remaining.
        if rng.below(remaining) < needed as u64 {
            mask[i / 8] |= 1 << (i % 8);
            needed -= 1;
        }
    }
    Ok(mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::SimdLevel;

    fn scalars() -> StepScalars {
        StepScalars {
            decay: 0.999,
            step_size: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            one_minus_beta1: 0.1,
            one_minus_beta2: 0.001,
            eps: 1e-6,
            bias_correction1: 0.1,
            bias_correction2: 0.001,
            spike_threshold: Some(5000.0),
            adaclip_bound: f32::INFINITY,
            adaclip_ratio: 1.0,
            grad_scale: 1.0,
        }
    }

    #[test]
    fn every_path_gives_the_same_bits() {
        let n = 1037;
        let p0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() * 1e3).collect();
        let v0: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 1e-3).collect();
        let mut results = Vec::new();
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            let (mut p, mut m, mut v) = (p0.clone(), vec![0.1f32; n], v0.clone());
            dense_step(level, &mut p, &g, &mut m, &mut v, &scalars()).unwrap();
            results.push((p, m, v));
        }
        assert!(results.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn spikes_are_capped_by_the_previous_second_moment() {
        let s = scalars();
        let (_, m, _) = s.apply(0.0, 1e6, 0.0, 4e-6);
        let cap = (5000.0f32 * 4e-6).sqrt();
        assert_eq!(m, 0.1 * cap);
    }

    #[test]
    fn masks_hold_exactly_k_and_differ_by_seed() {
        let mut rng = SplitMix64::new(1);
        let a = sample_mask(1000, 250, &mut rng).unwrap();
        let b = sample_mask(1000, 250, &mut rng).unwrap();
        assert_eq!(count_active(&a, 1000), 250);
        assert_eq!(count_active(&b, 1000), 250);
        assert_ne!(a, b);
        assert!(sample_mask(10, 11, &mut rng).is_err());
        assert_eq!(
            count_active(&sample_mask(13, 13, &mut rng).unwrap(), 13),
            13
        );
    }

    #[test]
    fn sparse_paths_give_the_same_bits() {
        let n = 1000; // not a multiple of 16: the tail runs too
        let mask = sample_mask(n, 333, &mut SplitMix64::new(5)).unwrap();
        let g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).sin() * 50.0).collect();
        let mut results = Vec::new();
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            let mut p: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).cos()).collect();
            let (mut m, mut v) = (vec![0.01f32; 333], vec![1e-4f32; 333]);
            let mut s = scalars();
            s.adaclip_bound = 20.0;
            s.adaclip_ratio = 0.5;
            sparse_step(level, &mut p, &g, &mask, &mut m, &mut v, &s).unwrap();
            results.push((p, m, v));
        }
        assert!(results.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn sparse_step_matches_dense_on_active_coordinates() {
        let n = 100;
        let mut rng = SplitMix64::new(3);
        let mask = sample_mask(n, 30, &mut rng).unwrap();
        let g: Vec<f32> = (0..n).map(|i| i as f32 - 50.0).collect();
        let mut p: Vec<f32> = vec![1.0; n];
        let (mut m, mut v) = (vec![0.0f32; 30], vec![0.0f32; 30]);
        let mut s = scalars();
        s.spike_threshold = None;
        sparse_step(SimdLevel::Scalar, &mut p, &g, &mask, &mut m, &mut v, &s).unwrap();
        let mut j = 0;
        for i in 0..n {
            if mask[i / 8] >> (i % 8) & 1 == 1 {
                let (pi, mi, vi) = s.apply(1.0, g[i], 0.0, 0.0);
                assert_eq!(p[i], pi);
                assert_eq!((m[j], v[j]), (mi, vi));
                j += 1;
            } else {
                assert_eq!(p[i], s.decay);
            }
        }
    }
}
