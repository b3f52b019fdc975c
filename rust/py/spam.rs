//! SPAM / Stable-SPAM step wrappers.

use numpy::PyArray1;
use pyo3::prelude::*;

use super::run_detached;
use super::tensor::Borrows;
use crate::rng::SplitMix64;
use crate::simd;
use crate::spam::{self, StepScalars};

/// One fused step in place on float32 `param` and its moments. With `mask` (1 bit per
/// element), the moments are compact, for the marked coordinates only; the others get weight
/// decay alone.
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
    let mut args = Borrows::new(op);
    let p = args.write("param", &param)?;
    let g = args.read("grad", &grad)?;
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
    run_detached(py, op, || match mask {
        Some(mask) => spam::sparse_step(level, p, g, mask, m, v, &s),
        None => spam::dense_step(level, p, g, m, v, &s),
    })
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
    m.add_function(wrap_pyfunction!(sample_mask, m)?)?;
    Ok(())
}
