//! Stored codes to the CPU layout (see mod.rs) and back.

use super::{packed_row_bytes, Shape, BLOCK, BLOCK_BYTES, PAR_MIN};
use crate::error::{FgError, FgResult};
use crate::threads::{self, Disjoint};

/// Packs stored codes [n, k] into the CPU layout [n, packed_row_bytes(k)].
pub fn pack(codes: &[u8], shape: Shape, packed: &mut [u8]) -> FgResult<()> {
    let (k, row_bytes) = (shape.k, packed_row_bytes(shape.k));
    shape.check(
        "quantize_w4",
        &[
            ("codes", codes.len(), k),
            ("packed", packed.len(), row_bytes),
        ],
    )?;
    if let Some(bad) = codes.iter().find(|&&q| q > 15) {
        return Err(FgError::Value(format!(
            "quantize_w4: codes must be in 0..15, got {bad}"
        )));
    }
    let packed = Disjoint::new(packed);
    let per_task = threads::rows_per_task(shape.n, k, PAR_MIN);
    threads::for_each_chunk(shape.n, per_task, |_, r| {
        // SAFETY: the chunks are disjoint row ranges.
        let packed = unsafe { packed.piece(r.start * row_bytes..r.end * row_bytes) };
        let rows = codes[r.start * k..r.end * k].chunks(k);
        for (codes, packed) in rows.zip(packed.chunks_mut(row_bytes)) {
            for (b, out) in packed.chunks_exact_mut(BLOCK_BYTES).enumerate() {
                let code = |c: usize| codes.get(b * BLOCK + c).copied().unwrap_or(0);
                for (j, byte) in out.iter_mut().enumerate() {
                    *byte = code(j) | (code(j + BLOCK_BYTES) << 4);
                }
            }
        }
    });
    Ok(())
}

/// Unpacks the CPU layout back to stored codes [n, k].
pub fn unpack(packed: &[u8], shape: Shape, codes: &mut [u8]) -> FgResult<()> {
    let (k, row_bytes) = (shape.k, packed_row_bytes(shape.k));
    shape.check(
        "unpack_w4",
        &[
            ("packed", packed.len(), row_bytes),
            ("codes", codes.len(), k),
        ],
    )?;
    for (packed, codes) in packed.chunks(row_bytes).zip(codes.chunks_mut(k)) {
        for (c, q) in codes.iter_mut().enumerate() {
            *q = packed_code(packed, c);
        }
    }
    Ok(())
}

/// The stored code of column `c` in one packed row.
pub(super) fn packed_code(row: &[u8], c: usize) -> u8 {
    let byte = row[c / BLOCK * BLOCK_BYTES + c % BLOCK_BYTES];
    if c % BLOCK < BLOCK_BYTES {
        byte & 15
    } else {
        byte >> 4
    }
}
