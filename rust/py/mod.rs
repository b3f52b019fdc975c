//! Thin `#[pyfunction]` wrappers, one file per primitive: borrow tensors, validate,
//! release the GIL, run the kernel. Shared plumbing lives here.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::prelude::*;

use crate::error::{FgError, FgResult};

mod cce;
mod error;
mod kernels;
mod l1norm;
mod packing;
mod runtime;
mod shiftquant;
mod softmax;
mod spam;
mod tensor;
mod w4a16;

/// Runs `kernel` without the GIL; a panic inside becomes a `RuntimeError` naming `op`.
pub(crate) fn run_detached<R: Send>(
    py: Python<'_>,
    op: &str,
    kernel: impl FnOnce() -> FgResult<R> + Send,
) -> PyResult<R> {
    let result = py.detach(|| {
        catch_unwind(AssertUnwindSafe(kernel)).unwrap_or_else(|p| Err(FgError::from_panic(op, p)))
    });
    Ok(result?)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    cce::register(m)?;
    kernels::register(m)?;
    l1norm::register(m)?;
    packing::register(m)?;
    runtime::register(m)?;
    shiftquant::register(m)?;
    softmax::register(m)?;
    spam::register(m)?;
    w4a16::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
