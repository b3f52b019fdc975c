//! The fused Adam-family step of SPAM / Stable-SPAM, its sparse-momentum bookkeeping and
//! Stable-SPAM's gradient statistics.
//!
//! One pass per tensor reads p, g, m, v and writes p, m, v (28 bytes per float32 parameter,
//! the least an Adam step can move). The loops are plain element code compiled once per SIMD
//! path by `dispatch!` (LLVM vectorizes them for each target); with no FMA contraction every
//! path gives bit-identical results. Parameters (and their gradients) are float32 or bfloat16
//! ([`Param`]); the moments are always float32.
//!
//! Sparse momentum keeps m and v only for an active subset of coordinates, marked in a bitmask
//! (1 bit per parameter, little-endian within each byte) and stored compactly in index order,
//! so the state costs 8 * density + 0.125 bytes per parameter ([`sparse`] has the step).

mod sparse;
mod stats;

pub use stats::{adaclip_stats, AdaClip, ClipInput, StatsParam};

use std::ops::Range;

use crate::dispatch;
use crate::error::{FgError, FgResult};
use crate::rng::SplitMix64;
use crate::simd::{Bf16, SimdLevel, Storage};
use crate::threads::{self, Disjoint};

/// Elements below which a step runs on the calling thread.
const CHUNK: usize = 1 << 16;
/// Parallel parts are whole multiples of this many elements (whole mask bytes, whole
/// [`sparse::CHUNK`]s).
const ALIGN: usize = sparse::CHUNK;
/// Elements per block of the dense loop: spike clipping is decided per block.
const BLOCK: usize = 16;
/// Elements ahead of the block being stepped that the dense step prefetches from its four
/// streams: the hardware prefetchers alone left a step from memory short of reads in flight
/// (Xeon family 6 model 207, 2 threads, 1e7 float32 parameters: 6.3-6.5 ms without, 5.6-6.0
/// at 256-768 elements, 6.7-6.9 at 2048; a plain C loop of the same traffic reaches the same).
const PREFETCH: usize = 512;
/// Steps that move at least this many bytes (as dense float32 ones: [`DENSE_BYTES`] a
/// parameter) prefetch their streams on Intel CPUs ([`streams`]); smaller ones mostly find
/// their state in cache when stepped back to back, where the prefetch instructions cost (1e6
/// parameters: dense +4%, sparse +30%).
const STREAM_BYTES: usize = 32 << 20;
/// Read p, g, m, v; write p, m, v.
const DENSE_BYTES: usize = 28;

/// A parameter (and gradient) element type: float32 or bfloat16. Arithmetic is float32.
/// Every type but f32 is [`Bf16`] ([`Storage::IS_F32`] tells them apart): the vector paths widen
/// and round it in registers.
pub trait Param: Storage {
    /// The dense and sparse steps of this type on one SIMD path.
    fn dense(
        level: SimdLevel,
        p: &mut [Self],
        g: &[Self],
        m: &mut [f32],
        v: &mut [f32],
        s: &StepScalars,
        stream: bool,
    );
    #[allow(clippy::too_many_arguments)]
    fn sparse(
        level: SimdLevel,
        p: &mut [Self],
        g: &[Self],
        mask: &[u8],
        m: &mut [f32],
        v: &mut [f32],
        s: &StepScalars,
        stream: bool,
    );
}

impl Param for f32 {
    fn dense(
        level: SimdLevel,
        p: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        s: &StepScalars,
        stream: bool,
    ) {
        dense_f32(level, p, g, m, v, s, stream)
    }
    fn sparse(
        level: SimdLevel,
        p: &mut [f32],
        g: &[f32],
        mask: &[u8],
        m: &mut [f32],
        v: &mut [f32],
        s: &StepScalars,
        stream: bool,
    ) {
        sparse_f32(level, p, g, mask, m, v, s, stream)
    }
}

impl Param for Bf16 {
    fn dense(
        level: SimdLevel,
        p: &mut [Bf16],
        g: &[Bf16],
        m: &mut [f32],
        v: &mut [f32],
        s: &StepScalars,
        stream: bool,
    ) {
        dense_bf16(level, p, g, m, v, s, stream)
    }
    fn sparse(
        level: SimdLevel,
        p: &mut [Bf16],
        g: &[Bf16],
        mask: &[u8],
        m: &mut [f32],
        v: &mut [f32],
        s: &StepScalars,
        stream: bool,
    ) {
        sparse_bf16(level, p, g, mask, m, v, s, stream)
    }
}

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

    /// Whether AdaClip or AdaGN change any gradient entry (Stable-SPAM); SPAM's neutral
    /// values leave every entry as it is (g * 1 is g), so its loops skip them.
    fn scales_grad(&self) -> bool {
        self.adaclip_bound.abs() < f32::INFINITY || self.grad_scale != 1.0
    }

    /// AdaClip and AdaGN: the gradient entry the moments see (before spike clipping).
    #[inline(always)]
    fn scale_grad(&self, g: f32) -> f32 {
        // A bound that is not finite clips nothing; as infinity it needs no test of its own
        // per entry (|g| > inf is false, NaN included).
        let bound = if self.adaclip_bound.abs() < f32::INFINITY {
            self.adaclip_bound
        } else {
            f32::INFINITY
        };
        // g * 1 is g: the same bits as clipping only the entries above the bound.
        let ratio = if g.abs() > bound {
            self.adaclip_ratio
        } else {
            1.0
        };
        g * ratio * self.grad_scale
    }

    /// [`Self::scale_grad`] where `SCALED`, else `g` (the loops are compiled for both).
    #[inline(always)]
    fn grad_entry<const SCALED: bool>(&self, g: f32) -> f32 {
        if SCALED {
            self.scale_grad(g)
        } else {
            g
        }
    }

    /// The moments and the step from the final gradient entry: returns (step, m, v); the
    /// parameter becomes `p * decay - step`.
    #[inline(always)]
    fn moments(&self, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let m = self.beta1 * m + self.one_minus_beta1 * g;
        let v = self.beta2 * v + self.one_minus_beta2 * g * g;
        // Reciprocals (hoisted out of the loops) keep one division per element: the step is
        // otherwise bound by divider throughput, not memory.
        let (inv1, inv2) = (1.0 / self.bias_correction1, 1.0 / self.bias_correction2);
        let update = (m * inv1) / ((v * inv2).sqrt() + self.eps);
        (self.step_size * update, m, v)
    }

    /// The update of one coordinate: returns (p, m, v).
    #[inline(always)]
    fn apply(&self, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let mut g = self.scale_grad(g);
        if let Some(threshold) = self.spike_threshold {
            g = spike_clip(g, threshold, v);
        }
        let (step, m, v) = self.moments(g, m, v);
        (p * self.decay - step, m, v)
    }
}

/// SPAM's spike clipping: g capped at sqrt(threshold * v).
#[inline(always)]
fn spike_clip(g: f32, threshold: f32, v: f32) -> f32 {
    let cap = (threshold * v).sqrt();
    // NaN in g or the cap stays NaN, as torch.minimum / maximum keep it (f32::max and min
    // return the other operand: a NaN gradient became the cap; not clamp: it panics on NaN).
    if g.is_nan() || cap.is_nan() {
        f32::NAN
    } else {
        g.max(-cap).min(cap)
    }
}

/// Whether `spike_clip(g, threshold, v)` certainly returns `g` (|g| < the cap), decided
/// without the square root: g^2 < (threshold * v) * (1 - 2^-20), both sides rounded, with the
/// right side normal, puts |g| below sqrt(threshold * v) * (1 - 2^-22), hence below the
/// rounded cap. False (check exactly) for NaN, infinities and the rare near or real spikes.
#[inline(always)]
fn below_spike(g: f32, threshold: f32, v: f32) -> bool {
    let bound = threshold * v * (1.0 - 1.0 / (1u32 << 20) as f32);
    g * g < bound && bound >= f32::MIN_POSITIVE
}

/// The moments (in place) and the steps of one block of raw gradient entries.
/// `SCALED`: whether AdaClip / AdaGN apply ([`StepScalars::scales_grad`]).
#[inline(always)]
fn block_steps<P: Param, const SCALED: bool>(
    s: &StepScalars,
    g: &[P],
    m: &mut [f32],
    v: &mut [f32],
    steps: &mut [f32; BLOCK],
) {
    let (g, m, v) = (&g[..BLOCK], &mut m[..BLOCK], &mut v[..BLOCK]);
    let mut gs = [0.0f32; BLOCK];
    match s.spike_threshold {
        Some(threshold) => {
            let mut quiet = true;
            for i in 0..BLOCK {
                gs[i] = s.grad_entry::<SCALED>(g[i].to_f32());
                quiet &= below_spike(gs[i], threshold, v[i]);
            }
            if !quiet {
                // The cap costs a square root per element; spikes are rare, so a block takes
                // it only when some entry may reach its cap (the result is the same either way).
                for i in 0..BLOCK {
                    gs[i] = spike_clip(gs[i], threshold, v[i]);
                }
            }
        }
        None => {
            // One loop from g to the step: through `gs`, LLVM vectorized AdaClip's select
            // per lane and piece (1.1 cycles more per entry on Zen 3).
            for i in 0..BLOCK {
                let g = s.grad_entry::<SCALED>(g[i].to_f32());
                (steps[i], m[i], v[i]) = s.moments(g, m[i], v[i]);
            }
            return;
        }
    }
    for i in 0..BLOCK {
        (steps[i], m[i], v[i]) = s.moments(gs[i], m[i], v[i]);
    }
}

// `S` only selects the target features the loop is compiled (and vectorized) for.
#[allow(clippy::extra_unused_type_parameters)]
#[inline(always)]
unsafe fn dense_step_impl<S, P: Param>(
    p: &mut [P],
    g: &[P],
    m: &mut [f32],
    v: &mut [f32],
    s: &StepScalars,
    stream: bool,
) {
    if s.scales_grad() {
        dense_blocks::<P, true>(p, g, m, v, s, stream)
    } else {
        dense_blocks::<P, false>(p, g, m, v, s, stream)
    }
}

/// The dense step over one part; `stream`: prefetch [`PREFETCH`] elements ahead (the state
/// comes from memory).
#[inline(always)]
fn dense_blocks<P: Param, const SCALED: bool>(
    p: &mut [P],
    g: &[P],
    m: &mut [f32],
    v: &mut [f32],
    s: &StepScalars,
    stream: bool,
) {
    let n = p.len() / BLOCK * BLOCK; // whole blocks; the tail runs element by element
    let (pb, pt) = p.split_at_mut(n);
    let (gb, gt) = g.split_at(n);
    let (mb, mt) = m.split_at_mut(n);
    let (vb, vt) = v.split_at_mut(n);
    let (pp, gp, mp, vp) = (pb.as_ptr(), gb.as_ptr(), mb.as_ptr(), vb.as_ptr());
    let chunks = pb
        .chunks_exact_mut(BLOCK)
        .zip(gb.chunks_exact(BLOCK))
        .zip(mb.chunks_exact_mut(BLOCK))
        .zip(vb.chunks_exact_mut(BLOCK));
    let mut steps = [0.0f32; BLOCK];
    for (b, (((pc, gc), mc), vc)) in chunks.enumerate() {
        if stream {
            let at = b * BLOCK + PREFETCH;
            crate::simd::prefetch_at(pp, n, at);
            crate::simd::prefetch_at(gp, n, at);
            crate::simd::prefetch_at(mp, n, at);
            crate::simd::prefetch_at(vp, n, at);
        }
        block_steps::<P, SCALED>(s, gc, mc, vc, &mut steps);
        for i in 0..BLOCK {
            pc[i] = P::from_f32(pc[i].to_f32() * s.decay - steps[i]);
        }
    }
    for (((pi, gi), mi), vi) in pt.iter_mut().zip(gt).zip(mt.iter_mut()).zip(vt.iter_mut()) {
        let (np, nm, nv) = s.apply(pi.to_f32(), gi.to_f32(), *mi, *vi);
        (*pi, *mi, *vi) = (P::from_f32(np), nm, nv);
    }
}

/// The steps of whole blocks of raw gradient entries `g`, written over them; m, v in place.
#[allow(clippy::extra_unused_type_parameters)]
#[inline(always)]
unsafe fn steps_in_place<S>(g: &mut [f32], m: &mut [f32], v: &mut [f32], s: &StepScalars) {
    let chunks = g
        .chunks_exact_mut(BLOCK)
        .zip(m.chunks_exact_mut(BLOCK))
        .zip(v.chunks_exact_mut(BLOCK));
    let mut steps = [0.0f32; BLOCK];
    for ((gc, mc), vc) in chunks {
        if s.scales_grad() {
            block_steps::<f32, true>(s, gc, mc, vc, &mut steps);
        } else {
            block_steps::<f32, false>(s, gc, mc, vc, &mut steps);
        }
        gc.copy_from_slice(&steps);
    }
}

dispatch! {
    fn dense_f32(
        p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &StepScalars, stream: bool
    ) = dense_step_impl<f32>;
    fn dense_bf16(
        p: &mut [Bf16], g: &[Bf16], m: &mut [f32], v: &mut [f32], s: &StepScalars, stream: bool
    ) = dense_step_impl<Bf16>;
    fn sparse_f32(
        p: &mut [f32], g: &[f32], mask: &[u8], m: &mut [f32], v: &mut [f32], s: &StepScalars,
        stream: bool
    ) = sparse_step_impl<f32>;
    fn sparse_bf16(
        p: &mut [Bf16], g: &[Bf16], mask: &[u8], m: &mut [f32], v: &mut [f32], s: &StepScalars,
        stream: bool
    ) = sparse_step_impl<Bf16>;
}

#[inline(always)]
unsafe fn sparse_step_impl<S: sparse::Sparse, P: Param>(
    p: &mut [P],
    g: &[P],
    mask: &[u8],
    m: &mut [f32],
    v: &mut [f32],
    s: &StepScalars,
    stream: bool,
) {
    sparse::step::<S, P>(p, g, mask, m, v, s, stream)
}

/// Elements per parallel part ([`threads::part_size`]), whole multiples of [`ALIGN`].
fn part_len(numel: usize) -> usize {
    CHUNK.max(threads::part_size(numel).div_ceil(ALIGN) * ALIGN)
}

/// One tensor of a step: the parameter, its gradient, its moments (with `mask`, one bit per
/// element, compact: for the marked coordinates only, in order; the others get weight decay
/// alone) and the scalars of its step.
pub struct TensorStep<'a, P> {
    pub p: &'a mut [P],
    pub g: &'a [P],
    pub mask: Option<&'a [u8]>,
    pub m: &'a mut [f32],
    pub v: &'a mut [f32],
    pub s: StepScalars,
}

/// One parallel part: a run of one tensor's elements, its moments and its mask bytes.
struct Part {
    tensor: usize,
    elems: Range<usize>,
    moments: Range<usize>,
    bytes: Range<usize>,
}

impl<P> TensorStep<'_, P> {
    /// Checks the tensor (`what` names it in errors) and appends its parts of `part` elements
    /// (whole mask bytes: a part's moments start after the active coordinates of the parts
    /// before it).
    fn cut(&self, what: &str, tensor: usize, part: usize, parts: &mut Vec<Part>) -> FgResult<()> {
        self.s.validate(what)?;
        let numel = self.p.len();
        let Some(mask) = self.mask else {
            if [self.g.len(), self.m.len(), self.v.len()] != [numel; 3] {
                return Err(FgError::Value(format!(
                    "{what}: param, grad, exp_avg and exp_avg_sq must have the same number of \
                     elements"
                )));
            }
            parts.extend((0..numel).step_by(part).map(|start| {
                let elems = start..(start + part).min(numel);
                Part {
                    tensor,
                    moments: elems.clone(),
                    elems,
                    bytes: 0..0,
                }
            }));
            return Ok(());
        };
        if self.g.len() != numel || mask.len() != numel.div_ceil(8) {
            return Err(FgError::Value(format!(
                "{what}: grad must match param and mask must hold one bit per element"
            )));
        }
        let mut active = 0;
        for start in (0..numel).step_by(part) {
            let elems = start..(start + part).min(numel);
            let bytes = start / 8..elems.end.div_ceil(8);
            let count = count_active(&mask[bytes.clone()], elems.len());
            parts.push(Part {
                tensor,
                elems,
                moments: active..active + count,
                bytes,
            });
            active += count;
        }
        if self.m.len() != active || self.v.len() != active {
            return Err(FgError::Value(format!(
                "{what}: the mask marks {active} coordinates but exp_avg has {} and exp_avg_sq {}",
                self.m.len(),
                self.v.len()
            )));
        }
        Ok(())
    }
}

/// Whether a step over `total` parameters prefetches its streams ([`PREFETCH`] ahead, and the
/// sparse step its next chunk): on Intel from [`STREAM_BYTES`] of traffic, never on AMD. AMD
/// Zen 4's hardware prefetchers keep such a step fed, and the instructions only cost there
/// (2 threads, AdamW(fused=True)'s time over ours in alternating processes, with / without:
/// 1e7 float32 dense 0.96-1.03 / 0.90-1.08x, 1e8 0.85-0.88 / 0.97-1.03x, density 0.25 1e8
/// 1.01-1.04 / 1.53-1.65x; Stable-SPAM 1e8 0.72-0.74 / 0.78-0.87x).
fn streams(total: usize) -> bool {
    total * DENSE_BYTES >= STREAM_BYTES && !crate::simd::cpu_features().amd
}

/// One step of every tensor in `tensors` (in place), their parts in one parallel region: a
/// step over a model's many tensors pays one fork and join, not one per tensor (README.md has
/// the measurement on a 29M-parameter Llama's 38 tensors). Parts are cut from the total count
/// (`part_len`), so the threads share the work whatever the tensors' sizes; each thread streams
/// its own run of parts first (`split_contiguous`).
pub fn step<P: Param>(level: SimdLevel, op: &str, tensors: Vec<TensorStep<'_, P>>) -> FgResult<()> {
    let total: usize = tensors.iter().map(|t| t.p.len()).sum();
    let part = part_len(total);
    let stream = streams(total);
    let mut parts = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let what = if tensors.len() == 1 {
            op.to_string()
        } else {
            format!("{op}: tensor {i}")
        };
        t.cut(&what, i, part, &mut parts)?;
    }
    let views: Vec<_> = tensors
        .into_iter()
        .map(|t| {
            (
                Disjoint::new(t.p),
                t.g,
                t.mask,
                Disjoint::new(t.m),
                Disjoint::new(t.v),
                t.s,
            )
        })
        .collect();
    let run = |i: usize| {
        let Part {
            tensor,
            elems,
            moments,
            bytes,
        } = &parts[i];
        let (p, g, mask, m, v, s) = &views[*tensor];
        // SAFETY: the parts of a tensor are disjoint element and moment ranges.
        let (p, m, v) = unsafe {
            (
                p.piece(elems.clone()),
                m.piece(moments.clone()),
                v.piece(moments.clone()),
            )
        };
        let g = &g[elems.clone()];
        match mask {
            Some(mask) => P::sparse(level, p, g, &mask[bytes.clone()], m, v, s, stream),
            None => P::dense(level, p, g, m, v, s, stream),
        }
    };
    if total <= CHUNK {
        (0..parts.len()).for_each(run);
    } else {
        threads::split_contiguous(parts.len(), run);
    }
    Ok(())
}

/// Set bits among the first `numel` of the mask.
pub fn count_active(mask: &[u8], numel: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("popcnt") {
        // SAFETY: the CPU has the instruction (baseline x86-64 counts bits in ~12 operations).
        return unsafe { count_active_popcnt(mask, numel) };
    }
    count_active_impl(mask, numel)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
unsafe fn count_active_popcnt(mask: &[u8], numel: usize) -> usize {
    count_active_impl(mask, numel)
}

#[inline(always)]
fn count_active_impl(mask: &[u8], numel: usize) -> usize {
    let full = (numel / 8).min(mask.len());
    let (words, bytes) = mask[..full].split_at(full / 8 * 8);
    let mut count: usize = words
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().unwrap()).count_ones() as usize)
        .sum::<usize>()
        + bytes.iter().map(|b| b.count_ones() as usize).sum::<usize>();
    if !numel.is_multiple_of(8) {
        if let Some(&last) = mask.get(numel / 8) {
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

    pub(super) fn scalars() -> StepScalars {
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

    /// The same bits, any NaN matching any NaN.
    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || a.is_nan() && b.is_nan()
    }

    fn supported() -> impl Iterator<Item = SimdLevel> {
        SimdLevel::ALL.into_iter().filter(|l| l.is_supported())
    }

    /// One tensor's step (`mask`: sparse), as `step` takes it.
    fn step_one<P: Param>(
        level: SimdLevel,
        p: &mut [P],
        g: &[P],
        mask: Option<&[u8]>,
        (m, v): (&mut [f32], &mut [f32]),
        s: &StepScalars,
    ) -> FgResult<()> {
        let s = *s;
        step(
            level,
            "spam_step",
            vec![TensorStep {
                p,
                g,
                mask,
                m,
                v,
                s,
            }],
        )
    }

    #[test]
    fn every_path_gives_the_same_bits() {
        // SPAM (spike clipping), Stable-SPAM (AdaClip + AdaGN: its loops are compiled
        // separately), both, neither, and bounds that clip nothing (NaN, -inf): every path
        // gives apply()'s bits, entry by entry.
        let n = 1037;
        let p0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() * 1e3).collect();
        let v0: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 1e-3).collect();
        let stable = |threshold, bound, scale| StepScalars {
            spike_threshold: threshold,
            adaclip_bound: bound,
            adaclip_ratio: 0.25,
            grad_scale: scale,
            ..scalars()
        };
        let configs = [
            scalars(),
            stable(None, 600.0, 0.5),
            stable(Some(5000.0), 600.0, 0.5),
            stable(None, f32::INFINITY, 1.0),
            stable(None, f32::NAN, 0.75),
            stable(None, f32::NEG_INFINITY, 1.0),
        ];
        for s in configs {
            for level in supported() {
                let (mut p, mut m, mut v) = (p0.clone(), vec![0.1f32; n], v0.clone());
                step_one(level, &mut p, &g, None, (&mut m, &mut v), &s).unwrap();
                for i in 0..n {
                    let want = s.apply(p0[i], g[i], 0.1, v0[i]);
                    assert!(
                        same(p[i], want.0) && same(m[i], want.1) && same(v[i], want.2),
                        "{level:?} {s:?} at {i}: {:?} != {want:?}",
                        (p[i], m[i], v[i])
                    );
                }
            }
        }
    }

    #[test]
    fn blocks_without_spikes_step_as_the_clipped_rule() {
        // Entries at, just below and just above their caps, zeros, tiny and huge v, NaN: the
        // blocked loop must give apply()'s bits for each.
        let n = 4096;
        let v: Vec<f32> = (0..n)
            .map(|i| match i % 5 {
                0 => 0.0,
                1 => 1e-40,
                2 => 1e30,
                _ => (i as f32 * 0.013).sin().abs() * 1e-3,
            })
            .collect();
        let s = scalars();
        let g: Vec<f32> = (0..n)
            .map(|i| {
                let cap = (5000.0 * v[i]).sqrt();
                match i % 7 {
                    0 => cap,
                    1 => f32::from_bits(cap.to_bits().saturating_sub(1)),
                    2 => f32::from_bits(cap.to_bits() + 1),
                    3 => -cap * 0.999_999,
                    4 if i % 3 == 0 => f32::NAN,
                    _ => (i as f32 * 0.7).cos() * 0.03,
                }
            })
            .collect();
        let p0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        for level in supported() {
            let (mut p, mut m, mut vv) = (p0.clone(), vec![0.01f32; n], v.clone());
            step_one(level, &mut p, &g, None, (&mut m, &mut vv), &s).unwrap();
            for i in 0..n {
                let want = s.apply(p0[i], g[i], 0.01, v[i]);
                let got = (p[i], m[i], vv[i]);
                assert!(
                    same(got.0, want.0) && same(got.1, want.1) && same(got.2, want.2),
                    "{level:?} at {i}: {got:?} != {want:?}"
                );
            }
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(Bf16::from_f32(1.0).0, 0x3f80);
        assert_eq!(Bf16::from_f32(f32::from_bits(0x3f80_8000)).0, 0x3f80); // tie to even
        assert_eq!(Bf16::from_f32(f32::from_bits(0x3f81_8000)).0, 0x3f82);
        assert_eq!(Bf16::from_f32(f32::from_bits(0x3f80_8001)).0, 0x3f81);
        assert_eq!(Bf16::from_f32(f32::INFINITY).0, 0x7f80);
        assert_eq!(Bf16::from_f32(f32::MAX).0, 0x7f80); // rounds up to infinity
        assert!(Bf16::from_f32(f32::NAN).to_f32().is_nan());
        assert_eq!(Bf16(0xc040).to_f32(), -3.0);
    }

    #[test]
    fn bf16_step_is_the_f32_step_rounded() {
        let n = 777;
        let p0: Vec<Bf16> = (0..n)
            .map(|i| Bf16::from_f32((i as f32 * 0.37).sin()))
            .collect();
        let g: Vec<Bf16> = (0..n)
            .map(|i| Bf16::from_f32((i as f32 * 0.11).cos()))
            .collect();
        let mask = sample_mask(n, 200, &mut SplitMix64::new(2)).unwrap();
        for level in supported() {
            for sparse in [false, true] {
                let k = if sparse { 200 } else { n };
                let (mut p, mut m, mut v) = (p0.clone(), vec![0.1f32; k], vec![1e-4f32; k]);
                let p32: Vec<f32> = p0.iter().map(|x| x.to_f32()).collect();
                let g32: Vec<f32> = g.iter().map(|x| x.to_f32()).collect();
                let (mut q, mut m2, mut v2) = (p32, vec![0.1f32; k], vec![1e-4f32; k]);
                if sparse {
                    step_one(level, &mut p, &g, Some(&mask), (&mut m, &mut v), &scalars()).unwrap();
                    step_one(
                        level,
                        &mut q,
                        &g32,
                        Some(&mask),
                        (&mut m2, &mut v2),
                        &scalars(),
                    )
                    .unwrap();
                } else {
                    step_one(level, &mut p, &g, None, (&mut m, &mut v), &scalars()).unwrap();
                    step_one(level, &mut q, &g32, None, (&mut m2, &mut v2), &scalars()).unwrap();
                }
                let rounded: Vec<Bf16> = q.iter().map(|&x| Bf16::from_f32(x)).collect();
                assert_eq!(p, rounded, "{level:?} sparse={sparse}");
                assert_eq!((m, v), (m2, v2));
            }
        }
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
        // Not a multiple of 16 (the tail runs too) and several parts and chunks.
        for n in [1000, 3 * CHUNK + 1234] {
            let k = n / 3;
            let mask = sample_mask(n, k, &mut SplitMix64::new(5)).unwrap();
            let g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).sin() * 50.0).collect();
            let mut results = Vec::new();
            for level in supported() {
                let mut p: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).cos()).collect();
                let (mut m, mut v) = (vec![0.01f32; k], vec![1e-4f32; k]);
                let mut s = scalars();
                s.adaclip_bound = 20.0;
                s.adaclip_ratio = 0.5;
                step_one(level, &mut p, &g, Some(&mask), (&mut m, &mut v), &s).unwrap();
                results.push((p, m, v));
            }
            assert!(results.windows(2).all(|w| w[0] == w[1]));
        }
    }

    #[test]
    fn prefetching_steps_give_the_same_bits() {
        // `stream` (taken by steps too large for a test) only adds prefetches: dense and
        // sparse parts, several chunks and a tail, on every path.
        let n = 3 * sparse::CHUNK + 1234;
        let k = n / 3;
        let mask = sample_mask(n, k, &mut SplitMix64::new(9)).unwrap();
        let g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).sin() * 50.0).collect();
        let mut s = scalars();
        (s.adaclip_bound, s.adaclip_ratio) = (20.0, 0.5);
        for level in supported() {
            for mask in [None, Some(&mask[..])] {
                let moments = if mask.is_some() { k } else { n };
                let run = |stream: bool| {
                    let mut p: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).cos()).collect();
                    let (mut m, mut v) = (vec![0.01f32; moments], vec![1e-4f32; moments]);
                    match mask {
                        Some(mask) => {
                            f32::sparse(level, &mut p, &g, mask, &mut m, &mut v, &s, stream)
                        }
                        None => f32::dense(level, &mut p, &g, &mut m, &mut v, &s, stream),
                    }
                    (p, m, v)
                };
                assert_eq!(
                    run(true),
                    run(false),
                    "{level:?}, sparse: {}",
                    mask.is_some()
                );
            }
        }
    }

    #[test]
    fn sparse_step_matches_dense_on_active_coordinates() {
        for (n, decay) in [(100, 0.999), (5000, 1.0), (3 * CHUNK + 77, 0.98)] {
            let k = n * 3 / 10;
            let mask = sample_mask(n, k, &mut SplitMix64::new(3)).unwrap();
            let g: Vec<f32> = (0..n).map(|i| (i % 101) as f32 - 50.0).collect();
            let p0: Vec<f32> = (0..n).map(|i| 1.0 + (i % 13) as f32).collect();
            let (mut m, mut v) = (vec![0.0f32; k], vec![0.0f32; k]);
            let mut s = scalars();
            s.spike_threshold = None;
            s.decay = decay;
            for level in supported() {
                let mut p = p0.clone();
                m.fill(0.0);
                v.fill(0.0);
                step_one(level, &mut p, &g, Some(&mask), (&mut m, &mut v), &s).unwrap();
                let mut j = 0;
                for i in 0..n {
                    if mask[i / 8] >> (i % 8) & 1 == 1 {
                        let (pi, mi, vi) = s.apply(p0[i], g[i], 0.0, 0.0);
                        assert_eq!(p[i], pi);
                        assert_eq!((m[j], v[j]), (mi, vi));
                        j += 1;
                    } else {
                        assert_eq!(p[i], p0[i] * decay);
                    }
                }
            }
        }
    }

    #[test]
    fn many_tensors_step_as_each_alone() {
        // Dense and sparse tensors of sizes below, at and far above a part, an empty one, with
        // their own scalars: one call gives each the bits of its own call.
        let sizes = [0, 5, 1000, CHUNK, 3 * CHUNK + 777, 17];
        let masks: Vec<Option<Vec<u8>>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                (i % 2 == 1).then(|| sample_mask(n, n / 3, &mut SplitMix64::new(7)).unwrap())
            })
            .collect();
        let init =
            |n: usize, seed: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * seed).sin()).collect() };
        for level in supported() {
            let mut alone = Vec::new();
            let mut tensors = Vec::new();
            for (i, &n) in sizes.iter().enumerate() {
                let k = masks[i].as_ref().map_or(n, |_| n / 3);
                let mut s = scalars();
                s.grad_scale = 1.0 + i as f32 * 0.25;
                let t = (
                    init(n, 0.3),
                    init(n, 0.7 + i as f32),
                    vec![0.01; k],
                    vec![1e-4; k],
                    s,
                );
                let (mut p, g, mut m, mut v, s) = t.clone();
                step_one(level, &mut p, &g, masks[i].as_deref(), (&mut m, &mut v), &s).unwrap();
                alone.push((p, m, v));
                tensors.push(t);
            }
            let steps = tensors
                .iter_mut()
                .zip(&masks)
                .map(|((p, g, m, v, s), mask)| TensorStep {
                    p,
                    g,
                    mask: mask.as_deref(),
                    m,
                    v,
                    s: *s,
                })
                .collect();
            step(level, "spam_step", steps).unwrap();
            for (i, ((p, _, m, v, _), want)) in tensors.into_iter().zip(alone).enumerate() {
                assert!((p, m, v) == want, "{level:?}: tensor {i}");
            }
        }
    }

    #[test]
    fn a_mask_that_does_not_match_the_moments_is_refused() {
        let mask = sample_mask(64, 10, &mut SplitMix64::new(1)).unwrap();
        let (mut p, g) = (vec![0.0f32; 64], vec![0.0f32; 64]);
        let (mut m, mut v) = (vec![0.0f32; 11], vec![0.0f32; 11]);
        let s = scalars();
        let err = step_one(
            SimdLevel::Scalar,
            &mut p,
            &g,
            Some(&mask),
            (&mut m, &mut v),
            &s,
        );
        assert!(matches!(err, Err(FgError::Value(_))));
        // Among several tensors the message names the one refused.
        let (mut q, mut mq, mut vq) = (vec![0.0f32; 8], vec![0.0f32; 8], vec![0.0f32; 8]);
        let first = TensorStep {
            p: &mut q,
            g: &g[..8],
            mask: None,
            m: &mut mq,
            v: &mut vq,
            s,
        };
        let second = TensorStep {
            p: &mut p,
            g: &g,
            mask: Some(&mask),
            m: &mut m,
            v: &mut v,
            s,
        };
        match step(SimdLevel::Scalar, "spam_step_many", vec![first, second]) {
            Err(FgError::Value(msg)) => {
                assert!(msg.starts_with("spam_step_many: tensor 1:"), "{msg}")
            }
            other => panic!("{other:?}"),
        }
    }
}
