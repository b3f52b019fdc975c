//! The x86-64 micro-kernels (AVX-512 VNNI, AVX-VNNI, and `vpmaddubsw` ones in 512- and 256-bit
//! registers) and their folds and stores.

use std::arch::x86_64::*;

use super::{Direct, Format, Tile};
use crate::simd::bf16_bits_avx512;

/// The VNNI kernel with each fold (`fma_fold`).
pub(super) const VNNI: Family = (
    6,
    vnni::<6, false>,
    &[
        vnni_row::<false>,
        vnni::<2, false>,
        vnni::<3, false>,
        vnni::<4, false>,
        vnni::<5, false>,
    ],
);
pub(super) const VNNI_FMA: Family = (
    6,
    vnni::<6, true>,
    &[
        vnni_row::<true>,
        vnni::<2, true>,
        vnni::<3, true>,
        vnni::<4, true>,
        vnni::<5, true>,
    ],
);

/// AVX-512 VNNI: MR rows (6, or fewer for a short A) x 32 columns; B holds qb + 128 as
/// unsigned bytes, each A quad is broadcast, and the accumulators start at -128 · Σ qa to
/// cancel the offset.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn vnni<const MR: usize, const FMA: bool>(t: &Tile) {
    let mut f = load_acc::<__m512i, MR, 2>(t);
    if let Some(d) = &t.direct {
        prefetch_c(d);
    }
    let rows: [*const i8; MR] = std::array::from_fn(|i| t.a.add(i.min(t.a_live - 1) * t.a_row));
    let (mut at, mut b) = (0, t.b);
    for g in 0..t.groups {
        let mut s = [[_mm512_setzero_si512(); 2]; MR];
        for (i, row) in s.iter_mut().enumerate() {
            let c = _mm512_set1_epi32(*t.a_corr.add(g * MR + i));
            *row = [c, c];
        }
        for _ in 0..*t.steps.add(g) {
            let b0 = _mm512_loadu_si512(b.cast());
            let b1 = _mm512_loadu_si512(b.add(64).cast());
            for (row, a) in s.iter_mut().zip(rows) {
                let av = _mm512_set1_epi32(a.add(at).cast::<i32>().read_unaligned());
                row[0] = _mm512_dpbusd_epi32(row[0], b0, av);
                row[1] = _mm512_dpbusd_epi32(row[1], b1, av);
            }
            at += t.a_step;
            b = b.add(128);
        }
        fold_group::<MR, FMA>(t, g, &s, &mut f);
    }
    finish(t, f);
}

/// `vnni` for one row of A (a layer's call at one token): with one row a step feeds only two
/// accumulators, and each waits on its own previous `vpdpbusd` (about 4 cycles), so the steps
/// alternate between two pairs of accumulators, added before the group's fold (the same
/// integer sums, so the same bits).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn vnni_row<const FMA: bool>(t: &Tile) {
    let mut f = load_acc::<__m512i, 1, 2>(t);
    if let Some(d) = &t.direct {
        prefetch_c(d);
    }
    let (mut a, mut b) = (t.a, t.b);
    for g in 0..t.groups {
        let c = _mm512_set1_epi32(*t.a_corr.add(g));
        let mut even = [c, c];
        let mut odd = [_mm512_setzero_si512(); 2];
        let steps = *t.steps.add(g);
        for _ in 0..steps / 2 {
            row_step(&mut even, a, b);
            row_step(&mut odd, a.add(t.a_step), b.add(128));
            a = a.add(2 * t.a_step);
            b = b.add(256);
        }
        if steps % 2 == 1 {
            row_step(&mut even, a, b);
            a = a.add(t.a_step);
            b = b.add(128);
        }
        let s = [[
            _mm512_add_epi32(even[0], odd[0]),
            _mm512_add_epi32(even[1], odd[1]),
        ]];
        fold_group::<1, FMA>(t, g, &s, &mut f);
    }
    finish(t, f);
}

/// One k-step of one row: the row's quad at `a` times the step's 32 columns of B at `b`,
/// added into its two accumulators.
#[inline(always)]
unsafe fn row_step(acc: &mut [__m512i; 2], a: *const i8, b: *const i8) {
    let av = _mm512_set1_epi32(a.cast::<i32>().read_unaligned());
    acc[0] = _mm512_dpbusd_epi32(acc[0], _mm512_loadu_si512(b.cast()), av);
    acc[1] = _mm512_dpbusd_epi32(acc[1], _mm512_loadu_si512(b.add(64).cast()), av);
}

/// f += group g's sums `s`, by the fold `fma_fold` chose.
#[inline(always)]
unsafe fn fold_group<const MR: usize, const FMA: bool>(
    t: &Tile,
    g: usize,
    s: &[[__m512i; 2]; MR],
    f: &mut [[__m512; 2]; MR],
) {
    if FMA {
        fold_vnni_fma(t, g, s, f);
    } else {
        fold_vnni(t, g, s, f);
    }
}

/// The VNNI tile's end: C written from the registers on the last run of groups (`Direct`),
/// else the accumulators stored for the next run or the epilogue.
#[inline(always)]
unsafe fn finish<const MR: usize>(t: &Tile, f: [[__m512; 2]; MR]) {
    match &t.direct {
        Some(d) => store_c(d, f),
        None => store_acc::<__m512i, MR, 2>(t, &f),
    }
}

/// Prefetches the cache lines of the tile's C a run of groups before `store_c` writes them:
/// C is usually fresh memory, and each tile's stores otherwise waited on their lines'
/// reads, holding the store queue (the next tile's setup stalled on it). A read prefetch:
/// `prefetchw` would need a target feature (prfchw) that the kernel's selection does not
/// check.
#[inline(always)]
unsafe fn prefetch_c(d: &Direct) {
    let bytes = d.cols * d.format.bytes();
    for i in 0..d.rows {
        let row = std::slice::from_raw_parts(d.out.add(i * d.stride * d.format.bytes()), bytes);
        crate::simd::prefetch(row);
        // The row's last line, when the row does not start on one.
        crate::simd::prefetch(&row[bytes - 1..]);
    }
}

/// f += s · 2^-(ka + kb) for group g: s converted to float (exact below 2^24, else rounded
/// to nearest like `scalar_4x8`'s `s as f32`), scaled by `vscalefps` with the exponent
/// -(ka + kb) (`vgetexpps` of the factors, added as floats), then added: one rounding, the
/// bits of `scalar_4x8`'s s · pb · pa + acc (shifts are at most 15, so the scaled sum is a
/// normal float and exact). Padding rows and columns carry the factor 0, whose exponent is
/// -inf: their scaled sums are 0. On Zen 4 the float multiply-add this replaced, or the
/// integer adds of an exponent trick, ran on the `vpdpbusd` pipes: 6% of a 2048^3 GEMM with
/// groups of 64, against about 1% for these conversions, exponent ops and float adds.
#[inline(always)]
unsafe fn fold_vnni<const MR: usize>(
    t: &Tile,
    g: usize,
    s: &[[__m512i; 2]; MR],
    f: &mut [[__m512; 2]; MR],
) {
    let pb = t.b_pow.add(g * 32);
    let eb = [
        _mm512_getexp_ps(_mm512_loadu_ps(pb)),
        _mm512_getexp_ps(_mm512_loadu_ps(pb.add(16))),
    ];
    for (i, (fr, sr)) in f.iter_mut().zip(s).enumerate() {
        let ea = _mm512_getexp_ps(_mm512_set1_ps(*t.a_pow.add(g * MR + i)));
        for h in 0..2 {
            let e = _mm512_add_ps(ea, eb[h]);
            fr[h] = _mm512_add_ps(fr[h], _mm512_scalef_ps(_mm512_cvtepi32_ps(sr[h]), e));
        }
    }
}

/// `fold_vnni` with the same bits from fewer instructions on the `vpdpbusd` ports where
/// float arithmetic shares them (Intel: ports 0 and 5): f = fma(s, pa · pb, f), the product
/// of the two powers of two exact (at least 2^-30), s times it exact, the sum rounded once.
/// Three operations per accumulator and group against four, and no exponent extraction.
#[inline(always)]
unsafe fn fold_vnni_fma<const MR: usize>(
    t: &Tile,
    g: usize,
    s: &[[__m512i; 2]; MR],
    f: &mut [[__m512; 2]; MR],
) {
    let pb = t.b_pow.add(g * 32);
    let pb = [_mm512_loadu_ps(pb), _mm512_loadu_ps(pb.add(16))];
    for (i, (fr, sr)) in f.iter_mut().zip(s).enumerate() {
        let pa = _mm512_set1_ps(*t.a_pow.add(g * MR + i));
        for h in 0..2 {
            let p = _mm512_mul_ps(pa, pb[h]);
            fr[h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sr[h]), p, fr[h]);
        }
    }
}

/// `Direct`: the tile's live rows of C from the accumulators of up to 32 columns, in the
/// epilogue's f32 arithmetic (sa · sb first, then the accumulator, then the bias; no fused
/// multiply-add) and its bfloat16 rounding (to nearest even, NaN to `BF16_NAN`).
#[inline(always)]
unsafe fn store_c<const MR: usize>(d: &Direct, f: [[__m512; 2]; MR]) {
    let live = (1u64 << d.cols) - 1; // cols <= 32
    let masks = [live as __mmask16, (live >> 16) as __mmask16];
    let sb = [
        _mm512_maskz_loadu_ps(masks[0], d.b_scale),
        _mm512_maskz_loadu_ps(masks[1], d.b_scale.add(16)),
    ];
    let bias = if d.bias.is_null() {
        None
    } else {
        Some([
            _mm512_maskz_loadu_ps(masks[0], d.bias),
            _mm512_maskz_loadu_ps(masks[1], d.bias.add(16)),
        ])
    };
    // The lanes of the two halves' bf16 bits after `vpackusdw`, back in column order.
    let order = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7);
    for (i, row) in f.iter().enumerate().take(d.rows) {
        let sa = _mm512_set1_ps(*d.a_scale.add(i));
        let mut c = [
            _mm512_mul_ps(row[0], _mm512_mul_ps(sa, sb[0])),
            _mm512_mul_ps(row[1], _mm512_mul_ps(sa, sb[1])),
        ];
        if let Some(bias) = bias {
            c = [_mm512_add_ps(c[0], bias[0]), _mm512_add_ps(c[1], bias[1])];
        }
        let at = i * d.stride;
        match d.format {
            Format::F32 => {
                for (h, &c) in c.iter().enumerate() {
                    _mm512_mask_storeu_ps(d.out.cast::<f32>().add(at + 16 * h), masks[h], c);
                }
            }
            Format::Bf16 => {
                let bits = _mm512_packus_epi32(bf16_bits_avx512(c[0]), bf16_bits_avx512(c[1]));
                let bits = _mm512_permutexvar_epi64(order, bits);
                _mm512_mask_storeu_epi16(d.out.cast::<i16>().add(at), live as __mmask32, bits);
            }
        }
    }
}

/// A register of byte, int16 and int32 lanes and its float32 twin: what the `vpmaddubsw`
/// kernels, their fold and the AVX-VNNI kernel need (and the VNNI kernel's accumulators), in
/// 256-bit (AVX2) and 512-bit (AVX-512 BW) form. The methods are `inline(always)` without
/// target features of their own: they compile inside the kernel that calls them, with its
/// features.
trait Lanes: Copy {
    type Float: Copy;
    /// B's codes of one step made ready for `signed_pairs`.
    type Signed: Copy;
    /// int32 lanes: a tile's columns per register.
    const COLUMNS: usize;
    unsafe fn zero() -> Self;
    unsafe fn load(p: *const i8) -> Self;
    unsafe fn splat_i32(x: i32) -> Self;
    unsafe fn splat_i16(x: i16) -> Self;
    unsafe fn add_i16(self, other: Self) -> Self;
    unsafe fn add_i32(self, other: Self) -> Self;
    unsafe fn sub_i32(self, other: Self) -> Self;
    /// Unsigned bytes `self` times signed bytes `signed`, adjacent pairs summed to int16
    /// (`vpmaddubsw`, saturating).
    unsafe fn maddubs(self, signed: Self) -> Self;
    /// int16 lanes times `other`'s, adjacent pairs summed to int32 (`vpmaddwd`).
    unsafe fn madd(self, other: Self) -> Self;
    unsafe fn signed(b: Self) -> Self::Signed;
    /// The pair sums of a · b for signed bytes: |b| times a with b's sign, so that no product
    /// saturates (|qa · qb| <= 127², two per int16 lane).
    unsafe fn signed_pairs(b: Self::Signed, a: Self) -> Self;
    unsafe fn float_zero() -> Self::Float;
    unsafe fn load_float(p: *const f32) -> Self::Float;
    unsafe fn store_float(p: *mut f32, v: Self::Float);
    /// f + float(s) · p, p's bits given as int32 lanes, in one fused multiply-add.
    unsafe fn fold_lanes(f: Self::Float, s: Self, p: Self) -> Self::Float;
}

impl Lanes for __m256i {
    type Float = __m256;
    type Signed = (__m256i, __m256i);
    const COLUMNS: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        _mm256_setzero_si256()
    }
    #[inline(always)]
    unsafe fn load(p: *const i8) -> Self {
        _mm256_loadu_si256(p.cast())
    }
    #[inline(always)]
    unsafe fn splat_i32(x: i32) -> Self {
        _mm256_set1_epi32(x)
    }
    #[inline(always)]
    unsafe fn splat_i16(x: i16) -> Self {
        _mm256_set1_epi16(x)
    }
    #[inline(always)]
    unsafe fn add_i16(self, other: Self) -> Self {
        _mm256_add_epi16(self, other)
    }
    #[inline(always)]
    unsafe fn add_i32(self, other: Self) -> Self {
        _mm256_add_epi32(self, other)
    }
    #[inline(always)]
    unsafe fn sub_i32(self, other: Self) -> Self {
        _mm256_sub_epi32(self, other)
    }
    #[inline(always)]
    unsafe fn maddubs(self, signed: Self) -> Self {
        _mm256_maddubs_epi16(self, signed)
    }
    #[inline(always)]
    unsafe fn madd(self, other: Self) -> Self {
        _mm256_madd_epi16(self, other)
    }
    #[inline(always)]
    unsafe fn signed(b: Self) -> Self::Signed {
        (_mm256_abs_epi8(b), b)
    }
    #[inline(always)]
    unsafe fn signed_pairs((abs, b): Self::Signed, a: Self) -> Self {
        _mm256_maddubs_epi16(abs, _mm256_sign_epi8(a, b))
    }
    #[inline(always)]
    unsafe fn float_zero() -> Self::Float {
        _mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn load_float(p: *const f32) -> Self::Float {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store_float(p: *mut f32, v: Self::Float) {
        _mm256_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn fold_lanes(f: Self::Float, s: Self, p: Self) -> Self::Float {
        _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_castsi256_ps(p), f)
    }
}

/// AVX-512 has no `vpsignb`: a is negated where b's sign bit is set (`vpmovb2m` once per B
/// register, a masked `vpsubb` per product); where b is 0, |b| makes the product 0 as
/// `vpsignb` does.
impl Lanes for __m512i {
    type Float = __m512;
    type Signed = (__m512i, __mmask64);
    const COLUMNS: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> Self {
        _mm512_setzero_si512()
    }
    #[inline(always)]
    unsafe fn load(p: *const i8) -> Self {
        _mm512_loadu_si512(p.cast())
    }
    #[inline(always)]
    unsafe fn splat_i32(x: i32) -> Self {
        _mm512_set1_epi32(x)
    }
    #[inline(always)]
    unsafe fn splat_i16(x: i16) -> Self {
        _mm512_set1_epi16(x)
    }
    #[inline(always)]
    unsafe fn add_i16(self, other: Self) -> Self {
        _mm512_add_epi16(self, other)
    }
    #[inline(always)]
    unsafe fn add_i32(self, other: Self) -> Self {
        _mm512_add_epi32(self, other)
    }
    #[inline(always)]
    unsafe fn sub_i32(self, other: Self) -> Self {
        _mm512_sub_epi32(self, other)
    }
    #[inline(always)]
    unsafe fn maddubs(self, signed: Self) -> Self {
        _mm512_maddubs_epi16(self, signed)
    }
    #[inline(always)]
    unsafe fn madd(self, other: Self) -> Self {
        _mm512_madd_epi16(self, other)
    }
    #[inline(always)]
    unsafe fn signed(b: Self) -> Self::Signed {
        (_mm512_abs_epi8(b), _mm512_movepi8_mask(b))
    }
    #[inline(always)]
    unsafe fn signed_pairs((abs, negative): Self::Signed, a: Self) -> Self {
        let signed = _mm512_mask_sub_epi8(a, negative, _mm512_setzero_si512(), a);
        _mm512_maddubs_epi16(abs, signed)
    }
    #[inline(always)]
    unsafe fn float_zero() -> Self::Float {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn load_float(p: *const f32) -> Self::Float {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store_float(p: *mut f32, v: Self::Float) {
        _mm512_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn fold_lanes(f: Self::Float, s: Self, p: Self) -> Self::Float {
        _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_castsi512_ps(p), f)
    }
}

/// The float accumulators of an MR x COLUMNS·NV tile, loaded from (zeros on the first run) and
/// stored back to `Tile::acc`.
#[inline(always)]
unsafe fn load_acc<V: Lanes, const MR: usize, const NV: usize>(t: &Tile) -> [[V::Float; NV]; MR] {
    let mut f = [[V::float_zero(); NV]; MR];
    if t.first {
        return f;
    }
    for (i, row) in f.iter_mut().enumerate() {
        for (v, fv) in row.iter_mut().enumerate() {
            *fv = V::load_float(t.acc.add((i * NV + v) * V::COLUMNS));
        }
    }
    f
}

#[inline(always)]
unsafe fn store_acc<V: Lanes, const MR: usize, const NV: usize>(
    t: &Tile,
    f: &[[V::Float; NV]; MR],
) {
    for (i, fr) in f.iter().enumerate() {
        for (v, fv) in fr.iter().enumerate() {
            V::store_float(t.acc.add((i * NV + v) * V::COLUMNS), *fv);
        }
    }
}

/// Adds group g's int32 sums, scaled by 2^-(ka + kb), into the float accumulators. The
/// factor's exponent is added in the integer unit, which leaves one
/// float operation per accumulator after the conversion instead of two; the product is
/// exact either way.
#[inline(always)]
unsafe fn fold<V: Lanes, const MR: usize, const NV: usize>(
    t: &Tile,
    g: usize,
    s: &[[V; NV]; MR],
    f: &mut [[V::Float; NV]; MR],
) {
    let one = V::splat_i32(0x3f80_0000);
    let mut pb = [one; NV];
    for (v, pb) in pb.iter_mut().enumerate() {
        let bits = V::load(t.b_pow.add((g * NV + v) * V::COLUMNS).cast());
        *pb = bits.sub_i32(one);
    }
    for (i, (fr, sr)) in f.iter_mut().zip(s).enumerate() {
        let pa = V::splat_i32(t.a_pow.add(g * MR + i).cast::<i32>().read());
        for ((fv, sv), pb) in fr.iter_mut().zip(sr).zip(&pb) {
            *fv = V::fold_lanes(*fv, *sv, pa.add_i32(*pb));
        }
    }
}

/// The offset corrections of B's columns for group g (`Tile::b_corr`), as each row's start.
#[inline(always)]
unsafe fn b_corrections<V: Lanes, const MR: usize, const NV: usize>(
    t: &Tile,
    g: usize,
) -> [[V; NV]; MR] {
    let mut corr = [V::zero(); NV];
    for (v, c) in corr.iter_mut().enumerate() {
        *c = V::load(t.b_corr.add((g * NV + v) * V::COLUMNS).cast());
    }
    [corr; MR]
}

/// The MR x NV 16-bit pair-sum products of one k-step (MR quads of A against the
/// COLUMNS·NV quads of B at the cursors), moving both cursors on to the next step. Plain
/// loops, no closures: the intrinsics inside nested `array::from_fn` closures stayed
/// out-of-line calls (a kernel ran 30x slower).
#[inline(always)]
unsafe fn step<V: Lanes, const MR: usize, const NV: usize, const SIGNED: bool>(
    (a, b): (&mut *const i8, &mut *const i8),
) -> [[V; NV]; MR] {
    let mut bv = [V::zero(); NV];
    for (v, bv) in bv.iter_mut().enumerate() {
        *bv = V::load(b.add(4 * V::COLUMNS * v));
    }
    let mut signed = [V::signed(V::zero()); NV];
    if SIGNED {
        for (sv, &b) in signed.iter_mut().zip(&bv) {
            *sv = V::signed(b);
        }
    }
    let mut prods = [[V::zero(); NV]; MR];
    for (i, row) in prods.iter_mut().enumerate() {
        let av = V::splat_i32(a.add(4 * i).cast::<i32>().read_unaligned());
        for v in 0..NV {
            row[v] = if SIGNED {
                V::signed_pairs(signed[v], av)
            } else {
                av.maddubs(bv[v])
            };
        }
    }
    *a = a.add(4 * MR);
    *b = b.add(4 * V::COLUMNS * NV);
    prods
}

/// s += the int16 pair sums p, widened to int32 (`vpmaddwd` by ones). A function, not a
/// closure: the closure this was stayed an out-of-line call in some kernels.
#[inline(always)]
unsafe fn widen<V: Lanes, const MR: usize, const NV: usize>(
    s: &mut [[V; NV]; MR],
    p: [[V; NV]; MR],
) {
    let ones = V::splat_i16(1);
    for (sr, pr) in s.iter_mut().zip(p) {
        for (sv, pv) in sr.iter_mut().zip(pr) {
            *sv = sv.add_i32(pv.madd(ones));
        }
    }
}

/// A group's int32 sums, widening the 16-bit pair sums every `t.depth` steps; `start` holds
/// the offset corrections (or zeros).
#[inline(always)]
unsafe fn group_sums<V: Lanes, const MR: usize, const NV: usize, const SIGNED: bool>(
    t: &Tile,
    steps: usize,
    (a, b): (&mut *const i8, &mut *const i8),
    start: [[V; NV]; MR],
) -> [[V; NV]; MR] {
    let mut s = start;
    if t.depth == 1 {
        // 8-bit x 8-bit: widen every step (the general loop's 16-bit adds would be idle).
        for _ in 0..steps {
            widen(&mut s, step::<V, MR, NV, SIGNED>((a, b)));
        }
        return s;
    }
    let mut left = steps;
    while left > 0 {
        let run = left.min(t.depth);
        let mut pairs = [[V::zero(); NV]; MR];
        for _ in 0..run {
            for (pr, qr) in pairs.iter_mut().zip(step::<V, MR, NV, SIGNED>((a, b))) {
                for (p, q) in pr.iter_mut().zip(qr) {
                    *p = p.add_i16(q);
                }
            }
        }
        widen(&mut s, pairs);
        left -= run;
    }
    s
}

/// 8-bit codes: |b| times a with b's sign (`Lanes::signed_pairs`), and the pair sums of
/// `depth` steps (1 for 8-bit x 8-bit) add up in 16 bits before `vpmaddwd` widens them.
#[inline(always)]
unsafe fn signed<V: Lanes, const MR: usize>(t: &Tile) {
    let mut f = load_acc::<V, MR, 2>(t);
    let (mut a, mut b) = (t.a, t.b);
    for g in 0..t.groups {
        let zero = [[V::zero(); 2]; MR];
        let s = group_sums::<V, MR, 2, true>(t, *t.steps.add(g), (&mut a, &mut b), zero);
        fold(t, g, &s, &mut f);
    }
    store_acc::<V, MR, 2>(t, &f);
}

/// Below 8 bits: A stored as qa + max|qa| (unsigned), so `vpmaddubsw` needs no sign
/// transfer; the sums start at -max|qa| · Σ qb. Widening once per `depth` steps (8 for 6-bit
/// codes) leaves the multiply pipes to `vpmaddubsw`.
#[inline(always)]
unsafe fn unsigned<V: Lanes, const MR: usize>(t: &Tile) {
    let mut f = load_acc::<V, MR, 2>(t);
    let (mut a, mut b) = (t.a, t.b);
    for g in 0..t.groups {
        let corr = b_corrections::<V, MR, 2>(t, g);
        let s = group_sums::<V, MR, 2, false>(t, *t.steps.add(g), (&mut a, &mut b), corr);
        fold(t, g, &s, &mut f);
    }
    store_acc::<V, MR, 2>(t, &f);
}

/// A kernel family of one register width: MR, the kernel, and its forms with MR = 1.. below.
pub(super) type Family = (usize, unsafe fn(&Tile), &'static [unsafe fn(&Tile)]);

/// AVX2 on 8-bit codes: 4 rows x 16 columns (`signed`). On Zen 3 `vpsignb`, `vpmaddubsw` and
/// `vpmaddwd` compete for the same pipes: 3 of them per 32 products bound this kernel near 24
/// multiply-adds per cycle (measured 20-21 in the GEMM). Two B vectors per broadcast of A
/// (4 x 16, its 8 int32 sums in registers) ran 3-6% faster than 6 x 8, which was 0-8% faster
/// than 4 x 8.
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_signed<const MR: usize>(t: &Tile) {
    signed::<__m256i, MR>(t)
}

pub(super) const AVX2_SIGNED: Family = (
    4,
    avx2_signed::<4>,
    &[avx2_signed::<1>, avx2_signed::<2>, avx2_signed::<3>],
);

/// AVX2 below 8 bits: 6 rows x 16 columns (`unsigned`). Two B vectors per broadcast of A: on
/// Zen 3 the 6 x 8 kernel's broadcasts and loop overhead held it near 28 multiply-adds per
/// cycle; a step of this one (12 `vpmaddubsw`) runs in 6.9 cycles alone, and the GEMM gained
/// 7-13%.
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_unsigned<const MR: usize>(t: &Tile) {
    unsigned::<__m256i, MR>(t)
}

pub(super) const AVX2_UNSIGNED: Family = (
    6,
    avx2_unsigned::<6>,
    &[
        avx2_unsigned::<1>,
        avx2_unsigned::<2>,
        avx2_unsigned::<3>,
        avx2_unsigned::<4>,
        avx2_unsigned::<5>,
    ],
);

/// AVX-512 without VNNI (Skylake-SP) on 8-bit codes: 6 rows x 32 columns (`signed`), twice
/// the products of the AVX2 kernel's instructions.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn avx512bw_signed<const MR: usize>(t: &Tile) {
    signed::<__m512i, MR>(t)
}

pub(super) const AVX512BW_SIGNED: Family = (
    6,
    avx512bw_signed::<6>,
    &[
        avx512bw_signed::<1>,
        avx512bw_signed::<2>,
        avx512bw_signed::<3>,
        avx512bw_signed::<4>,
        avx512bw_signed::<5>,
    ],
);

/// AVX-512 without VNNI below 8 bits: 6 rows x 32 columns (`unsigned`).
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn avx512bw_unsigned<const MR: usize>(t: &Tile) {
    unsigned::<__m512i, MR>(t)
}

pub(super) const AVX512BW_UNSIGNED: Family = (
    6,
    avx512bw_unsigned::<6>,
    &[
        avx512bw_unsigned::<1>,
        avx512bw_unsigned::<2>,
        avx512bw_unsigned::<3>,
        avx512bw_unsigned::<4>,
        avx512bw_unsigned::<5>,
    ],
);

/// AVX-VNNI (256-bit `vpdpbusd`): 6 rows x 16 columns, with B's signed codes stored as the
/// other AVX2 kernels store them and A as qa + 128 (unsigned), so that one instruction
/// multiplies and adds 32 pairs: the sums start at -128 · Σ qb. 12 accumulators, two B
/// vectors and a broadcast fill 15 of the 16 registers.
#[target_feature(enable = "avx2,fma,avxvnni")]
unsafe fn avx_vnni<const MR: usize>(t: &Tile) {
    let mut f = load_acc::<__m256i, MR, 2>(t);
    let (mut a, mut b) = (t.a, t.b);
    for g in 0..t.groups {
        let mut s = b_corrections::<__m256i, MR, 2>(t, g);
        for _ in 0..*t.steps.add(g) {
            let b0 = _mm256_loadu_si256(b.cast());
            let b1 = _mm256_loadu_si256(b.add(32).cast());
            for (i, row) in s.iter_mut().enumerate() {
                let av = _mm256_set1_epi32(a.add(4 * i).cast::<i32>().read_unaligned());
                row[0] = _mm256_dpbusd_avx_epi32(row[0], av, b0);
                row[1] = _mm256_dpbusd_avx_epi32(row[1], av, b1);
            }
            a = a.add(4 * MR);
            b = b.add(64);
        }
        fold(t, g, &s, &mut f);
    }
    store_acc::<__m256i, MR, 2>(t, &f);
}

pub(super) const AVX_VNNI: Family = (
    6,
    avx_vnni::<6>,
    &[
        avx_vnni::<1>,
        avx_vnni::<2>,
        avx_vnni::<3>,
        avx_vnni::<4>,
        avx_vnni::<5>,
    ],
);
