//! Weights to 4-bit codes: round to nearest per group, with a zero point or symmetric, written
//! straight into the CPU layout (pack.rs) a row at a time.

use super::pack::pack_row;
use super::{packed_row_bytes, Shape, BLOCK, PAR_MIN, SYMMETRIC_ZERO};
use crate::error::{FgError, FgResult};
use crate::simd::{Bf16, Simd, SimdLevel, Storage, F16};
use crate::threads::{self, Disjoint};

/// Independent lanes of the range scan (two AVX-512 vectors, so that the min / max chains
/// overlap): the reductions stay vector compares, where a fold through `f32::min` was a chain
/// of scalar `minss`, about 4 cycles an element.
const LANES: usize = 32;

/// Round half to even, as torch.round.
fn round_even(x: f32) -> f32 {
    x.round_ties_even()
}

crate::dispatch! {
    fn quantize_group_f32(w: &[f32], zero_point: bool, codes: &mut [u8]) -> (f32, u8) = quantize_group_impl<f32>;
    fn quantize_group_bf16(w: &[Bf16], zero_point: bool, codes: &mut [u8]) -> (f32, u8) = quantize_group_impl<Bf16>;
    fn quantize_group_f16(w: &[F16], zero_point: bool, codes: &mut [u8]) -> (f32, u8) = quantize_group_impl<F16>;
}

#[inline(always)]
#[allow(clippy::extra_unused_type_parameters)] // S only picks the target features
unsafe fn quantize_group_impl<S: Simd, E: Storage>(
    w: &[E],
    zero_point: bool,
    codes: &mut [u8],
) -> (f32, u8) {
    quantize_group(w, zero_point, codes)
}

/// A weight's element type (float32, bfloat16 or float16, widened in registers: no float32
/// copy of a 16-bit weight) with its dispatched group kernel.
pub trait Weight: Storage {
    fn quantize_group(
        level: SimdLevel,
        w: &[Self],
        zero_point: bool,
        codes: &mut [u8],
    ) -> (f32, u8);
}

macro_rules! weights {
    ($($t:ty => $kernel:ident),*) => {$(
        impl Weight for $t {
            fn quantize_group(level: SimdLevel, w: &[$t], zero_point: bool, codes: &mut [u8]) -> (f32, u8) {
                $kernel(level, w, zero_point, codes)
            }
        }
    )*};
}

weights!(f32 => quantize_group_f32, Bf16 => quantize_group_bf16, F16 => quantize_group_f16);

/// The byte of a whole number 0..15 held in an f32: its low mantissa bits once 2^23 is added.
/// A vector add and a narrowing store, where `as u8` (saturating, NaN to 0) went lane by lane
/// through scalar conversions and inserts (7 cycles an element).
#[inline(always)]
fn code_byte(q: f32) -> u8 {
    (q + 8_388_608.0).to_bits() as u8
}

/// (min, max) of `w` and of 0 (NaN skipped), and whether `w` holds NaN or infinity.
#[inline(always)]
fn range<E: Storage>(w: &[E]) -> (f32, f32, bool) {
    let (mut lo, mut hi, mut probe) = ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
    let mut step = |i: usize, v: E| {
        let v = v.to_f32();
        lo[i] = if v < lo[i] { v } else { lo[i] };
        hi[i] = if v > hi[i] { v } else { hi[i] };
        probe[i] += v * 0.0; // NaN from a NaN or an infinity, else 0
    };
    let mut chunks = w.chunks_exact(LANES);
    for c in &mut chunks {
        for (i, &v) in c.iter().enumerate() {
            step(i, v);
        }
    }
    for (i, &v) in chunks.remainder().iter().enumerate() {
        step(i, v);
    }
    crate::simd::fold_halves(LANES, |i, j| {
        lo[i] = if lo[j] < lo[i] { lo[j] } else { lo[i] };
        hi[i] = if hi[j] > hi[i] { hi[j] } else { hi[i] };
        probe[i] += probe[j];
    });
    (lo[0], hi[0], probe[0].is_nan())
}

/// Quantizes one group: returns (scale, stored zero) and writes the stored codes. With zero
/// points the range is widened to hold 0, so that all-positive and constant groups keep their
/// values; a range that overflows float32 gives an infinite scale, a group holding NaN or
/// infinity a NaN scale and no codes (the caller refuses both).
#[inline(always)]
fn quantize_group<E: Storage>(w: &[E], zero_point: bool, codes: &mut [u8]) -> (f32, u8) {
    // 1 for an all-zero group; a range so small that range / levels underflows float32 keeps
    // the smallest positive scale (its codes then still hold the weights, to half that step).
    let scale_of = |range: f32, levels: f32| match range {
        0.0 => 1.0,
        _ => (range / levels).max(f32::from_bits(1)),
    };
    let (lo, hi, not_finite) = range(w);
    if not_finite {
        return (f32::NAN, 0);
    }
    if zero_point {
        let scale = scale_of(hi - lo, 15.0);
        if scale.is_infinite() {
            return (scale, 0);
        }
        let zero = round_even(-lo / scale).clamp(0.0, 15.0);
        for (q, &v) in codes.iter_mut().zip(w) {
            *q = code_byte((round_even(v.to_f32() / scale) + zero).clamp(0.0, 15.0));
        }
        (scale, zero as u8)
    } else {
        let scale = scale_of(hi.max(-lo), 7.0);
        for (q, &v) in codes.iter_mut().zip(w) {
            *q = code_byte(round_even(v.to_f32() / scale).clamp(-8.0, 7.0) + SYMMETRIC_ZERO as f32);
        }
        (scale, SYMMETRIC_ZERO)
    }
}

/// Quantizes W [n, k] (row-major; float32, bfloat16 or float16, computed in float32) into the
/// CPU layout [n, packed_row_bytes(k)] with scales and zeros [n, groups]. A group whose scale
/// would be 0 gets scale 1; a weight holding NaN or infinity, or a group whose range (max - min,
/// widened to hold 0) overflows float32, is a ValueError.
pub fn quantize<E: Weight>(
    level: SimdLevel,
    w: &[E],
    shape: Shape,
    zero_point: bool,
    packed: &mut [u8],
    scales: &mut [f32],
    zeros: &mut [u8],
) -> FgResult<()> {
    let (k, groups, row_bytes) = (shape.k, shape.groups(), packed_row_bytes(shape.k));
    shape.check(
        "quantize_w4",
        &[
            ("weight", w.len(), k),
            ("packed", packed.len(), row_bytes),
            ("scales", scales.len(), groups),
            ("zeros", zeros.len(), groups),
        ],
    )?;
    let per_task = threads::rows_per_task(shape.n, k, PAR_MIN);
    let (packed_out, scales_out, zeros_out) = (
        Disjoint::new(packed),
        Disjoint::new(&mut *scales),
        Disjoint::new(zeros),
    );
    threads::for_each_chunk(shape.n, per_task, |_, r| {
        // SAFETY: the chunks are disjoint row ranges.
        let (packed, scales, zeros) = unsafe {
            (
                packed_out.piece(r.start * row_bytes..r.end * row_bytes),
                scales_out.piece(r.start * groups..r.end * groups),
                zeros_out.piece(r.start * groups..r.end * groups),
            )
        };
        // One row's codes, padded with 0 to whole blocks, packed while in L1.
        let mut codes = vec![0u8; k.div_ceil(BLOCK) * BLOCK];
        let rows = w[r.start * k..r.end * k]
            .chunks(k)
            .zip(packed.chunks_mut(row_bytes));
        for ((w, packed), (scales, zeros)) in
            rows.zip(scales.chunks_mut(groups).zip(zeros.chunks_mut(groups)))
        {
            let pieces = w
                .chunks(shape.group_size)
                .zip(codes[..k].chunks_mut(shape.group_size));
            for ((w, codes), (s, z)) in pieces.zip(scales.iter_mut().zip(zeros.iter_mut())) {
                // Compiled for the SIMD level: rounding becomes one instruction and the
                // group loops vectorize.
                (*s, *z) = E::quantize_group(level, w, zero_point, codes);
            }
            pack_row(&codes, packed);
        }
    });
    if let Some(i) = scales.iter().position(|s| s.is_nan()) {
        return Err(FgError::Value(format!(
            "quantize_w4: weight holds NaN or infinity (row {})",
            i / groups
        )));
    }
    match scales.iter().position(|s| s.is_infinite()) {
        Some(i) => Err(FgError::Value(format!(
            "quantize_w4: weight row {} has a range (max - min, with 0) that overflows float32; \
             use a smaller group_size or zero_point=False",
            i / groups
        ))),
        None => Ok(()),
    }
}
