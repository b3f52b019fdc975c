//! A weight packed ahead of time: GEMM operand B in the micro-kernel's panels, kept by a layer
//! that multiplies by the same weight many times (ShiftQuantLinear's weight-codes cache), so
//! that a call packs only A. At a few tokens packing B is most of the GEMM (8 x 4096 x 4096,
//! one Zen 4 core: 45% of the samples, the micro-kernel 19%).
//!
//! One byte string, so that a torch uint8 tensor holds it: a header of `WORDS` native-endian
//! u32 (magic, format, N, K, group size, max |b|) padded to `HEADER` bytes, then B's panel bytes,
//! its per-(group, column) powers of two (f32) and minus its group sums of codes (i32), each
//! region starting on a multiple of 64 bytes.

use std::borrow::Cow;

use super::{
    check_group_size, max_abs_code, pack, Buffers, GemmOperand, Kernel, Packed, Plan, MAX_CODE,
};
use crate::error::{FgError, FgResult};
use crate::simd::SimdLevel;

const MAGIC: u32 = u32::from_le_bytes(*b"SQpw");
const WORDS: usize = 6;
const HEADER: usize = 64;
const ALIGN: usize = 64;

/// How a level's kernels store B: panel width and byte offset. Every kernel of a level packs B
/// alike (only A's layout depends on the codes), which a test checks.
fn format(kernel: &Kernel) -> u32 {
    kernel.nr as u32 | u32::from(kernel.b_offset) << 8
}

/// Lengths of the three regions (panel bytes, and f32 / i32 entries of the metadata) of an N-row
/// B in panels of `nr`.
fn regions(plan: &Plan, n: usize, nr: usize) -> (usize, usize) {
    let layout = plan.layout(n, nr);
    let meta = layout.panels * plan.steps.len() * nr;
    (layout.panels * layout.quads * nr * 4, meta)
}

fn total_bytes((data, meta): (usize, usize)) -> usize {
    HEADER + data.next_multiple_of(ALIGN) + 2 * (4 * meta).next_multiple_of(ALIGN)
}

/// The bytes `pack_weight` writes for an N x K weight at this SIMD level.
pub fn packed_weight_bytes(
    level: SimdLevel,
    n: usize,
    k: usize,
    group_size: usize,
) -> FgResult<usize> {
    check_group_size("shiftquant_pack_weight", group_size)?;
    let kernel = Kernel::select(level, MAX_CODE, MAX_CODE);
    Ok(total_bytes(regions(
        &Plan::new(k, group_size),
        n,
        kernel.nr,
    )))
}

/// Packs the weight `b` [N, K] (quantized along K) as `matmul`'s `packed_b` for this SIMD level.
pub fn pack_weight(
    level: SimdLevel,
    b: &GemmOperand<'_>,
    k: usize,
    group_size: usize,
    out: &mut [u8],
) -> FgResult<()> {
    let op = "shiftquant_pack_weight";
    check_group_size(op, group_size)?;
    b.check("weight", k, group_size)?;
    let max_b = max_abs_code(level, b.codes);
    if max_b > MAX_CODE {
        return Err(FgError::Value(format!(
            "{op}: weight.codes must lie in [-{MAX_CODE}, {MAX_CODE}], got -128"
        )));
    }
    let n = b.rows();
    let kernel = Kernel::select(level, MAX_CODE, max_b);
    let plan = Plan::new(k, group_size);
    let (data_len, meta) = regions(&plan, n, kernel.nr);
    if out.len() != total_bytes((data_len, meta)) {
        return Err(FgError::Value(format!(
            "{op}: out must hold {} bytes, got {}",
            total_bytes((data_len, meta)),
            out.len()
        )));
    }
    // The sums are stored for an A offset of 1: a call's kernel scales them by its own.
    let layout = plan.layout(n, kernel.nr);
    let packed = pack(
        b,
        (k, group_size),
        layout,
        (kernel.b_offset, 1),
        Buffers::EMPTY,
        false,
    );
    let words = [
        MAGIC,
        format(&kernel),
        n as u32,
        k as u32,
        group_size as u32,
        max_b,
    ];
    let (header, rest) = out.split_at_mut(HEADER);
    header.fill(0);
    for (o, w) in header.chunks_exact_mut(4).zip(words) {
        o.copy_from_slice(&w.to_ne_bytes());
    }
    let (data, rest) = rest.split_at_mut(data_len.next_multiple_of(ALIGN));
    let (pow, corr) = rest.split_at_mut((4 * meta).next_multiple_of(ALIGN));
    for (o, &q) in data.iter_mut().zip(packed.data.iter()) {
        *o = q as u8;
    }
    for (o, p) in pow.chunks_exact_mut(4).zip(packed.pow.iter()) {
        o.copy_from_slice(&p.to_ne_bytes());
    }
    for (o, c) in corr.chunks_exact_mut(4).zip(packed.corr.iter()) {
        o.copy_from_slice(&c.to_ne_bytes());
    }
    Ok(())
}

/// A `pack_weight` result, checked against the call's B and borrowed in place.
pub(super) struct Weight<'a> {
    format: u32,
    pub(super) max_b: u32,
    data: &'a [i8],
    pow: &'a [f32],
    /// -Σ_group qb per (group, column): the offset correction for an A offset of 1.
    sums: &'a [i32],
}

impl<'a> Weight<'a> {
    /// The packed weight in `bytes`, which must have been made for this B (N x K in groups of
    /// `group_size`): every length is checked, so that no content can lead a read astray.
    pub(super) fn parse(bytes: &'a [u8], n: usize, k: usize, group_size: usize) -> FgResult<Self> {
        let bad = |why: &str| Err(FgError::Value(format!("shiftquant_matmul: packed_b {why}")));
        if bytes.len() < HEADER || !(bytes.as_ptr() as usize).is_multiple_of(4) {
            return bad("is not a packed weight (too short, or not 4-byte aligned)");
        }
        let word = |i: usize| u32::from_ne_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
        let [magic, format, wn, wk, wg, max_b]: [u32; WORDS] = std::array::from_fn(word);
        if magic != MAGIC {
            return bad("is not a packed weight");
        }
        if (wn as usize, wk as usize, wg as usize) != (n, k, group_size) {
            return bad(&format!(
                "was packed for {wn} x {wk} in groups of {wg}, not {n} x {k} in groups of {group_size}"
            ));
        }
        let nr = (format & 0xff) as usize;
        if ![8, 16, 32].contains(&nr) || max_b > MAX_CODE {
            return bad("has a corrupt header");
        }
        let (data_len, meta) = regions(&Plan::new(k, group_size), n, nr);
        if bytes.len() != total_bytes((data_len, meta)) {
            return bad("has the wrong length");
        }
        let data_at = HEADER;
        let pow_at = data_at + data_len.next_multiple_of(ALIGN);
        let sums_at = pow_at + (4 * meta).next_multiple_of(ALIGN);
        // SAFETY: the regions lie inside `bytes` (its length was checked against them), start
        // 4-byte aligned (the base is, the offsets are multiples of 64), and every bit pattern
        // is a valid i8, f32 and i32.
        let (data, pow, sums) = unsafe {
            let at = |o: usize| bytes.as_ptr().add(o);
            (
                std::slice::from_raw_parts(at(data_at).cast::<i8>(), data_len),
                std::slice::from_raw_parts(at(pow_at).cast::<f32>(), meta),
                std::slice::from_raw_parts(at(sums_at).cast::<i32>(), meta),
            )
        };
        Ok(Weight {
            format,
            max_b,
            data,
            pow,
            sums,
        })
    }

    /// B as `kernel` reads it, or None where the weight was packed for another SIMD level (then
    /// the call packs B from its codes).
    pub(super) fn packed(&self, kernel: &Kernel, plan: &Plan, n: usize) -> Option<Packed<'a>> {
        if format(kernel) != self.format {
            return None;
        }
        // Only kernels that store A offset (`Kernel::a_offset` > 0) read B's corrections. A real
        // weight's products fit in i32 (|Σ| <= group size x 127, offset <= 128); wrapping keeps
        // corrupt bytes a wrong result rather than an overflow panic.
        let corr = match i32::from(kernel.a_offset) {
            0 => Cow::Borrowed(self.sums),
            offset => Cow::Owned(self.sums.iter().map(|&s| s.wrapping_mul(offset)).collect()),
        };
        Some(Packed {
            layout: plan.layout(n, kernel.nr),
            meta: plan.steps.len() * kernel.nr,
            data: Cow::Borrowed(self.data),
            pow: Cow::Borrowed(self.pow),
            corr,
        })
    }
}
