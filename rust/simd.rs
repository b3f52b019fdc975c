//! CPU feature detection, the `FERROGRAD_SIMD` and `FERROGRAD_DISABLE_FEATURES` overrides, and
//! the vector backends.
//!
//! Kernels are written once, generic over [`Simd`], and instantiated per backend inside a
//! `#[target_feature]` function by [`dispatch!`]: the wheel targets baseline x86-64 and picks the
//! widest path the CPU supports at run time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use crate::error::{FgError, FgResult};

/// An instruction-set path, ordered from narrowest to widest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    Scalar,
    /// AVX2 + FMA.
    Avx2,
    /// AVX-512 F, BW, VL and DQ (plus AVX2 + FMA).
    Avx512,
}

impl SimdLevel {
    pub const ALL: [SimdLevel; 3] = [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }

    pub fn parse(name: &str) -> Option<SimdLevel> {
        SimdLevel::ALL.into_iter().find(|l| l.name() == name)
    }

    /// Whether this CPU can run the path.
    pub fn is_supported(self) -> bool {
        self <= detected()
    }
}

/// CPU features ferrograd looks at, as detected at run time.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuFeatures {
    pub avx2: bool,
    pub fma: bool,
    pub avx512f: bool,
    pub avx512bw: bool,
    pub avx512vl: bool,
    pub avx512dq: bool,
    pub avx512vnni: bool,
    /// `vcvtneps2bf16` and `vdpbf16ps` (bfloat16 stores and dot products).
    pub avx512bf16: bool,
    /// AVX-VNNI: 256-bit `vpdpbusd` without AVX-512 (Intel's cores from Alder Lake and Sierra
    /// Forest on; Sapphire Rapids and Zen 5 have it beside AVX512-VNNI).
    pub avxvnni: bool,
    /// An AMD CPU: Zen 4/5 run float adds and conversions on pipes of their own (FP2/FP3),
    /// apart from the integer and fused multiply-adds; Intel's cores issue 512-bit ones all on
    /// ports 0 and 5. A kernel picks the arithmetic that keeps its multiply-add pipes free. The
    /// SPAM steps also read it: their software prefetches, which fed the Xeon's, slowed Zen 4's
    /// (rust/spam/mod.rs `streams`).
    pub amd: bool,
}

impl CpuFeatures {
    /// Each named feature's flag: the one list of the names that `named`, `without` and
    /// `FERROGRAD_DISABLE_FEATURES` use.
    fn flags(&mut self) -> [(&'static str, &mut bool); 9] {
        [
            ("avx2", &mut self.avx2),
            ("fma", &mut self.fma),
            ("avx512f", &mut self.avx512f),
            ("avx512bw", &mut self.avx512bw),
            ("avx512vl", &mut self.avx512vl),
            ("avx512dq", &mut self.avx512dq),
            ("avx512vnni", &mut self.avx512vnni),
            ("avx512bf16", &mut self.avx512bf16),
            ("avxvnni", &mut self.avxvnni),
        ]
    }

    /// These features with the one called `name` off; None for a name that is not one of them.
    fn without(mut self, name: &str) -> Option<Self> {
        *self.flags().into_iter().find(|(n, _)| *n == name)?.1 = false;
        Some(self)
    }

    /// These features less those of `list` (comma-separated names, as
    /// `FERROGRAD_DISABLE_FEATURES` gives them), or the message naming an unknown one.
    fn disabling(self, list: &str) -> Result<Self, String> {
        let mut names = list.split(',').map(str::trim).filter(|n| !n.is_empty());
        names.try_fold(self, |features, name| {
            features.without(name).ok_or_else(|| {
                let known: Vec<&str> = self.named().iter().map(|(n, _)| *n).collect();
                format!(
                    "FERROGRAD_DISABLE_FEATURES names {name:?}, not one of {}",
                    known.join(", ")
                )
            })
        })
    }

    pub fn named(&self) -> [(&'static str, bool); 9] {
        let mut copy = *self;
        copy.flags().map(|(name, on)| (name, *on))
    }
}

/// Whether this CPU has AVX512-BF16's `vcvtneps2bf16` (set with [`cpu_features`], which every
/// dispatched kernel call reaches first; until then the integer rounding is used). A copy of
/// `CpuFeatures::avx512bf16` because it is read per vector: reading `cpu_features()` there
/// made bf16 softmax forwards 6-10% slower (Xeon family 6 model 207).
static BF16_CONVERT: AtomicBool = AtomicBool::new(false);

/// See [`BF16_CONVERT`]; one load and a predictable branch per vector where it is asked.
#[inline(always)]
pub fn has_bf16_convert() -> bool {
    BF16_CONVERT.load(Ordering::Relaxed)
}

/// The features the kernels use: those this CPU has, less any that `FERROGRAD_DISABLE_FEATURES`
/// names (read once). Turning off AVX512-VNNI and AVX512-BF16 on a CPU that has them runs the
/// AVX-512 paths of CPUs without them (Skylake-SP to Ice Lake), which `make test` checks;
/// turning off an AVX-512 base feature makes the CPU an AVX2 one. With an unknown name the
/// features are the detected ones and [`active`] reports the error.
pub fn cpu_features() -> CpuFeatures {
    features().used
}

/// What [`cpu_features`] and [`active`] read, made once: the detected features, those the
/// kernels use, and the message naming an unknown `FERROGRAD_DISABLE_FEATURES` name.
struct Features {
    detected: CpuFeatures,
    used: CpuFeatures,
    error: Option<String>,
}

fn features() -> &'static Features {
    static FEATURES: OnceLock<Features> = OnceLock::new();
    FEATURES.get_or_init(|| {
        let detected = detected_features();
        let disabled = std::env::var("FERROGRAD_DISABLE_FEATURES").map(|l| detected.disabling(&l));
        let (used, error) = match disabled {
            Ok(Err(message)) => (detected, Some(message)),
            Ok(Ok(used)) => (used, None),
            Err(_) => (detected, None),
        };
        BF16_CONVERT.store(used.avx512bf16, Ordering::Relaxed);
        Features {
            detected,
            used,
            error,
        }
    })
}

/// The features this CPU has that `FERROGRAD_DISABLE_FEATURES` turned off.
pub fn disabled_features_named() -> Vec<&'static str> {
    let f = features();
    let both = f.detected.named().into_iter().zip(f.used.named());
    both.filter(|((_, has), (_, on))| *has && !on)
        .map(|((name, _), _)| name)
        .collect()
}

fn detected_features() -> CpuFeatures {
    #[cfg(target_arch = "x86_64")]
    {
        CpuFeatures {
            avx2: is_x86_feature_detected!("avx2"),
            fma: is_x86_feature_detected!("fma"),
            avx512f: is_x86_feature_detected!("avx512f"),
            avx512bw: is_x86_feature_detected!("avx512bw"),
            avx512vl: is_x86_feature_detected!("avx512vl"),
            avx512dq: is_x86_feature_detected!("avx512dq"),
            avx512vnni: is_x86_feature_detected!("avx512vnni"),
            avx512bf16: is_x86_feature_detected!("avx512bf16"),
            avxvnni: is_x86_feature_detected!("avxvnni"),
            amd: is_amd(),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        CpuFeatures::default()
    }
}

/// Whether CPUID's vendor string is AMD's ("AuthenticAMD": EBX, EDX, ECX of leaf 0).
#[cfg(target_arch = "x86_64")]
fn is_amd() -> bool {
    let id = std::arch::x86_64::__cpuid(0);
    (id.ebx, id.edx, id.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163)
}

/// bfloat16 bits, as torch stores them (torch.bfloat16).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16(pub u16);

/// IEEE half-precision bits (torch.float16).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct F16(pub u16);

/// A type kernels store values in: f32, [`Bf16`] or [`F16`], widened to f32 exactly and
/// narrowed by rounding to nearest even (NaN to a quiet NaN), one value at a time.
pub trait Storage: Copy + Send + Sync + 'static {
    /// Whether this is f32 itself (a slice of it can be read as f32 without a copy).
    const IS_F32: bool = false;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Storage for f32 {
    const IS_F32: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> f32 {
        v
    }
}

impl Storage for Bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16_to_f32(self.0)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Bf16 {
        Bf16(f32_to_bf16(v))
    }
}

impl Storage for F16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16_to_f32(self.0)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> F16 {
        F16(f32_to_f16(v))
    }
}

/// bfloat16 quiet NaN (torch's).
pub const BF16_NAN: u16 = 0x7fc0;

/// bfloat16 bits to f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// f32 to bfloat16 bits, rounded to nearest even as torch converts; NaN becomes [`BF16_NAN`].
/// NaN is tested on the bits: a float compare becomes a branch that stops vectorization.
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        BF16_NAN
    } else {
        rounded as u16
    }
}

/// float16 quiet NaN (the sign is added where one is kept).
pub const F16_NAN: u16 = 0x7e00;

/// float16 bits to f32 (exact: normals, subnormals, infinities and NaN payloads). The exponent
/// is rebiased by a multiply by 2^112, which also normalizes subnormals (the AVX2 softmax path
/// does the same eight lanes at a time).
#[inline(always)]
pub fn f16_to_f32(bits: u16) -> f32 {
    let h = bits as u32;
    let em = h & 0x7fff;
    let magnitude = if em >= 0x7c00 {
        (em << 13) | 0x7f80_0000
    } else {
        (f32::from_bits(em << 13) * f32::from_bits(0x7780_0000)).to_bits()
    };
    f32::from_bits(magnitude | ((h & 0x8000) << 16))
}

/// f32 to float16 bits, rounded to nearest even (F. Giesen's branch-free scheme: tiny values
/// round through a float add of 0.5, normal ones by integer rounding of the mantissa); NaN
/// becomes [`F16_NAN`] with its sign.
#[inline(always)]
pub fn f32_to_f16(x: f32) -> u16 {
    let u = x.to_bits();
    let sign = u & 0x8000_0000;
    let a = u ^ sign;
    let o = if a >= 0x4780_0000 {
        if a > 0x7f80_0000 {
            F16_NAN as u32
        } else {
            0x7c00
        }
    } else if a < 0x3880_0000 {
        (f32::from_bits(a) + 0.5).to_bits() - 0x3f00_0000
    } else {
        let odd = (a >> 13) & 1;
        a.wrapping_add(0xc800_0fff).wrapping_add(odd) >> 13
    };
    (o | (sign >> 16)) as u16
}

/// [`f16_to_f32`] over a slice (`dst` as long as `src`), by F16C's `vcvtph2ps` where the CPU
/// has it (the same values).
pub fn f16_to_f32_slice(src: &[F16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU has F16C (and so AVX).
        unsafe { f16_to_f32_f16c(src, dst) };
        return;
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f16_to_f32(s.0);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16_to_f32_f16c(src: &[F16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let whole = src.len().min(dst.len()) / 8 * 8;
    let (src, tail) = src.split_at(whole);
    let (dst, dst_tail) = dst.split_at_mut(whole);
    for (s, d) in src.chunks_exact(8).zip(dst.chunks_exact_mut(8)) {
        let v = _mm256_cvtph_ps(_mm_loadu_si128(s.as_ptr() as *const __m128i));
        _mm256_storeu_ps(d.as_mut_ptr(), v);
    }
    for (d, s) in dst_tail.iter_mut().zip(tail) {
        *d = f16_to_f32(s.0);
    }
}

crate::dispatch! {
    /// bfloat16 slice to f32 (`out` as long as `bits`).
    pub fn widen_bf16(bits: &[Bf16], out: &mut [f32]) = widen_bf16_impl;
    /// f32 slice to bfloat16 (`bits` as long as `x`), as [`f32_to_bf16`] rounds.
    pub fn narrow_bf16(x: &[f32], bits: &mut [Bf16]) = narrow_bf16_impl;
}

/// bfloat16 to f32 (exact). `S` only picks the instantiation: `dispatch!` compiles the plain
/// loop once per SIMD path, where it vectorizes at that width.
#[allow(clippy::extra_unused_type_parameters)]
#[inline(always)]
unsafe fn widen_bf16_impl<S: Simd>(bits: &[Bf16], out: &mut [f32]) {
    for (o, &b) in out.iter_mut().zip(bits) {
        *o = bf16_to_f32(b.0);
    }
}

/// f32 to bfloat16, rounded to nearest even as torch rounds ([`Simd::narrow_bf16`]).
#[inline(always)]
unsafe fn narrow_bf16_impl<S: Simd>(x: &[f32], bits: &mut [Bf16]) {
    S::narrow_bf16(x, bits)
}

/// The widest path this CPU supports.
pub fn detected() -> SimdLevel {
    let f = cpu_features();
    if f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx2 && f.fma {
        SimdLevel::Avx512
    } else if f.avx2 && f.fma {
        SimdLevel::Avx2
    } else {
        SimdLevel::Scalar
    }
}

/// Parses a `FERROGRAD_SIMD` value: empty or `auto` means the detected path.
pub fn resolve(requested: Option<&str>) -> FgResult<SimdLevel> {
    let requested = requested.map(str::trim).unwrap_or("");
    if requested.is_empty() || requested == "auto" {
        return Ok(detected());
    }
    let level = SimdLevel::parse(requested).ok_or_else(|| {
        FgError::Value(format!(
            "FERROGRAD_SIMD={requested:?} is not one of scalar, avx2, avx512, auto"
        ))
    })?;
    if !level.is_supported() {
        return Err(FgError::Value(format!(
            "FERROGRAD_SIMD={requested} is forced but this CPU supports at most {}",
            detected().name()
        )));
    }
    Ok(level)
}

/// The path every kernel uses: `FERROGRAD_SIMD` when set (read once), else the detected one;
/// an error for a bad `FERROGRAD_SIMD` or `FERROGRAD_DISABLE_FEATURES`.
pub fn active() -> FgResult<SimdLevel> {
    static ACTIVE: OnceLock<FgResult<SimdLevel>> = OnceLock::new();
    ACTIVE
        .get_or_init(|| {
            if let Some(message) = &features().error {
                return Err(FgError::Value(message.clone()));
            }
            resolve(std::env::var("FERROGRAD_SIMD").ok().as_deref())
        })
        .clone()
}

/// The clock this core runs at, in Hz, timed over a chain of dependent integer adds (one per
/// cycle on every x86 core): a VM's /proc/cpuinfo reports its base clock, not its boost. None
/// off x86_64. For the benchmarks (`dev` builds).
#[cfg(any(test, feature = "dev"))]
pub fn measured_clock_hz() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        const ADDS: u64 = 8 << 20;
        let chain = || {
            let start = std::time::Instant::now();
            // SAFETY: register arithmetic only.
            // A register operand, not an immediate: Golden Cove and later cores fold chains of
            // add-immediate at rename, several per cycle (this read ~20 GHz on Sapphire Rapids).
            unsafe {
                std::arch::asm!(
                    "2:",
                    "add {x}, {one}", "add {x}, {one}", "add {x}, {one}", "add {x}, {one}",
                    "add {x}, {one}", "add {x}, {one}", "add {x}, {one}", "add {x}, {one}",
                    "dec {n}",
                    "jnz 2b",
                    x = inout(reg) 0u64 => _,
                    one = in(reg) 1u64,
                    n = inout(reg) ADDS / 8 => _,
                    options(nomem, nostack),
                );
            }
            start.elapsed().as_secs_f64()
        };
        chain(); // ramps the clock up
        let best = (0..5).map(|_| chain()).fold(f64::INFINITY, f64::min);
        Some(ADDS as f64 / best)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// Asks for the cache lines of `x` in L1 ahead of their use, so that the next row streams in
/// while a kernel computes on this one from cache (a hint: it reads nothing and never faults).
#[inline(always)]
pub fn prefetch<T>(x: &[T]) {
    #[cfg(target_arch = "x86_64")]
    for line in x.chunks((64 / std::mem::size_of::<T>()).max(1)) {
        // SAFETY: a prefetch has no architectural effect.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// Prefetches the cache line of element `at` of the `len` elements at `base`, when it is one of
/// them: for streams that a kernel holds as mutable slices cut into blocks.
#[inline(always)]
#[allow(clippy::not_unsafe_ptr_arg_deref)] // a prefetch reads nothing and never faults
pub fn prefetch_at<T>(base: *const T, len: usize, at: usize) {
    #[cfg(target_arch = "x86_64")]
    if at < len {
        // SAFETY: a prefetch has no architectural effect (and the address is in bounds).
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(at).cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (base, len, at);
}

/// Reduces `lanes` independent accumulators (a power of two) into lane 0 by halving:
/// `combine(i, i + width)` for width lanes / 2, lanes / 4, ..., 1. Inlined into a kernel over
/// arrays of lanes, each round is one vector operation in registers, where folding the lanes
/// one by one went through the stack as a chain of scalar operations.
#[inline(always)]
pub fn fold_halves(lanes: usize, mut combine: impl FnMut(usize, usize)) {
    let mut width = lanes / 2;
    while width > 0 {
        for i in 0..width {
            combine(i, i + width);
        }
        width /= 2;
    }
}

/// `prefetch` of `x[start..start + len]`, cut at the end of `x` (the next row may be empty).
#[inline(always)]
pub fn prefetch_block<T>(x: &[T], start: usize, len: usize) {
    let start = start.min(x.len());
    prefetch(&x[start..(start + len).min(x.len())]);
}

/// A vector of `LANES` f32 values and the operations the kernels need.
///
/// `max` and `min` follow x86: when either operand is NaN the second one is returned, so
/// `max(splat(c), x)` keeps a NaN `x` while clamping it from below.
///
/// # Safety
/// Every method requires the CPU to support the backend ([`dispatch!`] guarantees it), and
/// `load` / `store` need `LANES` valid elements at the pointer.
#[allow(clippy::missing_safety_doc)] // the contract above covers every method
pub trait Simd: Copy {
    const LANES: usize;
    /// Whether `scale` is one instruction (then branch-free rescaling beats a rare branch).
    const CHEAP_SCALE: bool;
    /// Whether `floor` and `mul_add` on scalars are single instructions (SSE4.1 `roundps`, FMA)
    /// where this level's code is compiled; at the baseline target both are calls into libm.
    const NATIVE_MATH: bool;
    type V: Copy;

    unsafe fn splat(v: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// Loads the first `len < LANES` elements; the other lanes hold `fill`.
    unsafe fn load_partial(p: *const f32, len: usize, fill: f32) -> Self::V;
    /// Stores the first `len < LANES` lanes.
    unsafe fn store_partial(p: *mut f32, v: Self::V, len: usize);
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V;
    /// a * b + c
    unsafe fn mul_add(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V;
    /// |v| (the sign bit cleared: one logic operation, no add; a NaN stays NaN).
    unsafe fn abs(v: Self::V) -> Self::V;
    /// Whether any lane of `a` is greater than the same lane of `b` (false for NaN lanes).
    unsafe fn any_gt(a: Self::V, b: Self::V) -> bool;
    /// `v` with its subnormal lanes (0 < |v| < f32::MIN_POSITIVE) set to +0; NaN kept.
    unsafe fn flush_subnormal(v: Self::V) -> Self::V;
    /// The lanes' sum in f64: each lane widened (exactly), then added pairwise.
    unsafe fn sum_f64(v: Self::V) -> f64;
    /// Splits exp(x) = m * 2^n with n = round(x / ln 2) (integer-valued) and m in [0.7, 1.42].
    /// Exact enough for |x| < 2^21; callers clamp x from below and route larger rows elsewhere.
    unsafe fn exp_split(x: Self::V) -> (Self::V, Self::V);
    /// m * 2^k for integer-valued k; results below the denormal range flush to 0.
    unsafe fn scale(m: Self::V, k: Self::V) -> Self::V;

    #[inline(always)]
    unsafe fn to_array(v: Self::V) -> [f32; 16] {
        let mut out = [0.0f32; 16];
        Self::store(out.as_mut_ptr(), v);
        out
    }

    #[inline(always)]
    unsafe fn exp(x: Self::V) -> Self::V {
        let (m, n) = Self::exp_split(x);
        Self::scale(m, n)
    }

    /// `x` rounded to bfloat16 into `bits` (as long), as [`f32_to_bf16`] rounds: a plain loop
    /// that vectorizes at this level's width, unless the backend has a faster conversion.
    #[inline(always)]
    unsafe fn narrow_bf16(x: &[f32], bits: &mut [Bf16]) {
        for (b, &v) in bits.iter_mut().zip(x) {
            *b = Bf16(f32_to_bf16(v));
        }
    }
}

/// log2(e)
pub const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln(2) split so that n * LN2_HI is exact for the n the kernels use (Cody-Waite).
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// Adding then subtracting 1.5 * 2^23 rounds to the nearest integer for |p| < 2^22.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// exp(t) = 1 + t * P(t) on [-ln2/2, ln2/2], P of degree 4 in Horner order (highest first):
/// a relative-error minimax fit, 1.7e-7 worst case evaluated in f32 (fitted for ferrograd).
const EXP_POLY: [f32; 5] = [
    8.290_315e-3,
    4.189_793e-2,
    1.666_763_6e-1,
    4.999_915e-1,
    9.999_997e-1,
];

/// The range reduction and polynomial shared by the vector backends (they differ in `scale`).
#[inline(always)]
unsafe fn exp_split_fma<S: Simd>(x: S::V) -> (S::V, S::V) {
    let magic = S::splat(ROUND_MAGIC);
    let n = S::sub(S::mul_add(x, S::splat(LOG2E), magic), magic);
    let t = S::mul_add(n, S::splat(-LN2_HI), x);
    let t = S::mul_add(n, S::splat(-LN2_LO), t);
    let mut p = S::splat(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        p = S::mul_add(p, t, S::splat(*c));
    }
    (S::mul_add(p, t, S::splat(1.0)), n)
}

/// One lane, computed in f64 where it matters: the reference-grade baseline path.
#[derive(Clone, Copy, Debug)]
pub struct Scalar;

impl Simd for Scalar {
    const LANES: usize = 1;
    const CHEAP_SCALE: bool = true;
    const NATIVE_MATH: bool = false;
    type V = f32;

    #[inline(always)]
    unsafe fn splat(v: f32) -> f32 {
        v
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> f32 {
        *p
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: f32) {
        *p = v
    }
    #[inline(always)]
    unsafe fn load_partial(_: *const f32, _: usize, fill: f32) -> f32 {
        fill // len < 1
    }
    #[inline(always)]
    unsafe fn store_partial(_: *mut f32, _: f32, _: usize) {}
    #[inline(always)]
    unsafe fn add(a: f32, b: f32) -> f32 {
        a + b
    }
    #[inline(always)]
    unsafe fn sub(a: f32, b: f32) -> f32 {
        a - b
    }
    #[inline(always)]
    unsafe fn mul(a: f32, b: f32) -> f32 {
        a * b
    }
    #[inline(always)]
    unsafe fn div(a: f32, b: f32) -> f32 {
        a / b
    }
    #[inline(always)]
    unsafe fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        // Baseline x86-64 has no FMA instruction; the f64 product is exact.
        (a as f64 * b as f64 + c as f64) as f32
    }
    #[inline(always)]
    unsafe fn max(a: f32, b: f32) -> f32 {
        if a > b {
            a
        } else {
            b
        }
    }
    #[inline(always)]
    unsafe fn min(a: f32, b: f32) -> f32 {
        if a < b {
            a
        } else {
            b
        }
    }
    #[inline(always)]
    unsafe fn abs(v: f32) -> f32 {
        v.abs()
    }
    #[inline(always)]
    unsafe fn any_gt(a: f32, b: f32) -> bool {
        a > b
    }
    #[inline(always)]
    unsafe fn flush_subnormal(v: f32) -> f32 {
        if v.abs() < f32::MIN_POSITIVE {
            0.0
        } else {
            v
        }
    }
    #[inline(always)]
    unsafe fn sum_f64(v: f32) -> f64 {
        f64::from(v)
    }
    #[inline(always)]
    unsafe fn exp_split(x: f32) -> (f32, f32) {
        let x = x as f64;
        let n = (x * std::f64::consts::LOG2_E).round();
        let m = (x - n * std::f64::consts::LN_2).exp();
        (m as f32, n as f32)
    }
    #[inline(always)]
    unsafe fn scale(m: f32, k: f32) -> f32 {
        (m as f64 * pow2(k as f64)) as f32
    }
}

/// 2^k for integer-valued k, exact, built from the exponent bits (0 below 2^-1022).
#[inline(always)]
pub fn pow2(k: f64) -> f64 {
    if k.is_nan() {
        return f64::NAN;
    }
    let k = k.clamp(-1023.0, 1023.0) as i64;
    if k == -1023 {
        0.0
    } else {
        f64::from_bits(((k + 1023) as u64) << 52)
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::{bf16_bits_avx2, bf16_bits_avx512, bf16_pack_avx512, Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{exp_split_fma, f32_to_bf16, has_bf16_convert, Bf16, Simd, BF16_NAN};

    /// [`bf16_bits_avx512`] for 8 lanes.
    ///
    /// # Safety
    /// The CPU supports AVX2 (callers run inside an AVX2 kernel).
    #[inline(always)]
    pub unsafe fn bf16_bits_avx2(v: __m256) -> __m256i {
        let u = _mm256_castps_si256(v);
        let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(u), _mm256_set1_epi32(1));
        let bias = _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff));
        let r = _mm256_srli_epi32::<16>(_mm256_add_epi32(u, bias));
        let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        _mm256_blendv_epi8(r, _mm256_set1_epi32(i32::from(BF16_NAN)), nan)
    }

    /// 16 f32 lanes as bfloat16 bits in the low half of each 32-bit lane, rounded as
    /// [`super::f32_to_bf16`] rounds (to nearest even; NaN to [`BF16_NAN`]).
    ///
    /// # Safety
    /// The CPU supports AVX-512 F (callers run inside an AVX-512 kernel).
    #[inline(always)]
    pub unsafe fn bf16_bits_avx512(v: __m512) -> __m512i {
        let bits = _mm512_castps_si512(v);
        let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
        let bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff));
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, bias));
        let magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fff_ffff));
        let nan = _mm512_cmpgt_epu32_mask(magnitude, _mm512_set1_epi32(0x7f80_0000));
        _mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(i32::from(BF16_NAN)))
    }

    /// 16 f32 lanes as 16 packed bfloat16, rounded as [`super::f32_to_bf16`] rounds. Where the
    /// CPU has AVX512-BF16, one `vcvtneps2bf16` (where [`bf16_bits_avx512`] and its narrowing
    /// take about ten operations on the vector ports) rounds the same way, except that it
    /// flushes subnormal inputs to zero and keeps a NaN's sign and payload: a vector with such
    /// a lane takes the integer rounding.
    ///
    /// # Safety
    /// The CPU supports AVX-512 F, BW, VL and DQ (callers run inside an AVX-512 kernel).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    pub unsafe fn bf16_pack_avx512(v: __m512) -> __m256i {
        // fpclass categories: quiet NaN 0x01, subnormal 0x20, signalling NaN 0x80.
        if has_bf16_convert() && _mm512_fpclass_ps_mask::<0xa1>(v) == 0 {
            let packed: __m256i;
            // SAFETY: the CPU has AVX512-BF16 (checked above). Written as assembly because
            // the dispatched kernels do not enable the feature (not every AVX-512 CPU has it).
            std::arch::asm!(
                "vcvtneps2bf16 {packed}, {v}",
                packed = out(ymm_reg) packed,
                v = in(zmm_reg) v,
                options(pure, nomem, nostack, preserves_flags),
            );
            return packed;
        }
        _mm512_cvtepi32_epi16(bf16_bits_avx512(v))
    }

    #[derive(Clone, Copy, Debug)]
    pub struct Avx2;

    /// Lanes `[0, len)` set, for masked loads and stores (masked-off lanes never fault).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn avx2_mask(len: usize) -> __m256i {
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(len as i32), lane)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512_mask(len: usize) -> __mmask16 {
        ((1u32 << len) - 1) as __mmask16
    }

    #[derive(Clone, Copy, Debug)]
    pub struct Avx512;

    impl Simd for Avx2 {
        const LANES: usize = 8;
        const CHEAP_SCALE: bool = false;
        const NATIVE_MATH: bool = true;
        type V = __m256;

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn splat(v: f32) -> __m256 {
            _mm256_set1_ps(v)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn load_partial(p: *const f32, len: usize, fill: f32) -> __m256 {
            let mask = avx2_mask(len);
            let v = _mm256_maskload_ps(p, mask);
            _mm256_blendv_ps(_mm256_set1_ps(fill), v, _mm256_castsi256_ps(mask))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn store_partial(p: *mut f32, v: __m256, len: usize) {
            _mm256_maskstore_ps(p, avx2_mask(len), v)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            _mm256_add_ps(a, b)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn sub(a: __m256, b: __m256) -> __m256 {
            _mm256_sub_ps(a, b)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            _mm256_mul_ps(a, b)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn div(a: __m256, b: __m256) -> __m256 {
            _mm256_div_ps(a, b)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn mul_add(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn max(a: __m256, b: __m256) -> __m256 {
            _mm256_max_ps(a, b)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn min(a: __m256, b: __m256) -> __m256 {
            _mm256_min_ps(a, b)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn abs(v: __m256) -> __m256 {
            _mm256_andnot_ps(_mm256_set1_ps(-0.0), v)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn any_gt(a: __m256, b: __m256) -> bool {
            _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(a, b)) != 0
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn flush_subnormal(v: __m256) -> __m256 {
            let size = _mm256_andnot_ps(_mm256_set1_ps(-0.0), v);
            let tiny = _mm256_cmp_ps::<_CMP_LT_OQ>(size, _mm256_set1_ps(f32::MIN_POSITIVE));
            _mm256_andnot_ps(tiny, v)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn sum_f64(v: __m256) -> f64 {
            let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
            let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v));
            let s = _mm256_add_pd(lo, hi);
            let s = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd::<1>(s));
            _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn exp_split(x: __m256) -> (__m256, __m256) {
            exp_split_fma::<Avx2>(x)
        }
        /// No `scalef` on AVX2: build 2^k from exponent bits in two halves, so that k down to
        /// -252 (denormal results) and up to 252 stays exact.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn scale(m: __m256, k: __m256) -> __m256 {
            let k = _mm256_min_ps(
                _mm256_max_ps(k, _mm256_set1_ps(-252.0)),
                _mm256_set1_ps(252.0),
            );
            let ki = _mm256_cvtps_epi32(k);
            let half = _mm256_srai_epi32::<1>(ki);
            let rest = _mm256_sub_epi32(ki, half);
            let bias = _mm256_set1_epi32(127);
            let p_half = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(half, bias)));
            let p_rest = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(rest, bias)));
            _mm256_mul_ps(_mm256_mul_ps(m, p_half), p_rest)
        }
    }

    impl Simd for Avx512 {
        const LANES: usize = 16;
        const CHEAP_SCALE: bool = true;
        const NATIVE_MATH: bool = true;
        type V = __m512;

        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn splat(v: f32) -> __m512 {
            _mm512_set1_ps(v)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load_partial(p: *const f32, len: usize, fill: f32) -> __m512 {
            _mm512_mask_loadu_ps(_mm512_set1_ps(fill), avx512_mask(len), p)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn store_partial(p: *mut f32, v: __m512, len: usize) {
            _mm512_mask_storeu_ps(p, avx512_mask(len), v)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            _mm512_add_ps(a, b)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn sub(a: __m512, b: __m512) -> __m512 {
            _mm512_sub_ps(a, b)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            _mm512_mul_ps(a, b)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn div(a: __m512, b: __m512) -> __m512 {
            _mm512_div_ps(a, b)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn mul_add(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn max(a: __m512, b: __m512) -> __m512 {
            _mm512_max_ps(a, b)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn min(a: __m512, b: __m512) -> __m512 {
            _mm512_min_ps(a, b)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn abs(v: __m512) -> __m512 {
            _mm512_abs_ps(v)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn any_gt(a: __m512, b: __m512) -> bool {
            _mm512_cmp_ps_mask::<_CMP_GT_OQ>(a, b) != 0
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn flush_subnormal(v: __m512) -> __m512 {
            let size = _mm512_abs_ps(v);
            let normal = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(size, _mm512_set1_ps(f32::MIN_POSITIVE));
            _mm512_maskz_mov_ps(normal, v)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn sum_f64(v: __m512) -> f64 {
            let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
            let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                _mm512_castps_pd(v),
            )));
            _mm512_reduce_add_pd(_mm512_add_pd(lo, hi))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn exp_split(x: __m512) -> (__m512, __m512) {
            exp_split_fma::<Avx512>(x)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn scale(m: __m512, k: __m512) -> __m512 {
            _mm512_scalef_ps(m, k)
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
        unsafe fn narrow_bf16(x: &[f32], bits: &mut [Bf16]) {
            let n = x.len().min(bits.len());
            let (px, pb) = (x.as_ptr(), bits.as_mut_ptr());
            let mut i = 0;
            while i + 16 <= n {
                let packed = bf16_pack_avx512(_mm512_loadu_ps(px.add(i)));
                _mm256_storeu_si256(pb.add(i).cast(), packed);
                i += 16;
            }
            for j in i..n {
                *pb.add(j) = Bf16(f32_to_bf16(*px.add(j)));
            }
        }
    }
}

/// Instantiates generic kernels once per backend and dispatches on a [`SimdLevel`].
///
/// `dispatch! { pub fn name(args) -> Ret = generic_impl; }` (or `= generic_impl<T>;` for a kernel
/// with more type parameters after the backend) defines
/// `pub fn name(level: SimdLevel, args) -> Ret` that runs `generic_impl::<Backend>(args)` inside a
/// function compiled for that backend's target features.
#[macro_export]
macro_rules! dispatch {
    ($(
        $(#[$meta:meta])*
        $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $imp:ident $(<$($gen:ty),+>)?;
    )*) => {$(
        $(#[$meta])*
        // The level argument comes on top of the kernel's own.
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(level: $crate::simd::SimdLevel, $($arg: $ty),*) $(-> $ret)? {
            assert!(level.is_supported(), "SIMD path {} is not supported by this CPU", level.name());
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                $imp::<$crate::simd::Avx512 $($(, $gen)+)?>($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                $imp::<$crate::simd::Avx2 $($(, $gen)+)?>($($arg),*)
            }
            // SAFETY: the assert above checked that the CPU supports `level`.
            match level {
                #[cfg(target_arch = "x86_64")]
                $crate::simd::SimdLevel::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                $crate::simd::SimdLevel::Avx2 => unsafe { avx2($($arg),*) },
                _ => unsafe { $imp::<$crate::simd::Scalar $($(, $gen)+)?>($($arg),*) },
            }
        }
    )*};
}

#[cfg(test)]
mod tests {
    use super::*;

    dispatch! {
        pub fn exp_lanes(x: &[f32], out: &mut [f32]) = exp_lanes_impl;
    }

    #[inline(always)]
    unsafe fn exp_lanes_impl<S: Simd>(x: &[f32], out: &mut [f32]) {
        for (xc, oc) in x.chunks_exact(S::LANES).zip(out.chunks_exact_mut(S::LANES)) {
            S::store(oc.as_mut_ptr(), S::exp(S::load(xc.as_ptr())));
        }
    }

    #[test]
    fn resolve_rejects_unknown_names() {
        assert!(matches!(resolve(Some("sse9")), Err(FgError::Value(_))));
        assert_eq!(resolve(Some("scalar")), Ok(SimdLevel::Scalar));
        assert_eq!(resolve(None), Ok(detected()));
        assert_eq!(resolve(Some("auto")), Ok(detected()));
    }

    #[test]
    fn disabling_turns_off_the_named_features_only() {
        let all = CpuFeatures {
            avx2: true,
            fma: true,
            avx512f: true,
            avx512bw: true,
            avx512vl: true,
            avx512dq: true,
            avx512vnni: true,
            avx512bf16: true,
            avxvnni: true,
            amd: false,
        };
        let off = |list: &str| all.disabling(list).unwrap().named();
        let on = |features: [(&str, bool); 9]| {
            let on = features.iter().filter(|(_, v)| *v).map(|(n, _)| *n);
            on.collect::<Vec<_>>().join(",")
        };
        assert_eq!(on(off("")), on(all.named()));
        assert_eq!(
            on(off(" avx512vnni, avx512bf16 ,avxvnni")),
            "avx2,fma,avx512f,avx512bw,avx512vl,avx512dq"
        );
        assert_eq!(
            on(off("avx512f")),
            "avx2,fma,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,avxvnni"
        );
        let bad = all.disabling("avx512vnni,sse9").unwrap_err();
        assert!(
            bad.contains("\"sse9\"") && bad.contains("avx512bf16"),
            "{bad}"
        );
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn measured_clock_is_a_core_clock() {
        let hz = measured_clock_hz().unwrap();
        assert!((0.3e9..7e9).contains(&hz), "{hz} Hz");
    }

    #[test]
    fn pow2_is_exact() {
        assert_eq!(pow2(0.0), 1.0);
        assert_eq!(pow2(-3.0), 0.125);
        assert_eq!(pow2(-5000.0), 0.0);
        assert!(pow2(f64::NAN).is_nan());
    }

    #[test]
    fn exp_matches_f64_on_every_supported_path() {
        let x: Vec<f32> = (0..4096).map(|i| -87.0 + i as f32 * 0.0424).collect();
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            let mut out = vec![0.0f32; x.len()];
            exp_lanes(level, &x, &mut out);
            for (&xi, &yi) in x.iter().zip(&out) {
                let want = (xi as f64).exp();
                let rel = ((yi as f64 - want) / want).abs();
                assert!(
                    rel < 5e-7,
                    "{level:?}: exp({xi}) = {yi}, want {want}, rel {rel}"
                );
            }
        }
    }

    #[test]
    fn flush_subnormal_zeroes_exactly_the_subnormals() {
        let tiny = f32::MIN_POSITIVE;
        let mut v = [0.0f32; 16];
        v[..11].copy_from_slice(&[
            1e-39,
            -1e-40,
            f32::from_bits(1),
            tiny,
            -tiny,
            tiny * 0.999_999,
            1.0,
            -3e38,
            f32::INFINITY,
            f32::NAN,
            -0.0,
        ]);
        // The rule: |x| below the smallest normal (NaN is not) becomes +0.
        let want: Vec<u32> = v
            .iter()
            .map(|&x| if x.abs() < tiny { 0 } else { x.to_bits() })
            .collect();
        assert_eq!(
            want[..7],
            [
                0,
                0,
                0,
                tiny.to_bits(),
                (-tiny).to_bits(),
                0,
                1f32.to_bits()
            ]
        );
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            dispatch! { pub fn flush_lanes(v: &[f32], out: &mut [f32]) = flush_impl; }
            #[inline(always)]
            unsafe fn flush_impl<S: Simd>(v: &[f32], out: &mut [f32]) {
                for i in (0..v.len()).step_by(S::LANES) {
                    let f = S::flush_subnormal(S::load(v.as_ptr().add(i)));
                    S::store(out.as_mut_ptr().add(i), f);
                }
            }
            let mut out = [0.0f32; 16];
            flush_lanes(level, &v, &mut out);
            let got: Vec<u32> = out.iter().map(|x| x.to_bits()).collect();
            assert_eq!(got[..9], want[..9], "{level:?}");
            assert!(
                out[9].is_nan() && got[10] == 0,
                "{level:?}: NaN kept, -0 as +0"
            );
        }
    }

    #[test]
    fn scale_reaches_denormals_and_flushes_below() {
        let m = [1.5f32; 16];
        let k: Vec<f32> = (0..16).map(|i| -140.0 - 10.0 * i as f32).collect();
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            dispatch! { pub fn scale_lanes(m: &[f32], k: &[f32], out: &mut [f32]) = scale_impl; }
            #[inline(always)]
            unsafe fn scale_impl<S: Simd>(m: &[f32], k: &[f32], out: &mut [f32]) {
                for i in (0..m.len()).step_by(S::LANES) {
                    let v = S::scale(S::load(m.as_ptr().add(i)), S::load(k.as_ptr().add(i)));
                    S::store(out.as_mut_ptr().add(i), v);
                }
            }
            let mut out = [0.0f32; 16];
            scale_lanes(level, &m, &k, &mut out);
            for i in 0..16 {
                let want = (1.5f64 * 2f64.powf(k[i] as f64)) as f32;
                assert_eq!(out[i], want, "{level:?}: 1.5 * 2^{}", k[i]);
            }
        }
    }

    /// `bf16_pack_avx512` against the scalar rounding for every upper half of the f32 bits with
    /// lower halves at and around the ties: vectors of ordinary values take `vcvtneps2bf16`
    /// where the CPU has it; vectors holding a subnormal or a NaN the integer rounding.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn bf16_pack_rounds_as_the_scalar_path() {
        if !SimdLevel::Avx512.is_supported() {
            return;
        }
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
        unsafe fn pack(v: &[f32; 16]) -> [u16; 16] {
            use std::arch::x86_64::*;
            std::mem::transmute(bf16_pack_avx512(_mm512_loadu_ps(v.as_ptr())))
        }
        let lows = [
            0x0000, 0x0001, 0x7fff, 0x8000, 0x8001, 0xffff, 0x5a5a, 0xc3c3,
        ];
        let values: Vec<f32> = (0..=u16::MAX as u32)
            .flat_map(|hi| lows.map(|lo| f32::from_bits(hi << 16 | lo)))
            .collect();
        let (mut special, mut plain) = (0, 0);
        for chunk in values.chunks_exact(16) {
            let v: [f32; 16] = chunk.try_into().unwrap();
            let got = unsafe { pack(&v) };
            let odd = v.iter().any(|x| x.is_nan() || x.is_subnormal());
            if odd {
                special += 1;
            } else {
                plain += 1;
            }
            for (x, b) in v.iter().zip(got) {
                assert_eq!(b, f32_to_bf16(*x), "bf16({x:e}) = {b:#06x}");
            }
        }
        assert!(special >= 256 && plain > 30_000, "{special} / {plain}");
        let v = [1e-40f32; 16];
        assert_eq!(unsafe { pack(&v) }, [f32_to_bf16(1e-40); 16]);
        assert_ne!(f32_to_bf16(1e-40), 0, "a subnormal keeps its bits");
        // The slice form on every path, with a ragged tail.
        let x = &values[..values.len() - 5];
        let want: Vec<u16> = x.iter().map(|&v| f32_to_bf16(v)).collect();
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            let mut bits = vec![Bf16(0); x.len()];
            narrow_bf16(level, x, &mut bits);
            assert!(
                bits.iter().map(|b| b.0).eq(want.iter().copied()),
                "{level:?}"
            );
        }
    }
}
