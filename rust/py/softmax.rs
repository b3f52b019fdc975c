//! Softmax / log-softmax wrappers: float32, bfloat16 and float16 tensors, read and written in
//! their own dtype.

use pyo3::prelude::*;

use super::run_detached;
use super::tensor::{with_float, Borrows, Element};
use crate::simd::{self, SimdLevel};
use crate::softmax::{self, Kernels, Layout};

fn forward_as<E: Kernels + Element>(
    py: Python<'_>,
    op: &str,
    level: SimdLevel,
    (x, out): (&Bound<'_, PyAny>, &Bound<'_, PyAny>),
    layout: Layout,
    log: bool,
) -> PyResult<()> {
    let mut args = Borrows::new(op);
    let x = args.read::<E>("x", x)?;
    let out = args.write::<E>("out", out)?;
    run_detached(py, op, || {
        softmax::softmax_forward(level, x, out, layout, log)
    })
}

fn backward_as<E: Kernels + Element>(
    py: Python<'_>,
    op: &str,
    level: SimdLevel,
    (y, grad_out, grad_in): (&Bound<'_, PyAny>, &Bound<'_, PyAny>, &Bound<'_, PyAny>),
    layout: Layout,
    log: bool,
) -> PyResult<()> {
    let mut args = Borrows::new(op);
    let y = args.read::<E>("y", y)?;
    let grad_out = args.read::<E>("grad_out", grad_out)?;
    let grad_in = args.write::<E>("grad_in", grad_in)?;
    run_detached(py, op, || {
        softmax::softmax_backward(level, y, grad_out, grad_in, layout, log)
    })
}

/// Softmax (`log=False`) or log-softmax of `x` seen as `[outer, n, inner]` over `n`, into `out`
/// (float32, bfloat16 or float16, both of one dtype).
#[pyfunction]
#[pyo3(signature = (x, out, outer, n, inner, log=false))]
fn softmax_forward(
    py: Python<'_>,
    x: Bound<'_, PyAny>,
    out: Bound<'_, PyAny>,
    outer: usize,
    n: usize,
    inner: usize,
    log: bool,
) -> PyResult<()> {
    let op = if log { "log_softmax" } else { "softmax" };
    let level = simd::active()?;
    let layout = Layout { outer, n, inner };
    let t = (&x, &out);
    with_float!(&x, E => forward_as::<E>(py, op, level, t, layout, log))
}

/// The input gradient of softmax / log-softmax from its output `y` and `grad_out` (one dtype).
#[pyfunction]
#[pyo3(signature = (y, grad_out, grad_in, outer, n, inner, log=false))]
#[allow(clippy::too_many_arguments)]
fn softmax_backward(
    py: Python<'_>,
    y: Bound<'_, PyAny>,
    grad_out: Bound<'_, PyAny>,
    grad_in: Bound<'_, PyAny>,
    outer: usize,
    n: usize,
    inner: usize,
    log: bool,
) -> PyResult<()> {
    let op = if log {
        "log_softmax_backward"
    } else {
        "softmax_backward"
    };
    let level = simd::active()?;
    let layout = Layout { outer, n, inner };
    let t = (&y, &grad_out, &grad_in);
    with_float!(&y, E => backward_as::<E>(py, op, level, t, layout, log))
}

/// The classic three-pass softmax over contiguous rows of length `n` (benchmark baseline,
/// `dev` builds only).
#[cfg(any(test, feature = "dev"))]
#[pyfunction]
#[pyo3(signature = (x, out, n, variant="reload"))]
fn softmax_three_pass(
    py: Python<'_>,
    x: Bound<'_, PyAny>,
    out: Bound<'_, PyAny>,
    n: usize,
    variant: &str,
) -> PyResult<()> {
    use crate::error::FgError;
    use crate::softmax::ThreePass;

    let op = "softmax_three_pass";
    let variant = match variant {
        "reload" => ThreePass::Reload,
        "recompute" => ThreePass::Recompute,
        other => {
            return Err(FgError::Value(format!(
                "{op}: variant must be 'reload' or 'recompute', got {other:?}"
            ))
            .into())
        }
    };
    let level = simd::active()?;
    let mut args = Borrows::new(op);
    let x = args.read("x", &x)?;
    let out = args.write("out", &out)?;
    run_detached(py, op, || {
        softmax::softmax_three_pass(level, x, out, n, variant)
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(softmax_forward, m)?)?;
    m.add_function(wrap_pyfunction!(softmax_backward, m)?)?;
    #[cfg(any(test, feature = "dev"))]
    m.add_function(wrap_pyfunction!(softmax_three_pass, m)?)?;
    Ok(())
}
