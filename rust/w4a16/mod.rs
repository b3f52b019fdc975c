//! W4 weight-only quantization (docs/definitions.md) and the CPU W4A16 kernels.
//!
//! Codes are stored as unsigned nibbles 0..15 with a per-group zero: the group's zero point, or 8
//! for the symmetric scheme (whose codes -8..7 are stored as q + 8). A weight is then always
//! (q - zero) * scale, so one kernel serves both schemes.
//!
//! CPU layout ("packed"): row n of W [N, K] takes ceil(K / 64) blocks of 32 bytes; byte j of
//! block b holds the code of column 64b + j in its low nibble and of column 64b + 32 + j in its
//! high nibble (columns past K hold 0). Unpacking a block is then two masks and two widening
//! conversions, with the 64 columns in order.
//!
//! Files: quantize.rs (weights to packed codes), pack.rs (the CPU layout), dequantize.rs,
//! gemv.rs (the GEMV and GEMM drivers and the integer kernels' input), gemm.rs (the AVX-512
//! GEMM for more rows of x, by `vdpbf16ps` or float32 FMAs), and the GEMV kernels per ISA:
//! float.rs (every path; the only one on scalar), vnni.rs (AVX-512 VNNI), avx2.rs (AVX2
//! integer, also on AVX-512 without VNNI).

use crate::error::{FgError, FgResult};
use crate::simd::{self, Bf16, F16};

/// `$tile::<M>(args)` for M = `$m` rows of x (the callers pass 1 to 4).
#[cfg(target_arch = "x86_64")]
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

#[cfg(target_arch = "x86_64")]
mod avx2;
mod dequantize;
mod float;
#[cfg(target_arch = "x86_64")]
mod gemm;
mod gemv;
mod pack;
mod quantize;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod vnni;

pub use dequantize::dequantize;
pub use float::Nibbles;
pub use gemv::{gemm_arith, gemm_supported, gemv, matmul};
use gemv::{zero_term, IntInput};
pub use quantize::{quantize, Weight};

/// Columns per packed block.
pub const BLOCK: usize = 64;
/// Bytes per packed block.
pub const BLOCK_BYTES: usize = BLOCK / 2;
/// The stored zero of the symmetric scheme.
pub const SYMMETRIC_ZERO: u8 = 8;
/// Rows of x every GEMV kernel takes per pass over W (each packed block is unpacked once for
/// them). The VNNI kernel took 8, one row of W at a time: two passes of 4 rows, two rows of W
/// each, ran 1.5x faster at 8 rows of x (Zen 5, 4096 x 4096).
pub const MAX_ROWS: usize = 4;
/// Elements of W per parallel task.
const PAR_MIN: usize = 1 << 16;
/// Rows of W per part of the GEMV's work.
const MIN_ROWS_PER_PART: usize = 64;

/// Scale 0, inside the kernels, for the groups whose codes all equal their zero (all-zero
/// weights, stored with scale 1 by the rule; only a scale of exactly 1 is checked, the only one
/// such a group has). The GEMV kernels compute s Σ q x - s z Σ x per group and subtract over
/// the row: a null group added two equal terms of its scale, which could swallow every other
/// group of the row (the fuzz campaign: scales of 5.7e-31 beside one such group gave 0).
fn zero_null_groups(scales: &mut [f32], null: impl Fn(usize) -> bool) {
    if !any_one(scales) {
        return;
    }
    for (i, s) in scales.iter_mut().enumerate() {
        if *s == 1.0 && null(i) {
            *s = 0.0;
        }
    }
}

/// Whether a scale is exactly 1 (no early exit, so that the loop vectorizes).
fn any_one(scales: &[f32]) -> bool {
    scales.iter().fold(false, |found, &s| found | (s == 1.0))
}

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

    /// The group of each of `halves` half blocks (32 columns), so that kernels divide nothing.
    fn half_block_groups(&self, halves: usize) -> Vec<usize> {
        let last = self.groups() - 1;
        (0..halves)
            .map(|h| (h * BLOCK_BYTES / self.group_size).min(last))
            .collect()
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

/// The per-group scales in the type they are stored in (read as they are: no float32 copy per
/// call).
#[derive(Clone, Copy)]
pub enum Scales<'a> {
    F32(&'a [f32]),
    F16(&'a [F16]),
    Bf16(&'a [Bf16]),
}

impl Scales<'_> {
    pub fn len(&self) -> usize {
        match self {
            Scales::F32(s) => s.len(),
            Scales::F16(s) => s.len(),
            Scales::Bf16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Scale i as float32 (exact).
    #[inline(always)]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Scales::F32(s) => s[i],
            Scales::F16(s) => simd::f16_to_f32(s[i].0),
            Scales::Bf16(s) => simd::bf16_to_f32(s[i].0),
        }
    }

    /// The float32 scales of a [`PackedW4::part`] (the kernels index them directly).
    #[inline(always)]
    fn as_f32(&self) -> &[f32] {
        match self {
            Scales::F32(s) => s,
            _ => unreachable!("the kernels run on parts, whose scales are float32"),
        }
    }
}

/// The packed weight with its per-group parameters, as the kernels read it.
pub struct PackedW4<'a> {
    pub packed: &'a [u8],
    pub scales: Scales<'a>,
    pub zeros: &'a [u8],
    pub shape: Shape,
}

impl PackedW4<'_> {
    /// Rows `rows` of the weight as a weight of their own, with float32 scales (converted into
    /// `buf` where they are stored in 16 bits: a part's worth per call, not the weight's).
    fn part<'b>(&'b self, rows: std::ops::Range<usize>, buf: &'b mut Vec<f32>) -> PackedW4<'b> {
        let (s, groups, row_bytes) = (
            self.shape,
            self.shape.groups(),
            packed_row_bytes(self.shape.k),
        );
        let params = rows.start * groups..rows.end * groups;
        buf.resize(params.len(), 0.0);
        let null = |i: usize| self.null_group(rows.start + i / groups, i % groups);
        let scales: &[f32] = match self.scales {
            Scales::F32(all) if !any_one(&all[params.clone()]) => &all[params.clone()],
            Scales::F32(all) => {
                buf.copy_from_slice(&all[params.clone()]);
                zero_null_groups(buf, null);
                buf
            }
            Scales::F16(all) => {
                simd::f16_to_f32_slice(&all[params.clone()], buf);
                zero_null_groups(buf, null);
                buf
            }
            Scales::Bf16(all) => {
                for (d, &s) in buf.iter_mut().zip(&all[params.clone()]) {
                    *d = simd::bf16_to_f32(s.0);
                }
                zero_null_groups(buf, null);
                buf
            }
        };
        PackedW4 {
            packed: &self.packed[rows.start * row_bytes..rows.end * row_bytes],
            scales: Scales::F32(scales),
            zeros: &self.zeros[params],
            shape: Shape { n: rows.len(), ..s },
        }
    }

    /// Whether every code of group `g` of row `n` equals the group's zero (its weights are 0).
    fn null_group(&self, n: usize, g: usize) -> bool {
        let s = self.shape;
        let (row_bytes, zero) = (packed_row_bytes(s.k), self.zeros[n * s.groups() + g]);
        let row = &self.packed[n * row_bytes..(n + 1) * row_bytes];
        (g * s.group_size..((g + 1) * s.group_size).min(s.k))
            .all(|c| pack::packed_code(row, c) == zero)
    }

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
}

/// The rows of x as the caller holds them.
#[derive(Clone, Copy)]
pub enum Rows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [Bf16]),
}

impl Rows<'_> {
    pub fn len(&self) -> usize {
        match self {
            Rows::F32(x) => x.len(),
            Rows::Bf16(x) => x.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element i as float32.
    #[inline(always)]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Rows::F32(x) => x[i],
            Rows::Bf16(x) => simd::bf16_to_f32(x[i].0),
        }
    }
}
