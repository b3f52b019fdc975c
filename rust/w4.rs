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
        input: &super::VnniInput,
        row0: usize,
        m: usize,
        out: &mut [f32],
    ) {
        match m {
            1 => vnni_tile::<1>(w, rows, input, row0, out),
            2 => vnni_tile::<2>(w, rows, input, row0, out),
            3 => vnni_tile::<3>(w, rows, input, row0, out),
            _ => vnni_tile::<4>(w, rows, input, row0, out),
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
        input: &super::VnniInput,
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

/// x for the VNNI kernel: x̃ = round(x / scale) with scale = max|x| / 32639 per row (so that
/// hi = (x̃ + 128) >> 8 fits a signed byte), split as x̃ = 256 hi + lo, padded to whole blocks.
struct VnniInput {
    lo: Vec<i8>,
    hi: Vec<i8>,
    scale: Vec<f32>,
    /// Σ x̃ · scale over each group: [m, groups].
    group_sums: Vec<f32>,
    padded: usize,
}

/// The largest |x̃|: 256 * 127 + 127, so hi and lo are both signed bytes.
const X_INT_MAX: f32 = 32639.0;

impl VnniInput {
    /// None when a row holds NaN or infinity (the float kernel then keeps torch's semantics).
    fn new(x: &[f32], shape: Shape) -> Option<VnniInput> {
        let (k, groups) = (shape.k, shape.groups());
        let padded = k.div_ceil(BLOCK) * BLOCK;
        let m = x.len() / k;
        let mut input = VnniInput {
            lo: vec![0; m * padded],
            hi: vec![0; m * padded],
            scale: vec![1.0; m],
            group_sums: vec![0.0; m * groups],
            padded,
        };
        for (i, row) in x.chunks_exact(k).enumerate() {
            let amax = row
                .iter()
                .try_fold(0.0f32, |a, &v| v.is_finite().then(|| a.max(v.abs())))?;
            let scale = if amax > 0.0 { amax / X_INT_MAX } else { 1.0 };
            input.scale[i] = scale;
            let (lo, hi) = (&mut input.lo[i * padded..], &mut input.hi[i * padded..]);
            for (c, &v) in row.iter().enumerate() {
                let q = (v / scale).round_ties_even().clamp(-X_INT_MAX, X_INT_MAX) as i32;
                let h = (q + 128) >> 8;
                (hi[c], lo[c]) = (h as i8, (q - 256 * h) as i8);
            }
            let sums = &mut input.group_sums[i * groups..(i + 1) * groups];
            for (sum, piece) in sums
                .iter_mut()
                .zip((0..k).collect::<Vec<_>>().chunks(shape.group_size))
            {
                let total: i64 = piece
                    .iter()
                    .map(|&c| 256 * hi[c] as i64 + lo[c] as i64)
                    .sum();
                *sum = (total as f64 * scale as f64) as f32;
            }
        }
        Some(input)
    }
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
    let pieces = scales.chunks(8).zip(zeros.chunks(8)).zip(x_sums.chunks(8));
    for ((s, z), x) in pieces {
        for l in 0..s.len() {
            lanes[l] += s[l] * z[l] as f32 * x[l];
        }
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
    let vnni = match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 if crate::simd::cpu_features().avx512vnni => VnniInput::new(x, s),
        _ => None,
    };
    let float = vnni.is_none().then(|| GemvInput::new(x, s));
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
            match (&vnni, &float) {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: VnniInput exists only when the CPU has AVX-512 VNNI.
                (Some(v), _) => unsafe {
                    x86::gemv_rows_vnni(w, rows.clone(), v, row0, count, out)
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

    /// Quantizes, packs, then checks unpacking and the GEMV against W_hat from `dequantize`.
    fn round_trip(level: SimdLevel, n: usize, k: usize, group_size: i64, zero_point: bool) {
        let shape = Shape::new("test", n, k, group_size).unwrap();
        let w = weight(n, k);
        let (mut codes, mut scales, mut zeros) = (
            vec![0u8; n * k],
            vec![0.0f32; n * shape.groups()],
            vec![0u8; n * shape.groups()],
        );
        quantize(
            level,
            &w,
            shape,
            zero_point,
            &mut codes,
            &mut scales,
            &mut zeros,
        )
        .unwrap();
        let mut packed = vec![0u8; n * packed_row_bytes(k)];
        pack(&codes, shape, &mut packed).unwrap();
        let mut back = vec![0u8; n * k];
        unpack(&packed, shape, &mut back).unwrap();
        assert_eq!(back, codes);
        let pw = PackedW4 {
            packed: &packed,
            scales: &scales,
            zeros: &zeros,
            shape,
        };
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
