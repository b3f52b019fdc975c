//! The AVX-512 VNNI integer GEMV.

use std::arch::x86_64::*;

/// Rows of x per pass over W: 2 x 8 int32 sums and 8 float32 totals fit in 32 registers.
pub(super) const VNNI_MAX_ROWS: usize = 8;

/// y_tile[i, r] = Σ_c x̃[row0 + i, c] q[n, c] in int32 per group, x̃ split into two signed
/// bytes (x̃ = 256 hi + lo) so that `vpdpbusd` (unsigned codes times signed bytes) keeps 16
/// bits of x; per group the two sums meet the scale in float32.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2")]
pub(super) unsafe fn gemv_rows_vnni(
    w: &super::PackedW4<'_>,
    rows: std::ops::Range<usize>,
    input: &super::IntInput,
    row0: usize,
    m: usize,
    out: &mut [f32],
) {
    match m {
        1 => vnni_tile::<1>(w, rows, input, row0, out),
        2 => vnni_tile::<2>(w, rows, input, row0, out),
        3 => vnni_tile::<3>(w, rows, input, row0, out),
        4 => vnni_tile::<4>(w, rows, input, row0, out),
        5 => vnni_tile::<5>(w, rows, input, row0, out),
        6 => vnni_tile::<6>(w, rows, input, row0, out),
        7 => vnni_tile::<7>(w, rows, input, row0, out),
        _ => vnni_tile::<8>(w, rows, input, row0, out),
    }
}

/// total += (256 hi + lo) * scale (lanes 0-7 take `first`, 8-15 `second`); sums restart.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2")]
unsafe fn flush<const M: usize>(
    first: f32,
    second: f32,
    lo_acc: &mut [__m512i; M],
    hi_acc: &mut [__m512i; M],
    total: &mut [__m512; M],
) {
    let scale = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(first), _mm512_set1_ps(second));
    for j in 0..M {
        let hi = _mm512_cvtepi32_ps(hi_acc[j]);
        let sum = _mm512_fmadd_ps(hi, _mm512_set1_ps(256.0), _mm512_cvtepi32_ps(lo_acc[j]));
        total[j] = _mm512_fmadd_ps(sum, scale, total[j]);
        (lo_acc[j], hi_acc[j]) = (_mm512_setzero_si512(), _mm512_setzero_si512());
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2")]
unsafe fn vnni_tile<const M: usize>(
    w: &super::PackedW4<'_>,
    rows: std::ops::Range<usize>,
    input: &super::IntInput,
    row0: usize,
    out: &mut [f32],
) {
    use super::{packed_row_bytes, zero_term, BLOCK, BLOCK_BYTES};
    let s = w.shape;
    let (row_bytes, groups, width, g) =
        (packed_row_bytes(s.k), s.groups(), rows.len(), s.group_size);
    // Groups of whole blocks flush every g / 64 blocks with one scale; groups of an odd
    // number of halves flush every block with a scale per half (lanes 0-7 | 8-15).
    let blend = g % BLOCK != 0;
    let blocks_per_flush = if blend { 1 } else { g / BLOCK };
    let mask = _mm256_set1_epi8(15);
    for (r, n) in rows.enumerate() {
        let packed = w.packed.as_ptr().add(n * row_bytes);
        let scales = &w.scales[n * groups..(n + 1) * groups];
        let zeros = &w.zeros[n * groups..(n + 1) * groups];
        let mut total = [_mm512_setzero_ps(); M];
        let mut lo_acc = [_mm512_setzero_si512(); M];
        let mut hi_acc = [_mm512_setzero_si512(); M];
        // The scale of the group(s) of flush f (first block b): one, or one per half block
        // (a division only then: whole-block groups take flush f's group f).
        let scale_of = |f: usize, b: usize| {
            if blend {
                let group = |col: usize| scales[(col / g).min(groups - 1)];
                (group(b * BLOCK), group(b * BLOCK + BLOCK_BYTES))
            } else {
                let s = scales[f.min(groups - 1)];
                (s, s)
            }
        };
        let blocks = row_bytes / BLOCK_BYTES;
        let (mut left, mut first, mut flushes) = (blocks_per_flush, 0, 0);
        for b in 0..blocks {
            let v = _mm256_loadu_si256(packed.add(b * BLOCK_BYTES) as *const __m256i);
            let lo = _mm256_and_si256(v, mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
            let codes = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
            for j in 0..M {
                let at = (row0 + j) * input.padded + b * BLOCK;
                let xl = _mm512_loadu_si512(input.lo.as_ptr().add(at) as *const _);
                let xh = _mm512_loadu_si512(input.hi.as_ptr().add(at) as *const _);
                lo_acc[j] = _mm512_dpbusd_epi32(lo_acc[j], codes, xl);
                hi_acc[j] = _mm512_dpbusd_epi32(hi_acc[j], codes, xh);
            }
            left -= 1;
            if left == 0 || b + 1 == blocks {
                let (a, c) = scale_of(flushes, first);
                flush::<M>(a, c, &mut lo_acc, &mut hi_acc, &mut total);
                (left, first, flushes) = (blocks_per_flush, b + 1, flushes + 1);
            }
        }
        for j in 0..M {
            let i = row0 + j;
            let sums = &input.group_sums[i * groups..(i + 1) * groups];
            let dot = _mm512_reduce_add_ps(total[j]) * input.scale[i];
            out[j * width + r] = dot - zero_term(scales, zeros, sums);
        }
    }
}
