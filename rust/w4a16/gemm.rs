//! The AVX-512 GEMM for more rows of x than the GEMV takes, in one of two arithmetics
//! ([`Arith`]).
//!
//! Each thread dequantizes `NR` rows of W at a time into a tile of codes q - zero (integers
//! -15..15, exact in bf16 and float32) and multiplies them with x: the group's sums meet its
//! scale in float32 once.
//!
//! - `vdpbf16ps` (AMD): the tile holds bf16 codes; bf16 x is read as it is, float32 x is split
//!   into two bf16 terms, hi + lo (within 2^-17 of x); the products are exact and add up in
//!   float32. x is packed transposed, 16 rows per vector (one row of x per float32 lane of the
//!   sums): [m block][pair p of columns 2p, 2p + 1][32 lanes] as bf16 pairs; a pair of W's
//!   columns is then one broadcast 32-bit word of the tile.
//! - float32 fused multiply-adds (Intel): the tile holds float32 codes, x is packed as float32
//!   [m block][column][32 lanes], and a column of W is one broadcast float. bf16 x is exact in
//!   float32 (its products too); float32 x is used unsplit, each product rounded once in its
//!   multiply-add.

use std::arch::x86_64::*;
use std::cell::RefCell;

use super::{packed_row_bytes, PackedW4, Rows, BLOCK, BLOCK_BYTES};
use crate::simd::{bf16_to_f32, f32_to_bf16 as bf16};
use crate::threads::{self, SendPtr};

/// Rows of W per tile: 2 x 12 sums, 2 vectors of x and a broadcast fit in 32 registers.
const NR: usize = 12;
/// Lanes per vector of x (and of the float32 sums).
const LANES: usize = 16;
/// Lanes per m block: two vectors.
const BLOCK_LANES: usize = 2 * LANES;
/// Lanes of the narrow block (one ymm vector), for up to 8 rows of bf16 x: on Zen 4 a ymm
/// `vdpbf16ps` costs half a zmm one, so 8 rows take no padding to 16.
const NARROW: usize = 8;
/// m blocks per pass over W: 256 rows of bf16 x (2 MiB at K = 4096) stay in L2 / L3.
const CHUNK_BLOCKS: usize = 8;
/// Codes past each tile row's end: rows a power of two of bytes apart would put the micro-kernel's
/// NR broadcasts of one column pair in one L1 set (8 ways).
const ROW_PAD: usize = 32;

/// bf16(c - z) for c = 0..31 (the `vpermw` table; codes are 0..15), per zero z = 0..15.
static TABLES: [[u16; 32]; 16] = {
    let mut t = [[0u16; 32]; 16];
    let mut z = 0;
    while z < 16 {
        let mut c = 0;
        while c < 32 {
            t[z][c] = ((c as f32 - z as f32).to_bits() >> 16) as u16;
            c += 1;
        }
        z += 1;
    }
    t
};

/// (c - z) in float32 for c = 0..15 (the `vpermps` table), per zero z = 0..15.
static TABLES_F32: [[f32; 16]; 16] = {
    let mut t = [[0.0f32; 16]; 16];
    let mut z = 0;
    while z < 16 {
        let mut c = 0;
        while c < 16 {
            t[z][c] = c as f32 - z as f32;
            c += 1;
        }
        z += 1;
    }
    t
};

/// The multiply of the micro-kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Arith {
    /// `vdpbf16ps` on bf16 pairs.
    Bf16,
    /// float32 fused multiply-adds.
    Fma,
}

impl Arith {
    /// This CPU's: on Intel a 512-bit `vdpbf16ps` issues every other cycle where two FMAs
    /// issue each cycle (Xeon family 6 model 207, 12 independent chains: 0.43 against 1.72 a
    /// cycle), so its 32 multiply-adds come at half the FMAs' rate. AMD keeps `vdpbf16ps`, the
    /// arithmetic measured there (docs/w4a16.md); FMAs were not measured on AMD.
    /// Without AVX512-BF16 (Intel before Cooper Lake and Sapphire Rapids) it is FMAs too.
    pub(super) fn of_cpu() -> Arith {
        #[cfg(test)]
        if let Some(arith) = super::tests::GEMM_ARITH.get() {
            return arith;
        }
        let f = crate::simd::cpu_features();
        if f.amd && f.avx512bf16 {
            Arith::Bf16
        } else {
            Arith::Fma
        }
    }

    /// Whether this CPU has the instructions: `vdpbf16ps` needs AVX512-BF16, the FMA kernel
    /// AVX-512 F alone.
    fn available(self) -> bool {
        self == Arith::Fma || crate::simd::cpu_features().avx512bf16
    }

    /// As `_core.w4_gemm_arith()` reports it.
    pub(super) fn name(self) -> &'static str {
        match self {
            Arith::Bf16 => "bf16",
            Arith::Fma => "fma",
        }
    }
}

/// Whether this CPU, at `level`, runs the GEMM for a weight of `shape` (group sizes that are
/// multiples of 32, or one group per row, so that each half block has one zero): AVX-512, and
/// AVX512-BF16 where the arithmetic is `vdpbf16ps`. Intel CPUs without BF16 (Skylake-SP to Ice
/// Lake) run the FMA kernel, which needs none: run as such a CPU on the Xeon of family 6 model
/// 207 (no BF16), 4096 x 4096, 2 threads, bf16 x, 65 / 128 / 256 rows took 11.1 / 16.4 / 33.1
/// ms where the dequantize-and-matmul path they had took 15.3 / 22.3 / 38.3.
pub fn supported(level: crate::simd::SimdLevel, shape: super::Shape) -> bool {
    let f = crate::simd::cpu_features();
    level == crate::simd::SimdLevel::Avx512
        && f.avx512bw
        && f.avx512vl
        && Arith::of_cpu().available()
        && (shape.group_size.is_multiple_of(BLOCK_BYTES) || shape.groups() == 1)
}

/// x packed for the micro-kernel (module docs): `steps` words of `width` lanes per m block
/// (column pairs for `vdpbf16ps`, columns for the FMAs), `terms` bf16 terms per element of x.
/// With one term, m block b holds rows 32b .. 32b + 31; with two, rows 16b .. 16b + 15, hi in
/// lanes 0-15 and lo in lanes 16-31. Up to 8 rows of bf16 x take one narrow block of 8 lanes
/// instead (`vdpbf16ps` only).
struct Packed {
    words: Vec<u32>,
    rows: usize,
    steps: usize,
    terms: usize,
    width: usize,
    rows_per_block: usize,
    blocks: usize,
}

impl Packed {
    /// x [m, k] for `arith`, `pairs` column pairs (k padded) a row.
    fn new(arith: Arith, x: Rows<'_>, m: usize, k: usize, pairs: usize) -> Packed {
        let terms = if arith == Arith::Fma || matches!(x, Rows::Bf16(_)) {
            1
        } else {
            2
        };
        let width = if arith == Arith::Bf16 && terms == 1 && m <= NARROW {
            NARROW
        } else {
            BLOCK_LANES
        };
        let steps = if arith == Arith::Fma {
            2 * pairs
        } else {
            pairs
        };
        let rows_per_block = width / terms;
        let blocks = m.div_ceil(rows_per_block);
        let per_block = steps * width;
        // The calling thread's buffer from its last call, cleared: padding rows and columns
        // must read 0.
        let mut words = crate::memory::take(&X_WORDS, blocks * per_block);
        words.fill(0);
        let dst = SendPtr(words.as_mut_ptr());
        threads::split(blocks, |b| {
            // SAFETY: block b alone writes its `per_block` words.
            let out =
                unsafe { std::slice::from_raw_parts_mut(dst.ptr().add(b * per_block), per_block) };
            for i in 0..rows_per_block.min(m - b * rows_per_block) {
                let row = (b * rows_per_block + i) * k;
                let value = |c: usize| if c < k { x.get(row + c) } else { 0.0 };
                if arith == Arith::Fma {
                    for c in 0..k {
                        out[c * width + i] = value(c).to_bits();
                    }
                    continue;
                }
                for p in 0..pairs.min(k.div_ceil(2)) {
                    let (a, c) = (value(2 * p), value(2 * p + 1));
                    let (ha, hc) = (bf16(a), bf16(c));
                    out[p * width + i] = ha as u32 | (hc as u32) << 16;
                    if terms == 2 {
                        let lo = |v: f32, h: u16| bf16(v - bf16_to_f32(h));
                        out[p * width + LANES + i] = lo(a, ha) as u32 | (lo(c, hc) as u32) << 16;
                    }
                }
            }
        });
        Packed {
            words,
            rows: m,
            steps,
            terms,
            width,
            rows_per_block,
            blocks,
        }
    }
}

thread_local! {
    /// The packed x of the calling thread's last call ([`Packed::new`]; handed back by
    /// [`gemm`]; `memory::take` / `keep`).
    static X_WORDS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// Each thread's tile of W (bf16 or float32 codes, for the CPU's [`Arith`]) and the tile's
    /// scales, reused across calls.
    static TILE: RefCell<(Vec<u16>, Vec<f32>, Vec<f32>)> =
        const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// y [m, n] = x [m, k] · W_hatᵀ in float32. The caller checks [`supported`] and the sizes.
pub fn gemm(w: &PackedW4<'_>, x: Rows<'_>, y: &mut [f32]) {
    let s = w.shape;
    let m = x.len() / s.k;
    let arith = Arith::of_cpu();
    let kpad = packed_row_bytes(s.k) * 2;
    let pairs = kpad / 2;
    let groups = s.groups();
    let group_pairs = if groups == 1 { pairs } else { s.group_size / 2 };
    let half_groups = s.half_block_groups(kpad / BLOCK_BYTES);
    let xp = Packed::new(arith, x, m, s.k, pairs);
    let y_ptr = SendPtr(y.as_mut_ptr());
    // Chunks of m blocks: each chunk's x stays in the caches while every tile of W passes it
    // (W is dequantized once per chunk). An FMA block's words are single columns: half as
    // many blocks hold as many bytes.
    let chunk_blocks = match arith {
        Arith::Bf16 => CHUNK_BLOCKS,
        Arith::Fma => CHUNK_BLOCKS / 2,
    };
    let group_steps = xp.steps / pairs * group_pairs;
    let chunks = (0..xp.blocks).step_by(chunk_blocks);
    for chunk in chunks.map(|b0| b0..(b0 + chunk_blocks).min(xp.blocks)) {
        gemm_chunk(w, arith, &xp, chunk, group_steps, &half_groups, y_ptr);
    }
    crate::memory::keep(&X_WORDS, xp.words);
}

/// The m blocks `chunk` of y from the packed x, each thread taking tiles of W in turn;
/// `group_steps`: the micro-kernel's steps (pairs or columns) per group.
fn gemm_chunk(
    w: &PackedW4<'_>,
    arith: Arith,
    xp: &Packed,
    chunk: std::ops::Range<usize>,
    group_steps: usize,
    half_groups: &[usize],
    y_ptr: SendPtr<f32>,
) {
    let s = w.shape;
    let m = xp.rows;
    let (steps, groups) = (xp.steps, s.groups());
    let stride = packed_row_bytes(s.k) * 2 + ROW_PAD; // codes of either type
    threads::split(s.n.div_ceil(NR), |part| {
        TILE.with_borrow_mut(|(tile16, tile32, scales)| {
            scales.resize(groups * NR, 0.0);
            let n0 = part * NR;
            let rows = NR.min(s.n - n0);
            // SAFETY: the GEMM runs only where `supported` found the features.
            unsafe {
                match arith {
                    Arith::Bf16 => {
                        tile16.resize(NR * stride, 0);
                        dequantize_tile(w, n0, rows, stride, half_groups, tile16, scales)
                    }
                    Arith::Fma => {
                        tile32.resize(NR * stride, 0.0);
                        dequantize_tile(w, n0, rows, stride, half_groups, tile32, scales)
                    }
                }
            }
            let mut out = [0.0f32; NR * BLOCK_LANES];
            let width = xp.width;
            for b in chunk.clone() {
                out.fill(0.0);
                let xb = &xp.words[b * steps * width..(b + 1) * steps * width];
                let m_rows = xp.rows_per_block.min(m - b * xp.rows_per_block);
                let one_vector = xp.terms == 1 && m_rows <= LANES;
                // SAFETY: as above; the tile holds NR rows of `stride` codes, xb `steps` words
                // of `width` lanes.
                unsafe {
                    match arith {
                        Arith::Fma => {
                            let args = (tile32.as_slice(), stride, xb, width, group_steps);
                            if one_vector {
                                micro_fma::<1>(args, scales, &mut out)
                            } else {
                                micro_fma::<2>(args, scales, &mut out)
                            }
                        }
                        Arith::Bf16 => {
                            let args = (tile16.as_slice(), stride, xb, width, group_steps);
                            if width == NARROW {
                                micro::<__m256, 1>(args, scales, &mut out)
                            } else if one_vector {
                                micro::<__m512, 1>(args, scales, &mut out)
                            } else {
                                micro::<__m512, 2>(args, scales, &mut out)
                            }
                        }
                    }
                }
                for i in 0..m_rows {
                    let row = b * xp.rows_per_block + i;
                    // SAFETY: part `part` alone writes columns n0 .. n0 + rows of y.
                    let dst = unsafe { y_ptr.ptr().add(row * s.n + n0) };
                    for j in 0..rows {
                        let lanes = &out[j * width..];
                        let v = if xp.terms == 2 {
                            lanes[i] + lanes[LANES + i]
                        } else {
                            lanes[i]
                        };
                        unsafe { *dst.add(j) = v };
                    }
                }
            }
        })
    });
}

/// An element of the tile: bf16 bits (`u16`) or float32.
trait TileCode: Copy {
    /// Writes the 64 codes q - zero of one packed block at `dst`: `lo` holds the low nibbles
    /// (columns 0-31, zero `z_lo`), `hi` the high ones (columns 32-63, zero `z_hi`), one code a
    /// byte.
    unsafe fn write_block(dst: *mut Self, lo: __m256i, hi: __m256i, z_lo: usize, z_hi: usize);
}

impl TileCode for u16 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    unsafe fn write_block(dst: *mut u16, lo: __m256i, hi: __m256i, z_lo: usize, z_hi: usize) {
        let table =
            |z: usize| _mm512_loadu_si512(TABLES.get_unchecked(z & 15).as_ptr() as *const _);
        let lo = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(lo), table(z_lo));
        let hi = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(hi), table(z_hi));
        _mm512_storeu_si512(dst as *mut _, lo);
        _mm512_storeu_si512(dst.add(BLOCK_BYTES) as *mut _, hi);
    }
}

impl TileCode for f32 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    unsafe fn write_block(dst: *mut f32, lo: __m256i, hi: __m256i, z_lo: usize, z_hi: usize) {
        for (half, (codes, z)) in [(lo, z_lo), (hi, z_hi)].into_iter().enumerate() {
            let table = _mm512_loadu_ps(TABLES_F32.get_unchecked(z & 15).as_ptr());
            let at = dst.add(half * BLOCK_BYTES);
            let low = _mm512_cvtepu8_epi32(_mm256_castsi256_si128(codes));
            let high = _mm512_cvtepu8_epi32(_mm256_extracti128_si256::<1>(codes));
            _mm512_storeu_ps(at, _mm512_permutexvar_ps(low, table));
            _mm512_storeu_ps(at.add(16), _mm512_permutexvar_ps(high, table));
        }
    }
}

/// Rows n0 .. n0 + rows of W as codes q - zero into `tile` [NR, stride] (rows past the
/// weight's end hold zeros), and their scales into `scales` [groups, NR]; `half_groups` holds
/// the group of each half block.
#[target_feature(enable = "avx512f,avx512bw,avx2")]
unsafe fn dequantize_tile<C: TileCode>(
    w: &PackedW4<'_>,
    n0: usize,
    rows: usize,
    stride: usize,
    half_groups: &[usize],
    tile: &mut [C],
    scales: &mut [f32],
) {
    let s = w.shape;
    let (row_bytes, groups) = (packed_row_bytes(s.k), s.groups());
    let mask = _mm256_set1_epi8(15);
    for r in 0..NR {
        let dst = tile.as_mut_ptr().add(r * stride);
        if r >= rows {
            std::ptr::write_bytes(dst, 0, stride);
            for gi in 0..groups {
                scales[gi * NR + r] = 0.0;
            }
            continue;
        }
        let n = n0 + r;
        let packed = w.packed.as_ptr().add(n * row_bytes);
        let zeros = &w.zeros[n * groups..(n + 1) * groups];
        for gi in 0..groups {
            scales[gi * NR + r] = w.scales.get(n * groups + gi);
        }
        let zero = |half: usize| *zeros.get_unchecked(*half_groups.get_unchecked(half)) as usize;
        for b in 0..row_bytes / BLOCK_BYTES {
            let v = _mm256_loadu_si256(packed.add(b * BLOCK_BYTES) as *const __m256i);
            let lo = _mm256_and_si256(v, mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
            C::write_block(dst.add(b * BLOCK), lo, hi, zero(2 * b), zero(2 * b + 1));
        }
    }
}

/// A vector of float32 sums with the bf16 dot product into it: zmm, or ymm for the narrow block.
trait Sums: Copy {
    const LANES: usize;
    unsafe fn zero() -> Self;
    /// The x pairs of `LANES` lanes at `p`.
    unsafe fn load(p: *const u32) -> Self;
    /// self + Σ of each lane's pair (of `x`) times the pair `w` (two bf16 in 32 bits).
    unsafe fn dot(self, x: Self, w: i32) -> Self;
    /// out[..LANES] += self * scale.
    unsafe fn fold(self, scale: f32, out: *mut f32);
}

impl Sums for __m512 {
    const LANES: usize = 16;

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn zero() -> Self {
        _mm512_setzero_ps()
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(p: *const u32) -> Self {
        _mm512_loadu_ps(p as *const f32)
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn dot(self, x: Self, w: i32) -> Self {
        let w: __m512bh = std::mem::transmute(_mm512_set1_epi32(w));
        _mm512_dpbf16_ps(self, std::mem::transmute::<__m512, __m512bh>(x), w)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn fold(self, scale: f32, out: *mut f32) {
        let sum = _mm512_fmadd_ps(self, _mm512_set1_ps(scale), _mm512_loadu_ps(out));
        _mm512_storeu_ps(out, sum);
    }
}

impl Sums for __m256 {
    const LANES: usize = 8;

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn zero() -> Self {
        _mm256_setzero_ps()
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load(p: *const u32) -> Self {
        _mm256_loadu_ps(p as *const f32)
    }

    #[inline]
    #[target_feature(enable = "avx2,avx512vl,avx512bf16")]
    unsafe fn dot(self, x: Self, w: i32) -> Self {
        let w: __m256bh = std::mem::transmute(_mm256_set1_epi32(w));
        _mm256_dpbf16_ps(self, std::mem::transmute::<__m256, __m256bh>(x), w)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fold(self, scale: f32, out: *mut f32) {
        let sum = _mm256_fmadd_ps(self, _mm256_set1_ps(scale), _mm256_loadu_ps(out));
        _mm256_storeu_ps(out, sum);
    }
}

/// out[j, lane] += Σ_g scale[g, j] Σ_{p in g} x[lane, pair p] · tile[j, pair p] for the NR
/// rows of the tile and MV vectors of one m block; `args` = (tile, its row stride, the block's
/// x words, lanes per pair, pairs per group).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
unsafe fn micro<V: Sums, const MV: usize>(
    args: (&[u16], usize, &[u32], usize, usize),
    scales: &[f32],
    out: &mut [f32; NR * BLOCK_LANES],
) {
    let (tile, stride, x, width, group_pairs) = args;
    let pairs = x.len() / width;
    let (tp, xp) = (tile.as_ptr(), x.as_ptr());
    for (gi, p0) in (0..pairs).step_by(group_pairs).enumerate() {
        let mut acc = [[V::zero(); MV]; NR];
        for p in p0..(p0 + group_pairs).min(pairs) {
            let mut xv = [V::zero(); MV];
            for (v, x) in xv.iter_mut().enumerate() {
                *x = V::load(xp.add(p * width + v * V::LANES));
            }
            for (j, a) in acc.iter_mut().enumerate() {
                let word = (tp.add(j * stride + 2 * p) as *const i32).read_unaligned();
                for v in 0..MV {
                    a[v] = a[v].dot(xv[v], word);
                }
            }
        }
        let scales = &scales[gi.min(scales.len() / NR - 1) * NR..];
        for (j, a) in acc.iter().enumerate() {
            for (v, &sum) in a.iter().enumerate() {
                sum.fold(scales[j], out.as_mut_ptr().add(j * width + v * V::LANES));
            }
        }
    }
}

/// [`micro`] in float32 fused multiply-adds: `args` = (tile of float32 codes, its row stride,
/// the block's x words (float32 bits, one column of `width` lanes each), lanes per column,
/// columns per group).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn micro_fma<const MV: usize>(
    args: (&[f32], usize, &[u32], usize, usize),
    scales: &[f32],
    out: &mut [f32; NR * BLOCK_LANES],
) {
    let (tile, stride, x, width, group_cols) = args;
    let cols = x.len() / width;
    let (tp, xp) = (tile.as_ptr(), x.as_ptr() as *const f32);
    for (gi, c0) in (0..cols).step_by(group_cols).enumerate() {
        let mut acc = [[_mm512_setzero_ps(); MV]; NR];
        for c in c0..(c0 + group_cols).min(cols) {
            let mut xv = [_mm512_setzero_ps(); MV];
            for (v, x) in xv.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(xp.add(c * width + v * LANES));
                // x's block streams from L2 once per tile: its lines 8 columns ahead (at 128
                // rows, 4096 x 4096, 2 threads: 19.2 -> 16.3 ms; 16 ahead the same).
                let ahead = xp.wrapping_add((c + 8) * width + v * LANES); // (may pass the end)
                _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
            }
            for (j, a) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*tp.add(j * stride + c));
                for v in 0..MV {
                    a[v] = _mm512_fmadd_ps(xv[v], w, a[v]);
                }
            }
        }
        let scales = &scales[gi.min(scales.len() / NR - 1) * NR..];
        for (j, a) in acc.iter().enumerate() {
            for (v, &sum) in a.iter().enumerate() {
                sum.fold(scales[j], out.as_mut_ptr().add(j * width + v * LANES));
            }
        }
    }
}
