//! W4 weight-only quantization (DESIGN.md section 5) and the CPU W4A16 kernels.
//!
//! Codes are stored as unsigned nibbles 0..15 with a per-group zero: the group's zero point, or 8
//! for the symmetric scheme (whose codes -8..7 are stored as q + 8). A weight is then always
//! (q - zero) * scale, so one kernel serves both schemes.
//!
//! CPU layout ("packed"): row n of W [N, K] takes ceil(K / 64) blocks of 32 bytes; byte j of
//! block b holds the code of column 64b + j in its low nibble and of column 64b + 32 + j in its
//! high nibble (columns past K hold 0). Unpacking a block is then two masks and two widening
//! conversions, with the 64 columns in order.

use rayon::prelude::*;

use crate::error::{FgError, FgResult};
use crate::simd::{Simd, SimdLevel};
use crate::threads::{self, Disjoint, SendPtr};

/// Columns per packed block.
pub const BLOCK: usize = 64;
/// Bytes per packed block.
pub const BLOCK_BYTES: usize = BLOCK / 2;
/// The stored zero of the symmetric scheme.
pub const SYMMETRIC_ZERO: u8 = 8;
/// Rows of x the GEMV kernel takes together (each packed block is unpacked once for them).
pub const MAX_ROWS: usize = 4;
/// Elements of W per parallel task.
const PAR_MIN: usize = 1 << 16;
/// Rows of W per part of the GEMV's work.
const MIN_ROWS_PER_PART: usize = 64;

/// Bytes of one packed row of K columns.
pub fn packed_row_bytes(k: usize) -> usize {
    k.div_ceil(BLOCK) * BLOCK_BYTES
}

/// The quantization of a weight W [n, k] in groups of `group_size` columns along k.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub n: usize,
    pub k: usize,
    pub group_size: usize,
}

impl Shape {
    /// `group_size` -1 means one group per row; otherwise 32, 64 or 128 ... any positive size.
    pub fn new(op: &str, n: usize, k: usize, group_size: i64) -> FgResult<Shape> {
        let group_size = match group_size {
            -1 => k.max(1),
            g if g > 0 => g as usize,
            g => {
                return Err(FgError::Value(format!(
                    "{op}: group_size must be positive or -1 (whole rows), got {g}"
                )))
            }
        };
        if k == 0 {
            return Err(FgError::Value(format!(
                "{op}: the weight has no columns (K = 0)"
            )));
        }
        Ok(Shape { n, k, group_size })
    }

    pub fn groups(&self) -> usize {
        self.k.div_ceil(self.group_size)
    }

    fn check(&self, op: &str, arrays: &[(&str, usize, usize)]) -> FgResult<()> {
        for &(name, got, per_row) in arrays {
            if got != self.n * per_row {
                return Err(FgError::Value(format!(
                    "{op}: {name} has {got} elements, expected {} x {per_row}",
                    self.n
                )));
            }
        }
        Ok(())
    }
}

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

/// Quantizes one group: returns (scale, stored zero) and writes the stored codes.
#[inline(always)]
fn quantize_group(w: &[f32], zero_point: bool, codes: &mut [u8]) -> (f32, u8) {
    if zero_point {
        let (lo, hi) = w
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        let scale = (hi - lo) / 15.0;
        let scale = if scale == 0.0 || !scale.is_finite() {
            1.0
        } else {
            scale
        };
        let zero = round_even(-lo / scale).clamp(0.0, 15.0);
        for (q, &v) in codes.iter_mut().zip(w) {
            *q = (round_even(v / scale) + zero).clamp(0.0, 15.0) as u8;
        }
        (scale, zero as u8)
    } else {
        let amax = w.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
        let scale = amax / 7.0;
        let scale = if scale == 0.0 || !scale.is_finite() {
            1.0
        } else {
            scale
        };
        for (q, &v) in codes.iter_mut().zip(w) {
            *q = (round_even(v / scale).clamp(-8.0, 7.0) + SYMMETRIC_ZERO as f32) as u8;
        }
        (scale, SYMMETRIC_ZERO)
    }
}

/// Quantizes W [n, k] (row-major) into stored codes [n, k] (one per byte), scales and zeros
/// [n, groups]. A group whose scale would be 0 (or not finite) gets scale 1.
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
    threads::install(|| {
        w.par_chunks(k)
            .zip(codes.par_chunks_mut(k))
            .zip(
                scales
                    .par_chunks_mut(groups)
                    .zip(zeros.par_chunks_mut(groups)),
            )
            .with_min_len(per_task)
            .for_each(|((w, codes), (scales, zeros))| {
                let pieces = w
                    .chunks(shape.group_size)
                    .zip(codes.chunks_mut(shape.group_size));
                for ((w, codes), (s, z)) in pieces.zip(scales.iter_mut().zip(zeros.iter_mut())) {
                    // Compiled for the SIMD level: rounding becomes one instruction and the
                    // group loops vectorize.
                    (*s, *z) = quantize_group_level(level, w, zero_point, codes);
                }
            })
    });
    Ok(())
}

/// Packs stored codes [n, k] into the CPU layout [n, packed_row_bytes(k)].
pub fn pack(codes: &[u8], shape: Shape, packed: &mut [u8]) -> FgResult<()> {
    let (k, row_bytes) = (shape.k, packed_row_bytes(shape.k));
    shape.check(
        "quantize_w4",
        &[
            ("codes", codes.len(), k),
            ("packed", packed.len(), row_bytes),
        ],
    )?;
    if let Some(bad) = codes.iter().find(|&&q| q > 15) {
        return Err(FgError::Value(format!(
            "quantize_w4: codes must be in 0..15, got {bad}"
        )));
    }
    threads::install(|| {
        codes
            .par_chunks(k)
            .zip(packed.par_chunks_mut(row_bytes))
            .with_min_len(threads::rows_per_task(shape.n, k, PAR_MIN))
            .for_each(|(codes, packed)| {
                for (b, out) in packed.chunks_exact_mut(BLOCK_BYTES).enumerate() {
                    let code = |c: usize| codes.get(b * BLOCK + c).copied().unwrap_or(0);
                    for (j, byte) in out.iter_mut().enumerate() {
                        *byte = code(j) | (code(j + BLOCK_BYTES) << 4);
                    }
                }
            })
    });
    Ok(())
}

/// Unpacks the CPU layout back to stored codes [n, k].
pub fn unpack(packed: &[u8], shape: Shape, codes: &mut [u8]) -> FgResult<()> {
    let (k, row_bytes) = (shape.k, packed_row_bytes(shape.k));
    shape.check(
        "unpack_w4",
        &[
            ("packed", packed.len(), row_bytes),
            ("codes", codes.len(), k),
        ],
    )?;
    for (packed, codes) in packed.chunks(row_bytes).zip(codes.chunks_mut(k)) {
        for (c, q) in codes.iter_mut().enumerate() {
            let byte = packed[c / BLOCK * BLOCK_BYTES + c % BLOCK_BYTES];
            *q = if c % BLOCK < BLOCK_BYTES {
                byte & 15
            } else {
                byte >> 4
            };
        }
    }
    Ok(())
}

/// The packed weight with its per-group parameters, as the kernels read it.
pub struct PackedW4<'a> {
    pub packed: &'a [u8],
    pub scales: &'a [f32],
    pub zeros: &'a [u8],
    pub shape: Shape,
}

impl PackedW4<'_> {
    fn check(&self, op: &str) -> FgResult<()> {
        let s = self.shape;
        s.check(
            op,
            &[
                ("packed", self.packed.len(), packed_row_bytes(s.k)),
                ("scales", self.scales.len(), s.groups()),
                ("zeros", self.zeros.len(), s.groups()),
            ],
        )
    }

    /// Row n dequantized into `out` (k floats; the tail of the last block is dropped).
    #[inline(always)]
    fn dequantize_row(&self, n: usize, out: &mut [f32]) {
        let s = self.shape;
        let row_bytes = packed_row_bytes(s.k);
        let packed = &self.packed[n * row_bytes..(n + 1) * row_bytes];
        let groups = s.groups();
        let (scales, zeros) = (&self.scales[n * groups..], &self.zeros[n * groups..]);
        let mut block = [0.0f32; BLOCK];
        for (b, bytes) in packed.chunks_exact(BLOCK_BYTES).enumerate() {
            self.dequantize_block(b, bytes, scales, zeros, &mut block);
            let start = b * BLOCK;
            let len = BLOCK.min(s.k - start);
            out[start..start + len].copy_from_slice(&block[..len]);
        }
    }

    /// Block b of a row: 64 weights (q - zero) * scale, in column order.
    #[inline(always)]
    fn dequantize_block(
        &self,
        b: usize,
        bytes: &[u8],
        scales: &[f32],
        zeros: &[u8],
        out: &mut [f32; BLOCK],
    ) {
        let g = self.shape.group_size;
        let (lo, hi) = out.split_at_mut(BLOCK_BYTES);
        let start = b * BLOCK;
        let one_group = |c: usize| c / g == (c + BLOCK_BYTES - 1) / g;
        if one_group(start) && one_group(start + BLOCK_BYTES) {
            // Each half of the block lies in one group: one scale and zero per half.
            let half = |h: usize| {
                let group = ((start + h * BLOCK_BYTES) / g).min(scales.len() - 1);
                (scales[group], zeros[group] as f32)
            };
            let ((s0, z0), (s1, z1)) = (half(0), half(1));
            for ((l, h), &byte) in lo.iter_mut().zip(hi.iter_mut()).zip(bytes) {
                *l = ((byte & 15) as f32 - z0) * s0;
                *h = ((byte >> 4) as f32 - z1) * s1;
            }
        } else {
            for (j, &byte) in bytes.iter().enumerate() {
                let (c0, c1) = (start + j, start + j + BLOCK_BYTES);
                let param = |c: usize| {
                    let group = (c / g).min(scales.len() - 1);
                    (scales[group], zeros[group] as f32)
                };
                let ((s0, z0), (s1, z1)) = (param(c0), param(c1));
                lo[j] = ((byte & 15) as f32 - z0) * s0;
                hi[j] = ((byte >> 4) as f32 - z1) * s1;
            }
        }
    }
}

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

    /// `$tile::<M>(args)` for M = `$m` rows of x (the callers pass 1 to 4).
    macro_rules! by_rows {
        ($tile:ident, $m:expr, $($arg:expr),*) => {
            match $m {
                1 => $tile::<1>($($arg),*),
                2 => $tile::<2>($($arg),*),
                3 => $tile::<3>($($arg),*),
                _ => $tile::<4>($($arg),*),
            }
        };
    }

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
        by_rows!(vnni_tile, m, w, rows, input, row0, out)
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
            // The scale of the group(s) of block b: one, or one per half block.
            let scale_of = |b: usize| {
                let group = |col: usize| scales[(col / g).min(groups - 1)];
                if blend {
                    (group(b * BLOCK), group(b * BLOCK + BLOCK_BYTES))
                } else {
                    (group(b * BLOCK), group(b * BLOCK))
                }
            };
            let blocks = row_bytes / BLOCK_BYTES;
            let (mut left, mut first) = (blocks_per_flush, 0);
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
                    let (a, c) = scale_of(first);
                    flush::<M>(a, c, &mut lo_acc, &mut hi_acc, &mut total);
                    (left, first) = (blocks_per_flush, b + 1);
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
        use super::{packed_row_bytes, zero_term, BLOCK, BLOCK_BYTES};
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
            let scales = &w.scales[n * groups..(n + 1) * groups];
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
                out[j * width + r] = hsum(*t) * input.scale[i] - zero_term(scales, zeros, sums);
            }
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
struct GemvInput {
    /// x rows padded with zeros to whole blocks: [m, padded].
    x: Vec<f32>,
    /// Σ x over each group: [m, groups].
    x_group_sums: Vec<f32>,
    padded: usize,
}

impl GemvInput {
    fn new(x: &[f32], shape: Shape) -> GemvInput {
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

/// x for the integer kernels: x̃ = round(x / scale) with scale = max|x| / 32639 per row (so that
/// hi = (x̃ + 128) >> 8 fits a signed byte), split as x̃ = 256 hi + lo, padded to whole blocks.
struct IntInput {
    lo: Vec<i8>,
    hi: Vec<i8>,
    scale: Vec<f32>,
    /// Σ x̃ · scale over each group: [m, groups].
    group_sums: Vec<f32>,
    padded: usize,
}

/// The largest |x̃|: 256 * 127 + 127, so hi and lo are both signed bytes.
const X_INT_MAX: f32 = 32639.0;

impl IntInput {
    /// None when a row holds NaN or infinity (the float kernel then keeps torch's semantics).
    fn new(level: SimdLevel, x: &[f32], shape: Shape) -> Option<IntInput> {
        let (k, groups) = (shape.k, shape.groups());
        let padded = k.div_ceil(BLOCK) * BLOCK;
        let m = x.len() / k;
        let mut input = IntInput {
            lo: vec![0; m * padded],
            hi: vec![0; m * padded],
            scale: vec![1.0; m],
            group_sums: vec![0.0; m * groups],
            padded,
        };
        for (i, row) in x.chunks_exact(k).enumerate() {
            let (lo, hi) = (
                &mut input.lo[i * padded..i * padded + k],
                &mut input.hi[i * padded..i * padded + k],
            );
            let sums = &mut input.group_sums[i * groups..(i + 1) * groups];
            input.scale[i] = round_x_row(level, row, shape.group_size, lo, hi, sums)?;
        }
        Some(input)
    }
}

crate::dispatch! {
    fn round_x_row(row: &[f32], group_size: usize, lo: &mut [i8], hi: &mut [i8], sums: &mut [f32]) -> Option<f32> = round_x_row_impl;
}

/// One row of [`IntInput`]: writes x̃'s bytes and the group sums, returns the scale (None when
/// the row is not finite). Compiled for the SIMD level, so that the loops vectorize.
#[inline(always)]
#[allow(clippy::extra_unused_type_parameters)] // S only picks the target features
unsafe fn round_x_row_impl<S: Simd>(
    row: &[f32],
    group_size: usize,
    lo: &mut [i8],
    hi: &mut [i8],
    sums: &mut [f32],
) -> Option<f32> {
    let amax = abs_max_or_inf(row);
    if amax == f32::INFINITY {
        return None;
    }
    let scale = if amax > 0.0 { amax / X_INT_MAX } else { 1.0 };
    let pieces = row
        .chunks(group_size)
        .zip(lo.chunks_mut(group_size).zip(hi.chunks_mut(group_size)));
    for ((row, (lo, hi)), sum) in pieces.zip(sums.iter_mut()) {
        // Σ x̃ = Σ (256 hi + lo), exact in i64.
        let mut total = 0i64;
        for ((&v, l), h) in row.iter().zip(lo.iter_mut()).zip(hi.iter_mut()) {
            let q = (v / scale).round_ties_even().clamp(-X_INT_MAX, X_INT_MAX) as i32;
            let high = (q + 128) >> 8;
            (*h, *l) = (high as i8, (q - 256 * high) as i8);
            total += q as i64;
        }
        *sum = (total as f64 * scale as f64) as f32;
    }
    Some(scale)
}

/// max |v| over `row`, or infinity when it holds NaN or infinity; in 8 lanes so that it
/// vectorizes.
#[inline(always)]
fn abs_max_or_inf(row: &[f32]) -> f32 {
    let bound = |v: f32| {
        if v.is_finite() {
            v.abs()
        } else {
            f32::INFINITY
        }
    };
    let mut lanes = [0.0f32; 8];
    let chunks = row.chunks_exact(8);
    for (lane, &v) in lanes.iter_mut().zip(chunks.remainder()) {
        *lane = bound(v);
    }
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(bound(v));
        }
    }
    lanes.iter().fold(0.0, |a, &v| a.max(v))
}

crate::dispatch! {
    fn gemv_rows(w: &PackedW4<'_>, rows: std::ops::Range<usize>, input: &GemvInput, row0: usize, m: usize, out: &mut [f32]) = gemv_rows_impl;
    fn dequantize_rows(w: &PackedW4<'_>, rows: std::ops::Range<usize>, out: &mut [f32]) = dequantize_rows_impl;
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

/// Σ_g scale_g * zero_g * x_sum_g, in 8 lanes so that it vectorizes.
#[inline(always)]
fn zero_term(scales: &[f32], zeros: &[u8], x_sums: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (s, z, x) = (
        scales.chunks_exact(8),
        zeros.chunks_exact(8),
        x_sums.chunks_exact(8),
    );
    let tails = (s.remainder(), z.remainder(), x.remainder());
    for ((s, z), x) in s.zip(z).zip(x) {
        for l in 0..8 {
            lanes[l] += s[l] * z[l] as f32 * x[l];
        }
    }
    for (l, ((s, z), x)) in tails.0.iter().zip(tails.1).zip(tails.2).enumerate() {
        lanes[l] += s * *z as f32 * x;
    }
    lanes.iter().sum()
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
            &w.scales[n * groups..(n + 1) * groups],
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

#[inline(always)]
#[allow(clippy::extra_unused_type_parameters)] // S only picks the target features
unsafe fn dequantize_rows_impl<S: Simd>(
    w: &PackedW4<'_>,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    for (r, n) in rows.enumerate() {
        w.dequantize_row(n, &mut out[r * w.shape.k..(r + 1) * w.shape.k]);
    }
}

/// Rows of W per task: about PAR_MIN weights each, and at least one task per thread.
fn row_tasks(shape: Shape) -> usize {
    threads::rows_per_task(shape.n, shape.k, PAR_MIN)
}

/// The kernels that take x rounded to int16 ([`IntInput`]): AVX-512 VNNI, and AVX2 (AVX-512
/// without VNNI keeps its float kernel).
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum IntKernel {
    Vnni,
    Avx2,
}

/// y [m, n] = x [m, k] · Wᵀ for any m (meant for small m: W is read once per 4 rows of x).
/// The group size must be a multiple of 32 (whole half blocks).
pub fn gemv(level: SimdLevel, w: &PackedW4<'_>, x: &[f32], y: &mut [f32]) -> FgResult<()> {
    const OP: &str = "w4a16_matmul";
    w.check(OP)?;
    let s = w.shape;
    let m = x.len() / s.k;
    if x.len() != m * s.k || y.len() != m * s.n {
        return Err(FgError::Value(format!(
            "{OP}: x must be [m, {}] and y [m, {}], got {} and {} elements",
            s.k,
            s.n,
            x.len(),
            y.len()
        )));
    }
    if !s.group_size.is_multiple_of(BLOCK_BYTES) {
        return Err(FgError::Value(format!(
            "{OP}: the GEMV kernel needs a group size that is a multiple of {BLOCK_BYTES}, got {}",
            s.group_size
        )));
    }
    let int_kernel = match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 if crate::simd::cpu_features().avx512vnni => Some(IntKernel::Vnni),
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 if level.is_supported() => Some(IntKernel::Avx2),
        _ => None,
    };
    let int = int_kernel.and_then(|kernel| Some((kernel, IntInput::new(level, x, s)?)));
    let float = int.is_none().then(|| GemvInput::new(x, s));
    // Parts of MIN_ROWS_PER_PART rows of W, taken dynamically by the threads; each part
    // writes its own columns of y.
    let share = MIN_ROWS_PER_PART;
    let parts = s.n.div_ceil(share);
    let y_ptr = SendPtr(y.as_mut_ptr());
    threads::split(parts, |part| {
        let rows = (part * share).min(s.n)..((part + 1) * share).min(s.n);
        let mut tile = vec![0.0f32; MAX_ROWS * rows.len()];
        for row0 in (0..m).step_by(MAX_ROWS) {
            let count = MAX_ROWS.min(m - row0);
            let out = &mut tile[..count * rows.len()];
            match (&int, &float) {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: IntKernel::Vnni is picked only when the CPU has AVX-512 VNNI.
                (Some((IntKernel::Vnni, v)), _) => unsafe {
                    x86::gemv_rows_vnni(w, rows.clone(), v, row0, count, out)
                },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: IntKernel::Avx2 is picked only when the CPU supports AVX2 + FMA.
                (Some((IntKernel::Avx2, v)), _) => unsafe {
                    x86::gemv_rows_avx2_int(w, rows.clone(), v, row0, count, out)
                },
                (_, Some(f)) => gemv_rows(level, w, rows.clone(), f, row0, count, out),
                _ => unreachable!("one of the inputs is prepared"),
            }
            for (i, tile_row) in out.chunks_exact(rows.len().max(1)).enumerate() {
                // SAFETY: part `part` alone writes columns `rows` of y's rows.
                let dst = unsafe { y_ptr.ptr().add((row0 + i) * s.n + rows.start) };
                unsafe { std::ptr::copy_nonoverlapping(tile_row.as_ptr(), dst, rows.len()) };
            }
        }
    });
    Ok(())
}

/// Rows `rows` of W dequantized into `out` [rows.len(), k] as float32.
pub fn dequantize(
    level: SimdLevel,
    w: &PackedW4<'_>,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) -> FgResult<()> {
    w.check("dequantize")?;
    let k = w.shape.k;
    if rows.end > w.shape.n || rows.start > rows.end || out.len() != rows.len() * k {
        return Err(FgError::Value(format!(
            "dequantize: rows {rows:?} of {} and out of {} elements (expected rows x {k})",
            w.shape.n,
            out.len()
        )));
    }
    let per_task = row_tasks(w.shape);
    let out = Disjoint::new(out);
    threads::for_each_chunk(rows.len(), per_task, |_, r| {
        // SAFETY: chunks are disjoint row ranges.
        let piece = unsafe { out.piece(r.start * k..r.end * k) };
        dequantize_rows(level, w, rows.start + r.start..rows.start + r.end, piece);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weight(n: usize, k: usize) -> Vec<f32> {
        (0..n * k)
            .map(|i| ((i * 7919 % 997) as f32 / 99.7 - 5.0) * 0.1)
            .collect()
    }

    /// W quantized and packed as `gemv` reads it.
    struct Quantized {
        codes: Vec<u8>,
        scales: Vec<f32>,
        zeros: Vec<u8>,
        packed: Vec<u8>,
        shape: Shape,
    }

    impl Quantized {
        fn new(level: SimdLevel, w: &[f32], shape: Shape, zero_point: bool) -> Quantized {
            let (n, k, groups) = (shape.n, shape.k, shape.groups());
            let mut q = Quantized {
                codes: vec![0u8; n * k],
                scales: vec![0.0f32; n * groups],
                zeros: vec![0u8; n * groups],
                packed: vec![0u8; n * packed_row_bytes(k)],
                shape,
            };
            quantize(
                level,
                w,
                shape,
                zero_point,
                &mut q.codes,
                &mut q.scales,
                &mut q.zeros,
            )
            .unwrap();
            pack(&q.codes, shape, &mut q.packed).unwrap();
            q
        }

        fn weight(&self) -> PackedW4<'_> {
            PackedW4 {
                packed: &self.packed,
                scales: &self.scales,
                zeros: &self.zeros,
                shape: self.shape,
            }
        }
    }

    /// Quantizes, packs, then checks unpacking and the GEMV against W_hat from `dequantize`.
    fn round_trip(level: SimdLevel, n: usize, k: usize, group_size: i64, zero_point: bool) {
        let shape = Shape::new("test", n, k, group_size).unwrap();
        let q = Quantized::new(level, &weight(n, k), shape, zero_point);
        let (codes, scales, zeros) = (&q.codes, &q.scales, &q.zeros);
        let mut back = vec![0u8; n * k];
        unpack(&q.packed, shape, &mut back).unwrap();
        assert_eq!(&back, codes);
        let pw = q.weight();
        let mut w_hat = vec![0.0f32; n * k];
        dequantize(level, &pw, 0..n, &mut w_hat).unwrap();
        for (i, (&q, &v)) in codes.iter().zip(&w_hat).enumerate() {
            let g = (i % k) / shape.group_size + (i / k) * shape.groups();
            assert_eq!(v, (q as f32 - zeros[g] as f32) * scales[g]);
        }
        let m = 5;
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0)
            .collect();
        let mut y = vec![0.0f32; m * n];
        gemv(level, &pw, &x, &mut y).unwrap();
        for i in 0..m {
            for r in 0..n {
                let want: f64 = (0..k)
                    .map(|c| x[i * k + c] as f64 * w_hat[r * k + c] as f64)
                    .sum();
                let scale: f64 = (0..k)
                    .map(|c| (x[i * k + c] * w_hat[r * k + c]).abs() as f64)
                    .sum();
                assert!(
                    (y[i * n + r] as f64 - want).abs() <= 1e-4 * scale,
                    "{level:?} g{group_size} ({i},{r})"
                );
            }
        }
    }

    #[test]
    fn quantize_pack_gemv_on_every_level() {
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            for (n, k) in [(3, 64), (70, 100), (9, 320)] {
                for (g, zp) in [
                    (32, true),
                    (64, false),
                    (128, true),
                    (-1, false),
                    (96, true),
                ] {
                    if g == -1 && k % 32 != 0 {
                        continue; // the GEMV needs whole half blocks
                    }
                    round_trip(level, n, k, g, zp);
                }
            }
        }
    }

    /// The integer kernels' int16 sums at their limit: every code 15 but each group's first,
    /// every low byte of x̃ = 32384 = 256 * 127 - 128 at -128, groups of up to whole rows (several
    /// int16 flushes each). x̃ is exact here, so only float rounding may remain.
    #[test]
    fn int16_sums_at_their_limit_do_not_wrap() {
        let (n, k) = (3, 1024);
        let x: Vec<f32> = (0..k)
            .map(|c| if c == 0 { X_INT_MAX } else { 32384.0 })
            .collect();
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            for group_size in [32, 96, 128, 512, -1] {
                let shape = Shape::new("test", n, k, group_size).unwrap();
                // Each group's -1 takes code 0, its 2s code 15 (scale 0.2, zero 5).
                let w: Vec<f32> = (0..n * k)
                    .map(|i| {
                        if i % k % shape.group_size == 0 {
                            -1.0
                        } else {
                            2.0
                        }
                    })
                    .collect();
                let q = Quantized::new(level, &w, shape, true);
                let fifteens = q.codes.iter().filter(|&&c| c == 15).count();
                assert_eq!(fifteens, n * (k - shape.groups()));
                let mut w_hat = vec![0.0f32; n * k];
                dequantize(level, &q.weight(), 0..n, &mut w_hat).unwrap();
                let mut y = vec![0.0f32; n];
                gemv(level, &q.weight(), &x, &mut y).unwrap();
                for (r, &got) in y.iter().enumerate() {
                    let row = &w_hat[r * k..(r + 1) * k];
                    let want: f64 = x.iter().zip(row).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let size: f64 = x.iter().zip(row).map(|(&a, &b)| (a * b).abs() as f64).sum();
                    assert!(
                        (got as f64 - want).abs() <= 1e-6 * size,
                        "{level:?} g{group_size} row {r}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn zero_groups_get_scale_one_and_symmetric_codes_are_offset() {
        let shape = Shape::new("test", 1, 8, -1).unwrap();
        let (mut codes, mut scales, mut zeros) = (vec![0u8; 8], vec![0.0f32], vec![0u8]);
        quantize(
            SimdLevel::Scalar,
            &[0.0; 8],
            shape,
            false,
            &mut codes,
            &mut scales,
            &mut zeros,
        )
        .unwrap();
        assert_eq!((scales[0], zeros[0]), (1.0, SYMMETRIC_ZERO));
        assert!(codes.iter().all(|&q| q == SYMMETRIC_ZERO));
        let w = [-7.0, 7.0, 3.5, 0.0, -1.0, 1.0, 2.0, -2.0];
        quantize(
            SimdLevel::Scalar,
            &w,
            shape,
            false,
            &mut codes,
            &mut scales,
            &mut zeros,
        )
        .unwrap();
        assert_eq!(scales[0], 1.0);
        assert_eq!(codes, [1, 15, 12, 8, 7, 9, 10, 6]); // 3.5 rounds half to even: 4
    }

    #[test]
    fn bad_shapes_are_value_errors() {
        assert!(matches!(Shape::new("t", 2, 8, 0), Err(FgError::Value(_))));
        assert!(matches!(Shape::new("t", 2, 0, 32), Err(FgError::Value(_))));
        let shape = Shape::new("t", 2, 8, 8).unwrap();
        let r = quantize(
            SimdLevel::Scalar,
            &[0.0; 15],
            shape,
            true,
            &mut [0; 16],
            &mut [0.0; 2],
            &mut [0; 2],
        );
        assert!(matches!(r, Err(FgError::Value(_))));
    }
}
