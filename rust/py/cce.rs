//! Cut cross-entropy wrappers: the forward and backward passes over one vocabulary chunk.

use pyo3::prelude::*;

use super::run_detached;
use super::tensor::Borrows;
use crate::cce::{self, Chunk, GradCoefs, LseState};
use crate::simd;

const OP: &str = "linear_cross_entropy";

/// The chunk view over the caller's logits buffer and targets.
fn chunk<'a>(
    args: &mut Borrows<'_>,
    logits: &'a Bound<'_, PyAny>,
    width: usize,
    v0: usize,
    targets: &'a Bound<'_, PyAny>,
    softcap: Option<f32>,
) -> PyResult<Chunk<'a>> {
    Ok(Chunk {
        logits: args.write("logits", logits)?,
        width,
        v0,
        softcap,
        targets: args.read("targets", targets)?,
    })
}

/// Folds the chunk `logits` [rows, width] (vocabulary entries v0..v0+width) into the running
/// `lse`, `target_logit` and optional `logit_sum`, one entry per row.
#[pyfunction]
#[pyo3(signature = (logits, width, v0, targets, lse, target_logit, logit_sum=None, softcap=None))]
#[allow(clippy::too_many_arguments)]
fn cce_forward_chunk(
    py: Python<'_>,
    logits: Bound<'_, PyAny>,
    width: usize,
    v0: usize,
    targets: Bound<'_, PyAny>,
    lse: Bound<'_, PyAny>,
    target_logit: Bound<'_, PyAny>,
    logit_sum: Option<Bound<'_, PyAny>>,
    softcap: Option<f32>,
) -> PyResult<()> {
    let level = simd::active()?;
    let mut args = Borrows::new(OP);
    let chunk = chunk(&mut args, &logits, width, v0, &targets, softcap)?;
    let state = LseState {
        lse: args.write("lse", &lse)?,
        target_logit: args.write("target_logit", &target_logit)?,
        logit_sum: args.write_opt("logit_sum", &logit_sum)?,
    };
    run_detached(py, OP, || cce::forward_chunk(level, chunk, state))
}

/// Turns the recomputed raw chunk `logits` into the logit gradient in place; returns the
/// chunk's largest relative gradient entry (for `filter_eps`).
#[pyfunction]
#[pyo3(signature = (logits, width, v0, targets, lse, coef_softmax, coef_target, coef_uniform, softcap=None))]
#[allow(clippy::too_many_arguments)]
fn cce_backward_chunk(
    py: Python<'_>,
    logits: Bound<'_, PyAny>,
    width: usize,
    v0: usize,
    targets: Bound<'_, PyAny>,
    lse: Bound<'_, PyAny>,
    coef_softmax: Bound<'_, PyAny>,
    coef_target: Bound<'_, PyAny>,
    coef_uniform: Bound<'_, PyAny>,
    softcap: Option<f32>,
) -> PyResult<f32> {
    let level = simd::active()?;
    let mut args = Borrows::new(OP);
    let chunk = chunk(&mut args, &logits, width, v0, &targets, softcap)?;
    let coefs = GradCoefs {
        lse: args.read("lse", &lse)?,
        softmax: args.read("coef_softmax", &coef_softmax)?,
        target: args.read("coef_target", &coef_target)?,
        uniform: args.read("coef_uniform", &coef_uniform)?,
    };
    run_detached(py, OP, || cce::backward_chunk(level, chunk, coefs))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cce_forward_chunk, m)?)?;
    m.add_function(wrap_pyfunction!(cce_backward_chunk, m)?)?;
    Ok(())
}
