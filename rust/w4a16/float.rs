//! The float GEMV kernel, on every SIMD path: the codes are unpacked to floats and meet x with
//! FMAs, group by group.

use super::{packed_row_bytes, zero_term, PackedW4, Shape, BLOCK, BLOCK_BYTES};
use crate::simd::Simd;

/// Unpacks one packed block into float codes, per SIMD backend. (An array, not a callback:
/// closures do not inherit the target features of the function they are written in.)
pub trait Nibbles: Simd {
    /// The 64 codes of a block as 64 / LANES vectors.
    type Block: AsRef<[Self::V]>;

    /// The 64 stored codes of the block at `bytes` (32 readable bytes) as floats, in column
    /// order.
    ///
    /// # Safety
    /// `bytes` must point at 32 readable bytes and the CPU must support the backend.
    unsafe fn unpack(bytes: *const u8) -> Self::Block;
}

impl Nibbles for crate::simd::Scalar {
    type Block = [f32; BLOCK];

    #[inline(always)]
    unsafe fn unpack(bytes: *const u8) -> [f32; BLOCK] {
        let bytes = std::slice::from_raw_parts(bytes, BLOCK_BYTES);
        let mut out = [0.0f32; BLOCK];
        for (j, &b) in bytes.iter().enumerate() {
            out[j] = (b & 15) as f32;
            out[BLOCK_BYTES + j] = (b >> 4) as f32;
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Nibbles;
    use crate::simd::{Avx2, Avx512};

    /// The low and high nibbles of 32 bytes, each as 32 bytes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn nibbles(bytes: *const u8) -> (__m256i, __m256i) {
        let v = _mm256_loadu_si256(bytes as *const __m256i);
        let mask = _mm256_set1_epi8(15);
        (
            _mm256_and_si256(v, mask),
            _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask),
        )
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx2")]
    unsafe fn wide16(x: __m128i) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(x))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn wide8(x: __m128i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(x))
    }

    impl Nibbles for Avx512 {
        type Block = [__m512; 4];

        #[inline]
        #[target_feature(enable = "avx512f,avx2")]
        unsafe fn unpack(bytes: *const u8) -> [__m512; 4] {
            let (lo, hi) = nibbles(bytes);
            [
                wide16(_mm256_castsi256_si128(lo)),
                wide16(_mm256_extracti128_si256::<1>(lo)),
                wide16(_mm256_castsi256_si128(hi)),
                wide16(_mm256_extracti128_si256::<1>(hi)),
            ]
        }
    }

    impl Nibbles for Avx2 {
        type Block = [__m256; 8];

        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn unpack(bytes: *const u8) -> [__m256; 8] {
            let (lo, hi) = nibbles(bytes);
            let (l0, l1) = (
                _mm256_castsi256_si128(lo),
                _mm256_extracti128_si256::<1>(lo),
            );
            let (h0, h1) = (
                _mm256_castsi256_si128(hi),
                _mm256_extracti128_si256::<1>(hi),
            );
            [
                wide8(l0),
                wide8(_mm_srli_si128::<8>(l0)),
                wide8(l1),
                wide8(_mm_srli_si128::<8>(l1)),
                wide8(h0),
                wide8(_mm_srli_si128::<8>(h0)),
                wide8(h1),
                wide8(_mm_srli_si128::<8>(h1)),
            ]
        }
    }
}

/// Per-call inputs of the GEMV kernel besides the weight.
pub(super) struct GemvInput {
    /// x rows padded with zeros to whole blocks: [m, padded].
    x: Vec<f32>,
    /// Σ x over each group: [m, groups].
    x_group_sums: Vec<f32>,
    padded: usize,
}

impl GemvInput {
    pub(super) fn new(x: &[f32], shape: Shape) -> GemvInput {
        let (k, groups) = (shape.k, shape.groups());
        let padded = k.div_ceil(BLOCK) * BLOCK;
        let m = x.len() / k;
        let mut input = GemvInput {
            x: vec![0.0; m * padded],
            x_group_sums: vec![0.0; m * groups],
            padded,
        };
        let rows = input.x.chunks_exact_mut(padded).zip(x.chunks_exact(k));
        for ((dst, src), sums) in rows.zip(input.x_group_sums.chunks_exact_mut(groups)) {
            dst[..k].copy_from_slice(src);
            for (sum, g) in sums.iter_mut().zip(src.chunks(shape.group_size)) {
                *sum = g.iter().map(|&v| v as f64).sum::<f64>() as f32;
            }
        }
        input
    }
}

crate::dispatch! {
    pub(super) fn gemv_rows(w: &PackedW4<'_>, rows: std::ops::Range<usize>, input: &GemvInput, row0: usize, m: usize, out: &mut [f32]) = gemv_rows_impl;
}

/// Dispatches to the kernel for `m` (1..=4) rows of x.
#[inline(always)]
unsafe fn gemv_rows_impl<S: Nibbles>(
    w: &PackedW4<'_>,
    rows: std::ops::Range<usize>,
    input: &GemvInput,
    row0: usize,
    m: usize,
    out: &mut [f32],
) {
    match m {
        // One x row needs 4 accumulators to hide the FMA latency; more rows bring their own.
        1 => gemv_tile::<S, 1, 4>(w, rows, input, row0, out),
        2 => gemv_tile::<S, 2, 2>(w, rows, input, row0, out),
        3 => gemv_tile::<S, 3, 2>(w, rows, input, row0, out),
        _ => gemv_tile::<S, 4, 2>(w, rows, input, row0, out),
    }
}

/// acc[j][i % ACC] += codes[i] * x[j * stride + i * LANES ..] for the vectors i of `codes`.
#[inline(always)]
unsafe fn accumulate<S: Simd, const M: usize, const ACC: usize>(
    codes: &[S::V],
    x: *const f32,
    stride: usize,
    acc: &mut [[S::V; ACC]; M],
) {
    for (i, &c) in codes.iter().enumerate() {
        for (j, a) in acc.iter_mut().enumerate() {
            a[i % ACC] = S::mul_add(c, S::load(x.add(j * stride + i * S::LANES)), a[i % ACC]);
        }
    }
}

/// total += Σ acc * scale per x row; the accumulators restart at 0.
#[inline(always)]
unsafe fn flush<S: Simd, const M: usize, const ACC: usize>(
    scale: f32,
    acc: &mut [[S::V; ACC]; M],
    total: &mut [S::V; M],
) {
    let scale = S::splat(scale);
    for (t, a) in total.iter_mut().zip(acc.iter_mut()) {
        let sum = a[1..].iter().fold(a[0], |s, &v| S::add(s, v));
        *t = S::mul_add(sum, scale, *t);
        *a = [S::splat(0.0); ACC];
    }
}

/// out[i, r] = Σ_c x[row0 + i, c] W[rows.start + r, c] for i < M. Per group,
/// Σ_c (q_c - z) s x_c = s (Σ_c q_c x_c - z Σ_c x_c): the codes meet x as plain floats, the
/// scale multiplies one vector per group and the zero term comes from the group sums of x.
#[inline(always)]
unsafe fn gemv_tile<S: Nibbles, const M: usize, const ACC: usize>(
    w: &PackedW4<'_>,
    rows: std::ops::Range<usize>,
    input: &GemvInput,
    row0: usize,
    out: &mut [f32],
) {
    let s = w.shape;
    let (row_bytes, groups, width) = (packed_row_bytes(s.k), s.groups(), rows.len());
    let halves_per_group = s.group_size / BLOCK_BYTES;
    let vecs_per_half = BLOCK_BYTES / S::LANES;
    let x = input.x.as_ptr().add(row0 * input.padded);
    for (r, n) in rows.enumerate() {
        let packed = w.packed.as_ptr().add(n * row_bytes);
        let (scales, zeros) = (
            &w.scales.as_f32()[n * groups..(n + 1) * groups],
            &w.zeros[n * groups..(n + 1) * groups],
        );
        let mut total = [S::splat(0.0); M];
        let mut acc = [[S::splat(0.0); ACC]; M];
        let blocks = row_bytes / BLOCK_BYTES;
        if halves_per_group % 2 == 1 {
            // Groups of an odd number of half blocks (32, 96, ...): flush at the end of the
            // half that ends a group.
            for b in 0..blocks {
                let block = S::unpack(packed.add(b * BLOCK_BYTES));
                for (h, half) in block.as_ref().chunks_exact(vecs_per_half).enumerate() {
                    let half_index = 2 * b + h;
                    accumulate::<S, M, ACC>(
                        half,
                        x.add(half_index * BLOCK_BYTES),
                        input.padded,
                        &mut acc,
                    );
                    if (half_index + 1).is_multiple_of(halves_per_group) {
                        let group = (half_index / halves_per_group).min(groups - 1);
                        flush::<S, M, ACC>(scales[group], &mut acc, &mut total);
                    }
                }
            }
        } else {
            // Groups of whole blocks: flush once per group.
            let blocks_per_group = halves_per_group / 2;
            for (group, first) in (0..blocks).step_by(blocks_per_group).enumerate() {
                for b in first..(first + blocks_per_group).min(blocks) {
                    let block = S::unpack(packed.add(b * BLOCK_BYTES));
                    accumulate::<S, M, ACC>(
                        block.as_ref(),
                        x.add(b * BLOCK),
                        input.padded,
                        &mut acc,
                    );
                }
                flush::<S, M, ACC>(scales[group.min(groups - 1)], &mut acc, &mut total);
            }
        }
        // A short last group (a no-op when it was flushed already).
        flush::<S, M, ACC>(scales[groups - 1], &mut acc, &mut total);
        for (i, t) in total.iter().enumerate() {
            let sums = &input.x_group_sums[(row0 + i) * groups..(row0 + i + 1) * groups];
            let zero_term = zero_term(scales, zeros, sums);
            let lanes = S::to_array(*t);
            out[i * width + r] = lanes[..S::LANES].iter().sum::<f32>() - zero_term;
        }
    }
}
