//! SPAM / Stable-SPAM step wrappers.

use std::borrow::Cow;

use numpy::PyArray1;
use pyo3::prelude::*;

use super::run_detached;
use super::tensor::{has_dtype, Borrows, Element};
use crate::error::FgError;
use crate::rng::SplitMix64;
use crate::simd::{self, Bf16};
use crate::spam::{self, StepScalars};

/// The scalars of one tensor's step. Combinations of the optimizer's scalars are formed in f64,
/// then rounded, as a plain torch implementation forms them.
#[allow(clippy::too_many_arguments)]
fn scalars(
    lr: f64,
    weight_decay: f64,
    betas: (f64, f64),
    eps: f64,
    bias_corrections: (f64, f64),
    warmup: f64,
    spike_threshold: Option<f64>,
    (adaclip_bound, adaclip_ratio): (f64, f64),
    grad_scale: f64,
) -> StepScalars {
    StepScalars {
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
        adaclip_bound: adaclip_bound as f32,
        adaclip_ratio: adaclip_ratio as f32,
        grad_scale: grad_scale as f32,
    }
}

/// The tensors of one parameter's step, as Python hands them over.
struct Tensors<'py> {
    param: Bound<'py, PyAny>,
    grad: Bound<'py, PyAny>,
    exp_avg: Bound<'py, PyAny>,
    exp_avg_sq: Bound<'py, PyAny>,
    mask: Option<Bound<'py, PyAny>>,
}

/// Borrows every tensor (named by its position in the lists when `indexed`) and runs one step
/// over all of them.
fn run_step(
    py: Python<'_>,
    op: &str,
    tensors: &[Tensors<'_>],
    s: &[StepScalars],
    indexed: bool,
) -> PyResult<()> {
    let level = simd::active()?;
    let bf16 = match tensors.first() {
        Some(t) => has_dtype::<Bf16>(&t.param)?,
        None => return Ok(()),
    };
    if bf16 {
        borrowed_step::<Bf16>(py, op, level, tensors, s, indexed)
    } else {
        borrowed_step::<f32>(py, op, level, tensors, s, indexed)
    }
}

/// [`run_step`] for parameters of P: every parameter and gradient must be of P.
fn borrowed_step<P: spam::Param + Element>(
    py: Python<'_>,
    op: &str,
    level: simd::SimdLevel,
    tensors: &[Tensors<'_>],
    s: &[StepScalars],
    indexed: bool,
) -> PyResult<()> {
    let mut sets = Vec::with_capacity(tensors.len());
    let mut steps: Vec<spam::TensorStep<'_, P>> = Vec::with_capacity(tensors.len());
    for (i, (t, &s)) in tensors.iter().zip(s).enumerate() {
        let name = |arg: &'static str| -> Cow<'static, str> {
            if indexed {
                Cow::Owned(format!("{arg}s[{i}]"))
            } else {
                Cow::Borrowed(arg)
            }
        };
        let bf16 = has_dtype::<Bf16>(&t.param)?;
        if bf16 == P::IS_F32 {
            return Err(FgError::Type(format!(
                "{op}: {} must have the dtype of params[0]",
                name("param")
            ))
            .into());
        }
        if has_dtype::<Bf16>(&t.grad)? != bf16 {
            return Err(FgError::Type(format!(
                "{op}: {} must have {}'s dtype",
                name("grad"),
                name("param")
            ))
            .into());
        }
        let mut args = Borrows::new(op);
        steps.push(spam::TensorStep {
            p: args.write(&name("param"), &t.param)?,
            g: args.read(&name("grad"), &t.grad)?,
            m: args.write(&name("exp_avg"), &t.exp_avg)?,
            v: args.write(&name("exp_avg_sq"), &t.exp_avg_sq)?,
            mask: args.read_opt(&name("mask"), &t.mask)?,
            s,
        });
        sets.push(args);
    }
    Borrows::check_apart(op, &sets)?;
    run_detached(py, op, || spam::step(level, op, steps))
}

/// `spam_step_many` on one parameter, its scalars as arguments (no lists to build per call).
#[pyfunction]
#[pyo3(signature = (param, grad, exp_avg, exp_avg_sq, lr, weight_decay, betas, eps, bias_corrections, warmup, spike_threshold, adaclip, grad_scale, mask))]
#[allow(clippy::too_many_arguments)]
fn spam_step<'py>(
    py: Python<'py>,
    param: Bound<'py, PyAny>,
    grad: Bound<'py, PyAny>,
    exp_avg: Bound<'py, PyAny>,
    exp_avg_sq: Bound<'py, PyAny>,
    lr: f64,
    weight_decay: f64,
    betas: (f64, f64),
    eps: f64,
    bias_corrections: (f64, f64),
    warmup: f64,
    spike_threshold: Option<f64>,
    adaclip: (f64, f64),
    grad_scale: f64,
    mask: Option<Bound<'py, PyAny>>,
) -> PyResult<()> {
    let s = scalars(
        lr,
        weight_decay,
        betas,
        eps,
        bias_corrections,
        warmup,
        spike_threshold,
        adaclip,
        grad_scale,
    );
    let tensors = Tensors {
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        mask,
    };
    run_step(py, "spam_step", &[tensors], &[s], false)
}

/// One fused step in place on every parameter of `params` (float32 or bfloat16, all of one
/// dtype, each gradient of its parameter's dtype) with float32 moments, in one parallel region.
/// The scalars are shared but AdaClip's bound and ratio and AdaGN's scale (`adaclips`,
/// `grad_scales`); every list holds one entry per parameter. With a mask (1 bit per element)
/// the moments are compact, for the marked coordinates only, and the others get weight decay
/// alone; None: dense.
#[pyfunction]
#[pyo3(signature = (params, grads, exp_avgs, exp_avg_sqs, lr, weight_decay, betas, eps, bias_corrections, warmup, spike_threshold, adaclips, grad_scales, masks))]
#[allow(clippy::too_many_arguments)]
fn spam_step_many<'py>(
    py: Python<'py>,
    params: Vec<Bound<'py, PyAny>>,
    grads: Vec<Bound<'py, PyAny>>,
    exp_avgs: Vec<Bound<'py, PyAny>>,
    exp_avg_sqs: Vec<Bound<'py, PyAny>>,
    lr: f64,
    weight_decay: f64,
    betas: (f64, f64),
    eps: f64,
    bias_corrections: (f64, f64),
    warmup: f64,
    spike_threshold: Option<f64>,
    adaclips: Vec<(f64, f64)>,
    grad_scales: Vec<f64>,
    masks: Vec<Option<Bound<'py, PyAny>>>,
) -> PyResult<()> {
    let op = "spam_step";
    let n = params.len();
    let lens = [
        grads.len(),
        exp_avgs.len(),
        exp_avg_sqs.len(),
        adaclips.len(),
        grad_scales.len(),
        masks.len(),
    ];
    if lens.iter().any(|&l| l != n) {
        return Err(FgError::Value(format!(
            "{op}: params, grads, exp_avgs, exp_avg_sqs, adaclips, grad_scales and masks must be \
             lists of one length, got {n} params and {lens:?}"
        ))
        .into());
    }
    let s: Vec<StepScalars> = adaclips
        .into_iter()
        .zip(grad_scales)
        .map(|(adaclip, scale)| {
            scalars(
                lr,
                weight_decay,
                betas,
                eps,
                bias_corrections,
                warmup,
                spike_threshold,
                adaclip,
                scale,
            )
        })
        .collect();
    let tensors: Vec<Tensors<'_>> = params
        .into_iter()
        .zip(grads)
        .zip(exp_avgs.into_iter().zip(exp_avg_sqs))
        .zip(masks)
        .map(|(((param, grad), (exp_avg, exp_avg_sq)), mask)| Tensors {
            param,
            grad,
            exp_avg,
            exp_avg_sq,
            mask,
        })
        .collect();
    run_step(py, op, &tensors, &s, n > 1)
}

/// One gradient's (max |g|, running max, bound, ratio, sum of squares of the clipped gradient).
type Stats = (f64, f64, f64, f64, f64);

/// Stable-SPAM's AdaClip statistics of float32 or bfloat16 gradients (all of one dtype), in
/// one call: per gradient (max |g|, running max, bound, ratio, sum of squares of the clipped
/// gradient). `max_abs[i]`, when given, replaces max |g| (a sharded gradient's global max).
#[pyfunction]
#[pyo3(signature = (grads, max_abs, running_maxes, gamma3, correction))]
fn adaclip_stats_many(
    py: Python<'_>,
    grads: Vec<Bound<'_, PyAny>>,
    max_abs: Vec<Option<f64>>,
    running_maxes: Vec<f64>,
    gamma3: f64,
    correction: f64,
) -> PyResult<Vec<Stats>> {
    let op = "adaclip_stats";
    if max_abs.len() != grads.len() || running_maxes.len() != grads.len() {
        return Err(FgError::Value(format!(
            "{op}: max_abs and running_maxes must hold one entry per gradient ({}), got {} and {}",
            grads.len(),
            max_abs.len(),
            running_maxes.len()
        ))
        .into());
    }
    let bf16 = match grads.first() {
        Some(g) => has_dtype::<Bf16>(g)?,
        None => return Ok(Vec::new()),
    };
    let stats_of = if bf16 {
        stats_of::<Bf16>
    } else {
        stats_of::<f32>
    };
    let stats = stats_of(
        py,
        op,
        &grads,
        &max_abs,
        &running_maxes,
        (gamma3, correction),
    )?;
    Ok(stats
        .into_iter()
        .map(|s| (s.max_abs, s.running_max, s.bound, s.ratio, s.sum_sq))
        .collect())
}

/// [`adaclip_stats_many`] on gradients of P (each borrowed as P: another dtype is refused).
fn stats_of<P: spam::StatsParam + Element>(
    py: Python<'_>,
    op: &str,
    grads: &[Bound<'_, PyAny>],
    max_abs: &[Option<f64>],
    running_maxes: &[f64],
    (gamma3, correction): (f64, f64),
) -> PyResult<Vec<spam::AdaClip>> {
    let level = simd::active()?;
    let mut inputs = Vec::with_capacity(grads.len());
    for (i, ((g, &max_abs), &running_max)) in
        grads.iter().zip(max_abs).zip(running_maxes).enumerate()
    {
        let name = format!("grads[{i}]");
        let g: &[P] = Borrows::new(op).read(&name, g)?;
        inputs.push(spam::ClipInput {
            g,
            max_abs,
            running_max,
        });
    }
    run_detached(py, op, || {
        spam::adaclip_stats(level, &inputs, gamma3, correction)
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
    m.add_function(wrap_pyfunction!(spam_step_many, m)?)?;
    m.add_function(wrap_pyfunction!(adaclip_stats_many, m)?)?;
    m.add_function(wrap_pyfunction!(sample_mask, m)?)?;
    Ok(())
}
