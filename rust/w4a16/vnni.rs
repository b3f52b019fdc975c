//! The AVX-512 VNNI integer GEMV.
//!
//! Each step reads 64 bytes of a packed row (two blocks, 128 columns) with one load; its low
//! nibbles are columns 0-31 and 64-95 of the step, its high nibbles 32-63 and 96-127 (mod.rs's
//! layout). x̃ is stored in that order (`IntInput` with `step_order`), so the nibbles meet x̃ as they come out
//! of two `vpand`s: no widening, no shuffle. Short x (1 or 2 rows) takes 4 or 2 rows of W per
//! pass, so that each x̃ vector loaded serves several rows and the sums form enough independent
//! `vpdpbusd` chains to hide their latency.

use std::arch::x86_64::*;

use super::{packed_row_bytes, IntInput, PackedW4, BLOCK, BLOCK_BYTES};

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
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2")]
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
        _ => vnni_rows::<4, 2>(w, rows, input, row0, out),
    }
}

/// `rows` of W in passes of R rows (the last few one at a time).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2")]
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
    // Groups smaller than a step: the group of each 32-column piece, looked up per flush
    // (a division there cost about as much as the step's own arithmetic).
    let piece_groups = if uniform_groups(w.shape) {
        Vec::new()
    } else {
        w.shape
            .half_block_groups(row_bytes.div_ceil(STEP / 2) * STEP / BLOCK_BYTES)
    };
    let mut n = rows.start;
    while n + R <= rows.end {
        let at = (n - rows.start, width);
        vnni_tile::<M, R>(w, n, input, &piece_groups, row0, out, at);
        n += R;
    }
    while n < rows.end {
        let at = (n - rows.start, width);
        vnni_tile::<M, 1>(w, n, input, &piece_groups, row0, out, at);
        n += 1;
    }
}

/// Whether every group is whole steps (or the row one group): one scale per flush.
fn uniform_groups(shape: super::Shape) -> bool {
    shape.groups() == 1 || shape.group_size.is_multiple_of(STEP)
}

/// Sums of one row of W against M rows of x̃: [row of W][row of x̃].
type Acc<const M: usize, const R: usize> = [[__m512i; M]; R];

/// acc += codes (R rows of W, 64 codes each) times the 64 x̃ columns at `at` of each x row.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2")]
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

/// total += Σ codes x̃ over one step (both halves) * scale[r]: x̃'s high bytes first, shifted
/// by 8 in the int32 sum, then its low bytes (|sum| < 2^23: exact).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2")]
unsafe fn step_sums<const M: usize, const R: usize>(
    low: &[__m512i; R],
    high: &[__m512i; R],
    input: &IntInput,
    at: usize,
    scale: [__m512; R],
    total: &mut [[__m512; M]; R],
) {
    let zero = _mm512_setzero_si512();
    #[allow(clippy::needless_range_loop)] // j picks x's row and the inner index of total[r]
    for j in 0..M {
        let at = j * input.padded + at;
        let (lo, hi) = (input.lo.as_ptr().add(at), input.hi.as_ptr().add(at));
        let (xl0, xh0) = (_mm512_loadu_si512(lo as _), _mm512_loadu_si512(hi as _));
        let (xl1, xh1) = (
            _mm512_loadu_si512(lo.add(BLOCK) as _),
            _mm512_loadu_si512(hi.add(BLOCK) as _),
        );
        for r in 0..R {
            let sum = _mm512_dpbusd_epi32(zero, low[r], xh0);
            let sum = _mm512_slli_epi32::<8>(_mm512_dpbusd_epi32(sum, high[r], xh1));
            let sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(sum, low[r], xl0), high[r], xl1);
            total[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale[r], total[r][j]);
        }
    }
}

/// Row r's scale of `group` broadcast, for R rows whose scales lie `groups` apart. (A loop, not
/// `array::from_fn`: intrinsics in its closure were not inlined, each a call of its own.)
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn row_scales<const R: usize>(rows: *const f32, groups: usize, group: usize) -> [__m512; R] {
    let mut scale = [_mm512_setzero_ps(); R];
    for (r, s) in scale.iter_mut().enumerate() {
        *s = _mm512_set1_ps(*rows.add(r * groups + group));
    }
    scale
}

/// total += (256 hi + lo) * scale[r] (lanes 0-7 and 8-15 may take different scales); the
/// sums restart at 0. The int32 combination is exact (module docs).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2")]
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
/// first column of out and its row length; `piece_groups`: the group of each 32 columns
/// where groups are smaller than a step.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2")]
unsafe fn vnni_tile<const M: usize, const R: usize>(
    w: &PackedW4<'_>,
    n: usize,
    input: &IntInput,
    piece_groups: &[usize],
    row0: usize,
    out: &mut [f32],
    (at, width): (usize, usize),
) {
    let s = w.shape;
    let (row_bytes, groups, g) = (packed_row_bytes(s.k), s.groups(), s.group_size);
    let steps = row_bytes.div_ceil(STEP / 2);
    let row = |r: usize| (n + r) * groups..(n + r + 1) * groups;
    let scales: [&[f32]; R] = std::array::from_fn(|r| &w.scales.as_f32()[row(r)]);
    let codes = StepLoader::<R>::new(w, n);
    let x = row0 * input.padded;
    let mut lo = [[_mm512_setzero_si512(); M]; R];
    let mut hi = [[_mm512_setzero_si512(); M]; R];
    let mut total = [[_mm512_setzero_ps(); M]; R];
    if g == STEP && groups > 1 {
        // One group per step (the default 128): each sum is built as (hi << 8) + lo in one
        // register and meets its scale at once: no separate lo / hi sums to combine and clear.
        let scale_rows = w.scales.as_f32().as_ptr().add(n * groups);
        for t in 0..steps {
            let (low, high) = codes.step(t);
            // t < steps = groups: one group per step.
            let scale = row_scales::<R>(scale_rows, groups, t);
            step_sums::<M, R>(&low, &high, input, x + t * STEP, scale, &mut total);
        }
    } else if uniform_groups(s) {
        // Groups of whole steps: one flush per group (or per MAX_STEPS steps) with one scale
        // per row. The group is tracked by counting down: a division per step, and bounds
        // checks on the scales, had cost about as much as the step's own arithmetic.
        let group_steps = if groups == 1 { usize::MAX } else { g / STEP };
        let scale_rows = w.scales.as_f32().as_ptr().add(n * groups);
        let (mut group, mut group_left, mut run_left) = (0, group_steps, MAX_STEPS);
        for t in 0..steps {
            let (low, high) = codes.step(t);
            dot::<M, R>(&low, input, x + t * STEP, &mut lo, &mut hi);
            dot::<M, R>(&high, input, x + t * STEP + BLOCK, &mut lo, &mut hi);
            (group_left, run_left) = (group_left - 1, run_left - 1);
            if group_left == 0 || run_left == 0 || t + 1 == steps {
                // group < groups: the steps end with the last group.
                let scale = row_scales::<R>(scale_rows, groups, group);
                flush::<M, R>(scale, &mut lo, &mut hi, &mut total);
                run_left = MAX_STEPS;
                if group_left == 0 {
                    (group, group_left) = (group + 1, group_steps);
                }
            }
        }
    } else {
        // Smaller groups (multiples of 32 columns): lanes 0-7 and 8-15 of a half step may
        // take different scales. Groups of 64: one flush per step, as both halves' lanes
        // 0-7 (columns 0-63 of the step) and 8-15 (64-127) lie in one group each.
        let per_step = g.is_multiple_of(2 * BLOCK_BYTES);
        for t in 0..steps {
            let (low, high) = codes.step(t);
            for (h, half) in [low, high].iter().enumerate() {
                dot::<M, R>(half, input, x + t * STEP + h * BLOCK, &mut lo, &mut hi);
                if !per_step || h == 1 {
                    let h = if per_step { 0 } else { h };
                    let (a, b) = (piece_groups[4 * t + h], piece_groups[4 * t + h + 2]);
                    let mut scale = [_mm512_setzero_ps(); R];
                    for (s, rs) in scale.iter_mut().zip(&scales) {
                        let (a, b) = (_mm512_set1_ps(rs[a]), _mm512_set1_ps(rs[b]));
                        *s = _mm512_mask_blend_ps(0xFF00, a, b);
                    }
                    flush::<M, R>(scale, &mut lo, &mut hi, &mut total);
                }
            }
        }
    }
    for r in 0..R {
        let zeros = &w.zeros[row(r)];
        for j in 0..M {
            let i = row0 + j;
            let sums = &input.group_sums[i * groups..(i + 1) * groups];
            // The zero points' term in lanes (groups), subtracted before the one reduction.
            let zero = zero_terms(scales[r], zeros, sums);
            let lanes = _mm512_fmsub_ps(total[r][j], _mm512_set1_ps(input.scale[i]), zero);
            out[j * width + at + r] = _mm512_reduce_add_ps(lanes);
        }
    }
}

/// Σ_g scale_g zero_g x_sum_g over a row's groups, 16 groups to a vector (lane l sums groups
/// l, l + 16, ...). In vectors: per row of W (and of x) the scalar-order loop of
/// [`zero_term`](super::zero_term) and a second reduction had cost the kernel 10-17% (its
/// calls ran 1.11-1.20x faster without them; Xeon family 6 model 207, K = 2048 and 4096).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn zero_terms(scales: &[f32], zeros: &[u8], x_sums: &[f32]) -> __m512 {
    let groups = scales.len().min(zeros.len()).min(x_sums.len());
    let mut acc = _mm512_setzero_ps();
    for g in (0..groups).step_by(16) {
        let mask = (u32::MAX >> (32 - (groups - g).min(16))) as __mmask16;
        let s = _mm512_maskz_loadu_ps(mask, scales.as_ptr().add(g));
        let z8 = _mm_maskz_loadu_epi8(mask, zeros.as_ptr().add(g) as *const i8);
        let z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(z8));
        let x = _mm512_maskz_loadu_ps(mask, x_sums.as_ptr().add(g));
        acc = _mm512_fmadd_ps(_mm512_mul_ps(s, z), x, acc);
    }
    acc
}

/// Reads the codes of R rows of W step by step, prefetching the rows PREFETCH_PASSES passes
/// ahead.
struct StepLoader<const R: usize> {
    first_row: *const u8,
    row_bytes: usize,
}

impl<const R: usize> StepLoader<R> {
    #[inline(always)]
    unsafe fn new(w: &PackedW4<'_>, n: usize) -> Self {
        let row_bytes = packed_row_bytes(w.shape.k);
        let first_row = w.packed.as_ptr().add(n * row_bytes);
        StepLoader {
            first_row,
            row_bytes,
        }
    }

    /// Step t's codes of each row: low nibbles (the step's first block), high nibbles.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    unsafe fn step(&self, t: usize) -> ([__m512i; R], [__m512i; R]) {
        let mask = _mm512_set1_epi8(15);
        // Whole steps by plain loads: a masked load on every step cost 10% of the kernel (a
        // mask register write and an ALU uop per load; Xeon family 6 model 207).
        let whole = (t + 1) * (STEP / 2) <= self.row_bytes;
        let (mut low, mut high) = ([mask; R], [mask; R]);
        for r in 0..R {
            let p = self.first_row.add(r * self.row_bytes + t * (STEP / 2));
            // The same bytes of the rows passes ahead (past the part's end: a harmless hint).
            let ahead = p.wrapping_add(PREFETCH_PASSES * R * self.row_bytes);
            _mm_prefetch::<_MM_HINT_T1>(ahead as *const i8);
            let v = if whole {
                _mm512_loadu_si512(p as *const _)
            } else {
                // A last odd block: its 32 bytes, the rest zero codes (against zero x̃).
                _mm512_maskz_loadu_epi8(0xFFFF_FFFF, p as *const i8)
            };
            low[r] = _mm512_and_si512(v, mask);
            high[r] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask);
        }
        (low, high)
    }
}
