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
//! paths walk the set bits.

use super::{steps_in_place, Param, StepScalars, BLOCK};

/// Parameters per gather / update / scatter round (a multiple of 16): the chunk of p and g and
/// the buffer stay in L1 between the rounds.
pub(super) const CHUNK: usize = 1024;

/// How a backend moves the active coordinates of a chunk in and out of the buffer.
pub(super) trait Sparse {
    /// Writes the active entries of `g` (as f32, mask order) to the front of `buf` (at least
    /// `g.len() + 16` long); returns how many.
    #[inline(always)]
    unsafe fn gather<P: Param>(g: &[P], mask: &[u8], buf: &mut [f32]) -> usize {
        gather_bits(g, mask, buf)
    }

    /// `p` becomes `p * decay` off the mask and `p * decay - step` on it (`steps` in mask
    /// order, at least 16 past the last one readable).
    #[inline(always)]
    unsafe fn scatter<P: Param>(p: &mut [P], mask: &[u8], steps: &mut [f32], decay: f32) {
        scatter_bits(p, mask, steps, decay)
    }
}

impl Sparse for crate::simd::Scalar {}

#[cfg(target_arch = "x86_64")]
impl Sparse for crate::simd::Avx2 {}

#[cfg(target_arch = "x86_64")]
impl Sparse for crate::simd::Avx512 {
    #[inline(always)]
    unsafe fn gather<P: Param>(g: &[P], mask: &[u8], buf: &mut [f32]) -> usize {
        avx512::gather(g, mask, buf)
    }

    #[inline(always)]
    unsafe fn scatter<P: Param>(p: &mut [P], mask: &[u8], steps: &mut [f32], decay: f32) {
        avx512::scatter(p, mask, steps, decay)
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
    let mut buf = [0.0f32; CHUNK + BLOCK];
    let mut j = 0;
    for (c, (pc, gc)) in p.chunks_mut(CHUNK).zip(g.chunks(CHUNK)).enumerate() {
        let mc = &mask[c * CHUNK / 8..][..pc.len().div_ceil(8)];
        let n = S::gather(gc, mc, &mut buf);
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
        S::scatter(pc, mc, &mut buf, s.decay);
        j += n;
    }
}

/// The set bits of mask byte `b` that fall inside `len` elements.
#[inline(always)]
fn byte_bits(mask: &[u8], b: usize, len: usize) -> u32 {
    let valid = (len - 8 * b).min(8);
    mask[b] as u32 & ((1u32 << valid) - 1)
}

/// Calls `f(i, n)` for the n-th set bit i of `mask` within `len` elements.
#[inline(always)]
fn for_each_active(mask: &[u8], len: usize, mut f: impl FnMut(usize, usize)) {
    let mut n = 0;
    for b in 0..len.div_ceil(8) {
        let mut bits = byte_bits(mask, b, len);
        while bits != 0 {
            f(8 * b + bits.trailing_zeros() as usize, n);
            bits &= bits - 1;
            n += 1;
        }
    }
}

#[inline(always)]
fn gather_bits<P: Param>(g: &[P], mask: &[u8], buf: &mut [f32]) -> usize {
    let mut count = 0;
    for_each_active(mask, g.len(), |i, n| {
        buf[n] = g[i].to_f32();
        count = n + 1;
    });
    count
}

#[inline(always)]
fn scatter_bits<P: Param>(p: &mut [P], mask: &[u8], steps: &mut [f32], decay: f32) {
    if decay == 1.0 {
        // Inactive coordinates do not change: visit the set bits only.
        for_each_active(mask, p.len(), |i, n| {
            p[i] = P::from_f32(p[i].to_f32() * decay - steps[n])
        });
        return;
    }
    // The new active values first (from the old p), then every coordinate decayed
    // (vectorized), then the active ones overwritten.
    for_each_active(mask, p.len(), |i, n| {
        steps[n] = p[i].to_f32() * decay - steps[n]
    });
    for x in p.iter_mut() {
        *x = P::from_f32(x.to_f32() * decay);
    }
    for_each_active(mask, p.len(), |i, n| p[i] = P::from_f32(steps[n]));
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
    pub(super) unsafe fn gather<P: Param>(g: &[P], mask: &[u8], buf: &mut [f32]) -> usize {
        let blocks = g.len() / 16;
        let block_bits = &mask[..2 * blocks];
        assert!(buf.len() >= g.len() + 16);
        let mut n = 0;
        for blk in 0..blocks {
            let k = bits16(block_bits, blk);
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
    ) {
        let blocks = p.len() / 16;
        let decay_v = _mm512_set1_ps(decay);
        let mut n = 0;
        for blk in 0..blocks {
            let k = bits16(mask, blk);
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
