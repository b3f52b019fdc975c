//! The AVX-512 VNNI integer GEMV.
//!
//! Each step reads 64 bytes of a packed row (two blocks, 128 columns) with one load; its low
//! nibbles are columns 0-31 and 64-95 of the step, its high nibbles 32-63 and 96-127 (mod.rs's
//! layout). x̃ is stored in that order (`IntInput` with `step_order`), so the nibbles meet x̃ as they come out
//! of two `vpand`s: no widening, no shuffle. Short x (1 or 2 rows) takes 4 or 2 rows of W per
//! pass, so that each x̃ vector loaded serves several rows and the sums form enough independent
//! `vpdpbusd` chains to hide their latency.

use std::arch::x86_64::*;

use super::{packed_row_bytes, zero_term, IntInput, PackedW4, BLOCK};

/// Rows of x per pass over W: 8 x (2 int32 sums + 1 float32 total) fit in 32 registers.
pub(super) const VNNI_MAX_ROWS: usize = 8;
/// Columns per step (one 64-byte load of codes).
pub(super) const STEP: usize = 2 * BLOCK;
/// Passes of W rows ahead that the kernel prefetches (into L2: the same hint into L1, one pass
/// ahead, streamed a 32000 x 2048 weight from memory at 14-16 GB/s on 1-2 Zen 4 cores, into L2
/// two passes ahead at 17-21 GB/s; decode of bench/model.py's inference model 0.86x -> 0.96x
/// torch's int4 kernel).
const PREFETCH_PASSES: usize = 2;
/// Steps whose int32 sums may add up before a flush: per lane a step adds 8 products of at
/// most 15 * 128 (x̃'s high byte), so 64 steps stay below 2^20 and 256 times that below 2^31.
const MAX_STEPS: usize = 64;

/// y_tile[i, r] = Σ_c x̃[row0 + i, c] q[n, c] in int32 per group, x̃ split into two signed
/// bytes (x̃ = 256 hi + lo) so that `vpdpbusd` (unsigned codes times signed bytes) keeps 16
/// bits of x; per group the sums meet the scale in float32.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2")]
pub(super) unsafe fn gemv_rows_vnni(
    w: &PackedW4<'_>,
    rows: std::ops::Range<usize>,
    input: &IntInput,
    row0: usize,
    m: usize,
    out: &mut [f32],
) {
    match m {
        1 => vnni_rows::<1, 4>(w, rows, input, row0, out),
        2 => vnni_rows::<2, 2>(w, rows, input, row0, out),
        3 => vnni_rows::<3, 2>(w, rows, input, row0, out),
        4 => vnni_rows::<4, 2>(w, rows, input, row0, out),
        5 => vnni_rows::<5, 1>(w, rows, input, row0, out),
        6 => vnni_rows::<6, 1>(w, rows, input, row0, out),
        7 => vnni_rows::<7, 1>(w, rows, input, row0, out),
        _ => vnni_rows::<8, 1>(w, rows, input, row0, out),
    }
}

/// `rows` of W in passes of R rows (the last few one at a time).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2")]
unsafe fn vnni_rows<const M: usize, const R: usize>(
    w: &PackedW4<'_>,
    rows: std::ops::Range<usize>,
    input: &IntInput,
    row0: usize,
    out: &mut [f32],
) {
    let width = rows.len();
    // The part's first passes start cold (the kernel prefetches PREFETCH_PASSES passes ahead
    // of the rows it works on): their rows are prefetched here, all at once. Parts of 64 rows
    // otherwise streamed weights that leave the caches at 0.75-0.8x the bytes/s of torch's int4
    // kernel on Zen 5 at M = 1.
    let row_bytes = packed_row_bytes(w.shape.k);
    for n in rows.start..rows.end.min(rows.start + PREFETCH_PASSES * R) {
        let row = w.packed.as_ptr().add(n * row_bytes);
        for at in (0..row_bytes).step_by(64) {
            _mm_prefetch::<_MM_HINT_T1>(row.add(at) as *const i8);
        }
    }
    let mut n = rows.start;
    while n + R <= rows.end {
        vnni_tile::<M, R>(w, n, input, row0, out, (n - rows.start, width));
        n += R;
    }
    while n < rows.end {
        vnni_tile::<M, 1>(w, n, input, row0, out, (n - rows.start, width));
        n += 1;
    }
}

/// Sums of one row of W against M rows of x̃: [row of W][row of x̃].
type Acc<const M: usize, const R: usize> = [[__m512i; M]; R];

/// acc += codes (R rows of W, 64 codes each) times the 64 x̃ columns at `at` of each x row.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2")]
unsafe fn dot<const M: usize, const R: usize>(
    codes: &[__m512i; R],
    input: &IntInput,
    at: usize,
    lo: &mut Acc<M, R>,
    hi: &mut Acc<M, R>,
) {
    for j in 0..M {
        let at = j * input.padded + at;
        let xl = _mm512_loadu_si512(input.lo.as_ptr().add(at) as *const _);
        let xh = _mm512_loadu_si512(input.hi.as_ptr().add(at) as *const _);
        for r in 0..R {
            lo[r][j] = _mm512_dpbusd_epi32(lo[r][j], codes[r], xl);
            hi[r][j] = _mm512_dpbusd_epi32(hi[r][j], codes[r], xh);
        }
    }
}

/// total += (256 hi + lo) * scale[r] (lanes 0-7 and 8-15 may take different scales); the
/// sums restart at 0. The int32 combination is exact (module docs).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2")]
unsafe fn flush<const M: usize, const R: usize>(
    scale: [__m512; R],
    lo: &mut Acc<M, R>,
    hi: &mut Acc<M, R>,
    total: &mut [[__m512; M]; R],
) {
    for r in 0..R {
        for j in 0..M {
            let sum = _mm512_add_epi32(lo[r][j], _mm512_slli_epi32::<8>(hi[r][j]));
            total[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale[r], total[r][j]);
            (lo[r][j], hi[r][j]) = (_mm512_setzero_si512(), _mm512_setzero_si512());
        }
    }
}

/// out[i, at + r] for rows n .. n + R of W and M rows of x̃ from `row0`; `(at, width)`: the
/// first column of out and its row length.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2")]
unsafe fn vnni_tile<const M: usize, const R: usize>(
    w: &PackedW4<'_>,
    n: usize,
    input: &IntInput,
    row0: usize,
    out: &mut [f32],
    (at, width): (usize, usize),
) {
    let s = w.shape;
    let (row_bytes, groups, g) = (packed_row_bytes(s.k), s.groups(), s.group_size);
    let steps = row_bytes.div_ceil(STEP / 2);
    // Groups of whole steps (or one group per row) flush once per group with one scale;
    // others after each half of a step, lanes 0-7 and 8-15 each with their group's scale.
    let uniform = groups == 1 || g.is_multiple_of(STEP);
    let row = |r: usize| (n + r) * groups..(n + r + 1) * groups;
    let packed: [*const u8; R] =
        std::array::from_fn(|r| w.packed.as_ptr().add((n + r) * row_bytes));
    let scales: [&[f32]; R] = std::array::from_fn(|r| &w.scales.as_f32()[row(r)]);
    let x = row0 * input.padded;
    let mask = _mm512_set1_epi8(15);
    let mut lo = [[_mm512_setzero_si512(); M]; R];
    let mut hi = [[_mm512_setzero_si512(); M]; R];
    let mut total = [[_mm512_setzero_ps(); M]; R];
    for t in 0..steps {
        // A last odd block: its 32 bytes, the rest zero codes (against zero x̃).
        let load = if (t + 1) * (STEP / 2) <= row_bytes {
            u64::MAX
        } else {
            0xFFFF_FFFF
        };
        let (mut low, mut high) = ([mask; R], [mask; R]);
        for r in 0..R {
            let p = packed[r].add(t * (STEP / 2));
            // The same bytes of the rows passes ahead (past the part's end: a harmless hint).
            let ahead = p.wrapping_add(PREFETCH_PASSES * R * row_bytes);
            _mm_prefetch::<_MM_HINT_T1>(ahead as *const i8);
            let v = _mm512_maskz_loadu_epi8(load, p as *const i8);
            low[r] = _mm512_and_si512(v, mask);
            high[r] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask);
        }
        dot::<M, R>(&low, input, x + t * STEP, &mut lo, &mut hi);
        if !uniform {
            flush::<M, R>(half_scales(&scales, g, t, 0), &mut lo, &mut hi, &mut total);
        }
        dot::<M, R>(&high, input, x + t * STEP + BLOCK, &mut lo, &mut hi);
        if !uniform {
            flush::<M, R>(half_scales(&scales, g, t, 1), &mut lo, &mut hi, &mut total);
        } else {
            let group_ends = groups > 1 && ((t + 1) * STEP).is_multiple_of(g);
            if group_ends || (t + 1).is_multiple_of(MAX_STEPS) || t + 1 == steps {
                let mut scale = [_mm512_setzero_ps(); R];
                for (r, s) in scale.iter_mut().enumerate() {
                    *s = _mm512_set1_ps(scale_at(scales[r], g, t * STEP));
                }
                flush::<M, R>(scale, &mut lo, &mut hi, &mut total);
            }
        }
    }
    for r in 0..R {
        let zeros = &w.zeros[row(r)];
        for j in 0..M {
            let i = row0 + j;
            let sums = &input.group_sums[i * groups..(i + 1) * groups];
            let dot = _mm512_reduce_add_ps(total[r][j]) * input.scale[i];
            out[j * width + at + r] = dot - zero_term(scales[r], zeros, sums);
        }
    }
}

/// The scale of column `col` in a row's `scales` (groups of `g` columns).
#[inline(always)]
fn scale_at(scales: &[f32], g: usize, col: usize) -> f32 {
    scales[(col / g).min(scales.len() - 1)]
}

/// The scales of half `h` of step t (lanes 0-7: its first 32 columns, 8-15: those 64 later).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn half_scales<const R: usize>(
    scales: &[&[f32]; R],
    g: usize,
    t: usize,
    h: usize,
) -> [__m512; R] {
    let col = t * STEP + h * (BLOCK / 2);
    let mut out = [_mm512_setzero_ps(); R];
    for (o, s) in out.iter_mut().zip(scales) {
        let (a, b) = (scale_at(s, g, col), scale_at(s, g, col + BLOCK));
        *o = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(a), _mm512_set1_ps(b));
    }
    out
}
