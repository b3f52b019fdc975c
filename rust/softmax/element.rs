//! The storage types the kernels read and write: f32, bfloat16 and float16, converted to f32
//! in registers on load and rounded to nearest even on store (no widened copies).
//!
//! Every backend rounds a finite value to the same bits (the scalar path runs the vector
//! paths' integer algorithm on one lane); a NaN stores as a quiet NaN.

use super::layout::SPLIT_ROW;
use crate::simd::{self, Bf16, Scalar, Simd, SimdLevel, Storage, F16};

/// What a backend adds to [`Simd`] for the kernels here: 16-bit loads and stores and
/// horizontal reductions.
///
/// # Safety
/// As [`Simd`]; 16-bit loads and stores touch `LANES` elements (the partial ones `len`).
#[allow(clippy::missing_safety_doc)]
pub trait Lanes: Simd {
    unsafe fn load_bf16(p: *const u16) -> Self::V;
    unsafe fn store_bf16(p: *mut u16, v: Self::V);
    unsafe fn load_f16(p: *const u16) -> Self::V;
    unsafe fn store_f16(p: *mut u16, v: Self::V);
    /// The sum of the lanes.
    unsafe fn hsum(v: Self::V) -> f32;
    /// The largest lane (x86 `max`: NaN lanes are skipped unless the last).
    unsafe fn hmax(v: Self::V) -> f32;
}

/// One storage type: vector loads and stores through a backend's [`Lanes`].
///
/// # Safety
/// The pointers must be valid for `LANES` elements (the partial forms for `len < LANES`).
#[allow(clippy::missing_safety_doc)]
pub trait Element: Storage {
    /// Longest row the in-cache kernels take with AVX-512 in softmax's forward, where two-pass
    /// computes exp twice and the in-cache kernel once; longer rows run two-pass. 16-bit rows
    /// keep an f32 scratch row of this length in L2 (512 KiB), f32 rows keep exp(x) in y. The
    /// in-cache kernel led at every length measured for 16-bit rows, and for f32 rows that
    /// stay in cache (Zen 4, 1 MiB L2, 2M elements in rows of 8192-128256: 1.35-1.6x at 1 and
    /// 2 threads); from memory the two ran level (docs/softmax.md).
    const SHORT_ROW: usize = 1 << 17;
    /// The same limit where two-pass computes exp once too: log_softmax's forward (its second
    /// pass writes x - lse) and the backwards (no exp). f32 rows take two-pass from 4097 on
    /// there, since the in-cache kernel's extra pass over the row buys nothing (log_softmax
    /// forward 0.83-0.87x two-pass's time on the Xeon of family 6 model 207 at rows of
    /// 4096-128256; docs/softmax.md).
    const SHORT_ROW_ONE_EXP: usize = Self::SHORT_ROW;

    /// Longest row the in-cache kernels take at `level`, in softmax's forward (`exp_twice`:
    /// where two-pass would compute exp twice) or elsewhere. With 8 lanes or fewer, exp costs
    /// twice as much per element as with 16 and computing it once led at every length up to
    /// the rows split across threads, for both types (Zen 3, AVX2: two-pass took 1.65-1.93x as
    /// long for f32 softmax rows of 8192-256000, 1.25-1.39x for log_softmax, 2.0x for bf16
    /// rows of 256000; docs/softmax.md).
    fn short_row(level: SimdLevel, exp_twice: bool) -> usize {
        match level {
            SimdLevel::Avx512 if exp_twice => Self::SHORT_ROW,
            SimdLevel::Avx512 => Self::SHORT_ROW_ONE_EXP,
            SimdLevel::Avx2 | SimdLevel::Scalar => SPLIT_ROW - 1,
        }
    }

    unsafe fn load<S: Lanes>(p: *const Self) -> S::V;
    unsafe fn store<S: Lanes>(p: *mut Self, v: S::V);

    /// Loads the first `len < LANES` elements; the other lanes hold `fill`.
    #[inline(always)]
    unsafe fn load_partial<S: Lanes>(p: *const Self, len: usize, fill: f32) -> S::V {
        let mut buf = [Self::from_f32(fill); 16];
        std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), len);
        Self::load::<S>(buf.as_ptr())
    }

    /// Stores the first `len < LANES` lanes.
    #[inline(always)]
    unsafe fn store_partial<S: Lanes>(p: *mut Self, v: S::V, len: usize) {
        let mut buf = [Self::from_f32(0.0); 16];
        Self::store::<S>(buf.as_mut_ptr(), v);
        std::ptr::copy_nonoverlapping(buf.as_ptr(), p, len);
    }

    /// `len <= LANES` elements: a full load when `len == LANES`, else `load_partial`.
    #[inline(always)]
    unsafe fn load_upto<S: Lanes>(p: *const Self, len: usize, fill: f32) -> S::V {
        if len >= S::LANES {
            Self::load::<S>(p)
        } else {
            Self::load_partial::<S>(p, len, fill)
        }
    }

    /// `len <= LANES` lanes: a full store when `len == LANES`, else `store_partial`.
    #[inline(always)]
    unsafe fn store_upto<S: Lanes>(p: *mut Self, v: S::V, len: usize) {
        if len >= S::LANES {
            Self::store::<S>(p, v)
        } else {
            Self::store_partial::<S>(p, v, len)
        }
    }
}

impl Element for f32 {
    const SHORT_ROW_ONE_EXP: usize = 4096;

    #[inline(always)]
    unsafe fn load<S: Lanes>(p: *const f32) -> S::V {
        S::load(p)
    }
    #[inline(always)]
    unsafe fn store<S: Lanes>(p: *mut f32, v: S::V) {
        S::store(p, v)
    }
    #[inline(always)]
    unsafe fn load_partial<S: Lanes>(p: *const f32, len: usize, fill: f32) -> S::V {
        S::load_partial(p, len, fill)
    }
    #[inline(always)]
    unsafe fn store_partial<S: Lanes>(p: *mut f32, v: S::V, len: usize) {
        S::store_partial(p, v, len)
    }
}

impl Element for Bf16 {
    #[inline(always)]
    unsafe fn load<S: Lanes>(p: *const Bf16) -> S::V {
        S::load_bf16(p.cast())
    }
    #[inline(always)]
    unsafe fn store<S: Lanes>(p: *mut Bf16, v: S::V) {
        S::store_bf16(p.cast(), v)
    }
}

impl Element for F16 {
    #[inline(always)]
    unsafe fn load<S: Lanes>(p: *const F16) -> S::V {
        S::load_f16(p.cast())
    }
    #[inline(always)]
    unsafe fn store<S: Lanes>(p: *mut F16, v: S::V) {
        S::store_f16(p.cast(), v)
    }
}

/// float16 quiet NaN (torch's), as the vector paths splat it.
const F16_NAN: u32 = simd::F16_NAN as u32;

impl Lanes for Scalar {
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> f32 {
        simd::bf16_to_f32(*p)
    }
    #[inline(always)]
    unsafe fn store_bf16(p: *mut u16, v: f32) {
        *p = simd::f32_to_bf16(v)
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> f32 {
        simd::f16_to_f32(*p)
    }
    #[inline(always)]
    unsafe fn store_f16(p: *mut u16, v: f32) {
        *p = simd::f32_to_f16(v)
    }
    #[inline(always)]
    unsafe fn hsum(v: f32) -> f32 {
        v
    }
    #[inline(always)]
    unsafe fn hmax(v: f32) -> f32 {
        v
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Lanes, F16_NAN};
    use crate::simd::{self, Avx2, Avx512};

    /// Eight 32-bit lanes holding 16-bit values, stored as eight u16.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store_u16_avx2(p: *mut u16, r: __m256i) {
        let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(r, r));
        _mm_storeu_si128(p.cast(), _mm256_castsi256_si128(packed))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_u16_avx2(p: *const u16) -> __m256i {
        _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()))
    }

    impl Lanes for Avx2 {
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn load_bf16(p: *const u16) -> __m256 {
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(load_u16_avx2(p)))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn store_bf16(p: *mut u16, v: __m256) {
            store_u16_avx2(p, simd::bf16_bits_avx2(v))
        }
        /// No F16C in the AVX2 path's feature set: `simd::f16_to_f32`, eight lanes at a time.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn load_f16(p: *const u16) -> __m256 {
            let h = load_u16_avx2(p);
            let em = _mm256_and_si256(h, _mm256_set1_epi32(0x7fff));
            let shifted = _mm256_slli_epi32::<13>(em);
            let v = _mm256_mul_ps(
                _mm256_castsi256_ps(shifted),
                _mm256_castsi256_ps(_mm256_set1_epi32(0x7780_0000)),
            );
            let special = _mm256_cmpgt_epi32(em, _mm256_set1_epi32(0x7bff));
            let inf_nan = _mm256_or_si256(shifted, _mm256_set1_epi32(0x7f80_0000));
            let bits = _mm256_blendv_epi8(_mm256_castps_si256(v), inf_nan, special);
            let sign = _mm256_slli_epi32::<16>(_mm256_and_si256(h, _mm256_set1_epi32(0x8000)));
            _mm256_castsi256_ps(_mm256_or_si256(bits, sign))
        }
        /// `simd::f32_to_f16`, eight lanes at a time.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn store_f16(p: *mut u16, v: __m256) {
            let u = _mm256_castps_si256(v);
            let sign = _mm256_and_si256(u, _mm256_set1_epi32(i32::MIN));
            let a = _mm256_xor_si256(u, sign);
            let big = _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x4780_0000 - 1));
            let nan = _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x7f80_0000));
            let big_val = _mm256_blendv_epi8(
                _mm256_set1_epi32(0x7c00),
                _mm256_set1_epi32(F16_NAN as i32),
                nan,
            );
            let tiny = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x3880_0000), a);
            let tiny_val = _mm256_sub_epi32(
                _mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(a), _mm256_set1_ps(0.5))),
                _mm256_set1_epi32(0x3f00_0000),
            );
            let odd = _mm256_and_si256(_mm256_srli_epi32::<13>(a), _mm256_set1_epi32(1));
            let normal = _mm256_srli_epi32::<13>(_mm256_add_epi32(
                _mm256_add_epi32(a, _mm256_set1_epi32(0xc800_0fff_u32 as i32)),
                odd,
            ));
            let o = _mm256_blendv_epi8(normal, tiny_val, tiny);
            let o = _mm256_blendv_epi8(o, big_val, big);
            store_u16_avx2(p, _mm256_or_si256(o, _mm256_srli_epi32::<16>(sign)))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn hsum(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn hmax(v: __m256) -> f32 {
            let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)))
        }
    }

    impl Lanes for Avx512 {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn load_bf16(p: *const u16) -> __m512 {
            let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h))
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
        unsafe fn store_bf16(p: *mut u16, v: __m512) {
            _mm256_storeu_si256(p.cast(), simd::bf16_pack_avx512(v))
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn load_f16(p: *const u16) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
        }
        /// vcvtps2ph rounds to nearest even like `simd::f32_to_f16`; NaN keeps its sign.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn store_f16(p: *mut u16, v: __m512) {
            let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            _mm256_storeu_si256(p.cast(), h)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn hsum(v: __m512) -> f32 {
            _mm512_reduce_add_ps(v)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn hmax(v: __m512) -> f32 {
            _mm512_reduce_max_ps(v)
        }
    }
}
