//! ShiftQuant wrappers: quantize, dequantize, integer GEMM.

use numpy::{PyReadonlyArrayDyn, PyReadwriteArrayDyn};
use pyo3::prelude::*;

use super::{contiguous, contiguous_mut, run_detached};
use crate::shiftquant::{self, Codes, GemmOperand, Rounding, Spec};
use crate::simd;

/// Quantizes `x` into `codes`, `scale`, `shifts` along the reduction length `len`: x is
/// [rows, len], or with `transposed` [len, cols] (output row c is column c). `seed` None rounds
/// to nearest, else stochastically.
#[pyfunction]
#[pyo3(signature = (x, codes, scale, shifts, len, bits, group_size, seed=None, transposed=false))]
#[allow(clippy::too_many_arguments)]
fn shiftquant_quantize(
    py: Python<'_>,
    x: PyReadonlyArrayDyn<'_, f32>,
    mut codes: PyReadwriteArrayDyn<'_, i8>,
    mut scale: PyReadwriteArrayDyn<'_, f32>,
    mut shifts: PyReadwriteArrayDyn<'_, u8>,
    len: usize,
    bits: u32,
    group_size: usize,
    seed: Option<u64>,
    transposed: bool,
) -> PyResult<()> {
    let op = "shiftquant";
    let rounding = seed.map_or(Rounding::Nearest, |seed| Rounding::Stochastic { seed });
    let spec = Spec::new(op, bits, group_size, rounding)?;
    let level = simd::active()?;
    let x = contiguous(op, "x", &x)?;
    let out = Codes {
        codes: contiguous_mut(op, "codes", &mut codes)?,
        scale: contiguous_mut(op, "scale", &mut scale)?,
        shifts: contiguous_mut(op, "shifts", &mut shifts)?,
    };
    run_detached(py, op, || {
        if transposed {
            shiftquant::quantize_cols(level, x, len, &spec, out)
        } else {
            shiftquant::quantize_rows(level, x, len, &spec, out)
        }
    })
}

/// codes * scale * 2^-shifts into `out`.
#[pyfunction]
fn shiftquant_dequantize(
    py: Python<'_>,
    codes: PyReadonlyArrayDyn<'_, i8>,
    scale: PyReadonlyArrayDyn<'_, f32>,
    shifts: PyReadonlyArrayDyn<'_, u8>,
    group_size: usize,
    mut out: PyReadwriteArrayDyn<'_, f32>,
) -> PyResult<()> {
    let op = "dequantize";
    let level = simd::active()?;
    let codes = contiguous(op, "codes", &codes)?;
    let scale = contiguous(op, "scale", &scale)?;
    let shifts = contiguous(op, "shifts", &shifts)?;
    let out = contiguous_mut(op, "out", &mut out)?;
    run_detached(py, op, || {
        shiftquant::dequantize(level, codes, scale, shifts, group_size, out)
    })
}

/// `out` [M, N] = A · Bᵀ (+ bias) for operands quantized along K.
#[pyfunction]
#[pyo3(signature = (a_codes, a_scale, a_shifts, b_codes, b_scale, b_shifts, k, group_size, out, bias=None))]
#[allow(clippy::too_many_arguments)]
fn shiftquant_matmul(
    py: Python<'_>,
    a_codes: PyReadonlyArrayDyn<'_, i8>,
    a_scale: PyReadonlyArrayDyn<'_, f32>,
    a_shifts: PyReadonlyArrayDyn<'_, u8>,
    b_codes: PyReadonlyArrayDyn<'_, i8>,
    b_scale: PyReadonlyArrayDyn<'_, f32>,
    b_shifts: PyReadonlyArrayDyn<'_, u8>,
    k: usize,
    group_size: usize,
    mut out: PyReadwriteArrayDyn<'_, f32>,
    bias: Option<PyReadonlyArrayDyn<'_, f32>>,
) -> PyResult<()> {
    let op = "shiftquant_matmul";
    let level = simd::active()?;
    let a = GemmOperand {
        codes: contiguous(op, "a.codes", &a_codes)?,
        scale: contiguous(op, "a.scale", &a_scale)?,
        shifts: contiguous(op, "a.shifts", &a_shifts)?,
    };
    let b = GemmOperand {
        codes: contiguous(op, "b.codes", &b_codes)?,
        scale: contiguous(op, "b.scale", &b_scale)?,
        shifts: contiguous(op, "b.shifts", &b_shifts)?,
    };
    let bias = bias
        .as_ref()
        .map(|v| contiguous(op, "bias", v))
        .transpose()?;
    let out = contiguous_mut(op, "out", &mut out)?;
    run_detached(py, op, || {
        shiftquant::matmul(level, &a, &b, k, group_size, bias, out)
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(shiftquant_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(shiftquant_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(shiftquant_matmul, m)?)?;
    Ok(())
}
