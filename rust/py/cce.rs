//! Cut cross-entropy wrappers: the forward and backward passes over one vocabulary chunk.

use numpy::{PyReadonlyArrayDyn, PyReadwriteArrayDyn};
use pyo3::prelude::*;

use super::{contiguous, contiguous_mut, run_detached};
use crate::cce::{self, Chunk, GradCoefs, LseState};
use crate::simd;

const OP: &str = "linear_cross_entropy";

/// The chunk view over the caller's logits buffer and targets.
fn chunk<'a>(
    logits: &'a mut PyReadwriteArrayDyn<'_, f32>,
    width: usize,
    v0: usize,
    targets: &'a PyReadonlyArrayDyn<'_, i64>,
    softcap: Option<f32>,
) -> PyResult<Chunk<'a>> {
    Ok(Chunk {
        logits: contiguous_mut(OP, "logits", logits)?,
        width,
        v0,
        softcap,
        targets: contiguous(OP, "targets", targets)?,
    })
}

/// Folds the chunk `logits` [rows, width] (vocabulary entries v0..v0+width) into the running
/// `lse`, `target_logit` and optional `logit_sum`, one entry per row.
#[pyfunction]
#[pyo3(signature = (logits, width, v0, targets, lse, target_logit, logit_sum=None, softcap=None))]
#[allow(clippy::too_many_arguments)]
fn cce_forward_chunk(
    py: Python<'_>,
    mut logits: PyReadwriteArrayDyn<'_, f32>,
    width: usize,
    v0: usize,
    targets: PyReadonlyArrayDyn<'_, i64>,
    mut lse: PyReadwriteArrayDyn<'_, f64>,
    mut target_logit: PyReadwriteArrayDyn<'_, f32>,
    mut logit_sum: Option<PyReadwriteArrayDyn<'_, f64>>,
    softcap: Option<f32>,
) -> PyResult<()> {
    let level = simd::active()?;
    let chunk = chunk(&mut logits, width, v0, &targets, softcap)?;
    let state = LseState {
        lse: contiguous_mut(OP, "lse", &mut lse)?,
        target_logit: contiguous_mut(OP, "target_logit", &mut target_logit)?,
        logit_sum: match logit_sum.as_mut() {
            Some(s) => Some(contiguous_mut(OP, "logit_sum", s)?),
            None => None,
        },
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
    mut logits: PyReadwriteArrayDyn<'_, f32>,
    width: usize,
    v0: usize,
    targets: PyReadonlyArrayDyn<'_, i64>,
    lse: PyReadonlyArrayDyn<'_, f32>,
    coef_softmax: PyReadonlyArrayDyn<'_, f32>,
    coef_target: PyReadonlyArrayDyn<'_, f32>,
    coef_uniform: PyReadonlyArrayDyn<'_, f32>,
    softcap: Option<f32>,
) -> PyResult<f32> {
    let level = simd::active()?;
    let chunk = chunk(&mut logits, width, v0, &targets, softcap)?;
    let coefs = GradCoefs {
        lse: contiguous(OP, "lse", &lse)?,
        softmax: contiguous(OP, "coef_softmax", &coef_softmax)?,
        target: contiguous(OP, "coef_target", &coef_target)?,
        uniform: contiguous(OP, "coef_uniform", &coef_uniform)?,
    };
    run_detached(py, OP, || cce::backward_chunk(level, chunk, coefs))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cce_forward_chunk, m)?)?;
    m.add_function(wrap_pyfunction!(cce_backward_chunk, m)?)?;
    Ok(())
}
