//! float32 -> ShiftQuant codes along the last axis (`quantize_rows`) or along the first axis of a
//! row-major matrix (`quantize_cols`, what the backward GEMMs need), and back (`dequantize`).
//!
//! `quantize_cols` makes two passes, both streaming x row by row (vectorized across columns):
//! the max |x| of every (group of rows, column), then the codes of blocks of `COL_BLOCK` rows,
//! encoded row by row into a cache-resident int8 block and transposed from there into the
//! output rows. Reading x column-wise instead (through transposed float panels) was latency
//! bound: a cache miss per 64 bytes, at 5x the row path's time.

use super::{num_groups, MAX_SHIFT};
use crate::error::{FgError, FgResult};
use crate::simd::{prefetch, prefetch_block, Bf16, Simd, SimdLevel, Storage};
use crate::threads::{self, Disjoint, SendPtr};

/// Rows shorter than this many elements in total run on the calling thread.
const PAR_MIN: usize = 1 << 16;
/// Rows per block of `quantize_cols`' encoding pass.
const COL_BLOCK: usize = 64;
/// Adding then subtracting 1.5 * 2^23 rounds half to even for |v| < 2^22 (codes are < 2^7).
const ROUND_MAGIC: f32 = 12_582_912.0;
const ABS_MASK: u32 = 0x7fff_ffff;
const INF_BITS: u32 = 0x7f80_0000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rounding {
    Nearest,
    /// Round up with probability equal to the fractional part; the uniform draw for the code at
    /// (row, column) of the output is a pure function of (seed, row, column).
    Stochastic {
        seed: u64,
    },
}

/// What to quantize to: validated bit width, group size and rounding.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    bits: u32,
    group_size: usize,
    rounding: Rounding,
}

impl Spec {
    /// Checks `bits` in 2..=8 and `group_size` a positive multiple of 4; errors name `op`.
    pub fn new(op: &str, bits: u32, group_size: usize, rounding: Rounding) -> FgResult<Spec> {
        if !(2..=8).contains(&bits) {
            return Err(FgError::Value(format!(
                "{op}: bits must be in 2..8, got {bits}"
            )));
        }
        if group_size == 0 || !group_size.is_multiple_of(4) {
            return Err(FgError::Value(format!(
                "{op}: group_size must be a positive multiple of 4, got {group_size}"
            )));
        }
        Ok(Spec {
            bits,
            group_size,
            rounding,
        })
    }

    pub fn group_size(&self) -> usize {
        self.group_size
    }

    /// 2^(bits-1) - 1: codes lie in [-qmax, qmax].
    pub fn qmax(&self) -> f32 {
        ((1u32 << (self.bits - 1)) - 1) as f32
    }
}

/// The three outputs of quantizing `rows` rows of `len`: codes [rows, len], scale [rows],
/// shifts [rows, num_groups(len)].
pub struct Codes<'a> {
    pub codes: &'a mut [i8],
    pub scale: &'a mut [f32],
    pub shifts: &'a mut [u8],
}

impl Codes<'_> {
    fn check(&self, op: &str, rows: usize, len: usize, group_size: usize) -> FgResult<()> {
        let groups = num_groups(len, group_size);
        if self.codes.len() != rows * len
            || self.scale.len() != rows
            || self.shifts.len() != rows * groups
        {
            return Err(FgError::Value(format!(
                "{op}: outputs must hold {} codes, {rows} scales and {} shifts, got {}, {} and {}",
                rows * len,
                rows * groups,
                self.codes.len(),
                self.scale.len(),
                self.shifts.len()
            )));
        }
        Ok(())
    }
}

/// floor(log2(row_max / group_max)) computed exactly, clamped to 0..=15 (15 for an all-zero
/// group): the largest k with group_max * 2^k <= row_max.
pub fn shift_of(row_max: f32, group_max: f32) -> u8 {
    if group_max == 0.0 {
        return MAX_SHIFT;
    }
    // f64 holds every f32 (denormals included) as a normal number: compare exponents, then
    // mantissas.
    let split = |v: f32| {
        let b = (v as f64).to_bits();
        ((b >> 52) as i64, b & ((1u64 << 52) - 1))
    };
    let (er, mr) = split(row_max);
    let (eg, mg) = split(group_max);
    (er - eg - i64::from(mg > mr)).clamp(0, i64::from(MAX_SHIFT)) as u8
}

/// The key of one output row's random stream.
fn row_key(seed: u64, row: u64) -> u64 {
    let mut z = seed ^ row.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for _ in 0..2 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce5_e9b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
    }
    z
}

/// A bijective 32-bit mixer (two multiply-xorshift rounds); vectorizes with 32-bit multiplies.
#[inline(always)]
fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// A uniform draw in [0, 1) with 24 random bits for column `col` of a row keyed `key`.
#[inline(always)]
fn uniform(key: u64, col: u32) -> f32 {
    uniform_halves(key as u32, (key >> 32) as u32, col)
}

/// `uniform` from the two halves of the key (kept apart where a vector holds many keys): one
/// `mix32` of the column under the low half (a bijection of the column within a row), the high
/// half xored in. A second `mix32` round over that was a fifth of the stochastic quantizers' time.
#[inline(always)]
fn uniform_halves(lo: u32, hi: u32, col: u32) -> f32 {
    ((mix32(col ^ lo) ^ hi) >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// What the quantizers read: f32 or bfloat16. bfloat16 widens to f32 exactly, so
/// both give the codes of the same values; reading bf16 saves a float32 copy of the input.
pub trait Element: Storage {
    const ROWS: RowsKernel<Self>;
    const GROUP_MAX_COLS: GroupMaxColsKernel<Self>;
    const ENCODE_COLS: EncodeColsKernel<Self>;
}

type RowsKernel<T> = fn(SimdLevel, &[T], usize, &Spec, usize, Codes<'_>);
type GroupMaxColsKernel<T> = fn(SimdLevel, &[T], usize, usize, &mut [u32], &mut [f32]);
type EncodeColsKernel<T> = fn(SimdLevel, &[T], usize, &Spec, &ColumnPass, &mut Vec<i8>);

impl Element for f32 {
    const ROWS: RowsKernel<f32> = quantize_rows_f32;
    const GROUP_MAX_COLS: GroupMaxColsKernel<f32> = group_max_cols_f32;
    const ENCODE_COLS: EncodeColsKernel<f32> = encode_cols_f32;
}

impl Element for Bf16 {
    const ROWS: RowsKernel<Bf16> = quantize_rows_bf16;
    const GROUP_MAX_COLS: GroupMaxColsKernel<Bf16> = group_max_cols_bf16;
    const ENCODE_COLS: EncodeColsKernel<Bf16> = encode_cols_bf16;
}

#[inline(always)]
fn abs_max_bits<T: Element>(x: &[T]) -> u32 {
    // For non-NaN floats the order of |x| is the order of its bits: an integer max reduction.
    x.iter()
        .fold(0, |m, v| m.max(v.to_f32().to_bits() & ABS_MASK))
}

/// A rounded value clamped into [-qmax, qmax] as a code.
#[inline(always)]
fn to_code(q: f32, qmax: f32) -> i8 {
    // SAFETY: the value is finite (rows holding NaN or infinity never get here) and clamped,
    // so the unchecked conversion is exact; unlike `as` it vectorizes.
    unsafe { q.clamp(-qmax, qmax).to_int_unchecked::<i32>() as i8 }
}

/// Codes of one group: v = x * 2^k / s rounded (as x / (s * 2^-k), without the denormal loss).
#[inline(always)]
fn encode_group<S: Simd, T: Element>(
    x: &[T],
    codes: &mut [i8],
    pow: f32,
    scale: f32,
    spec: &Spec,
    key: u64,
    col0: u32,
) {
    let qmax = spec.qmax();
    match spec.rounding {
        Rounding::Nearest => {
            for (c, &v) in codes.iter_mut().zip(x) {
                *c = nearest_code((v.to_f32() * pow) / scale, qmax);
            }
        }
        Rounding::Stochastic { .. } => {
            for (j, (c, &v)) in codes.iter_mut().zip(x).enumerate() {
                let u = uniform(key, col0.wrapping_add(j as u32));
                *c = stochastic_code::<S>((v.to_f32() * pow) / scale, u, qmax);
            }
        }
    }
}

/// The code of a scaled value t, rounded half to even.
#[inline(always)]
fn nearest_code(t: f32, qmax: f32) -> i8 {
    to_code((t + ROUND_MAGIC) - ROUND_MAGIC, qmax)
}

/// The code of a scaled value t, rounded up when the draw u is below its fractional part.
#[inline(always)]
fn stochastic_code<S: Simd>(t: f32, u: f32, qmax: f32) -> i8 {
    let floor = if S::NATIVE_MATH {
        t.floor()
    } else {
        let r = (t + ROUND_MAGIC) - ROUND_MAGIC;
        if r > t {
            r - 1.0
        } else {
            r
        }
    };
    to_code(if u < t - floor { floor + 1.0 } else { floor }, qmax)
}

/// The scale of a row (or column) whose max |x| has these bits: max / qmax; 0 for an all-zero
/// row, NaN for one holding NaN or infinity (a special row: codes 0, shifts maximal).
#[inline(always)]
fn scale_of(max_bits: u32, qmax: f32) -> f32 {
    match max_bits {
        0 => 0.0,
        m if m >= INF_BITS => f32::NAN,
        m => f32::from_bits(m) / qmax,
    }
}

fn is_special(max_bits: u32) -> bool {
    max_bits == 0 || max_bits >= INF_BITS
}

/// Quantizes one row, prefetching `next` (the row after it) group by group: the max pass waits on
/// memory, the encoding on arithmetic, and this overlaps them. Returns the row's scale.
/// `group_max` is scratch for the max |x| bits of each group.
#[inline(always)]
fn quantize_row<S: Simd, T: Element>(
    x: &[T],
    next: &[T],
    codes: &mut [i8],
    shifts: &mut [u8],
    spec: &Spec,
    row: u64,
    group_max: &mut Vec<u32>,
) -> f32 {
    let gs = spec.group_size;
    group_max.clear();
    group_max.extend(x.chunks(gs).map(abs_max_bits));
    let max_bits = group_max.iter().fold(0, |m, &g| m.max(g));
    let scale = scale_of(max_bits, spec.qmax());
    if is_special(max_bits) {
        // A NaN or infinity poisons the row's scale (dequantize and matmul propagate it); an
        // all-zero row has scale 0. Either way the codes are 0 and the shifts maximal.
        codes.fill(0);
        shifts.fill(MAX_SHIFT);
        prefetch(next);
        return scale;
    }
    let row_max = f32::from_bits(max_bits);
    let key = match spec.rounding {
        Rounding::Nearest => 0,
        Rounding::Stochastic { seed } => row_key(seed, row),
    };
    // The shifts first, and the powers of two in place of the maxima: the encoding loop then
    // holds only its own constants.
    for (gm, k) in group_max.iter_mut().zip(shifts.iter_mut()) {
        *k = shift_of(row_max, f32::from_bits(*gm));
        *gm = (127 + u32::from(*k)) << 23;
    }
    let groups = x.chunks(gs).zip(codes.chunks_mut(gs)).zip(group_max.iter());
    for (g, ((xg, cg), &pow)) in groups.enumerate() {
        prefetch_block(next, g * gs, gs);
        let pow = f32::from_bits(pow);
        encode_group::<S, T>(xg, cg, pow, scale, spec, key, (g * gs) as u32);
    }
    scale
}

/// Quantizes consecutive rows starting at output row `row0` (the index keys the random stream).
#[inline(always)]
unsafe fn quantize_rows_impl<S: Simd, T: Element>(
    x: &[T],
    len: usize,
    spec: &Spec,
    row0: usize,
    out: Codes<'_>,
) {
    let groups = num_groups(len, spec.group_size);
    let mut group_max = Vec::with_capacity(groups);
    let rows = x
        .chunks_exact(len)
        .zip(out.codes.chunks_exact_mut(len))
        .zip(
            out.scale
                .iter_mut()
                .zip(out.shifts.chunks_exact_mut(groups)),
        );
    for (r, ((xr, cr), (s, sh))) in rows.enumerate() {
        let next = x.get((r + 1) * len..(r + 2) * len).unwrap_or(&[]);
        *s = quantize_row::<S, T>(xr, next, cr, sh, spec, (row0 + r) as u64, &mut group_max);
    }
}

/// The max |x| bits of each (group of rows, column): `out` [groups][cols] for the rows of
/// `x` [.., cols], in groups of `group_size` rows (the last one may be short); unless `sums` is
/// empty, also the sum of each (group, column) into it (same shape, from zeros).
#[inline(always)]
#[allow(clippy::extra_unused_type_parameters)] // S picks the target features, via dispatch!
unsafe fn group_max_cols_impl<S: Simd, T: Element>(
    x: &[T],
    cols: usize,
    group_size: usize,
    out: &mut [u32],
    sums: &mut [f32],
) {
    for (g, (xg, og)) in x
        .chunks(group_size * cols)
        .zip(out.chunks_exact_mut(cols))
        .enumerate()
    {
        if sums.is_empty() {
            for xr in xg.chunks_exact(cols) {
                for (o, v) in og.iter_mut().zip(xr) {
                    *o = (*o).max(v.to_f32().to_bits() & ABS_MASK);
                }
            }
        } else {
            let sg = &mut sums[g * cols..(g + 1) * cols];
            for xr in xg.chunks_exact(cols) {
                for ((o, sm), v) in og.iter_mut().zip(sg.iter_mut()).zip(xr) {
                    *o = (*o).max(v.to_f32().to_bits() & ABS_MASK);
                    *sm += v.to_f32();
                }
            }
        }
    }
}

/// From the max |x| bits of each (group, column), `group_max` [groups][cols]: each column's max
/// and, per (group, column), the shift k (`ks`) and 2^k (`pow`), both [groups][cols] (15 in a
/// special column, whose codes are all 0). Vectorized along the columns: a `shift_of` at a time
/// down each column, on the calling thread while the team waited, was a tenth of the column
/// quantizer's time (4096 x 384, 2 threads).
#[inline(always)]
#[allow(clippy::extra_unused_type_parameters)] // S picks the target features, via dispatch!
unsafe fn column_params_impl<S: Simd>(
    group_max: &[u32],
    col_max: &mut [u32],
    pow: &mut [f32],
    ks: &mut [i8],
) {
    let cols = col_max.len();
    for gm in group_max.chunks_exact(cols) {
        col_max
            .iter_mut()
            .zip(gm)
            .for_each(|(m, &v)| *m = (*m).max(v));
    }
    let rows = group_max.chunks_exact(cols).zip(pow.chunks_exact_mut(cols));
    for ((gm, pw), kr) in rows.zip(ks.chunks_exact_mut(cols)) {
        for (((p, k), &g), &c) in pw.iter_mut().zip(kr.iter_mut()).zip(gm).zip(col_max.iter()) {
            let shift = if is_special(c) {
                MAX_SHIFT
            } else {
                shift_of(f32::from_bits(c), f32::from_bits(g))
            };
            *k = shift as i8; // (at most 15)
            *p = f32::from_bits((127 + u32::from(shift)) << 23);
        }
    }
}

/// Each column's sum from its groups' float32 sums (`group_sums` [groups][cols]), added in f64.
#[inline(always)]
#[allow(clippy::extra_unused_type_parameters)] // S picks the target features, via dispatch!
unsafe fn column_totals_impl<S: Simd>(group_sums: &[f32], col_sums: &mut [f32]) {
    let mut total = vec![0f64; col_sums.len()];
    for gs in group_sums.chunks_exact(col_sums.len()) {
        total
            .iter_mut()
            .zip(gs)
            .for_each(|(t, &v)| *t += f64::from(v));
    }
    col_sums
        .iter_mut()
        .zip(&total)
        .for_each(|(s, &t)| *s = t as f32);
}

/// What the encoding pass of `quantize_cols` needs per column c (the output row c): its scale,
/// the two halves of its random key, and a mask that zeroes the scaled values of a special (zero,
/// NaN or infinite) column, whose codes are all 0; per (group, column) the power of two 2^k.
pub struct ColumnPass {
    scale: Vec<f32>,
    key_lo: Vec<u32>,
    key_hi: Vec<u32>,
    keep: Vec<u32>,
    /// [groups][cols]
    pow: Vec<f32>,
    codes: SendPtr<i8>,
    rows: usize,
}

/// The codes of one input row r (the element r of every output row) into `codes`: the row
/// path's `encode_group` arithmetic, with each column's own scale, power of two and key.
#[inline(always)]
fn encode_across<S: Simd, T: Element>(
    x: &[T],
    codes: &mut [i8],
    pass: &ColumnPass,
    pow: &[f32],
    spec: &Spec,
    r: u32,
) {
    let n = codes.len();
    let full = n - n % ACROSS_LANES;
    for c0 in (0..full).step_by(ACROSS_LANES) {
        let span = c0..c0 + ACROSS_LANES;
        let out: &mut [i8; ACROSS_LANES] = (&mut codes[span.clone()]).try_into().unwrap();
        encode_span::<S, T, _>(&x[span.clone()], out, pass, &pow[span], spec, r, c0);
    }
    encode_span::<S, T, _>(
        &x[full..n],
        &mut codes[full..],
        pass,
        &pow[full..n],
        spec,
        r,
        full,
    );
}

/// Columns per chunk of `encode_across`: whole chunks are slices of one constant length, so
/// the loops over them vectorize without a remainder. Over the whole row, the vectorized loop
/// always left its last 16 columns to a scalar epilogue (a fifth of the pass's time at 384
/// columns).
const ACROSS_LANES: usize = 16;

/// `encode_across` for the columns c0.. of `codes` (x and pow start at the same column).
#[inline(always)]
fn encode_span<S: Simd, T: Element, C: AsMut<[i8]> + ?Sized>(
    x: &[T],
    codes: &mut C,
    pass: &ColumnPass,
    pow: &[f32],
    spec: &Spec,
    r: u32,
    c0: usize,
) {
    let qmax = spec.qmax();
    let codes = codes.as_mut();
    // Indexed over slices of one length (a six-way zip did not vectorize: the stochastic path
    // ran at a third of the row quantizer's speed).
    let n = codes.len();
    let (x, pow) = (&x[..n], &pow[..n]);
    let (scale, keep) = (&pass.scale[c0..c0 + n], &pass.keep[c0..c0 + n]);
    let scaled =
        |i: usize| f32::from_bits(((x[i].to_f32() * pow[i]) / scale[i]).to_bits() & keep[i]);
    match spec.rounding {
        Rounding::Nearest => {
            for (i, c) in codes.iter_mut().enumerate() {
                *c = nearest_code(scaled(i), qmax);
            }
        }
        Rounding::Stochastic { .. } => {
            let (lo, hi) = (&pass.key_lo[c0..c0 + n], &pass.key_hi[c0..c0 + n]);
            for (i, c) in codes.iter_mut().enumerate() {
                *c = stochastic_code::<S>(scaled(i), uniform_halves(lo[i], hi[i], r), qmax);
            }
        }
    }
}

/// Codes of the rows [r0, r0 + block.len() / cols) of x (`block`) for every column: encoded
/// row by row into `staging` [rows of the block][cols], then transposed into the output rows.
///
/// # Safety
/// `pass.codes` covers every column's codes; no other thread writes these rows of them.
#[inline(always)]
unsafe fn encode_cols_impl<S: Simd, T: Element>(
    block: &[T],
    r0: usize,
    spec: &Spec,
    pass: &ColumnPass,
    staging: &mut Vec<i8>,
) {
    let cols = pass.scale.len();
    let h = block.len() / cols;
    staging.resize(h * cols, 0);
    for (i, (x, codes)) in block
        .chunks_exact(cols)
        .zip(staging.chunks_exact_mut(cols))
        .enumerate()
    {
        let g = (r0 + i) / spec.group_size;
        let pow = &pass.pow[g * cols..(g + 1) * cols];
        encode_across::<S, T>(x, codes, pass, pow, spec, (r0 + i) as u32);
    }
    transpose_bytes(staging, cols, pass.codes.ptr().add(r0), pass.rows, h);
}

/// dst[c * dst_stride + i] = src[i * cols + c] for i < h, c < cols (src [h, cols], h at most
/// `COL_BLOCK`): 16 x 16 tiles through registers into a strip of 16 output rows held in L1,
/// then each output row's h bytes in one copy. The output rows lie `dst_stride` (the token
/// count) apart, at 4096 tokens all in one L1 set: written 16 bytes per tile, their lines
/// were evicted between the tiles and each came back from L2 four times (the tiles' stores
/// were a third of the column quantizer's time). With one byte at a time, every store a cache
/// line's first touch, the stores were its bottleneck before that.
///
/// # Safety
/// `dst` is valid for those writes.
#[inline(always)]
unsafe fn transpose_bytes(src: &[i8], cols: usize, dst: *mut i8, dst_stride: usize, h: usize) {
    const T: usize = 16;
    let mut strip = [[0i8; COL_BLOCK]; T];
    for c0 in (0..cols).step_by(T) {
        let width = T.min(cols - c0);
        // The next strip's output rows (uninitialized memory: by address, no slice), prefetched
        // while this one is transposed: each strip row is stored to its own line, `dst_stride`
        // bytes from the last (no stream the hardware prefetcher follows), and its store
        // waited for the line. Xeon family 6 model 207, the column quantizer alone: 1.03-1.07x
        // at [4096, 1024], 1.16-1.29x (nearest) at [4096, 4096], 0.99-1.10x at the model's
        // [1024, 512 / 1376]; ShiftQuantLinear's fwd+bwd unchanged within noise. A second
        // prefetch for a row crossing into another line cost more than it saved (0.82-0.97x).
        for c in c0 + T..(c0 + 2 * T).min(cols) {
            let row = dst.add(c * dst_stride);
            crate::simd::prefetch_at(row, h, 0);
        }
        for i0 in (0..h).step_by(T) {
            let tile = src.as_ptr().add(i0 * cols + c0);
            let out = strip.as_mut_ptr().cast::<i8>().add(i0);
            if width == T && i0 + T <= h {
                transpose_16x16(tile, cols, out, COL_BLOCK);
            } else {
                for c in 0..width {
                    for i in 0..T.min(h - i0) {
                        *out.add(c * COL_BLOCK + i) = *tile.add(i * cols + c);
                    }
                }
            }
        }
        for (c, row) in strip.iter().enumerate().take(width) {
            let out = dst.add((c0 + c) * dst_stride);
            if h == COL_BLOCK {
                out.cast::<[i8; COL_BLOCK]>().write_unaligned(*row); // one 64-byte store
            } else {
                std::ptr::copy_nonoverlapping(row.as_ptr(), out, h);
            }
        }
    }
}

/// One 16 x 16 byte tile transposed. Each round interleaves vector i with vector i + 8 (bytes
/// 0-7 into vector 2i, 8-15 into 2i + 1): as the bits (vector, byte) of an element that rotates
/// its 8-bit index by one, so four rounds swap row and column. Written out in full so that the
/// 16 vectors stay in registers (built with `array::from_fn`, the rounds ran as a loop through
/// the stack and stalled on store forwarding: a quarter of the column quantizer's time).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn transpose_16x16(src: *const i8, src_stride: usize, dst: *mut i8, dst_stride: usize) {
    use std::arch::x86_64::*;
    #[inline(always)]
    unsafe fn round(v: [__m128i; 16]) -> [__m128i; 16] {
        let (lo, hi) = (_mm_unpacklo_epi8, _mm_unpackhi_epi8);
        [
            lo(v[0], v[8]),
            hi(v[0], v[8]),
            lo(v[1], v[9]),
            hi(v[1], v[9]),
            lo(v[2], v[10]),
            hi(v[2], v[10]),
            lo(v[3], v[11]),
            hi(v[3], v[11]),
            lo(v[4], v[12]),
            hi(v[4], v[12]),
            lo(v[5], v[13]),
            hi(v[5], v[13]),
            lo(v[6], v[14]),
            hi(v[6], v[14]),
            lo(v[7], v[15]),
            hi(v[7], v[15]),
        ]
    }
    let row = |i: usize| _mm_loadu_si128(src.add(i * src_stride).cast());
    let v = [
        row(0),
        row(1),
        row(2),
        row(3),
        row(4),
        row(5),
        row(6),
        row(7),
        row(8),
        row(9),
        row(10),
        row(11),
        row(12),
        row(13),
        row(14),
        row(15),
    ];
    let v = round(round(round(round(v))));
    for (i, row) in v.into_iter().enumerate() {
        _mm_storeu_si128(dst.add(i * dst_stride).cast(), row);
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
unsafe fn transpose_16x16(src: *const i8, src_stride: usize, dst: *mut i8, dst_stride: usize) {
    for c in 0..16 {
        for i in 0..16 {
            *dst.add(c * dst_stride + i) = *src.add(i * src_stride + c);
        }
    }
}

#[inline(always)]
#[allow(clippy::extra_unused_type_parameters)] // S picks the target features, via dispatch!
unsafe fn dequantize_impl<S: Simd>(
    codes: &[i8],
    scale: &[f32],
    shifts: &[u8],
    group_size: usize,
    out: &mut [f32],
) {
    let len = codes.len() / scale.len();
    let groups = num_groups(len, group_size);
    let rows = codes
        .chunks_exact(len)
        .zip(out.chunks_exact_mut(len))
        .zip(scale.iter().zip(shifts.chunks_exact(groups)));
    for ((cr, or), (&s, sh)) in rows {
        for ((cg, og), &k) in cr.chunks(group_size).zip(or.chunks_mut(group_size)).zip(sh) {
            let step = s * f32::from_bits((127 - u32::from(k)) << 23);
            for (o, &q) in og.iter_mut().zip(cg) {
                *o = f32::from(q) * step;
            }
        }
    }
}

thread_local! {
    /// The int8 block of `quantize_cols`' encoding pass, kept per thread between calls.
    static STAGING: std::cell::RefCell<Vec<i8>> = const { std::cell::RefCell::new(Vec::new()) };
}

crate::dispatch! {
    fn quantize_rows_f32(x: &[f32], len: usize, spec: &Spec, row0: usize, out: Codes<'_>) = quantize_rows_impl<f32>;
    fn quantize_rows_bf16(x: &[Bf16], len: usize, spec: &Spec, row0: usize, out: Codes<'_>) = quantize_rows_impl<Bf16>;
    fn group_max_cols_f32(x: &[f32], cols: usize, group_size: usize, out: &mut [u32], sums: &mut [f32]) = group_max_cols_impl<f32>;
    fn group_max_cols_bf16(x: &[Bf16], cols: usize, group_size: usize, out: &mut [u32], sums: &mut [f32]) = group_max_cols_impl<Bf16>;
    fn encode_cols_f32(block: &[f32], r0: usize, spec: &Spec, pass: &ColumnPass, staging: &mut Vec<i8>) = encode_cols_impl<f32>;
    fn encode_cols_bf16(block: &[Bf16], r0: usize, spec: &Spec, pass: &ColumnPass, staging: &mut Vec<i8>) = encode_cols_impl<Bf16>;
    fn column_params(group_max: &[u32], col_max: &mut [u32], pow: &mut [f32], ks: &mut [i8]) = column_params_impl;
    fn column_totals(group_sums: &[f32], col_sums: &mut [f32]) = column_totals_impl;
    fn dequantize_level(codes: &[i8], scale: &[f32], shifts: &[u8], group_size: usize, out: &mut [f32]) = dequantize_impl;
}

/// Quantizes `x` seen as [rows, len] along `len` (rows = x.len() / len).
pub fn quantize_rows<T: Element>(
    level: SimdLevel,
    x: &[T],
    len: usize,
    spec: &Spec,
    out: Codes<'_>,
) -> FgResult<()> {
    let rows = x.len().checked_div(len).unwrap_or(out.scale.len());
    if rows * len != x.len() {
        return Err(FgError::Value(format!(
            "shiftquant: x holds {} elements, not a multiple of the row length {len}",
            x.len()
        )));
    }
    out.check("shiftquant", rows, len, spec.group_size)?;
    if len == 0 {
        out.scale.fill(0.0);
        return Ok(());
    }
    let chunk = threads::rows_per_task(rows, len, PAR_MIN);
    let groups = num_groups(len, spec.group_size);
    let (codes, scale, shifts) = (
        Disjoint::new(out.codes),
        Disjoint::new(out.scale),
        Disjoint::new(out.shifts),
    );
    threads::for_each_chunk(rows, chunk, |_, r| {
        // SAFETY: chunks are disjoint row ranges.
        let out = unsafe {
            Codes {
                codes: codes.piece(r.start * len..r.end * len),
                scale: scale.piece(r.clone()),
                shifts: shifts.piece(r.start * groups..r.end * groups),
            }
        };
        T::ROWS(
            level,
            &x[r.start * len..r.end * len],
            len,
            spec,
            r.start,
            out,
        )
    });
    Ok(())
}

/// Quantizes the row-major matrix `x` [rows, x.len() / rows] along its first axis: output row c
/// holds column c (codes [cols, rows]), exactly as `quantize_rows` of the transpose would. With
/// `col_sums` ([cols]), also the sum of each column, from the same read of x (ShiftQuantLinear's
/// bias gradient): float32 sums of each group of rows, added up in f64.
pub fn quantize_cols<T: Element>(
    level: SimdLevel,
    x: &[T],
    rows: usize,
    spec: &Spec,
    out: Codes<'_>,
    col_sums: Option<&mut [f32]>,
) -> FgResult<()> {
    let cols = out.scale.len();
    if rows * cols != x.len() {
        return Err(FgError::Value(format!(
            "shiftquant: x holds {} elements, not [{rows}, {cols}]",
            x.len()
        )));
    }
    out.check("shiftquant", cols, rows, spec.group_size)?;
    if col_sums.as_ref().is_some_and(|s| s.len() != cols) {
        return Err(FgError::Value(format!(
            "shiftquant: col_sums must hold {cols} elements"
        )));
    }
    if rows == 0 || cols == 0 {
        out.scale.fill(0.0);
        if let Some(s) = col_sums {
            s.fill(0.0);
        }
        return Ok(());
    }
    let gs = spec.group_size;
    let groups = num_groups(rows, gs);
    // Pass 1: max |x| bits (and sums) per (group, column).
    let mut group_max = vec![0u32; groups * cols];
    let with_sums = col_sums.is_some();
    let mut group_sums = vec![0f32; if with_sums { groups * cols } else { 0 }];
    let pieces = Disjoint::new(&mut group_max);
    let sum_pieces = Disjoint::new(&mut group_sums);
    let chunk = threads::rows_per_task(groups, gs * cols, PAR_MIN);
    threads::for_each_chunk(groups, chunk, |_, g| {
        // SAFETY: chunks are disjoint group ranges.
        let piece = unsafe { pieces.piece(g.start * cols..g.end * cols) };
        let sums = if !with_sums {
            &mut [][..]
        } else {
            // SAFETY: as above.
            unsafe { sum_pieces.piece(g.start * cols..g.end * cols) }
        };
        let x = &x[g.start * gs * cols..(g.end * gs).min(rows) * cols];
        T::GROUP_MAX_COLS(level, x, cols, gs, piece, sums)
    });
    // Per column: max, scale, key, mask, sum; per (group, column): 2^k and the shift k.
    let mut col_max = vec![0u32; cols];
    let mut pow = vec![0f32; groups * cols];
    let mut ks = vec![0i8; groups * cols];
    column_params(level, &group_max, &mut col_max, &mut pow, &mut ks);
    if let Some(col_sums) = col_sums {
        column_totals(level, &group_sums, col_sums);
    }
    // The shifts [cols][groups] from ks [groups][cols], COL_BLOCK groups at a time.
    for g0 in (0..groups).step_by(COL_BLOCK) {
        let h = COL_BLOCK.min(groups - g0);
        let dst = out.shifts[g0..].as_mut_ptr().cast::<i8>();
        // SAFETY: column c's entries g0..g0 + h of the shifts are in bounds (c * groups + g0 +
        // h <= cols * groups).
        unsafe { transpose_bytes(&ks[g0 * cols..(g0 + h) * cols], cols, dst, groups, h) };
    }
    let special: Vec<bool> = col_max.iter().map(|&m| is_special(m)).collect();
    for (s, &m) in out.scale.iter_mut().zip(&col_max) {
        *s = scale_of(m, spec.qmax());
    }
    let keys: Vec<u64> = match spec.rounding {
        Rounding::Nearest => vec![0; cols],
        Rounding::Stochastic { seed } => (0..cols as u64).map(|c| row_key(seed, c)).collect(),
    };
    let pass = ColumnPass {
        scale: out.scale.to_vec(),
        key_lo: keys.iter().map(|&k| k as u32).collect(),
        key_hi: keys.iter().map(|&k| (k >> 32) as u32).collect(),
        keep: special
            .iter()
            .map(|&sp| if sp { 0 } else { u32::MAX })
            .collect(),
        pow,
        codes: SendPtr(out.codes.as_mut_ptr()),
        rows,
    };
    // Pass 2: the codes, a block of rows at a time.
    let block = |b: usize| {
        let (r0, r1) = (b * COL_BLOCK, ((b + 1) * COL_BLOCK).min(rows));
        STAGING.with_borrow_mut(|staging| {
            // SAFETY: `pass.codes` covers all columns; blocks write disjoint rows of them.
            T::ENCODE_COLS(level, &x[r0 * cols..r1 * cols], r0, spec, &pass, staging)
        })
    };
    let blocks = rows.div_ceil(COL_BLOCK);
    if rows * cols < PAR_MIN {
        (0..blocks).for_each(block);
    } else {
        threads::split(blocks, block);
    }
    Ok(())
}

/// codes * scale * 2^-shift, into `out` (same shape as `codes`).
pub fn dequantize(
    level: SimdLevel,
    codes: &[i8],
    scale: &[f32],
    shifts: &[u8],
    group_size: usize,
    out: &mut [f32],
) -> FgResult<()> {
    let rows = scale.len();
    let len = codes.len().checked_div(rows).unwrap_or(0);
    let groups = if group_size == 0 {
        0
    } else {
        num_groups(len, group_size)
    };
    if group_size == 0
        || rows * len != codes.len()
        || shifts.len() != rows * groups
        || out.len() != codes.len()
    {
        return Err(FgError::Value(format!(
            "dequantize: inconsistent shapes: {} codes, {rows} scales, {} shifts, group_size \
             {group_size}, {} outputs",
            codes.len(),
            shifts.len(),
            out.len()
        )));
    }
    if shifts.iter().any(|&k| k > MAX_SHIFT) {
        return Err(FgError::Value(format!(
            "dequantize: shifts must be in 0..={MAX_SHIFT}"
        )));
    }
    if rows == 0 || len == 0 {
        return Ok(());
    }
    let chunk = threads::rows_per_task(rows, len, PAR_MIN);
    let out = Disjoint::new(out);
    threads::for_each_chunk(rows, chunk, |_, r| {
        // SAFETY: chunks are disjoint row ranges.
        let piece = unsafe { out.piece(r.start * len..r.end * len) };
        let (codes, scale) = (&codes[r.start * len..r.end * len], &scale[r.clone()]);
        let shifts = &shifts[r.start * groups..r.end * groups];
        dequantize_level(level, codes, scale, shifts, group_size, piece)
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, written plainly in f64 (reference for the kernels).
    fn reference(x: &[f32], len: usize, bits: u32, gs: usize) -> (Vec<i8>, Vec<f32>, Vec<u8>) {
        let qmax = ((1 << (bits - 1)) - 1) as f64;
        let (mut codes, mut scales, mut shifts) = (vec![], vec![], vec![]);
        for row in x.chunks(len) {
            let r = row.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
            let s = (r / qmax) as f32;
            scales.push(s);
            for g in row.chunks(gs) {
                let m = g.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
                let k = if m == 0.0 {
                    15
                } else {
                    ((r / m).log2().floor() as i64).clamp(0, 15)
                };
                shifts.push(k as u8);
                for &v in g {
                    let q = if r == 0.0 {
                        0.0
                    } else {
                        (v as f64 * 2f64.powi(k as i32) / s as f64).round_ties_even()
                    };
                    codes.push(q.clamp(-qmax, qmax) as i8);
                }
            }
        }
        (codes, scales, shifts)
    }

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::SplitMix64::new(seed);
        (0..n)
            .map(|i| {
                let u = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                // groups of very different magnitudes exercise the shifts
                u * [1.0, 1e-3, 30.0, 0.2][(i / 8) % 4]
            })
            .collect()
    }

    fn run_rows<T: Element>(
        level: SimdLevel,
        x: &[T],
        len: usize,
        spec: &Spec,
    ) -> (Vec<i8>, Vec<f32>, Vec<u8>) {
        let rows = x.len() / len;
        let mut codes = vec![0i8; x.len()];
        let mut scale = vec![0f32; rows];
        let mut shifts = vec![0u8; rows * num_groups(len, spec.group_size)];
        let out = Codes {
            codes: &mut codes,
            scale: &mut scale,
            shifts: &mut shifts,
        };
        quantize_rows(level, x, len, spec, out).unwrap();
        (codes, scale, shifts)
    }

    #[test]
    fn matches_the_definition_on_every_path() {
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            for (bits, gs, len) in [(8, 64, 200), (4, 8, 37), (2, 4, 9), (6, 32, 4096)] {
                let x = data(len * 5, bits as u64);
                let spec = Spec::new("t", bits, gs, Rounding::Nearest).unwrap();
                assert_eq!(
                    run_rows(level, &x, len, &spec),
                    reference(&x, len, bits, gs),
                    "{level:?} {bits} {gs}"
                );
            }
        }
    }

    #[test]
    fn every_path_gives_the_scalar_paths_codes() {
        // Group sizes on and off multiples of the vector width, rows that end inside a vector
        // and inside a group, both roundings, float32 and bfloat16 input, and rows that are all
        // zero or hold a NaN.
        let bits = |s: &[f32]| s.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for (bits_, gs, len) in [
            (8, 64, 200),
            (8, 16, 37),
            (7, 48, 1000),
            (4, 128, 300),
            (8, 20, 90),
        ] {
            let mut x = data(len * 6, gs as u64);
            x[len..2 * len].fill(0.0);
            x[3 * len + len / 2] = f32::NAN;
            let low: Vec<Bf16> = x.iter().map(|&v| Bf16::from_f32(v)).collect();
            for rounding in [Rounding::Nearest, Rounding::Stochastic { seed: 3 }] {
                let spec = Spec::new("t", bits_, gs, rounding).unwrap();
                let (want, want_low) = (
                    run_rows(SimdLevel::Scalar, &x, len, &spec),
                    run_rows(SimdLevel::Scalar, &low, len, &spec),
                );
                for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
                    for (got, want) in [
                        (run_rows(level, &x, len, &spec), &want),
                        (run_rows(level, &low, len, &spec), &want_low),
                    ] {
                        let what = format!("{level:?} {bits_} {gs} {len} {rounding:?}");
                        assert_eq!((&got.0, &got.2), (&want.0, &want.2), "{what}");
                        assert_eq!(bits(&got.1), bits(&want.1), "{what}");
                    }
                }
            }
        }
    }

    #[test]
    fn columns_equal_rows_of_the_transpose() {
        // 600 rows: ten encoding blocks, boundaries inside groups of 100, or 150 groups of 4
        // (the shifts transposed 64 groups at a time); 48 columns: whole chunks and strips only.
        for (rows, cols, gs) in [(70, 37, 16), (600, 37, 100), (600, 37, 4), (128, 48, 32)] {
            let mut x = data(rows * cols, 3);
            x[5 * cols + 2] = f32::NAN; // column 2 is special, and column 3 all zero
            (0..rows).for_each(|r| x[r * cols + 3] = 0.0);
            let xt: Vec<f32> = (0..cols * rows)
                .map(|i| x[(i % rows) * cols + i / rows])
                .collect();
            for rounding in [Rounding::Nearest, Rounding::Stochastic { seed: 9 }] {
                let spec = Spec::new("t", 5, gs, rounding).unwrap();
                for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
                    let (want_codes, want_scale, want_shifts) = run_rows(level, &xt, rows, &spec);
                    let mut codes = vec![0i8; x.len()];
                    let mut scale = vec![0f32; cols];
                    let mut shifts = vec![0u8; cols * num_groups(rows, gs)];
                    let out = Codes {
                        codes: &mut codes,
                        scale: &mut scale,
                        shifts: &mut shifts,
                    };
                    quantize_cols(level, &x, rows, &spec, out, None).unwrap();
                    assert_eq!((codes, shifts), (want_codes, want_shifts), "{level:?}");
                    let bits = |s: &[f32]| s.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&scale), bits(&want_scale), "{level:?}");
                }
            }
        }
    }

    #[test]
    fn stochastic_rounding_is_unbiased_and_seeded() {
        let x: Vec<f32> = (0..4096).map(|i| 0.3 + (i % 7) as f32 * 1e-3).collect();
        let spec = |seed| Spec::new("t", 4, 64, Rounding::Stochastic { seed }).unwrap();
        let level = crate::simd::detected();
        let (a, s, _) = run_rows(level, &x, 4096, &spec(1));
        assert_eq!(a, run_rows(level, &x, 4096, &spec(1)).0);
        assert_ne!(a, run_rows(level, &x, 4096, &spec(2)).0);
        let mean_code = a.iter().map(|&q| q as f64).sum::<f64>() / a.len() as f64;
        let mean_x = x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64;
        assert!(
            (mean_code * s[0] as f64 - mean_x).abs() < 2e-3,
            "{mean_code}"
        );
    }

    #[test]
    fn special_rows() {
        let spec = Spec::new("t", 8, 4, Rounding::Nearest).unwrap();
        let level = crate::simd::detected();
        let x = [
            0.0,
            0.0,
            0.0,
            0.0,
            1.0,
            f32::NAN,
            2.0,
            3.0,
            f32::INFINITY,
            1.0,
            0.0,
            0.0,
        ];
        let (codes, scale, shifts) = run_rows(level, &x, 4, &spec);
        assert_eq!(scale[0], 0.0);
        assert!(scale[1].is_nan() && scale[2].is_nan());
        assert!(codes.iter().all(|&q| q == 0));
        assert!(shifts.iter().all(|&k| k == MAX_SHIFT));
    }

    #[test]
    fn shift_is_exact_at_powers_of_two() {
        assert_eq!(shift_of(8.0, 1.0), 3);
        assert_eq!(shift_of(8.0, 1.000_000_1), 2);
        assert_eq!(shift_of(1.0, 1.0), 0);
        assert_eq!(shift_of(1.0, 1e-30), 15);
        assert_eq!(shift_of(1e-40, 1e-41), 3);
    }

    #[test]
    fn rejects_bad_specs() {
        assert!(Spec::new("t", 1, 64, Rounding::Nearest).is_err());
        assert!(Spec::new("t", 9, 64, Rounding::Nearest).is_err());
        assert!(Spec::new("t", 8, 6, Rounding::Nearest).is_err());
        assert!(Spec::new("t", 8, 0, Rounding::Nearest).is_err());
    }
}
