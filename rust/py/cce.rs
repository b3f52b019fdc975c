//! Cut cross-entropy wrappers: the forward, backward and fused passes over a buffer of logits
//! (float32, or bfloat16 as a bfloat16 matmul wrote it).

use pyo3::prelude::*;

use super::run_detached;
use super::tensor::{Borrows, Float};
use crate::cce::{self, Chunk, GradCoefs, Logits, LossGrad, LossGradOut, LseState};
use crate::simd;

const OP: &str = "linear_cross_entropy";

/// The chunk view over the caller's logits buffer (float32 or bfloat16) and targets.
fn chunk<'a>(
    args: &mut Borrows<'_>,
    logits: &'a Bound<'_, PyAny>,
    width: usize,
    v0: usize,
    targets: &'a Bound<'_, PyAny>,
    softcap: Option<f32>,
) -> PyResult<Chunk<'a>> {
    let logits = match Float::of(logits)? {
        Float::Bf16 => Logits::Bf16(args.write("logits", logits)?),
        _ => Logits::F32(args.write("logits", logits)?),
    };
    Ok(Chunk {
        logits,
        width,
        v0,
        softcap,
        targets: args.read("targets", targets)?,
    })
}

/// Folds the chunk `logits` [rows, width] (vocabulary entries v0..v0+width; float32 or
/// bfloat16) into the running `lse`, `target_logit` and optional `logit_sum`, one entry per row.
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

/// Turns the recomputed raw chunk `logits` into the logit gradient in place (in their dtype);
/// returns the chunk's largest relative gradient entry (for `filter_eps`).
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

/// The fused pass over rows of raw `logits` [rows, V] spanning the whole vocabulary: writes
/// each row's `lse`, `target_logit` (NaN without a target) and optional `logit_sum`, replaces
/// the logits by the gradient of `scale` x the summed row losses, and writes per piece of
/// `piece` columns the largest relative gradient entry into `peaks`.
#[pyfunction]
#[pyo3(signature = (logits, width, targets, lse, target_logit, logit_sum, peaks, piece, scale, label_smoothing, z_loss, softcap=None))]
#[allow(clippy::too_many_arguments)]
fn cce_loss_grad_rows(
    py: Python<'_>,
    logits: Bound<'_, PyAny>,
    width: usize,
    targets: Bound<'_, PyAny>,
    lse: Bound<'_, PyAny>,
    target_logit: Bound<'_, PyAny>,
    logit_sum: Option<Bound<'_, PyAny>>,
    peaks: Bound<'_, PyAny>,
    piece: usize,
    scale: f32,
    label_smoothing: f64,
    z_loss: f64,
    softcap: Option<f32>,
) -> PyResult<()> {
    let level = simd::active()?;
    let mut args = Borrows::new(OP);
    let chunk = chunk(&mut args, &logits, width, 0, &targets, softcap)?;
    let out = LossGradOut {
        lse: args.write("lse", &lse)?,
        target_logit: args.write("target_logit", &target_logit)?,
        logit_sum: args.write_opt("logit_sum", &logit_sum)?,
        peaks: args.write("peaks", &peaks)?,
    };
    let opts = LossGrad {
        scale,
        label_smoothing,
        z_loss,
        piece,
    };
    run_detached(py, OP, || cce::loss_grad_rows(level, chunk, opts, out))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cce_forward_chunk, m)?)?;
    m.add_function(wrap_pyfunction!(cce_backward_chunk, m)?)?;
    m.add_function(wrap_pyfunction!(cce_loss_grad_rows, m)?)?;
    Ok(())
}
