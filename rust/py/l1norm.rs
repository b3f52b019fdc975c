//! L1 LayerNorm wrappers: float32 / float64 inputs, or float32 from ShiftQuant codes.

use pyo3::prelude::*;

use super::run_detached;
use super::tensor::{Borrows, Element};
use crate::l1norm::{self, Affine, CodesIn, Grads, Input, Kernels, Stats};
use crate::simd;

const FORWARD: &str = "l1_layer_norm";
const BACKWARD: &str = "l1_layer_norm_backward";

type Arg<'py> = Bound<'py, PyAny>;

#[allow(clippy::too_many_arguments)]
fn forward<T: Kernels + Element>(
    py: Python<'_>,
    mut args: Borrows<'_>,
    x: Input<'_, T>,
    n: usize,
    eps: f64,
    weight: Option<Arg<'_>>,
    bias: Option<Arg<'_>>,
    y: Arg<'_>,
    mean: Arg<'_>,
    rstd: Arg<'_>,
) -> PyResult<()> {
    let level = simd::active()?;
    let affine = Affine {
        gamma: args.read_opt("weight", &weight)?,
        beta: args.read_opt("bias", &bias)?,
    };
    let y = args.write("out", &y)?;
    let stats = Stats {
        mean: args.write("mean", &mean)?,
        rstd: args.write("rstd", &rstd)?,
    };
    run_detached(py, FORWARD, || {
        l1norm::forward(level, x, n, eps, affine, y, stats)
    })
}

#[allow(clippy::too_many_arguments)]
fn backward<T: Kernels + Element>(
    py: Python<'_>,
    mut args: Borrows<'_>,
    x: Input<'_, T>,
    n: usize,
    mean: Arg<'_>,
    rstd: Arg<'_>,
    grad_out: Arg<'_>,
    weight: Option<Arg<'_>>,
    grad_in: Arg<'_>,
    grad_weight: Option<Arg<'_>>,
    grad_bias: Option<Arg<'_>>,
) -> PyResult<()> {
    let level = simd::active()?;
    let stats = (args.read("mean", &mean)?, args.read("rstd", &rstd)?);
    let dy = args.read("grad_out", &grad_out)?;
    let gamma = args.read_opt("weight", &weight)?;
    let grads = Grads {
        dx: args.write("grad_in", &grad_in)?,
        dgamma: args.write_opt("grad_weight", &grad_weight)?,
        dbeta: args.write_opt("grad_bias", &grad_bias)?,
    };
    run_detached(py, BACKWARD, || {
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
        fn $fwd(py: Python<'_>, x: Arg<'_>, n: usize, eps: f64, weight: Option<Arg<'_>>, bias: Option<Arg<'_>>, out: Arg<'_>, mean: Arg<'_>, rstd: Arg<'_>) -> PyResult<()> {
            let mut args = Borrows::new(FORWARD);
            let x = Input::Floats(args.read::<$t>("x", &x)?);
            forward(py, args, x, n, eps, weight, bias, out, mean, rstd)
        }

        /// Gradients of L1 LayerNorm from the saved `x`, `mean`, `rstd`.
        #[pyfunction]
        #[pyo3(signature = (x, n, mean, rstd, grad_out, weight, grad_in, grad_weight=None, grad_bias=None))]
        #[allow(clippy::too_many_arguments)]
        fn $bwd(py: Python<'_>, x: Arg<'_>, n: usize, mean: Arg<'_>, rstd: Arg<'_>, grad_out: Arg<'_>, weight: Option<Arg<'_>>, grad_in: Arg<'_>, grad_weight: Option<Arg<'_>>, grad_bias: Option<Arg<'_>>) -> PyResult<()> {
            let mut args = Borrows::new(BACKWARD);
            let x = Input::Floats(args.read::<$t>("x", &x)?);
            backward(py, args, x, n, mean, rstd, grad_out, weight, grad_in, grad_weight, grad_bias)
        }
    )*};
}

float_entry_points! {
    f32 => l1_norm_forward_f32, l1_norm_backward_f32;
    f64 => l1_norm_forward_f64, l1_norm_backward_f64;
}

fn codes_input<'a>(
    args: &mut Borrows<'_>,
    codes: &'a Arg<'_>,
    scale: &'a Arg<'_>,
    shifts: &'a Arg<'_>,
    group_size: usize,
) -> PyResult<Input<'a, f32>> {
    Ok(Input::Codes(CodesIn {
        codes: args.read("codes", codes)?,
        scale: args.read("scale", scale)?,
        shifts: args.read("shifts", shifts)?,
        group_size,
    }))
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
    let mut args = Borrows::new(FORWARD);
    let x = codes_input(&mut args, &codes, &scale, &shifts, group_size)?;
    forward(py, args, x, n, eps, weight, bias, out, mean, rstd)
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
    let mut args = Borrows::new(BACKWARD);
    let x = codes_input(&mut args, &codes, &scale, &shifts, group_size)?;
    backward(
        py,
        args,
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
