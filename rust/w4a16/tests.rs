use std::cell::Cell;

use super::gemv::X_INT_MAX;
use super::*;
use crate::simd::SimdLevel;

thread_local! {
    /// The GEMM arithmetic a test asks for (`Arith::of_cpu`); None: this CPU's.
    #[cfg(target_arch = "x86_64")]
    pub(super) static GEMM_ARITH: Cell<Option<gemm::Arith>> = const { Cell::new(None) };
}

fn weight(n: usize, k: usize) -> Vec<f32> {
    (0..n * k)
        .map(|i| ((i * 7919 % 997) as f32 / 99.7 - 5.0) * 0.1)
        .collect()
}

/// W quantized and packed as `gemv` reads it, with its codes unpacked.
struct Quantized {
    codes: Vec<u8>,
    scales: Vec<f32>,
    zeros: Vec<u8>,
    packed: Vec<u8>,
    shape: Shape,
}

impl Quantized {
    fn new(level: SimdLevel, w: &[f32], shape: Shape, zero_point: bool) -> Quantized {
        quantized(level, w, shape, zero_point).unwrap()
    }

    fn weight(&self) -> PackedW4<'_> {
        PackedW4 {
            packed: &self.packed,
            scales: Scales::F32(&self.scales),
            zeros: &self.zeros,
            shape: self.shape,
        }
    }
}

/// `quantize` into the packed layout, with the stored codes read back out of it.
fn quantized(level: SimdLevel, w: &[f32], shape: Shape, zero_point: bool) -> FgResult<Quantized> {
    let (n, k, groups) = (shape.n, shape.k, shape.groups());
    let mut q = Quantized {
        codes: vec![0u8; n * k],
        scales: vec![0.0f32; n * groups],
        zeros: vec![0u8; n * groups],
        packed: vec![0u8; n * packed_row_bytes(k)],
        shape,
    };
    quantize(
        level,
        w,
        shape,
        zero_point,
        &mut q.packed,
        &mut q.scales,
        &mut q.zeros,
    )?;
    let row_bytes = packed_row_bytes(k);
    for (r, codes) in q.codes.chunks_mut(k).enumerate() {
        let row = &q.packed[r * row_bytes..(r + 1) * row_bytes];
        for (c, code) in codes.iter_mut().enumerate() {
            *code = pack::packed_code(row, c);
        }
        // Columns past K (the last block's padding) hold 0.
        assert!((k..k.div_ceil(BLOCK) * BLOCK).all(|c| pack::packed_code(row, c) == 0));
    }
    Ok(q)
}

/// Quantizes, packs, then checks unpacking and the GEMV against W_hat from `dequantize`.
fn round_trip(level: SimdLevel, n: usize, k: usize, group_size: i64, zero_point: bool) {
    let shape = Shape::new("test", n, k, group_size).unwrap();
    let q = Quantized::new(level, &weight(n, k), shape, zero_point);
    let (codes, scales, zeros) = (&q.codes, &q.scales, &q.zeros);
    let pw = q.weight();
    let mut w_hat = vec![0.0f32; n * k];
    dequantize(level, &pw, 0..n, &mut w_hat).unwrap();
    let w = weight(n, k);
    // Round to nearest: half a step off at most (a step where the zero point's rounding shifts
    // the grid against the range's top).
    let tolerance = if zero_point { 1.0 } else { 0.5 };
    for (i, (&q, &v)) in codes.iter().zip(&w_hat).enumerate() {
        let g = (i % k) / shape.group_size + (i / k) * shape.groups();
        assert_eq!(v, (q as f32 - zeros[g] as f32) * scales[g]);
        assert!(
            (w[i] - v).abs() <= tolerance * scales[g] * 1.0001,
            "{level:?} g{group_size} element {i}: {} -> {v}",
            w[i]
        );
    }
    // 1 to 4 rows of x take the VNNI kernel's passes of 4, 2 and 2 rows of W; 9 two passes.
    for m in [1, 2, 3, 4, 5, 9] {
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0)
            .collect();
        let mut y = vec![0.0f32; m * n];
        gemv(level, &pw, Rows::F32(&x), &mut y).unwrap();
        for i in 0..m {
            for r in 0..n {
                let want: f64 = (0..k)
                    .map(|c| x[i * k + c] as f64 * w_hat[r * k + c] as f64)
                    .sum();
                let scale: f64 = (0..k)
                    .map(|c| (x[i * k + c] * w_hat[r * k + c]).abs() as f64)
                    .sum();
                assert!(
                    (y[i * n + r] as f64 - want).abs() <= 1e-4 * scale,
                    "{level:?} g{group_size} m{m} ({i},{r})"
                );
            }
        }
    }
}

#[test]
fn non_finite_weights_and_overflowing_ranges_are_refused() {
    for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
        let shape = Shape::new("test", 3, 40, 16).unwrap();
        for (bad, zero_point, want) in [
            (f32::NAN, true, "holds NaN or infinity (row 2)"),
            (f32::NAN, false, "holds NaN or infinity (row 2)"),
            (f32::INFINITY, true, "holds NaN or infinity (row 2)"),
            (f32::NEG_INFINITY, false, "holds NaN or infinity (row 2)"),
            (-3e38, true, "weight row 2 has a range"),
        ] {
            let mut w = weight(3, 40);
            w[2 * 40 + 37] = bad; // in the last row's last, short group
            if bad == -3e38 {
                w[2 * 40 + 33] = 3e38;
            }
            let err = quantized(level, &w, shape, zero_point)
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains(want), "{level:?} {bad} {zero_point}: {err}");
        }
    }
}

#[test]
fn quantize_pack_gemv_on_every_level() {
    for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
        for (n, k) in [(3, 64), (70, 100), (9, 320)] {
            for (g, zp) in [
                (32, true),
                (64, false),
                (128, true),
                (-1, false),
                (96, true),
            ] {
                if g == -1 && k % 32 != 0 {
                    continue; // the GEMV needs whole half blocks
                }
                round_trip(level, n, k, g, zp);
            }
        }
    }
}

/// The GEMM in each arithmetic against the float64 product with W_hat: bf16 x exactly (its
/// products are exact), float32 x within its two bf16 terms (`vdpbf16ps`) or its rounded
/// multiply-adds; m past one vector of rows, odd n and k tails.
#[test]
#[cfg(target_arch = "x86_64")]
fn gemm_matches_the_dequantized_product() {
    for arith in [gemm::Arith::Bf16, gemm::Arith::Fma] {
        GEMM_ARITH.set(Some(arith));
        gemm_matches_in_this_arithmetic();
    }
    GEMM_ARITH.set(None);
}

#[cfg(target_arch = "x86_64")]
fn gemm_matches_in_this_arithmetic() {
    let level = crate::simd::detected();
    for (n, k, g) in [
        (13, 64, 32),
        (25, 100, -1),
        (30, 320, 64),
        (12, 256, 128),
        (7, 33, -1),
    ] {
        let shape = Shape::new("test", n, k, g).unwrap();
        if !gemm_supported(level, shape) {
            return; // no AVX-512 BF16 here
        }
        let q = Quantized::new(level, &weight(n, k), shape, g != 64);
        let mut w_hat = vec![0.0f32; n * k];
        dequantize(level, &q.weight(), 0..n, &mut w_hat).unwrap();
        for m in [1, 8, 9, 16, 17, 33, 40, 300] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let x16: Vec<Bf16> = x.iter().map(|&v| Bf16(simd::f32_to_bf16(v))).collect();
            for bf in [false, true] {
                let rows = if bf { Rows::Bf16(&x16) } else { Rows::F32(&x) };
                let mut y = vec![f32::NAN; m * n];
                assert!(matmul(level, &q.weight(), rows, &mut y).unwrap());
                for i in 0..m {
                    for r in 0..n {
                        let (want, size) = (0..k).fold((0.0f64, 0.0f64), |(s, a), c| {
                            let p = rows.get(i * k + c) as f64 * w_hat[r * k + c] as f64;
                            (s + p, a + p.abs())
                        });
                        let err = (y[i * n + r] as f64 - want).abs();
                        let tol = if bf { 1e-6 } else { 2e-5 } * size;
                        assert!(err <= tol, "bf16 {bf} n{n} k{k} g{g} m{m} ({i},{r}): {err}");
                    }
                }
            }
        }
    }
}

/// A row of x of subnormal size: the FMA GEMM keeps it (matches float64), the `vdpbf16ps` one
/// would flush it, so there the call leaves it to the float path (`matmul` returns false).
#[test]
#[cfg(target_arch = "x86_64")]
fn rows_of_subnormal_size_take_the_fma_gemm_only() {
    let level = crate::simd::detected();
    let (n, k, m) = (20, 256, 40);
    let shape = Shape::new("test", n, k, 128).unwrap();
    if !gemm_supported(level, shape) {
        return;
    }
    let q = Quantized::new(level, &weight(n, k), shape, true);
    let mut w_hat = vec![0.0f32; n * k];
    dequantize(level, &q.weight(), 0..n, &mut w_hat).unwrap();
    let mut x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
        .collect();
    x[k..2 * k].iter_mut().for_each(|v| *v *= 3e-40); // largest 2.1e-39: subnormal
    for arith in [gemm::Arith::Bf16, gemm::Arith::Fma] {
        GEMM_ARITH.set(Some(arith));
        let mut y = vec![f32::NAN; m * n];
        let took = matmul(level, &q.weight(), Rows::F32(&x), &mut y).unwrap();
        GEMM_ARITH.set(None);
        assert_eq!(took, arith == gemm::Arith::Fma, "{arith:?}");
        if !took {
            continue;
        }
        for r in 0..n {
            let (want, size) = (0..k).fold((0.0f64, 0.0f64), |(s, a), c| {
                let p = x[k + c] as f64 * w_hat[r * k + c] as f64;
                (s + p, a + p.abs())
            });
            let err = (y[n + r] as f64 - want).abs();
            assert!(
                err <= 2e-5 * size + 1e-44,
                "({r}): {} against {want}",
                y[n + r]
            );
            assert!(y[n + r] != 0.0 || want == 0.0);
        }
    }
}

/// The integer kernels' int16 sums at their limit: every code 15 but each group's first,
/// every low byte of x̃ = 32384 = 256 * 127 - 128 at -128, groups of up to whole rows (several
/// int16 flushes each). x̃ is exact here, so only float rounding may remain.
#[test]
fn int16_sums_at_their_limit_do_not_wrap() {
    let (n, k) = (3, 1024);
    let x: Vec<f32> = (0..k)
        .map(|c| if c == 0 { X_INT_MAX } else { 32384.0 })
        .collect();
    for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
        for group_size in [32, 96, 128, 512, -1] {
            let shape = Shape::new("test", n, k, group_size).unwrap();
            // Each group's -1 takes code 0, its 2s code 15 (scale 0.2, zero 5).
            let w: Vec<f32> = (0..n * k)
                .map(|i| {
                    if i % k % shape.group_size == 0 {
                        -1.0
                    } else {
                        2.0
                    }
                })
                .collect();
            let q = Quantized::new(level, &w, shape, true);
            let fifteens = q.codes.iter().filter(|&&c| c == 15).count();
            assert_eq!(fifteens, n * (k - shape.groups()));
            let mut w_hat = vec![0.0f32; n * k];
            dequantize(level, &q.weight(), 0..n, &mut w_hat).unwrap();
            let mut y = vec![0.0f32; n];
            gemv(level, &q.weight(), Rows::F32(&x), &mut y).unwrap();
            for (r, &got) in y.iter().enumerate() {
                let row = &w_hat[r * k..(r + 1) * k];
                let want: f64 = x.iter().zip(row).map(|(&a, &b)| a as f64 * b as f64).sum();
                let size: f64 = x.iter().zip(row).map(|(&a, &b)| (a * b).abs() as f64).sum();
                assert!(
                    (got as f64 - want).abs() <= 1e-6 * size,
                    "{level:?} g{group_size} row {r}: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn zero_groups_get_scale_one_and_symmetric_codes_are_offset() {
    let shape = Shape::new("test", 1, 8, -1).unwrap();
    let q = quantized(SimdLevel::Scalar, &[0.0; 8], shape, false).unwrap();
    assert_eq!((q.scales[0], q.zeros[0]), (1.0, SYMMETRIC_ZERO));
    assert!(q.codes.iter().all(|&q| q == SYMMETRIC_ZERO));
    let w = [-7.0, 7.0, 3.5, 0.0, -1.0, 1.0, 2.0, -2.0];
    let q = quantized(SimdLevel::Scalar, &w, shape, false).unwrap();
    assert_eq!(q.scales[0], 1.0);
    assert_eq!(q.codes, [1, 15, 12, 8, 7, 9, 10, 6]); // 3.5 rounds half to even: 4
}

#[test]
fn bad_shapes_are_value_errors() {
    assert!(matches!(Shape::new("t", 2, 8, 0), Err(FgError::Value(_))));
    assert!(matches!(Shape::new("t", 2, 0, 32), Err(FgError::Value(_))));
    let shape = Shape::new("t", 2, 8, 8).unwrap();
    let r = quantize(
        SimdLevel::Scalar,
        &[0.0; 15],
        shape,
        true,
        &mut [0; 16],
        &mut [0.0; 2],
        &mut [0; 2],
    );
    assert!(matches!(r, Err(FgError::Value(_))));
}

#[test]
fn zero_point_ranges_hold_zero_and_an_overflowing_range_is_an_error() {
    let shape = Shape::new("test", 1, 4, -1).unwrap();
    let run = |w: &[f32]| {
        quantized(SimdLevel::Scalar, w, shape, true).map(|q| (q.codes, q.scales[0], q.zeros[0]))
    };
    // All positive: the range is [0, 15], zero 0, each weight its own code.
    assert_eq!(
        run(&[10.0, 11.0, 15.0, 12.0]),
        Ok((vec![10, 11, 15, 12], 1.0, 0))
    );
    // Constant: one step of 3 / 15 per code, the weights at code 15.
    let (codes, scale, zero) = run(&[-3.0; 4]).unwrap();
    assert_eq!((codes, scale, zero), (vec![0; 4], 0.2, 15));
    assert!(
        matches!(run(&[-3e38, 3e38, 0.0, 1.0]), Err(FgError::Value(m)) if m.contains("weight row 0"))
    );
}

#[test]
fn float16_scales_read_exactly() {
    for bits in 0..=u16::MAX {
        let (sign, exp, man) = (bits >> 15, (bits >> 10) & 31, (bits & 1023) as f64);
        let magnitude = match exp {
            0 => man * 2f64.powi(-24),
            31 if man == 0.0 => f64::INFINITY,
            31 => f64::NAN,
            e => (1.0 + man / 1024.0) * 2f64.powi(e as i32 - 15),
        };
        let want = if sign == 1 { -magnitude } else { magnitude };
        let got = crate::simd::f16_to_f32(bits);
        let mut sliced = [0.0f32; 9];
        crate::simd::f16_to_f32_slice(&[F16(bits); 9], &mut sliced);
        assert!(sliced
            .iter()
            .all(|v| v.to_bits() == got.to_bits() || v.is_nan() && got.is_nan()));
        if want.is_nan() {
            assert!(got.is_nan() && got.to_bits() & 0x1fff == 0, "{bits:#06x}");
        } else {
            assert_eq!(got as f64, want, "{bits:#06x}");
            assert_eq!(got.is_sign_negative(), sign == 1, "{bits:#06x}");
        }
    }
}
