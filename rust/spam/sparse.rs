//! The sparse-momentum step: per chunk of [`CHUNK`] parameters, gather the active gradient
//! entries (in mask order) into a small buffer, run the moment update on them with the compact
//! moments (the buffer then holds each coordinate's step), and apply the steps to the chunk's
//! active parameters while every other one gets its weight decay. The arithmetic runs
//! vectorized on the active coordinates only, and the step moves p, g and the mask once plus
//! the compact moments: 12.125 + 16 * density bytes per float32 parameter against the dense
//! step's 28. `p * decay - step` is the dense step's last operation, so the bits are the same.
//!
//! AVX-512 gathers with register-to-register `vcompressps` and scatters with register
//! `vexpandps` (written as asm: LLVM folds a load into `vexpandps zmm{k}, [mem]`, and the memory
//! forms of compress / expand are microcoded on AMD Zen 4 / 5, ~100 cycles each); the other
//! AVX2 moves 8 lanes per mask byte with `vpermps` and a 256-entry index table; the scalar path
//! walks every element branch-free.

use super::{steps_in_place, Param, StepScalars, BLOCK};

/// Parameters per gather / update / scatter round (a multiple of 16): the chunk of p and g and
/// the buffer stay in L1 between the rounds.
pub(super) const CHUNK: usize = 1024;

/// How a backend moves the active coordinates of a chunk in and out of the buffer.
pub(super) trait Sparse {
    /// Writes the active entries of `g` (as f32, mask order) to the front of `buf` (at least
    /// `g.len() + 16` long); returns how many. Prefetches `ahead` (if any) as it goes.
    #[inline(always)]
    unsafe fn gather<P: Param>(
        g: &[P],
        mask: &[u8],
        buf: &mut [f32],
        _ahead: Option<Ahead>,
    ) -> usize {
        gather_bits(g, mask, buf)
    }

    /// `p` becomes `p * decay` off the mask and `p * decay - step` on it (`steps` in mask
    /// order, at least 16 past the last one readable).
    #[inline(always)]
    unsafe fn scatter<P: Param>(
        p: &mut [P],
        mask: &[u8],
        steps: &mut [f32],
        decay: f32,
        _ahead: Option<Ahead>,
    ) {
        scatter_bits(p, mask, steps, decay)
    }
}

impl Sparse for crate::simd::Scalar {}

/// A backend whose gather and scatter are its module's functions.
macro_rules! sparse_backend {
    ($($simd:ident => $module:ident),*) => {$(
        #[cfg(target_arch = "x86_64")]
        impl Sparse for crate::simd::$simd {
            #[inline(always)]
            unsafe fn gather<P: Param>(
                g: &[P],
                mask: &[u8],
                buf: &mut [f32],
                ahead: Option<Ahead>,
            ) -> usize {
                $module::gather(g, mask, buf, ahead)
            }

            #[inline(always)]
            unsafe fn scatter<P: Param>(
                p: &mut [P],
                mask: &[u8],
                steps: &mut [f32],
                decay: f32,
                ahead: Option<Ahead>,
            ) {
                $module::scatter(p, mask, steps, decay, ahead)
            }
        }
    )*};
}

sparse_backend!(Avx2 => avx2, Avx512 => avx512);

/// The step over one part: `mask` covers `p`, the moments are the part's compact ones;
/// `stream`: prefetch ahead (the state comes from memory).
#[inline(always)]
pub(super) unsafe fn step<S: Sparse, P: Param>(
    p: &mut [P],
    g: &[P],
    mask: &[u8],
    m: &mut [f32],
    v: &mut [f32],
    s: &StepScalars,
    stream: bool,
) {
    let mut buf = [0.0f32; CHUNK + BLOCK];
    let mut j = 0;
    let p_len = p.len();
    let (pp, gp, mp, vp) = (p.as_ptr(), g.as_ptr(), m.as_ptr(), v.as_ptr());
    for (c, (pc, gc)) in p.chunks_mut(CHUNK).zip(g.chunks(CHUNK)).enumerate() {
        let mc = &mask[c * CHUNK / 8..][..pc.len().div_ceil(8)];
        // The next chunk's p and g, and about its share of the moments (at the mean density),
        // prefetched a line at a time through this chunk's gather and scatter. All of them
        // at once, before the chunk, filled the line fill buffers and stalled (a third of the
        // step's samples on the prefetch instructions); spread out, density 0.25 at 1e7 float32
        // parameters 3.1 -> 2.5 ms, 1e8 43 -> 40 ms, 1e8 bfloat16 39 -> 29 ms (Xeon family 6
        // model 207, 2 threads; 2 chunks ahead instead of 1 was slower).
        let (next, share) = ((c + 1) * CHUNK, CHUNK * m.len() / p_len.max(1));
        let (p_next, g_next) = (part(pp, p_len, next, CHUNK), part(gp, p_len, next, CHUNK));
        let (m_next, v_next) = (
            part(mp, m.len(), j + share, share),
            part(vp, m.len(), j + share, share),
        );
        let n = S::gather(gc, mc, &mut buf, stream.then_some(Ahead([g_next, m_next])));
        let full = n / BLOCK * BLOCK;
        steps_in_place::<S>(
            &mut buf[..full],
            &mut m[j..j + full],
            &mut v[j..j + full],
            s,
        );
        if full < n {
            // The last few as one whole block (the lanes past n compute on stale values and
            // are dropped): an element loop would cost a square root and a division each.
            let rest = n - full;
            let (mut mt, mut vt) = ([0.0f32; BLOCK], [0.0f32; BLOCK]);
            mt[..rest].copy_from_slice(&m[j + full..j + n]);
            vt[..rest].copy_from_slice(&v[j + full..j + n]);
            steps_in_place::<S>(&mut buf[full..full + BLOCK], &mut mt, &mut vt, s);
            m[j + full..j + n].copy_from_slice(&mt[..rest]);
            v[j + full..j + n].copy_from_slice(&vt[..rest]);
        }
        S::scatter(
            pc,
            mc,
            &mut buf,
            s.decay,
            stream.then_some(Ahead([p_next, v_next])),
        );
        j += n;
    }
}

/// The parts of two streams that a chunk's gather or scatter prefetches as it walks the chunk
/// (start, bytes): at the chunk's element i, the line at byte i * bytes / CHUNK
/// of each, so that a part arrives spread over the chunk's work.
#[derive(Clone, Copy)]
pub(super) struct Ahead([(*const u8, usize); 2]);

/// Elements `start..start + len` of the `end` at `base`, cut at the end, as a part for [`Ahead`].
#[inline(always)]
fn part<T>(base: *const T, end: usize, start: usize, len: usize) -> (*const u8, usize) {
    let len = len.min(end.saturating_sub(start));
    (
        base.wrapping_add(start).cast(),
        len * std::mem::size_of::<T>(),
    )
}

impl Ahead {
    #[inline(always)]
    fn touch(self, i: usize) {
        for (base, bytes) in self.0 {
            crate::simd::prefetch_at(base, bytes, i * bytes / CHUNK);
        }
    }
}

/// Whether element `i` is marked.
#[inline(always)]
fn bit(mask: &[u8], i: usize) -> bool {
    mask[i / 8] >> (i % 8) & 1 == 1
}

// Both walks below are branch-free (every element written, the position advanced by its bit):
// a random mask defeats branch prediction when walking the set bits.

#[inline(always)]
fn gather_bits<P: Param>(g: &[P], mask: &[u8], buf: &mut [f32]) -> usize {
    let buf = &mut buf[..g.len() + 1];
    let mut n = 0;
    for (i, x) in g.iter().enumerate() {
        buf[n.min(g.len())] = x.to_f32();
        n += bit(mask, i) as usize;
    }
    n
}

#[inline(always)]
fn scatter_bits<P: Param>(p: &mut [P], mask: &[u8], steps: &mut [f32], decay: f32) {
    let len = p.len();
    let steps = &steps[..len + 1];
    let mut n = 0;
    for (i, x) in p.iter_mut().enumerate() {
        let active = bit(mask, i);
        let decayed = x.to_f32() * decay;
        let step = steps[n.min(len)];
        // A select in bits: LLVM turns `if active` into a branch.
        let keep = (active as u32).wrapping_neg();
        let new = (decayed - step).to_bits() & keep | decayed.to_bits() & !keep;
        *x = P::from_f32(f32::from_bits(new));
        n += active as usize;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::asm;
    use std::arch::x86_64::*;

    use super::{gather_bits, scatter_bits, Ahead, Param};

    /// 16 elements as f32 lanes (bf16 widens in registers).
    #[inline(always)]
    unsafe fn load16<P: Param>(x: &[P]) -> __m512 {
        let x = &x[..16];
        if !P::IS_F32 {
            let raw = _mm256_loadu_si256(x.as_ptr().cast());
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)))
        } else {
            _mm512_loadu_ps(x.as_ptr().cast())
        }
    }

    /// 16 f32 lanes stored as elements (bf16 rounds to nearest even as `Bf16::from_f32`).
    #[inline(always)]
    unsafe fn store16<P: Param>(x: &mut [P], v: __m512) {
        let x = &mut x[..16];
        if !P::IS_F32 {
            _mm256_storeu_si256(x.as_mut_ptr().cast(), crate::simd::bf16_pack_avx512(v));
        } else {
            _mm512_storeu_ps(x.as_mut_ptr().cast(), v)
        }
    }

    /// The lanes of `v` selected by `k`, packed to the front (register form).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn compress(k: u16, v: __m512) -> __m512 {
        let out: __m512;
        asm!(
            "vcompressps {out}{{{k}}}{{z}}, {v}",
            out = out(zmm_reg) out, k = in(kreg) k, v = in(zmm_reg) v,
            options(pure, nomem, nostack, preserves_flags),
        );
        out
    }

    /// The front lanes of `v` in order in the lanes selected by `k`, zeros elsewhere.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn expand(k: u16, v: __m512) -> __m512 {
        let out: __m512;
        asm!(
            "vexpandps {out}{{{k}}}{{z}}, {v}",
            out = out(zmm_reg) out, k = in(kreg) k, v = in(zmm_reg) v,
            options(pure, nomem, nostack, preserves_flags),
        );
        out
    }

    #[inline(always)]
    fn bits16(mask: &[u8], block: usize) -> u16 {
        u16::from_le_bytes([mask[2 * block], mask[2 * block + 1]])
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,popcnt")]
    pub(super) unsafe fn gather<P: Param>(
        g: &[P],
        mask: &[u8],
        buf: &mut [f32],
        ahead: Option<Ahead>,
    ) -> usize {
        let blocks = g.len() / 16;
        let block_bits = &mask[..2 * blocks];
        assert!(buf.len() >= g.len() + 16);
        let mut n = 0;
        for blk in 0..blocks {
            let k = bits16(block_bits, blk);
            if let Some(ahead) = ahead {
                ahead.touch(16 * blk);
            }
            let gv = load16(&g[16 * blk..16 * blk + 16]);
            // A full-width store: the lanes past the active ones are overwritten next.
            _mm512_storeu_ps(buf.as_mut_ptr().add(n), compress(k, gv));
            n += k.count_ones() as usize;
        }
        let done = 16 * blocks;
        n + gather_bits(&g[done..], &mask[done / 8..], &mut buf[n..])
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,popcnt")]
    pub(super) unsafe fn scatter<P: Param>(
        p: &mut [P],
        mask: &[u8],
        steps: &mut [f32],
        decay: f32,
        ahead: Option<Ahead>,
    ) {
        let blocks = p.len() / 16;
        let decay_v = _mm512_set1_ps(decay);
        let mut n = 0;
        for blk in 0..blocks {
            let k = bits16(mask, blk);
            if let Some(ahead) = ahead {
                ahead.touch(16 * blk);
            }
            let r = 16 * blk..16 * blk + 16;
            let decayed = _mm512_mul_ps(load16(&p[r.clone()]), decay_v);
            let step = expand(k, _mm512_loadu_ps(steps[n..n + 16].as_ptr()));
            store16(&mut p[r], _mm512_mask_sub_ps(decayed, k, decayed, step));
            n += k.count_ones() as usize;
        }
        let done = 16 * blocks;
        scatter_bits(&mut p[done..], &mask[done / 8..], &mut steps[n..], decay)
    }
}

/// AVX2: per mask byte, `vpermps` with the byte's entry of an index table packs (gather) or
/// spreads (scatter) 8 lanes.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{gather_bits, scatter_bits, Ahead, Param};

    /// Per byte: the positions of its set bits, in order (gather), and per position the rank
    /// of its bit among the set ones (scatter; 0 for clear bits, which the blend drops).
    const fn tables() -> ([[u8; 8]; 256], [[u8; 8]; 256]) {
        let (mut pack, mut spread) = ([[0u8; 8]; 256], [[0u8; 8]; 256]);
        let mut byte = 0;
        while byte < 256 {
            let (mut lane, mut rank) = (0, 0);
            while lane < 8 {
                if byte >> lane & 1 == 1 {
                    pack[byte][rank] = lane as u8;
                    spread[byte][lane] = rank as u8;
                    rank += 1;
                }
                lane += 1;
            }
            byte += 1;
        }
        (pack, spread)
    }

    static TABLES: ([[u8; 8]; 256], [[u8; 8]; 256]) = tables();

    #[inline(always)]
    unsafe fn indices(entry: &[u8; 8]) -> __m256i {
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(entry.as_ptr().cast()))
    }

    /// 8 elements as f32 lanes (bf16 widens in registers: an element loop through a stack
    /// array made bf16 sparse steps slower than dense ones on Zen 3).
    #[inline(always)]
    unsafe fn load8<P: Param>(x: &[P]) -> __m256 {
        let x = &x[..8];
        if !P::IS_F32 {
            let raw = _mm_loadu_si128(x.as_ptr().cast());
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)))
        } else {
            _mm256_loadu_ps(x.as_ptr().cast())
        }
    }

    /// 8 f32 lanes stored as elements (bf16 rounds to nearest even as `Bf16::from_f32`).
    #[inline(always)]
    unsafe fn store8<P: Param>(x: &mut [P], v: __m256) {
        let x = &mut x[..8];
        if !P::IS_F32 {
            let bits = crate::simd::bf16_bits_avx2(v);
            let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(bits, bits));
            _mm_storeu_si128(x.as_mut_ptr().cast(), _mm256_castsi256_si128(packed));
        } else {
            _mm256_storeu_ps(x.as_mut_ptr().cast(), v)
        }
    }

    #[target_feature(enable = "avx2,fma,popcnt")]
    pub(super) unsafe fn gather<P: Param>(
        g: &[P],
        mask: &[u8],
        buf: &mut [f32],
        ahead: Option<Ahead>,
    ) -> usize {
        let bytes = g.len() / 8;
        assert!(buf.len() >= g.len() + 8);
        let mut n = 0;
        for (b, &byte) in mask[..bytes].iter().enumerate() {
            if let Some(ahead) = ahead {
                ahead.touch(8 * b);
            }
            let packed = _mm256_permutevar8x32_ps(
                load8(&g[8 * b..8 * b + 8]),
                indices(&TABLES.0[byte as usize]),
            );
            // A full-width store: the lanes past the active ones are overwritten next.
            _mm256_storeu_ps(buf.as_mut_ptr().add(n), packed);
            n += byte.count_ones() as usize;
        }
        let done = 8 * bytes;
        n + gather_bits(&g[done..], &mask[bytes..], &mut buf[n..])
    }

    #[target_feature(enable = "avx2,fma,popcnt")]
    pub(super) unsafe fn scatter<P: Param>(
        p: &mut [P],
        mask: &[u8],
        steps: &mut [f32],
        decay: f32,
        ahead: Option<Ahead>,
    ) {
        let bytes = p.len() / 8;
        let decay_v = _mm256_set1_ps(decay);
        let lane_bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        let mut n = 0;
        for (b, &byte) in mask[..bytes].iter().enumerate() {
            if let Some(ahead) = ahead {
                ahead.touch(8 * b);
            }
            let r = 8 * b..8 * b + 8;
            let decayed = _mm256_mul_ps(load8(&p[r.clone()]), decay_v);
            let step = _mm256_permutevar8x32_ps(
                _mm256_loadu_ps(steps[n..n + 8].as_ptr()),
                indices(&TABLES.1[byte as usize]),
            );
            let marked = _mm256_and_si256(_mm256_set1_epi32(byte as i32), lane_bits);
            let active = _mm256_castsi256_ps(_mm256_cmpeq_epi32(marked, lane_bits));
            let stepped = _mm256_sub_ps(decayed, step);
            store8(&mut p[r], _mm256_blendv_ps(decayed, stepped, active));
            n += byte.count_ones() as usize;
        }
        let done = 8 * bytes;
        scatter_bits(&mut p[done..], &mask[bytes..], &mut steps[n..], decay)
    }
}
