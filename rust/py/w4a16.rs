//! W4A16 wrappers: quantize (into the CPU layout), GEMV and block dequantization.

use pyo3::prelude::*;

use super::run_detached;
use super::tensor::{with_float, Borrows, Float};
use crate::error::FgResult;
use crate::simd::{self, Bf16, SimdLevel};
use crate::w4a16::{self, PackedW4, Rows, Scales, Shape};

/// The CPU layout's packed codes [n, packed_row_bytes(k)], scales and zeros [n, groups] of the
/// float32, bfloat16 or float16 weight [n, k].
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn w4_quantize(
    py: Python<'_>,
    weight: Bound<'_, PyAny>,
    n: usize,
    k: usize,
    group_size: i64,
    zero_point: bool,
    packed: Bound<'_, PyAny>,
    scales: Bound<'_, PyAny>,
    zeros: Bound<'_, PyAny>,
) -> PyResult<()> {
    let op = "quantize_w4";
    let level = simd::active()?;
    let shape = Shape::new(op, n, k, group_size)?;
    let mut args = Borrows::new(op);
    with_float!(&weight, E => {
        let w = args.read::<E>("weight", &weight)?;
        let packed = args.write("packed", &packed)?;
        let scales = args.write("scales", &scales)?;
        let zeros = args.write("zeros", &zeros)?;
        run_detached(py, op, || {
            w4a16::quantize(level, w, shape, zero_point, packed, scales, zeros)
        })
    })
}

/// The packed weight over the caller's arrays, its scales read in their stored dtype.
fn packed_weight<'a>(
    args: &mut Borrows<'_>,
    packed: &'a Bound<'_, PyAny>,
    scales: &'a Bound<'_, PyAny>,
    zeros: &'a Bound<'_, PyAny>,
    (op, n, k, group_size): (&str, usize, usize, i64),
) -> PyResult<PackedW4<'a>> {
    let scales = match Float::of(scales)? {
        Float::F32 => Scales::F32(args.read("scales", scales)?),
        Float::F16 => Scales::F16(args.read("scales", scales)?),
        Float::Bf16 => Scales::Bf16(args.read("scales", scales)?),
    };
    Ok(PackedW4 {
        packed: args.read("packed", packed)?,
        scales,
        zeros: args.read("zeros", zeros)?,
        shape: Shape::new(op, n, k, group_size)?,
    })
}

/// x's rows, float32 or bfloat16.
fn rows<'a>(args: &mut Borrows<'_>, x: &'a Bound<'_, PyAny>) -> PyResult<Rows<'a>> {
    Ok(match Float::of(x)? {
        Float::Bf16 => Rows::Bf16(args.read("x", x)?),
        _ => Rows::F32(args.read("x", x)?),
    })
}

thread_local! {
    /// The float32 y of bfloat16 outputs ([`Out::run`]), kept per calling thread
    /// (`memory::take` / `keep`).
    static WIDE_Y: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// y as the caller holds it: float32, or bfloat16 (bf16 x: no float32 y and cast per call).
enum Out<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [Bf16]),
}

impl Out<'_> {
    fn of<'a>(args: &mut Borrows<'_>, y: &'a Bound<'_, PyAny>) -> PyResult<Out<'a>> {
        Ok(match Float::of(y)? {
            Float::Bf16 => Out::Bf16(args.write("y", y)?),
            _ => Out::F32(args.write("y", y)?),
        })
    }

    /// Runs `kernel` (whether it wrote y) into y: in place for float32; for bfloat16 into a
    /// float32 scratch, rounded into y once where the kernel wrote it.
    fn run(
        self,
        level: SimdLevel,
        kernel: impl FnOnce(&mut [f32]) -> FgResult<bool>,
    ) -> FgResult<bool> {
        match self {
            Out::F32(y) => kernel(y),
            Out::Bf16(y) => {
                let mut wide = crate::memory::take(&WIDE_Y, y.len());
                let wrote = kernel(&mut wide);
                if matches!(wrote, Ok(true)) {
                    simd::narrow_bf16(level, &wide, y);
                }
                crate::memory::keep(&WIDE_Y, wide);
                wrote
            }
        }
    }
}

/// y [m, n] = x [m, k] · Wᵀ by the GEMV (group size a multiple of 32).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn w4_gemv(
    py: Python<'_>,
    packed: Bound<'_, PyAny>,
    scales: Bound<'_, PyAny>,
    zeros: Bound<'_, PyAny>,
    n: usize,
    k: usize,
    group_size: i64,
    x: Bound<'_, PyAny>,
    y: Bound<'_, PyAny>,
) -> PyResult<()> {
    let op = "w4a16_matmul";
    let level = simd::active()?;
    let mut args = Borrows::new(op);
    let w = packed_weight(&mut args, &packed, &scales, &zeros, (op, n, k, group_size))?;
    let x = rows(&mut args, &x)?;
    let y = Out::of(&mut args, &y)?;
    run_detached(py, op, || {
        y.run(level, |y| w4a16::gemv(level, &w, x, y).map(|()| true))
            .map(|_| ())
    })
}

/// y [m, n] = x [m, k] · Wᵀ by the AVX-512 GEMM (on CPUs with AVX-512 BF16); False (y
/// untouched) where this CPU or the group size does not allow it.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn w4_gemm(
    py: Python<'_>,
    packed: Bound<'_, PyAny>,
    scales: Bound<'_, PyAny>,
    zeros: Bound<'_, PyAny>,
    n: usize,
    k: usize,
    group_size: i64,
    x: Bound<'_, PyAny>,
    y: Bound<'_, PyAny>,
) -> PyResult<bool> {
    let op = "w4a16_matmul";
    let level = simd::active()?;
    let mut args = Borrows::new(op);
    let w = packed_weight(&mut args, &packed, &scales, &zeros, (op, n, k, group_size))?;
    let x = rows(&mut args, &x)?;
    let y = Out::of(&mut args, &y)?;
    run_detached(py, op, || y.run(level, |y| w4a16::matmul(level, &w, x, y)))
}

/// The GEMM's multiply on this CPU: "bf16" (`vdpbf16ps`) or "fma" (float32 multiply-adds).
#[pyfunction]
fn w4_gemm_arith() -> &'static str {
    w4a16::gemm_arith()
}

/// Rows row0..row1 of W as float32 into `out` [row1 - row0, k].
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn w4_dequantize(
    py: Python<'_>,
    packed: Bound<'_, PyAny>,
    scales: Bound<'_, PyAny>,
    zeros: Bound<'_, PyAny>,
    n: usize,
    k: usize,
    group_size: i64,
    row0: usize,
    row1: usize,
    out: Bound<'_, PyAny>,
) -> PyResult<()> {
    let op = "dequantize";
    let level = simd::active()?;
    let mut args = Borrows::new(op);
    let w = packed_weight(&mut args, &packed, &scales, &zeros, (op, n, k, group_size))?;
    let out = args.write("out", &out)?;
    run_detached(py, op, || w4a16::dequantize(level, &w, row0..row1, out))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(w4_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(w4_gemv, m)?)?;
    m.add_function(wrap_pyfunction!(w4_gemm, m)?)?;
    m.add_function(wrap_pyfunction!(w4_gemm_arith, m)?)?;
    m.add_function(wrap_pyfunction!(w4_dequantize, m)?)?;
    Ok(())
}
