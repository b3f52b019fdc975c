use super::element::Lanes;
use super::*;
use crate::error::FgError;
use crate::simd::{Bf16, SimdLevel, F16};

fn levels() -> impl Iterator<Item = SimdLevel> {
    SimdLevel::ALL.into_iter().filter(|l| l.is_supported())
}

fn reference(x: &[f32], log: bool) -> Vec<f64> {
    let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
    x.iter()
        .map(|&v| {
            if log {
                v as f64 - max - sum.ln()
            } else {
                (v as f64 - max).exp() / sum
            }
        })
        .collect()
}

/// A deterministic spread of values (no RNG dependency).
fn data(len: usize, spread: f32) -> Vec<f32> {
    let mut s = 0x9e37_79b9_u32;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32 - 0.5) * spread
        })
        .collect()
}

/// The accuracy bounds; `rel` is the softmax bound (2e-6 for the two-pass kernels).
fn assert_close_rel(got: &[f32], want: &[f64], log: bool, rel: f64, what: &str) {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if log {
            (g as f64 - w).abs() <= 1e-5 * w.abs().max(1.0)
        } else {
            w < 1e-30 || ((g as f64 - w) / w).abs() <= rel
        };
        assert!(ok, "{what}: element {i}: got {g}, want {w}");
    }
}

fn assert_close(got: &[f32], want: &[f64], log: bool, what: &str) {
    assert_close_rel(got, want, log, 2e-6, what)
}

#[test]
fn rows_match_f64_on_every_path() {
    for level in levels() {
        for &(rows, n) in &[(3, 1), (5, 17), (2, 1000), (1, 70_001), (4, 40_000)] {
            let x = data(rows * n, 40.0);
            for log in [false, true] {
                let mut y = vec![0.0; x.len()];
                let layout = Layout {
                    outer: rows,
                    n,
                    inner: 1,
                };
                softmax_forward(level, &x, &mut y, layout, log).unwrap();
                for r in 0..rows {
                    let want = reference(&x[r * n..(r + 1) * n], log);
                    let what = format!("{level:?} {rows}x{n} log={log}");
                    assert_close(&y[r * n..(r + 1) * n], &want, log, &what);
                }
            }
        }
    }
}

#[test]
fn columns_match_rows_of_the_transpose() {
    let (outer, n, inner) = (3, 37, 21);
    let x = data(outer * n * inner, 20.0);
    for level in levels() {
        for log in [false, true] {
            let mut y = vec![0.0; x.len()];
            softmax_forward(level, &x, &mut y, Layout { outer, n, inner }, log).unwrap();
            for o in 0..outer {
                for j in 0..inner {
                    let col: Vec<f32> = (0..n).map(|k| x[o * n * inner + k * inner + j]).collect();
                    let got: Vec<f32> = (0..n).map(|k| y[o * n * inner + k * inner + j]).collect();
                    assert_close(
                        &got,
                        &reference(&col, log),
                        log,
                        &format!("{level:?} col {o},{j}"),
                    );
                }
            }
        }
    }
}

#[test]
fn special_values_follow_torch() {
    let inf = f32::INFINITY;
    for level in levels() {
        let mut y = [0.0f32; 3];
        let layout = Layout {
            outer: 1,
            n: 3,
            inner: 1,
        };
        softmax_forward(level, &[-inf, 0.0, 0.0], &mut y, layout, false).unwrap();
        assert_eq!(y, [0.0, 0.5, 0.5]);
        for bad in [[-inf, -inf, -inf], [inf, 0.0, 1.0], [f32::NAN, 0.0, 1.0]] {
            softmax_forward(level, &bad, &mut y, layout, false).unwrap();
            assert!(y.iter().all(|v| v.is_nan()), "{level:?} {bad:?} -> {y:?}");
        }
        softmax_forward(level, &[1e38, -1e38, 0.0], &mut y, layout, false).unwrap();
        assert_eq!(y, [1.0, 0.0, 0.0]);
    }
}

#[test]
fn backward_matches_formula() {
    let (rows, n) = (3, 300);
    let x = data(rows * n, 10.0);
    let dy = data(rows * n, 2.0);
    for level in levels() {
        for log in [false, true] {
            let layout = Layout {
                outer: rows,
                n,
                inner: 1,
            };
            let mut y = vec![0.0; x.len()];
            softmax_forward(level, &x, &mut y, layout, log).unwrap();
            let mut dx = vec![0.0; x.len()];
            softmax_backward(level, &y, &dy, &mut dx, layout, log).unwrap();
            for r in 0..rows {
                let (ys, gs) = (&y[r * n..(r + 1) * n], &dy[r * n..(r + 1) * n]);
                let red: f64 = if log {
                    gs.iter().map(|&g| g as f64).sum()
                } else {
                    ys.iter().zip(gs).map(|(&a, &b)| a as f64 * b as f64).sum()
                };
                for k in 0..n {
                    let (yk, gk) = (ys[k] as f64, gs[k] as f64);
                    let want = if log {
                        gk - yk.exp() * red
                    } else {
                        yk * (gk - red)
                    };
                    let got = dx[r * n + k] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "{level:?} {got} {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn three_pass_variants_agree_with_reference() {
    let (rows, n) = (3, 5000);
    let x = data(rows * n, 30.0);
    for level in levels() {
        for variant in [ThreePass::Reload, ThreePass::Recompute] {
            let mut y = vec![0.0; x.len()];
            softmax_three_pass(level, &x, &mut y, n, variant).unwrap();
            for r in 0..rows {
                let want = reference(&x[r * n..(r + 1) * n], false);
                // exp(x - max) rounds x - max to f32 first (as torch does): ~ulp(30) relative.
                let what = format!("{level:?} {variant:?}");
                assert_close_rel(&y[r * n..(r + 1) * n], &want, false, 1e-5, &what);
            }
        }
    }
}

#[test]
fn wrong_lengths_are_value_errors() {
    let layout = Layout {
        outer: 2,
        n: 3,
        inner: 1,
    };
    let err = softmax_forward(SimdLevel::Scalar, &[0.0; 5], &mut [0.0; 6], layout, false);
    assert!(matches!(err, Err(FgError::Value(m)) if m.starts_with("softmax:")));
}

#[inline(always)]
unsafe fn convert_impl<S: Lanes, E: Element>(
    narrow: &[E],
    widened: &mut [f32],
    wide: &[f32],
    narrowed: &mut [E],
) {
    for i in (0..narrow.len()).step_by(S::LANES) {
        S::store(
            widened.as_mut_ptr().add(i),
            E::load::<S>(narrow.as_ptr().add(i)),
        );
        E::store::<S>(narrowed.as_mut_ptr().add(i), S::load(wide.as_ptr().add(i)));
    }
}

crate::dispatch! {
    fn convert_bf16(narrow: &[Bf16], widened: &mut [f32], wide: &[f32], narrowed: &mut [Bf16])
        = convert_impl<Bf16>;
    fn convert_f16(narrow: &[F16], widened: &mut [f32], wide: &[f32], narrowed: &mut [F16])
        = convert_impl<F16>;
}

/// Every 16-bit pattern widens, and a spread of f32 values (ties, subnormals, overflow,
/// infinities, NaN) rounds, to the same bits on every path as on the scalar one.
#[test]
fn sixteen_bit_conversions_agree_on_every_path() {
    let bits: Vec<u16> = (0..=u16::MAX).collect();
    let mut wide: Vec<f32> = (0..=u16::MAX as u32)
        .map(|i| f32::from_bits(i.wrapping_mul(0x9e37_79b1)))
        .collect();
    // Ties and the edges of both formats.
    wide[..12].copy_from_slice(&[
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        65504.0,
        65520.0,
        65519.0,
        5.960_464_5e-8,
        8.940_697e-8,
        1e-8,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -0.0,
    ]);
    let run = |level: SimdLevel| {
        let (mut wb, mut nb) = (vec![0.0f32; bits.len()], vec![Bf16(0); bits.len()]);
        let (mut wf, mut nf) = (vec![0.0f32; bits.len()], vec![F16(0); bits.len()]);
        let b: Vec<Bf16> = bits.iter().map(|&b| Bf16(b)).collect();
        let f: Vec<F16> = bits.iter().map(|&b| F16(b)).collect();
        convert_bf16(level, &b, &mut wb, &wide, &mut nb);
        convert_f16(level, &f, &mut wf, &wide, &mut nf);
        (wb, nb, wf, nf)
    };
    let (wb, nb, wf, nf) = run(SimdLevel::Scalar);
    assert_eq!(
        nb[..4],
        [Bf16(0x3f80), Bf16(0x3f82), Bf16(0x4780), Bf16(0x4780)]
    );
    assert_eq!(
        nf[..8].iter().map(|h| h.0).collect::<Vec<_>>(),
        [0x3c04, 0x3c0c, 0x7bff, 0x7c00, 0x7bff, 0x0001, 0x0002, 0]
    );
    assert_eq!((nf[8].0, nf[9].0, nf[11].0), (0x7c00, 0xfc00, 0x8000));
    assert!(nb[10].0 & 0x7fff > 0x7f80 && nf[10].0 & 0x7fff > 0x7c00);
    assert_eq!(
        (wf[0x3c00], wf[0x0001], wf[0x7c00]),
        (1.0, 5.960_464_5e-8, f32::INFINITY)
    );
    assert_eq!((wb[0x3f80], wb[0xff80]), (1.0, f32::NEG_INFINITY));
    let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
    for level in levels().filter(|&l| l != SimdLevel::Scalar) {
        let (wb2, nb2, wf2, nf2) = run(level);
        for i in 0..bits.len() {
            assert!(
                same(wb[i], wb2[i]) && same(wf[i], wf2[i]),
                "{level:?}: widen {i:#x}"
            );
            let nan = wide[i].is_nan();
            assert!(nb[i] == nb2[i] || nan, "{level:?}: bf16({})", wide[i]);
            assert!(nf[i] == nf2[i] || nan, "{level:?}: f16({})", wide[i]);
        }
    }
}
