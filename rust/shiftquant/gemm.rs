//! Integer GEMM on ShiftQuant codes: C = A · Bᵀ with A [M, K] and B [N, K] both quantized along K.
//!
//! C[m, n] = sa[m] · sb[n] · Σ_g 2^-(ka[m,g] + kb[n,g]) · Σ_{k in g} qa[m,k] · qb[n,k] (+ bias[n]).
//! Each group's sum of code products is an exact int32; it becomes float32 exactly (below 2^24)
//! and is scaled by exact powers of two, so the only rounding is the float32 accumulation
//! across groups and the final scaling.
//!
//! GotoBLAS structure: both operands are packed once into panels of MR rows / NR columns, each
//! K block of a panel laid out [k/4][MR or NR][4 bytes] (the micro-kernels' order) and the
//! blocks outermost (`Layout`), with per-group power-of-two factors beside them. Work is split
//! into MC x NC blocks of C across threads; each block walks K in blocks of whole groups (KC)
//! so that a B micro-panel stays in L1 while the A panels stream from L2 in one contiguous run,
//! and keeps its float accumulators in a block-local buffer until the epilogue.
//!
//! Micro-kernels (x86.rs): AVX-512 VNNI (`vpdpbusd`, 6 x 32, float accumulators in registers),
//! AVX-VNNI (256-bit `vpdpbusd`, 6 x 16, A offset by 128) where the CPU has it and not the
//! former, `vpmaddubsw` kernels elsewhere (512-bit with AVX-512 BW, 256-bit with AVX2), and a
//! portable scalar one. The `vpmaddubsw` kernels are picked from the operands' largest |codes|
//! (measured before packing, so no bit width is trusted): 8-bit codes multiply |b| by
//! sign-transferred a, widened by `vpmaddwd` every step; narrower codes store A offset to
//! unsigned (no sign transfer) and add the 16-bit pair sums of as many steps as cannot overflow
//! before widening. Codes of -128 are rejected (the sign trick cannot hold them).

use std::borrow::Cow;
use std::sync::atomic::{AtomicU32, Ordering};

use super::num_groups;
use crate::error::{FgError, FgResult};
use crate::simd::{cpu_features, Bf16, Simd, SimdLevel, Storage};
use crate::threads::{self, SendPtr};

mod prepacked;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use prepacked::{pack_weight, packed_weight_bytes};

/// The largest code magnitude (8-bit codes are symmetric; -128 would break the sign trick).
const MAX_CODE: u32 = 127;

/// What the GEMM writes: f32, or bfloat16 rounded to nearest even from the f32
/// result (the bits torch's conversion of the f32 result gives, without a float32 copy).
pub trait Output: Storage {
    const EPILOGUE: EpilogueKernel<Self>;
    /// What a micro-kernel that writes C itself stores (`Direct`).
    const FORMAT: Format;
}

/// The element format of C for the micro-kernels that write it themselves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Format {
    F32,
    Bf16,
}

impl Format {
    fn bytes(self) -> usize {
        match self {
            Format::F32 => 4,
            Format::Bf16 => 2,
        }
    }
}

type EpilogueKernel<T> = fn(SimdLevel, &Epilogue<'_>, *mut T, usize);

impl Output for f32 {
    const EPILOGUE: EpilogueKernel<f32> = epilogue_f32;
    const FORMAT: Format = Format::F32;
}

impl Output for Bf16 {
    const EPILOGUE: EpilogueKernel<Bf16> = epilogue_bf16;
    const FORMAT: Format = Format::Bf16;
}

/// One quantized operand: codes [rows, k], scale [rows], shifts [rows, num_groups(k)].
#[derive(Clone, Copy)]
pub struct GemmOperand<'a> {
    pub codes: &'a [i8],
    pub scale: &'a [f32],
    pub shifts: &'a [u8],
}

impl GemmOperand<'_> {
    fn rows(&self) -> usize {
        self.scale.len()
    }

    fn check(&self, name: &str, k: usize, group_size: usize) -> FgResult<()> {
        let rows = self.rows();
        if self.codes.len() != rows * k || self.shifts.len() != rows * num_groups(k, group_size) {
            return Err(FgError::Value(format!(
                "shiftquant_matmul: {name} has {} codes and {} shifts for {rows} rows of K={k} \
                 in groups of {group_size}",
                self.codes.len(),
                self.shifts.len()
            )));
        }
        // A max (vectorized) rather than `any` (a byte at a time): a weight's shifts are
        // checked at every call, at one token as long as the GEMM itself.
        if self.shifts.iter().fold(0, |m, &s| m.max(s)) > super::MAX_SHIFT {
            return Err(FgError::Value(format!(
                "shiftquant_matmul: {name}.shifts must be in 0..={}",
                super::MAX_SHIFT
            )));
        }
        Ok(())
    }
}

/// Everything a micro-kernel needs for one MR x NR tile over a run of whole groups.
struct Tile {
    /// A's first quad of this run: row i of the tile starts `a_row` · i bytes on (up to its
    /// `a_live` rows; the rows past the end repeat the last one), and each k-step moves `a_step`
    /// bytes on. Packed panels are 4 and 4 · MR; the rows where they lie (`Kernel::a_in_place`)
    /// K and 4. Only kernels with `a_in_place` read these three; the others take packed panels.
    a: *const i8,
    a_row: usize,
    a_step: usize,
    a_live: usize,
    b: *const i8,
    /// 2^-ka per (group, row of the panel), [groups][MR].
    a_pow: *const f32,
    /// For kernels that store B offset by c: -c · Σ_group qa per (group, row), [groups][MR].
    a_corr: *const i32,
    /// For kernels that store A offset by c: -c · Σ_group qb per (group, column), [groups][NR].
    b_corr: *const i32,
    /// 2^-kb per (group, column), [groups][NR].
    b_pow: *const f32,
    /// k/4 steps of each group of the run.
    steps: *const usize,
    groups: usize,
    /// Steps whose 16-bit pair sums can add up in 16 bits before widening (see `int16_depth`).
    depth: usize,
    /// The tile's float accumulators, [MR][NR], updated in place.
    acc: *mut f32,
    /// The first run of groups: the accumulators start from 0 instead of `acc` (which holds
    /// whatever the buffer's last use left; not zeroing it saved a memset of each block).
    first: bool,
    /// On the last run, for kernels that can: write the tile's C instead of `acc`.
    direct: Option<Direct>,
}

/// A tile's C written by the micro-kernel from its registers on the last run of groups:
/// c = acc · (sa · sb) (+ bias), each operation rounded in f32 as the epilogue's f32 path rounds
/// (used only where that path applies, `scales_fit_f32`), cropped to the live rows and columns.
/// At K = 128 the separate epilogue pass (a store and a reload of every accumulator, then the
/// scaling) was a fifth of the GEMM's time.
#[derive(Clone, Copy)]
struct Direct {
    /// C's element (tile row 0, column 0), in `format`, and C's row stride in elements.
    out: *mut u8,
    stride: usize,
    format: Format,
    rows: usize,
    cols: usize,
    /// The tile's rows' and columns' scales, its columns' bias (null: none).
    a_scale: *const f32,
    b_scale: *const f32,
    bias: *const f32,
}

#[derive(Clone, Copy)]
struct Kernel {
    mr: usize,
    nr: usize,
    /// A and B are stored as unsigned bytes q + offset (0: as they are); each operand's group
    /// sums times minus the other's offset cancel it.
    a_offset: u8,
    b_offset: u8,
    /// Steps of 16-bit pair sums per widening (the AVX2 kernels; see `int16_depth`).
    depth: usize,
    /// Whether `run` writes C itself when a tile carries `Tile::direct`.
    direct: bool,
    /// Whether `run` can read A's codes where they lie (rows `Tile::a_row` apart) rather than
    /// from packed panels: A then needs no copy, only its group factors and sums (`pack` with
    /// `in_place`). Packing A was a fifth of the samples of a 128-wide layer's GEMMs (4096
    /// tokens, 2 threads), and its parallel region a wait of its own.
    a_in_place: bool,
    run: unsafe fn(&Tile),
    /// The same kernel with MR = 1, 2, ... below `mr` (`fit_rows`), where there is one.
    narrower: &'static [unsafe fn(&Tile)],
}

impl Kernel {
    /// The kernel for this CPU and these operands, whose largest |codes| are `max_a`, `max_b`.
    fn select(level: SimdLevel, max_a: u32, max_b: u32) -> Kernel {
        let plain = Kernel {
            mr: 4,
            nr: 8,
            a_offset: 0,
            b_offset: 0,
            depth: int16_depth(max_a, max_b),
            direct: false,
            a_in_place: false,
            run: scalar_4x8,
            narrower: &[],
        };
        #[cfg(target_arch = "x86_64")]
        let family = |(mr, run, narrower): x86::Family, nr: usize| Kernel {
            mr,
            nr,
            run,
            narrower,
            ..plain
        };
        match level {
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 if cpu_features().avx512vnni => Kernel {
                b_offset: 128,
                direct: true,
                a_in_place: true,
                ..family(if fma_fold() { x86::VNNI_FMA } else { x86::VNNI }, 32)
            },
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 | SimdLevel::Avx2 if cpu_features().avxvnni => Kernel {
                a_offset: 128,
                ..family(x86::AVX_VNNI, 16)
            },
            // Without VNNI, `vpmaddubsw` kernels: A + max_a is unsigned (no sign transfer) at
            // twice the magnitude; worth it once two steps fit in 16 bits, i.e. below 8-bit codes.
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 | SimdLevel::Avx2 => {
                let (unsigned, signed, nr) = if level == SimdLevel::Avx512 {
                    (x86::AVX512BW_UNSIGNED, x86::AVX512BW_SIGNED, 32)
                } else {
                    (x86::AVX2_UNSIGNED, x86::AVX2_SIGNED, 16)
                };
                let depth = int16_depth(2 * max_a, max_b);
                if depth >= 2 {
                    Kernel {
                        a_offset: max_a as u8,
                        depth,
                        ..family(unsigned, nr)
                    }
                } else {
                    family(signed, nr)
                }
            }
            _ => plain,
        }
    }
}

/// Whether the VNNI kernel folds its group sums by a fused multiply-add (`fold_vnni_fma`)
/// rather than by exponent scaling (`fold_vnni`): the same bits either way. On Intel every
/// 512-bit float operation takes a `vpdpbusd` port, and the fold with fewer operations won
/// (2048^3 24.3-24.7 -> 22.0-22.2 ms on a Xeon of family 6 model 207); on AMD Zen 4 the
/// scaling runs beside the multiply-adds and won (the multiply-add fold cost 6% against 1%).
#[cfg(target_arch = "x86_64")]
fn fma_fold() -> bool {
    #[cfg(test)]
    if let Some(fma) = tests::FMA_FOLD.get() {
        return fma;
    }
    !cpu_features().amd
}

impl Kernel {
    /// The kernel for an A of `m` rows: below MR one with MR = m where the kernel has one, so
    /// that no multiply-adds go to rows that are not there (at M = 1, 5/6 of the VNNI kernel's;
    /// a layer's evaluation at one token); up to `SHORT_A` rows, equal panels of the fewest
    /// rows that need no more of them (M = 8: two of 4 rather than 6 and 2 live of 6).
    fn fit_rows(self, m: usize) -> Kernel {
        let rows = if m <= SHORT_A * self.mr {
            m.div_ceil(m.div_ceil(self.mr))
        } else {
            self.mr
        };
        match self.narrower.get(rows.wrapping_sub(1)) {
            Some(&run) if rows < self.mr => Kernel {
                mr: rows,
                run,
                ..self
            },
            _ => self,
        }
    }
}

/// Panels of A (at the kernel's full MR) up to which A is "short": the GEMM then streams B
/// once, threads splitting only its columns (`block_rows`), and `fit_rows` evens the panels.
const SHORT_A: usize = 2;

/// Rows of C per block (a multiple of every MR) and columns per block (a multiple of every NR).
const MC: usize = 192;
const NC: usize = 512;
/// Bytes of K per block: a 32-column B micro-panel of this depth is 16 KiB (L1).
const KC: usize = 512;
/// Per-thread work minimums: a second thread joins only when each gets at least this much
/// (bytes to pack; multiply-adds, about 0.15 ms on one Zen 5 core). On a loaded machine a
/// parallel call can wait milliseconds for a descheduled thread, which small calls cannot repay;
/// on an idle one, 2^27 kept the GEMMs of a 128-wide model (4096 tokens, K = 128) on one
/// thread, 1.4-1.6x slower than two (Zen 5, 2 cores). Packing B of a 512-wide layer's GEMMs
/// (256 KiB) on one thread while the other waited was 4-5% of a 1024 x 512 x 512 GEMM: from
/// 64 KiB a thread it takes both (Zen 4: 768-771 -> 747-759 us).
const PACK_PER_THREAD: usize = 1 << 16;
const MACS_PER_THREAD: usize = 1 << 25;
/// Bytes of B per thread: at a few rows of A the GEMM streams B (a weight) from memory, and two
/// threads stream faster than one (8 x 4096 x 4096 with B packed ahead: 2 MB here is about
/// 0.1 ms of one core's reading).
const B_BYTES_PER_THREAD: usize = 1 << 21;
/// What one output element costs beside its K multiply-adds (the epilogue's scaling and store,
/// the accumulator round trips), in multiply-adds: at K = 128 a 4096 x 384 output took 1.46 ms
/// on one Zen 5 core, of which the multiply-adds were a third. Counting only M·N·K, the
/// ShiftQuantLinear GEMMs of a 128-wide model (4096 tokens) ran on one thread.
const MACS_PER_OUTPUT: usize = 256;

/// Where a packed operand's codes lie: K blocks outermost, then panels, then the block's quads
/// ([block][panel][quad][r][4 bytes]). The tiles of a K block read the panels in turn, so this
/// makes each thread's reads one contiguous run that the hardware prefetchers follow; panels
/// laid out one after another restarted a stream every tile (about a tenth of the time of a
/// 2048³ GEMM on Zen 5).
#[derive(Clone, Copy)]
struct Layout {
    /// Rows per panel.
    r: usize,
    panels: usize,
    /// Quads of K (padded) per row, and per K block (the last block may be shorter).
    quads: usize,
    block_quads: usize,
}

impl Layout {
    /// The K block starting at quad `start` (a multiple of `block_quads`): the byte offset of its
    /// first panel and the bytes from one panel to the next.
    fn block(&self, start: usize) -> (usize, usize) {
        let len = self.block_quads.min(self.quads - start);
        (start * self.panels * self.r * 4, len * self.r * 4)
    }

    /// The byte offset of quad `kk` of panel `p` (its first row).
    fn at(&self, p: usize, kk: usize) -> usize {
        let start = kk / self.block_quads * self.block_quads;
        let (base, panel) = self.block(start);
        base + p * panel + (kk - start) * self.r * 4
    }
}

/// An operand packed into panels of `layout.r` rows: made by this call (`pack`), or borrowed
/// from a weight packed ahead of time (`prepacked`).
struct Packed<'a> {
    layout: Layout,
    /// Metadata entries per panel: groups times r.
    meta: usize,
    data: Cow<'a, [i8]>,
    pow: Cow<'a, [f32]>,
    corr: Cow<'a, [i32]>,
}

impl Packed<'_> {
    /// The buffers this call made, for the next one (borrowed ones give empty vectors).
    fn into_buffers(self) -> Buffers {
        let Packed {
            data, pow, corr, ..
        } = self;
        Buffers {
            data: owned(data),
            pow: owned(pow),
            corr: owned(corr),
        }
    }
}

fn owned<T: Clone>(c: Cow<'_, [T]>) -> Vec<T> {
    match c {
        Cow::Owned(v) => v,
        Cow::Borrowed(_) => Vec::new(),
    }
}

/// How K is walked: k/4 steps per group (every group but the last holds group_size / 4 quads;
/// the last is padded to whole quads) in blocks of whole groups of about KC bytes.
struct Plan {
    steps: Vec<usize>,
    groups_per_block: usize,
    group_size: usize,
    quads: usize,
}

impl Plan {
    fn new(k: usize, group_size: usize) -> Plan {
        let groups = num_groups(k, group_size);
        let mut steps = vec![group_size / 4; groups];
        if let Some(last) = steps.last_mut() {
            *last = (k - (groups - 1) * group_size).div_ceil(4);
        }
        let quads = steps.iter().sum();
        Plan {
            steps,
            groups_per_block: (KC / group_size).max(1),
            group_size,
            quads,
        }
    }

    /// The layout of an operand of `rows` rows in panels of `r`.
    fn layout(&self, rows: usize, r: usize) -> Layout {
        Layout {
            r,
            panels: rows.div_ceil(r),
            quads: self.quads,
            block_quads: self.groups_per_block * self.group_size / 4,
        }
    }
}

/// What a `Packed` is made in, recycled between calls (`PACKED`).
#[derive(Default)]
struct Buffers {
    data: Vec<i8>,
    pow: Vec<f32>,
    corr: Vec<i32>,
}

impl Buffers {
    const EMPTY: Buffers = Buffers {
        data: Vec::new(),
        pow: Vec::new(),
        corr: Vec::new(),
    };
}

/// Packs `op` into `layout`, storing q + `offset` (as unsigned bytes when nonzero), with
/// -`other_offset` · Σ_group q per (group, row) to cancel the other operand's offset. The codes
/// go into `data` and the group factors and sums into `pow` and `corr`, buffers recycled from an
/// earlier call (see `PACKED`). With `in_place` (no offset, K a multiple of 4) only the group
/// factors and sums are made, for a kernel that reads the codes where they lie
/// (`Kernel::a_in_place`), and `data` comes back as it was.
fn pack(
    op: &GemmOperand<'_>,
    (k, gs): (usize, usize),
    layout: Layout,
    (offset, other_offset): (u8, u8),
    Buffers {
        mut data,
        mut pow,
        mut corr,
    }: Buffers,
    in_place: bool,
) -> Packed<'static> {
    let Layout { r, panels, .. } = layout;
    let rows = op.rows();
    let groups = num_groups(k, gs);
    let meta = groups * r;
    assert!(!in_place || (offset == 0 && k.is_multiple_of(4)));
    // Every byte is written below (the padding with the code 0 + offset): the buffer is only
    // initialized where it grows.
    if !in_place {
        data.resize(panels * layout.quads * r * 4, 0);
    }
    // Zero where no row writes (the padding rows; corr without an offset to cancel).
    pow.clear();
    pow.resize(panels * meta, 0.0);
    corr.clear();
    corr.resize(panels * meta, 0);
    let (dp, pp, cp) = (
        SendPtr(data.as_mut_ptr()),
        SendPtr(pow.as_mut_ptr()),
        SendPtr(corr.as_mut_ptr()),
    );
    let panel = |p: usize| {
        // SAFETY: panel p alone writes its quads (`Layout::at`) and its metadata range.
        let (pw, cs) = unsafe {
            (
                std::slice::from_raw_parts_mut(pp.ptr().add(p * meta), meta),
                std::slice::from_raw_parts_mut(cp.ptr().add(p * meta), meta),
            )
        };
        let live = r.min(rows - p * r);
        let panel = &op.codes[p * r * k..(p * r + live) * k];
        // K = 0 leaves `panel` empty; the row chunks then only need a nonzero length.
        let row_len = k.max(1);
        let (full, tail) = (k / 4, k % 4);
        // Blocks of rows 0, 4, 8, ... and, for a count that is not a multiple of 4, the last
        // four rows (rewriting some rows with the same bytes).
        let row_blocks = (0..live / 4 * 4)
            .step_by(4)
            .chain((live >= 4 && !live.is_multiple_of(4)).then(|| live - 4));
        let lanes = u32::from_ne_bytes([offset; 4]);
        // In place there are no codes to copy: only the metadata loop below runs.
        let copied = if in_place { 0 } else { layout.quads };
        for start in (0..copied).step_by(layout.block_quads) {
            // This K block's quads are contiguous: at most 16 KiB, which stay in L1 while 4 rows
            // at a time stream in (all r rows at once were more streams than the prefetchers
            // follow: half the packing time was stalls).
            let (base, bytes) = layout.block(start);
            let len = bytes / (r * 4);
            // SAFETY: panel p alone writes these len quads of r rows of 4 bytes.
            let block =
                unsafe { std::slice::from_raw_parts_mut(dp.ptr().add(base + p * bytes), bytes) };
            prefetch_source(panel, row_len, live, 0, start * 4, len * 4);
            // Quads wholly inside K: 4 x 4 blocks (4 rows, 4 quads) transposed in registers,
            // the rest one quad at a time (a byte loop, row by row, was a tenth of the GEMM's
            // time at 1024³; quad by quad, 6-12% at model shapes).
            let inside = full.clamp(start, start + len) - start;
            let transposed = if live >= 4 { inside / 4 * 4 } else { 0 };
            for i in row_blocks.clone() {
                prefetch_source(panel, row_len, live, i + 4, start * 4, len * 4);
                // Rows i..i + 4 hold quads start..start + transposed (inside K); the block holds
                // `len` >= transposed quads of r >= i + 4 rows.
                assert!(i + 4 <= live && (start + transposed) * 4 <= k && transposed <= len);
                // SAFETY: the assert bounds every read and write.
                unsafe {
                    let src = panel.as_ptr().add(i * row_len + start * 4);
                    let dst = block.as_mut_ptr().add(i * 4);
                    transpose_quads(src, row_len, transposed, offset, dst, r * 4);
                }
            }
            // The quads left: those not transposed, and the padding (rows past the operand's
            // end, quads past K). A full panel of a K that is a multiple of 16 has none.
            let quads = block.chunks_exact_mut(r * 4).enumerate();
            for (kk, quad) in quads.skip(if live == r { transposed } else { 0 }) {
                let mut write = |i: usize, v: u32| {
                    quad[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes().map(|b| b as i8))
                };
                if (transposed..inside).contains(&kk) {
                    for i in 0..live {
                        let q: [i8; 4] = panel[i * row_len + (start + kk) * 4..][..4]
                            .try_into()
                            .unwrap();
                        write(i, add_bytes(u32::from_ne_bytes(q.map(|q| q as u8)), lanes));
                    }
                }
                let pad = if kk < inside { live } else { 0 };
                (pad..r).for_each(|i| write(i, lanes));
            }
        }
        for (i, row) in panel.chunks_exact(row_len).enumerate() {
            if tail > 0 {
                // SAFETY: quad `full` exists when K has a tail; row i's first `tail` bytes of it.
                let o = unsafe {
                    std::slice::from_raw_parts_mut(dp.ptr().add(layout.at(p, full) + i * 4), tail)
                };
                for (o, &q) in o.iter_mut().zip(&row[full * 4..]) {
                    *o = q.wrapping_add(offset as i8);
                }
            }
            let shifts = &op.shifts[(p * r + i) * groups..][..groups];
            for (g, (group, &shift)) in row.chunks(gs).zip(shifts).enumerate() {
                pw[g * r + i] = f32::from_bits((127 - u32::from(shift)) << 23);
                if other_offset != 0 {
                    cs[g * r + i] = -i32::from(other_offset) * byte_sum(group);
                }
            }
        }
    };
    // Runs of panels of about PACK_PER_THREAD bytes, one contiguous run per thread first: a
    // shared counter per panel (6 rows of A at K = 128 are 768 bytes) bounced its cache line
    // between the threads for a fifth of the packing time.
    let per_task = if rows * k < 2 * PACK_PER_THREAD {
        panels
    } else {
        threads::rows_per_task(panels, r * k, PACK_PER_THREAD)
    };
    threads::for_each_chunk(panels, per_task, |_, run| run.for_each(panel));
    Packed {
        layout,
        meta,
        data: Cow::Owned(data),
        pow: Cow::Owned(pow),
        corr: Cow::Owned(corr),
    }
}

/// Prefetches bytes `from..from + len` of the 4 rows from `row` of `panel` (rows `row_len`
/// apart, `live` of them): the packer's next rows, read 4 at a time a K block wide (a short run
/// per row, which the hardware prefetchers start too late to follow).
#[inline(always)]
fn prefetch_source(panel: &[i8], row_len: usize, live: usize, row: usize, from: usize, len: usize) {
    for i in row..(row + 4).min(live) {
        crate::simd::prefetch_block(&panel[i * row_len..(i + 1) * row_len], from, len);
    }
}

/// Quads 0..`quads` (a multiple of 4) of the four rows at `src` (`row_len` bytes apart), plus
/// `offset` per byte, written as the 4 rows' quads of quad kk at `out[kk * stride..]`: 4 x 4
/// transposes of 32-bit words. Raw pointers because bounds-checked slices per 16 bytes were
/// most of the packing time.
///
/// # Safety
/// The rows hold 4 · `quads` bytes from `src`; `out` holds (quads - 1) · stride + 16 bytes.
#[inline(always)]
unsafe fn transpose_quads(
    src: *const i8,
    row_len: usize,
    quads: usize,
    offset: u8,
    out: *mut i8,
    stride: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        let add = _mm_set1_epi8(offset as i8);
        for kk in (0..quads).step_by(4) {
            let v: [__m128i; 4] = std::array::from_fn(|j| {
                _mm_add_epi8(_mm_loadu_si128(src.add(j * row_len + kk * 4).cast()), add)
            });
            let (lo01, hi01) = (
                _mm_unpacklo_epi32(v[0], v[1]),
                _mm_unpackhi_epi32(v[0], v[1]),
            );
            let (lo23, hi23) = (
                _mm_unpacklo_epi32(v[2], v[3]),
                _mm_unpackhi_epi32(v[2], v[3]),
            );
            let t = [
                _mm_unpacklo_epi64(lo01, lo23),
                _mm_unpackhi_epi64(lo01, lo23),
                _mm_unpacklo_epi64(hi01, hi23),
                _mm_unpackhi_epi64(hi01, hi23),
            ];
            for (j, t) in t.iter().enumerate() {
                _mm_storeu_si128(out.add((kk + j) * stride).cast(), *t);
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    for kk in 0..quads {
        for i in 0..4 {
            for b in 0..4 {
                let q = *src.add(i * row_len + kk * 4 + b);
                *out.add(kk * stride + 4 * i + b) = q.wrapping_add(offset as i8);
            }
        }
    }
}

/// Σ q over `bytes`: 16 at a time by `psadbw` on q + 128 (then less 128 per byte).
#[inline(always)]
fn byte_sum(bytes: &[i8]) -> i32 {
    let chunks = bytes.chunks_exact(16);
    let tail: i32 = chunks.remainder().iter().map(|&q| i32::from(q)).sum();
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE2 is part of x86_64; each chunk holds 16 bytes.
    let body = unsafe {
        use std::arch::x86_64::*;
        let (flip, zero) = (_mm_set1_epi8(i8::MIN), _mm_setzero_si128());
        let mut acc = zero;
        for chunk in chunks {
            let v = _mm_xor_si128(_mm_loadu_si128(chunk.as_ptr().cast()), flip);
            acc = _mm_add_epi64(acc, _mm_sad_epu8(v, zero));
        }
        let total = _mm_cvtsi128_si64(acc) + _mm_cvtsi128_si64(_mm_unpackhi_epi64(acc, acc));
        total as i32 - 128 * (bytes.len() / 16 * 16) as i32
    };
    #[cfg(not(target_arch = "x86_64"))]
    let body: i32 = chunks.flatten().map(|&q| i32::from(q)).sum();
    body + tail
}

/// The four bytes of `x` plus those of `y`, each modulo 256 (no carry between bytes).
fn add_bytes(x: u32, y: u32) -> u32 {
    const HIGH: u32 = 0x8080_8080;
    ((x & !HIGH) + (y & !HIGH)) ^ ((x ^ y) & HIGH)
}

/// The largest |code| of an operand, in parts over the threads when it is large: scanned on the
/// calling thread (SSE2) while the team waited, a layer's gradient codes took 3-9% of a GEMM's
/// call (4096 tokens, 128 -> 384: the backward 3065 -> 2847 us without the scan).
fn max_abs_code(level: SimdLevel, codes: &[i8]) -> u32 {
    const PART: usize = 1 << 18;
    if codes.len() <= PART {
        return u32::from(max_abs_part(level, codes));
    }
    let max = AtomicU32::new(0);
    let parts = codes.len().div_ceil(PART);
    threads::split_contiguous(parts, |p| {
        let part = &codes[p * PART..((p + 1) * PART).min(codes.len())];
        max.fetch_max(u32::from(max_abs_part(level, part)), Ordering::Relaxed);
    });
    max.into_inner()
}

#[inline(always)]
#[allow(clippy::extra_unused_type_parameters)] // S picks the target features, via dispatch!
unsafe fn max_abs_impl<S: Simd>(codes: &[i8]) -> u8 {
    codes.iter().fold(0, |m, &q| m.max(q.unsigned_abs()))
}

/// How many k-steps of `vpmaddubsw` pair sums (each at most 2 · max|qa| · max|qb|) a 16-bit
/// lane can add up without overflow before it is widened: 1 for 8-bit codes, 4 for 7 bits,
/// 16 for 6 bits (a whole group of 64), more below; unbounded when an operand is all zeros.
fn int16_depth(max_a: u32, max_b: u32) -> usize {
    (i16::MAX as u32)
        .checked_div(2 * max_a * max_b)
        .map_or(usize::MAX, |d| d as usize)
}

/// C = A · Bᵀ (+ bias) into `out` [M, N] for operands quantized along K in groups of `group_size`.
/// `packed_b`, B packed ahead of time (`pack_weight`), spares the call packing B.
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Output>(
    level: SimdLevel,
    a: &GemmOperand<'_>,
    b: &GemmOperand<'_>,
    packed_b: Option<&[u8]>,
    k: usize,
    group_size: usize,
    bias: Option<&[f32]>,
    out: &mut [T],
) -> FgResult<()> {
    let (m, n) = (a.rows(), b.rows());
    check_group_size("shiftquant_matmul", group_size)?;
    a.check("a", k, group_size)?;
    b.check("b", k, group_size)?;
    if out.len() != m * n {
        return Err(FgError::Value(format!(
            "shiftquant_matmul: out must hold {m} x {n} elements, got {}",
            out.len()
        )));
    }
    if let Some(bias) = bias {
        if bias.len() != n {
            return Err(FgError::Value(format!(
                "shiftquant_matmul: bias must have {n} elements, got {}",
                bias.len()
            )));
        }
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let weight = packed_b
        .map(|bytes| prepacked::Weight::parse(bytes, n, k, group_size))
        .transpose()?;
    // A packed weight's codes were checked when it was packed.
    let max_b = weight
        .as_ref()
        .map_or_else(|| max_abs_code(level, b.codes), |w| w.max_b);
    let max_a = max_abs_code(level, a.codes);
    for (name, max) in [("a", max_a), ("b", max_b)] {
        if max > MAX_CODE {
            return Err(FgError::Value(format!(
                "shiftquant_matmul: {name}.codes must lie in [-{MAX_CODE}, {MAX_CODE}], got -128"
            )));
        }
    }
    let kernel = Kernel::select(level, max_a, max_b).fit_rows(m);
    let plan = Plan::new(k, group_size);
    let [buffers_a, buffers_b] = PACKED.with_borrow_mut(std::mem::take);
    // A packed is read once per block of NC columns: copying it pays off only over several.
    let a_in_place = kernel.a_in_place && k.is_multiple_of(4) && n <= NC;
    let pa = pack(
        a,
        (k, group_size),
        plan.layout(m, kernel.mr),
        (kernel.a_offset, kernel.b_offset),
        buffers_a,
        a_in_place,
    );
    let (pb, spare_b) = match weight.and_then(|w| w.packed(&kernel, &plan, n)) {
        Some(pb) => (pb, Some(buffers_b)),
        None => {
            let offsets = (kernel.b_offset, kernel.a_offset);
            let pb = pack(
                b,
                (k, group_size),
                plan.layout(n, kernel.nr),
                offsets,
                buffers_b,
                false,
            );
            (pb, None)
        }
    };
    let parallel = m * n * (k + MACS_PER_OUTPUT) >= 2 * MACS_PER_THREAD
        || (n * k >= 2 * B_BYTES_PER_THREAD && n > NC);
    let blocks_n = n.div_ceil(NC);
    let mc = block_rows(m, kernel.mr, blocks_n, parallel.then(threads::num_threads));
    let blocks_m = m.div_ceil(mc);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let job = Job {
        level,
        kernel,
        pa: &pa,
        a_codes: a_in_place.then_some(a.codes),
        k,
        pb: &pb,
        steps: &plan.steps,
        groups_per_block: plan.groups_per_block,
        mc,
        a_scale: a.scale,
        scales_fit: scales_fit_f32(a.scale, b.scale),
        b_scale: b.scale,
        bias,
        m,
        n,
    };
    let block = |idx: usize| {
        BLOCK_ACC.with_borrow_mut(|acc| {
            // SAFETY: blocks write disjoint rectangles of `out`.
            unsafe { job.block(idx / blocks_n, idx % blocks_n, acc, out_ptr) }
        })
    };
    if parallel {
        threads::split(blocks_m * blocks_n, block);
    } else {
        (0..blocks_m * blocks_n).for_each(block);
    }
    let buffers_b = spare_b.unwrap_or_else(|| pb.into_buffers());
    PACKED.set([pa.into_buffers(), buffers_b]);
    Ok(())
}

/// The GEMM walks K in quads: a group must hold whole ones.
fn check_group_size(op: &str, group_size: usize) -> FgResult<()> {
    if group_size == 0 || !group_size.is_multiple_of(4) {
        return Err(FgError::Value(format!(
            "{op}: group_size must be a positive multiple of 4, got {group_size}"
        )));
    }
    Ok(())
}

/// Rows per block of C (a multiple of `mr`, at most MC): with `threads`, as many blocks of rows
/// as make the blocks a multiple of the thread count, of equal height. Otherwise at 2 threads
/// M = 512 is blocks of 192, 192 and 128 rows (one thread does two thirds) and M = 1024 ends
/// in a short block.
fn block_rows(m: usize, mr: usize, blocks_n: usize, threads: Option<usize>) -> usize {
    let mut blocks_m = m.div_ceil(MC);
    // A short A with enough columns for every thread: one block of rows, so that B (a
    // weight, streamed from memory at a few rows) is read once rather than once per block.
    if threads.is_some_and(|t| blocks_n >= t && m <= SHORT_A * mr) {
        return m.next_multiple_of(mr);
    }
    if let Some(threads) = threads {
        let per = threads / gcd(threads, blocks_n);
        blocks_m = blocks_m.div_ceil(per) * per;
    }
    m.div_ceil(blocks_m).div_ceil(mr) * mr
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

thread_local! {
    /// A block's float accumulators, kept per thread between blocks and calls (a fresh 192 KiB
    /// buffer per block was an mmap and its page faults every time).
    static BLOCK_ACC: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The packed operands' buffers, kept by the calling thread between calls: fresh ones were
    /// page faults on every call (a tenth of the time at 1024³), and their allocations and frees
    /// of ~100 KiB per call left the heap's top free, so that glibc gave it back and the GEMM's
    /// next output faulted its pages in again (30-240 faults a call in a ShiftQuantLinear).
    static PACKED: std::cell::RefCell<[Buffers; 2]> = const {
        std::cell::RefCell::new([Buffers::EMPTY, Buffers::EMPTY])
    };
}

struct Job<'a> {
    level: SimdLevel,
    kernel: Kernel,
    pa: &'a Packed<'a>,
    /// A's codes [M, K] when the kernel reads them where they lie (`pa` then holds only the
    /// group factors and sums).
    a_codes: Option<&'a [i8]>,
    k: usize,
    pb: &'a Packed<'a>,
    steps: &'a [usize],
    groups_per_block: usize,
    /// Rows per block (`block_rows`).
    mc: usize,
    a_scale: &'a [f32],
    b_scale: &'a [f32],
    bias: Option<&'a [f32]>,
    m: usize,
    n: usize,
    /// `scales_fit_f32` over all of A's and B's scales: then it holds for every block too.
    scales_fit: bool,
}

impl Job<'_> {
    /// Computes the mc x NC block (bi, bj) of C into `out`.
    ///
    /// # Safety
    /// `out` points at the M x N output and no other thread writes this block.
    unsafe fn block<T: Output>(&self, bi: usize, bj: usize, acc: &mut Vec<f32>, out: SendPtr<T>) {
        let (mr, nr) = (self.kernel.mr, self.kernel.nr);
        let (m0, n0) = (bi * self.mc, bj * NC);
        let (rows, cols) = (self.mc.min(self.m - m0), NC.min(self.n - n0));
        let (panels_m, panels_n) = (rows.div_ceil(mr), cols.div_ceil(nr));
        let tile = mr * nr;
        // Every tile's first run starts from zero (`Tile::first`): only grow the buffer, and
        // zero it where no run comes (K = 0).
        let need = panels_m * panels_n * tile;
        if acc.len() < need {
            acc.resize(need, 0.0);
        }
        if self.steps.is_empty() {
            acc[..need].fill(0.0);
        }
        let groups = self.steps.len();
        let (a_scale, b_scale) = (&self.a_scale[m0..m0 + rows], &self.b_scale[n0..n0 + cols]);
        let bias = self.bias.map(|b| &b[n0..n0 + cols]);
        // Per block only where the whole operands' scales do not fit (a scan per block was 5%
        // of the GEMM at K = 128).
        let fit = self.scales_fit || scales_fit_f32(a_scale, b_scale);
        let direct = self.kernel.direct && groups > 0 && fit;
        let out = out.ptr().add(m0 * self.n + n0);
        let mut g0 = 0;
        while g0 < groups {
            let g1 = (g0 + self.groups_per_block).min(groups);
            // Quad offset of group g0 (every earlier group is full): this K block's panels.
            let quads = g0 * self.steps[0];
            let (a0, a_panel) = self.pa.layout.block(quads);
            let (b0, b_panel) = self.pb.layout.block(quads);
            for pj in 0..panels_n {
                let bp = n0 / nr + pj;
                for pi in 0..panels_m {
                    let ap = m0 / mr + pi;
                    let (a, a_row, a_step, a_live) = match self.a_codes {
                        Some(codes) => {
                            let row = ap * mr;
                            let a = codes.as_ptr().add(row * self.k + quads * 4);
                            (a, self.k, 4, mr.min(self.m - row))
                        }
                        None => (self.pa.data.as_ptr().add(a0 + ap * a_panel), 4, 4 * mr, mr),
                    };
                    let t = Tile {
                        a,
                        a_row,
                        a_step,
                        a_live,
                        b: self.pb.data.as_ptr().add(b0 + bp * b_panel),
                        a_pow: self.pa.pow.as_ptr().add(ap * self.pa.meta + g0 * mr),
                        a_corr: self.pa.corr.as_ptr().add(ap * self.pa.meta + g0 * mr),
                        b_corr: self.pb.corr.as_ptr().add(bp * self.pb.meta + g0 * nr),
                        b_pow: self.pb.pow.as_ptr().add(bp * self.pb.meta + g0 * nr),
                        steps: self.steps.as_ptr().add(g0),
                        groups: g1 - g0,
                        depth: self.kernel.depth,
                        acc: acc.as_mut_ptr().add((pi * panels_n + pj) * tile),
                        first: g0 == 0,
                        direct: (direct && g1 == groups).then(|| {
                            let (i, j) = (pi * mr, pj * nr);
                            Direct {
                                out: out.add(i * self.n + j).cast(),
                                stride: self.n,
                                format: T::FORMAT,
                                rows: mr.min(rows - i),
                                cols: nr.min(cols - j),
                                a_scale: a_scale[i..].as_ptr(),
                                b_scale: b_scale[j..].as_ptr(),
                                bias: bias.map_or(std::ptr::null(), |b| b[j..].as_ptr()),
                            }
                        }),
                    };
                    (self.kernel.run)(&t);
                }
            }
            g0 = g1;
        }
        if direct {
            return;
        }
        let e = Epilogue {
            acc,
            a_scale,
            b_scale,
            bias,
            mr,
            nr,
            panels_n,
            fit,
        };
        (T::EPILOGUE)(self.level, &e, out, self.n);
    }
}

/// A block's accumulators [panels_m][panels_n][mr][nr] and what scales them into C.
pub struct Epilogue<'a> {
    acc: &'a [f32],
    /// The block's rows' and columns' scales, and its columns' bias.
    a_scale: &'a [f32],
    b_scale: &'a [f32],
    bias: Option<&'a [f32]>,
    mr: usize,
    nr: usize,
    panels_n: usize,
    /// `scales_fit_f32` of the block's scales.
    fit: bool,
}

/// Row and column scales, bias, the padding cropped, into `out` (row stride `stride`); a tile
/// row at a time (nr consecutive accumulators), so that it vectorizes (dispatched: compiled
/// for the baseline target it cost a sixth of a 1024 x 1376 x 512 GEMM). The scales multiply
/// in f32 where every product of a row and a column scale of the block is a normal f32 far
/// from overflow (the usual case: half the vector work of f64, which was a tenth of a
/// 1024 x 512 x 1376 GEMM); otherwise in f64, since their product may leave the f32 range
/// where the result does not (0 * inf would be NaN).
///
/// # Safety
/// `out` is valid for the block's rows (a_scale.len()) of b_scale.len() elements at `stride`.
#[inline(always)]
#[allow(clippy::extra_unused_type_parameters)] // S picks the target features, via dispatch!
unsafe fn epilogue_impl<S: Simd, T: Output>(e: &Epilogue<'_>, out: *mut T, stride: usize) {
    if e.fit {
        scale_rows::<T, f32>(e, out, stride)
    } else {
        scale_rows::<T, f64>(e, out, stride)
    }
}

/// Whether every product of a nonzero `a` and a nonzero `b` scale lies in [2^-100, 2^100] (so
/// that scaling an accumulator by it in f32 rounds like f64 then f32, to an ulp, and never
/// overflows early; zero scales give zero either way).
#[inline(always)]
fn scales_fit_f32(a: &[f32], b: &[f32]) -> bool {
    // On the bits of |s| (ordered as the values for non-NaN floats), so that it vectorizes:
    // zeros and NaN take no part; no nonzero scale gives (inf, 0), which fits.
    let range = |s: &[f32]| {
        let (lo, hi) = s.iter().fold((u32::MAX, 0u32), |(lo, hi), v| {
            let bits = v.to_bits() & 0x7fff_ffff;
            let live = bits.wrapping_sub(1) < 0x7f80_0000; // 0 < |s| <= inf
            (
                lo.min(if live { bits } else { u32::MAX }),
                hi.max(if live { bits } else { 0 }),
            )
        });
        let value = |bits: u32| f64::from(f32::from_bits(bits));
        (
            if lo == u32::MAX {
                f64::INFINITY
            } else {
                value(lo)
            },
            value(hi),
        )
    };
    let ((a_lo, a_hi), (b_lo, b_hi)) = (range(a), range(b));
    let (lo, hi) = (2f64.powi(-100), 2f64.powi(100));
    a_lo * b_lo >= lo && a_hi * b_hi <= hi
}

/// The epilogue's arithmetic type: f32, or f64 for scales whose products leave f32's range.
trait Scaling: Copy + std::ops::Mul<Output = Self> + std::ops::Add<Output = Self> {
    fn of(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Scaling for f32 {
    #[inline(always)]
    fn of(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl Scaling for f64 {
    #[inline(always)]
    fn of(v: f32) -> Self {
        f64::from(v)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
}

/// [`epilogue_impl`]'s loops in the arithmetic type F.
#[inline(always)]
unsafe fn scale_rows<T: Output, F: Scaling>(e: &Epilogue<'_>, out: *mut T, stride: usize) {
    let (mr, nr) = (e.mr, e.nr);
    let tile = mr * nr;
    let cols = e.b_scale.len();
    for (r, &sa) in e.a_scale.iter().enumerate() {
        let (pi, i) = (r / mr, r % mr);
        let sa = F::of(sa);
        let dst = std::slice::from_raw_parts_mut(out.add(r * stride), cols);
        for (pj, (o, s)) in dst.chunks_mut(nr).zip(e.b_scale.chunks(nr)).enumerate() {
            let base = (pi * e.panels_n + pj) * tile + i * nr;
            let a = &e.acc[base..base + o.len()];
            match e.bias {
                Some(bias) => {
                    let bias = &bias[pj * nr..pj * nr + o.len()];
                    for (((o, &v), &s), &b) in o.iter_mut().zip(a).zip(s).zip(bias) {
                        *o = T::from_f32((F::of(v) * (sa * F::of(s)) + F::of(b)).to_f32());
                    }
                }
                None => {
                    for ((o, &v), &s) in o.iter_mut().zip(a).zip(s) {
                        *o = T::from_f32((F::of(v) * (sa * F::of(s))).to_f32());
                    }
                }
            }
        }
    }
}

crate::dispatch! {
    fn max_abs_part(codes: &[i8]) -> u8 = max_abs_impl;
    fn epilogue_f32(e: &Epilogue<'_>, out: *mut f32, stride: usize) = epilogue_impl<f32>;
    fn epilogue_bf16(e: &Epilogue<'_>, out: *mut Bf16, stride: usize) = epilogue_impl<Bf16>;
}

/// The portable micro-kernel (also the reference for the vector ones in the tests).
unsafe fn scalar_4x8(t: &Tile) {
    const MR: usize = 4;
    const NR: usize = 8;
    if t.first {
        std::ptr::write_bytes(t.acc, 0, MR * NR);
    }
    let (mut a, mut b) = (t.a, t.b);
    for g in 0..t.groups {
        let mut sums = [[0i32; NR]; MR];
        for _ in 0..*t.steps.add(g) {
            for (i, row) in sums.iter_mut().enumerate() {
                for (j, s) in row.iter_mut().enumerate() {
                    for q in 0..4 {
                        *s += i32::from(*a.add(i * 4 + q)) * i32::from(*b.add(j * 4 + q));
                    }
                }
            }
            a = a.add(4 * MR);
            b = b.add(4 * NR);
        }
        for (i, row) in sums.iter().enumerate() {
            let pa = *t.a_pow.add(g * MR + i);
            for (j, &s) in row.iter().enumerate() {
                let pb = *t.b_pow.add(g * NR + j);
                *t.acc.add(i * NR + j) += s as f32 * pb * pa;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::shiftquant::{quantize_rows, Codes, Rounding, Spec};

    thread_local! {
        /// The VNNI fold a test asks for (`fma_fold`); None: this CPU's.
        pub(super) static FMA_FOLD: Cell<Option<bool>> = const { Cell::new(None) };
    }

    /// Runs `check` with each VNNI fold in turn (the other kernels have one).
    fn with_each_fold(mut check: impl FnMut()) {
        for fold in [Some(false), Some(true)] {
            FMA_FOLD.set(fold);
            check();
        }
        FMA_FOLD.set(None);
    }

    struct Quantized {
        codes: Vec<i8>,
        scale: Vec<f32>,
        shifts: Vec<u8>,
    }

    impl Quantized {
        fn new(x: &[f32], k: usize, bits: u32, gs: usize) -> Quantized {
            let rows = x.len() / k;
            let mut q = Quantized {
                codes: vec![0; x.len()],
                scale: vec![0.0; rows],
                shifts: vec![0; rows * num_groups(k, gs)],
            };
            let spec = Spec::new("t", bits, gs, Rounding::Nearest).unwrap();
            let out = Codes {
                codes: &mut q.codes,
                scale: &mut q.scale,
                shifts: &mut q.shifts,
            };
            quantize_rows(SimdLevel::Scalar, x, k, &spec, out).unwrap();
            q
        }

        fn operand(&self) -> GemmOperand<'_> {
            GemmOperand {
                codes: &self.codes,
                scale: &self.scale,
                shifts: &self.shifts,
            }
        }

        /// Dequantized row r, in f64.
        fn row(&self, r: usize, k: usize, gs: usize) -> Vec<f64> {
            let groups = num_groups(k, gs);
            (0..k)
                .map(|c| {
                    let shift = self.shifts[r * groups + c / gs];
                    self.codes[r * k + c] as f64 * self.scale[r] as f64 * 2f64.powi(-(shift as i32))
                })
                .collect()
        }
    }

    /// A [m, k] and B [n, k] quantized at these bit widths (data seeded by `seed`, `seed + 1`)
    /// and a bias of n.
    fn operands(
        (m, n, k, gs): (usize, usize, usize, usize),
        (bits_a, bits_b): (u32, u32),
        seed: u64,
    ) -> (Quantized, Quantized, Vec<f32>) {
        let qa = Quantized::new(&data(m * k, seed), k, bits_a, gs);
        let qb = Quantized::new(&data(n * k, seed + 1), k, bits_b, gs);
        (qa, qb, (0..n).map(|j| j as f32 * 0.37 - 3.0).collect())
    }

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::SplitMix64::new(seed);
        (0..n)
            .map(|i| {
                ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                    * [1.0, 0.01, 7.0][i % 3]
            })
            .collect()
    }

    /// `q` packed as a weight at `level`, in u32 words (so that the bytes are 4-byte aligned).
    fn packed_weight(level: SimdLevel, q: &Quantized, k: usize, gs: usize) -> Vec<u32> {
        let n = q.scale.len();
        let bytes = packed_weight_bytes(level, n, k, gs).unwrap();
        assert_eq!(bytes % 4, 0);
        let mut words = vec![0u32; bytes / 4];
        pack_weight(level, &q.operand(), k, gs, as_bytes_mut(&mut words)).unwrap();
        words
    }

    fn as_bytes_mut(words: &mut [u32]) -> &mut [u8] {
        // SAFETY: u8 has no alignment and every bit pattern is valid.
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), words.len() * 4) }
    }

    fn as_bytes(words: &[u32]) -> &[u8] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), words.len() * 4) }
    }

    #[test]
    fn a_weight_packed_ahead_gives_the_same_bits_on_every_path() {
        let levels: Vec<_> = SimdLevel::ALL
            .into_iter()
            .filter(|l| l.is_supported())
            .collect();
        // 8-bit and narrower A (the AVX2 kernel that offsets A scales B's stored sums), ragged N
        // and K, several K blocks and both column blocks.
        for (m, n, k, gs, (bits_a, bits_b)) in [
            (13, 70, 600, 64, (8, 8)),
            (9, 37, 150, 16, (5, 4)),
            (20, 600, 1100, 64, (8, 6)),
            (1, 33, 7, 4, (6, 8)),
        ] {
            let (qa, qb, bias) = operands((m, n, k, gs), (bits_a, bits_b), 6);
            for &level in &levels {
                let mut want = vec![0f32; m * n];
                let (a, b) = (qa.operand(), qb.operand());
                matmul(level, &a, &b, None, k, gs, Some(&bias), &mut want).unwrap();
                // Packed at this level, and at every other one (then B is packed in the call).
                for &packed_at in &levels {
                    let words = packed_weight(packed_at, &qb, k, gs);
                    let mut got = vec![0f32; m * n];
                    let packed = Some(as_bytes(&words));
                    matmul(level, &a, &b, packed, k, gs, Some(&bias), &mut got).unwrap();
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{level:?} (packed at {packed_at:?}) {m}x{n}x{k}");
                }
            }
        }
    }

    #[test]
    fn every_kernel_of_a_level_stores_b_alike() {
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            let first = Kernel::select(level, MAX_CODE, MAX_CODE);
            for max_a in 1..=MAX_CODE {
                let kernel = Kernel::select(level, max_a, 3);
                assert_eq!((kernel.nr, kernel.b_offset), (first.nr, first.b_offset));
            }
        }
    }

    #[test]
    fn a_packed_weight_for_another_operand_is_refused() {
        let level = SimdLevel::Scalar;
        let (k, gs) = (40, 8);
        let qa = Quantized::new(&data(3 * k, 8), k, 8, gs);
        let qb = Quantized::new(&data(5 * k, 9), k, 8, gs);
        let other = Quantized::new(&data(6 * k, 9), k, 8, gs);
        let words = packed_weight(level, &qb, k, gs);
        let mut out = vec![0f32; 3 * 6];
        let (a, o) = (qa.operand(), other.operand());
        let err = matmul(level, &a, &o, Some(as_bytes(&words)), k, gs, None, &mut out);
        assert!(format!("{:?}", err.unwrap_err()).contains("was packed for 5 x 40"));
        let mut out = vec![0f32; 3 * 5];
        let b = qb.operand();
        let bytes = as_bytes(&words);
        for bad in [
            &bytes[..bytes.len() - 4],
            &bytes[4..],
            &bytes[1..bytes.len() - 3],
            &[][..],
        ] {
            assert!(matmul(level, &a, &b, Some(bad), k, gs, None, &mut out).is_err());
        }
        let mut corrupt = words.clone();
        corrupt[5] = 128; // max |b| beyond the codes' range
        let err = matmul(
            level,
            &a,
            &b,
            Some(as_bytes(&corrupt)),
            k,
            gs,
            None,
            &mut out,
        );
        assert!(err.is_err());
        let mut short = vec![0u32; words.len() - 1];
        assert!(pack_weight(level, &b, k, gs, as_bytes_mut(&mut short)).is_err());
    }

    #[test]
    fn any_bytes_as_a_packed_weight_give_a_result_or_an_error() {
        // Mutated copies of a packed weight (bytes flipped anywhere, header included, and cut
        // or grown): every length is checked before a read, so each call returns, on every
        // level, whatever the content.
        let (k, gs) = (96, 32);
        let (qa, qb, _) = operands((5, 40, k, gs), (8, 6), 11);
        let (a, b) = (qa.operand(), qb.operand());
        let mut rng = crate::rng::SplitMix64::new(12);
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            let words = packed_weight(level, &qb, k, gs);
            for trial in 0..300 {
                let mut w = words.clone();
                for _ in 0..=trial % 8 {
                    let at = rng.next_u64() as usize % w.len();
                    let at = if trial % 3 == 0 { at % 16 } else { at }; // the header, often
                    w[at] ^= 1 << (rng.next_u64() % 32);
                }
                match trial % 5 {
                    0 => w.truncate(w.len() - 1 - rng.next_u64() as usize % 8),
                    1 => w.push(0),
                    _ => {}
                }
                let mut out = vec![0f32; 5 * 40];
                let _ = matmul(level, &a, &b, Some(as_bytes(&w)), k, gs, None, &mut out);
            }
        }
    }

    #[test]
    fn equals_the_product_of_the_dequantized_operands_on_every_path() {
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            // Equal and mixed bit widths (ShiftQuantLinear's backward multiplies grad_bits codes
            // by bits codes): each pair picks its AVX2 kernel and int16 depth.
            for (m, n, k, gs, (bits_a, bits_b)) in [
                (1, 1, 1, 4, (8, 8)),
                (13, 37, 150, 16, (8, 8)),
                (100, 70, 520, 64, (4, 4)),
                (7, 600, 64, 64, (2, 2)),
                (11, 19, 200, 32, (8, 6)),
                (11, 19, 200, 32, (6, 8)),
                (11, 19, 200, 32, (7, 4)),
                (11, 19, 200, 32, (5, 3)),
            ] {
                let (qa, qb, bias) = operands((m, n, k, gs), (bits_a, bits_b), 1);
                let mut out = vec![0f32; m * n];
                let (a, b) = (qa.operand(), qb.operand());
                matmul(level, &a, &b, None, k, gs, Some(&bias), &mut out).unwrap();
                for i in 0..m {
                    let ra = qa.row(i, k, gs);
                    for j in 0..n {
                        let rb = qb.row(j, k, gs);
                        let dot: f64 = ra.iter().zip(&rb).map(|(x, y)| x * y).sum();
                        let norm: f64 = ra.iter().zip(&rb).map(|(x, y)| (x * y).abs()).sum();
                        let want = dot + bias[j] as f64;
                        let got = out[i * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-6 * (norm + want.abs()) + 1e-30,
                            "{level:?} {m}x{n}x{k} ({i},{j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn every_path_gives_the_same_bits_and_bf16_is_the_rounded_f32() {
        // Shifts that differ per group and row, several K blocks, a short last group, tiles
        // cropped at C's last rows and columns, with and without bias.
        let cases = [
            (13, 70, 600, 64, 8, true),
            (20, 33, 300, 32, 6, true),
            (7, 21, 128, 64, 8, false),
            // Fewer rows than the VNNI kernel's 6 (`fit_rows`), A in place and packed.
            (1, 600, 256, 64, 8, true),
            (2, 40, 64, 16, 8, true),
            (3, 70, 128, 32, 8, false),
            (4, 530, 203, 64, 8, true),
            (5, 33, 200, 64, 6, true),
            (2, 50, 96, 32, 5, false),
            (4, 20, 64, 64, 4, true),
            // One row (`vnni_row`'s two chains): an odd number of steps per group (3, 5) and a
            // short last group (2 or 3 quads).
            (1, 45, 140, 12, 8, true),
            (1, 70, 150, 20, 7, false),
        ];
        for (m, n, k, gs, bits, with_bias) in cases {
            let (qa, qb, bias) = operands((m, n, k, gs), (bits, bits), 4);
            let bias = with_bias.then_some(&bias[..]);
            let run = |level| {
                let mut out = vec![0f32; m * n];
                let (a, b) = (qa.operand(), qb.operand());
                matmul(level, &a, &b, None, k, gs, bias, &mut out).unwrap();
                let mut low = vec![Bf16(0); m * n];
                matmul(level, &a, &b, None, k, gs, bias, &mut low).unwrap();
                let want: Vec<Bf16> = out.iter().map(|&v| Bf16::from_f32(v)).collect();
                assert_eq!(low, want, "{level:?}");
                out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            let want = run(SimdLevel::Scalar);
            with_each_fold(|| {
                for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
                    assert_eq!(run(level), want, "{level:?} {m}x{n}x{k}");
                }
            });
        }
    }

    /// Codes of `rows` x `k` all at ±`max` with a sign pattern, shifts 0 and scale 1: the
    /// products that stress the 16-bit pair sums hardest.
    fn extreme(rows: usize, k: usize, gs: usize, max: i8, flip: usize) -> Quantized {
        Quantized {
            codes: (0..rows * k)
                .map(|i| {
                    if (i / k + i / flip).is_multiple_of(2) {
                        max
                    } else {
                        -max
                    }
                })
                .collect(),
            scale: vec![1.0; rows],
            shifts: vec![0; rows * num_groups(k, gs)],
        }
    }

    #[test]
    fn large_group_sums_give_the_same_bits_on_every_path() {
        // |Σ qa · qb| per group of 127 · 127 products on both sides of 2^22 (260 and 264 of
        // them), and past 2^25 (2112 of them, one a 124 · 127: 34064067, 3 mod 4, which the
        // conversion to float must round up to nearest, as every kernel does), with shifts
        // across 0..=15 so that 2^-(ka + kb) reaches 2^-30.
        for (k, gs) in [(520, 260), (528, 264), (512, 256), (4224, 2112)] {
            let (m, n) = (7, 33);
            let shifted = |mut q: Quantized, salt: usize| {
                let len = q.shifts.len();
                q.shifts = (0..len).map(|i| ((i * 7 + salt) % 16) as u8).collect();
                q
            };
            let mut qa = shifted(extreme(m, k, gs, 127, k), 0);
            qa.codes[0] = 124;
            let qb = shifted(extreme(n, k, gs, -127, k), 3);
            let (a, b) = (qa.operand(), qb.operand());
            let run = |level| {
                let mut out = vec![0f32; m * n];
                matmul(level, &a, &b, None, k, gs, None, &mut out).unwrap();
                out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            let want = run(SimdLevel::Scalar);
            with_each_fold(|| {
                for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
                    assert_eq!(run(level), want, "{level:?} g{gs}");
                }
            });
        }
    }

    #[test]
    fn extreme_codes_are_exact_at_every_int16_depth() {
        // max|qa| x max|qb| from 8 x 8 bits (widened every step) down to 2 x 2 bits (never within
        // a group), with groups long enough to cross several widenings, and sign patterns that
        // keep every product positive (flip = k) or alternate them in runs.
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            for (max_a, max_b) in [
                (127, 127),
                (127, 63),
                (63, 63),
                (127, 31),
                (31, 31),
                (7, 7),
                (1, 1),
            ] {
                for (k, gs, flip) in [(1024, 512, 1024), (520, 260, 12), (100, 100, 3)] {
                    let (m, n) = (7, 9);
                    let qa = extreme(m, k, gs, max_a, flip);
                    let qb = extreme(n, k, gs, max_b, flip);
                    let mut out = vec![0f32; m * n];
                    let (a, b) = (qa.operand(), qb.operand());
                    matmul(level, &a, &b, None, k, gs, None, &mut out).unwrap();
                    for i in 0..m {
                        for j in 0..n {
                            let want: i64 = (0..k)
                                .map(|c| {
                                    i64::from(qa.codes[i * k + c]) * i64::from(qb.codes[j * k + c])
                                })
                                .sum();
                            assert_eq!(
                                out[i * n + j] as i64,
                                want,
                                "{level:?} {max_a}x{max_b} k={k} g{gs} ({i},{j})"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn an_all_zero_operand_gives_zeros() {
        // Its largest |code| is 0: the AVX2 kernel then never widens within a group.
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            let (m, n, k, gs) = (11, 19, 200, 32);
            let zeros = Quantized::new(&vec![0.0; n * k], k, 8, gs);
            let qa = Quantized::new(&data(m * k, 3), k, 6, gs);
            let mut out = vec![1f32; m * n];
            let (a, b) = (qa.operand(), zeros.operand());
            matmul(level, &a, &b, None, k, gs, None, &mut out).unwrap();
            assert!(out.iter().all(|&v| v == 0.0), "{level:?}");
        }
    }

    #[test]
    fn k_zero_gives_the_bias_after_a_call_that_left_accumulators() {
        // The block buffer is kept per thread and not zeroed between calls: K = 0 (no group
        // runs) must not read what the previous call left there.
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            let (m, n) = (7, 40);
            let qa = Quantized::new(&data(m * 64, 1), 64, 8, 16);
            let qb = Quantized::new(&data(n * 64, 2), 64, 8, 16);
            let mut out = vec![0f32; m * n];
            let (a, b) = (qa.operand(), qb.operand());
            matmul(level, &a, &b, None, 64, 16, None, &mut out).unwrap();
            let empty = |scale| GemmOperand {
                codes: &[],
                scale,
                shifts: &[],
            };
            let (ea, eb) = (empty(&qa.scale), empty(&qb.scale));
            let bias: Vec<f32> = (0..n).map(|j| j as f32).collect();
            matmul(level, &ea, &eb, None, 0, 16, Some(&bias), &mut out).unwrap();
            for row in out.chunks(n) {
                assert_eq!(row, &bias[..], "{level:?}");
            }
        }
    }

    #[test]
    fn rejects_code_minus_128() {
        // 2 rows, and 600 rows of 512 (scanned in parts over the threads): -128 in the last part.
        for (rows, k) in [(2, 8), (600, 512)] {
            let mut qa = Quantized::new(&data(rows * k, 1), k, 8, 4);
            let mut qb = Quantized::new(&data(3 * k, 2), k, 8, 4);
            let mut out = vec![0f32; rows * 3];
            let last = qa.codes.len() - 3;
            qa.codes[last] = i8::MIN;
            for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
                let (a, b) = (qa.operand(), qb.operand());
                let err = matmul(level, &a, &b, None, k, 4, None, &mut out);
                assert!(matches!(err, Err(FgError::Value(msg)) if msg.contains("a.codes")));
            }
            qa.codes[last] = 0;
            qb.codes[5] = i8::MIN;
            for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
                let (a, b) = (qa.operand(), qb.operand());
                let err = matmul(level, &a, &b, None, k, 4, None, &mut out);
                assert!(matches!(err, Err(FgError::Value(msg)) if msg.contains("b.codes")));
            }
        }
    }

    #[test]
    fn max_abs_code_finds_the_largest_code_in_any_part() {
        let mut rng = crate::rng::SplitMix64::new(5);
        for len in [0usize, 1, 63, 64, 65, (1 << 18) + 1, 3 << 18] {
            let mut codes: Vec<i8> = (0..len).map(|_| rng.below(13) as i8 - 6).collect();
            for at in [0, len / 2, len.saturating_sub(1)]
                .into_iter()
                .filter(|&i| i < len)
            {
                codes[at] = -100;
                for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
                    assert_eq!(max_abs_code(level, &codes), 100, "{len} {at} {level:?}");
                }
                codes[at] = 0;
            }
        }
    }

    #[test]
    fn rejects_mismatched_operands() {
        let qa = Quantized::new(&data(2 * 8, 1), 8, 8, 4);
        let qb = Quantized::new(&data(3 * 8, 2), 8, 8, 4);
        let mut out = vec![0f32; 6];
        let level = SimdLevel::Scalar;
        let (a, b) = (qa.operand(), qb.operand());
        // A group size that does not match the shifts, one that is not a multiple of 4, a bias
        // of the wrong length, an output of the wrong size.
        for (gs, bias, len) in [
            (8, None, 6),
            (6, None, 6),
            (4, Some(&[0.0; 2][..]), 6),
            (4, None, 5),
        ] {
            assert!(matmul(level, &a, &b, None, 8, gs, bias, &mut out[..len]).is_err());
        }
        matmul(level, &a, &b, None, 8, 4, None, &mut out).unwrap();
    }

    #[test]
    fn a_short_a_is_one_block_of_even_panels() {
        // A 6-row kernel with every narrower one (the VNNI kernel's shape).
        const NARROWER: &[unsafe fn(&Tile)] = &[scalar_4x8 as unsafe fn(&Tile); 5];
        let six = Kernel {
            mr: 6,
            narrower: NARROWER,
            ..Kernel::select(SimdLevel::Scalar, MAX_CODE, MAX_CODE)
        };
        let mr = |m| six.fit_rows(m).mr;
        // Rows per panel: m itself below 6, then two equal panels up to 12, then full ones.
        let got: Vec<usize> = [1, 5, 6, 7, 8, 9, 11, 12, 13, 100].map(mr).to_vec();
        assert_eq!(got, [1, 5, 6, 4, 4, 5, 6, 6, 6, 6]);
        // Two threads: a short A with a column block per thread is one block of rows (B read
        // once); with one column block, or a taller A, the rows are split.
        assert_eq!(block_rows(8, 4, 11, Some(2)), 8);
        assert_eq!(block_rows(12, 6, 2, Some(2)), 12);
        assert_eq!(block_rows(8, 4, 1, Some(2)), 4);
        assert_eq!(block_rows(16, 6, 11, Some(2)), 12);
        assert_eq!(block_rows(512, 6, 1, Some(2)), 132);
        assert_eq!(block_rows(8, 4, 11, None), 8);
    }
}
