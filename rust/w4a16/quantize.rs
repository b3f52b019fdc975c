//! Weights to 4-bit codes: round to nearest per group, with a zero point or symmetric.

use super::{Shape, PAR_MIN, SYMMETRIC_ZERO};
use crate::error::{FgError, FgResult};
use crate::simd::{Simd, SimdLevel};
use crate::threads::{self, Disjoint};

/// Round half to even, as torch.round.
fn round_even(x: f32) -> f32 {
    x.round_ties_even()
}

crate::dispatch! {
    fn quantize_group_level(w: &[f32], zero_point: bool, codes: &mut [u8]) -> (f32, u8) = quantize_group_impl;
}

#[inline(always)]
#[allow(clippy::extra_unused_type_parameters)] // S only picks the target features
unsafe fn quantize_group_impl<S: Simd>(w: &[f32], zero_point: bool, codes: &mut [u8]) -> (f32, u8) {
    quantize_group(w, zero_point, codes)
}

/// Quantizes one group: returns (scale, stored zero) and writes the stored codes. With zero
/// points the range is widened to hold 0, so that all-positive and constant groups keep their
/// values; a range that overflows float32 gives an infinite scale (the caller refuses it).
#[inline(always)]
fn quantize_group(w: &[f32], zero_point: bool, codes: &mut [u8]) -> (f32, u8) {
    // 1 for an all-zero group; a range so small that range / levels underflows float32 keeps
    // the smallest positive scale (its codes then still hold the weights, to half that step).
    let scale_of = |range: f32, levels: f32| match range {
        0.0 => 1.0,
        _ => (range / levels).max(f32::from_bits(1)),
    };
    if zero_point {
        let (lo, hi) = w
            .iter()
            .fold((0.0f32, 0.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let scale = scale_of(hi - lo, 15.0);
        if scale.is_infinite() {
            return (scale, 0);
        }
        let zero = round_even(-lo / scale).clamp(0.0, 15.0);
        for (q, &v) in codes.iter_mut().zip(w) {
            *q = (round_even(v / scale) + zero).clamp(0.0, 15.0) as u8;
        }
        (scale, zero as u8)
    } else {
        let amax = w.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
        let scale = scale_of(amax, 7.0);
        for (q, &v) in codes.iter_mut().zip(w) {
            *q = (round_even(v / scale).clamp(-8.0, 7.0) + SYMMETRIC_ZERO as f32) as u8;
        }
        (scale, SYMMETRIC_ZERO)
    }
}

/// Quantizes W [n, k] (row-major) into stored codes [n, k] (one per byte), scales and zeros
/// [n, groups]. A group whose scale would be 0 gets scale 1; a group whose range (max - min,
/// widened to hold 0) overflows float32 is a ValueError.
pub fn quantize(
    level: SimdLevel,
    w: &[f32],
    shape: Shape,
    zero_point: bool,
    codes: &mut [u8],
    scales: &mut [f32],
    zeros: &mut [u8],
) -> FgResult<()> {
    let (k, groups) = (shape.k, shape.groups());
    shape.check(
        "quantize_w4",
        &[
            ("weight", w.len(), k),
            ("codes", codes.len(), k),
            ("scales", scales.len(), groups),
            ("zeros", zeros.len(), groups),
        ],
    )?;
    let per_task = threads::rows_per_task(shape.n, k, PAR_MIN);
    let (codes_out, scales_out, zeros_out) = (
        Disjoint::new(codes),
        Disjoint::new(&mut *scales),
        Disjoint::new(zeros),
    );
    threads::for_each_chunk(shape.n, per_task, |_, r| {
        // SAFETY: the chunks are disjoint row ranges.
        let (codes, scales, zeros) = unsafe {
            (
                codes_out.piece(r.start * k..r.end * k),
                scales_out.piece(r.start * groups..r.end * groups),
                zeros_out.piece(r.start * groups..r.end * groups),
            )
        };
        let rows = w[r.start * k..r.end * k].chunks(k).zip(codes.chunks_mut(k));
        for ((w, codes), (scales, zeros)) in
            rows.zip(scales.chunks_mut(groups).zip(zeros.chunks_mut(groups)))
        {
            let pieces = w
                .chunks(shape.group_size)
                .zip(codes.chunks_mut(shape.group_size));
            for ((w, codes), (s, z)) in pieces.zip(scales.iter_mut().zip(zeros.iter_mut())) {
                // Compiled for the SIMD level: rounding becomes one instruction and the
                // group loops vectorize.
                (*s, *z) = quantize_group_level(level, w, zero_point, codes);
            }
        }
    });
    match scales.iter().position(|s| s.is_infinite()) {
        Some(i) => Err(FgError::Value(format!(
            "quantize_w4: weight row {} has a range (max - min, with 0) that overflows float32; \
             use a smaller group_size or zero_point=False",
            i / groups
        ))),
        None => Ok(()),
    }
}
