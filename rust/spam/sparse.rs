//! The sparse-momentum step: per chunk of [`CHUNK`] parameters, gather the active p and g (in
//! mask order) into two small buffers, run the dense update on them with the compact moments,
//! scatter the new p back over the decayed chunk. The arithmetic runs vectorized on the active
//! coordinates only, and the step moves p, g and the mask once plus the compact moments:
//! 12.125 + 16 * density bytes per float32 parameter against the dense step's 28.
//!
//! AVX-512 gathers with register-to-register `vcompressps` and scatters with register
//! `vexpandps` (written as asm: LLVM folds a load into `vexpandps zmm{k}, [mem]`, and the memory
//! forms of compress / expand are microcoded on AMD Zen 4 / 5, ~100 cycles each); the other
//! paths walk the set bits.

use super::{dense_step_impl, Param, StepScalars};

/// Parameters per gather / update / scatter round (a multiple of 16): the chunk of p and g and
/// the buffers stay in L1 between the rounds.
pub(super) const CHUNK: usize = 1024;

/// How a backend moves the active coordinates of a chunk in and out of the buffers.
pub(super) trait Sparse {
    /// Writes the active `p` and `g` (as f32, mask order) to the fronts of `bp` and `bg`
    /// (each at least `p.len() + 16` long); returns how many.
    #[inline(always)]
    unsafe fn gather<P: Param>(
        p: &[P],
        g: &[P],
        mask: &[u8],
        bp: &mut [f32],
        bg: &mut [f32],
    ) -> usize {
        gather_bits(p, g, mask, bp, bg)
    }

    /// `p` becomes `p * decay` off the mask and `stepped` (mask order) on it.
    #[inline(always)]
    unsafe fn scatter<P: Param>(p: &mut [P], mask: &[u8], stepped: &[f32], decay: f32) {
        scatter_bits(p, mask, stepped, decay)
    }
}

impl Sparse for crate::simd::Scalar {}

#[cfg(target_arch = "x86_64")]
impl Sparse for crate::simd::Avx2 {}

#[cfg(target_arch = "x86_64")]
impl Sparse for crate::simd::Avx512 {
    #[inline(always)]
    unsafe fn gather<P: Param>(
        p: &[P],
        g: &[P],
        mask: &[u8],
        bp: &mut [f32],
        bg: &mut [f32],
    ) -> usize {
        avx512::gather(p, g, mask, bp, bg)
    }

    #[inline(always)]
    unsafe fn scatter<P: Param>(p: &mut [P], mask: &[u8], stepped: &[f32], decay: f32) {
        avx512::scatter(p, mask, stepped, decay)
    }
}

/// The step over one part: `mask` covers `p`, the moments are the part's compact ones.
#[inline(always)]
pub(super) unsafe fn step<S: Sparse, P: Param>(
    p: &mut [P],
    g: &[P],
    mask: &[u8],
    m: &mut [f32],
    v: &mut [f32],
    s: &StepScalars,
) {
    let mut bp = [0.0f32; CHUNK + 16];
    let mut bg = [0.0f32; CHUNK + 16];
    let mut j = 0;
    for (c, (pc, gc)) in p.chunks_mut(CHUNK).zip(g.chunks(CHUNK)).enumerate() {
        let mc = &mask[c * CHUNK / 8..][..pc.len().div_ceil(8)];
        let n = S::gather(pc, gc, mc, &mut bp, &mut bg);
        let (mj, vj) = (&mut m[j..j + n], &mut v[j..j + n]);
        dense_step_impl::<S, f32>(&mut bp[..n], &bg[..n], mj, vj, s);
        S::scatter(pc, mc, &bp[..n], s.decay);
        j += n;
    }
}

/// The set bits of mask byte `b` that fall inside `len` elements.
#[inline(always)]
fn byte_bits(mask: &[u8], b: usize, len: usize) -> u32 {
    let valid = (len - 8 * b).min(8);
    mask[b] as u32 & ((1u32 << valid) - 1)
}

#[inline(always)]
fn gather_bits<P: Param>(p: &[P], g: &[P], mask: &[u8], bp: &mut [f32], bg: &mut [f32]) -> usize {
    let mut n = 0;
    for b in 0..p.len().div_ceil(8) {
        let mut bits = byte_bits(mask, b, p.len());
        while bits != 0 {
            let i = 8 * b + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            (bp[n], bg[n]) = (p[i].to_f32(), g[i].to_f32());
            n += 1;
        }
    }
    n
}

#[inline(always)]
fn scatter_bits<P: Param>(p: &mut [P], mask: &[u8], stepped: &[f32], decay: f32) {
    if decay != 1.0 {
        // Every coordinate first (vectorized); the active ones are overwritten below.
        for x in p.iter_mut() {
            *x = P::from_f32(x.to_f32() * decay);
        }
    }
    let mut n = 0;
    for b in 0..p.len().div_ceil(8) {
        let mut bits = byte_bits(mask, b, p.len());
        while bits != 0 {
            let i = 8 * b + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            p[i] = P::from_f32(stepped[n]);
            n += 1;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::asm;
    use std::arch::x86_64::*;

    use super::{gather_bits, scatter_bits, Param};

    /// 16 elements as f32 lanes (a plain load for f32; bf16 widens in registers).
    #[inline(always)]
    unsafe fn load16<P: Param>(x: &[P]) -> __m512 {
        let mut lanes = [0.0f32; 16];
        for (l, v) in lanes.iter_mut().zip(&x[..16]) {
            *l = v.to_f32();
        }
        _mm512_loadu_ps(lanes.as_ptr())
    }

    #[inline(always)]
    unsafe fn store16<P: Param>(x: &mut [P], v: __m512) {
        let mut lanes = [0.0f32; 16];
        _mm512_storeu_ps(lanes.as_mut_ptr(), v);
        for (o, l) in x[..16].iter_mut().zip(lanes) {
            *o = P::from_f32(l);
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

    /// `base` with the lanes selected by `k` replaced by the front lanes of `v` in order.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn expand(base: __m512, k: u16, v: __m512) -> __m512 {
        let mut out = base;
        asm!(
            "vexpandps {out}{{{k}}}, {v}",
            out = inout(zmm_reg) out, k = in(kreg) k, v = in(zmm_reg) v,
            options(pure, nomem, nostack, preserves_flags),
        );
        out
    }

    #[inline(always)]
    fn bits16(mask: &[u8], block: usize) -> u16 {
        u16::from_le_bytes([mask[2 * block], mask[2 * block + 1]])
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
    pub(super) unsafe fn gather<P: Param>(
        p: &[P],
        g: &[P],
        mask: &[u8],
        bp: &mut [f32],
        bg: &mut [f32],
    ) -> usize {
        let blocks = p.len() / 16;
        assert!(bp.len() >= p.len() + 16 && bg.len() >= p.len() + 16);
        let mut n = 0;
        for blk in 0..blocks {
            let k = bits16(mask, blk);
            let r = 16 * blk..16 * blk + 16;
            let (pv, gv) = (load16(&p[r.clone()]), load16(&g[r]));
            // Full-width stores: the lanes past the active ones are overwritten next.
            _mm512_storeu_ps(bp.as_mut_ptr().add(n), compress(k, pv));
            _mm512_storeu_ps(bg.as_mut_ptr().add(n), compress(k, gv));
            n += k.count_ones() as usize;
        }
        let done = 16 * blocks;
        n + gather_bits(
            &p[done..],
            &g[done..],
            &mask[done / 8..],
            &mut bp[n..],
            &mut bg[n..],
        )
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
    pub(super) unsafe fn scatter<P: Param>(p: &mut [P], mask: &[u8], stepped: &[f32], decay: f32) {
        let blocks = p.len() / 16;
        let decay_v = _mm512_set1_ps(decay);
        let mut n = 0;
        for blk in 0..blocks {
            let k = bits16(mask, blk);
            let r = 16 * blk..16 * blk + 16;
            let decayed = _mm512_mul_ps(load16(&p[r.clone()]), decay_v);
            let active = if n + 16 <= stepped.len() {
                _mm512_loadu_ps(stepped.as_ptr().add(n))
            } else {
                let rest = (stepped.len() - n) as u16;
                _mm512_maskz_loadu_ps(((1u32 << rest) - 1) as u16, stepped.as_ptr().add(n))
            };
            store16(&mut p[r], expand(decayed, k, active));
            n += k.count_ones() as usize;
        }
        let done = 16 * blocks;
        scatter_bits(&mut p[done..], &mask[done / 8..], &stepped[n..], decay)
    }
}
