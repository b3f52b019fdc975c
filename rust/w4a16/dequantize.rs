//! The packed weight back to float32, row by row (the path for more rows of x than the GEMV
//! takes).

use super::{packed_row_bytes, PackedW4, Shape, BLOCK, BLOCK_BYTES, PAR_MIN};
use crate::error::{FgError, FgResult};
use crate::simd::{Simd, SimdLevel};
use crate::threads::{self, Disjoint};

impl PackedW4<'_> {
    /// Row n dequantized into `out` (k floats; the tail of the last block is dropped).
    #[inline(always)]
    pub(super) fn dequantize_row(&self, n: usize, out: &mut [f32]) {
        let s = self.shape;
        let row_bytes = packed_row_bytes(s.k);
        let packed = &self.packed[n * row_bytes..(n + 1) * row_bytes];
        let groups = s.groups();
        let (scales, zeros) = (
            &self.scales.as_f32()[n * groups..],
            &self.zeros[n * groups..],
        );
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

crate::dispatch! {
    fn dequantize_rows(w: &PackedW4<'_>, rows: std::ops::Range<usize>, out: &mut [f32]) = dequantize_rows_impl;
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
        let mut buf = Vec::new();
        let part = w.part(rows.start + r.start..rows.start + r.end, &mut buf);
        dequantize_rows(level, &part, 0..r.len(), piece);
    });
    Ok(())
}
