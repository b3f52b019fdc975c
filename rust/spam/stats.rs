//! Stable-SPAM's per-tensor gradient statistics in one pass: max |g| (AdaClip) and the sum of
//! squares of the clipped gradient (AdaGN's norm).
//!
//! The clip bound depends on max |g| itself, so the pass keeps, per fixed chunk of
//! [`CHUNK`] entries, the chunk's max |g| and its unclipped sum of squares; once the bound is
//! known, only the chunks holding an entry above it (spikes) are summed again with the clip,
//! every gradient's in one more parallel region. Sums run in f64 over 32 fixed lanes and chunks
//! combine in order, so the result is the same on every SIMD path and thread count. The first pass has no clip compiled in: 12.4
//! elements/ns on one Zen 4 core in cache, against 6.3-6.9 with the clip's compare and masked
//! multiply in every pass and 16 lanes (two vectors of f64 sums, add-latency bound).

use super::Param;
use crate::dispatch;
use crate::error::{FgError, FgResult};
use crate::simd::{Bf16, Simd, SimdLevel};
use crate::threads::{self, Disjoint};

/// Entries per partial result (a multiple of [`LANES`]).
const CHUNK: usize = 1 << 13;
/// How far ahead of the chunk being summed its gradient is prefetched: from memory a pass had
/// too few reads in flight (Xeon family 6 model 207, 2 threads, 128 MiB of cold gradients: 18
/// GB/s without, 24 GB/s at 8 KiB, 19-22 GB/s at 12-32 KiB; in cache unchanged).
const PREFETCH_BYTES: usize = 8 << 10;
/// Independent f64 sums: four AVX-512 vectors, enough to hide the add latency.
const LANES: usize = 32;
/// Chunks per parallel part at most, and at least (a part's fork costs about what summing
/// a few chunks does).
const MAX_PART: usize = 32;
const MIN_PART: usize = 4;

/// AdaClip's state after one step and the AdaGN input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdaClip {
    /// max |g| (NaN when g holds a NaN)
    pub max_abs: f64,
    /// The running max: gamma3 * previous + (1 - gamma3) * max_abs.
    pub running_max: f64,
    /// Entries with |g| > bound (in f32) are multiplied by ratio (in f32).
    pub bound: f64,
    pub ratio: f64,
    /// Sum of the squares of the clipped entries (f64).
    pub sum_sq: f64,
}

/// `acc + y * y`, rounded once: y * y of an f32 is exact in f64 (24-bit mantissas), so the
/// vector paths' fused multiply-add gives the same bits as the scalar path's add.
#[inline(always)]
fn add_square<S: Simd>(acc: f64, y: f64) -> f64 {
    if S::NATIVE_MATH {
        y.mul_add(y, acc)
    } else {
        acc + y * y
    }
}

/// Max |g| (NaN-propagating through the sum) and the sum of squares of `g`, clipped when
/// `clip` is given, for one chunk.
#[inline(always)]
unsafe fn chunk_impl<S: Simd, P: Param>(
    g: &[P],
    ahead: &[P],
    clip: Option<(f32, f32)>,
) -> (f32, f64) {
    match clip {
        None => lanes::<S, P, false>(g, ahead, 0.0, 1.0),
        Some((bound, ratio)) => lanes::<S, P, true>(g, ahead, bound, ratio),
    }
}

/// [`chunk_impl`] with the clip compiled in or out (the first pass over g has none); `ahead`
/// (entries a fixed distance past `g`, possibly fewer) is prefetched block by block.
#[inline(always)]
fn lanes<S: Simd, P: Param, const CLIP: bool>(
    g: &[P],
    ahead: &[P],
    bound: f32,
    ratio: f32,
) -> (f32, f64) {
    let mut max = [0.0f32; LANES];
    let mut acc = [0.0f64; LANES];
    let mut step = |i: usize, x: P| {
        let x = x.to_f32();
        let a = x.abs();
        max[i] = if a > max[i] { a } else { max[i] };
        let y = if CLIP && a > bound { x * ratio } else { x };
        acc[i] = add_square::<S>(acc[i], y as f64);
    };
    let mut blocks = g.chunks_exact(LANES);
    for (b, c) in (&mut blocks).enumerate() {
        crate::simd::prefetch_block(ahead, b * LANES, LANES);
        for (i, &x) in c.iter().enumerate() {
            step(i, x);
        }
    }
    for (i, &x) in blocks.remainder().iter().enumerate() {
        step(i, x);
    }
    crate::simd::fold_halves(LANES, |i, j| {
        acc[i] += acc[j];
        max[i] = if max[j] > max[i] { max[j] } else { max[i] };
    });
    // A NaN entry makes its square, hence the sum, NaN; the max comparisons skipped it.
    (if acc[0].is_nan() { f32::NAN } else { max[0] }, acc[0])
}

dispatch! {
    fn chunk_f32(g: &[f32], ahead: &[f32], clip: Option<(f32, f32)>) -> (f32, f64) = chunk_impl<f32>;
    fn chunk_bf16(g: &[Bf16], ahead: &[Bf16], clip: Option<(f32, f32)>) -> (f32, f64) = chunk_impl<Bf16>;
}

/// The dispatched chunk kernel of each parameter type.
pub trait StatsParam: Param {
    fn chunk(level: SimdLevel, g: &[Self], ahead: &[Self], clip: Option<(f32, f32)>) -> (f32, f64);
}

impl StatsParam for f32 {
    fn chunk(level: SimdLevel, g: &[f32], ahead: &[f32], clip: Option<(f32, f32)>) -> (f32, f64) {
        chunk_f32(level, g, ahead, clip)
    }
}

impl StatsParam for Bf16 {
    fn chunk(level: SimdLevel, g: &[Bf16], ahead: &[Bf16], clip: Option<(f32, f32)>) -> (f32, f64) {
        chunk_bf16(level, g, ahead, clip)
    }
}

/// A chunk to sum: gradient `t`'s chunk `c`, clipped with `clip` (None: unclipped).
type Job = (usize, usize, Option<(f32, f32)>);

/// (max |g|, sum of squares) of every job's chunk of `grads`, in one parallel region, in the
/// jobs' order.
fn sum_chunks<P: StatsParam>(level: SimdLevel, grads: &[&[P]], jobs: &[Job]) -> Vec<(f32, f64)> {
    let mut flat = vec![(0.0f32, 0.0f64); jobs.len()];
    let slots = Disjoint::new(&mut flat);
    // A few parts per thread: the tensors of a model (2^18-2^20 entries: 32-128 chunks) in
    // parts of 32 chunks ran on one thread, or on two with one doing twice the other's share.
    let part = threads::part_size(jobs.len()).clamp(MIN_PART, MAX_PART);
    let ah = PREFETCH_BYTES / std::mem::size_of::<P>();
    threads::for_each_chunk(jobs.len(), part, |_, r| {
        // SAFETY: the parts' job ranges are disjoint.
        let slots = unsafe { slots.piece(r.clone()) };
        for (slot, &(t, c, clip)) in slots.iter_mut().zip(&jobs[r]) {
            let g = grads[t];
            let r = c * CHUNK..((c + 1) * CHUNK).min(g.len());
            let ahead = &g[(r.start + ah).min(g.len())..(r.end + ah).min(g.len())];
            *slot = P::chunk(level, &g[r], ahead, clip);
        }
    });
    flat
}

/// One gradient's AdaClip inputs: `max_abs`, when given, replaces max |g| (the max over every
/// shard of a sharded gradient); `running_max` is the state's running max.
pub struct ClipInput<'a, P> {
    pub g: &'a [P],
    pub max_abs: Option<f64>,
    pub running_max: f64,
}

/// AdaClip's statistics of every gradient of `inputs`, their chunks in one parallel region (a
/// model's many small gradients pay one fork and join): with `max_abs` given one pass sums the
/// clipped squares; otherwise one pass finds max |g| and the chunk sums, and the chunks that
/// hold a clipped entry are summed again (a second region). `gamma3` and `correction`
/// (1 - gamma3^t) give the bound, in f64 as the optimizer's Python bookkeeping computes it.
pub fn adaclip_stats<P: StatsParam>(
    level: SimdLevel,
    inputs: &[ClipInput<'_, P>],
    gamma3: f64,
    correction: f64,
) -> FgResult<Vec<AdaClip>> {
    if correction.is_nan() || correction <= 0.0 {
        return Err(FgError::Value(format!(
            "adaclip_stats: correction must be positive, got {correction}"
        )));
    }
    let clip_of = |gmax: f64, running_max: f64| {
        let running_max = gamma3 * running_max + (1.0 - gamma3) * gmax;
        let bound = running_max / correction;
        let ratio = if gmax > 0.0 { bound / gmax } else { 1.0 };
        (running_max, bound, ratio)
    };
    let as_f32 = |(_, bound, ratio): (f64, f64, f64)| (bound as f32, ratio as f32);
    let grads: Vec<&[P]> = inputs.iter().map(|i| i.g).collect();
    let clips: Vec<_> = inputs
        .iter()
        .map(|i| i.max_abs.map(|gmax| as_f32(clip_of(gmax, i.running_max))))
        .collect();
    // Gradient t's chunks are entries bounds[t]..bounds[t + 1] of the job list and the results.
    let mut bounds = vec![0];
    bounds.extend(grads.iter().scan(0, |at, g| {
        *at += g.len().div_ceil(CHUNK);
        Some(*at)
    }));
    let own = |t: usize| bounds[t]..bounds[t + 1];
    let jobs: Vec<Job> = (0..grads.len())
        .flat_map(|t| {
            let clip = clips[t];
            (0..own(t).len()).map(move |c| (t, c, clip))
        })
        .collect();
    let mut parts = sum_chunks(level, &grads, &jobs);
    // Per gradient without a given max: max |g| over its chunks, and the chunks holding an
    // entry above its bound summed again, clipped, all in one parallel region (on the calling
    // thread, a step that clipped every chunk of 1e6 float32 entries took 278 us against 75 us
    // unclipped; now 164 us, Xeon family 6 model 207, 2 threads).
    let mut redo: Vec<Job> = Vec::new();
    let mut maxes: Vec<f64> = Vec::with_capacity(inputs.len());
    for (t, input) in inputs.iter().enumerate() {
        if let Some(gmax) = input.max_abs {
            maxes.push(gmax);
            continue;
        }
        let gmax = parts[own(t)].iter().fold(0.0f32, |acc, &(m, _)| {
            if m.is_nan() || acc.is_nan() {
                f32::NAN
            } else {
                acc.max(m)
            }
        }) as f64;
        let clip = as_f32(clip_of(gmax, input.running_max));
        for (c, part) in parts[own(t)].iter().enumerate() {
            if part.0 > clip.0 {
                redo.push((t, c, Some(clip)));
            }
        }
        maxes.push(gmax);
    }
    for (&(t, c, _), part) in redo.iter().zip(sum_chunks(level, &grads, &redo)) {
        parts[bounds[t] + c] = part;
    }
    let stats = inputs
        .iter()
        .zip(maxes)
        .enumerate()
        .map(|(t, (input, max_abs))| {
            let (running_max, bound, ratio) = clip_of(max_abs, input.running_max);
            AdaClip {
                max_abs,
                running_max,
                bound,
                ratio,
                sum_sq: parts[own(t)].iter().map(|&(_, s)| s).sum(),
            }
        });
    Ok(stats.collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One gradient's statistics.
    fn stats_of(
        level: SimdLevel,
        g: &[f32],
        max_abs: Option<f64>,
        running_max: f64,
        gamma3: f64,
        correction: f64,
    ) -> FgResult<AdaClip> {
        let input = ClipInput {
            g,
            max_abs,
            running_max,
        };
        Ok(adaclip_stats(level, &[input], gamma3, correction)?[0])
    }

    fn grad(n: usize) -> Vec<f32> {
        let mut g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        g[n / 2] = 300.0; // a spike in one chunk
        g
    }

    /// The rule in f64 with the clip in f32, over entries in order.
    fn naive(g: &[f32], running: f64, g3: f64, corr: f64) -> (f64, f64) {
        let gmax = g.iter().fold(0.0f32, |a, x| a.max(x.abs())) as f64;
        let bound = (g3 * running + (1.0 - g3) * gmax) / corr;
        let ratio = (bound / gmax) as f32;
        let sum = g
            .iter()
            .map(|&x| {
                let y = if x.abs() > bound as f32 { x * ratio } else { x } as f64;
                y * y
            })
            .sum();
        (gmax, sum)
    }

    #[test]
    fn one_pass_matches_the_rule_on_every_path() {
        let n = 70 * CHUNK + 123; // parts of several chunks on each thread
        let mut g = grad(n);
        g[3 * CHUNK + 7] = -280.0; // spikes in two parts
        let (gmax, sum) = naive(&g, 1.0, 0.999, 0.05);
        let mut results = Vec::new();
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            let s = stats_of(level, &g, None, 1.0, 0.999, 0.05).unwrap();
            assert_eq!(s.max_abs, gmax);
            assert!(
                (s.sum_sq - sum).abs() <= 1e-12 * sum,
                "{} vs {sum}",
                s.sum_sq
            );
            assert!(s.bound < 300.0); // the spike was clipped
            let given = stats_of(level, &g, Some(gmax), 1.0, 0.999, 0.05).unwrap();
            assert_eq!(given, s);
            results.push(s);
        }
        assert!(results.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn nan_propagates_and_empty_is_zero() {
        let mut g = grad(1000);
        g[10] = f32::NAN;
        let s = stats_of(SimdLevel::Scalar, &g, None, 0.0, 0.9, 0.1).unwrap();
        assert!(s.max_abs.is_nan() && s.sum_sq.is_nan());
        let empty: [f32; 0] = [];
        let s = stats_of(SimdLevel::Scalar, &empty, None, 0.0, 0.9, 0.1).unwrap();
        assert_eq!((s.max_abs, s.sum_sq, s.ratio), (0.0, 0.0, 1.0));
        assert!(stats_of(SimdLevel::Scalar, &g, None, 0.0, 0.9, 0.0).is_err());
    }

    #[test]
    fn many_gradients_get_each_their_own_statistics() {
        // Gradients of several sizes (one empty, one with a given max, one with a NaN) in one
        // call give the bits of one call each, on every path.
        let mut nan = grad(3 * CHUNK);
        nan[5] = f32::NAN;
        let grads = [
            grad(70 * CHUNK + 123),
            grad(100),
            Vec::new(),
            nan,
            grad(CHUNK),
        ];
        let given = [None, Some(400.0), None, None, None];
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            let inputs: Vec<_> = grads
                .iter()
                .zip(given)
                .enumerate()
                .map(|(i, (g, max_abs))| ClipInput {
                    g,
                    max_abs,
                    running_max: i as f64,
                })
                .collect();
            let all = adaclip_stats(level, &inputs, 0.99, 0.3).unwrap();
            for (i, (g, max_abs)) in grads.iter().zip(given).enumerate() {
                let alone = stats_of(level, g, max_abs, i as f64, 0.99, 0.3).unwrap();
                let same = |a: f64, b: f64| a == b || a.is_nan() && b.is_nan();
                let (a, b) = (all[i], alone);
                assert!(
                    same(a.max_abs, b.max_abs)
                        && same(a.sum_sq, b.sum_sq)
                        && same(a.bound, b.bound)
                        && same(a.ratio, b.ratio)
                        && same(a.running_max, b.running_max),
                    "{level:?} gradient {i}: {a:?} != {b:?}"
                );
            }
        }
    }
}
