//! The AVX2 integer GEMV.

use std::arch::x86_64::*;

/// The AVX2 form of the integer GEMV (same input and error bound as the VNNI one):
/// `vpmaddubsw` multiplies 32 codes by 32 signed bytes of x̃ into 16 int16 pair sums, which
/// add up in int16 over up to `I16_BLOCKS` blocks before `vpmaddwd` widens them (times 256
/// for the high bytes) and the group's scale meets them in float32.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn gemv_rows_avx2_int(
    w: &super::PackedW4<'_>,
    rows: std::ops::Range<usize>,
    input: &super::IntInput,
    row0: usize,
    m: usize,
    out: &mut [f32],
) {
    by_rows!(avx2_int_rows, m, w, rows, input, row0, out)
}

/// Blocks whose int16 pair sums may add up: a pair sum is at most 2 * 15 * 128 = 3840 in
/// magnitude, and 4 blocks bring 8 of them to an accumulator.
const I16_BLOCKS: usize = 4;

/// Picks the blocks per flush (a compile-time count, so that the block loop unrolls): groups
/// of an odd number of halves flush every block with a scale per half (`SPLIT`), others
/// every 4, 2 or 1 blocks, whichever divides the group's blocks.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_int_rows<const M: usize>(
    w: &super::PackedW4<'_>,
    rows: std::ops::Range<usize>,
    input: &super::IntInput,
    row0: usize,
    out: &mut [f32],
) {
    let group_blocks = w.shape.group_size / super::BLOCK;
    if !w.shape.group_size.is_multiple_of(super::BLOCK) {
        avx2_int_tile::<M, 1, true>(w, rows, input, row0, out)
    } else if group_blocks.is_multiple_of(I16_BLOCKS) {
        avx2_int_tile::<M, I16_BLOCKS, false>(w, rows, input, row0, out)
    } else if group_blocks.is_multiple_of(2) {
        avx2_int_tile::<M, 2, false>(w, rows, input, row0, out)
    } else {
        avx2_int_tile::<M, 1, false>(w, rows, input, row0, out)
    }
}

/// Bytes of packed weight the AVX2 kernel prefetches ahead of the flush it reads: on the
/// 2-core Zen 2 VM the hardware prefetcher alone left M = 1 13-20% slower (512 was slower
/// too, 2048 the same).
const PREFETCH_AHEAD: usize = 1024;

/// Int16 sums of one x row: [half block (SPLIT; else all in 0)][low | high byte of x̃].
type Acc16 = [[__m256i; 2]; 2];

/// Adds block `b`'s products with the M rows of x̃ from `row0` to `acc`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_int_block<const M: usize, const SPLIT: bool>(
    packed: *const u8,
    b: usize,
    input: &super::IntInput,
    row0: usize,
    acc: &mut [Acc16; M],
) {
    use super::{BLOCK, BLOCK_BYTES};
    let v = _mm256_loadu_si256(packed.add(b * BLOCK_BYTES) as *const __m256i);
    let mask = _mm256_set1_epi8(15);
    let codes = [
        _mm256_and_si256(v, mask),
        _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask),
    ];
    for (j, a) in acc.iter_mut().enumerate() {
        let at = (row0 + j) * input.padded + b * BLOCK;
        for (h, &c) in codes.iter().enumerate() {
            let at = at + h * BLOCK_BYTES;
            let xl = _mm256_loadu_si256(input.lo.as_ptr().add(at) as *const __m256i);
            let xh = _mm256_loadu_si256(input.hi.as_ptr().add(at) as *const __m256i);
            let a = &mut a[if SPLIT { h } else { 0 }];
            a[0] = _mm256_add_epi16(a[0], _mm256_maddubs_epi16(c, xl));
            a[1] = _mm256_add_epi16(a[1], _mm256_maddubs_epi16(c, xh));
        }
    }
}

/// total += the sums × scale (SPLIT: each half block its own scale, else `scales.0`); the
/// sums restart.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_int_flush<const M: usize, const SPLIT: bool>(
    scales: (f32, f32),
    acc: &mut [Acc16; M],
    total: &mut [__m256; M],
) {
    // 256 hi + lo in int32 from the int16 pair sums of the low and high bytes.
    let widen = |a: [__m256i; 2]| {
        let hi = _mm256_madd_epi16(a[1], _mm256_set1_epi16(256));
        _mm256_cvtepi32_ps(_mm256_add_epi32(
            hi,
            _mm256_madd_epi16(a[0], _mm256_set1_epi16(1)),
        ))
    };
    for (a, t) in acc.iter_mut().zip(total.iter_mut()) {
        *t = _mm256_fmadd_ps(widen(a[0]), _mm256_set1_ps(scales.0), *t);
        if SPLIT {
            *t = _mm256_fmadd_ps(widen(a[1]), _mm256_set1_ps(scales.1), *t);
        }
        *a = [[_mm256_setzero_si256(); 2]; 2];
    }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(v: __m256) -> f32 {
    let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)))
}

/// Rows `rows` of W times M rows of x̃, flushing every F blocks (F divides a group's
/// blocks, so a flush lies in one group, or in one per half when SPLIT).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_int_tile<const M: usize, const F: usize, const SPLIT: bool>(
    w: &super::PackedW4<'_>,
    rows: std::ops::Range<usize>,
    input: &super::IntInput,
    row0: usize,
    out: &mut [f32],
) {
    use super::{packed_row_bytes, BLOCK, BLOCK_BYTES};
    let s = w.shape;
    let (row_bytes, groups, width) = (packed_row_bytes(s.k), s.groups(), rows.len());
    let blocks = row_bytes / BLOCK_BYTES;
    // The groups of the two halves of each flush's first block, the same for every row;
    // the blocks past the last whole flush (a short last group) take one more.
    let group = |col: usize| (col / s.group_size).min(groups - 1);
    let flushes: Vec<(usize, usize)> = (0..blocks)
        .step_by(F)
        .map(|b| (group(b * BLOCK), group(b * BLOCK + BLOCK_BYTES)))
        .collect();
    let (whole, tail) = flushes.split_at(blocks / F);
    for (r, n) in rows.enumerate() {
        let packed = w.packed.as_ptr().add(n * row_bytes);
        let scales = &w.scales.as_f32()[n * groups..(n + 1) * groups];
        let zeros = &w.zeros[n * groups..(n + 1) * groups];
        let mut total = [_mm256_setzero_ps(); M];
        let mut acc = [[[_mm256_setzero_si256(); 2]; 2]; M];
        for (f, &(g0, g1)) in whole.iter().enumerate() {
            // Past the weight's end near its last rows: a prefetch never faults, and
            // wrapping_add keeps the address computation defined.
            let ahead = packed.wrapping_add(f * F * BLOCK_BYTES + PREFETCH_AHEAD);
            _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
            for b in f * F..(f + 1) * F {
                avx2_int_block::<M, SPLIT>(packed, b, input, row0, &mut acc);
            }
            avx2_int_flush::<M, SPLIT>((scales[g0], scales[g1]), &mut acc, &mut total);
        }
        if let Some(&(g0, g1)) = tail.first() {
            for b in whole.len() * F..blocks {
                avx2_int_block::<M, SPLIT>(packed, b, input, row0, &mut acc);
            }
            avx2_int_flush::<M, SPLIT>((scales[g0], scales[g1]), &mut acc, &mut total);
        }
        for (j, t) in total.iter().enumerate() {
            let i = row0 + j;
            let sums = &input.group_sums[i * groups..(i + 1) * groups];
            // The zero points' term in lanes, subtracted before the one horizontal sum.
            let lanes = _mm256_fmsub_ps(
                *t,
                _mm256_set1_ps(input.scale[i]),
                zero_terms(scales, zeros, sums),
            );
            out[j * width + r] = hsum(lanes);
        }
    }
}

/// Σ_g scale_g zero_g x_sum_g over a row's groups, 8 groups to a vector (lane l sums groups l,
/// l + 8, ...), as the VNNI kernel forms it (a scalar-order loop and a second horizontal sum
/// per output had cost that kernel 10-17%).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn zero_terms(scales: &[f32], zeros: &[u8], x_sums: &[f32]) -> __m256 {
    let groups = scales.len().min(zeros.len()).min(x_sums.len());
    // (A function, not a closure: closures are not compiled with the target features.)
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn term(s: &[f32], z: &[u8], x: &[f32], acc: __m256) -> __m256 {
        let (s, z, x) = (&s[..8], &z[..8], &x[..8]);
        let z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(z.as_ptr().cast())));
        let sz = _mm256_mul_ps(_mm256_loadu_ps(s.as_ptr()), z);
        _mm256_fmadd_ps(sz, _mm256_loadu_ps(x.as_ptr()), acc)
    }
    let mut acc = _mm256_setzero_ps();
    let whole = groups / 8 * 8;
    for g in (0..whole).step_by(8) {
        acc = term(&scales[g..g + 8], &zeros[g..g + 8], &x_sums[g..g + 8], acc);
    }
    if whole < groups {
        // The last groups from zero-padded copies (padding lanes add 0 * 0 * 0).
        let (mut s, mut z, mut x) = ([0f32; 8], [0u8; 8], [0f32; 8]);
        let rest = groups - whole;
        s[..rest].copy_from_slice(&scales[whole..groups]);
        z[..rest].copy_from_slice(&zeros[whole..groups]);
        x[..rest].copy_from_slice(&x_sums[whole..groups]);
        acc = term(&s, &z, &x, acc);
    }
    acc
}
