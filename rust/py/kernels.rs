//! The CUDA sources of kernels/, embedded so that every build of the extension (and so every
//! wheel) carries them; `ferrograd.cuda` compiles them with NVRTC at first use.

use pyo3::prelude::*;
use pyo3::types::PyDict;

/// (file name, source) of every file in kernels/ that NVRTC reads.
const SOURCES: &[(&str, &str)] = &[
    ("cce.cu", include_str!("../../kernels/cce.cu")),
    ("common.cuh", include_str!("../../kernels/common.cuh")),
    ("shiftquant.cu", include_str!("../../kernels/shiftquant.cu")),
    ("w4a16.cu", include_str!("../../kernels/w4a16.cu")),
];

/// File name -> source of the embedded CUDA kernels.
#[pyfunction]
fn kernel_sources(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let out = PyDict::new(py);
    for (name, source) in SOURCES {
        out.set_item(name, source)?;
    }
    Ok(out)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(kernel_sources, m)?)
}
