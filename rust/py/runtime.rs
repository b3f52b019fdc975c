//! Threads, SIMD selection, memory advice, and (`dev` builds) the clock and panic probes.

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::memory;
use crate::simd::{self, SimdLevel};
use crate::threads;

/// Pins ferrograd's thread count at `n`, or (`pin` false) follows torch's, `n` being torch's
/// count now (rust/threads.rs).
#[pyfunction]
#[pyo3(signature = (n, pin=true))]
fn set_num_threads(n: i64, pin: bool) -> PyResult<()> {
    let n = usize::try_from(n).unwrap_or(0);
    Ok(threads::set_num_threads(n, pin)?)
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

/// Detected CPU features (less those `FERROGRAD_DISABLE_FEATURES` turned off, listed under
/// "disabled") and the paths this CPU can run.
#[pyfunction]
fn cpu_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let info = PyDict::new(py);
    let features = PyDict::new(py);
    for (name, present) in simd::cpu_features().named() {
        features.set_item(name, present)?;
    }
    info.set_item("features", features)?;
    info.set_item("disabled", simd::disabled_features_named())?;
    info.set_item("detected", simd::detected().name())?;
    let supported: Vec<&str> = SimdLevel::ALL
        .into_iter()
        .filter(|l| l.is_supported())
        .map(SimdLevel::name)
        .collect();
    info.set_item("supported", supported)?;
    let backend = if crate::openmp::available() {
        "openmp"
    } else {
        "rayon"
    };
    info.set_item("parallel_backend", backend)?;
    Ok(info)
}

/// Advises the storage of `t`, a CPU tensor just allocated and not yet written, as transparent
/// huge pages (rust/memory.rs). Returns whether any range was advised (never for other devices).
#[pyfunction]
fn advise_huge_pages(t: &Bound<'_, PyAny>) -> PyResult<bool> {
    let py = t.py();
    if !t.getattr(intern!(py, "is_cpu"))?.extract::<bool>()? {
        return Ok(false);
    }
    let storage = t.call_method0(intern!(py, "untyped_storage"))?;
    let ptr: usize = storage.call_method0(intern!(py, "data_ptr"))?.extract()?;
    let len: usize = storage.call_method0(intern!(py, "nbytes"))?.extract()?;
    Ok(memory::advise_huge_pages(ptr, len))
}

/// The measured core clock in Hz (None off x86_64), for the benchmarks' peak estimates.
#[cfg(any(test, feature = "dev"))]
#[pyfunction]
fn measured_clock_hz(py: Python<'_>) -> Option<f64> {
    py.detach(simd::measured_clock_hz)
}

/// Panics inside the guarded kernel path (with `parallel`, in part 1 of a `threads::split` over
/// two threads), to test that panics surface as RuntimeError.
#[cfg(any(test, feature = "dev"))]
#[pyfunction]
#[pyo3(signature = (message, parallel=false))]
fn _panic_for_test(py: Python<'_>, message: String, parallel: bool) -> PyResult<()> {
    use super::run_detached;
    use crate::error::FgResult;

    run_detached(py, "_panic_for_test", move || -> FgResult<()> {
        if parallel {
            threads::split(2, |part| assert!(part != 1, "{message}"));
            return Ok(());
        }
        panic!("{message}")
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_info, m)?)?;
    m.add_function(wrap_pyfunction!(advise_huge_pages, m)?)?;
    #[cfg(any(test, feature = "dev"))]
    {
        m.add_function(wrap_pyfunction!(measured_clock_hz, m)?)?;
        m.add_function(wrap_pyfunction!(_panic_for_test, m)?)?;
    }
    Ok(())
}
