// ShiftQuant (docs/definitions.md) on the GPU: quantization to int8 codes with a float32 scale per
// row and a power-of-two shift per group, and the integer GEMM on tensor cores. The arithmetic of
// the quantizers is the CPU kernels' (rust/shiftquant/quantize.rs) operation for operation, so
// codes, scales and shifts are bit-identical to the CPU's, stochastic rounding included (the same
// counter-based generator). Launch plans and the checks: python/ferrograd/ops/shiftquant/cuda.py.
//
// sq_quantize_rows_<T>: x [rows, K] along K. One block per row: pass 1 is the row's max |x| (an
// integer max of the bit patterns, block-reduced); pass 2 gives each group to `lanes` lanes of a
// warp (a power of two up to 32, at most group_size / 4), which reduce the group's max by
// shuffles, derive its shift and write its codes. The second read of the row comes from L1/L2.
//
// sq_col_max_<T> + sq_quantize_cols_<T>: x [R, C] along R (the output is [C, R], the
// quantization of xᵀ, with no transposed copy of x). A block owns 32 columns (one per lane, so
// that every row read is one 128-byte line) and `groups_per_block` whole groups of rows. The first
// kernel writes each (column, group) max into scratch and atomically raises each column's max;
// the second derives the shifts, encodes, and writes the codes through a 32 x 32 shared-memory
// tile so that each output row gets 32 consecutive bytes.
//
// sq_gemm_<OUT>: out[M, N] = sa[m] sb[n] Σ_g 2^-(ka[m,g] + kb[n,g]) Σ_{k in g} qa[m,k] qb[n,k]
// (+ bias[n]) on mma.sync m16n8k32 s8 x s8 -> s32. Requirements (the caller pads to meet them):
// K % 32 == 0 and group_size % 32 == 0, so that each 32-column mma step lies in one group; codes
// rows 16-byte aligned. Shifts come transposed, [G, rows padded to 16] (16-byte rows). A block
// of 8 warps (2 x 4) owns 128 x 128 outputs, each warp 64 x 32 (4 x 4 m16n8 tiles); A and B
// stream through a 4-stage cp.async ring of 64-byte row slices (rows padded to 80 bytes: ldmatrix
// reads without bank conflicts), each stage with the shifts of its two 32-column steps. At the end
// of each group the int32 partials are folded into float32 accumulators: int32 -> float by the
// 1.5 * 2^23 magic (exact below 2^22, i.e. group_size <= 256 at 8 bits; larger groups take the
// conversion instruction) times the exact 2^-(ka + kb). The epilogue applies the row scales and
// the bias and rounds to the output type.

#include "common.cuh"

using namespace fg;

namespace {

constexpr u32 kAbsMask = 0x7fffffffu;
constexpr u32 kInfBits = 0x7f800000u;
constexpr int kMaxShift = 15;

__device__ __forceinline__ u32 abs_bits(float v) { return __float_as_uint(v) & kAbsMask; }

// floor(log2(row_max / group_max)) exactly, clamped to 0..15 (15 for an all-zero group): the
// largest k with group_max * 2^k <= row_max. Doubles hold every float (denormals too) as a
// normal number, so exponents and mantissas compare directly.
__device__ __forceinline__ int shift_of(u32 row_bits, u32 group_bits) {
    if (group_bits == 0) {
        return kMaxShift;
    }
    const u64 r = static_cast<u64>(__double_as_longlong(static_cast<double>(__uint_as_float(row_bits))));
    const u64 g = static_cast<u64>(__double_as_longlong(static_cast<double>(__uint_as_float(group_bits))));
    constexpr u64 kMantissa = (1ull << 52) - 1;
    const i64 k = static_cast<i64>(r >> 52) - static_cast<i64>(g >> 52) -
                  static_cast<i64>((g & kMantissa) > (r & kMantissa));
    return static_cast<int>(k < 0 ? 0 : (k > kMaxShift ? kMaxShift : k));
}

// The key of one output row's random stream (SplitMix64 finalizer, twice).
__device__ __forceinline__ u64 row_key(u64 seed, u64 row) {
    u64 z = seed ^ (row * 0x9e3779b97f4a7c15ull);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        z = (z ^ (z >> 30)) * 0xbf58476d1ce5e9b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
    }
    return z;
}

__device__ __forceinline__ u32 mix32(u32 x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    return x ^ (x >> 16);
}

// A uniform draw in [0, 1) with 24 random bits for column `col` of the row keyed `key`.
__device__ __forceinline__ float uniform(u64 key, u32 col) {
    const u32 h = mix32(col ^ static_cast<u32>(key)) ^ static_cast<u32>(key >> 32);
    return __fmul_rn(static_cast<float>(h >> 8), 1.0f / 16777216.0f);
}

// What to quantize to, shared by every quantizer.
struct Spec {
    float qmax;
    bool stochastic;
    u64 seed;
};

// The code of v in a group with 2^k = pow of a row with the given scale: v * 2^k / scale rounded
// (half to even, or stochastically from the draw of (key, col)) and clamped to +-qmax. The
// explicit _rn intrinsics keep the compiler from contracting anything into an FMA.
__device__ __forceinline__ signed char encode(float v, float pow, float scale, const Spec& spec,
                                              u64 key, u32 col) {
    const float t = __fdiv_rn(__fmul_rn(v, pow), scale);
    float q;
    if (spec.stochastic) {
        const float floor_t = floorf(t);
        q = uniform(key, col) < __fsub_rn(t, floor_t) ? __fadd_rn(floor_t, 1.0f) : floor_t;
    } else {
        q = rintf(t);
    }
    return static_cast<signed char>(static_cast<int>(fminf(fmaxf(q, -spec.qmax), spec.qmax)));
}

__device__ __forceinline__ float pow2(int k) { return __uint_as_float(static_cast<u32>(127 + k) << 23); }

// Elements i .. i + 3 of p as floats (0 past `valid`); one vector load when `vec` (then p + i is
// aligned to 4 elements) and all four are valid.
template <class T>
__device__ __forceinline__ void load4(const T* p, i64 i, int valid, bool vec, float (&v)[4]) {
    if (vec && valid >= 4) {
        if constexpr (is_f32<T>::value) {
            const float4 w = *reinterpret_cast<const float4*>(p + i);
            v[0] = w.x, v[1] = w.y, v[2] = w.z, v[3] = w.w;
        } else {
            const uint2 w = *reinterpret_cast<const uint2*>(p + i);
            const T* h = reinterpret_cast<const T*>(&w);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                v[j] = to_float(h[j]);
            }
        }
        return;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        v[j] = j < valid ? to_float(p[i + j]) : 0.0f;
    }
}

__device__ __forceinline__ u32 max_xor(u32 v, int from_offset) {
    for (int offset = from_offset; offset > 0; offset >>= 1) {
        v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
    }
    return v;
}

// The max of v over the block (every thread gets it); `slots` holds one value per warp.
__device__ __forceinline__ u32 block_max(u32 v, u32* slots) {
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    v = max_xor(v, 16);
    if ((threadIdx.x & 31) == 0) {
        slots[warp] = v;
    }
    __syncthreads();
    u32 m = 0;
    for (int w = 0; w < warps; ++w) {
        m = max(m, slots[w]);
    }
    return m;
}

// The scale of a row whose max |x| has these bits: max / qmax, 0 for a zero row, NaN for a row
// holding NaN or infinity (its codes are then 0 and its shifts 15).
__device__ __forceinline__ float row_scale(u32 max_bits, float qmax) {
    if (max_bits == 0) {
        return 0.0f;
    }
    return max_bits >= kInfBits ? __uint_as_float(0x7fc00000u) : __fdiv_rn(__uint_as_float(max_bits), qmax);
}

template <class T>
__device__ void quantize_rows(const T* __restrict__ x, signed char* __restrict__ codes,
                              float* __restrict__ scales, u8* __restrict__ shifts, int len,
                              int group_size, int lanes, bool vec, Spec spec) {
    __shared__ u32 slots[32];
    const i64 row = blockIdx.x;
    const T* xr = x + row * len;
    signed char* cr = codes + row * len;
    const int groups = (len + group_size - 1) / group_size;
    u8* sr = shifts + row * groups;

    // Pass 1: the row's max |x| as bits (an integer max: the order of |x| is that of its bits).
    u32 local = 0;
    for (int i = 4 * threadIdx.x; i < len; i += 4 * blockDim.x) {
        float v[4];
        load4(xr, i, len - i, vec, v);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            local = max(local, abs_bits(v[j]));
        }
    }
    const u32 max_bits = block_max(local, slots);
    const float scale = row_scale(max_bits, spec.qmax);
    if (threadIdx.x == 0) {
        scales[row] = scale;
    }
    if (max_bits == 0 || max_bits >= kInfBits) {
        for (int i = threadIdx.x; i < len; i += blockDim.x) {
            cr[i] = 0;
        }
        for (int g = threadIdx.x; g < groups; g += blockDim.x) {
            sr[g] = kMaxShift;
        }
        return;
    }
    const u64 key = spec.stochastic ? row_key(spec.seed, static_cast<u64>(row)) : 0;

    // Pass 2: `lanes` lanes per group, 32 / lanes groups per warp at a time.
    const int lane = threadIdx.x & 31;
    const int sub = lane / lanes;
    const int in_group = lane % lanes;
    const int per_warp = 32 / lanes;
    const int stride = (blockDim.x >> 5) * per_warp;
    const int units = group_size / 4;  // 4-element units per group
    for (int base = (threadIdx.x >> 5) * per_warp; base < groups; base += stride) {
        const int g = base + sub;  // lanes past the last group take part in the shuffles only
        const int g_len = g < groups ? min(group_size, len - g * group_size) : 0;
        const i64 g0 = static_cast<i64>(g) * group_size;
        u32 gmax = 0;
        for (int u = in_group; u < units; u += lanes) {
            float v[4];
            load4(xr, g0 + 4 * u, g_len - 4 * u, vec, v);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                gmax = max(gmax, abs_bits(v[j]));
            }
        }
        gmax = max_xor(gmax, lanes >> 1);
        if (g >= groups) {
            continue;
        }
        const int k = shift_of(max_bits, gmax);
        if (in_group == 0) {
            sr[g] = static_cast<u8>(k);
        }
        const float pow = pow2(k);
        for (int u = in_group; u < units && 4 * u < g_len; u += lanes) {
            float v[4];
            const int valid = g_len - 4 * u;
            load4(xr, g0 + 4 * u, valid, vec, v);
            signed char q[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                q[j] = encode(v[j], pow, scale, spec, key, static_cast<u32>(g0 + 4 * u + j));
            }
            if (vec && valid >= 4) {
                *reinterpret_cast<char4*>(cr + g0 + 4 * u) = make_char4(q[0], q[1], q[2], q[3]);
            } else {
                for (int j = 0; j < valid && j < 4; ++j) {
                    cr[g0 + 4 * u + j] = q[j];
                }
            }
        }
    }
}

constexpr int kColTile = 32;  // columns per block of the column quantizers (one per lane)

// Per (column, group) max |x| bits into gmax [C, G]; each column's max raised into colmax [C]
// (zeroed by the caller).
template <class T>
__device__ void col_max(const T* __restrict__ x, u32* __restrict__ gmax, u32* __restrict__ colmax,
                        int rows, int cols, int group_size, int groups_per_block) {
    extern __shared__ u32 block_gmax[];  // [groups_per_block][kColTile]
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    const int c = blockIdx.x * kColTile + lane;
    const int g_first = blockIdx.y * groups_per_block;
    const int groups = (rows + group_size - 1) / group_size;
    const int g_count = min(groups_per_block, groups - g_first);
    for (int i = threadIdx.x; i < g_count * kColTile; i += blockDim.x) {
        block_gmax[i] = 0;
    }
    __syncthreads();
    const int r_begin = g_first * group_size;
    const int r_end = min(rows, (g_first + g_count) * group_size);
    u32 run = 0;
    int run_group = 0;
    for (int r = r_begin + warp; r < r_end; r += warps) {
        const int g = (r - r_begin) / group_size;
        if (g != run_group) {
            atomicMax(&block_gmax[run_group * kColTile + lane], run);
            run = 0;
            run_group = g;
        }
        if (c < cols) {
            run = max(run, abs_bits(to_float(x[static_cast<i64>(r) * cols + c])));
        }
    }
    atomicMax(&block_gmax[run_group * kColTile + lane], run);
    __syncthreads();
    if (c < cols && warp == 0) {
        u32 m = 0;
        for (int g = 0; g < g_count; ++g) {
            const u32 v = block_gmax[g * kColTile + lane];
            gmax[static_cast<i64>(c) * groups + g_first + g] = v;
            m = max(m, v);
        }
        atomicMax(colmax + c, m);
    }
}

// Codes [C, R], scale [C], shifts [C, G] of x [R, C] along R, from col_max's outputs.
template <class T>
__device__ void quantize_cols(const T* __restrict__ x, const u32* __restrict__ gmax,
                              const u32* __restrict__ colmax, signed char* __restrict__ codes,
                              float* __restrict__ scales, u8* __restrict__ shifts, int rows,
                              int cols, int group_size, int groups_per_block, Spec spec) {
    extern __shared__ float block_pow[];  // [groups_per_block][kColTile]
    // tile[column][row] of one 32-row step; the row stride of 36 bytes spreads the columns over
    // the banks.
    __shared__ __align__(16) signed char tile[kColTile][kColTile + 4];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    const int c0 = blockIdx.x * kColTile;
    const int c = c0 + lane;
    const int g_first = blockIdx.y * groups_per_block;
    const int groups = (rows + group_size - 1) / group_size;
    const int g_count = min(groups_per_block, groups - g_first);
    const u32 max_bits = c < cols ? colmax[c] : 0;
    const bool special = max_bits == 0 || max_bits >= kInfBits;
    const float scale = row_scale(max_bits, spec.qmax);
    if (c < cols) {
        if (blockIdx.y == 0 && warp == 0) {
            scales[c] = scale;
        }
        for (int g = warp; g < g_count; g += warps) {
            const int k = special ? kMaxShift : shift_of(max_bits, gmax[static_cast<i64>(c) * groups + g_first + g]);
            shifts[static_cast<i64>(c) * groups + g_first + g] = static_cast<u8>(k);
            block_pow[g * kColTile + lane] = pow2(k);
        }
    }
    __syncthreads();
    const u64 key = spec.stochastic && c < cols ? row_key(spec.seed, static_cast<u64>(c)) : 0;
    const int r_begin = g_first * group_size;
    const int r_end = min(rows, (g_first + g_count) * group_size);
    const bool vec = (rows & 3) == 0;
    for (int r0 = r_begin; r0 < r_end; r0 += kColTile) {
        for (int i = warp; i < kColTile; i += warps) {
            const int r = r0 + i;
            signed char q = 0;
            if (r < r_end && c < cols && !special) {
                const float v = to_float(x[static_cast<i64>(r) * cols + c]);
                const float pow = block_pow[((r - r_begin) / group_size) * kColTile + lane];
                q = encode(v, pow, scale, spec, key, static_cast<u32>(r));
            }
            tile[lane][i] = q;
        }
        __syncthreads();
        // 8 threads per column, 4 rows each.
        for (int t = threadIdx.x; t < kColTile * 8; t += blockDim.x) {
            const int cc = c0 + t / 8;
            const int rr = r0 + 4 * (t % 8);
            if (cc >= cols || rr >= r_end) {
                continue;
            }
            signed char* dst = codes + static_cast<i64>(cc) * rows + rr;
            const signed char* src = &tile[t / 8][4 * (t % 8)];
            if (vec && rr + 4 <= r_end) {
                *reinterpret_cast<u32*>(dst) = *reinterpret_cast<const u32*>(src);
            } else {
                for (int j = 0; j < 4 && rr + j < r_end; ++j) {
                    dst[j] = src[j];
                }
            }
        }
        __syncthreads();
    }
}

// ---- integer GEMM ----

constexpr int kBM = 128;
constexpr int kBN = 128;
constexpr int kSlice = 64;                 // bytes (= k) of a row per pipeline stage
constexpr int kSliceStride = kSlice + 16;  // padded shared-memory row
constexpr int kStages = 4;
constexpr int kGemmThreads = 256;
constexpr int kShiftBytes = 2 * (kBM + kBN);  // shifts of the stage's two 32-column steps
constexpr int kStageBytes = (kBM + kBN) * kSliceStride + kShiftBytes;
constexpr int kGemmSmem = kStages * kStageBytes;
static_assert(kGemmSmem == 83968, "keep ops/shiftquant/cuda.py GEMM_SMEM in sync");

__device__ __forceinline__ void mma_16832(i32 (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

struct GemmOperand {
    const signed char* codes;  // [rows, k]
    const float* scale;        // [rows]
    const u8* shifts_t;        // [groups, rows_padded]
    int rows;
    int rows_padded;
};

// Stage `slot` <- 64 columns starting at k0 of the block's A and B rows, and the shifts of the
// groups of its two 32-column steps.
__device__ __forceinline__ void load_stage(unsigned char* smem, int slot, const GemmOperand& a,
                                           const GemmOperand& b, int m0, int n0, int k0, int k,
                                           int group_size) {
    unsigned char* stage = smem + slot * kStageBytes;
    // 256 rows x 4 16-byte chunks: A rows first, then B rows.
#pragma unroll
    for (int i = 0; i < (kBM + kBN) * 4 / kGemmThreads; ++i) {
        const int q = threadIdx.x + i * kGemmThreads;
        const int r = q >> 2;
        const int chunk = q & 3;
        // Field by field: a reference to either operand would put both on the stack.
        const bool is_a = r < kBM;
        const signed char* codes = is_a ? a.codes : b.codes;
        const int row = is_a ? m0 + r : n0 + r - kBM;
        const int col = k0 + chunk * 16;
        const bool ok = row < (is_a ? a.rows : b.rows) && col < k;
        const signed char* src = ok ? codes + static_cast<i64>(row) * k + col : codes;
        cp_async_16(stage + r * kSliceStride + chunk * 16, src, ok ? 16 : 0);
    }
    // Shifts: 2 steps x (128 A rows + 128 B rows) = 32 chunks of 16 bytes.
    if (threadIdx.x < 32) {
        const int step = threadIdx.x >> 4;
        const int part = threadIdx.x & 15;
        const bool is_a = part < 8;
        const u8* shifts_t = is_a ? a.shifts_t : b.shifts_t;
        const int padded = is_a ? a.rows_padded : b.rows_padded;
        const int row = (is_a ? m0 : n0) + (part & 7) * 16;
        const int kk = k0 + 32 * step;
        const bool ok = row < padded && kk < k;
        const u8* src = ok ? shifts_t + static_cast<i64>(kk / group_size) * padded + row : shifts_t;
        cp_async_16(stage + (kBM + kBN) * kSliceStride + step * (kBM + kBN) + part * 16, src,
                    ok ? 16 : 0);
    }
}

template <class OUT>
__device__ void gemm(GemmOperand a, GemmOperand b, const float* __restrict__ bias,
                     OUT* __restrict__ out, int k, int group_size) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int wm = warp >> 2;  // 2 warps along M
    const int wn = warp & 3;   // 4 warps along N
    const int gid = lane >> 2;
    const int tig = lane & 3;
    const int m0 = blockIdx.y * kBM;
    const int n0 = blockIdx.x * kBN;
    const int tiles = (k + kSlice - 1) / kSlice;
    const int steps_per_group = group_size / 32;
    const bool magic = group_size <= 256;  // |int32 partial| < 2^22: the magic conversion is exact

    float acc[4][4][4] = {};
    i32 part[4][4][4] = {};

#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < tiles) {
            load_stage(smem, s, a, b, m0, n0, s * kSlice, k, group_size);
        }
        cp_async_commit();
    }
    for (int tile = 0; tile < tiles; ++tile) {
        cp_async_wait<kStages - 2>();  // this tile has landed (for this thread) ...
        __syncthreads();               // ... and for every thread; the slot refilled below is free
        const int next = tile + kStages - 1;
        if (next < tiles) {
            load_stage(smem, next % kStages, a, b, m0, n0, next * kSlice, k, group_size);
        }
        cp_async_commit();

        const unsigned char* stage = smem + (tile % kStages) * kStageBytes;
        const unsigned char* stage_shifts = stage + (kBM + kBN) * kSliceStride;
#pragma unroll
        for (int s = 0; s < 2; ++s) {
            const int step = tile * 2 + s;  // global 32-column step
            if (step * 32 >= k) {
                break;
            }
            u32 af[4][4];
#pragma unroll
            for (int mt = 0; mt < 4; ++mt) {
                // Matrices: rows 0-7 / 8-15 (lane bit 3) x bytes 0-15 / 16-31 (lane bit 4).
                const int r = wm * 64 + mt * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
                ldmatrix_x4(af[mt], stage + r * kSliceStride + s * 32 + 16 * (lane >> 4));
            }
            u32 bf[4][2];
#pragma unroll
            for (int np = 0; np < 2; ++np) {
                // Matrices: n 0-7 x bytes 0-15, n 0-7 x 16-31, n 8-15 x 0-15, n 8-15 x 16-31.
                const int r = kBM + wn * 32 + np * 16 + (lane & 7) + 8 * (lane >> 4);
                u32 regs[4];
                ldmatrix_x4(regs, stage + r * kSliceStride + s * 32 + 16 * ((lane >> 3) & 1));
                bf[2 * np][0] = regs[0];
                bf[2 * np][1] = regs[1];
                bf[2 * np + 1][0] = regs[2];
                bf[2 * np + 1][1] = regs[3];
            }
#pragma unroll
            for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) {
                    mma_16832(part[mt][nt], af[mt], bf[nt]);
                }
            }
            if ((step + 1) % steps_per_group != 0 && (step + 1) * 32 < k) {
                continue;
            }
            // End of a group: acc += float(part) * 2^-(ka + kb); part = 0. The factor's bits are
            // (127 - ka) << 23 minus kb << 23: one integer subtraction per element.
            const unsigned char* sh = stage_shifts + s * (kBM + kBN);
            int row_bits[4][2], col_bits[4][2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
#pragma unroll
                for (int mt = 0; mt < 4; ++mt) {
                    row_bits[mt][h] = (127 - sh[wm * 64 + mt * 16 + gid + 8 * h]) << 23;
                }
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) {
                    col_bits[nt][h] = sh[kBM + wn * 32 + nt * 8 + 2 * tig + h] << 23;
                }
            }
#pragma unroll
            for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const float factor =
                            __int_as_float(row_bits[mt][i >> 1] - col_bits[nt][i & 1]);
                        const float p = magic ? __fsub_rn(__int_as_float(part[mt][nt][i] + 0x4B400000), 12582912.0f)
                                              : __int2float_rn(part[mt][nt][i]);
                        acc[mt][nt][i] = __fmaf_rn(p, factor, acc[mt][nt][i]);
                        part[mt][nt][i] = 0;
                    }
                }
            }
        }
    }
    cp_async_wait<0>();

    // Epilogue: row and column scales, bias, output type; c0, c1 / c2, c3 are column pairs.
    const i64 n = b.rows;
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = m0 + wm * 64 + mt * 16 + gid + 8 * h;
            if (row >= a.rows) {
                continue;
            }
            // The scales multiply in double, as on the CPU (rust/shiftquant/gemm.rs): a product
            // of two scales beyond float's range must not turn an exact 0 into NaN (0 * inf).
            const double sa = a.scale[row];
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const int col = n0 + wn * 32 + nt * 8 + 2 * tig;
                float v[2];
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const int cj = min(col + j, b.rows - 1);
                    double y = __dmul_rn(acc[mt][nt][2 * h + j], __dmul_rn(sa, b.scale[cj]));
                    if (bias != nullptr) {
                        y = __dadd_rn(y, bias[cj]);
                    }
                    v[j] = __double2float_rn(y);
                }
                OUT* dst = out + row * n + col;
                if (col + 1 < b.rows && (n & 1) == 0) {
                    store2(dst, v[0], v[1]);
                } else if (col < b.rows) {
                    *dst = static_cast<OUT>(v[0]);
                    if (col + 1 < b.rows) {
                        dst[1] = static_cast<OUT>(v[1]);
                    }
                }
            }
        }
    }
}

}  // namespace

// Entry points, one per element type (NVRTC compiles them all in one program).
#define SQ_QUANTIZE_ENTRIES(T, NAME)                                                              \
    extern "C" __global__ void __launch_bounds__(256, 4)                                            \
        sq_quantize_rows_##NAME(const T* x, signed char* codes, float* scales, u8* shifts,       \
                                int len, int group_size, int lanes, int vec, float qmax,         \
                                int stochastic, u64 seed) {                                      \
        quantize_rows<T>(x, codes, scales, shifts, len, group_size, lanes, vec != 0,             \
                         Spec{qmax, stochastic != 0, seed});                                     \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(256, 4)                                            \
        sq_col_max_##NAME(const T* x, u32* gmax, u32* colmax, int rows, int cols,                \
                          int group_size, int groups_per_block) {                                \
        col_max<T>(x, gmax, colmax, rows, cols, group_size, groups_per_block);                   \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(256, 4) sq_quantize_cols_##NAME(                   \
        const T* x, const u32* gmax, const u32* colmax, signed char* codes, float* scales,      \
        u8* shifts, int rows, int cols, int group_size, int groups_per_block, float qmax,        \
        int stochastic, u64 seed) {                                                              \
        quantize_cols<T>(x, gmax, colmax, codes, scales, shifts, rows, cols, group_size,         \
                         groups_per_block, Spec{qmax, stochastic != 0, seed});                   \
    }
SQ_QUANTIZE_ENTRIES(float, f32)
SQ_QUANTIZE_ENTRIES(__half, f16)
SQ_QUANTIZE_ENTRIES(__nv_bfloat16, bf16)
#undef SQ_QUANTIZE_ENTRIES

#define SQ_GEMM_ENTRY(OUT, NAME)                                                                  \
    extern "C" __global__ void __launch_bounds__(kGemmThreads, 1) sq_gemm_##NAME(               \
        const signed char* a_codes, const float* a_scale, const u8* a_shifts_t, int m,           \
        int m_padded, const signed char* b_codes, const float* b_scale, const u8* b_shifts_t,    \
        int n, int n_padded, const float* bias, OUT* out, int k, int group_size) {               \
        gemm<OUT>(GemmOperand{a_codes, a_scale, a_shifts_t, m, m_padded},                        \
                  GemmOperand{b_codes, b_scale, b_shifts_t, n, n_padded}, bias, out, k,          \
                  group_size);                                                                   \
    }
SQ_GEMM_ENTRY(float, f32)
SQ_GEMM_ENTRY(__half, f16)
SQ_GEMM_ENTRY(__nv_bfloat16, bf16)
#undef SQ_GEMM_ENTRY
