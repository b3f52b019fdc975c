//! Softmax / log-softmax wrappers: float32, bfloat16 and float16 tensors, read and written in
//! their own dtype.

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use super::run_detached;
use super::tensor::Borrows;
use crate::error::FgError;
use crate::simd::{self, SimdLevel};
use crate::softmax::{self, Bf16, Kernels, Layout, F16};

/// The storage type of a call, from its first tensor's dtype.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Storage {
    F32,
    Bf16,
    F16,
}

/// torch.bfloat16, torch.float16 and torch.uint8, imported once.
fn dtypes(py: Python<'_>) -> PyResult<&[Py<PyAny>; 3]> {
    static DTYPES: PyOnceLock<[Py<PyAny>; 3]> = PyOnceLock::new();
    DTYPES.get_or_try_init(py, || {
        let torch = py.import("torch")?;
        let get = |name: &str| torch.getattr(name).map(Bound::unbind);
        Ok([get("bfloat16")?, get("float16")?, get("uint8")?])
    })
}

fn storage_of(t: &Bound<'_, PyAny>) -> PyResult<Storage> {
    let py = t.py();
    let [bf16, f16, _] = dtypes(py)?;
    // Anything else (not a tensor, another dtype) is float32's to refuse, in `Borrows`.
    Ok(match t.getattr(intern!(py, "dtype")) {
        Ok(d) if d.is(bf16.bind(py)) => Storage::Bf16,
        Ok(d) if d.is(f16.bind(py)) => Storage::F16,
        _ => Storage::F32,
    })
}

/// The tensor `Borrows` reads for `storage`: itself for float32, else its bytes (a uint8 view
/// of the same memory; `Borrows` knows no 16-bit float dtypes).
fn bytes_of<'py>(
    op: &str,
    name: &str,
    t: &Bound<'py, PyAny>,
    storage: Storage,
) -> PyResult<Bound<'py, PyAny>> {
    if storage == Storage::F32 {
        return Ok(t.clone());
    }
    if storage_of(t)? != storage {
        let want = if storage == Storage::Bf16 {
            "bfloat16"
        } else {
            "float16"
        };
        return Err(FgError::Type(format!("{op}: {name} must be a torch.{want} tensor")).into());
    }
    let py = t.py();
    if !t
        .call_method0(intern!(py, "is_contiguous"))?
        .extract::<bool>()?
        || t.call_method0(intern!(py, "dim"))?.extract::<usize>()? == 0
    {
        return Err(FgError::Value(format!(
            "{op}: {name} must be a contiguous tensor of at least one dimension"
        ))
        .into());
    }
    t.call_method1(intern!(py, "view"), (dtypes(py)?[2].bind(py),))
}

/// A storage type and how its slices are borrowed from the tensor `bytes_of` returned.
trait Stored: Kernels {
    fn read<'a>(args: &mut Borrows, ctx: Ctx, t: &'a Bound<'_, PyAny>) -> PyResult<&'a [Self]>;
    #[allow(clippy::mut_from_ref)]
    fn write<'a>(args: &mut Borrows, ctx: Ctx, t: &'a Bound<'_, PyAny>)
        -> PyResult<&'a mut [Self]>;
}

impl Stored for f32 {
    fn read<'a>(args: &mut Borrows, ctx: Ctx, t: &'a Bound<'_, PyAny>) -> PyResult<&'a [f32]> {
        args.read(ctx.1, t)
    }
    fn write<'a>(args: &mut Borrows, ctx: Ctx, t: &'a Bound<'_, PyAny>) -> PyResult<&'a mut [f32]> {
        args.write(ctx.1, t)
    }
}

/// (op, argument name) of a tensor being borrowed.
type Ctx<'s> = (&'s str, &'s str);

/// The 16-bit elements over `bytes`, refused unless 2-byte aligned.
fn halves((op, name): Ctx, bytes: &[u8]) -> PyResult<(usize, usize)> {
    let ptr = bytes.as_ptr() as usize;
    if !ptr.is_multiple_of(2) {
        return Err(FgError::Value(format!("{op}: {name}'s data is not 2-byte aligned")).into());
    }
    Ok((ptr, bytes.len() / 2))
}

macro_rules! stored_16 {
    ($($t:ty),*) => {$(
        impl Stored for $t {
            fn read<'a>(
                args: &mut Borrows,
                ctx: Ctx,
                t: &'a Bound<'_, PyAny>,
            ) -> PyResult<&'a [$t]> {
                let bytes: &[u8] = args.read(ctx.1, t)?;
                let (ptr, len) = halves(ctx, bytes)?;
                // SAFETY: `Borrows` checked the tensor's bytes (kept alive for 'a by `t`); the
                // elements are aligned and have no invalid bit patterns.
                Ok(unsafe { std::slice::from_raw_parts(ptr as *const $t, len) })
            }
            fn write<'a>(
                args: &mut Borrows,
                ctx: Ctx,
                t: &'a Bound<'_, PyAny>,
            ) -> PyResult<&'a mut [$t]> {
                let bytes: &mut [u8] = args.write(ctx.1, t)?;
                let (ptr, len) = halves(ctx, bytes)?;
                // SAFETY: as in `read`; `Borrows` made sure nothing else overlaps it.
                Ok(unsafe { std::slice::from_raw_parts_mut(ptr as *mut $t, len) })
            }
        }
    )*};
}

stored_16!(Bf16, F16);

fn forward_as<E: Stored>(
    py: Python<'_>,
    op: &str,
    level: SimdLevel,
    (x, out): (&Bound<'_, PyAny>, &Bound<'_, PyAny>),
    layout: Layout,
    log: bool,
) -> PyResult<()> {
    let mut args = Borrows::new(op);
    let x = E::read(&mut args, (op, "x"), x)?;
    let out = E::write(&mut args, (op, "out"), out)?;
    run_detached(py, op, || {
        softmax::softmax_forward(level, x, out, layout, log)
    })
}

fn backward_as<E: Stored>(
    py: Python<'_>,
    op: &str,
    level: SimdLevel,
    (y, grad_out, grad_in): (&Bound<'_, PyAny>, &Bound<'_, PyAny>, &Bound<'_, PyAny>),
    layout: Layout,
    log: bool,
) -> PyResult<()> {
    let mut args = Borrows::new(op);
    let y = E::read(&mut args, (op, "y"), y)?;
    let grad_out = E::read(&mut args, (op, "grad_out"), grad_out)?;
    let grad_in = E::write(&mut args, (op, "grad_in"), grad_in)?;
    run_detached(py, op, || {
        softmax::softmax_backward(level, y, grad_out, grad_in, layout, log)
    })
}

/// Softmax (`log=False`) or log-softmax of `x` seen as `[outer, n, inner]` over `n`, into `out`
/// (float32, bfloat16 or float16, both of one dtype).
#[pyfunction]
#[pyo3(signature = (x, out, outer, n, inner, log=false))]
fn softmax_forward(
    py: Python<'_>,
    x: Bound<'_, PyAny>,
    out: Bound<'_, PyAny>,
    outer: usize,
    n: usize,
    inner: usize,
    log: bool,
) -> PyResult<()> {
    let op = if log { "log_softmax" } else { "softmax" };
    let level = simd::active()?;
    let storage = storage_of(&x)?;
    let xb = bytes_of(op, "x", &x, storage)?;
    let ob = bytes_of(op, "out", &out, storage)?;
    let layout = Layout { outer, n, inner };
    let t = (&xb, &ob);
    match storage {
        Storage::F32 => forward_as::<f32>(py, op, level, t, layout, log),
        Storage::Bf16 => forward_as::<Bf16>(py, op, level, t, layout, log),
        Storage::F16 => forward_as::<F16>(py, op, level, t, layout, log),
    }
}

/// The input gradient of softmax / log-softmax from its output `y` and `grad_out` (one dtype).
#[pyfunction]
#[pyo3(signature = (y, grad_out, grad_in, outer, n, inner, log=false))]
#[allow(clippy::too_many_arguments)]
fn softmax_backward(
    py: Python<'_>,
    y: Bound<'_, PyAny>,
    grad_out: Bound<'_, PyAny>,
    grad_in: Bound<'_, PyAny>,
    outer: usize,
    n: usize,
    inner: usize,
    log: bool,
) -> PyResult<()> {
    let op = if log {
        "log_softmax_backward"
    } else {
        "softmax_backward"
    };
    let level = simd::active()?;
    let storage = storage_of(&y)?;
    let yb = bytes_of(op, "y", &y, storage)?;
    let gb = bytes_of(op, "grad_out", &grad_out, storage)?;
    let ib = bytes_of(op, "grad_in", &grad_in, storage)?;
    let layout = Layout { outer, n, inner };
    let t = (&yb, &gb, &ib);
    match storage {
        Storage::F32 => backward_as::<f32>(py, op, level, t, layout, log),
        Storage::Bf16 => backward_as::<Bf16>(py, op, level, t, layout, log),
        Storage::F16 => backward_as::<F16>(py, op, level, t, layout, log),
    }
}

/// The classic three-pass softmax over contiguous rows of length `n` (benchmark baseline,
/// `dev` builds only).
#[cfg(any(test, feature = "dev"))]
#[pyfunction]
#[pyo3(signature = (x, out, n, variant="reload"))]
fn softmax_three_pass(
    py: Python<'_>,
    x: Bound<'_, PyAny>,
    out: Bound<'_, PyAny>,
    n: usize,
    variant: &str,
) -> PyResult<()> {
    use crate::error::FgError;
    use crate::softmax::ThreePass;

    let op = "softmax_three_pass";
    let variant = match variant {
        "reload" => ThreePass::Reload,
        "recompute" => ThreePass::Recompute,
        other => {
            return Err(FgError::Value(format!(
                "{op}: variant must be 'reload' or 'recompute', got {other:?}"
            ))
            .into())
        }
    };
    let level = simd::active()?;
    let mut args = Borrows::new(op);
    let x = args.read("x", &x)?;
    let out = args.write("out", &out)?;
    run_detached(py, op, || {
        softmax::softmax_three_pass(level, x, out, n, variant)
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(softmax_forward, m)?)?;
    m.add_function(wrap_pyfunction!(softmax_backward, m)?)?;
    #[cfg(any(test, feature = "dev"))]
    m.add_function(wrap_pyfunction!(softmax_three_pass, m)?)?;
    Ok(())
}
