//! The GEMV driver (and the GEMM's entry): picks the kernel for the CPU (VNNI, AVX2 integer, else float), prepares x
//! for it, and runs parts of W's rows on the threads.

use std::ops::Range;

use super::float::{gemv_rows, GemvInput};
use super::{PackedW4, Rows, Shape, BLOCK, BLOCK_BYTES, MAX_ROWS, MIN_ROWS_PER_PART};
use crate::error::{FgError, FgResult};
use crate::memory;
use crate::simd::{Simd, SimdLevel};
use crate::threads::{self, SendPtr};

/// x for the integer kernels: x̃ = round(x / scale) with scale = max|x| / 32639 per row (so that
/// hi = (x̃ + 128) >> 8 fits a signed byte), split as x̃ = 256 hi + lo, padded to whole blocks
/// (the VNNI kernel: whole steps of two blocks, in its step order).
pub(super) struct IntInput {
    pub(super) lo: Vec<i8>,
    pub(super) hi: Vec<i8>,
    pub(super) scale: Vec<f32>,
    /// Σ x̃ · scale over each group: [m, groups].
    pub(super) group_sums: Vec<f32>,
    pub(super) padded: usize,
}

/// The largest |x̃|: 256 * 127 + 127, so hi and lo are both signed bytes.
pub(super) const X_INT_MAX: f32 = 32639.0;

type Scratch<T> = std::cell::RefCell<Vec<T>>;

thread_local! {
    /// The GEMV's scratch, kept per thread between calls (rust/memory.rs): x widened from
    /// bf16, [`IntInput`]'s four arrays and each part's float32 scales. Allocated per call, a
    /// decode step's small layers each made and freed about a dozen of them.
    static WIDE_X: Scratch<f32> = const { Scratch::new(Vec::new()) };
    static X_LO: Scratch<i8> = const { Scratch::new(Vec::new()) };
    static X_HI: Scratch<i8> = const { Scratch::new(Vec::new()) };
    static X_SCALE: Scratch<f32> = const { Scratch::new(Vec::new()) };
    static X_SUMS: Scratch<f32> = const { Scratch::new(Vec::new()) };
    static PART_SCALES: Scratch<f32> = const { Scratch::new(Vec::new()) };
}

impl Drop for IntInput {
    fn drop(&mut self) {
        memory::keep(&X_LO, std::mem::take(&mut self.lo));
        memory::keep(&X_HI, std::mem::take(&mut self.hi));
        memory::keep(&X_SCALE, std::mem::take(&mut self.scale));
        memory::keep(&X_SUMS, std::mem::take(&mut self.group_sums));
    }
}

impl IntInput {
    /// None when a row holds NaN or infinity (the float kernel then keeps torch's semantics) or
    /// is so small that its step would be subnormal.
    fn new(level: SimdLevel, x: &[f32], shape: Shape, step_order: bool) -> Option<IntInput> {
        let (k, groups) = (shape.k, shape.groups());
        let unit = if step_order { 2 * BLOCK } else { BLOCK };
        let padded = k.div_ceil(unit) * unit;
        let m = x.len() / k;
        let mut input = IntInput {
            lo: memory::take_filled(&X_LO, m * padded, 0),
            hi: memory::take_filled(&X_HI, m * padded, 0),
            scale: memory::take_filled(&X_SCALE, m, 1.0),
            group_sums: memory::take_filled(&X_SUMS, m * groups, 0.0),
            padded,
        };
        for (i, row) in x.chunks_exact(k).enumerate() {
            let (lo, hi) = (
                &mut input.lo[i * padded..i * padded + k],
                &mut input.hi[i * padded..i * padded + k],
            );
            let sums = &mut input.group_sums[i * groups..(i + 1) * groups];
            input.scale[i] = round_x_row(level, row, shape.group_size, lo, hi, sums)?;
            if step_order {
                // Each step's 32-column pieces 0, 1, 2, 3 stored as 0, 2, 1, 3.
                let row = i * padded..(i + 1) * padded;
                for bytes in [&mut input.lo[row.clone()], &mut input.hi[row]] {
                    for step in bytes.chunks_exact_mut(unit) {
                        let (first, second) = step.split_at_mut(BLOCK);
                        first[BLOCK_BYTES..].swap_with_slice(&mut second[..BLOCK_BYTES]);
                    }
                }
            }
        }
        Some(input)
    }
}

crate::dispatch! {
    fn round_x_row(row: &[f32], group_size: usize, lo: &mut [i8], hi: &mut [i8], sums: &mut [f32]) -> Option<f32> = round_x_row_impl;
}

/// One row of [`IntInput`]: writes x̃'s bytes and the group sums, returns the scale (None when
/// the row is not finite). Compiled for the SIMD level, so that the loops vectorize.
#[inline(always)]
#[allow(clippy::extra_unused_type_parameters)] // S only picks the target features
unsafe fn round_x_row_impl<S: Simd>(
    row: &[f32],
    group_size: usize,
    lo: &mut [i8],
    hi: &mut [i8],
    sums: &mut [f32],
) -> Option<f32> {
    let amax = abs_max_or_inf(row);
    if amax == f32::INFINITY {
        return None;
    }
    let scale = if amax > 0.0 { amax / X_INT_MAX } else { 1.0 };
    if scale < f32::MIN_POSITIVE {
        // A subnormal step keeps too few bits to rebuild x (|x| below ~4e-34): the float
        // kernel takes the call.
        return None;
    }
    let pieces = row
        .chunks(group_size)
        .zip(lo.chunks_mut(group_size).zip(hi.chunks_mut(group_size)));
    for ((row, (lo, hi)), sum) in pieces.zip(sums.iter_mut()) {
        // Σ x̃ = Σ (256 hi + lo), exact in i64.
        let mut total = 0i64;
        for ((&v, l), h) in row.iter().zip(lo.iter_mut()).zip(hi.iter_mut()) {
            let q = (v / scale).round_ties_even().clamp(-X_INT_MAX, X_INT_MAX) as i32;
            let high = (q + 128) >> 8;
            (*h, *l) = (high as i8, (q - 256 * high) as i8);
            total += q as i64;
        }
        *sum = (total as f64 * scale as f64) as f32;
    }
    Some(scale)
}

/// max |v| over `row`, or infinity when it holds NaN or infinity; in 8 lanes so that it
/// vectorizes.
#[inline(always)]
fn abs_max_or_inf(row: &[f32]) -> f32 {
    let bound = |v: f32| {
        if v.is_finite() {
            v.abs()
        } else {
            f32::INFINITY
        }
    };
    let mut lanes = [0.0f32; 8];
    let chunks = row.chunks_exact(8);
    for (lane, &v) in lanes.iter_mut().zip(chunks.remainder()) {
        *lane = bound(v);
    }
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(bound(v));
        }
    }
    lanes.iter().fold(0.0, |a, &v| a.max(v))
}

/// Σ_g scale_g * zero_g * x_sum_g, in 8 lanes so that it vectorizes.
#[inline(always)]
pub(super) fn zero_term(scales: &[f32], zeros: &[u8], x_sums: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (s, z, x) = (
        scales.chunks_exact(8),
        zeros.chunks_exact(8),
        x_sums.chunks_exact(8),
    );
    let tails = (s.remainder(), z.remainder(), x.remainder());
    for ((s, z), x) in s.zip(z).zip(x) {
        for l in 0..8 {
            lanes[l] += s[l] * z[l] as f32 * x[l];
        }
    }
    for (l, ((s, z), x)) in tails.0.iter().zip(tails.1).zip(tails.2).enumerate() {
        lanes[l] += s * *z as f32 * x;
    }
    lanes.iter().sum()
}

/// A kernel that takes x rounded to int16 ([`IntInput`]): AVX-512 VNNI, or AVX2 (also on
/// AVX-512 CPUs without VNNI). Picked once per call, as shiftquant's GEMM picks its
/// micro-kernel: these need more than a [`SimdLevel`] says (VNNI), so `dispatch!` cannot.
type IntKernel = unsafe fn(&PackedW4<'_>, Range<usize>, &IntInput, usize, usize, &mut [f32]);

/// Checks x [m, k] and y [m, n] against the weight; returns m.
fn check_sizes(op: &str, w: &PackedW4<'_>, x_len: usize, y_len: usize) -> FgResult<usize> {
    w.check(op)?;
    let s = w.shape;
    let m = x_len / s.k;
    if x_len != m * s.k || y_len != m * s.n {
        return Err(FgError::Value(format!(
            "{op}: x must be [m, {}] and y [m, {}], got {x_len} and {y_len} elements",
            s.k, s.n
        )));
    }
    Ok(m)
}

/// Whether [`matmul`] runs on this CPU at `level` for a weight of `shape` (AVX-512; BF16 where
/// the GEMM multiplies by `vdpbf16ps`).
pub fn gemm_supported(level: SimdLevel, shape: Shape) -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::gemm::supported(level, shape);
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// The GEMM's multiply on this CPU, "bf16" (`vdpbf16ps`) or "fma" (float32 multiply-adds):
/// the rows of x from which it beats the GEMV differ (python/ferrograd/ops/w4a16/cpu.py).
pub fn gemm_arith() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    return super::gemm::Arith::of_cpu().name();
    #[cfg(not(target_arch = "x86_64"))]
    return "none";
}

/// y [m, n] = x [m, k] · Wᵀ by the blocked GEMM (meant for m past the GEMV's rows);
/// `Ok(false)`, y untouched, where [`gemm_supported`] says no.
pub fn matmul(level: SimdLevel, w: &PackedW4<'_>, x: Rows<'_>, y: &mut [f32]) -> FgResult<bool> {
    check_sizes("w4a16_matmul", w, x.len(), y.len())?;
    if !gemm_supported(level, w.shape) || (flushes_tiny_rows() && has_tiny_row(x, w.shape.k)) {
        return Ok(false);
    }
    #[cfg(target_arch = "x86_64")]
    {
        super::gemm::gemm(w, x, y);
        recompute_overflowed(w, x, y);
    }
    Ok(true)
}

/// Whether the GEMM's arithmetic loses rows of subnormal size (`has_tiny_row`): `vdpbf16ps`
/// does; float32 FMAs keep subnormal products and sums, so on those CPUs x is not scanned.
fn flushes_tiny_rows() -> bool {
    gemm_arith() == "bf16"
}

/// Whether some row of x is nonzero but below 2^-100 at its largest. `vdpbf16ps` treats
/// subnormal inputs as 0 and flushes subnormal sums whatever MXCSR says: the GEMM would return
/// 0 for such a row (a bf16 row of 3e-39; float32 x's low bf16 terms go first), where the other
/// kernels keep it. Smaller entries beside a larger one only lose what the row's size hides.
fn has_tiny_row(x: Rows<'_>, k: usize) -> bool {
    const TINY: f32 = f32::from_bits(27 << 23); // 2^-100
    let tiny = |top: f32| top > 0.0 && top < TINY;
    match x {
        // (NaN and inf rows count as large: abs_max_or_inf gives inf.)
        Rows::F32(x) => x.chunks(k.max(1)).any(|row| tiny(abs_max_or_inf(row))),
        // |v| as its bits, not widened (integer maxima vectorize; NaN sorts above numbers).
        Rows::Bf16(x) => x.chunks(k.max(1)).any(|row| {
            let top = row.iter().map(|v| v.0 & 0x7fff).max().unwrap_or(0);
            tiny(f32::from_bits(u32::from(top) << 16))
        }),
    }
}

/// Multiply-adds (m x n x k) below which the GEMV runs on the calling thread: a parallel
/// region's start and join cost more there than half the work saves (bf16 x, 2 threads, Xeon
/// family 6 model 207: 256 x 512 at M = 1 11.8 us on one thread against 14.0 on two, 512 x 512
/// 17.4 against 15.7, 256 x 256 at M = 4 19.0 against 17.8).
const SERIAL_BELOW: usize = 1 << 18;

/// y [m, n] = x [m, k] · Wᵀ for any m (meant for small m: W is read once per 4 rows of x).
/// The group size must be a multiple of 32 (whole half blocks).
pub fn gemv(level: SimdLevel, w: &PackedW4<'_>, x: Rows<'_>, y: &mut [f32]) -> FgResult<()> {
    const OP: &str = "w4a16_matmul";
    let m = check_sizes(OP, w, x.len(), y.len())?;
    let s = w.shape;
    if !s.group_size.is_multiple_of(BLOCK_BYTES) {
        return Err(FgError::Value(format!(
            "{OP}: the GEMV kernel needs a group size that is a multiple of {BLOCK_BYTES}, got {}",
            s.group_size
        )));
    }
    // bf16 rows widened once (m x k floats, small next to W).
    let mut widened = Vec::new();
    let xf = match x {
        Rows::F32(x) => x,
        Rows::Bf16(bits) => {
            widened = memory::take(&WIDE_X, bits.len());
            crate::simd::widen_bf16(level, bits, &mut widened);
            &widened
        }
    };
    let (int_kernel, step_order): (Option<IntKernel>, bool) = match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 if crate::simd::cpu_features().avx512vnni => {
            (Some(super::vnni::gemv_rows_vnni), true)
        }
        // AVX-512 CPUs without VNNI (Skylake-SP) take the AVX2 one: on the Xeon of family 6
        // model 207 with VNNI and BF16 turned off (FERROGRAD_DISABLE_FEATURES), 4096 x 4096, 2
        // threads, bf16 x, it ran M = 1 / 4 / 8 / 12 in 0.44 / 1.15 / 1.97 / 3.31 ms against
        // the AVX-512 float kernel's 0.70 / 2.47 / 5.32 / 7.70 (docs/w4a16.md).
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 | SimdLevel::Avx2 if level.is_supported() => {
            (Some(super::avx2::gemv_rows_avx2_int), false)
        }
        _ => (None, false),
    };
    let int =
        int_kernel.and_then(|kernel| Some((kernel, IntInput::new(level, xf, s, step_order)?)));
    let float = int.is_none().then(|| GemvInput::new(xf, s));
    // Parts of MIN_ROWS_PER_PART rows of W, each thread's own contiguous run first; each part
    // writes its own columns of y.
    let share = MIN_ROWS_PER_PART;
    let parts = s.n.div_ceil(share);
    let y_ptr = SendPtr(y.as_mut_ptr());
    let run = |part: usize| {
        let rows = (part * share).min(s.n)..((part + 1) * share).min(s.n);
        let mut buf = memory::take(&PART_SCALES, 0);
        let part_w = w.part(rows.clone(), &mut buf);
        let mut tile = [0.0f32; MAX_ROWS * MIN_ROWS_PER_PART];
        for row0 in (0..m).step_by(MAX_ROWS) {
            let count = MAX_ROWS.min(m - row0);
            let out = &mut tile[..count * rows.len()];
            match (&int, &float) {
                // SAFETY: each kernel is picked above only for a CPU with its features.
                (Some((kernel, v)), _) => unsafe {
                    kernel(&part_w, 0..rows.len(), v, row0, count, out)
                },
                (_, Some(f)) => gemv_rows(level, &part_w, 0..rows.len(), f, row0, count, out),
                _ => unreachable!("one of the inputs is prepared"),
            }
            for (i, tile_row) in out.chunks_exact(rows.len().max(1)).enumerate() {
                // SAFETY: part `part` alone writes columns `rows` of y's rows.
                let dst = unsafe { y_ptr.ptr().add((row0 + i) * s.n + rows.start) };
                unsafe { std::ptr::copy_nonoverlapping(tile_row.as_ptr(), dst, rows.len()) };
            }
        }
        memory::keep(&PART_SCALES, buf);
    };
    if m.saturating_mul(s.n).saturating_mul(s.k) < SERIAL_BELOW {
        (0..parts).for_each(run);
    } else {
        threads::split_contiguous(parts, run);
    }
    recompute_overflowed(w, x, y);
    memory::keep(&WIDE_X, widened);
    Ok(())
}

/// Outputs that the factored form s (Σ q x - z Σ x) overflowed into inf or NaN (x ~ 1e38
/// against a zero weight: 0 * inf) while x's row is finite, recomputed as Σ x (q - z) s in
/// float64: infinite only where the exact result is. A scan of y, and a row of W per output
/// it fixes.
fn recompute_overflowed(w: &PackedW4<'_>, x: Rows<'_>, y: &mut [f32]) {
    let (n, k) = (w.shape.n, w.shape.k);
    let mut w_hat = Vec::new();
    for (i, y_row) in y.chunks_exact_mut(n).enumerate() {
        let x_row = |c: usize| x.get(i * k + c);
        if y_row.iter().all(|v| v.is_finite()) || !(0..k).all(|c| x_row(c).is_finite()) {
            continue;
        }
        w_hat.resize(k, 0.0f32);
        for (r, out) in y_row.iter_mut().enumerate() {
            if !out.is_finite() {
                let mut buf = Vec::new();
                w.part(r..r + 1, &mut buf).dequantize_row(0, &mut w_hat);
                let dot: f64 = (0..k).map(|c| x_row(c) as f64 * w_hat[c] as f64).sum();
                *out = dot as f32;
            }
        }
    }
}
