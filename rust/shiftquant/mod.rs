//! ShiftQuant (docs/definitions.md): sub-8-bit integer codes with one float32 scale per row and
//! a power-of-two refinement (a "shift") per group of the reduction axis, and the integer GEMM
//! on such codes.

mod gemm;
mod quantize;

pub use gemm::{matmul, pack_weight, packed_weight_bytes, GemmOperand, Output};
pub use quantize::{
    dequantize, quantize_cols, quantize_rows, shift_of, Codes, Element, Rounding, Spec,
};

/// The largest shift: groups that are all zero (or 2^15 times smaller than the row) get it.
pub const MAX_SHIFT: u8 = 15;

/// The number of groups of `group_size` covering `len` elements (the last one may be short).
pub fn num_groups(len: usize, group_size: usize) -> usize {
    len.div_ceil(group_size)
}
