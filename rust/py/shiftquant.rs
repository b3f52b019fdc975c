//! ShiftQuant wrappers: quantize, dequantize, integer GEMM.

use pyo3::prelude::*;

use super::run_detached;
use super::tensor::{Borrows, Float};
use crate::error::{FgError, FgResult};
use crate::shiftquant::{self, Codes, Element, GemmOperand, Rounding, Spec};
use crate::simd::{self, Bf16, SimdLevel};

/// Quantizes `x` into `codes`, `scale`, `shifts` along the reduction length `len`: x is
/// [rows, len], or with `transposed` [len, cols] (output row c is column c). `seed` None rounds
/// to nearest, else stochastically. x is float32 or bfloat16.
/// `col_sums` (float32 [cols], with `transposed` only) receives the sums of x's columns.
#[pyfunction]
#[pyo3(signature = (x, codes, scale, shifts, len, bits, group_size, seed=None, transposed=false, col_sums=None))]
#[allow(clippy::too_many_arguments)]
fn shiftquant_quantize(
    py: Python<'_>,
    x: Bound<'_, PyAny>,
    codes: Bound<'_, PyAny>,
    scale: Bound<'_, PyAny>,
    shifts: Bound<'_, PyAny>,
    len: usize,
    bits: u32,
    group_size: usize,
    seed: Option<u64>,
    transposed: bool,
    col_sums: Option<Bound<'_, PyAny>>,
) -> PyResult<()> {
    let op = "shiftquant";
    let rounding = seed.map_or(Rounding::Nearest, |seed| Rounding::Stochastic { seed });
    let spec = Spec::new(op, bits, group_size, rounding)?;
    let level = simd::active()?;
    let mut args = Borrows::new(op);
    fn run<T: Element>(
        level: SimdLevel,
        x: &[T],
        (len, spec): (usize, &Spec),
        out: Codes<'_>,
        transposed: bool,
        col_sums: Option<&mut [f32]>,
    ) -> FgResult<()> {
        if transposed {
            shiftquant::quantize_cols(level, x, len, spec, out, col_sums)
        } else {
            shiftquant::quantize_rows(level, x, len, spec, out)
        }
    }
    if col_sums.is_some() && !transposed {
        return Err(FgError::Value(format!("{op}: col_sums needs transposed=True")).into());
    }
    let bf16 = matches!(Float::of(&x)?, Float::Bf16);
    let (x32, x16): (&[f32], &[Bf16]) = if bf16 {
        (&[][..], args.read("x", &x)?)
    } else {
        (args.read("x", &x)?, &[][..])
    };
    let out = Codes {
        codes: args.write("codes", &codes)?,
        scale: args.write("scale", &scale)?,
        shifts: args.write("shifts", &shifts)?,
    };
    let col_sums = args.write_opt("col_sums", &col_sums)?;
    run_detached(py, op, || {
        if bf16 {
            run(level, x16, (len, &spec), out, transposed, col_sums)
        } else {
            run(level, x32, (len, &spec), out, transposed, col_sums)
        }
    })
}

/// codes * scale * 2^-shifts into `out`.
#[pyfunction]
fn shiftquant_dequantize(
    py: Python<'_>,
    codes: Bound<'_, PyAny>,
    scale: Bound<'_, PyAny>,
    shifts: Bound<'_, PyAny>,
    group_size: usize,
    out: Bound<'_, PyAny>,
) -> PyResult<()> {
    let op = "dequantize";
    let level = simd::active()?;
    let mut args = Borrows::new(op);
    let codes = args.read("codes", &codes)?;
    let scale = args.read("scale", &scale)?;
    let shifts = args.read("shifts", &shifts)?;
    let out = args.write("out", &out)?;
    run_detached(py, op, || {
        shiftquant::dequantize(level, codes, scale, shifts, group_size, out)
    })
}

/// `out` [M, N] = A · Bᵀ (+ bias) for operands quantized along K; out is float32, or bfloat16
/// (the f32 results rounded to nearest even). `packed_b` (uint8, from `shiftquant_pack_weight`
/// of this B) spares the call packing B.
#[pyfunction]
#[pyo3(signature = (a_codes, a_scale, a_shifts, b_codes, b_scale, b_shifts, k, group_size, out, bias=None, packed_b=None))]
#[allow(clippy::too_many_arguments)]
fn shiftquant_matmul(
    py: Python<'_>,
    a_codes: Bound<'_, PyAny>,
    a_scale: Bound<'_, PyAny>,
    a_shifts: Bound<'_, PyAny>,
    b_codes: Bound<'_, PyAny>,
    b_scale: Bound<'_, PyAny>,
    b_shifts: Bound<'_, PyAny>,
    k: usize,
    group_size: usize,
    out: Bound<'_, PyAny>,
    bias: Option<Bound<'_, PyAny>>,
    packed_b: Option<Bound<'_, PyAny>>,
) -> PyResult<()> {
    let op = "shiftquant_matmul";
    let level = simd::active()?;
    let mut args = Borrows::new(op);
    let a = GemmOperand {
        codes: args.read("a.codes", &a_codes)?,
        scale: args.read("a.scale", &a_scale)?,
        shifts: args.read("a.shifts", &a_shifts)?,
    };
    let b = GemmOperand {
        codes: args.read("b.codes", &b_codes)?,
        scale: args.read("b.scale", &b_scale)?,
        shifts: args.read("b.shifts", &b_shifts)?,
    };
    let bias = args.read_opt("bias", &bias)?;
    let packed: Option<&[u8]> = args.read_opt("packed_b", &packed_b)?;
    if matches!(Float::of(&out)?, Float::Bf16) {
        let out: &mut [Bf16] = args.write("out", &out)?;
        run_detached(py, op, || {
            shiftquant::matmul(level, &a, &b, packed, k, group_size, bias, out)
        })
    } else {
        let out: &mut [f32] = args.write("out", &out)?;
        run_detached(py, op, || {
            shiftquant::matmul(level, &a, &b, packed, k, group_size, bias, out)
        })
    }
}

/// The bytes `shiftquant_pack_weight` writes for an N x K weight on this CPU.
#[pyfunction]
fn shiftquant_packed_weight_bytes(n: usize, k: usize, group_size: usize) -> PyResult<usize> {
    Ok(shiftquant::packed_weight_bytes(
        simd::active()?,
        n,
        k,
        group_size,
    )?)
}

/// Packs a weight [N, K] quantized along K into `out` (uint8, `shiftquant_packed_weight_bytes`
/// long): `shiftquant_matmul`'s `packed_b` for it as B.
#[pyfunction]
fn shiftquant_pack_weight(
    py: Python<'_>,
    codes: Bound<'_, PyAny>,
    scale: Bound<'_, PyAny>,
    shifts: Bound<'_, PyAny>,
    k: usize,
    group_size: usize,
    out: Bound<'_, PyAny>,
) -> PyResult<()> {
    let op = "shiftquant_pack_weight";
    let level = simd::active()?;
    let mut args = Borrows::new(op);
    let weight = GemmOperand {
        codes: args.read("codes", &codes)?,
        scale: args.read("scale", &scale)?,
        shifts: args.read("shifts", &shifts)?,
    };
    let out = args.write("out", &out)?;
    run_detached(py, op, || {
        shiftquant::pack_weight(level, &weight, k, group_size, out)
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(shiftquant_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(shiftquant_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(shiftquant_matmul, m)?)?;
    m.add_function(wrap_pyfunction!(shiftquant_packed_weight_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(shiftquant_pack_weight, m)?)?;
    Ok(())
}
