//! L1 LayerNorm / L1 RMSNorm wrappers: rows of float32, bfloat16 or float16 (x, out and the
//! gradients of x of one dtype, the rest float32), and the codes path.

use pyo3::prelude::*;

use super::run_detached;
use super::tensor::{with_float, Borrows, Element};
use crate::l1norm::{self, Affine, BackwardIn, CodesIn, Grads, Kernels, Norm, Stats};
use crate::simd;

type Arg<'py> = Bound<'py, PyAny>;

fn op_of(norm: Norm, backward: bool) -> &'static str {
    match (norm, backward) {
        (Norm::Layer, false) => "l1_layer_norm",
        (Norm::Layer, true) => "l1_layer_norm_backward",
        (Norm::Rms, false) => "l1_rms_norm",
        (Norm::Rms, true) => "l1_rms_norm_backward",
    }
}

#[allow(clippy::too_many_arguments)]
fn forward<E: Kernels + Element>(
    py: Python<'_>,
    norm: Norm,
    x: &Arg<'_>,
    n: usize,
    eps: f64,
    weight: &Option<Arg<'_>>,
    bias: &Option<Arg<'_>>,
    out: &Arg<'_>,
    mean: &Option<Arg<'_>>,
    rstd: &Arg<'_>,
) -> PyResult<()> {
    let op = op_of(norm, false);
    let level = simd::active()?;
    let mut args = Borrows::new(op);
    let x = args.read::<E>("x", x)?;
    let affine = Affine {
        gamma: args.read_opt("weight", weight)?,
        beta: args.read_opt("bias", bias)?,
    };
    let y = args.write::<E>("out", out)?;
    let stats = Stats {
        mean: args.write_opt("mean", mean)?,
        rstd: args.write("rstd", rstd)?,
    };
    run_detached(py, op, || {
        l1norm::forward(level, norm, x, n, eps, affine, y, stats)
    })
}

#[allow(clippy::too_many_arguments)]
fn backward<E: Kernels + Element>(
    py: Python<'_>,
    norm: Norm,
    x: &Arg<'_>,
    n: usize,
    mean: &Option<Arg<'_>>,
    rstd: &Arg<'_>,
    grad_out: &Arg<'_>,
    weight: &Option<Arg<'_>>,
    grad_in: &Arg<'_>,
    grad_weight: &Option<Arg<'_>>,
    grad_bias: &Option<Arg<'_>>,
) -> PyResult<()> {
    let op = op_of(norm, true);
    let level = simd::active()?;
    let mut args = Borrows::new(op);
    let x = args.read::<E>("x", x)?;
    let inp = BackwardIn {
        mean: args.read_opt("mean", mean)?,
        rstd: args.read("rstd", rstd)?,
        dy: args.read::<E>("grad_out", grad_out)?,
        gamma: args.read_opt("weight", weight)?,
    };
    let grads = Grads {
        dx: args.write::<E>("grad_in", grad_in)?,
        dgamma: args.write_opt("grad_weight", grad_weight)?,
        dbeta: args.write_opt("grad_bias", grad_bias)?,
    };
    run_detached(py, op, || l1norm::backward(level, norm, x, n, inp, grads))
}

/// L1 LayerNorm of `x` [rows, n] into `out` (same dtype), saving per-row float32 `mean` and
/// `rstd`; weight and bias are float32.
#[pyfunction]
#[pyo3(signature = (x, n, eps, weight, bias, out, mean, rstd))]
#[allow(clippy::too_many_arguments)]
fn l1_norm_forward(
    py: Python<'_>,
    x: Arg<'_>,
    n: usize,
    eps: f64,
    weight: Option<Arg<'_>>,
    bias: Option<Arg<'_>>,
    out: Arg<'_>,
    mean: Arg<'_>,
    rstd: Arg<'_>,
) -> PyResult<()> {
    let mean = Some(mean);
    with_float!(&x, E => forward::<E>(
        py, Norm::Layer, &x, n, eps, &weight, &bias, &out, &mean, &rstd
    ))
}

/// Gradients of L1 LayerNorm from the saved `x`, `mean`, `rstd` (x, grad_out and grad_in of
/// one dtype; the rest float32).
#[pyfunction]
#[pyo3(signature = (x, n, mean, rstd, grad_out, weight, grad_in, grad_weight=None, grad_bias=None))]
#[allow(clippy::too_many_arguments)]
fn l1_norm_backward(
    py: Python<'_>,
    x: Arg<'_>,
    n: usize,
    mean: Arg<'_>,
    rstd: Arg<'_>,
    grad_out: Arg<'_>,
    weight: Option<Arg<'_>>,
    grad_in: Arg<'_>,
    grad_weight: Option<Arg<'_>>,
    grad_bias: Option<Arg<'_>>,
) -> PyResult<()> {
    let mean = Some(mean);
    with_float!(&x, E => backward::<E>(
        py, Norm::Layer, &x, n, &mean, &rstd, &grad_out, &weight, &grad_in, &grad_weight,
        &grad_bias
    ))
}

/// L1 RMSNorm of `x` [rows, n] into `out` (same dtype), saving per-row float32 `rstd`.
#[pyfunction]
#[pyo3(signature = (x, n, eps, weight, out, rstd))]
#[allow(clippy::too_many_arguments)]
fn l1_rms_norm_forward(
    py: Python<'_>,
    x: Arg<'_>,
    n: usize,
    eps: f64,
    weight: Option<Arg<'_>>,
    out: Arg<'_>,
    rstd: Arg<'_>,
) -> PyResult<()> {
    with_float!(&x, E => forward::<E>(
        py, Norm::Rms, &x, n, eps, &weight, &None, &out, &None, &rstd
    ))
}

/// Gradients of L1 RMSNorm from the saved `x` and `rstd`.
#[pyfunction]
#[pyo3(signature = (x, n, rstd, grad_out, weight, grad_in, grad_weight=None))]
#[allow(clippy::too_many_arguments)]
fn l1_rms_norm_backward(
    py: Python<'_>,
    x: Arg<'_>,
    n: usize,
    rstd: Arg<'_>,
    grad_out: Arg<'_>,
    weight: Option<Arg<'_>>,
    grad_in: Arg<'_>,
    grad_weight: Option<Arg<'_>>,
) -> PyResult<()> {
    with_float!(&x, E => backward::<E>(
        py, Norm::Rms, &x, n, &None, &rstd, &grad_out, &weight, &grad_in, &grad_weight, &None
    ))
}

fn codes_input<'a>(
    args: &mut Borrows<'_>,
    codes: &'a Arg<'_>,
    scale: &'a Arg<'_>,
    shifts: &'a Arg<'_>,
    group_size: usize,
) -> PyResult<CodesIn<'a>> {
    Ok(CodesIn {
        codes: args.read("codes", codes)?,
        scale: args.read("scale", scale)?,
        shifts: args.read("shifts", shifts)?,
        group_size,
    })
}

/// L1 LayerNorm straight from ShiftQuant codes (statistics exact in integers).
#[pyfunction]
#[pyo3(signature = (codes, scale, shifts, group_size, n, eps, weight, bias, out, mean, rstd))]
#[allow(clippy::too_many_arguments)]
fn l1_norm_forward_codes(
    py: Python<'_>,
    codes: Arg<'_>,
    scale: Arg<'_>,
    shifts: Arg<'_>,
    group_size: usize,
    n: usize,
    eps: f64,
    weight: Option<Arg<'_>>,
    bias: Option<Arg<'_>>,
    out: Arg<'_>,
    mean: Arg<'_>,
    rstd: Arg<'_>,
) -> PyResult<()> {
    let op = op_of(Norm::Layer, false);
    let level = simd::active()?;
    let mut args = Borrows::new(op);
    let c = codes_input(&mut args, &codes, &scale, &shifts, group_size)?;
    let affine = Affine {
        gamma: args.read_opt("weight", &weight)?,
        beta: args.read_opt("bias", &bias)?,
    };
    let y = args.write("out", &out)?;
    let stats = Stats {
        mean: Some(args.write("mean", &mean)?),
        rstd: args.write("rstd", &rstd)?,
    };
    run_detached(py, op, || {
        l1norm::forward_codes(level, c, n, eps, affine, y, stats)
    })
}

/// Gradients of L1 LayerNorm whose input was given as ShiftQuant codes.
#[pyfunction]
#[pyo3(signature = (codes, scale, shifts, group_size, n, mean, rstd, grad_out, weight, grad_in, grad_weight=None, grad_bias=None))]
#[allow(clippy::too_many_arguments)]
fn l1_norm_backward_codes(
    py: Python<'_>,
    codes: Arg<'_>,
    scale: Arg<'_>,
    shifts: Arg<'_>,
    group_size: usize,
    n: usize,
    mean: Arg<'_>,
    rstd: Arg<'_>,
    grad_out: Arg<'_>,
    weight: Option<Arg<'_>>,
    grad_in: Arg<'_>,
    grad_weight: Option<Arg<'_>>,
    grad_bias: Option<Arg<'_>>,
) -> PyResult<()> {
    let op = op_of(Norm::Layer, true);
    let level = simd::active()?;
    let mut args = Borrows::new(op);
    let c = codes_input(&mut args, &codes, &scale, &shifts, group_size)?;
    let inp = BackwardIn {
        mean: Some(args.read("mean", &mean)?),
        rstd: args.read("rstd", &rstd)?,
        dy: args.read("grad_out", &grad_out)?,
        gamma: args.read_opt("weight", &weight)?,
    };
    let grads = Grads {
        dx: args.write("grad_in", &grad_in)?,
        dgamma: args.write_opt("grad_weight", &grad_weight)?,
        dbeta: args.write_opt("grad_bias", &grad_bias)?,
    };
    run_detached(py, op, || l1norm::backward_codes(level, c, n, inp, grads))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(l1_norm_forward, m)?)?;
    m.add_function(wrap_pyfunction!(l1_norm_backward, m)?)?;
    m.add_function(wrap_pyfunction!(l1_rms_norm_forward, m)?)?;
    m.add_function(wrap_pyfunction!(l1_rms_norm_backward, m)?)?;
    m.add_function(wrap_pyfunction!(l1_norm_forward_codes, m)?)?;
    m.add_function(wrap_pyfunction!(l1_norm_backward_codes, m)?)?;
    Ok(())
}
