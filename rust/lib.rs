//! ferrograd's Rust core: SIMD kernels on plain slices, plus the `_core` Python module.
//!
//! One module per primitive (softmax, shiftquant, l1norm, spam, packing, cce, w4a16) over the
//! shared plumbing (error, memory, rng, simd, threads, openmp); only `py` (the wrappers) and
//! this file know about Python.

pub mod cce;
pub mod error;
pub mod l1norm;
pub mod memory;
pub mod openmp;
pub mod packing;
pub mod rng;
pub mod shiftquant;
pub mod simd;
pub mod softmax;
pub mod spam;
pub mod threads;
pub mod w4a16;

mod py;

use pyo3::prelude::*;

/// The extension module `ferrograd._core`: registration only.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    py::register(m)
}
