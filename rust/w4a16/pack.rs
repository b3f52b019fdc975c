//! The CPU layout (see mod.rs): one row of stored codes to packed bytes, and a code back.

use super::{BLOCK, BLOCK_BYTES};

/// Packs one row of stored codes (0..15), padded with 0 to whole blocks, into its packed bytes.
pub(super) fn pack_row(codes: &[u8], packed: &mut [u8]) {
    for (codes, out) in codes
        .chunks_exact(BLOCK)
        .zip(packed.chunks_exact_mut(BLOCK_BYTES))
    {
        let (low, high) = codes.split_at(BLOCK_BYTES);
        for ((byte, &l), &h) in out.iter_mut().zip(low).zip(high) {
            *byte = l | (h << 4);
        }
    }
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
