//! ferrograd's Rust core: SIMD kernels on plain slices, plus the `_core` Python module.

pub mod batching;
pub mod cce;
pub mod error;
pub mod l1norm;
pub mod momentum;
pub mod openmp;
pub mod shiftquant;
pub mod simd;
pub mod softmax;
pub mod threads;
pub mod w4;

mod py;

use pyo3::prelude::*;

/// The extension module `ferrograd._core`: registration only.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    py::register(m)
}
