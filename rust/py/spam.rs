//! SPAM / Stable-SPAM step wrappers.

use numpy::PyArray1;
use pyo3::prelude::*;

use super::run_detached;
use super::tensor::{has_dtype, Borrows};
use crate::error::FgError;
use crate::rng::SplitMix64;
use crate::simd::{self, Bf16};
use crate::spam::{self, StepScalars};

/// A parameter and its gradient, float32 or bfloat16.
enum Pair<'a> {
    F32(&'a mut [f32], &'a [f32]),
    Bf16(&'a mut [Bf16], &'a [Bf16]),
}

/// One fused step in place on a float32 or bfloat16 `param` (and `grad` of the same dtype)
/// with float32 moments. With `mask` (1 bit per element), the moments are compact, for the
/// marked coordinates only; the others get weight decay alone.
#[pyfunction]
#[pyo3(signature = (param, grad, exp_avg, exp_avg_sq, lr, weight_decay, betas, eps, bias_corrections, warmup=1.0, spike_threshold=None, adaclip=(f64::INFINITY, 1.0), grad_scale=1.0, mask=None))]
#[allow(clippy::too_many_arguments)]
fn spam_step(
    py: Python<'_>,
    param: Bound<'_, PyAny>,
    grad: Bound<'_, PyAny>,
    exp_avg: Bound<'_, PyAny>,
    exp_avg_sq: Bound<'_, PyAny>,
    lr: f64,
    weight_decay: f64,
    betas: (f64, f64),
    eps: f64,
    bias_corrections: (f64, f64),
    warmup: f64,
    spike_threshold: Option<f64>,
    adaclip: (f64, f64),
    grad_scale: f64,
    mask: Option<Bound<'_, PyAny>>,
) -> PyResult<()> {
    let op = "spam_step";
    let level = simd::active()?;
    let bf16 = has_dtype::<Bf16>(&param)?;
    if bf16 != has_dtype::<Bf16>(&grad)? {
        return Err(FgError::Type(format!("{op}: grad must have param's dtype")).into());
    }
    let mut args = Borrows::new(op);
    let pair = if bf16 {
        Pair::Bf16(args.write("param", &param)?, args.read("grad", &grad)?)
    } else {
        Pair::F32(args.write("param", &param)?, args.read("grad", &grad)?)
    };
    let m = args.write("exp_avg", &exp_avg)?;
    let v = args.write("exp_avg_sq", &exp_avg_sq)?;
    let mask = args.read_opt("mask", &mask)?;
    // Combinations of the optimizer's scalars are formed in f64, then rounded, as a plain
    // torch implementation forms them.
    let s = StepScalars {
        decay: (1.0 - lr * weight_decay) as f32,
        step_size: (lr * warmup) as f32,
        beta1: betas.0 as f32,
        beta2: betas.1 as f32,
        one_minus_beta1: (1.0 - betas.0) as f32,
        one_minus_beta2: (1.0 - betas.1) as f32,
        eps: eps as f32,
        bias_correction1: bias_corrections.0 as f32,
        bias_correction2: bias_corrections.1 as f32,
        spike_threshold: spike_threshold.map(|t| t as f32),
        adaclip_bound: adaclip.0 as f32,
        adaclip_ratio: adaclip.1 as f32,
        grad_scale: grad_scale as f32,
    };
    run_detached(py, op, || match (pair, mask) {
        (Pair::F32(p, g), Some(mask)) => spam::sparse_step(level, p, g, mask, m, v, &s),
        (Pair::F32(p, g), None) => spam::dense_step(level, p, g, m, v, &s),
        (Pair::Bf16(p, g), Some(mask)) => spam::sparse_step(level, p, g, mask, m, v, &s),
        (Pair::Bf16(p, g), None) => spam::dense_step(level, p, g, m, v, &s),
    })
}

/// Stable-SPAM's AdaClip statistics of a float32 or bfloat16 gradient in one pass; returns
/// (max |g|, running max, bound, ratio, sum of squares of the clipped gradient).
#[pyfunction]
#[pyo3(signature = (grad, max_abs, running_max, gamma3, correction))]
fn adaclip_stats(
    py: Python<'_>,
    grad: Bound<'_, PyAny>,
    max_abs: Option<f64>,
    running_max: f64,
    gamma3: f64,
    correction: f64,
) -> PyResult<(f64, f64, f64, f64, f64)> {
    let op = "adaclip_stats";
    let level = simd::active()?;
    let mut args = Borrows::new(op);
    let s = if has_dtype::<Bf16>(&grad)? {
        let g: &[Bf16] = args.read("grad", &grad)?;
        run_detached(py, op, || {
            spam::adaclip_stats(level, g, max_abs, running_max, gamma3, correction)
        })?
    } else {
        let g: &[f32] = args.read("grad", &grad)?;
        run_detached(py, op, || {
            spam::adaclip_stats(level, g, max_abs, running_max, gamma3, correction)
        })?
    };
    Ok((s.max_abs, s.running_max, s.bound, s.ratio, s.sum_sq))
}

/// Draws exactly `k` of `numel` coordinates as a bitmask; returns it and the generator state.
#[pyfunction]
fn sample_mask(
    py: Python<'_>,
    numel: usize,
    k: usize,
    rng_state: u64,
) -> PyResult<(Bound<'_, PyArray1<u8>>, u64)> {
    let mut rng = SplitMix64::new(rng_state);
    let mask = run_detached(py, "sample_mask", || spam::sample_mask(numel, k, &mut rng))?;
    Ok((PyArray1::from_vec(py, mask), rng.state()))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(spam_step, m)?)?;
    m.add_function(wrap_pyfunction!(adaclip_stats, m)?)?;
    m.add_function(wrap_pyfunction!(sample_mask, m)?)?;
    Ok(())
}
