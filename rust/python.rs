//! Thin `#[pyfunction]` wrappers: borrow numpy views, validate, release the GIL, run the kernel.

use std::panic::{catch_unwind, AssertUnwindSafe};

use numpy::{PyReadonlyArrayDyn, PyReadwriteArrayDyn};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::error::{FgError, FgResult};
use crate::simd::{self, SimdLevel};
use crate::softmax::{self, Layout, ThreePass};
use crate::threads;

/// Runs `kernel` without the GIL; a panic inside becomes a `RuntimeError` naming `op`.
fn run_detached<R: Send>(
    py: Python<'_>,
    op: &str,
    kernel: impl FnOnce() -> FgResult<R> + Send,
) -> PyResult<R> {
    let result = py.detach(|| {
        catch_unwind(AssertUnwindSafe(kernel)).unwrap_or_else(|p| Err(FgError::from_panic(op, p)))
    });
    Ok(result?)
}

fn contiguous<'a>(op: &str, name: &str, a: &'a PyReadonlyArrayDyn<'_, f32>) -> FgResult<&'a [f32]> {
    a.as_slice()
        .map_err(|_| FgError::Value(format!("{op}: {name} must be a C-contiguous float32 array")))
}

fn contiguous_mut<'a>(
    op: &str,
    name: &str,
    a: &'a mut PyReadwriteArrayDyn<'_, f32>,
) -> FgResult<&'a mut [f32]> {
    a.as_slice_mut()
        .map_err(|_| FgError::Value(format!("{op}: {name} must be a C-contiguous float32 array")))
}

/// Softmax (`log=False`) or log-softmax of `x` seen as `[outer, n, inner]` over `n`, into `out`.
#[pyfunction]
#[pyo3(signature = (x, out, outer, n, inner, log=false))]
fn softmax_forward(
    py: Python<'_>,
    x: PyReadonlyArrayDyn<'_, f32>,
    mut out: PyReadwriteArrayDyn<'_, f32>,
    outer: usize,
    n: usize,
    inner: usize,
    log: bool,
) -> PyResult<()> {
    let op = if log { "log_softmax" } else { "softmax" };
    let level = simd::active()?;
    let x = contiguous(op, "x", &x)?;
    let out = contiguous_mut(op, "out", &mut out)?;
    let layout = Layout { outer, n, inner };
    run_detached(py, op, || {
        softmax::softmax_forward(level, x, out, layout, log)
    })
}

/// The input gradient of softmax / log-softmax from its output `y` and `grad_out`.
#[pyfunction]
#[pyo3(signature = (y, grad_out, grad_in, outer, n, inner, log=false))]
#[allow(clippy::too_many_arguments)]
fn softmax_backward(
    py: Python<'_>,
    y: PyReadonlyArrayDyn<'_, f32>,
    grad_out: PyReadonlyArrayDyn<'_, f32>,
    mut grad_in: PyReadwriteArrayDyn<'_, f32>,
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
    let y = contiguous(op, "y", &y)?;
    let grad_out = contiguous(op, "grad_out", &grad_out)?;
    let grad_in = contiguous_mut(op, "grad_in", &mut grad_in)?;
    let layout = Layout { outer, n, inner };
    run_detached(py, op, || {
        softmax::softmax_backward(level, y, grad_out, grad_in, layout, log)
    })
}

/// The classic three-pass softmax over contiguous rows of length `n` (benchmark baseline).
#[pyfunction]
#[pyo3(signature = (x, out, n, variant="reload"))]
fn softmax_three_pass(
    py: Python<'_>,
    x: PyReadonlyArrayDyn<'_, f32>,
    mut out: PyReadwriteArrayDyn<'_, f32>,
    n: usize,
    variant: &str,
) -> PyResult<()> {
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
    let x = contiguous(op, "x", &x)?;
    let out = contiguous_mut(op, "out", &mut out)?;
    run_detached(py, op, || {
        softmax::softmax_three_pass(level, x, out, n, variant)
    })
}

#[pyfunction]
fn set_num_threads(n: i64) -> PyResult<()> {
    let n = usize::try_from(n).unwrap_or(0);
    Ok(threads::set_num_threads(n)?)
}

#[pyfunction]
fn get_num_threads() -> usize {
    threads::num_threads()
}

/// The SIMD path kernels use (`FERROGRAD_SIMD` or the detected one); ValueError if forced badly.
#[pyfunction]
fn simd_level() -> PyResult<&'static str> {
    Ok(simd::active()?.name())
}

/// Detected CPU features and the paths this CPU can run.
#[pyfunction]
fn cpu_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let info = PyDict::new(py);
    let features = PyDict::new(py);
    for (name, present) in simd::cpu_features().named() {
        features.set_item(name, present)?;
    }
    info.set_item("features", features)?;
    info.set_item("detected", simd::detected().name())?;
    let supported: Vec<&str> = SimdLevel::ALL
        .into_iter()
        .filter(|l| l.is_supported())
        .map(SimdLevel::name)
        .collect();
    info.set_item("supported", supported)?;
    Ok(info)
}

/// Panics inside the guarded kernel path, to test that panics surface as RuntimeError.
#[pyfunction]
fn _panic_for_test(py: Python<'_>, message: String) -> PyResult<()> {
    run_detached(py, "_panic_for_test", move || -> FgResult<()> {
        panic!("{message}")
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(softmax_forward, m)?)?;
    m.add_function(wrap_pyfunction!(softmax_backward, m)?)?;
    m.add_function(wrap_pyfunction!(softmax_three_pass, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_info, m)?)?;
    m.add_function(wrap_pyfunction!(_panic_for_test, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
