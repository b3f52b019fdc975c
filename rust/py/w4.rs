//! W4 wrappers: quantize, pack / unpack (CPU layout), GEMV and block dequantization.

use numpy::{PyReadonlyArrayDyn, PyReadwriteArrayDyn};
use pyo3::prelude::*;

use super::{contiguous, contiguous_mut, run_detached};
use crate::simd;
use crate::w4::{self, PackedW4, Shape};

/// Stored codes [n, k] (0..15), scales and zeros [n, groups] of the float32 weight [n, k].
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn w4_quantize(
    py: Python<'_>,
    weight: PyReadonlyArrayDyn<'_, f32>,
    n: usize,
    k: usize,
    group_size: i64,
    zero_point: bool,
    mut codes: PyReadwriteArrayDyn<'_, u8>,
    mut scales: PyReadwriteArrayDyn<'_, f32>,
    mut zeros: PyReadwriteArrayDyn<'_, u8>,
) -> PyResult<()> {
    let op = "quantize_w4";
    let level = simd::active()?;
    let shape = Shape::new(op, n, k, group_size)?;
    let w = contiguous(op, "weight", &weight)?;
    let codes = contiguous_mut(op, "codes", &mut codes)?;
    let scales = contiguous_mut(op, "scales", &mut scales)?;
    let zeros = contiguous_mut(op, "zeros", &mut zeros)?;
    run_detached(py, op, || {
        w4::quantize(level, w, shape, zero_point, codes, scales, zeros)
    })
}

/// Packs stored codes [n, k] into the CPU layout (`unpack=True`: the reverse).
#[pyfunction]
#[pyo3(signature = (codes, packed, n, k, unpack=false))]
fn w4_pack(
    py: Python<'_>,
    mut codes: PyReadwriteArrayDyn<'_, u8>,
    mut packed: PyReadwriteArrayDyn<'_, u8>,
    n: usize,
    k: usize,
    unpack: bool,
) -> PyResult<()> {
    let op = "quantize_w4";
    let shape = Shape::new(op, n, k, -1)?;
    let codes = contiguous_mut(op, "codes", &mut codes)?;
    let packed = contiguous_mut(op, "packed", &mut packed)?;
    run_detached(py, op, || {
        if unpack {
            w4::unpack(packed, shape, codes)
        } else {
            w4::pack(codes, shape, packed)
        }
    })
}

/// The packed weight over the caller's arrays.
fn packed_weight<'a>(
    op: &str,
    packed: &'a PyReadonlyArrayDyn<'_, u8>,
    scales: &'a PyReadonlyArrayDyn<'_, f32>,
    zeros: &'a PyReadonlyArrayDyn<'_, u8>,
    shape: (usize, usize, i64),
) -> PyResult<PackedW4<'a>> {
    let (n, k, group_size) = shape;
    Ok(PackedW4 {
        packed: contiguous(op, "packed", packed)?,
        scales: contiguous(op, "scales", scales)?,
        zeros: contiguous(op, "zeros", zeros)?,
        shape: Shape::new(op, n, k, group_size)?,
    })
}

/// y [m, n] = x [m, k] · Wᵀ (group size a multiple of 32).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn w4_gemv(
    py: Python<'_>,
    packed: PyReadonlyArrayDyn<'_, u8>,
    scales: PyReadonlyArrayDyn<'_, f32>,
    zeros: PyReadonlyArrayDyn<'_, u8>,
    n: usize,
    k: usize,
    group_size: i64,
    x: PyReadonlyArrayDyn<'_, f32>,
    mut y: PyReadwriteArrayDyn<'_, f32>,
) -> PyResult<()> {
    let op = "w4a16_matmul";
    let level = simd::active()?;
    let w = packed_weight(op, &packed, &scales, &zeros, (n, k, group_size))?;
    let x = contiguous(op, "x", &x)?;
    let y = contiguous_mut(op, "y", &mut y)?;
    run_detached(py, op, || w4::gemv(level, &w, x, y))
}

/// Rows row0..row1 of W as float32 into `out` [row1 - row0, k].
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn w4_dequantize(
    py: Python<'_>,
    packed: PyReadonlyArrayDyn<'_, u8>,
    scales: PyReadonlyArrayDyn<'_, f32>,
    zeros: PyReadonlyArrayDyn<'_, u8>,
    n: usize,
    k: usize,
    group_size: i64,
    row0: usize,
    row1: usize,
    mut out: PyReadwriteArrayDyn<'_, f32>,
) -> PyResult<()> {
    let op = "dequantize";
    let level = simd::active()?;
    let w = packed_weight(op, &packed, &scales, &zeros, (n, k, group_size))?;
    let out = contiguous_mut(op, "out", &mut out)?;
    run_detached(py, op, || w4::dequantize(level, &w, row0..row1, out))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(w4_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(w4_pack, m)?)?;
    m.add_function(wrap_pyfunction!(w4_gemv, m)?)?;
    m.add_function(wrap_pyfunction!(w4_dequantize, m)?)?;
    Ok(())
}
