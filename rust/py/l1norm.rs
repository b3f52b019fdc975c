//! L1 LayerNorm wrappers: float32 / float64 inputs, or float32 from ShiftQuant codes.

use numpy::{Element, PyReadonlyArrayDyn, PyReadwriteArrayDyn};
use pyo3::prelude::*;

use super::{contiguous, contiguous_mut, run_detached};
use crate::error::FgResult;
use crate::l1norm::{self, Affine, CodesIn, Grads, Input, Kernels, Stats};
use crate::simd;

type In<'py, T> = PyReadonlyArrayDyn<'py, T>;
type Out<'py, T> = PyReadwriteArrayDyn<'py, T>;

fn optional<'a, T: Element>(
    op: &str,
    name: &str,
    a: &'a Option<In<'_, T>>,
) -> FgResult<Option<&'a [T]>> {
    a.as_ref().map(|a| contiguous(op, name, a)).transpose()
}

#[allow(clippy::too_many_arguments)]
fn forward<T: Kernels + Element>(
    py: Python<'_>,
    x: Input<'_, T>,
    n: usize,
    eps: f64,
    weight: Option<In<'_, T>>,
    bias: Option<In<'_, T>>,
    mut y: Out<'_, T>,
    mut mean: Out<'_, T>,
    mut rstd: Out<'_, T>,
) -> PyResult<()> {
    let op = "l1_layer_norm";
    let level = simd::active()?;
    let affine = Affine {
        gamma: optional(op, "weight", &weight)?,
        beta: optional(op, "bias", &bias)?,
    };
    let y = contiguous_mut(op, "out", &mut y)?;
    let stats = Stats {
        mean: contiguous_mut(op, "mean", &mut mean)?,
        rstd: contiguous_mut(op, "rstd", &mut rstd)?,
    };
    run_detached(py, op, || {
        l1norm::forward(level, x, n, eps, affine, y, stats)
    })
}

#[allow(clippy::too_many_arguments)]
fn backward<T: Kernels + Element>(
    py: Python<'_>,
    x: Input<'_, T>,
    n: usize,
    mean: In<'_, T>,
    rstd: In<'_, T>,
    grad_out: In<'_, T>,
    weight: Option<In<'_, T>>,
    mut grad_in: Out<'_, T>,
    mut grad_weight: Option<Out<'_, T>>,
    mut grad_bias: Option<Out<'_, T>>,
) -> PyResult<()> {
    let op = "l1_layer_norm_backward";
    let level = simd::active()?;
    let stats = (
        contiguous(op, "mean", &mean)?,
        contiguous(op, "rstd", &rstd)?,
    );
    let dy = contiguous(op, "grad_out", &grad_out)?;
    let gamma = optional(op, "weight", &weight)?;
    let grads = Grads {
        dx: contiguous_mut(op, "grad_in", &mut grad_in)?,
        dgamma: grad_weight
            .as_mut()
            .map(|g| contiguous_mut(op, "grad_weight", g))
            .transpose()?,
        dbeta: grad_bias
            .as_mut()
            .map(|g| contiguous_mut(op, "grad_bias", g))
            .transpose()?,
    };
    run_detached(py, op, || {
        l1norm::backward(level, x, n, stats, dy, gamma, grads)
    })
}

/// Defines the float32 and float64 entry points over the generic wrappers above.
macro_rules! float_entry_points {
    ($($t:ty => $fwd:ident, $bwd:ident;)*) => {$(
        /// L1 LayerNorm of `x` [rows, n] into `out`, saving per-row `mean` and `rstd`.
        #[pyfunction]
        #[pyo3(signature = (x, n, eps, weight, bias, out, mean, rstd))]
        #[allow(clippy::too_many_arguments)]
        fn $fwd(py: Python<'_>, x: In<'_, $t>, n: usize, eps: f64, weight: Option<In<'_, $t>>, bias: Option<In<'_, $t>>, out: Out<'_, $t>, mean: Out<'_, $t>, rstd: Out<'_, $t>) -> PyResult<()> {
            let x = Input::Floats(contiguous("l1_layer_norm", "x", &x)?);
            forward(py, x, n, eps, weight, bias, out, mean, rstd)
        }

        /// Gradients of L1 LayerNorm from the saved `x`, `mean`, `rstd`.
        #[pyfunction]
        #[pyo3(signature = (x, n, mean, rstd, grad_out, weight, grad_in, grad_weight=None, grad_bias=None))]
        #[allow(clippy::too_many_arguments)]
        fn $bwd(py: Python<'_>, x: In<'_, $t>, n: usize, mean: In<'_, $t>, rstd: In<'_, $t>, grad_out: In<'_, $t>, weight: Option<In<'_, $t>>, grad_in: Out<'_, $t>, grad_weight: Option<Out<'_, $t>>, grad_bias: Option<Out<'_, $t>>) -> PyResult<()> {
            let x = Input::Floats(contiguous("l1_layer_norm_backward", "x", &x)?);
            backward(py, x, n, mean, rstd, grad_out, weight, grad_in, grad_weight, grad_bias)
        }
    )*};
}

float_entry_points! {
    f32 => l1_norm_forward_f32, l1_norm_backward_f32;
    f64 => l1_norm_forward_f64, l1_norm_backward_f64;
}

fn codes_input<'a>(
    op: &str,
    codes: &'a In<'_, i8>,
    scale: &'a In<'_, f32>,
    shifts: &'a In<'_, u8>,
    group_size: usize,
) -> FgResult<Input<'a, f32>> {
    Ok(Input::Codes(CodesIn {
        codes: contiguous(op, "codes", codes)?,
        scale: contiguous(op, "scale", scale)?,
        shifts: contiguous(op, "shifts", shifts)?,
        group_size,
    }))
}

/// L1 LayerNorm straight from ShiftQuant codes (statistics exact in integers).
#[pyfunction]
#[pyo3(signature = (codes, scale, shifts, group_size, n, eps, weight, bias, out, mean, rstd))]
#[allow(clippy::too_many_arguments)]
fn l1_norm_forward_codes(
    py: Python<'_>,
    codes: In<'_, i8>,
    scale: In<'_, f32>,
    shifts: In<'_, u8>,
    group_size: usize,
    n: usize,
    eps: f64,
    weight: Option<In<'_, f32>>,
    bias: Option<In<'_, f32>>,
    out: Out<'_, f32>,
    mean: Out<'_, f32>,
    rstd: Out<'_, f32>,
) -> PyResult<()> {
    let x = codes_input("l1_layer_norm", &codes, &scale, &shifts, group_size)?;
    forward(py, x, n, eps, weight, bias, out, mean, rstd)
}

/// Gradients of L1 LayerNorm whose input was given as ShiftQuant codes.
#[pyfunction]
#[pyo3(signature = (codes, scale, shifts, group_size, n, mean, rstd, grad_out, weight, grad_in, grad_weight=None, grad_bias=None))]
#[allow(clippy::too_many_arguments)]
fn l1_norm_backward_codes(
    py: Python<'_>,
    codes: In<'_, i8>,
    scale: In<'_, f32>,
    shifts: In<'_, u8>,
    group_size: usize,
    n: usize,
    mean: In<'_, f32>,
    rstd: In<'_, f32>,
    grad_out: In<'_, f32>,
    weight: Option<In<'_, f32>>,
    grad_in: Out<'_, f32>,
    grad_weight: Option<Out<'_, f32>>,
    grad_bias: Option<Out<'_, f32>>,
) -> PyResult<()> {
    let x = codes_input(
        "l1_layer_norm_backward",
        &codes,
        &scale,
        &shifts,
        group_size,
    )?;
    backward(
        py,
        x,
        n,
        mean,
        rstd,
        grad_out,
        weight,
        grad_in,
        grad_weight,
        grad_bias,
    )
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(l1_norm_forward_f32, m)?)?;
    m.add_function(wrap_pyfunction!(l1_norm_backward_f32, m)?)?;
    m.add_function(wrap_pyfunction!(l1_norm_forward_f64, m)?)?;
    m.add_function(wrap_pyfunction!(l1_norm_backward_f64, m)?)?;
    m.add_function(wrap_pyfunction!(l1_norm_forward_codes, m)?)?;
    m.add_function(wrap_pyfunction!(l1_norm_backward_codes, m)?)?;
    Ok(())
}
